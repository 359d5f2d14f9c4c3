#!/usr/bin/env bash
# faults.sh — the fault matrix on the namespace rig: real containerd, real CRI pulls, speculum
# on every node, and one fault at a time. The claim under test: **a pull never fails because
# of us**. Every pull must succeed on the first PullImage (no retries) and every pulled image is
# verified by digest (the repo digest CRI reports, and every blob re-hashed from the node's
# content store).
#
#   sudo tests/rig/faults.sh            (or `make faults`; ≈ 3–6 min)
#
# Scenarios (see ROBUSTNESS.md for results):
#   baseline         node 1 pulls everything through its mirror (misses → upstream), nodes 2, 3
#                    pull it again (bytes from peers)
#   peer-killed      node 1's daemon SIGKILLed while node 2 streams `big` from it
#   local-killed     node 3's own daemon SIGKILLed: containerd must fall back to upstream
#   partitioned      node 1's link down while nodes 2 and 3 pull what the DHT says node 1 has
#   slow-peer        node 1's peer port behind a user-space delaying proxy (no netem here)
#   upstream-down    registry stopped; the cluster holds the content
#   containerd-restart  node 2's containerd restarted under its running daemon
#   daemon-restart   node 2's daemon restarted: same peer id, records re-advertised
#
# Takes the machine-wide rig lock (/tmp/speculum-rig.lock) unless an ancestor holds it (or
# SPECULUM_RIG_LOCK_HELD=1 says a caller does). Writes one line per pull to $RIG_DIR/faults.tsv.

set -euo pipefail
# Three nodes whatever the last `rig.sh up` recorded: the scenarios name nodes 1-3.
export RIG_NODES=${RIG_NODES:-3}
# shellcheck source=rig.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/rig.sh"

export RIG_BIG_MB=${RIG_BIG_MB:-32}
FAULTS_MIN_PULLS=${FAULTS_MIN_PULLS:-50}
RESULTS=$RIG_DIR/faults.tsv
PULLS=0
FAILS=0
FAILED=()

require_root
# Inside `flock /tmp/speculum-rig.lock …` an ancestor holds it already: locking again would wait
# for ourselves.
if [[ ${SPECULUM_RIG_LOCK_HELD:-0} != 1 ]] && ! lock_held_by_ancestor /tmp/speculum-rig.lock; then
	# fd 9: the rig starts its daemons with fd 9 closed, so none of them inherits the lock.
	exec 9>/tmp/speculum-rig.lock
	log "waiting for the machine-wide rig lock"
	flock -w "${FAULTS_LOCK_WAIT:-1800}" 9 || die "the rig lock stayed busy for ${FAULTS_LOCK_WAIT:-1800} s"
fi

# image_field NAME JQ: a field of one image from push-images.sh's record.
image_field() { jq -r --arg n "$1" ".images[] | select(.name == \$n) | $2" "$RIG_DIR/images.json"; }

# reset_node N: forget every image and let containerd's GC drop the content, so the next pull
# fetches everything again.
reset_node() {
	local n=$1 names
	names=$(ctr_node "$n" images ls -q 2>/dev/null || true)
	if [[ -n $names ]]; then
		# shellcheck disable=SC2086
		ctr_node "$n" images rm --sync $names >/dev/null 2>&1 || true
	fi
}

# verified N NAME OUT: the CRI result names the pushed digest, and every blob of the image's
# closure re-hashes correctly from node N's content store.
verified() {
	local n=$1 name=$2 out=$3 digest repo blob
	digest=$(image_field "$name" .digest)
	repo=$(image_field "$name" .repository)
	jq -e --arg want "$(upstream_host)/$repo@$digest" '.repo_digests | index($want) != null' <<<"$out" >/dev/null ||
		{ log "$name on node $n: repo digests $(jq -c .repo_digests <<<"$out"), want $digest"; return 1; }
	for blob in $(image_field "$name" '.blobs[].digest'); do
		content_verify "$n" "$blob" || { log "$name on node $n: blob $blob missing or corrupt"; return 1; }
	done
}

# pull SCENARIO N NAME [by-digest]: one CRI pull, verified; recorded either way.
pull() {
	local scenario=$1 n=$2 name=$3 how=${4:-tag} ref out status=ok started=$SECONDS
	if [[ $how == by-digest ]]; then ref=$(image_field "$name" .by_digest); else ref=$(image_field "$name" '.refs | to_entries[0].value'); fi
	PULLS=$((PULLS + 1))
	if out=$(cri_pull "$n" "$ref" 2>&1) && verified "$n" "$name" "$out"; then
		log "pull ok   [$scenario] node $n $ref ($(jq -r .elapsed_ms <<<"$out") ms)"
	else
		status=failed
		FAILS=$((FAILS + 1))
		FAILED+=("[$scenario] node $n $ref: $out")
		log "pull FAIL [$scenario] node $n $ref: $out"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%ss\n' "$scenario" "$n" "$ref" "$how" "$status" "$((SECONDS - started))" >>"$RESULTS"
}

SMALL=(small docker multi tags)
ALL=(small docker multi tags big)

# --- the slow peer: a user-space delaying proxy in front of node 1's peer port -----------------
# Node 1's daemon moves its peer listener to 127.0.0.1:5081 (the port must stay the advertised
# one: config validation insists); the proxy listens on node 1's bridge address, port 5081, and
# forwards to it with a delay.
PROXY_PY='
import asyncio, sys
DELAY, CHUNK_DELAY, LISTEN = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
async def pipe(r, w, first_delay, per_chunk):
    try:
        first = True
        while data := await r.read(65536):
            await asyncio.sleep(first_delay if first else per_chunk)
            first = False
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", 5081)
    except Exception:
        cw.close(); return
    await asyncio.gather(pipe(cr, uw, 0, 0), pipe(ur, cw, DELAY, CHUNK_DELAY))
async def main():
    server = await asyncio.start_server(handle, LISTEN, 5081)
    async with server:
        await server.serve_forever()
asyncio.run(main())
'

slow_peer_on() {
	stop_speculum 1
	sed -i 's/^  peer_listen: .*/  peer_listen: "127.0.0.1:5081"/' "$(node_dir 1)/speculum.yaml"
	restart_speculum 1
	start_bg n1-slowproxy "$(node_ns 1)" "$(node_dir 1)/slowproxy.log" \
		python3 -c "$PROXY_PY" 0.3 0.01 "$(node_ip 1)" "$RIG_DIR/"
	poll_until "$RIG_TIMEOUT" "the slow proxy" node_exec 1 bash -c "exec 3<>/dev/tcp/$(node_ip 1)/5081"
}

slow_peer_off() {
	stop_pid n1-slowproxy TERM 10
	stop_speculum 1
	sed -i 's/^  peer_listen: .*/  peer_listen: "0.0.0.0:5081"/' "$(node_dir 1)/speculum.yaml"
	restart_speculum 1
}

# restart_speculum N: start_speculum, tolerating its early "exited" verdict: right after the
# fork, before `ip netns exec` has exec'd, the recorded PID's command line does not name the rig
# dir yet, so rig.sh's is_running can say "not running" for a daemon that is starting. Readiness
# is then checked here (bounded).
restart_speculum() {
	(start_speculum "$1") || true
	poll_until "$RIG_TIMEOUT" "speculum on node $1 ready" speculum_ready "$1" ||
		die "speculum on node $1 did not become ready; see $(node_dir "$1")/speculum.log"
}

big_arriving() { (($(ingest_bytes "$1") > 1048576)); }

peer_id() { grep -o '"peer.id":"[^"]*"' "$(node_dir "$1")/speculum.log" | tail -1 | cut -d'"' -f4; }

finish() {
	local rc=$?
	set +e
	stop_pid n1-slowproxy TERM 10 2>/dev/null
	cmd_down >/dev/null 2>&1
	exit "$rc"
}

main() {
	local n name pid_before
	# cmd_up/cmd_down directly: `rig.sh up` would take $RIG_DIR.lock, which by default is the
	# very lock this script already holds (flock on a second descriptor would wait for us).
	check_rig_dir
	cmd_up
	trap finish EXIT
	bash "$RIG_HERE/push-images.sh" >/dev/null
	: >"$RESULTS"
	for n in 1 2 3; do
		write_speculum_config "$n"
		configure_node "$n" >/dev/null
		restart_speculum "$n"
	done

	# baseline: misses go upstream; then the same images from peers, by tag and by digest.
	for name in "${ALL[@]}"; do pull baseline 1 "$name"; done
	for name in "${ALL[@]}"; do
		poll_until "$RIG_TIMEOUT" "node 2 to find $name" mirror_finds 2 "$(image_field "$name" .repository)" "$(image_field "$name" .digest)"
	done
	for name in "${ALL[@]}"; do pull baseline 2 "$name"; done
	for name in "${ALL[@]}"; do pull baseline 3 "$name" by-digest; done

	# peer-killed: node 2 streams big from node 1 (link shaped so it takes seconds); node 1's
	# daemon is SIGKILLed once part of the layer has arrived.
	for round in 1 2; do
		reset_node 2
		shape_node 1 "${FAULTS_KILL_RATE:-200mbit}"
		reset_node 3
		stop_speculum 3 KILL # node 3 must not be the one serving big
		# The killer waits in the background (bounded) for part of the layer to arrive.
		(
			poll_until 60 "part of big on node 2" big_arriving 2 || true
			stop_speculum 1 KILL
		) &
		local killer=$!
		pull peer-killed 2 big
		wait "$killer" || true
		unshape_node 1
		restart_speculum 1
		restart_speculum 3
		# node 3 pulls again from the cluster so it holds content for later scenarios.
		for name in "${SMALL[@]}"; do pull peer-killed 3 "$name"; done
		: "$round"
	done

	# local-killed: node 3's own daemon is gone; containerd falls back to upstream.
	stop_speculum 3 KILL
	reset_node 3
	for name in "${ALL[@]}"; do pull local-killed 3 "$name"; done
	restart_speculum 3

	# partitioned: node 1 drops off the network while the DHT still lists it.
	ip -n "$(node_ns 1)" link set eth0 down
	reset_node 2
	for name in "${ALL[@]}"; do pull partitioned 2 "$name"; done
	ip -n "$(node_ns 1)" link set eth0 up

	# slow-peer: only node 1 (behind the proxy) holds the small images.
	slow_peer_on
	reset_node 2
	reset_node 3
	for name in "${SMALL[@]}"; do pull slow-peer 2 "$name"; done
	for name in "${SMALL[@]}"; do pull slow-peer 3 "$name" by-digest; done
	slow_peer_off

	# upstream-down: the cluster holds everything; node 3 pulls from peers only.
	stop_upstream
	reset_node 3
	for name in "${SMALL[@]}"; do
		poll_until "$RIG_TIMEOUT" "node 3 to find $name" mirror_finds 3 "$(image_field "$name" .repository)" "$(image_field "$name" .digest)"
	done
	for name in "${ALL[@]}"; do pull upstream-down 3 "$name"; done
	start_upstream

	# containerd-restart: the daemon must survive and reconnect, not crash-loop.
	pid_before=$(owned_pid n2-speculum)
	stop_pid n2-containerd TERM
	start_containerd 2
	wait_containerd 2
	poll_until "$RIG_TIMEOUT" "node 2's daemon ready again" speculum_ready 2 ||
		die "node 2's daemon not ready after containerd restarted"
	[[ $(owned_pid n2-speculum) == "$pid_before" ]] || die "node 2's daemon restarted (or died) with containerd"
	reset_node 2
	for name in "${SMALL[@]}"; do pull containerd-restart 2 "$name"; done
	reset_node 3
	stop_upstream
	for name in "${SMALL[@]}"; do
		poll_until "$RIG_TIMEOUT" "node 3 to find $name" mirror_finds 3 "$(image_field "$name" .repository)" "$(image_field "$name" .digest)"
	done
	for name in "${SMALL[@]}"; do pull containerd-restart 3 "$name" by-digest; done
	start_upstream

	# daemon-restart: same identity; its records come back so node 3 can pull from it alone.
	local id_before id_after
	id_before=$(peer_id 2)
	stop_speculum 2
	restart_speculum 2
	id_after=$(peer_id 2)
	[[ -n $id_before && $id_before == "$id_after" ]] || die "node 2's peer id changed: $id_before → $id_after"
	stop_speculum 1
	stop_upstream
	reset_node 3
	for name in "${SMALL[@]}"; do
		poll_until "$RIG_TIMEOUT" "node 3 to find $name via node 2" mirror_finds 3 "$(image_field "$name" .repository)" "$(image_field "$name" .digest)"
	done
	for name in "${SMALL[@]}"; do pull daemon-restart 3 "$name"; done
	start_upstream
	restart_speculum 1

	log "fault matrix: $PULLS pulls, $FAILS failed (details in $RESULTS)"
	awk -F'\t' '{ n[$1]++; if ($5 != "ok") f[$1]++ } END { for (s in n) printf "  %-20s %3d pulls, %d failed\n", s, n[s], f[s] + 0 }' "$RESULTS" >&2
	((FAILS == 0)) || { printf '%s\n' "${FAILED[@]}" >&2; die "$FAILS pulls failed"; }
	((PULLS >= FAULTS_MIN_PULLS)) || die "only $PULLS pulls (want ≥ $FAULTS_MIN_PULLS)"
	log "fault matrix passed"
}

main "$@"
