//! Test support for every speculum test harness, compiled once as a crate: the harnesses
//! (`tests/{loopback,containerd,rig,tools,cluster}/main.rs`, `webhook/tests/{offline,kube}/main.rs`)
//! link it instead of each test file compiling a `tests/common` copy of its own.
//!
//! One job: start and stop the real things tests run against, and nothing about what they
//! assert. Each module owns one such thing:
//!
//! - [`cimage`]: a containers/image node (skopeo, podman: what CRI-O pulls with) with its own
//!   registries.conf.d and storage, optionally inside a rig namespace.
//! - [`containerd`]: a private containerd of the version matrix (`RIG_CONTAINERD`).
//! - [`daemon`]: the `speculum registry` binary as a child process on loopback.
//! - [`dht`]: bounded polls over real `KademliaRouter`s.
//! - [`peers`]: real peer endpoints that are good, answer 404, are unreachable, silent, flaky
//!   or lie about a digest.
//! - [`rig`]: the network-namespace rig (`tests/rig/rig.sh`), behind the machine-wide lock.
//! - [`cluster`]: the kubelet cluster tier (`tests/cluster/cluster.sh`).
//! - [`k8s`]: etcd + kube-apiserver on 127.0.0.1 (`tests/k8s/control-plane.sh`).
//! - [`helm`]: the pinned `helm` and the chart rendered into JSON objects.
//! - [`registries`]: a real CNCF distribution registry with optional Basic or token auth.

use std::path::{Path, PathBuf};

pub mod cimage;
pub mod cluster;
pub mod containerd;
pub mod daemon;
pub mod dht;
pub mod helm;
pub mod k8s;
pub mod peers;
pub mod registries;
pub mod rig;

/// The repository's root: the directory holding `tests/`, `chart/` and `bench/`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ sits in the repository root")
        .to_path_buf()
}

/// A binary of the workspace that cargo built next to the running test harness
/// (`target/<profile>/deps/<harness>` → `target/<profile>/<name>`). Cargo builds a package's
/// binaries before its integration tests, which is what `CARGO_BIN_EXE_<name>` relies on too;
/// that variable is only visible to the test crate itself, not to this one.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test harness's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the harness runs from target/<profile>/deps");
    profile_dir.join(name)
}
