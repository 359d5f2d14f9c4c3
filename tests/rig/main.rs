//! The namespace-rig tier: several nodes, each in its own network namespace with a real
//! containerd (or real CRI-O, `crio`) and a speculum daemon, and a real upstream registry, driven through
//! `tests/rig/rig.sh` (`testkit::rig`). Needs root; without it, or with `SPECULUM_SKIP_RIG=1`,
//! each test says why on stderr and passes. The tests take the rig one at a time (one
//! process-wide mutex, plus the machine-wide lock `${RIG_DIR}.lock`).
//!
//! Run: `cargo test --test rig`, one scenario: `cargo test --test rig cluster::`; the fault
//! matrix (ignored by default): `cargo test --test rig faults:: -- --ignored --nocapture`.
//! A private rig: `RIG_DIR=/tmp/x RIG_NS_PREFIX=x- RIG_SUBNET=10.250.99 cargo test --test rig`.
//!
//! Adding a file: put `tests/rig/<name>.rs` next to this one and list it below.

mod cimage;
mod cluster;
mod coalesce;
mod crio;
mod doctor;
mod faults;
mod parallel_fetch;
mod partition;
mod prometheus;
mod status_page;
mod swarm;
mod tenancy;
