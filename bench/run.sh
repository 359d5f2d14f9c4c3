#!/usr/bin/env bash
# run.sh — the whole benchmark set (`make bench`), or a tiny version of it (`make bench-smoke`).
#
# One job: build what the benchmarks need, run each benchmark with its reference in the same
# run, and leave every result under BENCH_OUT (default bench/results/<UTC timestamp>):
#   serving.sh   CPU-s/GB vs nginx sendfile, peak RSS at 1 and 50 streams, HEAD p50/p99 vs
#                the distribution registry                                    (~2 min)
#   cluster.sh   update/create pulls on 4 namespace nodes: speculum vs direct vs pull-through
#                cache                                         (~12 min for 10 and 200 MB)
#   dht.sh       100-node DHT simulation: lookups, advertising 10 k digests    (≤ 5 min)
#   hot_paths    criterion benches of per-request parsing and verification      (~1 min)
#   webhook      webhook/tests/offline/measure.rs (resolution cached/uncached, one Rego decision)
# BENCH_SMOKE=1 shrinks every one of them (about 3 minutes in all) so the scripts cannot rot.
# Needs root (namespaces, containerd). Every step is bounded by `timeout`.

set -euo pipefail
BENCH_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
cd "$BENCH_HERE/.."
export BENCH_OUT=${BENCH_OUT:-$PWD/bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$BENCH_OUT"
log() { printf '\n== %s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

{
	echo "date: $(date -u +%FT%TZ)"
	echo "machine: $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r)"
	echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) (+ uncommitted changes: $(git status --short 2>/dev/null | wc -l) files)"
} | tee "$BENCH_OUT/machine.txt"

if [[ ${BENCH_SMOKE:-} == 1 ]]; then
	export SPECULUM_BIN=${SPECULUM_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/speculum}
	log "smoke: building the debug daemon"
	cargo build --bin speculum
	log "smoke: serving"
	BENCH_BLOB_MB=8 BENCH_ROUNDS=1 BENCH_GETS=3 BENCH_STREAMS=4 BENCH_HEADS=100 \
		timeout 300 bench/serving.sh >/dev/null
	log "smoke: cluster"
	BENCH_IMAGES=1:1 BENCH_NODES=2 timeout 900 bench/cluster.sh
	log "smoke: dht"
	SIM_NODES=12 SIM_SMALL=3 SIM_KEYS=200 SIM_LOOKUPS=30 SIM_DEADLINE_S=60 timeout 600 bench/dht.sh >/dev/null
	log "smoke: hot paths (a tenth of a second each)"
	timeout 600 cargo bench --bench hot_paths -- --warm-up-time 0.05 --measurement-time 0.1 >/dev/null
	log "smoke ok; results in $BENCH_OUT"
	exit 0
fi

export SPECULUM_BIN=${SPECULUM_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/speculum}
log "building the release daemon"
started=$SECONDS
cargo build --release --bin speculum
echo "cargo build --release (incremental from whatever target/ held): $((SECONDS - started)) s" | tee -a "$BENCH_OUT/machine.txt"
log "serving cost, RSS, HEAD latency"
timeout 900 bench/serving.sh >/dev/null
log "cluster pulls"
timeout 3600 bench/cluster.sh
log "DHT simulation"
timeout 900 bench/dht.sh | tee "$BENCH_OUT/dht_sim.txt"
log "hot paths (criterion)"
timeout 900 cargo bench --bench hot_paths -- --quick | tee "$BENCH_OUT/hot_paths.txt"
log "webhook measurements"
timeout 900 cargo test -p speculum-webhook --test offline measure:: -- --ignored --nocapture 2>&1 | tee "$BENCH_OUT/webhook.txt"
log "done; results in $BENCH_OUT"
