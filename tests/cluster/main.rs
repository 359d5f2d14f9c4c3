//! The cluster tier: a real kubelet cluster on network namespaces (`cluster.sh` in this
//! directory, `testkit::cluster`), the chart installed with Helm, every scenario through it.
//! Never skipped unless `SPECULUM_SKIP_CLUSTER=1`; `make cluster-test` runs it.
//!
//! Run: `cargo test --test kube_cluster -- --nocapture`.
//!
//! Adding a file: put `tests/cluster/<name>.rs` next to this one and list it below.

mod kube_cluster;
