#!/usr/bin/env bash
# cluster.sh — a real Kubernetes cluster on network namespaces: the cluster tier's one job is to
# build, run and tear down that topology (tests/cluster/README.md).
#
#   cluster.sh up | down | status        (as root)
#   cluster.sh env                       KUBECONFIG=… and the addresses, as shell assignments
#   cluster.sh exec N CMD...             CMD inside node N (its network and mount namespace)
#   cluster.sh cp-exec CMD... / up-exec CMD...   inside the control-plane / upstream namespace
#   cluster.sh upstream-stop | upstream-start    the "upstream is gone" case
#   cluster.sh shape N RATE | unshape N   tc tbf on node N's link (both directions)
#   cluster.sh push LAYOUT:TAG HOST/REPO:TAG [private]   skopeo copy of an OCI layout (digests kept)
#
# Topology (all names start with CLUSTER_PREFIX, "spkc-"; subnet CLUSTER_SUBNET, 10.250.80):
#   spkc-br   a bridge joining everything below on CLUSTER_SUBNET.0/24
#   spkc-cp   .2  etcd, kube-apiserver (:6443), kube-controller-manager, kube-scheduler
#   spkc-up   .3  the "upstream" registry (docker-registry :5000, access log), public images
#   spkc-priv .4  a private registry (htpasswd) for the tenancy scenario
#   spkc-nN   .(10+N) node N: its own mount namespace (binds over /var/lib, /var/log,
#             /etc/containerd, /run/containerd, /run/netns, /etc/resolv.conf, so the chart's
#             default hostPaths work unchanged), containerd (CRI), a kubelet, kube-proxy
#             (iptables), CNI bridge + host-local with pod CIDR CLUSTER_POD_NET.N.0/24
# Pods reach the API server through the `kubernetes` Service VIP (kube-proxy); the API server
# reaches pods (webhooks) and kubelets (logs, exec) through static routes. The host reaches
# the API server only through a loopback port (socat ↔ a unix socket ↔ socat in spkc-cp), so
# kubectl and helm on the host work with the printed KUBECONFIG and the host never sends a
# packet to a namespace address; it holds blackhole routes for every subnet of the cluster.
#
# Processes are stopped by recorded PID (checked against their command line) or because they
# live in a cluster namespace or a kubelet's cgroup; never by name. `down` removes every process,
# mount, namespace, cgroup, route and sysctl change `up` made.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SELF")
REPO=$(readlink -f "$HERE/../..")

# --- knobs (environment) -------------------------------------------------------------------------
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/speculum-cluster}
CLUSTER_NODES=${CLUSTER_NODES:-3}
CLUSTER_SUBNET=${CLUSTER_SUBNET:-10.250.80}          # a /24: cp .2, upstream .3, private .4, node N .(10+N)
CLUSTER_POD_NET=${CLUSTER_POD_NET:-10.251}           # node N's pods: CLUSTER_POD_NET.N.0/24
CLUSTER_SERVICE_NET=${CLUSTER_SERVICE_NET:-10.252.0} # Service ClusterIPs: a /24
CLUSTER_PREFIX=${CLUSTER_PREFIX:-spkc-}              # network namespaces, cgroups, bridge ports
CLUSTER_CONTAINERD_BIN=${CLUSTER_CONTAINERD_BIN:-}   # dir with containerd, containerd-shim-runc-v2 (default: PATH)
CLUSTER_K8S_BIN=${CLUSTER_K8S_BIN:-}                 # dir with the Kubernetes binaries (default: built/cached)
CLUSTER_API_PORT=${CLUSTER_API_PORT:-}               # host loopback port of the API server (default: a free one)
CLUSTER_TIMEOUT=${CLUSTER_TIMEOUT:-120}              # seconds for any bounded wait here
CLUSTER_UPSTREAM_RATE=${CLUSTER_UPSTREAM_RATE:-}     # tc tbf rate of the upstream registry's link
CLUSTER_NODE_RATE=${CLUSTER_NODE_RATE:-}             # tc tbf rate of each node's link
# The speculum image pushed as <upstream>/speculum/speculum:<tag>: CLUSTER_SPECULUM_LAYOUT
# (DIR:TAG, e.g. from `make image`), else scripts/image.sh on the binaries next to SPECULUM_BIN,
# else a stand-in packed from SPECULUM_BIN and SPECULUM_WEBHOOK_BIN (tag dev).
CLUSTER_SPECULUM_LAYOUT=${CLUSTER_SPECULUM_LAYOUT:-}

BRIDGE_NS=${CLUSTER_PREFIX}br
CP_NS=${CLUSTER_PREFIX}cp
UP_NS=${CLUSTER_PREFIX}up
PRIV_NS=${CLUSTER_PREFIX}priv
API_PORT_IN=6443
REGISTRY_PORT=5000
PAUSE_REF_REPO=cluster/pause:3.10
# Host-wide sysctls the kubelet rewrites (setupKernelTunables): saved at `up`, restored at `down`.
HOST_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# Waits, recorded processes, leftovers in our namespaces, veth links: shared with the namespace
# rig, in tests/rig/nslib.sh.
NS_DIR=$CLUSTER_DIR
NS_OWNER=$CLUSTER_DIR
NS_PREFIX=$CLUSTER_PREFIX
NS_BRIDGE=$BRIDGE_NS
NS_TBF_BURST=1mb
NS_POLL=0.2
# shellcheck source=tests/rig/nslib.sh
source "$REPO/tests/rig/nslib.sh"

# --- small pieces --------------------------------------------------------------------------------
log() { printf '%s cluster: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

cp_ip() { echo "$CLUSTER_SUBNET.2"; }
up_ip() { echo "$CLUSTER_SUBNET.3"; }
priv_ip() { echo "$CLUSTER_SUBNET.4"; }
node_ip() { echo "$CLUSTER_SUBNET.$((10 + $1))"; }
node_name() { echo "n$1"; }
node_ns() { echo "${CLUSTER_PREFIX}n$1"; }
node_dir() { echo "$CLUSTER_DIR/n$1"; }
node_mnt() { echo "$CLUSTER_DIR/nsfs/n$1.mnt"; }
pod_cidr() { echo "$CLUSTER_POD_NET.$1.0/24"; }
upstream_host() { echo "$(up_ip):$REGISTRY_PORT"; }
private_host() { echo "$(priv_ip):$REGISTRY_PORT"; }
service_cidr() { echo "$CLUSTER_SERVICE_NET.0/24"; }
kubernetes_svc_ip() { echo "$CLUSTER_SERVICE_NET.1"; }
pause_ref() { echo "$(upstream_host)/$PAUSE_REF_REPO"; }
# Every subnet of the cluster: the host blackholes each, so nothing it sends there leaves.
cluster_subnets() { echo "$CLUSTER_SUBNET.0/24 $CLUSTER_POD_NET.0.0/16 $(service_cidr)"; }
node_count() {
	if [[ -f $CLUSTER_DIR/nodes ]]; then cat "$CLUSTER_DIR/nodes"; else echo "$CLUSTER_NODES"; fi
}

check_knobs() {
	[[ $CLUSTER_DIR == /* && $CLUSTER_DIR != / && $CLUSTER_DIR =~ ^[A-Za-z0-9/._-]+$ ]] ||
		die "CLUSTER_DIR must be an absolute path without spaces, not '$CLUSTER_DIR'"
	[[ $CLUSTER_SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "CLUSTER_SUBNET must look like 10.250.80"
	[[ $CLUSTER_POD_NET =~ ^[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "CLUSTER_POD_NET must look like 10.251"
	[[ $CLUSTER_SERVICE_NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "CLUSTER_SERVICE_NET must look like 10.252.0"
	[[ $CLUSTER_PREFIX =~ ^[a-z][a-z0-9]{1,6}-$ ]] || die "CLUSTER_PREFIX must be a short name ending in '-', like spkc-"
	[[ $CLUSTER_PREFIX != spcl- ]] || die "CLUSTER_PREFIX spcl- is the namespace rig's"
	[[ $CLUSTER_SUBNET != 10.250.77 ]] || die "CLUSTER_SUBNET 10.250.77 is the namespace rig's"
	[[ $CLUSTER_NODES =~ ^[0-9]+$ ]] && ((CLUSTER_NODES >= 1 && CLUSTER_NODES <= 50)) || die "CLUSTER_NODES must be 1..50"
}

require_root() { [[ $(id -u) -eq 0 ]] || die "the cluster needs root (namespaces, mounts, cgroups)"; }

require_tools() {
	local t missing=()
	for t in ip tc nsenter unshare socat openssl docker-registry skopeo curl jq python3 flock \
		gcc busybox runc iptables htpasswd "$(containerd_bin)/containerd"; do
		command -v "$t" >/dev/null || missing+=("$t")
	done
	[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
		missing+=("containernetworking-plugins (/usr/lib/cni)")
	((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (scripts/setup.sh installs them)"
}

containerd_bin() {
	if [[ -n $CLUSTER_CONTAINERD_BIN ]]; then echo "$CLUSTER_CONTAINERD_BIN"; else dirname "$(command -v containerd)"; fi
}

k8s_bin() {
	if [[ -n $CLUSTER_K8S_BIN ]]; then
		echo "$CLUSTER_K8S_BIN"
	else
		bash "$REPO/tests/k8s/control-plane.sh" node-binaries
	fi
}

# --- acting inside namespaces --------------------------------------------------------------------
# nsenter, not `ip netns exec`: the latter remounts /sys and hides the cgroup v1 mounts from the
# kubelet and runc (notes/kubelet.md).
in_node() {
	local n=$1
	shift
	nsenter --net="/run/netns/$(node_ns "$n")" --mount="$(node_mnt "$n")" -- "$@"
}
in_ns() {
	local ns=$1
	shift
	nsenter --net="/run/netns/$ns" -- "$@"
}

# --- processes -----------------------------------------------------------------------------------
# start_bg NAME LOGFILE CMD...: CMD in the background (nsenter execs in place, so $! is CMD's
# PID), stdio to files so a caller reading our stdout never waits on a daemon holding the pipe.
start_bg() {
	local name=$1 logfile=$2
	shift 2
	mkdir -p "$CLUSTER_DIR/pids" "$(dirname "$logfile")"
	"$@" </dev/null >>"$logfile" 2>&1 8>&- 9>&- &
	echo $! >"$(pid_file "$name")"
}

cluster_namespaces() { our_namespaces; }

# --- certificates --------------------------------------------------------------------------------
# sign NAME SUBJECT EXT: a key and a certificate signed by the cluster CA.
sign() {
	local name=$1 subj=$2 ext=$3 d=$CLUSTER_DIR/pki
	openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
	printf '%s\n' "$ext" >"$d/$name.ext"
	openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 7 \
		-extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
	rm -f "$d/$name.csr" "$d/$name.ext"
}

make_pki() {
	local d=$CLUSTER_DIR/pki n
	mkdir -p "$d"
	openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=speculum-cluster-ca" \
		-keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
	sign apiserver "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,IP:$(cp_ip),IP:$(kubernetes_svc_ip),DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
	# O=system:masters: cluster-admin by the bootstrap policy (also the API server's kubelet client).
	sign admin "/O=system:masters/CN=speculum-cluster-admin" "extendedKeyUsage=clientAuth"
	# The bootstrap policy binds these users to their components' roles.
	sign controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
	sign scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
	sign kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
	for ((n = 1; n <= $(node_count); n++)); do
		# The Node authorizer and NodeRestriction know a kubelet by this name and group.
		sign "kubelet-n$n" "/O=system:nodes/CN=system:node:$(node_name "$n")" "extendedKeyUsage=clientAuth"
	done
	openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
	openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
	rm -f "$d/ca.srl"
}

# kubeconfig SERVER CERT_NAME: a kubeconfig for one client certificate.
kubeconfig() {
	local d=$CLUSTER_DIR/pki
	cat <<-EOF
		apiVersion: v1
		kind: Config
		clusters:
		- name: speculum-cluster
		  cluster:
		    server: $1
		    certificate-authority: $d/ca.crt
		users:
		- name: $2
		  user:
		    client-certificate: $d/$2.crt
		    client-key: $d/$2.key
		contexts:
		- name: speculum-cluster
		  context: {cluster: speculum-cluster, user: $2}
		current-context: speculum-cluster
	EOF
}

# --- network -------------------------------------------------------------------------------------
# routes_to_pods NETNS [SKIP_NODE]: a route to every node's pod CIDR through that node.
routes_to_pods() {
	local ns=$1 skip=${2:-0} m
	for ((m = 1; m <= $(node_count); m++)); do
		((m == skip)) || ip -n "$ns" route replace "$(pod_cidr "$m")" via "$(node_ip "$m")"
	done
}

net_up() {
	local n s
	log "network: bridge, control plane, registries, $(node_count) nodes on $CLUSTER_SUBNET.0/24"
	for s in $(cluster_subnets); do ip route replace blackhole "$s"; done
	ip netns add "$BRIDGE_NS"
	ip -n "$BRIDGE_NS" link set lo up
	ip -n "$BRIDGE_NS" link add br0 type bridge
	ip -n "$BRIDGE_NS" link set br0 up
	attach_ns "$CP_NS" v-cp "$(cp_ip)" ""
	attach_ns "$UP_NS" v-up "$(up_ip)" "$CLUSTER_UPSTREAM_RATE"
	attach_ns "$PRIV_NS" v-priv "$(priv_ip)" ""
	routes_to_pods "$CP_NS"
	routes_to_pods "$UP_NS"
	routes_to_pods "$PRIV_NS"
	for ((n = 1; n <= $(node_count); n++)); do
		attach_ns "$(node_ns "$n")" "v-n$n" "$(node_ip "$n")" "$CLUSTER_NODE_RATE"
		routes_to_pods "$(node_ns "$n")" "$n"
		# Locally sent packets to a ClusterIP need a route before kube-proxy's OUTPUT DNAT.
		ip -n "$(node_ns "$n")" route replace "$(service_cidr)" dev eth0
		ip netns exec "$(node_ns "$n")" sysctl -qw net.ipv4.ip_forward=1
	done
}

net_down() {
	local ns s
	for ns in $(cluster_namespaces); do
		ip netns del "$ns" 2>/dev/null || log "warning: could not delete namespace $ns"
	done
	for s in $(cluster_subnets); do
		if ip route show type blackhole "$s" | grep -q .; then ip route del blackhole "$s"; fi
	done
}

# --- host state the kubelet touches --------------------------------------------------------------
save_sysctls() {
	local k f=$CLUSTER_DIR/host-sysctls
	[[ -f $f ]] && return 0 # a second `up` after a crash must not save the kubelet's values
	for k in "${HOST_SYSCTLS[@]}"; do echo "$k=$(sysctl -n "$k")"; done >"$f.tmp"
	mv "$f.tmp" "$f"
}

restore_sysctls() {
	local f=$CLUSTER_DIR/host-sysctls line
	[[ -f $f ]] || return 0
	while IFS= read -r line; do sysctl -qw "$line" || log "warning: could not restore $line"; done <"$f"
	rm -f "$f"
}

cgroup_v1_roots() {
	local h
	for h in /sys/fs/cgroup/*; do
		[[ -d $h && $(basename "$h") != unified ]] && mountpoint -q "$h" && echo "$h"
	done
}

# make_cgroups N: the kubelet's cgroupRoot in every v1 hierarchy; cpuset needs cpus and mems
# before anything can join it.
make_cgroups() {
	local n=$1 h c
	c=${CLUSTER_PREFIX}n$n
	for h in $(cgroup_v1_roots); do mkdir -p "$h/$c"; done
	cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$c/cpuset.cpus"
	cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$c/cpuset.mems"
}

# cgroup_pids: every process in a cgroup below the kubelets' roots: containers of pods that
# have their own network namespace (CNI), which kill_ns_stragglers cannot see.
cgroup_pids() {
	local d
	[[ -d /sys/fs/cgroup/pids ]] || return 0
	for d in /sys/fs/cgroup/pids/${CLUSTER_PREFIX}n*; do
		[[ -d $d ]] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
	done | sort -u
}
no_cgroup_pids() { [[ -z $(cgroup_pids) ]]; }

kill_cgroup_stragglers() {
	local pids
	pids=$(cgroup_pids | tr '\n' ' ')
	[[ -n ${pids// /} ]] || return 0
	log "ending leftover container processes: $pids"
	# shellcheck disable=SC2086
	kill -s KILL $pids 2>/dev/null || true
	poll_until 10 "container processes to die" no_cgroup_pids || log "warning: container processes survive: $(cgroup_pids | tr '\n' ' ')"
}

# remove_cgroups: every cgroup below the cluster's roots, deepest first (runc also creates the
# same paths in the hybrid unified hierarchy).
remove_cgroups() {
	local h d
	for h in $(cgroup_v1_roots) /sys/fs/cgroup/unified; do
		for d in "$h/${CLUSTER_PREFIX}"n*; do
			[[ -d $d ]] || continue
			find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
			[[ ! -d $d ]] || log "warning: could not remove cgroup $d"
		done
	done
}

# --- node mount namespaces -----------------------------------------------------------------------
# make_mount_ns N: node N's own mount namespace, pinned by a bind mount at node_mnt N. The binds
# give it its own /var/lib, /var/log, /etc/containerd, /run/containerd, /run/netns and
# /etc/resolv.conf; the copies of the host's /run/netns/* are unmounted first, so this
# namespace pins no network namespace of anyone else.
make_mount_ns() {
	local n=$1 d
	d=$(node_dir "$n")
	mkdir -p "$d/var-lib" "$d/var-log" "$d/etc-containerd" "$d/run-containerd" "$d/run-netns"
	# A resolver that answers nothing: a name lookup on a node fails at once, never leaves.
	printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$d/resolv.conf"
	if ! mountpoint -q "$CLUSTER_DIR/nsfs"; then
		mkdir -p "$CLUSTER_DIR/nsfs"
		mount --bind "$CLUSTER_DIR/nsfs" "$CLUSTER_DIR/nsfs"
		mount --make-private "$CLUSTER_DIR/nsfs"
	fi
	touch "$(node_mnt "$n")"
	unshare --mount="$(node_mnt "$n")" --propagation private -- bash -euc '
		d=$1
		for m in $(awk '\''$5 ~ "^/run/netns/" { print $5 }'\'' /proc/self/mountinfo); do umount -l "$m"; done
		mount --bind "$d/run-netns" /run/netns
		mount --bind "$d/var-lib" /var/lib
		mount --bind "$d/var-log" /var/log
		mount --bind "$d/etc-containerd" /etc/containerd
		mount --bind "$d/run-containerd" /run/containerd
		mount --bind "$d/resolv.conf" /etc/resolv.conf
		# The other nodes namespace files: a copy here would pin their mount namespaces.
		umount -l "$2"
	' bash "$d" "$CLUSTER_DIR/nsfs"
}

remove_mount_ns() {
	local f
	for f in "$CLUSTER_DIR"/nsfs/*.mnt; do
		[[ -e $f ]] || continue
		umount "$f" 2>/dev/null || umount -l "$f" 2>/dev/null || true
		rm -f "$f"
	done
	if mountpoint -q "$CLUSTER_DIR/nsfs"; then umount "$CLUSTER_DIR/nsfs" || umount -l "$CLUSTER_DIR/nsfs"; fi
}

# host_mountpoints: /etc/containerd and /run/containerd must exist on the host as bind targets;
# `down` removes them again when `up` created them (and they are empty).
host_mountpoints() {
	local p
	for p in /etc/containerd /run/containerd /run/netns; do
		if [[ ! -d $p ]]; then
			mkdir -p "$p"
			echo "$p" >>"$CLUSTER_DIR/host-dirs"
		fi
	done
}

remove_host_mountpoints() {
	local p
	[[ -f $CLUSTER_DIR/host-dirs ]] || return 0
	while IFS= read -r p; do rmdir "$p" 2>/dev/null || true; done <"$CLUSTER_DIR/host-dirs"
	rm -f "$CLUSTER_DIR/host-dirs"
}

# --- registries ----------------------------------------------------------------------------------
# write_registry_config NAME ADDR [HTPASSWD]: a CNCF distribution config; access log on stdout.
write_registry_config() {
	local name=$1 addr=$2 htpasswd=${3:-} d=$CLUSTER_DIR/$1
	mkdir -p "$d/data"
	cat >"$d/config.yml" <<-EOF
		# Generated by tests/cluster/cluster.sh: the cluster's $name registry.
		version: 0.1
		log:
		  level: info
		  formatter: text
		  accesslog:
		    disabled: false
		storage:
		  filesystem:
		    rootdirectory: $d/data
		  delete:
		    enabled: true
		  maintenance:
		    uploadpurging:
		      enabled: false
		http:
		  addr: $addr
	EOF
	if [[ -n $htpasswd ]]; then
		cat >>"$d/config.yml" <<-EOF
			auth:
			  htpasswd:
			    realm: speculum-cluster
			    path: $htpasswd
		EOF
	fi
}

registry_ok() { in_ns "$1" curl -sS -o /dev/null --max-time 2 "http://$2/v2/"; }

# start_registry NAME NETNS ADDR: access log (combined format) to NAME/access.log.
start_registry() {
	local name=$1 ns=$2 addr=$3 d=$CLUSTER_DIR/$1
	is_running "$name" && return 0
	mkdir -p "$CLUSTER_DIR/pids"
	nsenter --net="/run/netns/$ns" -- docker-registry serve "$d/config.yml" \
		</dev/null >>"$d/access.log" 2>>"$d/registry.log" 8>&- 9>&- &
	echo $! >"$(pid_file "$name")"
	poll_until "$CLUSTER_TIMEOUT" "the $name registry at $addr" registry_ok "$ns" "$addr" ||
		die "the $name registry did not come up; see $d/registry.log"
}

# push SRC DEST_REF [NETNS]: skopeo copy of an OCI layout (oci:DIR:TAG) from inside the
# registry's namespace, digests preserved.
push() {
	local src=$1 dest=$2 ns=${3:-$UP_NS} creds=()
	[[ $ns != "$PRIV_NS" ]] || creds=(--dest-creds "$(<"$CLUSTER_DIR/private/creds")")
	in_ns "$ns" skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false "${creds[@]}" \
		"oci:$src" "docker://$dest"
}

# --- images ---------------------------------------------------------------------------------------
# build_images: the pause binary (a tiny static C program) and the test images as OCI layouts
# (tests/cluster/images.py), pushed to the upstream registry; the pause image is also imported
# into every node (containerd's sandbox image must never need a pull).
# speculum_layout: the speculum image to push, as LAYOUT:TAG — CLUSTER_SPECULUM_LAYOUT, else
# built by scripts/image.sh from the binaries next to SPECULUM_BIN; empty when neither works
# (build_images then packs a stand-in from SPECULUM_BIN and SPECULUM_WEBHOOK_BIN).
speculum_layout() {
	local bindir out
	if [[ -n ${CLUSTER_SPECULUM_LAYOUT:-} ]]; then
		echo "$CLUSTER_SPECULUM_LAYOUT"
		return 0
	fi
	[[ -x $REPO/scripts/image.sh && -x ${SPECULUM_BIN:-} ]] || return 0
	bindir=$(dirname "$SPECULUM_BIN")
	[[ -x $bindir/speculum-webhook ]] || return 0
	out=$CLUSTER_DIR/speculum-image
	bash "$REPO/scripts/image.sh" build "$bindir" "$out" >&2 || die "scripts/image.sh build $bindir failed"
	echo "$out:$(bash "$REPO/scripts/image.sh" tag "$out")"
}

build_images() {
	local d=$CLUSTER_DIR/images kubectl dev=()
	SPECULUM_LAYOUT=$(speculum_layout)
	if [[ -z $SPECULUM_LAYOUT && -x ${SPECULUM_BIN:-} && -x ${SPECULUM_WEBHOOK_BIN:-} ]]; then
		dev=(--speculum-bin "$SPECULUM_BIN" --webhook-bin "$SPECULUM_WEBHOOK_BIN")
	fi
	mkdir -p "$d"
	if [[ ! -x $d/pause || $HERE/pause.c -nt $d/pause ]]; then
		gcc -static -Os -o "$d/pause.tmp" "$HERE/pause.c"
		mv -f "$d/pause.tmp" "$d/pause"
	fi
	kubectl="$(k8s_bin_cached)/kubectl"
	python3 "$HERE/images.py" "$d" --pause "$d/pause" --kubectl "$kubectl" --busybox "$(command -v busybox)" \
		--upstream "$(upstream_host)" --private "$(private_host)" "${dev[@]}" >"$d/images.json.tmp"
	mv -f "$d/images.json.tmp" "$d/images.json"
}

push_images() {
	local name src full registry started=$SECONDS
	while IFS=$'\t' read -r name src full registry; do
		if [[ $registry == private ]]; then push "$src" "$full" "$PRIV_NS"; else push "$src" "$full"; fi
	done < <(jq -r '.images[] | [.name, "\(.layout):\(.tag)", .full, .registry] | @tsv' "$CLUSTER_DIR/images/images.json")
	# The speculum image (LAYOUT:TAG) under speculum/speculum:TAG; the stand-in is tagged dev.
	if [[ -n $SPECULUM_LAYOUT ]]; then
		push "$SPECULUM_LAYOUT" "$(upstream_host)/speculum/speculum:${SPECULUM_LAYOUT##*:}"
		echo "$(upstream_host)/speculum/speculum:${SPECULUM_LAYOUT##*:}" >"$CLUSTER_DIR/speculum-ref"
	elif jq -e '.images[] | select(.name == "speculum:dev")' "$CLUSTER_DIR/images/images.json" >/dev/null; then
		echo "$(upstream_host)/speculum/speculum:dev" >"$CLUSTER_DIR/speculum-ref"
	fi
	log "images pushed in $((SECONDS - started))s"
}

# --- the control plane ---------------------------------------------------------------------------
start_control_plane() {
	local bin=$1 d=$CLUSTER_DIR/cp
	mkdir -p "$d"
	kubeconfig "https://127.0.0.1:$API_PORT_IN" controller-manager >"$d/controller-manager.kubeconfig"
	kubeconfig "https://127.0.0.1:$API_PORT_IN" scheduler >"$d/scheduler.kubeconfig"
	start_bg etcd "$d/etcd.log" nsenter --net="/run/netns/$CP_NS" -- \
		"$bin/etcd" --data-dir "$d/etcd" --name cluster \
		--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster cluster=http://127.0.0.1:2380 --log-level warn \
		--quota-backend-bytes 1073741824
	# --enable-aggregator-routing: webhooks are called at their endpoints (pod IPs, routed here)
	# rather than at ClusterIPs, which only kube-proxy on the nodes translates.
	start_bg apiserver "$d/apiserver.log" nsenter --net="/run/netns/$CP_NS" -- \
		env -u HTTPS_PROXY -u HTTP_PROXY -u https_proxy -u http_proxy \
		"$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
		--bind-address=0.0.0.0 --advertise-address="$(cp_ip)" --secure-port=$API_PORT_IN \
		--cert-dir="$d/apiserver-certs" \
		--tls-cert-file="$CLUSTER_DIR/pki/apiserver.crt" --tls-private-key-file="$CLUSTER_DIR/pki/apiserver.key" \
		--client-ca-file="$CLUSTER_DIR/pki/ca.crt" --authorization-mode=Node,RBAC \
		--kubelet-client-certificate="$CLUSTER_DIR/pki/admin.crt" --kubelet-client-key="$CLUSTER_DIR/pki/admin.key" \
		--service-account-key-file="$CLUSTER_DIR/pki/sa.pub" --service-account-signing-key-file="$CLUSTER_DIR/pki/sa.key" \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-cluster-ip-range="$(service_cidr)" --allow-privileged=true \
		--enable-aggregator-routing=true --kubelet-preferred-address-types=InternalIP \
		--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount \
		--profiling=false --v=1
	# The host's door to the API server: loopback port ↔ unix socket ↔ the API server's port in
	# spkc-cp. Nothing in the host namespace ever dials a namespace address.
	rm -f "$d/api.sock"
	start_bg api-bridge-cp "$d/api-bridge.log" nsenter --net="/run/netns/$CP_NS" -- \
		socat "UNIX-LISTEN:$d/api.sock,fork,mode=600" "TCP:127.0.0.1:$API_PORT_IN"
	poll_until 10 "the API bridge socket" test -S "$d/api.sock" || die "socat did not listen on $d/api.sock"
	start_bg api-bridge-host "$d/api-bridge.log" \
		socat "TCP-LISTEN:$API_PORT,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$d/api.sock"
	kubeconfig "https://127.0.0.1:$API_PORT" admin >"$CLUSTER_DIR/kubeconfig"
	poll_until "$CLUSTER_TIMEOUT" "kube-apiserver /readyz" api_ready ||
		die "kube-apiserver not ready; see $d/apiserver.log"
	start_bg controller-manager "$d/controller-manager.log" nsenter --net="/run/netns/$CP_NS" -- \
		"$bin/kube-controller-manager" --kubeconfig="$d/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$d/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$d/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
		--service-account-private-key-file="$CLUSTER_DIR/pki/sa.key" --root-ca-file="$CLUSTER_DIR/pki/ca.crt" \
		--cluster-signing-cert-file="$CLUSTER_DIR/pki/ca.crt" --cluster-signing-key-file="$CLUSTER_DIR/pki/ca.key" \
		--service-cluster-ip-range="$(service_cidr)" --allocate-node-cidrs=false \
		--controllers='*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller' --v=1
	start_bg scheduler "$d/scheduler.log" nsenter --net="/run/netns/$CP_NS" -- \
		"$bin/kube-scheduler" --kubeconfig="$d/scheduler.kubeconfig" \
		--authentication-kubeconfig="$d/scheduler.kubeconfig" --authorization-kubeconfig="$d/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --v=1
}

api_ready() {
	curl -fsS --max-time 2 --cacert "$CLUSTER_DIR/pki/ca.crt" --cert "$CLUSTER_DIR/pki/admin.crt" \
		--key "$CLUSTER_DIR/pki/admin.key" "https://127.0.0.1:$API_PORT/readyz"
}

# --- nodes ---------------------------------------------------------------------------------------
# write_containerd_config N: node N's containerd config, the one place that knows containerd's
# config format. Paths are containerd's defaults: inside the node's mount namespace they are
# the node's own (the chart's default hostPaths then work unchanged). Version 2 is what
# containerd 1.6 and 1.7 read; containerd 2.x reads it too (and migrates it in memory).
write_containerd_config() {
	local n=$1 d
	d=$(node_dir "$n")
	mkdir -p "$d/etc-containerd/certs.d" "$d/etc-containerd/cni/net.d"
	cat >"$d/etc-containerd/config.toml" <<-EOF
		# Generated by tests/cluster/cluster.sh: node $n's containerd (CRI for its kubelet).
		version = 2
		root = "/var/lib/containerd"
		state = "/run/containerd"

		[grpc]
		  address = "/run/containerd/containerd.sock"

		[ttrpc]
		  address = "/run/containerd/containerd.sock.ttrpc"

		[debug]
		  address = ""
		  level = "info"

		[metrics]
		  address = ""

		[plugins]
		  [plugins."io.containerd.internal.v1.opt"]
		    path = "/var/lib/containerd/opt"
		  [plugins."io.containerd.grpc.v1.cri"]
		    sandbox_image = "$(pause_ref)"
		    stream_server_address = "127.0.0.1"
		    stream_server_port = "0"
		    [plugins."io.containerd.grpc.v1.cri".containerd]
		      snapshotter = "overlayfs"
		      discard_unpacked_layers = false
		      default_runtime_name = "runc"
		      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
		        runtime_type = "io.containerd.runc.v2"
		        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
		          # No CAP_SYS_RESOURCE here: the wrapper turns negative oom_score_adj into 0.
		          BinaryName = "$HERE/runc-wrapper"
		          SystemdCgroup = false
		    [plugins."io.containerd.grpc.v1.cri".cni]
		      bin_dir = "/usr/lib/cni"
		      conf_dir = "/etc/containerd/cni/net.d"
		    [plugins."io.containerd.grpc.v1.cri".registry]
		      config_path = "/etc/containerd/certs.d"
	EOF
}

write_cni_config() {
	local n=$1
	cat >"$(node_dir "$n")/etc-containerd/cni/net.d/10-speculum-cluster.conflist" <<-EOF
		{
		  "cniVersion": "0.4.0",
		  "name": "speculum-cluster",
		  "plugins": [
		    {
		      "type": "bridge",
		      "bridge": "cni0",
		      "isGateway": true,
		      "ipMasq": false,
		      "hairpinMode": true,
		      "ipam": {
		        "type": "host-local",
		        "ranges": [[{"subnet": "$(pod_cidr "$n")", "gateway": "$CLUSTER_POD_NET.$n.1"}]],
		        "routes": [{"dst": "0.0.0.0/0"}]
		      }
		    }
		  ]
		}
	EOF
}

# write_registry_hosts N: the plain hosts.toml a node has before speculum configures it (pulls
# go straight to the registries, over plain HTTP). Scenario f compares against these bytes.
write_registry_hosts() {
	local n=$1 host dir
	for host in "$(upstream_host)" "$(private_host)"; do
		dir="$(node_dir "$n")/etc-containerd/certs.d/$host"
		mkdir -p "$dir"
		cat >"$dir/hosts.toml" <<-EOF
			# Written by tests/cluster/cluster.sh: no mirror, straight to $host.
			server = "http://$host"

			[host."http://$host"]
			  capabilities = ["pull", "resolve"]
		EOF
	done
}

write_kubelet_config() {
	local n=$1 d
	d=$(node_dir "$n")
	kubeconfig "https://$(cp_ip):$API_PORT_IN" "kubelet-n$n" >"$d/kubelet.kubeconfig"
	kubeconfig "https://$(cp_ip):$API_PORT_IN" kube-proxy >"$d/kube-proxy.kubeconfig"
	cat >"$d/kubelet.yaml" <<-EOF
		# Generated by tests/cluster/cluster.sh for node $n (notes/kubelet.md).
		apiVersion: kubelet.config.k8s.io/v1beta1
		kind: KubeletConfiguration
		cgroupDriver: cgroupfs
		cgroupRoot: /${CLUSTER_PREFIX}n$n
		failSwapOn: false
		oomScoreAdj: 0
		containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
		address: $(node_ip "$n")
		port: 10250
		readOnlyPort: 0
		healthzBindAddress: 127.0.0.1
		healthzPort: 10248
		authentication:
		  anonymous: {enabled: false}
		  webhook: {enabled: false}
		  x509: {clientCAFile: $CLUSTER_DIR/pki/ca.crt}
		authorization: {mode: AlwaysAllow}
		resolvConf: $d/resolv.conf
		# The disk is shared by every node and the host: evict late, collect images never.
		evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
		imageGCHighThresholdPercent: 100
		imageGCLowThresholdPercent: 99
		maxPods: 60
		serializeImagePulls: false
		containerLogMaxSize: 5Mi
		containerLogMaxFiles: 2
		syncFrequency: 10s
		fileCheckFrequency: 10s
		nodeStatusUpdateFrequency: 5s
		rotateCertificates: false
		serverTLSBootstrap: false
		enableServer: true
		localStorageCapacityIsolation: false
	EOF
	cat >"$d/kube-proxy.yaml" <<-EOF
		# Generated by tests/cluster/cluster.sh for node $n.
		apiVersion: kubeproxy.config.k8s.io/v1alpha1
		kind: KubeProxyConfiguration
		clientConnection: {kubeconfig: $d/kube-proxy.kubeconfig}
		mode: iptables
		hostnameOverride: $(node_name "$n")
		clusterCIDR: $CLUSTER_POD_NET.0.0/16
		metricsBindAddress: 127.0.0.1:10249
		healthzBindAddress: 127.0.0.1:10256
		# conntrack knobs are read-only outside the initial network namespace.
		conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
	EOF
}

containerd_ok() { in_node "$1" "$(containerd_bin)/ctr" --address /run/containerd/containerd.sock version; }

start_node() {
	local n=$1 d
	d=$(node_dir "$n")
	make_cgroups "$n"
	make_mount_ns "$n"
	write_containerd_config "$n"
	write_cni_config "$n"
	write_registry_hosts "$n"
	write_kubelet_config "$n"
	start_bg "n$n-containerd" "$d/containerd.log" env PATH="$(containerd_bin):$PATH" \
		nsenter --net="/run/netns/$(node_ns "$n")" --mount="$(node_mnt "$n")" -- \
		"$(containerd_bin)/containerd" --config "$d/etc-containerd/config.toml" --log-level info
}

# import_pause N: the sandbox image is local from the start: a pod never waits for a pull of it.
import_pause() {
	in_node "$1" "$(containerd_bin)/ctr" --address /run/containerd/containerd.sock -n k8s.io \
		images import --all-platforms "$(jq -r .pause_tar "$CLUSTER_DIR/images/images.json")" >/dev/null
}

start_node_agents() {
	local n=$1 bin=$2 d
	d=$(node_dir "$n")
	start_bg "n$n-kubelet" "$d/kubelet.log" nsenter --net="/run/netns/$(node_ns "$n")" --mount="$(node_mnt "$n")" -- \
		"$bin/kubelet" --config="$d/kubelet.yaml" --kubeconfig="$d/kubelet.kubeconfig" \
		--hostname-override="$(node_name "$n")" --node-ip="$(node_ip "$n")" \
		--node-labels="speculum.io/cluster-node=$n" --v=1
	start_bg "n$n-kube-proxy" "$d/kube-proxy.log" nsenter --net="/run/netns/$(node_ns "$n")" --mount="$(node_mnt "$n")" -- \
		"$bin/kube-proxy" --config="$d/kube-proxy.yaml" --v=1
}

kubectl_() { "$(k8s_bin_cached)/kubectl" --kubeconfig "$CLUSTER_DIR/kubeconfig" "$@"; }
k8s_bin_cached() { cat "$CLUSTER_DIR/k8s-bin"; }

nodes_ready() {
	local want=$1 got
	got=$(kubectl_ get nodes -o json | jq '[.items[] | select(.status.conditions[] | select(.type == "Ready" and .status == "True"))] | length')
	[[ $got == "$want" ]]
}

# --- commands ------------------------------------------------------------------------------------
with_lock() {
	check_knobs
	mkdir -p "$(dirname "$CLUSTER_DIR")"
	exec 8>"$CLUSTER_DIR.lock"
	flock -w "$CLUSTER_TIMEOUT" 8 || die "another cluster.sh up/down holds $CLUSTER_DIR.lock"
	"$@"
}

cluster_exists() { [[ -d $CLUSTER_DIR/pids ]] || [[ -n $(cluster_namespaces) ]] || [[ -f $CLUSTER_DIR/host-sysctls ]]; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cmd_up() {
	require_root
	require_tools
	local started=$SECONDS n bin nodes=$CLUSTER_NODES
	if cluster_exists; then
		log "a cluster is already there, taking it down first"
		cmd_down
	fi
	bin=$(k8s_bin)
	for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
		[[ -x $bin/$b ]] || die "no $b in $bin"
	done
	# A fresh cluster: last run's state goes; the image layouts stay (they are deterministic).
	rm -rf --one-file-system "$CLUSTER_DIR"/n[0-9]* "$CLUSTER_DIR/cp" "$CLUSTER_DIR/pki" \
		"$CLUSTER_DIR/upstream" "$CLUSTER_DIR/private" "$CLUSTER_DIR/pids" "$CLUSTER_DIR/speculum-ref"
	mkdir -p "$CLUSTER_DIR/pids"
	echo "$nodes" >"$CLUSTER_DIR/nodes"
	echo "$bin" >"$CLUSTER_DIR/k8s-bin"
	API_PORT=${CLUSTER_API_PORT:-$(free_port)}
	echo "$API_PORT" >"$CLUSTER_DIR/api-port"
	# Everything from here on is undone by `down`, also when `up` fails half way.
	trap 'rc=$?; if ((rc != 0)); then log "up failed; taking down what was made"; cmd_down; fi' EXIT
	save_sysctls
	host_mountpoints
	make_pki
	build_images
	net_up
	write_registry_config upstream "$(upstream_host)"
	start_registry upstream "$UP_NS" "$(upstream_host)"
	mkdir -p "$CLUSTER_DIR/private"
	echo "cluster:cluster-secret" >"$CLUSTER_DIR/private/creds"
	htpasswd -Bbn cluster cluster-secret >"$CLUSTER_DIR/private/htpasswd" 2>/dev/null
	write_registry_config private "$(private_host)" "$CLUSTER_DIR/private/htpasswd"
	start_registry private "$PRIV_NS" "$(private_host)"
	push_images
	for ((n = 1; n <= nodes; n++)); do start_node "$n"; done
	for ((n = 1; n <= nodes; n++)); do
		poll_until "$CLUSTER_TIMEOUT" "node $n's containerd" containerd_ok "$n" ||
			die "containerd of node $n did not come up; see $(node_dir "$n")/containerd.log"
		import_pause "$n"
	done
	start_control_plane "$bin"
	for ((n = 1; n <= nodes; n++)); do start_node_agents "$n" "$bin"; done
	poll_until "$CLUSTER_TIMEOUT" "$nodes nodes Ready" nodes_ready "$nodes" ||
		die "nodes not Ready; see $CLUSTER_DIR/n*/kubelet.log"
	# Pods cannot be created before the controller-manager made the default ServiceAccount.
	poll_until "$CLUSTER_TIMEOUT" "the default ServiceAccount" kubectl_ get serviceaccount default -n default ||
		die "no default ServiceAccount; see $CLUSTER_DIR/cp/controller-manager.log"
	trap - EXIT
	log "up in $((SECONDS - started))s: $nodes nodes, upstream http://$(upstream_host), state in $CLUSTER_DIR"
	echo "export KUBECONFIG=$CLUSTER_DIR/kubeconfig"
}

cmd_down() {
	require_root
	local f names=() n
	# Kubelets first (they would restart what containerd stops), then everything else at once.
	for f in "$CLUSTER_DIR"/pids/n*-kubelet.pid; do [[ -e $f ]] && names+=("$(basename "$f" .pid)"); done
	((${#names[@]} == 0)) || stop_all TERM "$CLUSTER_TIMEOUT" "${names[@]}"
	names=()
	for f in "$CLUSTER_DIR"/pids/*.pid; do [[ -e $f ]] && names+=("$(basename "$f" .pid)"); done
	# 10 s, then KILL: kube-apiserver drains its watches for a minute, and nothing here keeps
	# state that must survive.
	((${#names[@]} == 0)) || stop_all TERM 10 "${names[@]}"
	kill_ns_stragglers
	kill_cgroup_stragglers
	remove_mount_ns
	# Mounts that escaped a node namespace (none expected), deepest first.
	awk -v d="$CLUSTER_DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
		while read -r f; do umount "$f" 2>/dev/null || umount -l "$f" || log "warning: could not unmount $f"; done
	net_down
	remove_cgroups
	restore_sysctls
	remove_host_mountpoints
	rm -f "$CLUSTER_DIR/cp/api.sock"
	for n in "$CLUSTER_DIR"/n[0-9]*; do
		[[ -d $n ]] && rm -rf --one-file-system "$n/var-lib" "$n/run-containerd" "$n/run-netns"
	done
	rm -rf --one-file-system "$CLUSTER_DIR/upstream/data" "$CLUSTER_DIR/private/data" \
		"$CLUSTER_DIR/cp/etcd" "$CLUSTER_DIR/pids"
	log "down"
}

cmd_status() {
	local name state
	echo "cluster dir: $CLUSTER_DIR"
	echo "namespaces: $(cluster_namespaces | tr '\n' ' ')"
	for name in $(ls "$CLUSTER_DIR/pids" 2>/dev/null | sed 's/\.pid$//'); do
		if is_running "$name"; then state="running (pid $(owned_pid "$name"))"; else state="stopped"; fi
		printf '  %-22s %s\n' "$name" "$state"
	done
	if [[ -f $CLUSTER_DIR/api-port ]] && API_PORT=$(<"$CLUSTER_DIR/api-port") && api_ready >/dev/null 2>&1; then
		echo "API server: https://127.0.0.1:$API_PORT (KUBECONFIG=$CLUSTER_DIR/kubeconfig)"
		kubectl_ get nodes -o wide 2>/dev/null || true
	else
		echo "API server: not answering"
	fi
}

cmd_env() {
	cat <<-EOF
		KUBECONFIG=$CLUSTER_DIR/kubeconfig
		CLUSTER_DIR=$CLUSTER_DIR
		CLUSTER_NODES=$(node_count)
		CLUSTER_K8S_BIN=$(k8s_bin_cached 2>/dev/null || true)
		CLUSTER_UPSTREAM=$(upstream_host)
		CLUSTER_PRIVATE=$(private_host)
		CLUSTER_PRIVATE_CREDS=$(cat "$CLUSTER_DIR/private/creds" 2>/dev/null || true)
		CLUSTER_NODE_IPS=$(for ((n = 1; n <= $(node_count); n++)); do printf '%s ' "$(node_ip "$n")"; done)
		CLUSTER_PAUSE=$(pause_ref)
		CLUSTER_IMAGES=$CLUSTER_DIR/images/images.json
		CLUSTER_SPECULUM_IMAGE=$(cat "$CLUSTER_DIR/speculum-ref" 2>/dev/null || true)
	EOF
}

main() {
	case "${1:-}" in
	up) with_lock cmd_up ;;
	down) with_lock cmd_down ;;
	status) check_knobs; cmd_status ;;
	env) check_knobs; cmd_env ;;
	exec)
		shift
		[[ ${1:-} =~ ^[0-9]+$ ]] || die "usage: cluster.sh exec N CMD..."
		local n=$1
		shift
		in_node "$n" "$@"
		;;
	cp-exec) shift; in_ns "$CP_NS" "$@" ;;
	up-exec) shift; in_ns "$UP_NS" "$@" ;;
	upstream-stop) stop_all TERM "$CLUSTER_TIMEOUT" upstream ;;
	upstream-start) start_registry upstream "$UP_NS" "$(upstream_host)" ;;
	shape)
		# shape N RATE / unshape N: limit node N's link (both directions), e.g. so a transfer is
		# slow enough to interrupt.
		[[ ${2:-} =~ ^[0-9]+$ && -n ${3:-} ]] || die "usage: cluster.sh shape N RATE"
		tbf "$3" "$BRIDGE_NS" "v-n$2"
		tbf "$3" "$(node_ns "$2")" eth0
		;;
	unshape)
		[[ ${2:-} =~ ^[0-9]+$ ]] || die "usage: cluster.sh unshape N"
		tc -n "$BRIDGE_NS" qdisc del dev "v-n$2" root 2>/dev/null || true
		tc -n "$(node_ns "$2")" qdisc del dev eth0 root 2>/dev/null || true
		;;
	push)
		shift
		[[ $# -ge 2 ]] || die "usage: cluster.sh push LAYOUT:TAG HOST/REPO:TAG [upstream|private]"
		local ns=$UP_NS
		[[ ${3:-upstream} != private ]] || ns=$PRIV_NS
		push "$1" "$2" "$ns"
		;;
	*)
		echo "usage: $0 up|down|status|env|exec N CMD|cp-exec CMD|up-exec CMD|upstream-stop|upstream-start|push SRC DEST [private]" >&2
		echo "  env: CLUSTER_DIR CLUSTER_NODES CLUSTER_SUBNET CLUSTER_POD_NET CLUSTER_SERVICE_NET CLUSTER_PREFIX" >&2
		echo "       CLUSTER_CONTAINERD_BIN CLUSTER_K8S_BIN CLUSTER_API_PORT CLUSTER_UPSTREAM_RATE CLUSTER_NODE_RATE" >&2
		exit 2
		;;
	esac
}

# Sourcing (for poking at it by hand) defines the functions only.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
