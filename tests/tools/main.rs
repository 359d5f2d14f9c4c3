//! The tools tier: speculum against the real tools around it — helm (`chart`), OPA
//! (`policy_opa`), a real kube-apiserver + etcd (`k8s_control_plane`, `tenancy_kube`, part of
//! `chart`), the image tools (`image`: umoci, skopeo, buildah; `crio_conf`: skopeo and podman
//! reading the CRI-O drop-in), containers/image pulls through the mirror (`cimage`: skopeo,
//! podman, docker-registry) and the benchmark scripts
//! (`bench_smoke`). Each file finds its tool the way its doc says: helm and OPA tests skip
//! without the tool (fail under `CI=true` / `SPECULUM_REQUIRE_OPA=1`), the kube-apiserver tests
//! skip when not root or with `SPECULUM_SKIP_K8S=1`, `bench_smoke` with `SPECULUM_SKIP_RIG=1` or
//! `SPECULUM_SKIP_BENCH=1`, and `image` never skips (a missing tool fails it).
//!
//! Run: `cargo test --test tools`, one file: `cargo test --test tools chart::`.
//!
//! Adding a file: put `tests/tools/<name>.rs` next to this one and list it below.

mod bench_smoke;
mod chart;
mod cimage;
mod crio_conf;
mod image;
mod k8s_control_plane;
mod policy_opa;
mod tenancy_kube;
