//! The daemon's Prometheus metrics, one job: aggregate. One owned registry (no globals),
//! prefixed `speculum`, holding each subsystem's own metrics struct (linkerd's
//! `app/core/src/metrics.rs`): the composition root builds it and hands each part only its
//! own struct; `/metrics` encodes it. The families live with the code that records them
//! (`registry::metrics`, `routing::metrics`, `cache::metrics`, `policy`, `audit`); only the
//! daemon-wide health gauges are defined here. Imported by the composition root only; [`text`]
//! reads an exposition back (doctor, status page).
//!
//! Names follow `speculum_<subsystem>_<what>_<unit>` and are pinned by
//! `tests/loopback/metrics_names.rs`; label values are lower case, `snake_case` (`mirror`,
//! `peer_inflight`).

pub mod text;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::audit::AuditMetrics;
use crate::cache::metrics::CacheMetrics;
use crate::policy::PolicyMetrics;
use crate::registry::metrics::RegistryMetrics;
use crate::routing::metrics::RoutingMetrics;

/// One containerd configuration problem (`src/store/introspect.rs` `Finding::label`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerdProblemLabels {
    problem: &'static str,
}

/// Every metric the daemon records. Cheap to clone (each metric is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    prometheus: Arc<Registry>,
    /// Requests, bytes served, peer fetches, tags (`speculum_http_*`, `speculum_mirror_*`,
    /// `speculum_served_*`, `speculum_routing_lookup_duration_seconds`).
    pub registry: RegistryMetrics,
    /// Advertised keys, DHT peers, handshakes, unreachable peers (`speculum_routing_*`).
    pub routing: RoutingMetrics,
    /// Decisions, evaluation latency, reloads (`speculum_policy_*`).
    pub policy: PolicyMetrics,
    /// Audit lines written and dropped (`speculum_audit_*`).
    pub audit: AuditMetrics,
    /// Upstream bytes fetched and saved, coalesced followers (`speculum_upstream_*`,
    /// `speculum_cache_*`).
    pub cache: CacheMetrics,
    ready: Gauge,
    containerd_problems: Family<ContainerdProblemLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("speculum");
        let subsystems = (
            RegistryMetrics::register(&mut registry),
            RoutingMetrics::register(&mut registry),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when the daemon reports ready", ready.clone());
        let containerd_problems = Family::<ContainerdProblemLabels, Gauge>::default();
        registry.register(
            "containerd_config_problem",
            "1 when the node's containerd configuration keeps this node from serving well (hosts dir not read, layers discarded, content root not visible; hosts_dir_unknown: containerd does not say)",
            containerd_problems.clone(),
        );
        let policy = PolicyMetrics::register(&mut registry);
        let audit = AuditMetrics::register(&mut registry);
        let cache = CacheMetrics::register(&mut registry);
        Metrics {
            prometheus: Arc::new(registry),
            registry: subsystems.0,
            routing: subsystems.1,
            policy,
            audit,
            cache,
            ready,
            containerd_problems,
        }
    }

    /// `speculum_ready`: 1 when the daemon reports ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// `speculum_containerd_config_problem{problem}`: whether `problem` applies now.
    pub fn containerd_problem(&self, problem: &'static str, applies: bool) {
        self.containerd_problems
            .get_or_create(&ContainerdProblemLabels { problem })
            .set(i64::from(applies));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail except on a formatter error, which would be a bug
        // in prometheus-client; an empty page is the safe answer then.
        if prometheus_client::encoding::text::encode(&mut out, &self.prometheus).is_err() {
            out.clear();
        }
        out
    }
}
