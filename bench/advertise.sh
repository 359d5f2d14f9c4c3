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
#   sudo bench/advertise.sh backlog         start-up advertising of a node holding 10 k digests
#
# `backlog` (issue 19 item 5): node 1 holds `small:v1` (pulled through its mirror) and
# BENCH_BACKLOG_KEYS (10000) blobs in its blob cache, written to disk while its daemon is down;
# the daemon then starts and advertises them all. Measured from the daemon's start, on node 2
# (its mirror, as containerd asks): when the tag is first findable (HEAD by tag → upstream
# names the manifest, the DHT finds node 1 holding it), when BENCH_BACKLOG_SAMPLE sampled blobs
# (the last ones in announcement order plus random ones) are all findable; node 1's CPU-s
# (daemon, from /proc) and the bytes on its link by then, and nodes 2 and 3's CPU-s. Run for
# each `routing.publish_rate` in BENCH_BACKLOG_RATES ("0 500": unpaced, then 500 keys/s) in the
# same run; one JSON line each, in $BENCH_OUT/advertise-backlog.jsonl.
# Knobs: BENCH_LINES, BENCH_ADV_IMAGES (rig image names, default "big multi small docker"),
# RIG_BIG_MB (default here 64), SPECULUM_BIN, BENCH_OUT. Prints one TSV line per pull:
#   line  image  blobs  pull_ms  found_after_end_ms
# found_after_end_ms: when the last of nodes 2 and 3 found the last blob, minus the pull's end
# (negative: everything was findable before the pull returned). Polling resolution 10 ms.
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

# poll_found N REPO DIGEST...: inside node N, asks its mirror (HEAD of each blob, the way
# containerd asks) until every digest answers 200; prints the wall clock in ms when the last one
# first did. A miss costs the mirror's blob lookup budget (250 ms), so a new HEAD per digest
# starts every 100 ms while none has answered 200 (at most 3 in flight per digest): the
# resolution is about 100 ms plus one lookup (more polling loads the 2 cores enough to slow
# the pulls). Bounded by FIND_LIMIT_S.
poll_found() {
	local n=$1 repo=$2
	shift 2
	node_exec "$n" python3 - "$repo" "$(upstream_ip)%3A$RIG_UPSTREAM_PORT" "$FIND_LIMIT_S" "$@" <<-'PY'
		import http.client, sys, threading, time
		repo, ns, limit, digests = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
		deadline = time.time() + limit
		found = {}
		lock = threading.Lock()
		def head(d):
		    try:
		        c = http.client.HTTPConnection("127.0.0.1", 5080, timeout=5)
		        c.request("HEAD", f"/v2/{repo}/blobs/{d}?ns={ns}")
		        r = c.getresponse()
		        r.read()
		        c.close()
		        if r.status == 200:
		            now = time.time()
		            with lock:
		                found[d] = min(found.get(d, now), now)
		    except OSError:
		        pass
		def probe(d):
		    live = []
		    while d not in found and time.time() < deadline:
		        live = [t for t in live if t.is_alive()]
		        if len(live) < 3:
		            t = threading.Thread(target=head, args=(d,), daemon=True)
		            t.start()
		            live.append(t)
		        time.sleep(0.1)
		    for t in live:
		        t.join(6)
		probes = [threading.Thread(target=probe, args=(d,)) for d in digests]
		for p in probes:
		    p.start()
		for p in probes:
		    p.join()
		missing = [d for d in digests if d not in found]
		if missing:
		    sys.exit(f"not found within {limit}s: {missing}")
		print(int(max(found.values()) * 1000))
	PY
}

run_line() {
	local line=$1 image repo ref digests t0 t1 t2 p2 p3 f2 f3
	export RIG_CONTAINERD=$line
	bash "$RIG_HERE/rig.sh" up
	bash "$RIG_HERE/push-images.sh" $IMAGES >/dev/null
	for n in 1 2 3; do start_speculum "$n"; done
	for image in $IMAGES; do
		repo=$(jq -r --arg n "$image" '.images[] | select(.name == $n) | .repository' "$RIG_DIR/images.json")
		ref=$(jq -r --arg n "$image" '.images[] | select(.name == $n) | .refs.v1' "$RIG_DIR/images.json")
		mapfile -t digests < <(jq -r --arg n "$image" '.images[] | select(.name == $n) | .blobs[].digest' "$RIG_DIR/images.json")
		# Pollers on the other nodes first: a blob advertised before the pull ends counts.
		poll_found 2 "$repo" "${digests[@]}" >"$RIG_DIR/found2" &
		p2=$!
		poll_found 3 "$repo" "${digests[@]}" >"$RIG_DIR/found3" &
		p3=$!
		t0=$(now_ms)
		cri_pull 1 "$ref" >/dev/null
		t1=$(now_ms)
		wait "$p2" || die "node 2 did not find every blob of $image"
		wait "$p3" || die "node 3 did not find every blob of $image"
		f2=$(<"$RIG_DIR/found2")
		f3=$(<"$RIG_DIR/found3")
		t2=$((f2 > f3 ? f2 : f3))
		printf '%s\t%s\t%d\t%d\t%d\n' "$line" "$image" "${#digests[@]}" $((t1 - t0)) $((t2 - t1)) |
			tee -a "$BENCH_OUT/advertise.tsv"
	done
	bash "$RIG_HERE/rig.sh" down
}

# cpu_s NAME: user + system CPU seconds of a recorded rig process.
cpu_s() {
	local pid
	pid=$(<"$(pid_file "$1")")
	awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$pid/stat"
}

# link_bytes N: bytes sent + received on node N's link.
link_bytes() {
	ip -n "$(node_ns "$1")" -s -j link show eth0 | jq '.[0].stats64 | .rx.bytes + .tx.bytes'
}

# fill_cache DIR COUNT: COUNT distinct small blobs in a blob cache directory (named by their
# sha256, as the cache keeps them); prints their digests in the order the router announces a
# batch (sorted), one per line.
fill_cache() {
	python3 - "$1" "$2" <<-'PY'
		import hashlib, os, sys
		d, n = sys.argv[1], int(sys.argv[2])
		blobs = os.path.join(d, "blobs", "sha256")
		os.makedirs(blobs, exist_ok=True)
		out = []
		for i in range(n):
		    data = b"speculum advertise backlog blob %d\n" % i
		    h = hashlib.sha256(data).hexdigest()
		    with open(os.path.join(blobs, h), "wb") as f:
		        f.write(data)
		    out.append("sha256:" + h)
		print("\n".join(sorted(out)))
	PY
}

run_backlog() {
	local keys=${BENCH_BACKLOG_KEYS:-10000} sample=${BENCH_BACKLOG_SAMPLE:-40}
	local rates=${BENCH_BACKLOG_RATES:-0 500} rate repo ref tag d1 t0 t_tag t_all b0 c2 c3
	export RIG_CONTAINERD=${RIG_CONTAINERD:-2.3} RIG_NODES=3
	bash "$RIG_HERE/rig.sh" up
	bash "$RIG_HERE/push-images.sh" small >/dev/null
	repo=$(jq -r '.images[] | select(.name == "small") | .repository' "$RIG_DIR/images.json")
	ref=$(jq -r '.images[] | select(.name == "small") | .refs.v1' "$RIG_DIR/images.json")
	tag=${ref##*:}
	d1=$(node_dir 1)
	# Node 1 bootstraps from node 2, so its restarts rejoin at once.
	mkdir -p "$d1/data"
	speculum_config "$d1" n1 bootstrap="/ip4/$(node_ip 2)/tcp/5082" cache=1 >"$d1/speculum.yaml"
	for n in 2 3; do write_speculum_config "$n"; done
	for n in 1 2 3; do configure_node "$n" >/dev/null; done
	for n in 2 3 1; do start_speculum "$n"; done
	cri_pull 1 "$ref" >/dev/null
	poll_until 60 "node 2 finds $ref" mirror_finds 2 "$repo" "$tag" || die "node 2 never found $ref"
	stop_speculum 1
	fill_cache "$d1/cache" "$keys" >"$RIG_DIR/backlog.txt"
	# The last keys of the announcement order, and random ones.
	mapfile -t picks < <({ tail -n $((sample / 2)) "$RIG_DIR/backlog.txt"; shuf -n $((sample / 2)) --random-source=<(yes) "$RIG_DIR/backlog.txt"; } | sort -u)
	: >"$BENCH_OUT/advertise-backlog.jsonl"
	for rate in $rates; do
		c2=$(cpu_s n2-speculum)
		c3=$(cpu_s n3-speculum)
		b0=$(link_bytes 1)
		t0=$(now_ms)
		SPECULUM_ROUTING_PUBLISH_RATE=$rate start_speculum 1
		poll_until 120 "node 2 finds the tag" mirror_finds 2 "$repo" "$tag" || die "tag never findable"
		t_tag=$(now_ms)
		t_all=$(poll_found 2 "$repo" "${picks[@]}") || die "sampled blobs not all findable"
		jq -nc --argjson rate "$rate" --argjson keys "$keys" --argjson sample "${#picks[@]}" \
			--argjson tag_ms $((t_tag - t0)) --argjson all_ms $((t_all - t0)) \
			--argjson cpu1 "$(cpu_s n1-speculum)" \
			--argjson cpu2 "$(awk -v a="$c2" -v b="$(cpu_s n2-speculum)" 'BEGIN { printf "%.2f", b - a }')" \
			--argjson cpu3 "$(awk -v a="$c3" -v b="$(cpu_s n3-speculum)" 'BEGIN { printf "%.2f", b - a }')" \
			--argjson bytes $(($(link_bytes 1) - b0)) --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
			'{publish_rate: $rate, keys: $keys, sampled: $sample, tag_findable_ms: $tag_ms,
			  sample_findable_ms: $all_ms, node1_cpu_s: $cpu1, node2_cpu_s: $cpu2,
			  node3_cpu_s: $cpu3, node1_link_bytes: $bytes, load: $load}' |
			tee -a "$BENCH_OUT/advertise-backlog.jsonl"
		# Graceful: node 1 closes its connections, so nodes 2 and 3 drop its records with them
		# and the next round starts from nothing findable.
		stop_speculum 1
	done
	bash "$RIG_HERE/rig.sh" down
}

main() {
	require_root
	require_speculum
	mkdir -p "$BENCH_OUT"
	printf 'line\timage\tblobs\tpull_ms\tfound_after_end_ms\n' | tee "$BENCH_OUT/advertise.tsv"
	exec 8>"${BENCH_LOCK:-/tmp/speculum-rig.lock}"
	flock -w 900 8 || die "the rig lock is held by someone else"
	if [[ ${1:-} == backlog ]]; then
		run_backlog || { bash "$RIG_HERE/rig.sh" down; die "backlog run failed"; }
		return
	fi
	local line
	for line in $LINES; do
		run_line "$line" || { bash "$RIG_HERE/rig.sh" down; die "containerd $line failed"; }
	done
}

main "$@"
