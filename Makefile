# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
# Cargo's build output is kept outside the clone when CARGO_TARGET_DIR is set (CI sets it so
# repeated runs on one machine reuse the build).

CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
export SPECULUM_BIN ?= $(CARGO_TARGET_DIR)/debug/speculum
export SPECULUM_WEBHOOK_BIN ?= $(CARGO_TARGET_DIR)/debug/speculum-webhook

.PHONY: setup build demo test unit chart rig-down fmt lint

setup:
	@bash scripts/setup.sh

build: setup
	cargo build --workspace --bins

## demo: a 3-node cluster on network namespaces with real containerd; shows where bytes come from.
demo: build
	bash tests/rig/demo.sh

## test: every test: unit, conformance on real containerd, registry, DHT, namespace cluster.
# SPECULUM_SKIP_K8S=1: the Kubernetes tests ran in `e2e` just before; not twice.
# SPECULUM_REQUIRE_OPA=1: setup installed OPA, so the bundles must pass real OPA too.
# The image (release binaries) comes first: tests/tools/image.rs checks it and the cluster tier runs it.
# The workspace run covers the default containerd (the 2.x LTS); containerd-matrix the others.
# SPECULUM_SKIP_CLUSTER=1: the cluster tier ran in `cluster-test` just before; not twice.
test: build image e2e cluster-test containerd-matrix
	SPECULUM_SKIP_K8S=1 SPECULUM_SKIP_CLUSTER=1 SPECULUM_REQUIRE_OPA=1 cargo test --workspace --no-fail-fast

# --- containerd version matrix (issue 17; tests/containerd/) -----------------------------------------
.PHONY: containerd-binaries containerd-matrix
CONTAINERD_SH := tests/containerd/containerd.sh
CONTAINERD_DEFAULT := $(shell bash $(CONTAINERD_SH) default)
CONTAINERD_LINES := $(shell bash $(CONTAINERD_SH) lines)

## containerd-binaries: containerd, ctr and the runc shim of every line (1.7, 2.3, 2.4) built
## through the Go module proxy (pinned), cached in ${SPECULUM_CACHE:-~/.cache/speculum}/containerd/
## <version>/. Cold about 2-3 min per line on 2 cores; cached: instant. 1.6 is Debian's.
containerd-binaries: setup
	for l in $(CONTAINERD_LINES); do bash $(CONTAINERD_SH) bin $$l >/dev/null || exit 1; done

## containerd-matrix: the store conformance suite and the cluster scenario (tests/rig/cluster.rs:
## peers with upstream stopped, tag switches, a peer killed mid-layer) on every containerd line
## but the default, which the workspace run covers. Root only: it fails, never skips.
containerd-matrix: containerd-binaries build
	@[ "$$(id -u)" = 0 ] || { echo "containerd-matrix needs root (private containerds, network namespaces)"; exit 1; }
	for l in $(filter-out $(CONTAINERD_DEFAULT),$(CONTAINERD_LINES)); do \
	  echo "== containerd $$l ($$(bash $(CONTAINERD_SH) version $$l))"; \
	  RIG_CONTAINERD=$$l cargo test --test containerd store_conformance:: || exit 1; \
	  env -u SPECULUM_SKIP_RIG RIG_CONTAINERD=$$l cargo test --test rig cluster:: || exit 1; \
	done

## chart: the Helm chart: lint --strict, template matrix checked against the real binaries,
## hook args run for real, manifests dry-run applied to the E2E kube-apiserver (tests/tools/chart.rs).
chart: setup
	cargo test --test tools chart::
	cargo test -p speculum-webhook --test kube chart::

## unit: the fast tests only (no root, no containerd): unit tests and the loopback harness.
unit:
	cargo test --workspace --lib
	cargo test --test loopback

rig-down:
	bash tests/rig/rig.sh down

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets

.PHONY: bench bench-smoke

## bench: the benchmark set, each figure against a reference in the same run (BENCHMARKS.md).
## Needs root; about 20 minutes on 2 cores (release build not counted). Results: bench/results/.
bench: setup
	bash bench/run.sh

## bench-smoke: every benchmark script, tiny (about 3 minutes), so they cannot rot.
bench-smoke: setup
	BENCH_SMOKE=1 bash bench/run.sh

# --- robustness (issue 10; see ROBUSTNESS.md) -----------------------------------------------------
FUZZ_TARGETS := digest reference v2_path range media pull_request http_head admission_review grant_verify
# Per-target libFuzzer bound for `make fuzz`: runs and wall time, whichever ends first.
FUZZ_RUNS ?= 10000000
FUZZ_SECONDS ?= 1800

.PHONY: conformance fuzz fuzz-build fuzz-smoke load faults hostile

## conformance: the OCI distribution-spec conformance suite (pull workflow) against a daemon.
conformance: build
	cargo test --test oci_conformance -- --nocapture

## hostile: the malformed-request table over raw TCP.
hostile:
	cargo test --test loopback hostile:: -- --nocapture

# cargo-fuzz needs nightly; -s none: the code is forbid(unsafe), so ASan would only slow it down;
# -a: debug assertions (integer overflow panics) on.
fuzz-build:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
	cd fuzz && cargo +nightly fuzz build -O -a -s none

## fuzz: every target for FUZZ_RUNS executions (or FUZZ_SECONDS), seeds from fuzz/seeds.
fuzz: fuzz-build
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t && \
	  (cd fuzz && nice -n 10 cargo +nightly fuzz run -O -a -s none $$t corpus/$$t seeds/$$t -- \
	    -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 \
	    > last-$$t.log 2>&1) || { tail -40 fuzz/last-$$t.log; exit 1; }; \
	  echo "$$t: $$(grep -h 'stat::number_of_executed_units' fuzz/last-$$t.log)"; \
	done

## fuzz-smoke: 20 s of libFuzzer per target (the stable smoke in `make test` is tests/loopback/fuzz_smoke.rs).
fuzz-smoke:
	$(MAKE) fuzz FUZZ_RUNS=1000000000 FUZZ_SECONDS=20

## load: 1,000 connections / 10 k requests against one daemon; prints percentiles and RSS.
load: build
	cargo test --test containerd load:: -- --nocapture

## faults: the fault matrix on the namespace rig (≥ 50 CRI pulls); takes the rig lock.
faults: build
	bash tests/rig/faults.sh

# --- Kubernetes E2E tier (issue 7; tests/k8s/) ------------------------------------------------------
.PHONY: e2e k8s-binaries

## k8s-binaries: kube-apiserver + etcd built through the Go module proxy (pinned), cached in
## ${SPECULUM_CACHE:-~/.cache/speculum}/k8s/<version>/. Cold about 10-20 min on 2 cores; cached: instant.
k8s-binaries: setup
	bash tests/k8s/control-plane.sh binaries

## e2e: a real kube-apiserver + etcd on 127.0.0.1: the webhook pins through the API server, kube
## credentials and certificates, projected tokens and JWKS. About 1 min once the binaries are cached.
e2e: k8s-binaries
	cargo test --test tools k8s_control_plane::
	cargo test --test tools tenancy_kube::
	cargo test -p speculum-webhook --test kube e2e_kube::
	cargo test --test tools chart::
	cargo test -p speculum-webhook --test kube chart::e2e

# --- the container image (issue 15; README "Container image") ------------------------------------
.PHONY: image image-push

# release (default) or debug: debug binaries assemble into a larger image, for quick local tries.
IMAGE_PROFILE ?= release
IMAGE_DIR ?= $(CARGO_TARGET_DIR)/image/speculum
# Binaries tests/tools/image.rs packs (always the release ones).
export SPECULUM_IMAGE_BINS ?= $(CARGO_TARGET_DIR)/release

## image: both binaries in one reproducible OCI layout at $(IMAGE_DIR) (tag: the Cargo version),
## built by scripts/image.sh without Docker. IMAGE_PUSH=HOST:PORT/REPO:TAG also pushes it (skopeo).
image: setup
	cargo build -j 2 --profile $(if $(filter debug,$(IMAGE_PROFILE)),dev,release) \
	  -p speculum -p speculum-webhook --bin speculum --bin speculum-webhook
	bash scripts/image.sh build $(CARGO_TARGET_DIR)/$(IMAGE_PROFILE) $(IMAGE_DIR)
	$(if $(IMAGE_PUSH),bash scripts/image.sh push $(IMAGE_DIR) $(IMAGE_PUSH))

## image-push REF=HOST:PORT/REPO:TAG: build the image, then push it (IMAGE_TLS_VERIFY=true for a
## registry with a real certificate).
image-push: image
	@test -n "$(REF)" || { echo "usage: make image-push REF=127.0.0.1:5000/speculum/speculum:TAG" >&2; exit 2; }
	bash scripts/image.sh push $(IMAGE_DIR) $(REF)

# --- cluster tier (issue 15; tests/cluster/) --------------------------------------------------------
.PHONY: k8s-node-binaries cluster cluster-down cluster-test

## k8s-node-binaries: the above plus kubelet, kube-proxy, kube-controller-manager, kube-scheduler
## and kubectl (same pinned release, same cache). Cold about 5 min on 2 cores after k8s-binaries.
k8s-node-binaries: setup
	bash tests/k8s/control-plane.sh node-binaries

## cluster: a real 3-node cluster on network namespaces (kubelets, containerd, CNI, kube-proxy),
## an upstream registry holding the speculum image; prints the KUBECONFIG (README, "Try it on a
## real local cluster"). `make cluster-down` removes everything it made.
cluster: build image k8s-node-binaries
	CLUSTER_SPECULUM_LAYOUT=$(IMAGE_DIR):$$(bash scripts/image.sh tag $(IMAGE_DIR)) bash tests/cluster/cluster.sh up

cluster-down:
	bash tests/cluster/cluster.sh down

## cluster-test: the chart installed with Helm on that cluster and every scenario through it
## (tests/cluster/kube_cluster.rs; brings its own cluster up and down).
cluster-test: build image k8s-node-binaries
	SPECULUM_IMAGE_LAYOUT=$(IMAGE_DIR):$$(bash scripts/image.sh tag $(IMAGE_DIR)) \
	  cargo test --test kube_cluster -- --nocapture

# --- monitoring (issue 20; docs/observability.md) ---------------------------------------------------
.PHONY: prometheus-rules prometheus-test

## prometheus-rules: the alert rules through promtool (check + fixture tests); seconds, no root.
prometheus-rules: setup
	promtool check rules chart/files/alerts/speculum.rules.yaml
	cd tests/prometheus && promtool test rules speculum.rules.test.yaml

## prometheus-test: tests/rig/prometheus.rs: promtool, the ServiceMonitors against the binaries'
## ports, and real Prometheus scraping the namespace rig (every dashboard panel returns data,
## every alert rule evaluates). Root; about 35 s once built (a fresh RIG_DIR first builds the
## rig's CRI client and test images: minutes).
prometheus-test: build
	cargo test --test rig prometheus:: -- --nocapture
