#!/usr/bin/env bash
# selftest.sh — proves the rig without the daemon: images are deterministic, every image pulls
# from the upstream registry with ctr and with CRI PullImage and lands with the pushed digest,
# and `down` leaves nothing behind, even after a crash.
#
# One job: check the rig itself (tests of speculum live in tests/rig/cluster.rs). Prints a timing
# table at the end. Exit status 0 only when every check passed.
#
#   sudo tests/rig/selftest.sh          (RIG_BIG_MB=8 for a quick run; default 200)

set -euo pipefail
# shellcheck source=rig.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/rig.sh"

PASSED=0
FAILED=0
TIMINGS=()

now_ms() { echo $(($(date +%s%N) / 1000000)); }

check() {
	local what=$1
	shift
	if "$@"; then
		PASSED=$((PASSED + 1))
	else
		FAILED=$((FAILED + 1))
		log "FAIL: $what"
	fi
}

# timed LABEL CMD...: runs CMD, records how long it took.
timed() {
	local label=$1 t0 rc=0
	shift
	t0=$(now_ms)
	"$@" || rc=$?
	TIMINGS+=("$(printf '%-52s %8d ms' "$label" $(($(now_ms) - t0)))")
	return "$rc"
}

cleanup() {
	local rc=$?
	"$RIG_SELF" down >/dev/null 2>&1 || true
	exit "$rc"
}

# digests_of DIR: the image digests mkimages.py predicted in DIR.
digests_of() { jq -r '.images[] | "\(.name) \(.digest)"' "$1/layouts.json"; }

check_deterministic() {
	local a b
	a=$(mktemp -d)
	b=$(mktemp -d)
	RIG_BIG_MB=1 python3 "$RIG_HERE/mkimages.py" "$a" >/dev/null
	RIG_BIG_MB=1 python3 "$RIG_HERE/mkimages.py" "$b" >/dev/null
	local ok=0
	if [[ $(digests_of "$a/v3-big1") == "$(digests_of "$b/v3-big1")" ]] &&
		diff -r "$a/v3-big1/small/blobs" "$b/v3-big1/small/blobs" >/dev/null; then
		ok=1
	fi
	rm -rf "$a" "$b"
	((ok == 1))
}

# ctr_pull_checked N REF WANT_DIGEST: ctr pull through the node's hosts.toml, then compare.
ctr_pull_checked() {
	local n=$1 ref=$2 want=$3 got
	ctr_pull "$n" "$ref" >>"$RIG_DIR/selftest-ctr.log" 2>&1 || { log "ctr pull $ref on node $n failed"; return 1; }
	got=$(image_digest "$n" "$ref")
	[[ $got == "$want" ]] || { log "node $n: $ref is $got, want $want"; return 1; }
}

# cri_pull_checked N REF BY_DIGEST: CRI PullImage, then ImageStatus must list BY_DIGEST.
cri_pull_checked() {
	local n=$1 ref=$2 by_digest=$3 out
	out=$(cri_pull "$n" "$ref") || { log "CRI pull $ref on node $n failed"; return 1; }
	jq -e --arg d "$by_digest" '.repo_digests | index($d)' <<<"$out" >/dev/null ||
		{ log "node $n: CRI recorded $out, want repo digest $by_digest"; return 1; }
}

# blobs_verified N IMAGE_NAME: every blob of the image's amd64 closure re-hashes correctly.
blobs_verified() {
	local n=$1 name=$2 d
	for d in $(jq -r --arg n "$name" '.images[] | select(.name == $n) | .blobs[].digest' "$RIG_DIR/images.json"); do
		content_verify "$n" "$d" || { log "node $n: blob $d of $name is missing or corrupt"; return 1; }
	done
}

# cleaned_up: nothing of the rig remains in the host namespace.
cleaned_up() {
	[[ -z $(rig_namespaces) ]] || { log "namespaces left: $(rig_namespaces)"; return 1; }
	! ip route show type blackhole "$(rig_subnet)" | grep -q . || { log "blackhole route left"; return 1; }
	! grep -qF " $RIG_DIR/" /proc/self/mountinfo || { log "mounts left under $RIG_DIR"; return 1; }
	[[ ! -d $RIG_DIR/pids ]] || { log "pid dir left"; return 1; }
}

# host_cannot_route: the host namespace drops the rig subnet locally (a route lookup, no traffic).
host_cannot_route() { ! ip route get "$(upstream_ip)" >/dev/null 2>&1; }

selftest_main() {
	require_root
	trap cleanup EXIT

	check "mkimages.py is deterministic" timed "mkimages.py twice (1 MiB big layer)" check_deterministic

	timed "rig.sh up (3 nodes)" "$RIG_SELF" up
	check "host namespace blackholes $(rig_subnet)" host_cannot_route
	local cached="generated"
	[[ -f $RIG_DIR/images/v3-big${RIG_BIG_MB:-200}/layouts.json ]] && cached="cached"
	check "layouts generated" timed "mkimages.py (${RIG_BIG_MB:-200} MiB big layer, $cached)" \
		python3 "$RIG_HERE/mkimages.py" "$RIG_DIR/images"
	check "images pushed" timed "push-images.sh (all images)" "$RIG_HERE/push-images.sh"
	: >"$RIG_DIR/selftest-ctr.log"

	local name ref digest by_digest bytes
	# The list is read on fd 3 so nothing run in the loop can swallow it through stdin.
	while IFS=$'\t' read -r -u 3 name ref digest by_digest bytes; do
		local short=${ref##*/}
		check "ctr pull $ref on node 1" timed "node 1 ctr pull $short ($bytes B)" ctr_pull_checked 1 "$ref" "$digest"
		check "CRI pull $ref on node 2" timed "node 2 CRI pull $short" cri_pull_checked 2 "$ref" "$by_digest"
		check "CRI pull $by_digest on node 1 (present)" timed "node 1 CRI pull $name by digest (present)" \
			cri_pull_checked 1 "$by_digest" "$by_digest"
		check "CRI pull $by_digest on node 3" timed "node 3 CRI pull $name by digest" \
			cri_pull_checked 3 "$by_digest" "$by_digest"
	done 3<"$RIG_DIR/images.tsv"
	for name in $(jq -r '.images[].name' "$RIG_DIR/images.json"); do
		check "blobs of $name verified on node 1" blobs_verified 1 "$name"
		check "blobs of $name verified on node 2" blobs_verified 2 "$name"
	done

	# Where the bytes came from: every node fetched the big layer from upstream exactly once.
	local big_layer n
	big_layer=$(jq -r '.images[] | select(.name == "big") | .blobs | max_by(.size) | .digest' "$RIG_DIR/images.json")
	for n in 1 2 3; do
		check "node $n fetched the big layer from upstream once" \
			test "$(grep -F "$(node_ip "$n") " "$RIG_DIR/upstream/access.log" | grep -F '"GET ' | grep -cF "$big_layer")" -eq 1
	done

	# Shaping hook: a tbf on the upstream link applies and can be removed again.
	check "tc tbf shaping hook" tbf 100mbit "$RIG_UP_NS" eth0
	tc -n "$RIG_UP_NS" qdisc del dev eth0 root 2>/dev/null || true

	# A crash: the registry dies by SIGKILL, and node 2's containerd is still running but its
	# pid file is lost; down must still end it (it lives in a rig namespace) and clean up.
	kill -s KILL "$(owned_pid upstream)"
	rm -f "$(pid_file n2-containerd)"
	check "down after a crash" timed "rig.sh down" "$RIG_SELF" down
	check "down twice" "$RIG_SELF" down
	check "nothing left behind" cleaned_up

	trap - EXIT
	echo
	echo "timings:"
	printf '  %s\n' "${TIMINGS[@]}"
	echo
	echo "selftest: $PASSED passed, $FAILED failed"
	((FAILED == 0))
}

selftest_main "$@"
