//! The containerd tier: tests against a real, private containerd of the version matrix
//! (`RIG_CONTAINERD`, default the 2.x LTS; `containerd.sh` in this directory builds and
//! configures each line). Needs root (containerd's root directory and snapshotters).
//!
//! Run: `cargo test --test containerd`, one file: `cargo test --test containerd
//! store_conformance::`, another line: `RIG_CONTAINERD=1.7 cargo test --test containerd`.
//!
//! Adding a file: put `tests/containerd/<name>.rs` next to this one and list it below.

mod daemon;
mod load;
mod sendfile;
mod store_conformance;
