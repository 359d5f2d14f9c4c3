#!/usr/bin/env bash
# lookup.sh — a manifest HEAD by tag through a node's mirror when another node holds the image,
# taken apart, against the distribution registry (Go) answering the same HEAD, in one run.
#
# One job: the figures of the lookup target (issue 19 item 4: p50 ≤ 2 ms, p99 ≤ 5 ms on the
# rig). Two rig nodes; node 1 pulls `small:v1` through its mirror (so it holds and advertises
# it), node 2 holds nothing. Inside node 2's namespace `latency.py` times, interleaved:
#   mirror_tag     node 2's mirror, HEAD by tag: upstream tag HEAD (upstream-first), local miss,
#                  DHT lookup + liveness, peer HEAD by digest — the whole path containerd sees
#   mirror_digest  node 2's mirror, HEAD by digest: the same without the upstream tag HEAD
#   peer           node 1's peer endpoint, HEAD by digest (what node 2's mirror sends it)
#   registry       the upstream registry, HEAD by tag: the reference
# and the daemon's own histograms give the mean of the upstream tag HEAD and of lookup → first
# peer over the run. Then node 2's daemon restarts with `routing.liveness_window: 0s` (every
# lookup waits for the holder's `has` answer, the behaviour before the fast path) and the same
# is measured again, so both rows come from one run.
#
#   sudo bench/lookup.sh
# Knobs: BENCH_COUNT (HEADs per target and round, default 2000), BENCH_OUT, SPECULUM_BIN,
# RIG_DIR / RIG_NS_PREFIX / RIG_SUBNET (a rig of its own beside others). Prints one JSON line per
# round (`"window": "2s"` or `"0s"`) and leaves them in $BENCH_OUT/lookup.jsonl.

set -euo pipefail
BENCH_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(readlink -f "$BENCH_HERE/..")
export RIG_NODES=2 RIG_BIG_MB=${RIG_BIG_MB:-8}
export BENCH_OUT=${BENCH_OUT:-/tmp/speculum-bench}
COUNT=${BENCH_COUNT:-2000}
# shellcheck source=../tests/rig/rig.sh
source "$REPO/tests/rig/rig.sh"

hist_sum() {
	# metric_sum prints integers: read the raw samples for the sums (seconds, fractional).
	speculum_metrics "$1" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%.6f\n", s }'
}
mean_ms() {
	local s0=$1 c0=$2 s1=$3 c1=$4
	awk -v s0="$s0" -v c0="$c0" -v s1="$s1" -v c1="$c1" 'BEGIN { if (c1 > c0) printf "%.3f", (s1 - s0) * 1000 / (c1 - c0); else printf "null" }'
}

round() {
	local window=$1 repo=$2 tag=$3 digest=$4 ns q ts0 tc0 ls0 lc0 ts1 tc1 ls1 lc1 out
	ns="$(upstream_ip)%3A$RIG_UPSTREAM_PORT"
	q="?ns=$ns"
	ts0=$(hist_sum 2 speculum_mirror_tag_upstream_duration_seconds_sum)
	tc0=$(metric_sum 2 speculum_mirror_tag_upstream_duration_seconds_count)
	ls0=$(hist_sum 2 speculum_routing_lookup_duration_seconds_sum)
	lc0=$(metric_sum 2 speculum_routing_lookup_duration_seconds_count)
	out=$(node_exec 2 env LATENCY_SUBNET="$RIG_SUBNET." python3 "$BENCH_HERE/latency.py" "$COUNT" \
		"mirror_tag=http://127.0.0.1:5080/v2/$repo/manifests/$tag$q" \
		"mirror_digest=http://127.0.0.1:5080/v2/$repo/manifests/$digest$q" \
		"peer=http://$(node_ip 1):5081/v2/$repo/manifests/$digest$q" \
		"registry=http://$(upstream_host)/v2/$repo/manifests/$tag")
	ts1=$(hist_sum 2 speculum_mirror_tag_upstream_duration_seconds_sum)
	tc1=$(metric_sum 2 speculum_mirror_tag_upstream_duration_seconds_count)
	ls1=$(hist_sum 2 speculum_routing_lookup_duration_seconds_sum)
	lc1=$(metric_sum 2 speculum_routing_lookup_duration_seconds_count)
	jq -c --arg w "$window" --argjson tag "$(mean_ms "$ts0" "$tc0" "$ts1" "$tc1")" \
		--argjson look "$(mean_ms "$ls0" "$lc0" "$ls1" "$lc1")" \
		--arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
		'{window: $w, load: $load, upstream_tag_head_mean_ms: $tag, lookup_first_peer_mean_ms: $look} + .' \
		<<<"$out" | tee -a "$BENCH_OUT/lookup.jsonl"
}

main() {
	require_root
	require_speculum
	mkdir -p "$BENCH_OUT"
	: >"$BENCH_OUT/lookup.jsonl"
	trap 'bash "$RIG_HERE/rig.sh" down >/dev/null 2>&1 || true' EXIT
	bash "$RIG_HERE/rig.sh" up
	bash "$RIG_HERE/push-images.sh" small >/dev/null
	local repo ref tag digest
	repo=$(jq -r '.images[] | select(.name == "small") | .repository' "$RIG_DIR/images.json")
	ref=$(jq -r '.images[] | select(.name == "small") | .refs.v1' "$RIG_DIR/images.json")
	digest=$(jq -r '.images[] | select(.name == "small") | .digest' "$RIG_DIR/images.json")
	tag=${ref##*:}
	for n in 1 2; do
		configure_node "$n" >/dev/null
		start_speculum "$n"
	done
	cri_pull 1 "$ref" >/dev/null
	poll_until "$RIG_TIMEOUT" "node 2 finds small:v1 through node 1" mirror_finds 2 "$repo" "$tag" ||
		die "node 2's mirror never found $ref"
	round 2s "$repo" "$tag" "$digest"
	stop_speculum 2
	SPECULUM_ROUTING_LIVENESS_WINDOW=0s start_speculum 2
	poll_until "$RIG_TIMEOUT" "node 2 finds small:v1 again" mirror_finds 2 "$repo" "$tag" ||
		die "node 2's mirror never found $ref after the restart"
	round 0s "$repo" "$tag" "$digest"
}

main "$@"
