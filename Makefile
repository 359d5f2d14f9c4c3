# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
# Cargo's build output is kept outside the clone when CARGO_TARGET_DIR is set (CI sets it so
# repeated runs on one machine reuse the build).

CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
export SPECULUM_BIN ?= $(CARGO_TARGET_DIR)/debug/speculum

.PHONY: setup build demo test unit rig-down fmt lint

setup:
	@bash scripts/setup.sh

build: setup
	cargo build --workspace --bins

## demo: a 3-node cluster on network namespaces with real containerd; shows where bytes come from.
demo: build
	bash tests/rig/demo.sh

## test: every test: unit, conformance on real containerd, registry, DHT, namespace cluster.
test: build
	cargo test --workspace --no-fail-fast

## unit: the fast tests only (no root, no containerd).
unit:
	cargo test --workspace --lib

rig-down:
	bash tests/rig/rig.sh down

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets
