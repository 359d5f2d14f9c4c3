#!/usr/bin/env bash
# image.sh — the speculum container image: both binaries in one reproducible OCI image.
#
# One job: choose the image's files and push the result. The files are the two binaries, the
# shared libraries they link (and the dynamic loader), a CA bundle, passwd/group and os-release:
# what a distroless image is made of, taken from this machine's Debian packages and checked
# against dpkg's md5sums. scripts/oci-pack.py writes them as an OCI layout (no Docker daemon).
#
#   image.sh build BIN_DIR OUT_DIR   BIN_DIR/{speculum,speculum-webhook} → OCI layout OUT_DIR,
#                                    tagged with the Cargo version; prints the manifest digest
#   image.sh push OUT_DIR REF        skopeo copy oci:OUT_DIR:TAG docker://REF (digest preserved)
#   image.sh tag OUT_DIR             the layout's tag
#   image.sh digest OUT_DIR          the layout's manifest digest
# Environment:
#   SOURCE_DATE_EPOCH  every timestamp in the image (default: the commit time of HEAD)
#   IMAGE_TLS_VERIFY   push: verify the registry's TLS certificate (default false: the local
#                      registries of the rig and the tests speak plain HTTP)
#
# Same binaries, same commit, same packages → same digest (tests/tools/image.rs builds twice).

set -euo pipefail

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(dirname "$HERE")
BINS=(speculum speculum-webhook)
NONROOT=65532

die() {
	echo "image.sh: $*" >&2
	exit 1
}

usage() {
	sed -n '9,18p' "${BASH_SOURCE[0]}" >&2
	exit 2
}

# --- choosing the files -----------------------------------------------------------------------

SPEC=""      # oci-pack.py's file list
WORK=""      # generated files (bundle, passwd, ...)
declare -A PACKAGES=() # package name → 1, every package a file came from
PROVENANCE=""          # "image path  package  sha256" lines for packages.txt

# entry LAYER TYPE PATH MODE OWNER SOURCE: one line of the file list.
entry() {
	printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$SPEC"
}

# package_of PATH: the package shipping PATH, and the path as the package lists it (on a
# merged-/usr system ldd reports /usr/lib/... for files packaged as /lib/...).
package_of() {
	local path=$1 alt out
	for alt in "$path" "${path#/usr}"; do
		if out=$(dpkg-query -S "$alt" 2>/dev/null); then
			# "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6" (diversions have other shapes)
			[[ $out == *": $alt" ]] || die "dpkg-query -S $alt: unexpected '$out'"
			printf '%s %s\n' "${out%%: *}" "$alt"
			return
		fi
	done
	die "$path belongs to no Debian package"
}

# verify_md5 PACKAGE PATH: the file on disk is what the package shipped.
verify_md5() {
	local pkg=$1 path=$2 want got sums
	sums=/var/lib/dpkg/info/$pkg.md5sums
	[ -f "$sums" ] || sums=/var/lib/dpkg/info/${pkg%%:*}.md5sums
	want=$(awk -v p="${path#/}" '$2 == p { print $1 }' "$sums")
	got=$(md5sum <"$path" | cut -d' ' -f1)
	[ -n "$want" ] || die "$path is not in $sums"
	[ "$want" = "$got" ] || die "$path differs from package $pkg (md5 $got, dpkg says $want)"
}

# add_packaged LAYER PATH: a file or symlink of a Debian package, at the path it is packaged at.
add_packaged() {
	local layer=$1 owner pkg path target
	owner=$(package_of "$2") || exit 1
	read -r pkg path <<<"$owner"
	PACKAGES[${pkg%%:*}]=1
	if [ -L "$path" ]; then
		target=$(readlink "$path")
		entry "$layer" l "$path" 0777 0:0 "$target"
		PROVENANCE+="$path -> $target  $pkg  symlink"$'\n'
		case $target in
		/*) add_packaged "$layer" "$target" ;;
		*) add_packaged "$layer" "$(realpath -ms "$(dirname "$path")/$target")" ;;
		esac
		return
	fi
	verify_md5 "$pkg" "$path"
	entry "$layer" f "$path" "$(stat -c %a "$path")" 0:0 "$path"
	PROVENANCE+="$path  $pkg  sha256:$(sha256sum <"$path" | cut -d' ' -f1)"$'\n'
}

# shared_libraries BIN: the loader and every library BIN links, as ldd resolves them here.
shared_libraries() {
	local bin=$1 interp
	interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
	[ -n "$interp" ] || die "$bin has no program interpreter (static binaries need no libraries; adapt this script)"
	echo "$interp"
	if ldd "$bin" | grep -q 'not found'; then
		die "$bin: missing libraries: $(ldd "$bin" | grep 'not found' | tr -s ' \n' ' ')"
	fi
	ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }'
}

# ca_bundle OUT: every certificate the ca-certificates package ships, concatenated in name
# order (what update-ca-certificates writes with Debian's default selection). Not the host's
# /etc/ssl/certs/ca-certificates.crt: that one also holds the machine's local CAs.
ca_bundle() {
	local out=$1 n=0 crt
	: >"$out"
	while read -r crt; do
		verify_md5 ca-certificates "$crt"
		cat "$crt" >>"$out"
		n=$((n + 1))
	done < <(dpkg-query -L ca-certificates | grep '^/usr/share/ca-certificates/.*\.crt$' | LC_ALL=C sort)
	[ "$n" -gt 0 ] || die "ca-certificates ships no certificates?"
	PACKAGES[ca-certificates]=1
	PROVENANCE+="/etc/ssl/certs/ca-certificates.crt  ca-certificates  $n certificates from /usr/share/ca-certificates, sha256:$(sha256sum <"$out" | cut -d' ' -f1)"$'\n'
}

# generated LAYER PATH MODE CONTENT: a small file written by this script.
generated() {
	local file
	file=$WORK/gen$(printf '%s' "$2" | tr / _)
	printf '%s' "$4" >"$file"
	entry "$1" f "$2" "$3" 0:0 "$file"
}

build() {
	local bin_dir=$1 out=$2
	local version revision epoch created bin lib pkg digest labels packages_label=""
	for bin in "${BINS[@]}"; do
		[ -x "$bin_dir/$bin" ] || die "$bin_dir/$bin: missing (make image builds it: cargo build --release -p speculum -p speculum-webhook --bin speculum --bin speculum-webhook)"
	done
	version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["workspace"]["package"]["version"])' "$REPO/Cargo.toml")
	for bin in "${BINS[@]}"; do
		# Stale binaries from another version would get the wrong tag.
		"$bin_dir/$bin" --version | grep -qx "$bin $version" ||
			die "$bin_dir/$bin --version says '$("$bin_dir/$bin" --version)', Cargo.toml says $version"
	done
	revision=$(git -C "$REPO" rev-parse HEAD)
	git -C "$REPO" diff --quiet HEAD -- || revision+="-dirty"
	epoch=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct HEAD)}
	created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

	if [ -e "$out" ] && [ ! -f "$out/oci-layout" ] && [ -n "$(ls -A "$out")" ]; then
		die "$out exists and is not an OCI layout: refusing to replace it"
	fi
	WORK=$(mktemp -d)
	trap 'rm -rf "$WORK"' EXIT
	SPEC=$WORK/spec.tsv

	# Layer 1, "base": changes only with the Debian packages.
	entry base d /tmp 1777 0:0 -
	entry base d /root 0700 0:0 -
	entry base d /home/nonroot 0700 "$NONROOT:$NONROOT" -
	generated base /etc/passwd 0644 "root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:$NONROOT:$NONROOT:nonroot:/home/nonroot:/sbin/nologin
"
	generated base /etc/group 0644 "root:x:0:
nobody:x:65534:
nonroot:x:$NONROOT:
"
	# /etc/hosts (which the kubelet mounts) before DNS; glibc's default without this file is DNS first.
	generated base /etc/nsswitch.conf 0644 "passwd: files
group: files
hosts: files dns
"
	local libs=()
	for bin in "${BINS[@]}"; do
		libs+=($(shared_libraries "$bin_dir/$bin")) || exit 1
	done
	for lib in $(printf '%s\n' "${libs[@]}" | LC_ALL=C sort -u); do
		add_packaged base "$lib"
	done
	ca_bundle "$WORK/ca-certificates.crt"
	entry base f /etc/ssl/certs/ca-certificates.crt 0644 0:0 "$WORK/ca-certificates.crt"
	add_packaged base /etc/os-release # scanners name the distribution from it

	# What the files were taken from: packages.txt for people, status.d for scanners (the
	# distroless convention: one dpkg status stanza per package).
	local list="" fields='Package: ${Package}\nSource: ${source:Package}\nVersion: ${Version}\nArchitecture: ${Architecture}\nStatus: install ok installed\n'
	for pkg in $(printf '%s\n' "${!PACKAGES[@]}" | LC_ALL=C sort); do
		generated base "/var/lib/dpkg/status.d/$pkg" 0644 "$(dpkg-query -W -f="$fields" "$pkg")"$'\n'
		if [ -f "/usr/share/doc/$pkg/copyright" ]; then
			entry base f "/usr/share/doc/$pkg/copyright" 0644 0:0 "$(readlink -f "/usr/share/doc/$pkg/copyright")"
		fi
		list+=$(dpkg-query -W -f='${Package} ${Version} ${Architecture}' "$pkg")$'\n'
		packages_label+="${packages_label:+,}$(dpkg-query -W -f='${Package}=${Version}' "$pkg")"
	done
	generated base /usr/share/doc/speculum/packages.txt 0644 "# Debian packages this image's files come from (dpkg-query on the build machine)
# package version architecture
$list
# image path  package  content
$PROVENANCE"

	# Layer 2, "app": the binaries.
	for bin in "${BINS[@]}"; do
		entry app f "/usr/local/bin/$bin" 0755 0:0 "$bin_dir/$bin"
	done

	labels=$(jq -cn --arg version "$version" --arg revision "$revision" --arg created "$created" \
		--arg packages "$packages_label" '{
		"org.opencontainers.image.title": "speculum",
		"org.opencontainers.image.description": "Cluster-local, peer-to-peer, policy-aware OCI registry mirror for containerd nodes (speculum) and its admission webhook (speculum-webhook)",
		"org.opencontainers.image.source": "https://github.com/speculum-io/speculum",
		"org.opencontainers.image.version": $version,
		"org.opencontainers.image.revision": $revision,
		"org.opencontainers.image.licenses": "Apache-2.0",
		"org.opencontainers.image.created": $created,
		"io.speculum.image.debian-packages": $packages}')
	local meta
	meta=$(jq -cn --arg tag "$version" --arg created "$created" --argjson epoch "$epoch" \
		--argjson labels "$labels" --arg user "$NONROOT:$NONROOT" '{
		tag: $tag, created: $created, epoch: $epoch, user: $user, labels: $labels,
		env: ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
		cmd: ["speculum", "--help"],
		history: {base: "scripts/image.sh: libraries, CA bundle, passwd/group from Debian packages",
		          app: "scripts/image.sh: speculum, speculum-webhook"}}')

	local tmp=$out.tmp.$$
	rm -rf "$tmp"
	mkdir -p "$(dirname "$out")"
	digest=$(python3 "$HERE/oci-pack.py" "$SPEC" "$tmp" "$meta") || { rm -rf "$tmp"; die "oci-pack.py failed"; }
	rm -rf "$out"
	mv "$tmp" "$out"
	echo "$digest"
}

# --- reading and pushing a layout -------------------------------------------------------------

layout_field() {
	[ -f "$1/index.json" ] || die "$1: not an OCI layout (no index.json)"
	jq -er ".manifests[0].$2" "$1/index.json"
}

push() {
	local out=$1 ref=$2 tag
	tag=$(layout_field "$out" 'annotations["org.opencontainers.image.ref.name"]')
	skopeo copy --quiet --preserve-digests --dest-tls-verify="${IMAGE_TLS_VERIFY:-false}" \
		"oci:$out:$tag" "docker://$ref"
	echo "pushed $(layout_field "$out" digest) to $ref"
}

case ${1:-} in
build) [ $# -eq 3 ] || usage; build "$2" "$3" ;;
push) [ $# -eq 3 ] || usage; push "$2" "$3" ;;
tag) [ $# -eq 2 ] || usage; layout_field "$2" 'annotations["org.opencontainers.image.ref.name"]' ;;
digest) [ $# -eq 2 ] || usage; layout_field "$2" digest ;;
*) usage ;;
esac
