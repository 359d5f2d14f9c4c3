#!/usr/bin/env bash
# demo.sh — speculum's story on the rig, narrated for a newcomer.
#
# One job: show, step by step, where image bytes come from when nodes run speculum: the first
# node gets them from the upstream registry, the next ones from that node, and pulls keep
# working when the upstream is gone. A fourth node without speculum pulls straight from
# upstream for comparison. Everything is torn down on exit, however it exits.
#
#   sudo tests/rig/demo.sh
# Environment: RIG_UPSTREAM_RATE (default 200mbit: the upstream is "far away", the other nodes
# are near), RIG_BIG_MB (default 200), SPECULUM_BIN (default target/debug/speculum).

set -euo pipefail
export RIG_NODES=4
export RIG_UPSTREAM_RATE=${RIG_UPSTREAM_RATE:-200mbit}
# shellcheck source=rig.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/rig.sh"

CONTROL=4 # the node without speculum
ROWS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# timed_pull LABEL CMD...: runs a pull, prints and records how long it took.
timed_pull() {
	local label=$1 t0 ms
	shift
	t0=$(now_ms)
	"$@" >/dev/null
	ms=$(($(now_ms) - t0))
	note "$label: $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s"
	ROWS+=("$(printf '%-58s %8d ms' "$label" "$ms")")
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

peer_bytes() { metric_sum "$1" speculum_served_bytes_total handler=mirror source=peer; }
served_to_peers() { metric_sum "$1" speculum_served_bytes_total handler=peer source=local; }
misses() { metric_sum "$1" speculum_mirror_requests_total outcome=miss; }

# bytes_report N LAYER: where node N's bytes came from, by the upstream log and the daemon.
bytes_report() {
	local n=$1 layer=$2
	note "upstream access log: $(upstream_gets "$layer" "$(node_ip "$n")") GET(s) of the big layer from node $n ($(node_ip "$n"))"
	note "node $n's daemon: $(mib "$(peer_bytes "$n")") from peers, $(misses "$n") mirror miss(es) (misses send containerd upstream)"
}

wait_findable() {
	local n=$1 repo=$2 digest=$3
	poll_until "$RIG_TIMEOUT" "node $n's mirror to find $repo@$digest" mirror_finds "$n" "$repo" "$digest"
}

demo_main() {
	require_root
	require_speculum
	trap '"$RIG_SELF" down >/dev/null 2>&1 || true' EXIT

	say "The rig"
	note "Each box below is a network namespace on this machine; nothing leaves it."
	note "  spcl-up   upstream registry $(upstream_host) (link shaped to $RIG_UPSTREAM_RATE: it is 'far away')"
	note "  spcl-n1…3 nodes $(node_ip 1)…$(node_ip 3): containerd + speculum"
	note "  spcl-n4   node $(node_ip "$CONTROL"): containerd only, pulls straight from upstream"
	note "  spcl-br   the bridge that joins them (the 'cluster network', unshaped)"
	timed_pull "rig up (namespaces, registry, 4 containerds)" "$RIG_SELF" up
	timed_pull "push test images (big layer ${RIG_BIG_MB:-200} MiB)" "$RIG_HERE/push-images.sh"

	local big_ref big_digest big_by_digest layer layer_size small_ref
	big_ref=$(jq -r '.images[] | select(.name == "big") | .refs.v1' "$RIG_DIR/images.json")
	big_digest=$(jq -r '.images[] | select(.name == "big") | .digest' "$RIG_DIR/images.json")
	big_by_digest=$(jq -r '.images[] | select(.name == "big") | .by_digest' "$RIG_DIR/images.json")
	layer=$(jq -r '.images[] | select(.name == "big") | .blobs | max_by(.size) | .digest' "$RIG_DIR/images.json")
	layer_size=$(jq -r '.images[] | select(.name == "big") | .blobs | max_by(.size) | .size' "$RIG_DIR/images.json")
	small_ref=$(jq -r '.images[] | select(.name == "small") | .refs.v1' "$RIG_DIR/images.json")
	note "big image: $big_ref, one layer of $(mib "$layer_size")"

	say "Start speculum on nodes 1-3"
	local n
	for n in 1 2 3; do
		write_speculum_config "$n"
		configure_node "$n" >/dev/null
		start_speculum "$n"
	done
	note "'speculum configure' rewrote each node's containerd hosts.toml; node 1's now reads:"
	sed 's/^/      /' "$(node_certs 1)/$(upstream_host)/hosts.toml"
	note "containerd asks the local daemon first; on 404 (or error) it goes to the upstream server."

	say "Node 4 (no speculum) pulls the big image straight from upstream"
	timed_pull "node 4: CRI pull, direct from upstream" cri_pull "$CONTROL" "$big_ref"
	note "upstream access log: $(upstream_gets "$layer" "$(node_ip "$CONTROL")") GET(s) of the big layer from node 4"

	say "Node 1 pulls it through speculum: nobody in the cluster has it yet"
	timed_pull "node 1: CRI pull via mirror (miss -> upstream)" cri_pull 1 "$big_ref"
	cri_pull 1 "$small_ref" >/dev/null
	bytes_report 1 "$layer"
	note "node 1's daemon now advertises the image's digests and tags in the DHT."
	wait_findable 2 rig/big "$big_digest"

	say "Node 2 pulls it: the bytes come from node 1"
	timed_pull "node 2: CRI pull via mirror (from node 1)" cri_pull 2 "$big_ref"
	bytes_report 2 "$layer"
	note "node 1's daemon served $(mib "$(served_to_peers 1)") to peers."

	say "The upstream registry goes away"
	stop_upstream
	note "upstream stopped; node 3 pulls by digest and by tag anyway"
	timed_pull "node 3: CRI pull by digest, upstream down (from peers)" cri_pull 3 "$big_by_digest"
	timed_pull "node 3: CRI pull small by tag, upstream down" cri_pull 3 "$small_ref"
	bytes_report 3 "$layer"
	note "nodes 1 and 2 served $(mib $(($(served_to_peers 1) + $(served_to_peers 2)))) to peers in total."

	say "Summary"
	printf '   %s\n' "${ROWS[@]}"
	note "direct = node 4 without speculum; via mirror = containerd -> local daemon -> peer or upstream."
	note "logs: $RIG_DIR/n*/speculum.log, $RIG_DIR/upstream/access.log (removed at the next 'up')"
}

demo_main "$@"
