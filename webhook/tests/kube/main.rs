//! The webhook against Kubernetes: the chart's webhook half (helm) and the E2E tests against a
//! real kube-apiserver + etcd (`testkit::k8s`). The API-server tests skip when not root or with
//! `SPECULUM_SKIP_K8S=1`; helm-only tests skip without helm unless `CI=true`.
//!
//! Run: `cargo test -p speculum-webhook --test kube`, one file: `… --test kube chart::`.
//!
//! Adding a file: put `webhook/tests/kube/<name>.rs` next to this one and list it below.

mod chart;
mod e2e_kube;
