#!/usr/bin/env bash
# advertise.sh — advertise latency per containerd version: the time from the end of a CRI pull
# on node 1 (through its daemon, from upstream) to the moment every other node's mirror finds
# every blob of that image (manifest, config, layers) through the DHT.
#
# One job: that one number per image and containerd line, on the namespace rig. containerd 2.1+
# reports each blob as it lands (/content/create), so its layers can be advertised before the
# pull ends (the figure can be 0 or negative: found before the pull returned); older versions
# advertise on the image event the pull's end creates.
#
#   sudo bench/advertise.sh                 every line of tests/containerd/containerd.sh
#   sudo BENCH_LINES="1.6 2.3" bench/advertise.sh
# Knobs: BENCH_LINES, BENCH_ADV_IMAGES (rig image names, default "big multi small docker"),
# RIG_BIG_MB (default here 64), SPECULUM_BIN, BENCH_OUT. Prints one TSV line per pull:
#   line  image  blobs  pull_ms  found_after_end_ms  check_floor_ms
# (check_floor_ms: the same checks repeated once everything is found, i.e. what polling itself
# costs; the latency is found_after_end_ms minus about that.)
# and leaves it in $BENCH_OUT/advertise.tsv. Takes the machine-wide rig lock.

set -euo pipefail
BENCH_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(readlink -f "$BENCH_HERE/..")
export RIG_BIG_MB=${RIG_BIG_MB:-64}
export RIG_NODES=3
export BENCH_OUT=${BENCH_OUT:-/tmp/speculum-bench}
IMAGES=${BENCH_ADV_IMAGES:-big multi small docker}
LINES=${BENCH_LINES:-$(bash "$REPO/tests/containerd/containerd.sh" lines | tr '\n' ' ')}
# How long a blob may take to become findable before the run counts as failed.
FIND_LIMIT_S=${FIND_LIMIT_S:-60}

# shellcheck source=../tests/rig/rig.sh
source "$REPO/tests/rig/rig.sh"

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# blob_found N REPO DIGEST: node N's mirror answers 200 for HEAD of the blob (peer lookup).
blob_found() {
	local code
	code=$(node_exec "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 5 -I \
		"http://127.0.0.1:5080/v2/$2/blobs/$3?ns=$(upstream_ip)%3A$RIG_UPSTREAM_PORT" || true)
	[[ $code == 200 ]]
}

# all_found REPO DIGEST...: every other node finds every digest (polled; digests found stay
# found, so each is asked until it answers once).
wait_all_found() {
	local repo=$1 n d deadline=$((SECONDS + FIND_LIMIT_S))
	shift
	for n in 2 3; do
		for d in "$@"; do
			until blob_found "$n" "$repo" "$d"; do
				((SECONDS < deadline)) || { log "node $n never found $d of $repo"; return 1; }
				sleep 0.02
			done
		done
	done
}

run_line() {
	local line=$1 image repo ref digests t0 t1 t2 t3
	export RIG_CONTAINERD=$line
	bash "$RIG_HERE/rig.sh" up
	bash "$RIG_HERE/push-images.sh" $IMAGES >/dev/null
	for n in 1 2 3; do start_speculum "$n"; done
	for image in $IMAGES; do
		repo=$(jq -r --arg n "$image" '.images[] | select(.name == $n) | .repository' "$RIG_DIR/images.json")
		ref=$(jq -r --arg n "$image" '.images[] | select(.name == $n) | .refs.v1' "$RIG_DIR/images.json")
		mapfile -t digests < <(jq -r --arg n "$image" '.images[] | select(.name == $n) | .blobs[].digest' "$RIG_DIR/images.json")
		t0=$(now_ms)
		cri_pull 1 "$ref" >/dev/null
		t1=$(now_ms)
		wait_all_found "$repo" "${digests[@]}"
		t2=$(now_ms)
		# The same checks once more, all answering at once: the measurement's own floor.
		wait_all_found "$repo" "${digests[@]}"
		t3=$(now_ms)
		printf '%s\t%s\t%d\t%d\t%d\t%d\n' "$line" "$image" "${#digests[@]}" $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) |
			tee -a "$BENCH_OUT/advertise.tsv"
	done
	bash "$RIG_HERE/rig.sh" down
}

main() {
	require_root
	require_speculum
	mkdir -p "$BENCH_OUT"
	printf 'line\timage\tblobs\tpull_ms\tfound_after_end_ms\tcheck_floor_ms\n' | tee "$BENCH_OUT/advertise.tsv"
	exec 8>/tmp/speculum-rig.lock
	flock -w 900 8 || die "the rig lock is held by someone else"
	local line
	for line in $LINES; do
		run_line "$line" || { bash "$RIG_HERE/rig.sh" down; die "containerd $line failed"; }
	done
}

main
