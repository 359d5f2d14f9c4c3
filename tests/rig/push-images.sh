#!/usr/bin/env bash
# push-images.sh — pushes the rig's deterministic test images to the rig's upstream registry.
#
# One job: generate (via mkimages.py, cached) and push with skopeo from inside the upstream
# namespace, then record what was pushed, for assertions:
#   $RIG_DIR/images.json  one object per image: name, repository, tags, format, digest (of the
#                         top-level manifest or index), platform_digest (the amd64 manifest),
#                         media_type, refs {tag: ref}, by_digest (repo@digest), blobs (the amd64
#                         closure: manifest/index, config, layers with sizes), bytes (their sum)
#   $RIG_DIR/images.tsv   name, tag ref, digest, by-digest ref, bytes — one line per tag
#
#   push-images.sh [NAME...]     default: every image but the on-demand ones
#                                (small docker multi big tags late; on demand: zstd chunked)
# Environment: RIG_DIR, RIG_BIG_MB (size of the big layer, default 200).
#
# Images pushed with format "oci" keep their digests (skopeo --preserve-digests) and must match
# what mkimages.py predicted; "v2s2" is converted by skopeo and recorded as pushed.

set -euo pipefail
# shellcheck source=rig.sh source-path=SCRIPTDIR
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/rig.sh"

# generate_layouts: prints the layouts directory (cached by mkimages.py).
generate_layouts() {
	python3 "$RIG_HERE/mkimages.py" "$RIG_DIR/images"
}

# skopeo_push LAYOUT TAG DEST DIGESTFILE FORMAT: one skopeo copy inside the upstream namespace.
skopeo_push() {
	local layout=$1 tag=$2 dest=$3 digestfile=$4 format=$5
	local args=(copy --quiet --dest-tls-verify=false --digestfile "$digestfile")
	case $format in
	oci) args+=(--all --preserve-digests) ;;
	v2s2) args+=(--format v2s2) ;;
	zstd | zstd:chunked) args+=(--dest-compress-format "$format") ;;
	*) die "unknown image format '$format'" ;;
	esac
	up_exec skopeo "${args[@]}" "oci:$layout:$tag" "docker://$dest"
}

# pushed_closure REPO DIGEST: the blob list of a pushed single-platform manifest, read back from
# the registry (used for converted images, whose config digest only skopeo knows).
pushed_closure() {
	local repo=$1 digest=$2 manifest
	manifest=$(up_exec curl -fsS --max-time 10 \
		-H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
		-H 'Accept: application/vnd.oci.image.manifest.v1+json' \
		"http://$(upstream_host)/v2/$repo/manifests/$digest")
	jq -c --arg d "$digest" --argjson size "$(printf '%s' "$manifest" | wc -c)" \
		'[{digest: $d, size: $size, media_type: .mediaType}]
		 + [.config, .layers[] | {digest, size, media_type: .mediaType}]' <<<"$manifest"
}

# push_image ENTRY_JSON: pushes every tag of one image; prints the entry completed with what was
# pushed.
push_image() {
	local entry=$1 name layout format repo tag digest want digestfile blobs
	name=$(jq -r .name <<<"$entry")
	layout=$(jq -r .layout <<<"$entry")
	format=$(jq -r .format <<<"$entry")
	repo=$(jq -r .repository <<<"$entry")
	want=$(jq -r '.digest // empty' <<<"$entry")
	digestfile=$(mktemp)
	digest=
	for tag in $(jq -r '.tags[]' <<<"$entry"); do
		skopeo_push "$layout" "$tag" "$(upstream_host)/$repo:$tag" "$digestfile" "$format" >&2 ||
			die "pushing $name:$tag failed"
		local got
		got=$(<"$digestfile")
		[[ -z $want || $got == "$want" ]] || die "$name:$tag pushed as $got, mkimages.py predicted $want"
		[[ -z $digest || $got == "$digest" ]] || die "$name's tags point at different digests ($digest, $got)"
		digest=$got
	done
	rm -f "$digestfile"
	if [[ $format == oci ]]; then
		blobs=$(jq -c .blobs <<<"$entry")
	else
		blobs=$(pushed_closure "$repo" "$digest")
	fi
	jq -c --arg host "$(upstream_host)" --arg repo "$repo" --arg digest "$digest" --argjson blobs "$blobs" '
		. + {digest: $digest,
		     platform_digest: (.platform_digest // $digest),
		     media_type: $blobs[0].media_type,
		     blobs: $blobs,
		     bytes: ([$blobs[].size] | add),
		     refs: (.tags | map({key: ., value: "\($host)/\($repo):\(.)"}) | from_entries),
		     by_digest: "\($host)/\($repo)@\($digest)"}
	' <<<"$entry"
}

# record IMAGES_JSON_LINES: merges freshly pushed entries into images.json and rewrites images.tsv.
# On-demand images stay recorded only until the next push: "every image" never includes them.
record() {
	local fresh=$1 old='[]'
	[[ -f $RIG_DIR/images.json ]] && old=$(jq -c .images "$RIG_DIR/images.json")
	jq -n --argjson old "$old" --slurpfile fresh <(printf '%s\n' "$fresh") --arg host "$(upstream_host)" '
		{registry: $host,
		 images: (($old | map(select(.on_demand != true)
		                      | select(.name as $n | ($fresh | map(.name) | index($n)) | not))) + $fresh
		          | sort_by(.name))}
	' >"$RIG_DIR/images.json.tmp"
	mv "$RIG_DIR/images.json.tmp" "$RIG_DIR/images.json"
	jq -r '.images[] | . as $i | .tags[] | [$i.name, $i.refs[.], $i.digest, $i.by_digest, $i.bytes] | @tsv' \
		"$RIG_DIR/images.json" >"$RIG_DIR/images.tsv"
}

push_main() {
	require_root
	is_running upstream || die "the upstream registry is not running (rig.sh up first)"
	local layouts started=$SECONDS entries fresh='' entry name
	layouts=$(generate_layouts)
	log "layouts ready in $((SECONDS - started))s: $layouts"
	entries=$(jq -c '.images[]' "$layouts/layouts.json")
	if (($# > 0)); then
		for name in "$@"; do
			jq -s -e --arg n "$name" 'any(.name == $n)' <<<"$entries" >/dev/null || die "no image named '$name'"
		done
		entries=$(jq -c --args 'select(.name as $n | $ARGS.positional | index($n))' "$@" <<<"$entries")
	else
		entries=$(jq -c 'select(.on_demand != true)' <<<"$entries")
	fi
	while IFS= read -r entry; do
		log "pushing $(jq -r .name <<<"$entry")"
		fresh+=$(push_image "$entry")$'\n'
	done <<<"$entries"
	record "$fresh"
	log "pushed in $((SECONDS - started))s; see $RIG_DIR/images.tsv"
}

push_main "$@"
