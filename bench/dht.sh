#!/usr/bin/env bash
# dht.sh — runs the in-process DHT simulation (benches/dht_sim.rs) in a network namespace of
# its own, so the loopback byte count it reports is its traffic alone.
#
# One job: build the simulation with the bench profile, then run it bounded inside
# `spbench-dht-<pid>` (only `lo`, up). Knobs are the simulation's (SIM_NODES, SIM_SMALL,
# SIM_KEYS, SIM_ADVERTISERS, SIM_LOOKUPS, SIM_HOPS, SIM_DEADLINE_S) plus BENCH_OUT.
#
#   sudo bench/dht.sh
# Without root it runs in the host namespace (bytes then include others' loopback traffic).

set -euo pipefail
BENCH_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
export BENCH_OUT=${BENCH_OUT:-/tmp/speculum-bench}
NS=spbench-dht-$$

log() { printf '%s dht: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cd "$BENCH_HERE/.."
exe=$(cargo bench --bench dht_sim --no-run 2>&1 | tee /dev/stderr |
	sed -n 's/.*Executable .*(\(.*dht_sim-[0-9a-f]*\)).*/\1/p' | tail -1)
[[ -x $exe ]] || { log "could not find the dht_sim executable"; exit 1; }
mkdir -p "$BENCH_OUT"
# A node keeps a connection per peer it talks to; 100+ nodes in one process need more than the
# usual 1024 descriptors.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [[ $(id -u) -eq 0 ]]; then
	trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
	ip netns add "$NS"
	ip -n "$NS" link set lo up
	# 127.77.0.0/16 is loopback already (all of 127/8 is); nothing else is needed.
	timeout "$((${SIM_DEADLINE_S:-300} + 120))" ip netns exec "$NS" "$exe" --bench
else
	log "not root: running in the host namespace (byte counts include other loopback traffic)"
	timeout "$((${SIM_DEADLINE_S:-300} + 120))" "$exe" --bench
fi
