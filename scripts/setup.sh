#!/usr/bin/env bash
# Installs everything the demo and the tests need, and nothing else. Idempotent: a second run
# only checks. Debian packages through apt; Go tools through the Go module proxy, pinned.
set -euo pipefail

APT_PACKAGES=(
  containerd        # the real container runtime the daemon reads from (1.6 on Debian 12)
  runc              # containerd's runtime (pulled in by containerd, named for clarity)
  docker-registry   # the CNCF distribution registry: upstream in the rig
  skopeo            # pushes the test images
  protobuf-compiler # containerd-client's build script needs protoc
  iproute2          # ip netns / veth / tc for the namespace rig
  curl jq           # talking to metrics endpoints inside namespaces
  python3           # the deterministic image generator
  apache2-utils     # htpasswd for the webhook's private-registry tests
  nginx-light       # bench/serving.sh: the sendfile reference for the daemon's serving cost
  openssl           # tests/k8s: certificates and the ServiceAccount signing key of the E2E API server
  # The cluster tier (tests/cluster/): real kubelets on network namespaces.
  containernetworking-plugins # CNI bridge + host-local + loopback for the nodes' pods
  iptables conntrack          # kube-proxy (iptables mode) on every node
  socat                       # the host's loopback door to the API server in its namespace
  busybox-static              # the test images' base layer (a shell for kubectl exec)
  gcc libc6-dev               # the pause image: a tiny static C program
  umoci             # tests/tools/image.rs: unpacks (and so validates) the image layout for the chroot runs
  buildah           # tests/tools/image.rs: builds the Dockerfile's final stage without a Docker daemon
  prometheus        # tests/rig/prometheus.rs: real Prometheus scrapes the rig; promtool checks chart/files/alerts
  chromium chromium-driver # tests/rig/status_page.rs: the node status page in a real headless browser
  # CRI-O and the containers/image clients (docs/crio.md): podman + skopeo read the drop-in in
  # tests/tools/crio_conf.rs and testkit::cimage nodes; tests/crio/crio.sh builds real CRI-O
  # (Go module proxy, cgo seccomp) and runs it with Debian's conmon and crun.
  podman conmon crun          # containers/image's pull path; CRI-O's monitor and OCI runtime
  libseccomp-dev pkg-config   # the CRI-O build (cgo, seccomp); gpgme is left out by a build tag
)
# Go ≥ 1.26 builds the rig's CRI client (Debian's golang-go is too old; the machine's Go is used).
# The same Go builds the Kubernetes E2E tier's kube-apiserver and etcd from pinned wrapper modules
# (tests/k8s/apiserver, tests/k8s/etcd) on first use: `make k8s-binaries`, cached per version.

# Go tools: name → install target (pinned versions). The rig's CRI client
# (tests/rig/cri-pull, k8s.io/cri-api) is built from its own go.mod on first use.
GO_TOOLS=(
  # tests/tools/policy_opa.rs runs every shipped bundle's tests with real OPA too (a plain OPA bundle)
  "opa github.com/open-policy-agent/opa@v1.22.2"
  # tests/tools/chart.rs: helm lint/template of chart/ (found the same way: $HELM, PATH, GOPATH/bin)
  "helm helm.sh/helm/v3/cmd/helm@v3.16.3"
)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (installs packages, creates network namespaces)" >&2
    exit 1
  fi
}

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_go_tools() {
  local gobin="${GOBIN:-$(go env GOPATH)/bin}"
  for entry in ${GO_TOOLS[@]+"${GO_TOOLS[@]}"}; do
    local name="${entry%% *}" target="${entry#* }"
    if [ ! -x "$gobin/$name" ]; then
      echo "setup: go install $target"
      go install "$target"
    fi
  done
}

need_root
install_apt
install_go_tools
echo "setup: ok"
