#!/usr/bin/env bash
# Builds the OCI distribution-spec conformance suite (the spec's own Go program, from the Go
# module proxy, pinned below) and runs its read-only *pull* workflow against a registry.
#
#   tests/oci_conformance/run.sh build                  # only build (cached)
#   OCI_REGISTRY=127.0.0.1:PORT OCI_REPO1=repo \
#   OCI_RO_DATA_MANIFESTS="sha256:…" OCI_RO_DATA_BLOBS="sha256:…" \
#   OCI_RESULTS_DIR=/tmp/x tests/oci_conformance/run.sh # build, then run
#
# Which of the suite's tests apply to a pull-only mirror is decided here, by the settings
# below, and recorded in ROBUSTNESS.md ("OCI conformance"). The caller (main.rs) seeds the
# content through containerd, starts the daemon and checks the results.
set -euo pipefail

# Pinned: the conformance module has no tags, so a pseudo-version (commit of 2026-08-31 on main).
VERSION="v0.0.0-20260831232431-97274622c111"
MODULE="github.com/opencontainers/distribution-spec/conformance"

here="$(cd "$(dirname "$0")" && pwd)"
target="${CARGO_TARGET_DIR:-$here/../../target}"
bindir="$target/oci-conformance/$VERSION"
bin="$bindir/conformance"

if [ ! -x "$bin" ]; then
  mkdir -p "$bindir"
  echo "oci-conformance: building $MODULE@$VERSION" >&2
  # Outside any module so the workspace has no go.mod; GOFLAGS from the caller could force
  # -mod=vendor, so clear it. `go install pkg@version` verifies against the checksum database.
  (cd "$bindir" && GOFLAGS= GOBIN="$bindir" timeout 600 go install "$MODULE@$VERSION")
fi
[ "${1:-}" = build ] && { echo "$bin"; exit 0; }

: "${OCI_REGISTRY:?set OCI_REGISTRY=host:port}"
: "${OCI_REPO1:?set OCI_REPO1}"
: "${OCI_RESULTS_DIR:?set OCI_RESULTS_DIR}"

# A pull-only mirror: no push, no delete, no tag listing, no referrers API, no mounts. Content
# is pre-loaded (read-only mode): the suite pulls the listed manifests and blobs from REPO1.
export OCI_TLS=disabled
export OCI_VERSION=1.1
export OCI_LOG="${OCI_LOG:-warn}"
export OCI_REPO2="${OCI_REPO2:-$OCI_REPO1}"
export OCI_API_PULL=true
export OCI_API_PUSH=false
export OCI_API_BLOBS_DELETE=false
export OCI_API_BLOBS_MOUNT_ANONYMOUS=false
export OCI_API_MANIFESTS_DELETE=false
export OCI_API_TAGS_DELETE=false
export OCI_API_TAGS_LIST=false
export OCI_API_REFERRER=false
# In read-only mode the suite never looks at response headers (it keeps no response for empty
# expected content), so requiring Docker-Content-Digest fails every test; main.rs checks the
# header (and the bytes) itself.
export OCI_API_MANIFESTS_DIGEST_HEADER=false
export OCI_API_BLOBS_DIGEST_HEADER=false
# Data generation needs push; with push off only the read-only inputs are used.
export OCI_DATA_SHA512=false
# Tags need the `ns` query parameter containerd adds (a tag means nothing without its
# registry); the suite cannot add it, so tags are not listed (see ROBUSTNESS.md).
export OCI_RO_DATA_TAGS=""
# Everything is set through the environment; the suite insists on reading a config file.
mkdir -p "$OCI_RESULTS_DIR"
export OCI_CONFIGURATION="$OCI_RESULTS_DIR/oci-conformance.yaml"
echo '{}' > "$OCI_CONFIGURATION"
cd "$OCI_RESULTS_DIR"
exec timeout 300 "$bin"
