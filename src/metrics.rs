//! The daemon's Prometheus metrics: one owned registry (no globals), built by the composition
//! root and handed to the parts that record into it, and the `/metrics` text encoder.
//!
//! Names follow `speculum_<subsystem>_<what>_<unit>`. Label values are small fixed sets
//! (handler, kind, source, status class) so cardinality stays bounded whatever clients send,
//! and are written in Prometheus style: lower case, `snake_case` (`mirror`, `peer_inflight`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which listener handled a request.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Handler {
    /// The containerd-facing mirror endpoint.
    Mirror,
    /// The endpoint other daemons fetch from.
    Peer,
}

/// Where the bytes of a response came from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Source {
    /// This node's containerd content store.
    Local,
    /// Another node, through the peer endpoint.
    Peer,
    /// This node's own blob cache (`src/cache`), complete or in flight.
    Cache,
    /// Fetched from upstream by this daemon just now (it won the blob's claim).
    Upstream,
    /// Another node's in-flight fetch, followed as it arrives.
    PeerInflight,
}

impl Source {
    /// The audit `served_from` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Peer => "peer",
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::PeerInflight => "peer-inflight",
        }
    }
}

/// Outcome of a mirror request.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Served from this node's store.
    Local,
    /// Served from another node.
    Peer,
    /// Nobody had it: 404, containerd goes upstream.
    Miss,
}

impl Handler {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Handler::Mirror => "mirror",
            Handler::Peer => "peer",
        }
    }
}

impl Source {
    /// The metric label value (the audit's [`Source::as_str`] spells the last one with a dash).
    pub fn label(self) -> &'static str {
        match self {
            Source::PeerInflight => "peer_inflight",
            other => other.as_str(),
        }
    }
}

impl Outcome {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Peer => "peer",
            Outcome::Miss => "miss",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.label())
            }
        }
    )*};
}
label_value!(Handler, Source, Outcome);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub handler: Handler,
    pub kind: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub kind: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub handler: Handler,
    pub source: Source,
}

/// One containerd configuration problem (`src/store/introspect.rs` `Finding::label`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContainerdProblemLabels {
    pub problem: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerFailureLabels {
    pub reason: &'static str,
}

/// `source`: who named a tag's digest — `upstream`, `cluster` or `stale`
/// (`registry::tags::TagSource`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TagLabels {
    pub source: &'static str,
}

/// Every metric the daemon records. Cheap to clone (each metric is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub mirror: Family<MirrorLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    /// The part of `bytes` the kernel sent straight from content files (`sendfile(2)`).
    pub sendfile_bytes: Counter,
    pub peer_failures: Family<PeerFailureLabels, Counter>,
    pub resumes: Counter,
    /// Tag requests on the mirror endpoint by who named the digest.
    pub tag_resolutions: Family<TagLabels, Counter>,
    /// Time of the upstream `HEAD` that resolves a tag (`upstream-first`).
    pub tag_upstream_duration: Histogram,
    pub lookup_duration: Histogram,
    pub advertised_keys: Gauge,
    pub peers: Gauge,
    /// Inbound DHT connections that failed the handshake (no or another pre-shared key).
    pub handshake_failures: Counter,
    /// Peers marked unreachable (silent on ping, or no answer to `has`).
    pub peers_unreachable: Counter,
    pub ready: Gauge,
    /// 1 for each containerd configuration problem found at start (`speculum_containerd_config_problem`).
    pub containerd_problems: Family<ContainerdProblemLabels, Gauge>,
    /// Decisions, evaluation latency, reloads (`speculum_policy_*`).
    pub policy: crate::policy::PolicyMetrics,
    /// Audit lines written and dropped (`speculum_audit_*`).
    pub audit: crate::audit::AuditMetrics,
    /// Upstream bytes fetched and saved, coalesced followers (`speculum_upstream_*`,
    /// `speculum_cache_*`).
    pub cache: crate::cache::coalesce::CacheMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("speculum");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Registry API requests by listener, kind, method and status",
            requests.clone(),
        );
        let request_duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to response headers of registry API requests",
            request_duration.clone(),
        );
        let mirror = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "mirror_requests",
            "Mirror requests by kind and outcome (local hit, peer hit, miss)",
            mirror.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "served_bytes",
            "Bytes of manifests and blobs sent, by listener and source",
            bytes.clone(),
        );
        let sendfile_bytes = Counter::default();
        registry.register(
            "served_sendfile_bytes",
            "Bytes of served_bytes sent from content files with sendfile(2), all listeners",
            sendfile_bytes.clone(),
        );
        let peer_failures = Family::<PeerFailureLabels, Counter>::default();
        registry.register(
            "mirror_peer_failures",
            "Failed attempts to fetch from a peer, by reason",
            peer_failures.clone(),
        );
        let resumes = Counter::default();
        registry.register(
            "mirror_resumes",
            "Blob streams resumed from another peer after a break",
            resumes.clone(),
        );
        let tag_resolutions = Family::<TagLabels, Counter>::default();
        registry.register(
            "mirror_tag_resolutions",
            "Tag requests by who named the digest (upstream, cluster, stale: the cluster because upstream could not answer)",
            tag_resolutions.clone(),
        );
        let tag_upstream_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "mirror_tag_upstream_duration_seconds",
            "Time of the anonymous upstream HEAD that resolves a tag, token included",
            tag_upstream_duration.clone(),
        );
        let lookup_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "routing_lookup_duration_seconds",
            "Time from lookup start to the first peer found",
            lookup_duration.clone(),
        );
        let advertised_keys = Gauge::default();
        registry.register(
            "routing_advertised_keys",
            "Keys (digests and tags) this node advertises",
            advertised_keys.clone(),
        );
        let peers = Gauge::default();
        registry.register("routing_peers", "Connected DHT peers", peers.clone());
        let handshake_failures = Counter::default();
        registry.register(
            "routing_handshake_failures",
            "Inbound DHT connections that failed before authentication (no or another pre-shared key, scanners)",
            handshake_failures.clone(),
        );
        let peers_unreachable = Counter::default();
        registry.register(
            "routing_peers_unreachable",
            "Peers marked unreachable and left out of lookups for a while: silent on ping, or no answer to a has request",
            peers_unreachable.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when the daemon reports ready", ready.clone());
        let containerd_problems = Family::<ContainerdProblemLabels, Gauge>::default();
        registry.register(
            "containerd_config_problem",
            "1 when the node's containerd configuration keeps this node from serving well (hosts dir not read, layers discarded, content root not visible; hosts_dir_unknown: containerd does not say)",
            containerd_problems.clone(),
        );
        let policy = crate::policy::PolicyMetrics::register(&mut registry);
        let audit = crate::audit::AuditMetrics::register(&mut registry);
        let cache = crate::cache::coalesce::CacheMetrics::register(&mut registry);
        Metrics {
            registry: Arc::new(registry),
            requests,
            request_duration,
            mirror,
            bytes,
            sendfile_bytes,
            peer_failures,
            resumes,
            tag_resolutions,
            tag_upstream_duration,
            lookup_duration,
            advertised_keys,
            peers,
            handshake_failures,
            peers_unreachable,
            ready,
            containerd_problems,
            policy,
            audit,
            cache,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail except on a formatter error, which would be a bug
        // in prometheus-client; an empty page is the safe answer then.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
