#!/usr/bin/env bash
# scale.sh — rollouts on N namespace nodes with shaped links: is a rollout bounded by one
# holder's uplink, or by the node count? (issue 19 item 6)
#
# One job: for each N in BENCH_SCALE_NODES, a rig of N nodes, each with its own containerd and
# speculum daemon, links shaped with tc tbf so the 2 cores are not the limit (node links
# BENCH_NODE_RATE, default 200mbit; the upstream link BENCH_UPSTREAM_RATE, default 50mbit), and
# real CRI pulls of one image in these scenarios, every one in the same run:
#   single  direct     node 1 alone pulls from upstream (the reference for create)
#   update  direct     nodes 2..N pull from upstream at once (the reference for update)
#   create  direct     all N pull from upstream at once
#   update  off / on   node 1 holds the image (pulled through its daemon), nodes 2..N pull at once
#   create  off / on   all N pull the cold image at once
# `off` is speculum without the blob cache (peers serve what containerd holds); `on` is
# speculum with `cache.enabled` (the coalescing cache today; swarm's tee rides on the same
# keys once merged), every cache emptied before each scenario.
# For the speculum scenarios it also records each node daemon's CPU-s, peak RSS (VmHWM) and
# bytes served (to containerd and to peers) since its restart before the scenario, and for each
# pull set the physical bound: image bytes / node link rate.
#
#   sudo bench/scale.sh                           N = 4 8 16, a 50 MB image in 4 layers
#   sudo BENCH_SCALE_NODES="4 8 16 24" bench/scale.sh
#   sudo bench/scale.sh summary                   the table from $BENCH_OUT/scale.jsonl
# Knobs: BENCH_SCALE_NODES ("4 8 16"), BENCH_IMAGE (SIZE_MB:LAYERS of bench/mkbench.py, "50:4"),
# BENCH_NODE_RATE, BENCH_UPSTREAM_RATE, BENCH_SCALE_MODES ("direct off on"), BENCH_OUT
# (default $RIG_DIR/scale), SPECULUM_BIN, RIG_DIR / RIG_NS_PREFIX / RIG_SUBNET. Results: one
# JSON line per pull set in $BENCH_OUT/scale.jsonl (fields of bench/cluster.sh plus `nodes`),
# one per node daemon in $BENCH_OUT/daemons.jsonl, and $BENCH_OUT/scale.md.
# Memory: each node costs one containerd and one daemon (≈ 60–120 MB together with their page
# cache); a size that does not fit MemAvailable (BENCH_NODE_MB per node, default 300) is skipped
# and said so.

set -euo pipefail
SCALE_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
SCALE_NODES=${BENCH_SCALE_NODES:-4 8 16}
export BENCH_IMAGES=${BENCH_IMAGE:-50:4}
export BENCH_NODE_RATE=${BENCH_NODE_RATE:-200mbit}
export BENCH_UPSTREAM_RATE=${BENCH_UPSTREAM_RATE:-50mbit}
SCALE_MODES=${BENCH_SCALE_MODES:-direct off on}
NODE_MB=${BENCH_NODE_MB:-300}

# rate_bytes RATE: a tc rate (200mbit, 1gbit) in bytes per second.
rate_bytes() {
	awk -v r="$1" 'BEGIN {
		n = r + 0; u = tolower(substr(r, length(n "") + 1))
		m = (u == "gbit") ? 1e9 : (u == "mbit") ? 1e6 : (u == "kbit") ? 1e3 : 1
		printf "%.0f\n", n * m / 8 }'
}

# scale_one N: one rig of N nodes, every scenario; runs in a subshell (cluster.sh's globals
# are per N).
scale_one() {
	local nodes=$1
	export BENCH_NODES=$nodes RIG_NODES=$nodes
	# shellcheck source=cluster.sh
	source "$SCALE_HERE/cluster.sh"
	RESULTS=$SCALE_OUT/scale.jsonl
	take_rig_lock
	trap 'cmd_down >/dev/null 2>&1 || true' EXIT
	cmd_up
	local image name ref digest bytes layers n
	image=$(push_bench_images "$BENCH_IMAGES")
	read -r name ref digest bytes layers <<<"$image"
	LAYERS=$layers
	tbf "$BENCH_UPSTREAM_RATE" "$RIG_BRIDGE_NS" v-up
	tbf "$BENCH_UPSTREAM_RATE" "$RIG_UP_NS" eth0
	for ((n = 1; n <= NODES; n++)); do
		shape_node "$n" "$BENCH_NODE_RATE"
		write_upstream_hosts "$n"
		cp "$(hosts_file "$n")" "$(node_dir "$n")/hosts.direct.toml"
		write_speculum_config "$n"
		configure_node "$n" >/dev/null
		cp "$(hosts_file "$n")" "$(node_dir "$n")/hosts.speculum.toml"
	done
	# Started the way restart_daemons does (robust to a just-forked PID), all knowing each other.
	restart_daemons 0
	log "N=$nodes: $name, $bytes bytes; $(nproc) cores; MemAvailable $(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo) MiB"
	local repo out
	repo=${ref#*/}
	repo=${repo%:*}
	scale_record() { record "$1" "$2" "$name" 1 "$3" >/dev/null; tag_nodes "$bytes"; }
	if [[ " $SCALE_MODES " == *" direct "* ]]; then
		set_mode direct
		GETS_BEFORE=$(layer_gets)
		out=$(pull_many "$ref" 1)
		scale_record single direct "$out"
		wipe_all
		GETS_BEFORE=$(layer_gets)
		# shellcheck disable=SC2046
		out=$(pull_many "$ref" $(others))
		scale_record update direct "$out"
		wipe_all
		GETS_BEFORE=$(layer_gets)
		# shellcheck disable=SC2046
		out=$(pull_many "$ref" $(all_nodes))
		scale_record create direct "$out"
		wipe_all
	fi
	set_mode speculum
	local mode cache
	for mode in off on; do
		[[ " $SCALE_MODES " == *" $mode "* ]] || continue
		cache=0
		[[ $mode == off ]] || cache=1
		restart_daemons "$cache"
		poll_until "$RIG_TIMEOUT" "records of $repo to be withdrawn" not_found_anywhere "$repo" "$digest" ||
			die "some node still finds $repo@$digest"
		pull_many "$ref" 1 >/dev/null
		for n in $(others); do
			poll_until "$RIG_TIMEOUT" "node $n to find $repo" mirror_finds "$n" "$repo" v1 ||
				die "node $n never found node 1's $repo"
			for d in ${LAYERS//,/ }; do
				poll_until "$RIG_TIMEOUT" "node $n to find layer $d" mirror_blob_finds "$n" "$repo" "$d" ||
					die "node $n never found node 1's layer $d"
			done
		done
		GETS_BEFORE=$(layer_gets)
		# shellcheck disable=SC2046
		out=$(pull_many "$ref" $(others))
		scale_record update "$mode" "$out"
		daemon_stats "$nodes" update "$mode"
		wipe_all
		restart_daemons "$cache" # empty caches: the create is cold everywhere
		poll_until "$RIG_TIMEOUT" "records of $repo to be withdrawn" not_found_anywhere "$repo" "$digest" ||
			die "some node still finds $repo@$digest"
		GETS_BEFORE=$(layer_gets)
		# shellcheck disable=SC2046
		out=$(pull_many "$ref" $(all_nodes))
		scale_record create "$mode" "$out"
		daemon_stats "$nodes" create "$mode"
		wipe_all
	done
}

# tag_nodes BYTES: adds `nodes`, `bytes` and the physical bound to the line `record` just wrote.
tag_nodes() {
	local tmp bound
	bound=$(awk -v b="$1" -v r="$(rate_bytes "$BENCH_NODE_RATE")" 'BEGIN { printf "%.0f", b / r * 1000 }')
	tmp=$(mktemp)
	head -n -1 "$RESULTS" >"$tmp"
	tail -n 1 "$RESULTS" | jq -c --argjson n "$NODES" --argjson b "$1" --argjson bound "$bound" \
		'. + {nodes: $n, bytes: $b, bound_ms: $bound}' | tee -a "$tmp"
	mv "$tmp" "$RESULTS"
}

# daemon_stats N SCENARIO MODE: CPU-s, peak RSS and bytes served (to containerd and to peers)
# of every node's daemon since its last restart, i.e. over that one scenario.
daemon_stats() {
	local n pid served
	for ((n = 1; n <= $1; n++)); do
		pid=$(<"$(pid_file "n$n-speculum")")
		served=$(metric_sum "$n" speculum_served_bytes_total)
		awk -v hz="$(getconf CLK_TCK)" -v n="$n" -v N="$1" -v served="$served" -v s="$2" -v m="$3" \
			-v hwm="$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")" \
			'{ printf "{\"nodes\":%d,\"node\":%d,\"scenario\":\"%s\",\"mode\":\"%s\",\"cpu_s\":%.2f,\"rss_hwm_kib\":%d,\"served_bytes\":%d}\n",
			   N, n, s, m, ($14 + $15) / hz, hwm, served }' "/proc/$pid/stat" | tee -a "$SCALE_OUT/daemons.jsonl"
	done
}

summary() {
	jq -rs --arg rate "$BENCH_NODE_RATE" --arg up "$BENCH_UPSTREAM_RATE" '
		def one($n; $s; $m): [.[] | select(.nodes == $n and .scenario == $s and .mode == $m)][0];
		def t($r): if $r == null then "-" else "\($r.max_ms / 1000 * 100 | round / 100) s" end;
		def x($a; $b): if $a == null or $b == null or $b.max_ms == 0 then "-" else "\($a.max_ms / $b.max_ms * 100 | round / 100)×" end;
		def xb($a): if $a == null then "-" else "\($a.max_ms / $a.bound_ms * 10 | round / 10)×" end;
		. as $all | ([.[].nodes] | unique) as $ns |
		"node links \($rate), upstream \($up); s = slowest node; ×bound = time / (image bytes / node link rate)",
		"",
		"| N | bound | single direct | update direct | update off | update on | create direct | create off | create on |",
		"|---|---|---|---|---|---|---|---|---|",
		($ns[] as $n | $all |
		 one($n; "single"; "direct") as $d1 | one($n; "update"; "direct") as $ud |
		 one($n; "update"; "off") as $uf | one($n; "update"; "on") as $uo |
		 one($n; "create"; "direct") as $cd | one($n; "create"; "off") as $cf | one($n; "create"; "on") as $co |
		 ([.[] | select(.nodes == $n)][0].bound_ms / 1000) as $b |
		 "| \($n) | \($b) s | \(t($d1)) | \(t($ud)) | \(t($uf)) = \(x($uf; $ud)) direct, \(xb($uf)) bound | \(t($uo)) = \(x($uo; $ud)), \(xb($uo)) | \(t($cd)) = \(x($cd; $d1)) lone | \(t($cf)) = \(x($cf; $d1)) | \(t($co)) = \(x($co; $d1)), \(xb($co)) |")
	' "$SCALE_OUT/scale.jsonl"
	if [[ -s $SCALE_OUT/daemons.jsonl ]]; then
		echo
		echo "| N | scenario | daemon CPU-s, mean / max | peak RSS MiB, mean / max | CPU-s per GB served (cluster) |"
		echo "|---|---|---|---|---|"
		jq -rs 'group_by([.nodes, .scenario, .mode])[] | . as $g | ($g | length) as $k |
			"| \($g[0].nodes) | \($g[0].scenario) \($g[0].mode) | \(([$g[].cpu_s] | add / $k * 10 | round / 10)) / \([$g[].cpu_s] | max) | \(([$g[].rss_hwm_kib] | add / $k / 1024 | round)) / \(([$g[].rss_hwm_kib] | max) / 1024 | round) | \(if ([$g[].served_bytes] | add) > 1e7 then ([$g[].cpu_s] | add) / (([$g[].served_bytes] | add) / 1e9) * 100 | round / 100 else "-" end) |"' \
			"$SCALE_OUT/daemons.jsonl"
	fi
}

main() {
	[[ $(id -u) -eq 0 ]] || { echo "scale.sh: needs root" >&2; exit 1; }
	SCALE_OUT=${BENCH_OUT:-${RIG_DIR:-/tmp/speculum-rig}/scale}
	export SCALE_OUT BENCH_OUT=$SCALE_OUT
	if [[ ${1:-} == summary ]]; then summary; return; fi
	mkdir -p "$SCALE_OUT"
	: >"$SCALE_OUT/scale.jsonl"
	: >"$SCALE_OUT/daemons.jsonl"
	local n avail
	for n in $SCALE_NODES; do
		avail=$(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo)
		if ((n * NODE_MB > avail)); then
			echo "scale.sh: N=$n skipped: needs ~$((n * NODE_MB)) MiB, MemAvailable $avail MiB" |
				tee -a "$SCALE_OUT/skipped.txt" >&2
			continue
		fi
		(scale_one "$n") || { echo "scale.sh: N=$n failed" >&2; exit 1; }
	done
	summary | tee "$SCALE_OUT/scale.md"
}

main "$@"
