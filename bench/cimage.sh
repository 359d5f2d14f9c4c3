#!/usr/bin/env bash
# cimage.sh — update pull through containers/image (skopeo: the code CRI-O pulls with) vs a
# direct pull from upstream, on the namespace rig, same rig, same run.
#
# One job: node 1 holds the image (a CRI pull through its containerd and speculum, so it is
# advertised); node 2 copies it with `skopeo copy docker://… containers-storage:[vfs@…]`
# configured by a registries.conf of its own, BENCH_REPEAT times each way:
#   direct  registries.conf without a mirror: every byte over the shaped upstream link;
#   mirror  `[[registry.mirror]] location = "127.0.0.1:5080/<upstream ip>_5000"`: node 2's daemon
#           answers complete-or-nothing (docs/crio-serving.md) and node 1 serves every blob.
# Links are shaped as bench/cluster.sh does (upstream BENCH_UPSTREAM_RATE, nodes BENCH_NODE_RATE).
# Prints one JSON line per copy (elapsed ms, upstream layer GETs during it) and the ratio
# mirror/direct (medians). Node 2's containerd is not used for the copies.
#
#   sudo RIG_DIR=/tmp/spr-x RIG_NS_PREFIX=x- RIG_SUBNET=10.250.92 bench/cimage.sh
# Environment: BENCH_IMAGE (SIZE_MB:LAYERS, default 200:4), BENCH_REPEAT (3),
# BENCH_UPSTREAM_RATE (100mbit), BENCH_NODE_RATE (1gbit), SPECULUM_BIN
# (default target/release/speculum). The rig is taken down on exit.
#
# Safety: every command runs inside the rig's namespaces (node_exec, up_exec); the client's
# files live under the rig dir.

set -euo pipefail
BENCH_HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
export RIG_NODES=2
export RIG_UPSTREAM_RATE= RIG_NODE_RATE=
export SPECULUM_BIN=${SPECULUM_BIN:-$BENCH_HERE/../target/release/speculum}
# shellcheck source=../tests/rig/rig.sh
source "$BENCH_HERE/../tests/rig/rig.sh"

BENCH_IMAGE=${BENCH_IMAGE:-200:4}
BENCH_REPEAT=${BENCH_REPEAT:-3}
BENCH_UPSTREAM_RATE=${BENCH_UPSTREAM_RATE:-100mbit}
BENCH_NODE_RATE=${BENCH_NODE_RATE:-1gbit}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# client_dir MODE: a fresh containers/image client (registries.conf, policy, vfs storage).
client_dir() {
	local mode=$1 dir
	dir=$(node_dir 2)/cimage-$mode
	rm -rf --one-file-system "$dir"
	mkdir -p "$dir"
	{
		printf '[[registry]]\nprefix = "%s"\nlocation = "%s"\ninsecure = true\n' "$(upstream_host)" "$(upstream_host)"
		if [[ $mode == mirror ]]; then
			printf '\n[[registry.mirror]]\nlocation = "127.0.0.1:5080/%s_%s"\ninsecure = true\n' "$(upstream_ip)" "$RIG_UPSTREAM_PORT"
		fi
	} >"$dir/registries.conf"
	echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$dir/policy.json"
	echo "$dir"
}

# copy MODE REF: one skopeo copy on node 2; prints its elapsed ms.
copy() {
	local mode=$1 ref=$2 dir t0
	dir=$(client_dir "$mode")
	t0=$(now_ms)
	# containers/image as root writes /var/lib/containers/cache and reads /etc/containers: a
	# private mount namespace gives it the client's own directories.
	mkdir -p "$dir/var-lib" "$dir/etc-containers"
	# shellcheck disable=SC2016 # $1.. are the inner shell's arguments
	node_exec 2 unshare -m -- sh -c 'mount --make-rprivate / && mount --bind "$1" /var/lib && mount --bind "$2" /etc/containers && shift 2 && exec "$@"' \
		sh "$dir/var-lib" "$dir/etc-containers" skopeo --registries-conf "$dir/registries.conf" --policy "$dir/policy.json" \
		--tmpdir "$dir" copy --quiet "docker://$ref" \
		"containers-storage:[vfs@$dir/root+$dir/run]$ref" >&2 || die "skopeo copy ($mode) of $ref failed"
	echo $(($(now_ms) - t0))
	rm -rf --one-file-system "$dir"
}

layer_gets() {
	local d sum=0
	for d in ${LAYERS//,/ }; do sum=$((sum + $(upstream_gets "$d"))); done
	echo "$sum"
}

mirror_blob_finds() {
	[[ $(node_exec "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 10 -I \
		"http://127.0.0.1:5080/v2/$2/blobs/$3?ns=$(upstream_ip)%3A$RIG_UPSTREAM_PORT") == 200 ]]
}

cimage_main() {
	require_root
	require_speculum
	check_rig_dir
	exec 9>"$RIG_DIR.lock"
	flock -w "${BENCH_LOCK_WAIT:-1800}" 9 || die "another rig user holds $RIG_DIR.lock"
	trap 'cmd_down >/dev/null 2>&1 || true' EXIT
	cmd_up
	local layouts entry layout repo ref n
	layouts=$(python3 "$BENCH_HERE/mkbench.py" "$RIG_DIR/bench-images" "$BENCH_IMAGE")
	entry=$(jq -c '.images[0]' "$layouts/layouts.json")
	layout=$(jq -r .layout <<<"$entry")
	repo=$(jq -r .repository <<<"$entry")
	LAYERS=$(jq -r '.blobs[2:] | map(.digest) | join(",")' <<<"$entry")
	ref="$(upstream_host)/$repo:v1"
	up_exec skopeo copy --quiet --dest-tls-verify=false --preserve-digests \
		"oci:$layout:v1" "docker://$ref" >&2 || die "pushing $repo failed"
	tbf "$BENCH_UPSTREAM_RATE" "$RIG_BRIDGE_NS" v-up
	tbf "$BENCH_UPSTREAM_RATE" "$RIG_UP_NS" eth0
	for ((n = 1; n <= 2; n++)); do
		shape_node "$n" "$BENCH_NODE_RATE"
		write_speculum_config "$n"
		configure_node "$n" >/dev/null
		start_speculum "$n"
	done
	log "machine: $(nproc) cores, $(uname -r); speculum $SPECULUM_BIN; image $BENCH_IMAGE ($ref)"
	cri_pull 1 "$ref" >/dev/null
	poll_until "$RIG_TIMEOUT" "node 2 to find $repo" mirror_finds 2 "$repo" v1 || die "node 2 never found $repo"
	local d
	for d in ${LAYERS//,/ }; do
		poll_until "$RIG_TIMEOUT" "node 2 to find layer $d" mirror_blob_finds 2 "$repo" "$d" ||
			die "node 2 never found layer $d"
	done
	local rep mode before ms out=()
	for ((rep = 1; rep <= BENCH_REPEAT; rep++)); do
		for mode in direct mirror; do
			before=$(layer_gets)
			ms=$(copy "$mode" "$ref")
			out+=("$(jq -cn --arg m "$mode" --argjson r "$rep" --argjson ms "$ms" \
				--argjson gets "$(($(layer_gets) - before))" --arg i "$BENCH_IMAGE" \
				'{image: $i, mode: $m, repeat: $r, ms: $ms, upstream_layer_gets: $gets}')")
			echo "${out[-1]}"
		done
	done
	printf '%s\n' "${out[@]}" | jq -rs --arg up "$BENCH_UPSTREAM_RATE" --arg node "$BENCH_NODE_RATE" '
		def med: sort | .[(length - 1) / 2 | floor];
		([.[] | select(.mode == "direct") | .ms] | med) as $d |
		([.[] | select(.mode == "mirror") | .ms] | med) as $m |
		"upstream \($up), nodes \($node): skopeo update pull, direct \($d) ms, through the mirror \($m) ms (peer-served): \($m / $d * 100 | round / 100)× (medians of \(length / 2))"'
}

cimage_main "$@"
