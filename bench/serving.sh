#!/usr/bin/env bash
# serving.sh — what it costs the daemon to serve, against references measured in the same run.
#
# One job: on one private node (a network namespace of its own with a real containerd, the
# speculum daemon, the CNCF distribution registry and nginx, all on that namespace's loopback):
#   1. serving cost: CPU-seconds per GB the daemon's *peer endpoint* spends streaming a blob
#      from containerd's content store, vs nginx `sendfile` serving the very same file;
#   2. peak RSS of the daemon with 1 and with 50 concurrent streams of that blob (nginx beside);
#   3. latency of `HEAD /v2/<repo>/manifests/<tag>` (what containerd sends first): the daemon's
#      mirror endpoint serving it from the local store vs the distribution registry serving the
#      same manifest, p50/p99 (bench/latency.py, interleaved blocks).
# CPU comes from /proc/<pid>/stat (utime+stime) of the one server process, before and after;
# peak RSS from VmHWM, reset between phases through /proc/<pid>/clear_refs.
#
#   sudo bench/serving.sh
# Environment: BENCH_BLOB_MB (default 200), BENCH_ROUNDS (alternating rounds, default 3),
# BENCH_GETS (sequential GETs per round, default 10), BENCH_STREAMS (default 50),
# BENCH_HEADS (HEADs per server, default 2000), BENCH_OUT, SPECULUM_BIN (default the release
# build). Everything is removed on exit; only the results stay.
#
# Safety: every process and every request lives in the namespace this script creates
# (spbench-<pid>); nothing listens on or talks to the host's network.

set -euo pipefail
BENCH_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(readlink -f "$BENCH_HERE/..")
SPECULUM_BIN=${SPECULUM_BIN:-$REPO/target/release/speculum}
BENCH_BLOB_MB=${BENCH_BLOB_MB:-200}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_GETS=${BENCH_GETS:-10}
BENCH_STREAMS=${BENCH_STREAMS:-50}
BENCH_HEADS=${BENCH_HEADS:-2000}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}
BENCH_OUT=${BENCH_OUT:-/tmp/speculum-bench}
# The rig's helpers: poll_until, and speculum_config (the one writer of the daemon's config).
# shellcheck source=tests/rig/rig.sh
source "$REPO/tests/rig/rig.sh"
CONTAINERD_SH=$RIG_CONTAINERD_SH
# Which containerd (a line of tests/containerd/containerd.sh: 1.6 is Debian's, 1.7/2.3/2.4 built).
BENCH_CONTAINERD=${BENCH_CONTAINERD:-$(bash "$CONTAINERD_SH" default)}
NS=spbench-$$
DIR=$(mktemp -d /tmp/speculum-serving.XXXXXX)
RESULTS=$BENCH_OUT/serving.json
REG=127.0.0.1:5000
PIDS=()

log() { printf '%s serving: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
in_ns() { ip netns exec "$NS" "$@"; }

# start NAME CMD...: runs CMD in the namespace, logs to DIR/NAME.log, remembers its PID.
start() {
	local name=$1
	shift
	# `ip netns exec` directly (not through a function, which would fork a subshell): it execs
	# CMD in place, so $! is the server's own PID, the one whose CPU and RSS we read.
	ip netns exec "$NS" "$@" </dev/null >>"$DIR/$name.log" 2>&1 &
	PIDS+=($!)
	echo $! >"$DIR/$name.pid"
}
pid_of() { cat "$DIR/$1.pid"; }

cleanup() {
	local pid deadline
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	deadline=$((SECONDS + 15))
	for pid in "${PIDS[@]}"; do
		while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	done
	# Anything else still in our namespace was started by us (curl, ctr): end it by PID.
	pid=$(ip netns pids "$NS" 2>/dev/null | tr '\n' ' ')
	# shellcheck disable=SC2086
	[[ -z ${pid// /} ]] || kill -KILL $pid 2>/dev/null || true
	ip netns del "$NS" 2>/dev/null || true
	awk -v d="$DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
		while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
	rm -rf --one-file-system "$DIR"
}

# cpu_ticks PID: user + system CPU time of PID, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
reset_hwm() { echo 5 >"/proc/$1/clear_refs"; }

# fetch URL: one GET, body discarded; fails unless 200 and the whole blob arrived.
fetch() {
	local got
	got=$(in_ns curl -fsS --max-time 120 -o /dev/null -w '%{size_download}' "$1")
	[[ $got == "$BLOB_SIZE" ]] || die "$1 sent $got bytes, want $BLOB_SIZE"
}

# cpu_per_gb PID URL: GETs the blob BENCH_GETS times; prints CPU-seconds per GB served by PID.
cpu_per_gb() {
	local pid=$1 url=$2 t0 t1 i
	t0=$(cpu_ticks "$pid")
	for ((i = 0; i < BENCH_GETS; i++)); do fetch "$url"; done
	t1=$(cpu_ticks "$pid")
	awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v b=$((BLOB_SIZE * BENCH_GETS)) \
		'BEGIN { printf "%.4f\n", t / hz / (b / 1e9) }'
}

# peak_rss PID URL STREAMS: resets VmHWM, runs STREAMS concurrent GETs, prints peak RSS in KiB.
peak_rss() {
	local pid=$1 url=$2 streams=$3 i pids=() failed=0
	reset_hwm "$pid"
	for ((i = 0; i < streams; i++)); do
		fetch "$url" &
		pids+=($!)
	done
	for i in "${pids[@]}"; do wait "$i" || failed=1; done
	((failed == 0)) || die "a concurrent stream of $url failed"
	hwm_kib "$pid"
}

# write_containerd_config: from the one writer every private containerd uses
# (tests/containerd/containerd.sh); BENCH_CONTAINERD picks the version (default: the 2.x LTS).
# The node's files are laid out as a rig node's (DIR/root, DIR/containerd.sock, DIR/certs.d),
# so the rig's speculum_config describes it.
write_containerd_config() {
	mkdir -p "$DIR/root" "$DIR/state" "$DIR/opt" "$DIR/cni/bin" "$DIR/cni/conf" "$DIR/certs.d"
	bash "$CONTAINERD_SH" config "$BENCH_CONTAINERD" "$DIR" \
		socket="$DIR/containerd.sock" config_path="$DIR/certs.d" >"$DIR/containerd.toml"
}

write_registry_config() {
	mkdir -p "$DIR/registry"
	cat >"$DIR/registry.yml" <<-EOF
		version: 0.1
		log:
		  level: warn
		  accesslog:
		    disabled: true
		storage:
		  filesystem:
		    rootdirectory: $DIR/registry
		http:
		  addr: $REG
	EOF
}

# The daemon as a rig node runs it (tests/rig/rig.sh speculum_config), alone: every listener on
# loopback, no bootstrap peers, the content root written by hand, no audit file (its writes would
# count in the CPU figure). cluster-first: the HEAD figure is the local store's; upstream-first
# would add the registry's own HEAD.
write_speculum_config() {
	mkdir -p "$DIR/data"
	speculum_config "$DIR" bench listen=127.0.0.1 upstream="$REG" tag_resolution=cluster-first \
		content_dir=config audit=off log_level=warn >"$DIR/speculum.yaml"
}

# nginx serving the content store's blob directory with sendfile, one process (no master), so
# its CPU and RSS are one PID's.
write_nginx_config() {
	mkdir -p "$DIR/nginx"
	cat >"$DIR/nginx.conf" <<-EOF
		daemon off;
		master_process off;
		worker_processes 1;
		pid $DIR/nginx/nginx.pid;
		error_log $DIR/nginx/error.log warn;
		events { worker_connections 256; }
		http {
		  access_log off;
		  sendfile on;
		  tcp_nopush on;
		  client_body_temp_path $DIR/nginx/body;
		  proxy_temp_path $DIR/nginx/proxy;
		  fastcgi_temp_path $DIR/nginx/fastcgi;
		  uwsgi_temp_path $DIR/nginx/uwsgi;
		  scgi_temp_path $DIR/nginx/scgi;
		  server {
		    listen 127.0.0.1:8080;
		    root $DIR/root/io.containerd.content.v1.content/blobs/sha256;
		  }
		}
	EOF
}

ok() { in_ns curl -fsS -o /dev/null --max-time 2 "$1"; }

serving_main() {
	[[ $(id -u) -eq 0 ]] || die "needs root (network namespace, containerd)"
	[[ -x $SPECULUM_BIN ]] || die "no daemon binary at $SPECULUM_BIN (cargo build --release)"
	local t
	for t in ip runc docker-registry skopeo nginx curl jq python3; do
		command -v "$t" >/dev/null || die "missing tool: $t"
	done
	mkdir -p "$BENCH_OUT"
	trap cleanup EXIT
	ip netns add "$NS"
	ip -n "$NS" link set lo up

	log "starting registry, containerd, nginx in $NS"
	write_registry_config
	write_containerd_config
	write_nginx_config
	start registry docker-registry serve "$DIR/registry.yml"
	CTRD_BIN=$(bash "$CONTAINERD_SH" bin "$BENCH_CONTAINERD") || die "no containerd $BENCH_CONTAINERD"
	start containerd env PATH="$CTRD_BIN:$PATH" "$CTRD_BIN/containerd" --config "$DIR/containerd.toml"
	start nginx nginx -c "$DIR/nginx.conf" -p "$DIR/nginx/" -e "$DIR/nginx/error.log"
	poll_until "$BENCH_TIMEOUT" registry ok "http://$REG/v2/" || die "registry did not start"
	poll_until "$BENCH_TIMEOUT" containerd "$CTRD_BIN/ctr" --address "$DIR/containerd.sock" version || die "containerd did not start"

	log "image with one ${BENCH_BLOB_MB} MiB layer into the registry and into containerd"
	local layouts entry repo ref layer
	layouts=$(python3 "$BENCH_HERE/mkbench.py" "${BENCH_IMAGES_DIR:-/tmp/speculum-bench-images}" "$BENCH_BLOB_MB:1")
	entry=$(jq -c '.images[0]' "$layouts/layouts.json")
	repo=$(jq -r .repository <<<"$entry")
	layer=$(jq -r '.blobs[2].digest' <<<"$entry")
	BLOB_SIZE=$(jq -r '.blobs[2].size' <<<"$entry")
	ref="$REG/$repo:v1"
	in_ns skopeo copy --quiet --dest-tls-verify=false --preserve-digests "oci:$(jq -r .layout <<<"$entry"):v1" "docker://$ref"
	in_ns "$CTRD_BIN/ctr" --address "$DIR/containerd.sock" --namespace k8s.io images pull --plain-http "$ref" >/dev/null

	log "starting speculum ($SPECULUM_BIN)"
	write_speculum_config
	start speculum "$SPECULUM_BIN" registry --config "$DIR/speculum.yaml"
	poll_until "$BENCH_TIMEOUT" speculum ok "http://127.0.0.1:9402/readyz" || die "speculum not ready; see $DIR/speculum.log"

	local spid npid peer_url nginx_url
	spid=$(pid_of speculum)
	npid=$(pid_of nginx)
	peer_url="http://127.0.0.1:5081/v2/$repo/blobs/$layer?ns=127.0.0.1%3A5000"
	nginx_url="http://127.0.0.1:8080/${layer#sha256:}"
	fetch "$peer_url"
	fetch "$nginx_url"

	log "serving cost: $BENCH_ROUNDS rounds of $BENCH_GETS GETs of $BLOB_SIZE bytes, alternating"
	local r s n rounds=()
	for ((r = 1; r <= BENCH_ROUNDS; r++)); do
		s=$(cpu_per_gb "$spid" "$peer_url")
		n=$(cpu_per_gb "$npid" "$nginx_url")
		log "round $r: speculum $s CPU-s/GB, nginx $n CPU-s/GB"
		rounds+=("$(jq -cn --argjson s "$s" --argjson n "$n" '{speculum: $s, nginx: $n, ratio: (if $n > 0 then $s / $n else null end)}')")
	done

	log "peak RSS: 1 and $BENCH_STREAMS concurrent streams"
	local idle s1 sN n1 nN
	idle=$(rss_kib "$spid")
	s1=$(peak_rss "$spid" "$peer_url" 1)
	n1=$(peak_rss "$npid" "$nginx_url" 1)
	sN=$(peak_rss "$spid" "$peer_url" "$BENCH_STREAMS")
	nN=$(peak_rss "$npid" "$nginx_url" "$BENCH_STREAMS")
	log "speculum idle ${idle} KiB, 1 stream ${s1} KiB, $BENCH_STREAMS streams ${sN} KiB; nginx ${n1} / ${nN} KiB"

	log "HEAD manifest by tag: speculum mirror (local store) vs registry, $BENCH_HEADS each"
	local lat
	lat=$(in_ns python3 "$BENCH_HERE/latency.py" "$BENCH_HEADS" \
		"speculum=http://127.0.0.1:5080/v2/$repo/manifests/v1?ns=127.0.0.1%3A5000" \
		"registry=http://$REG/v2/$repo/manifests/v1")
	log "latency: $lat"

	jq -n --argjson rounds "$(printf '%s\n' "${rounds[@]}" | jq -cs .)" \
		--argjson blob "$BLOB_SIZE" --argjson gets "$BENCH_GETS" --argjson streams "$BENCH_STREAMS" \
		--argjson idle "$idle" --argjson s1 "$s1" --argjson sN "$sN" --argjson n1 "$n1" --argjson nN "$nN" \
		--argjson lat "$lat" --arg machine "$(nproc) cores, $(uname -r), $(awk '/MemTotal/ { print $2 " KiB" }' /proc/meminfo)" '
		def med: sort | .[(length - 1) / 2 | floor];
		{machine: $machine, blob_bytes: $blob, gets_per_round: $gets,
		 cpu_s_per_gb: $rounds, ratio_median: ([$rounds[].ratio | select(. != null)] | med),
		 rss_kib: {speculum_idle: $idle, speculum_1: $s1, ("speculum_" + ($streams | tostring)): $sN,
		           nginx_1: $n1, ("nginx_" + ($streams | tostring)): $nN},
		 head_latency: $lat}' | tee "$RESULTS"
}

serving_main "$@"
