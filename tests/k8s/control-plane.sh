#!/usr/bin/env bash
# The Kubernetes E2E tier's control plane: a real kube-apiserver and etcd, built from source
# through the Go module proxy (pinned versions, wrapper modules in apiserver/ and etcd/), cached
# per version, and certificates for running them on 127.0.0.1. No kubelet, no scheduler: tests
# create pods with spec.nodeName set.
#
#   control-plane.sh binaries      build (first run) or find the binaries; prints their directory
#   control-plane.sh node-binaries the above plus kubelet, kube-proxy, kube-controller-manager,
#                                  kube-scheduler and kubectl (wrapper module node/) for the
#                                  cluster tier (tests/cluster/); prints the same directory
#   control-plane.sh certs DIR     CA, serving cert for 127.0.0.1, cluster-admin client cert,
#                                  ServiceAccount signing key pair, all into DIR
#   control-plane.sh up DIR        both of the above, then etcd + kube-apiserver in the
#                                  background on free loopback ports; writes DIR/kubeconfig and
#                                  DIR/pids (for poking at it by hand; the Rust tests start their
#                                  own through testkit/src/k8s.rs)
#   control-plane.sh down DIR      stops what `up DIR` started (by the PIDs it wrote)
#
# Cache: ${SPECULUM_CACHE:-$HOME/.cache/speculum}/k8s/<kubernetes version>/. Go's module and
# build caches make a rebuild after a version bump cheaper too.
set -euo pipefail

K8S_VERSION=v1.33.13 # apiserver/go.mod pins this (and v0.33.13 of every staging module)
ETCD_VERSION=v3.5.21 # etcd/go.mod pins this
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SPECULUM_CACHE:-$HOME/.cache/speculum}/k8s/$K8S_VERSION"

log() { echo "control-plane: $*" >&2; }

build_one() { # NAME MODULE_DIR PACKAGE [LDFLAGS] (env CGO_ENABLED passes through)
  local name="$1" dir="$2" pkg="$3" ldflags="${4:-}"
  [ -x "$CACHE/$name" ] && return 0
  command -v go >/dev/null || { log "go is needed to build $name"; exit 1; }
  local start=$SECONDS
  log "building $name from $pkg (first run only; several minutes on 2 cores)"
  # Build next to the target and rename: a killed build never leaves a half binary behind.
  (cd "$dir" && go build -trimpath -ldflags="-s -w $ldflags" -o "$CACHE/.$name.tmp" "$pkg")
  mv -f "$CACHE/.$name.tmp" "$CACHE/$name"
  log "built $name in $((SECONDS - start)) s"
}

# Without these the binaries report v0.0.0-master at /version (clients, charts and the kubelet's
# node status read it).
version_ldflags() {
  local v=k8s.io/component-base/version minor="${K8S_VERSION#v1.}"
  echo "-X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=${minor%%.*} -X $v.gitTreeState=clean"
}

build_control_plane() {
  build_one etcd "$HERE/etcd" go.etcd.io/etcd/server/v3
  build_one kube-apiserver "$HERE/apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$(version_ldflags)"
}

binaries() {
  mkdir -p "$CACHE"
  # Several test binaries may ask at once; one builds, the others wait for it.
  exec 9>"$CACHE/.lock"
  flock 9
  build_control_plane
  flock -u 9
  echo "$CACHE"
}

# The cluster tier's node and controller binaries. Same pinned release, its own wrapper module
# (node/: these commands pull in kubelet-only dependencies the apiserver module does not carry);
# the shared dependencies are at the same versions, so Go's build cache serves them.
node_binaries() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  build_control_plane
  local cmd
  for cmd in kube-scheduler kube-proxy kube-controller-manager kubelet; do
    build_one "$cmd" "$HERE/node" "k8s.io/kubernetes/cmd/$cmd" "$(version_ldflags)"
  done
  # Static: the cluster tier also packs kubectl into an image (the chart's cleanup hook runs it).
  CGO_ENABLED=0 build_one kubectl "$HERE/node" k8s.io/kubernetes/cmd/kubectl "$(version_ldflags)"
  flock -u 9
  echo "$CACHE"
}

certs() { # DIR
  local d="$1"
  mkdir -p "$d"
  cd "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=speculum-e2e-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  # The serving certificate: clients (kube-rs, the tests) dial 127.0.0.1.
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout apiserver.key -out apiserver.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >apiserver.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile apiserver.ext -out apiserver.crt 2>/dev/null
  # O=system:masters is bound to cluster-admin by the API server's bootstrap RBAC policy.
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=speculum-e2e-admin" \
    -keyout admin.key -out admin.csr 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >admin.ext
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile admin.ext -out admin.crt 2>/dev/null
  # ServiceAccount token signing key: projected tokens and /openid/v1/jwks.
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  rm -f ./*.csr ./*.ext ca.srl
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

up() { # DIR
  local d
  d="$(mkdir -p "$1" && cd "$1" && pwd)"
  local bin
  bin="$(binaries)"
  (certs "$d")
  local etcd_port peer_port api_port
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  "$bin/etcd" --data-dir "$d/etcd" --name e2e \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "e2e=http://127.0.0.1:$peer_port" --log-level error >"$d/etcd.log" 2>&1 &
  echo $! >"$d/pids"
  env -u HTTPS_PROXY -u HTTP_PROXY -u https_proxy -u http_proxy \
    "$bin/kube-apiserver" $(apiserver_flags "$d" "$etcd_port" "$api_port") >"$d/apiserver.log" 2>&1 &
  echo $! >>"$d/pids"
  kubeconfig "$d" "https://127.0.0.1:$api_port" >"$d/kubeconfig"
  local i
  for i in $(seq 1 120); do
    if curl -sf --cacert "$d/ca.crt" --cert "$d/admin.crt" --key "$d/admin.key" \
      "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      log "up: KUBECONFIG=$d/kubeconfig"
      return 0
    fi
    sleep 0.5
  done
  log "kube-apiserver not ready after 60 s; see $d/apiserver.log"
  down "$d"
  exit 1
}

# The flags testkit/src/k8s.rs passes too; keep the two in step.
apiserver_flags() { # DIR ETCD_PORT API_PORT
  local d="$1"
  echo "--etcd-servers=http://127.0.0.1:$2 --bind-address=127.0.0.1 --advertise-address=127.0.0.1
    --secure-port=$3 --cert-dir=$d/apiserver-certs
    --tls-cert-file=$d/apiserver.crt --tls-private-key-file=$d/apiserver.key
    --client-ca-file=$d/ca.crt --authorization-mode=RBAC
    --service-account-key-file=$d/sa.pub --service-account-signing-key-file=$d/sa.key
    --service-account-issuer=https://127.0.0.1:$3 --service-cluster-ip-range=10.233.0.0/24
    --enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ServiceAccount"
}

kubeconfig() { # DIR SERVER
  local d="$1"
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: $2
    certificate-authority: $d/ca.crt
users:
- name: admin
  user:
    client-certificate: $d/admin.crt
    client-key: $d/admin.key
contexts:
- name: e2e
  context: {cluster: e2e, user: admin}
current-context: e2e
EOF
}

down() { # DIR
  local d="$1" pid
  [ -f "$d/pids" ] || return 0
  # Only the PIDs `up` wrote, apiserver first (it holds etcd connections).
  for pid in $(tac "$d/pids"); do
    kill "$pid" 2>/dev/null || true
  done
  rm -f "$d/pids"
}

case "${1:-}" in
binaries) binaries ;;
node-binaries) node_binaries ;;
certs) certs "${2:?DIR}" ;;
up) up "${2:?DIR}" ;;
down) down "${2:?DIR}" ;;
*)
  echo "usage: $0 binaries | node-binaries | certs DIR | up DIR | down DIR" >&2
  exit 2
  ;;
esac
