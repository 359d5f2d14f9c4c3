#!/usr/bin/env bash
# rig.sh — the network-namespace cluster rig: N containerd "nodes" and one upstream registry,
# each in a network namespace of its own, joined by a bridge in yet another namespace.
#
# One job: build, run and tear down that topology, and give other scripts (and tests/rig/cluster.rs)
# small helpers to act *as a node*. Generating and pushing test images is mkimages.py and
# push-images.sh's job; the daemon under test is started through the start_speculum hook.
#
#   rig.sh up | down | status          (run as root)
#   source tests/rig/rig.sh            (then call node_exec, ctr_pull, cri_pull, start_speculum…)
#
# Safety: every address of the rig lives inside namespaces this script creates (names start with
# "spcl-"). The host namespace gets only a blackhole route for the rig's subnet, so a mistaken
# request from the host is dropped locally instead of leaving through the default route. The
# namespaces have no default route, so nothing inside them can reach beyond the bridge either.
# Processes are stopped by recorded PID (checked against their command line) or because they
# live in a rig namespace; never by name.
#
# See tests/rig/README.md for the topology and how to debug it.

set -euo pipefail

RIG_SELF=$(readlink -f "${BASH_SOURCE[0]}")
RIG_HERE=$(dirname "$RIG_SELF")
RIG_REPO=$(readlink -f "$RIG_HERE/../..")

# --- knobs (environment) -------------------------------------------------------------------------
RIG_DIR=${RIG_DIR:-/tmp/speculum-rig}
RIG_NODES=${RIG_NODES:-}                       # default: what `up` recorded, else 3
RIG_SUBNET=${RIG_SUBNET:-10.250.77}            # a /24; upstream .2, node N .(10+N)
RIG_UPSTREAM_RATE=${RIG_UPSTREAM_RATE:-}       # tc tbf rate of the upstream link, e.g. 100mbit
RIG_NODE_RATE=${RIG_NODE_RATE:-}               # tc tbf rate of each node link (both directions)
RIG_TBF_BURST=${RIG_TBF_BURST:-1mb}            # must exceed rate/HZ and a GSO packet
RIG_TIMEOUT=${RIG_TIMEOUT:-60}                 # seconds for any bounded wait in this script
SPECULUM_BIN=${SPECULUM_BIN:-$RIG_REPO/target/debug/speculum}
# The rig's own knobs are RIG_*: the daemon reads SPECULUM_<SECTION>_<KEY> as settings.
RIG_STOP_TIMEOUT=${RIG_STOP_TIMEOUT:-30}
# The daemon's tag switches, written into each node's speculum.yaml by write_speculum_config.
RIG_RESOLVE_TAGS=${RIG_RESOLVE_TAGS:-true}
RIG_RESOLVE_LATEST_TAG=${RIG_RESOLVE_LATEST_TAG:-true}
# Who names a tag's digest (mirror.tag_resolution): upstream-first (the daemon's default) or
# cluster-first.
RIG_TAG_RESOLUTION=${RIG_TAG_RESOLUTION:-upstream-first}
# Answers 200 once the daemon's listeners, containerd and first reconcile are ready.
RIG_READY_URL=${RIG_READY_URL:-http://127.0.0.1:9402/readyz}
RIG_METRICS_URL=${RIG_METRICS_URL:-http://127.0.0.1:9402/metrics}
# Which containerd the nodes run: a line of tests/containerd/containerd.sh (1.6 = Debian's,
# 1.7, 2.3, 2.4: built from the Go module proxy on first use). Default: the 2.x LTS.
RIG_CONTAINERD_SH=$RIG_REPO/tests/containerd/containerd.sh
RIG_CONTAINERD=${RIG_CONTAINERD:-$(bash "$RIG_CONTAINERD_SH" default)}
# RIG_CONTENT_DIR=introspect (default: the daemon asks containerd where its content store is)
# or config (containerd.content_dir written into speculum.yaml by hand).
# Extra KEY=VALUE settings for every node's containerd config (containerd.sh config keys), e.g.
# "concurrent_layer_fetch_buffer=1048576 max_concurrent_downloads=8".
RIG_CONTAINERD_OPTS=${RIG_CONTAINERD_OPTS:-}

# Namespace names start with RIG_NS_PREFIX: with another RIG_DIR (its own lock, RIG_DIR.lock),
# RIG_SUBNET and prefix, a second rig can exist beside the default one.
RIG_NS_PREFIX=${RIG_NS_PREFIX:-spcl-}
[[ $RIG_NS_PREFIX =~ ^[a-z]{2,8}-$ ]] || { echo "RIG_NS_PREFIX must be 2-8 lowercase letters and '-', not '$RIG_NS_PREFIX'" >&2; exit 2; }
RIG_BRIDGE_NS=${RIG_NS_PREFIX}br
RIG_UP_NS=${RIG_NS_PREFIX}up
RIG_UPSTREAM_PORT=5000
RIG_K8S_NS=k8s.io

# Waits, recorded processes, leftovers in our namespaces, veth links: shared with the kubelet
# cluster (tests/cluster/cluster.sh), in nslib.sh.
NS_DIR=$RIG_DIR
NS_OWNER="$RIG_DIR/"
NS_PREFIX=$RIG_NS_PREFIX
NS_BRIDGE=$RIG_BRIDGE_NS
NS_TBF_BURST=$RIG_TBF_BURST
NS_POLL=0.1
# shellcheck source=tests/rig/nslib.sh
source "$RIG_HERE/nslib.sh"

# --- small pieces --------------------------------------------------------------------------------
log() { printf '%s rig: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_root() { [[ $(id -u) -eq 0 ]] || die "the rig needs root (network namespaces, mounts)"; }

require_tools() {
	local t missing=()
	for t in ip tc runc docker-registry skopeo curl jq python3 flock; do
		command -v "$t" >/dev/null || missing+=("$t")
	done
	((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}"
}

# node_count: how many nodes the rig has (RIG_NODES, else what `up` recorded, else 3).
node_count() {
	if [[ -n $RIG_NODES ]]; then
		echo "$RIG_NODES"
	elif [[ -f $RIG_DIR/nodes ]]; then
		cat "$RIG_DIR/nodes"
	else
		echo 3
	fi
}

check_node() {
	if ! [[ $1 =~ ^[0-9]+$ ]] || (($1 < 1 || $1 > 200)); then die "bad node number '$1'"; fi
}

node_ns() { echo "${RIG_NS_PREFIX}n$1"; }
node_ip() { echo "$RIG_SUBNET.$((10 + $1))"; }
node_dir() { echo "$RIG_DIR/n$1"; }
node_sock() { echo "$RIG_DIR/n$1/containerd.sock"; }
node_certs() { echo "$RIG_DIR/n$1/certs.d"; }
upstream_ip() { echo "$RIG_SUBNET.2"; }
# upstream_host: the registry host as image references name it, e.g. 10.250.77.2:5000.
upstream_host() { echo "$(upstream_ip):$RIG_UPSTREAM_PORT"; }
rig_subnet() { echo "$RIG_SUBNET.0/24"; }

# --- acting inside namespaces --------------------------------------------------------------------
# node_exec N CMD...: runs CMD inside node N's network namespace.
node_exec() {
	check_node "$1"
	local ns
	ns=$(node_ns "$1")
	shift
	ip netns exec "$ns" "$@"
}

# up_exec CMD...: runs CMD inside the upstream registry's namespace.
up_exec() { ip netns exec "$RIG_UP_NS" "$@"; }

# ctr_node N ARGS...: ctr against node N's containerd, namespace k8s.io, inside node N's netns
# (ctr fetches in its own process, so it must sit in the node's network).
ctr_node() {
	local n=$1
	shift
	node_exec "$n" "$(containerd_bin)/ctr" --address "$(node_sock "$n")" --namespace "$RIG_K8S_NS" "$@"
}

# containerd_bin: the directory holding containerd, ctr and containerd-shim-runc-v2 of
# RIG_CONTAINERD (built and cached by tests/containerd/containerd.sh on first use).
containerd_bin() {
	if [[ -z ${RIG_CONTAINERD_BIN:-} ]]; then
		RIG_CONTAINERD_BIN=$(bash "$RIG_CONTAINERD_SH" bin "$RIG_CONTAINERD") ||
			die "no containerd $RIG_CONTAINERD (tests/containerd/containerd.sh bin $RIG_CONTAINERD)"
	fi
	echo "$RIG_CONTAINERD_BIN"
}

# ctr_pull N REF: pulls like a node's tooling would, resolving hosts through the node's certs.d
# (so it goes through the mirror once speculum has configured it).
ctr_pull() {
	local n=$1 ref=$2
	ctr_node "$n" images pull --hosts-dir "$(node_certs "$n")" "$ref"
}

# ctr_fetch N REF: `ctr content fetch` on node N through its hosts.toml: every blob of REF for
# this platform and the image record, without unpacking (for layers containerd cannot unpack).
ctr_fetch() {
	local n=$1 ref=$2
	ctr_node "$n" content fetch --hosts-dir "$(node_certs "$n")" "$ref" >/dev/null
}

# mirror_blob_type N REPO DIGEST: the Content-Type node N's mirror endpoint answers a blob HEAD
# with (empty when it answers none).
mirror_blob_type() {
	local n=$1 repo=$2 digest=$3
	node_exec "$n" curl -sfI --max-time 10 \
		"${RIG_MIRROR_URL:-http://127.0.0.1:5080}/v2/$repo/blobs/$digest?ns=$(upstream_ip)%3A$RIG_UPSTREAM_PORT" |
		awk 'tolower($1) == "content-type:" { sub(/\r$/, "", $2); print $2 }' || true
}

# image_digest N REF: the digest node N's containerd records for REF (empty if none).
image_digest() {
	ctr_node "$1" images ls "name==$2" | awk 'NR == 2 { print $3 }'
}

# content_verify N DIGEST: re-hashes one blob from node N's content store.
content_verify() {
	local n=$1 digest=$2 got
	got=$(ctr_node "$n" content get "$digest" | sha256sum | awk '{ print $1 }')
	[[ "sha256:$got" == "$digest" ]]
}

# ingest_bytes N: bytes node N's containerd holds in unfinished downloads (its ingest dir).
ingest_bytes() {
	local dir
	dir="$(node_dir "$1")/root/io.containerd.content.v1.content/ingest"
	if [[ -d $dir ]]; then find "$dir" -type f -name data -printf '%s\n' | awk '{ n += $1 } END { print n + 0 }'; else echo 0; fi
}

# mirror_status N REPO DIGEST_OR_TAG [METHOD]: the HTTP status node N's mirror endpoint answers
# for a manifest, asked the way containerd asks (?ns=<upstream registry>). Prints 000 when
# nothing answers.
mirror_status() {
	local n=$1 repo=$2 ref=$3 method=${4:-HEAD} url how=(-I)
	url="${RIG_MIRROR_URL:-http://127.0.0.1:5080}/v2/$repo/manifests/$ref?ns=$(upstream_ip)%3A$RIG_UPSTREAM_PORT"
	# -I for HEAD: with -X HEAD curl would wait for a body the Content-Length promises.
	[[ $method == HEAD ]] || how=(-X "$method")
	node_exec "$n" curl -s -o /dev/null -w '%{http_code}' --max-time 10 "${how[@]}" \
		-H 'Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json' \
		"$url" || true
}

# mirror_finds N REPO REF: true when node N's mirror answers 200 for that manifest (for polling).
mirror_finds() { [[ $(mirror_status "$@") == 200 ]]; }

# cri_bin: path of the rig's CRI client, built from tests/rig/cri-pull when missing or stale.
cri_bin() {
	local bin=$RIG_DIR/bin/cri-pull src=$RIG_HERE/cri-pull
	if [[ ! -x $bin || $src/main.go -nt $bin || $src/go.mod -nt $bin || $src/go.sum -nt $bin ]]; then
		command -v go >/dev/null || die "go is needed to build the CRI client ($src)"
		mkdir -p "$RIG_DIR/bin"
		log "building CRI client into $bin"
		# Build beside the target and rename: a concurrent caller sees the old binary or the new.
		(cd "$src" && GOFLAGS=-buildvcs=false go build -trimpath -o "$bin.$$" . && mv -f "$bin.$$" "$bin") >&2 ||
			die "building the CRI client failed"
	fi
	echo "$bin"
}

# cri_pull N IMAGE: a real CRI PullImage against node N's containerd (what the kubelet sends);
# prints cri-pull's JSON ({"image_ref", "repo_digests", "repo_tags", "size", "elapsed_ms"}).
cri_pull() {
	local n=$1 image=$2 bin
	bin=$(cri_bin)
	node_exec "$n" "$bin" -endpoint "unix://$(node_sock "$n")" pull "$image"
}

# cri_status N IMAGE: CRI ImageStatus of IMAGE on node N (exit 3 when absent).
cri_status() {
	local n=$1 image=$2 bin
	bin=$(cri_bin)
	node_exec "$n" "$bin" -endpoint "unix://$(node_sock "$n")" status "$image"
}

# --- processes (pid_file, owned_pid, stop_all: nslib.sh) -----------------------------------------
# start_bg NAME NETNS LOGFILE CMD...: starts CMD in NETNS in the background and records its PID.
# `ip netns exec` execs CMD in place, so $! is CMD's own PID. stdio goes to files so a caller
# reading our stdout (cargo test) never waits on a daemon holding the pipe.
start_bg() {
	local name=$1 ns=$2 logfile=$3
	shift 3
	mkdir -p "$RIG_DIR/pids"
	ip netns exec "$ns" "$@" </dev/null >>"$logfile" 2>&1 9>&- &
	echo $! >"$(pid_file "$name")"
}

# stop_pid NAME [SIGNAL] [TIMEOUT]: signals the recorded process, waits (bounded), then KILLs.
stop_pid() {
	local name=$1 sig=${2:-TERM} limit=${3:-$RIG_TIMEOUT}
	stop_all "$sig" "$limit" "$name"
}

# --- network -------------------------------------------------------------------------------------
net_up() {
	local n
	log "network: bridge, upstream, $(node_count) nodes on $(rig_subnet)"
	ip route replace blackhole "$(rig_subnet)"
	ip netns add "$RIG_BRIDGE_NS"
	ip -n "$RIG_BRIDGE_NS" link set lo up
	ip -n "$RIG_BRIDGE_NS" link add br0 type bridge
	ip -n "$RIG_BRIDGE_NS" link set br0 up
	attach_ns "$RIG_UP_NS" v-up "$(upstream_ip)" "$RIG_UPSTREAM_RATE"
	for ((n = 1; n <= $(node_count); n++)); do
		attach_ns "$(node_ns "$n")" "v-n$n" "$(node_ip "$n")" "$RIG_NODE_RATE"
	done
}

# shape_node N RATE / unshape_node N: limit node N's link (both directions) while the rig runs,
# e.g. to make a transfer slow enough to interrupt.
shape_node() {
	tbf "$2" "$RIG_BRIDGE_NS" "v-n$1"
	tbf "$2" "$(node_ns "$1")" eth0
}

unshape_node() {
	tc -n "$RIG_BRIDGE_NS" qdisc del dev "v-n$1" root 2>/dev/null || true
	tc -n "$(node_ns "$1")" qdisc del dev eth0 root 2>/dev/null || true
}

rig_namespaces() { our_namespaces; }

net_down() {
	local ns
	for ns in $(rig_namespaces); do
		ip netns del "$ns" 2>/dev/null || log "warning: could not delete namespace $ns"
	done
	if ip route show type blackhole "$(rig_subnet)" | grep -q .; then
		ip route del blackhole "$(rig_subnet)"
	fi
}

# unmount_rig: unmounts anything mounted under the rig dir, deepest first (containerd's overlay
# mounts, should any have escaped its mount namespace).
unmount_rig() {
	local m
	awk -v d="$RIG_DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
		while read -r m; do
			umount "$m" 2>/dev/null || umount -l "$m" || log "warning: could not unmount $m"
		done
}

# --- upstream registry ---------------------------------------------------------------------------
write_registry_config() {
	mkdir -p "$RIG_DIR/upstream/data"
	cat >"$RIG_DIR/upstream/config.yml" <<-EOF
		# Generated by tests/rig/rig.sh: the rig's upstream registry (CNCF distribution).
		version: 0.1
		log:
		  level: info
		  formatter: text
		  accesslog:
		    disabled: false
		storage:
		  filesystem:
		    rootdirectory: $RIG_DIR/upstream/data
		  delete:
		    enabled: true
		  maintenance:
		    uploadpurging:
		      enabled: false
		http:
		  addr: $(upstream_host)
	EOF
}

upstream_ok() { up_exec curl -fsS -o /dev/null --max-time 2 "http://$(upstream_host)/v2/"; }

# start_upstream: runs the registry in spcl-up; its access log (one line per request, combined
# format) goes to upstream/access.log, everything else to upstream/registry.log.
start_upstream() {
	is_running upstream && return 0
	[[ -f $RIG_DIR/upstream/config.yml ]] || write_registry_config
	mkdir -p "$RIG_DIR/pids"
	ip netns exec "$RIG_UP_NS" docker-registry serve "$RIG_DIR/upstream/config.yml" \
		</dev/null >>"$RIG_DIR/upstream/access.log" 2>>"$RIG_DIR/upstream/registry.log" 9>&- &
	echo $! >"$(pid_file upstream)"
	poll_until "$RIG_TIMEOUT" "the upstream registry at $(upstream_host)" upstream_ok ||
		die "upstream registry did not come up; see $RIG_DIR/upstream/registry.log"
}

# stop_upstream: stops the registry (the "upstream is gone" case of the cluster scenario).
stop_upstream() { stop_pid upstream TERM; }

# upstream_gets PATTERN [CLIENT_IP]: how many GET requests in the upstream access log match
# PATTERN (e.g. a digest), optionally only those from CLIENT_IP (e.g. "$(node_ip 2)").
upstream_gets() {
	local pattern=$1 client=${2:-}
	[[ -f $RIG_DIR/upstream/access.log ]] || { echo 0; return 0; }
	awk -v c="$client" -v p="$pattern" \
		'(c == "" || $1 == c) && index($0, "\"GET ") && index($0, p) { n++ } END { print n + 0 }' \
		"$RIG_DIR/upstream/access.log"
}

# upstream_requests METHOD PATTERN [CLIENT_IP] [AGENT]: like upstream_gets, for any method
# (containerd resolves tags with HEAD), optionally only from a user agent starting with AGENT
# (`containerd/`, or `speculum/` for the daemon's own tag HEADs).
upstream_requests() {
	local method=$1 pattern=$2 client=${3:-} agent=${4:-}
	[[ -f $RIG_DIR/upstream/access.log ]] || { echo 0; return 0; }
	awk -v c="$client" -v p="$pattern" -v m="\"$method " -v a="\"$agent" \
		'(c == "" || $1 == c) && index($0, m) && index($0, p) && (a == "\"" || index($0, a)) { n++ } END { print n + 0 }' \
		"$RIG_DIR/upstream/access.log"
}

# upstream_copy SRC DEST [SKOPEO_ARGS...]: copies image SRC to DEST (both `repo:tag` in the
# upstream registry) with skopeo inside the upstream namespace, e.g. to move a tag or to
# recompress an image's layers (`--dest-compress-format zstd`); prints DEST's manifest digest.
upstream_copy() {
	local src=$1 dest=$2 f
	shift 2
	f=$(mktemp)
	if ! up_exec skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false \
		--digestfile "$f" "$@" "docker://$(upstream_host)/$src" "docker://$(upstream_host)/$dest" >&2; then
		rm -f "$f"
		die "skopeo copy $src -> $dest failed"
	fi
	cat "$f"
	rm -f "$f"
}

# --- containerd per node -------------------------------------------------------------------------
# write_containerd_config N: node N's containerd config, from the one writer every private
# containerd uses (tests/containerd/containerd.sh: config version 2 for 1.x, 3 for 2.x).
write_containerd_config() {
	local n=$1 d
	d=$(node_dir "$n")
	mkdir -p "$d/root" "$d/state" "$d/opt" "$d/cni/bin" "$d/cni/conf" "$(node_certs "$n")"
	# shellcheck disable=SC2086 # RIG_CONTAINERD_OPTS is a list of words
	bash "$RIG_CONTAINERD_SH" config "$RIG_CONTAINERD" "$d" config_path="$(node_certs "$n")" \
		$RIG_CONTAINERD_OPTS >"$d/containerd.toml"
}

# write_upstream_hosts N: the plain hosts.toml a node has before speculum configures it: pulls of
# the upstream registry go straight there, over plain HTTP.
write_upstream_hosts() {
	local n=$1 dir
	dir="$(node_certs "$n")/$(upstream_host)"
	mkdir -p "$dir"
	cat >"$dir/hosts.toml" <<-EOF
		# Generated by tests/rig/rig.sh: no mirror, straight to the rig's upstream registry.
		server = "http://$(upstream_host)"

		[host."http://$(upstream_host)"]
		  capabilities = ["pull", "resolve"]
	EOF
}

containerd_ok() { "$(containerd_bin)/ctr" --address "$(node_sock "$1")" version; }

start_containerd() {
	local n=$1
	is_running "n$n-containerd" && return 0
	write_containerd_config "$n"
	local bin
	bin=$(containerd_bin)
	# PATH: containerd finds containerd-shim-runc-v2 (and runc) through it.
	start_bg "n$n-containerd" "$(node_ns "$n")" "$(node_dir "$n")/containerd.log" \
		env PATH="$bin:$PATH" "$bin/containerd" --config "$(node_dir "$n")/containerd.toml"
}

wait_containerd() {
	poll_until "$RIG_TIMEOUT" "node $1's containerd socket" containerd_ok "$1" ||
		die "containerd of node $1 did not come up; see $(node_dir "$1")/containerd.log"
}

# --- the daemon under test -----------------------------------------------------------------------
# speculum_config DIR NAME [KEY=VALUE...]: prints the speculum.yaml of a node whose files live in
# DIR (DIR/containerd.sock, containerd's root DIR/root, DIR/certs.d, DIR/data, DIR/audit.jsonl).
# The one place that knows the daemon's config keys (the lead owns the key names): the rig's
# nodes (write_speculum_config) and bench/serving.sh's lone node use it. Keys:
#   listen=IP            peer, metrics and DHT listeners (default 0.0.0.0; the mirror is loopback)
#   bootstrap=MULTIADDR  a static DHT bootstrap peer (default none)
#   upstream=HOST:PORT   the mirrored registry (default the rig's upstream)
#   tag_resolution=…, resolve_tags=…, resolve_latest_tag=…   (default RIG_TAG_RESOLUTION, …)
#   content_dir=introspect|config   config: containerd.content_dir written by hand (default
#                        introspect: the daemon asks containerd)
#   cache=0|1            the own blob cache with upstream fetches (docs/cache.md; default 0)
#   audit=on|off         the audit file (default on)
#   log_level=LEVEL      log.level (default: the daemon's)
speculum_config() {
	local d=$1 name=$2 kv listen=0.0.0.0 bootstrap="" upstream content=introspect cache=0 audit=on
	local level="" tags=$RIG_TAG_RESOLUTION resolve=$RIG_RESOLVE_TAGS latest=$RIG_RESOLVE_LATEST_TAG
	upstream=$(upstream_host)
	shift 2
	for kv in "$@"; do
		case "$kv" in
		listen=*) listen=${kv#*=} ;;
		bootstrap=*) bootstrap=${kv#*=} ;;
		upstream=*) upstream=${kv#*=} ;;
		tag_resolution=*) tags=${kv#*=} ;;
		resolve_tags=*) resolve=${kv#*=} ;;
		resolve_latest_tag=*) latest=${kv#*=} ;;
		content_dir=introspect | content_dir=config) content=${kv#*=} ;;
		cache=0 | cache=1) cache=${kv#*=} ;;
		audit=on | audit=off) audit=${kv#*=} ;;
		log_level=*) level=${kv#*=} ;;
		*) die "speculum_config: unknown or malformed key '$kv'" ;;
		esac
	done
	cat <<-EOF
		# Generated by tests/rig/rig.sh for node ${name#n}.
		node:
		  name: "$name"
		registry:
		  mirror_listen: "127.0.0.1:5080"
		  peer_listen: "$listen:5081"
		metrics:
		  listen: "$listen:9402"
		containerd:
		  socket: "$d/containerd.sock"
		  namespace: "$RIG_K8S_NS"
	EOF
	[[ $content != config ]] || echo "  content_dir: \"$d/root/io.containerd.content.v1.content\""
	cat <<-EOF
		routing:
		  listen: "/ip4/$listen/tcp/5082"
		  data_dir: "$d/data"
		  registry_port: 5081
	EOF
	[[ -z $bootstrap ]] || printf '  bootstrap:\n    peers: ["%s"]\n' "$bootstrap"
	cat <<-EOF
		hosts:
		  certs_dir: "$d/certs.d"
		  mirrored_registries: ["http://$upstream"]
		  mirror_endpoint: "http://127.0.0.1:5080"
		mirror:
		  tag_resolution: "$tags"
		policy:
		  resolve_tags: $resolve
		  resolve_latest_tag: $latest
	EOF
	[[ $audit == off ]] || printf 'audit:\n  file: "%s"\n' "$d/audit.jsonl"
	[[ -z $level ]] || printf 'log:\n  level: %s\n' "$level"
	# The own blob cache with upstream fetches and coalescing.
	[[ $cache == 0 ]] || cat <<-EOF
		cache:
		  enabled: true
		  dir: "$d/cache"
		  plain_http: ["$upstream"]
	EOF
}

# write_speculum_config N: node N's speculum.yaml (speculum_config with the rig's knobs:
# RIG_CONTENT_DIR=config writes the content root by hand, RIG_CACHE=1 turns the cache on).
write_speculum_config() {
	local n=$1 d
	d=$(node_dir "$n")
	mkdir -p "$d/data"
	local content=introspect cache=0
	[[ ${RIG_CONTENT_DIR:-} != config ]] || content=config
	[[ ${RIG_CACHE:-0} != 1 ]] || cache=1
	speculum_config "$d" "n$n" bootstrap="/ip4/$(node_ip 1)/tcp/5082" content_dir=$content \
		cache=$cache >"$d/speculum.yaml"
	# RIG_STATUS="1 2" (node numbers) or "all": the node status page on the metrics listener
	# (docs/status-page.md), keeping the last RIG_STATUS_RECENT requests.
	if [[ ${RIG_STATUS:-} == all || " ${RIG_STATUS:-} " == *" $n "* ]]; then
		cat >>"$d/speculum.yaml" <<-EOF
			status:
			  enabled: true
			  recent: ${RIG_STATUS_RECENT:-500}
		EOF
	fi
}

require_speculum() { [[ -x $SPECULUM_BIN ]] || die "no daemon binary at $SPECULUM_BIN (cargo build first, or set SPECULUM_BIN)"; }

# configure_node N: `speculum configure` inside node N (writes the mirror hosts.toml).
configure_node() {
	local n=$1
	require_speculum
	[[ -f $(node_dir "$n")/speculum.yaml ]] || write_speculum_config "$n"
	node_exec "$n" "$SPECULUM_BIN" configure --config "$(node_dir "$n")/speculum.yaml"
}

speculum_ready() { node_exec "$1" curl -fsS -o /dev/null --max-time 2 "$RIG_READY_URL"; }

# start_speculum N: runs `speculum registry` inside node N, JSON log lines to nN/speculum.log,
# and waits (bounded) until it answers on RIG_READY_URL.
start_speculum() {
	local n=$1
	require_speculum
	is_running "n$n-speculum" && return 0
	[[ -f $(node_dir "$n")/speculum.yaml ]] || write_speculum_config "$n"
	start_bg "n$n-speculum" "$(node_ns "$n")" "$(node_dir "$n")/speculum.log" \
		"$SPECULUM_BIN" registry --config "$(node_dir "$n")/speculum.yaml"
	local log
	log=$(node_dir "$n")/speculum.log
	# The log is overwritten by the next start (a later test reuses the rig): the reason goes
	# into the error itself.
	poll_until "$RIG_TIMEOUT" "speculum on node $n" speculum_ready_or_dead "$n" ||
		die "speculum on node $n did not become ready; last log lines: $(tail -n 5 "$log")"
	is_running "n$n-speculum" || die "speculum on node $n exited; last log lines: $(tail -n 5 "$log")"
}

# speculum_ready_or_dead N: ends the readiness poll early when the daemon has already exited.
speculum_ready_or_dead() { ! is_running "n$1-speculum" || speculum_ready "$1"; }

# stop_speculum N [SIGNAL]: SIGTERM by default (graceful drain, bounded), or e.g. KILL.
stop_speculum() { stop_pid "n$1-speculum" "${2:-TERM}" "$RIG_STOP_TIMEOUT"; }

# speculum_metrics N: node N's Prometheus text exposition.
speculum_metrics() { node_exec "$1" curl -fsS --max-time 5 "$RIG_METRICS_URL"; }

# metric_sum N NAME [LABEL=VALUE...]: the sum of node N's samples of NAME that carry every given
# label (values compared without regard to case), 0 when none, e.g.
#   metric_sum 2 speculum_served_bytes_total handler=mirror source=peer
metric_sum() {
	local n=$1 name=$2
	shift 2
	speculum_metrics "$n" | awk -v name="$name" -v want="$*" '
		BEGIN { nwant = split(tolower(want), w, " ") }
		/^#/ { next }
		{
			series = $1; sample = $2
			if (series != name && index(series, name "{") != 1) next
			labels = tolower(series)
			for (i = 1; i <= nwant; i++) {
				split(w[i], kv, "=")
				if (index(labels, kv[1] "=\"" kv[2] "\"") == 0) next
			}
			sum += sample
		}
		END { printf "%.0f\n", sum }'
}

# --- commands ------------------------------------------------------------------------------------
# with_lock CMD...: one up/down at a time per rig dir (tests and people share the machine).
with_lock() {
	check_rig_dir
	mkdir -p "$(dirname "$RIG_DIR")"
	exec 9>"$RIG_DIR.lock"
	# The default lock file is also the machine-wide rig lock that callers hold for a whole test
	# (`flock /tmp/speculum-rig.lock cargo test …`, tests/rig/cluster.rs): when an ancestor holds it,
	# we are inside that caller and locking again would wait for ourselves.
	if ! lock_held_by_ancestor "$RIG_DIR.lock"; then
		flock -w "$RIG_TIMEOUT" 9 || die "another rig.sh up/down holds $RIG_DIR.lock"
	fi
	"$@"
}

# lock_held_by_ancestor FILE: true when this shell or one of its ancestors holds a flock on FILE
# (/proc/locks names the holder's pid and the file's inode; waiters are marked "->").
lock_held_by_ancestor() {
	local ino holders pid=$$ i
	ino=$(stat -L -c %i "$1" 2>/dev/null) || return 1
	holders=$(awk -v ino="$ino" '$2 == "FLOCK" { n = split($6, a, ":"); if (a[n] == ino) print $5 }' /proc/locks)
	[[ -n $holders ]] || return 1
	for ((i = 0; i < 64 && pid > 1; i++)); do
		grep -qx "$pid" <<<"$holders" && return 0
		pid=$(awk '{ sub(/.*\) /, ""); print $2 }' "/proc/$pid/stat" 2>/dev/null) || return 1
		[[ $pid =~ ^[0-9]+$ ]] || return 1
	done
	return 1
}

# check_rig_dir: the rig deletes things under RIG_DIR, so it must be a plain absolute path of
# its own, never / or a path with spaces.
check_rig_dir() {
	[[ $RIG_DIR == /* && $RIG_DIR != / && $RIG_DIR =~ ^[A-Za-z0-9/._-]+$ ]] ||
		die "RIG_DIR must be an absolute path without spaces, not '$RIG_DIR'"
	[[ $(readlink -m "$RIG_DIR") != / ]] || die "RIG_DIR must not be /"
	[[ $RIG_SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
		die "RIG_SUBNET must be the first three octets of a /24, like 10.250.77, not '$RIG_SUBNET'"
}

rig_exists() { [[ -d $RIG_DIR/pids ]] || [[ -n $(rig_namespaces) ]]; }

cmd_up() {
	require_root
	require_tools
	local n nodes started=$SECONDS
	nodes=$(node_count)
	if ! [[ $nodes =~ ^[0-9]+$ ]] || ((nodes < 1 || nodes > 200)); then die "RIG_NODES must be 1..200"; fi
	if rig_exists; then
		log "stale rig found, taking it down first"
		cmd_down
	fi
	# A fresh rig: last run's logs, configs and push records go (the registry they describe is
	# gone); the image cache and the CRI client stay.
	rm -rf --one-file-system "$RIG_DIR/upstream" "$RIG_DIR"/n[0-9]* "$RIG_DIR/images.json" "$RIG_DIR/images.tsv"
	mkdir -p "$RIG_DIR/pids" "$RIG_DIR/upstream"
	echo "$nodes" >"$RIG_DIR/nodes"
	RIG_NODES=$nodes
	cri_bin >/dev/null
	log "containerd $RIG_CONTAINERD ($(bash "$RIG_CONTAINERD_SH" version "$RIG_CONTAINERD")) from $(containerd_bin)"
	net_up
	write_registry_config
	start_upstream
	for ((n = 1; n <= nodes; n++)); do
		write_upstream_hosts "$n"
		start_containerd "$n"
	done
	for ((n = 1; n <= nodes; n++)); do
		wait_containerd "$n"
	done
	log "up in $((SECONDS - started))s: upstream http://$(upstream_host), nodes $(node_ip 1)..$(node_ip "$nodes"), state in $RIG_DIR"
}

cmd_down() {
	require_root
	local f n names=()
	# The daemons first, so they can withdraw their records while containerd still answers.
	for f in "$RIG_DIR"/pids/*-speculum.pid; do
		if [[ -e $f ]]; then names+=("$(basename "$f" .pid)"); fi
	done
	((${#names[@]} == 0)) || stop_all TERM "$RIG_STOP_TIMEOUT" "${names[@]}"
	names=()
	for f in "$RIG_DIR"/pids/*.pid; do
		if [[ -e $f ]]; then names+=("$(basename "$f" .pid)"); fi
	done
	((${#names[@]} == 0)) || stop_all TERM "$RIG_TIMEOUT" "${names[@]}"
	kill_ns_stragglers
	unmount_rig
	net_down
	# The heavy state goes; logs and configs stay for a post-mortem, the image cache and the CRI
	# client stay so the next `up` is fast.
	for n in "$RIG_DIR"/n[0-9]*; do
		[[ -d $n ]] || continue
		rm -rf --one-file-system "$n/root" "$n/state" "$n/opt" "$n/data"
	done
	rm -rf --one-file-system "$RIG_DIR/upstream/data" "$RIG_DIR/pids"
	log "down"
}

cmd_status() {
	local n name state
	echo "rig dir: $RIG_DIR"
	echo "namespaces: $(rig_namespaces | tr '\n' ' ')"
	if ip route show type blackhole "$(rig_subnet)" | grep -q .; then
		echo "host blackhole route for $(rig_subnet): present"
	else
		echo "host blackhole route for $(rig_subnet): absent"
	fi
	for name in upstream $(for ((n = 1; n <= $(node_count); n++)); do echo "n$n-containerd n$n-speculum"; done); do
		if is_running "$name"; then state="running (pid $(owned_pid "$name"))"; else state="stopped"; fi
		printf '  %-16s %s\n' "$name" "$state"
	done
	if ip netns list | grep -q "^$RIG_UP_NS\b" && upstream_ok 2>/dev/null; then
		echo "upstream http://$(upstream_host)/v2/: answers"
	else
		echo "upstream http://$(upstream_host)/v2/: not answering"
	fi
}

rig_main() {
	case "${1:-}" in
	up) with_lock cmd_up ;;
	down) with_lock cmd_down ;;
	status) cmd_status ;;
	*)
		echo "usage: $0 up|down|status   (env: RIG_DIR RIG_NODES RIG_SUBNET RIG_UPSTREAM_RATE RIG_NODE_RATE SPECULUM_BIN)" >&2
		exit 2
		;;
	esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	rig_main "$@"
fi
