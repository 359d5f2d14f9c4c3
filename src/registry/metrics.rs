//! The registry's metrics, one job: the families the two listeners record into
//! (`speculum_http_*`, `speculum_mirror_*`, `speculum_served_*`, and the lookup time the
//! mirror sees), private, with one recording method per event. Registered into the daemon's
//! registry by the aggregator ([`crate::metrics`]); names are pinned by `tests/loopback/metrics_names.rs`.
//!
//! Label values are small fixed sets (handler, kind, source, status) so cardinality stays
//! bounded whatever clients send, written in Prometheus style: lower case, `snake_case`.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

    /// The metric label value (the audit's [`Source::as_str`] spells the last one with a dash).
    pub fn label(self) -> &'static str {
        match self {
            Source::PeerInflight => "peer_inflight",
            other => other.as_str(),
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
struct RequestLabels {
    handler: Handler,
    kind: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorLabels {
    kind: &'static str,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    handler: Handler,
    source: Source,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerFailureLabels {
    reason: &'static str,
}

/// `result` of a blob teed into the cache: `complete` (verified, kept) or `failed`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// `source`: who named a tag's digest — `upstream`, `cluster` or `stale`
/// (`registry::tags::TagSource`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TagLabels {
    source: &'static str,
}

/// Every metric the registry records. Cheap to clone (each family is an `Arc` inside).
#[derive(Clone)]
pub struct RegistryMetrics {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram>,
    mirror: Family<MirrorLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    /// The part of `bytes` the kernel sent straight from content files (`sendfile(2)`).
    sendfile_bytes: Counter,
    peer_failures: Family<PeerFailureLabels, Counter>,
    resumes: Counter,
    chunked_blobs: Counter,
    chunk_refetches: Counter,
    teed_blobs: Family<ResultLabels, Counter>,
    tag_resolutions: Family<TagLabels, Counter>,
    tag_upstream_duration: Histogram,
    /// `routing_lookup_duration_seconds`: the time to the first peer *as the mirror sees it*
    /// (lookup and `has` check), so the registry records it.
    lookup_duration: Histogram,
}

impl Default for RegistryMetrics {
    /// Registered nowhere (for tools and tests that do not read them).
    fn default() -> Self {
        RegistryMetrics::register(&mut Registry::default())
    }
}

impl RegistryMetrics {
    pub fn register(registry: &mut Registry) -> RegistryMetrics {
        let m = RegistryMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            mirror: Family::default(),
            bytes: Family::default(),
            sendfile_bytes: Counter::default(),
            peer_failures: Family::default(),
            resumes: Counter::default(),
            chunked_blobs: Counter::default(),
            chunk_refetches: Counter::default(),
            teed_blobs: Family::default(),
            tag_resolutions: Family::default(),
            tag_upstream_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            lookup_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        registry.register(
            "http_requests",
            "Registry API requests by listener, kind, method and status",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to response headers of registry API requests",
            m.request_duration.clone(),
        );
        registry.register(
            "mirror_requests",
            "Mirror requests by kind and outcome (local hit, peer hit, miss)",
            m.mirror.clone(),
        );
        registry.register(
            "served_bytes",
            "Bytes of manifests and blobs sent, by listener and source",
            m.bytes.clone(),
        );
        registry.register(
            "served_sendfile_bytes",
            "Bytes of served_bytes sent from content files with sendfile(2), all listeners",
            m.sendfile_bytes.clone(),
        );
        registry.register(
            "mirror_peer_failures",
            "Failed attempts to fetch from a peer, by reason",
            m.peer_failures.clone(),
        );
        registry.register(
            "mirror_resumes",
            "Blob streams resumed from another peer after a break",
            m.resumes.clone(),
        );
        registry.register(
            "mirror_chunked_blobs",
            "Blobs fetched as parallel Range chunks from several holders",
            m.chunked_blobs.clone(),
        );
        registry.register(
            "mirror_chunk_refetches",
            "Chunks (or windows) continued at another holder after theirs failed",
            m.chunk_refetches.clone(),
        );
        registry.register(
            "mirror_teed_blobs",
            "Blobs streamed from peers and written into this node's cache as they passed, by result (complete, failed)",
            m.teed_blobs.clone(),
        );
        registry.register(
            "mirror_tag_resolutions",
            "Tag requests by who named the digest (upstream, cluster, stale: the cluster because upstream could not answer)",
            m.tag_resolutions.clone(),
        );
        registry.register(
            "mirror_tag_upstream_duration_seconds",
            "Time of the anonymous upstream HEAD that resolves a tag, token included",
            m.tag_upstream_duration.clone(),
        );
        registry.register(
            "routing_lookup_duration_seconds",
            "Time from lookup start to the first peer found",
            m.lookup_duration.clone(),
        );
        m
    }

    /// One answered request: counted and timed by listener, kind, method and status.
    pub fn request(
        &self,
        handler: Handler,
        kind: &'static str,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let labels = RequestLabels {
            handler,
            kind,
            method,
            status,
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// The outcome of one mirror-endpoint request.
    pub fn mirror_outcome(&self, kind: &'static str, outcome: Outcome) {
        self.mirror
            .get_or_create(&MirrorLabels { kind, outcome })
            .inc();
    }

    /// The served-bytes counter of `handler` for `source`, for a body to count into.
    pub fn bytes(&self, handler: Handler, source: Source) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels { handler, source })
            .clone()
    }

    /// The counter of bytes sent with `sendfile(2)` (a part of [`RegistryMetrics::bytes`]).
    pub fn sendfile_bytes(&self) -> Counter {
        self.sendfile_bytes.clone()
    }

    /// One failed attempt to fetch from a peer.
    pub fn peer_failed(&self, reason: &'static str) {
        self.peer_failures
            .get_or_create(&PeerFailureLabels { reason })
            .inc();
    }

    /// A broken peer blob stream continued at another peer.
    pub fn resumed(&self) {
        self.resumes.inc();
    }

    /// A blob fetched as chunks from several holders.
    pub fn chunked(&self) {
        self.chunked_blobs.inc();
    }

    /// A chunk continued at another holder.
    pub fn chunk_refetched(&self) {
        self.chunk_refetches.inc();
    }

    /// A blob teed into the cache ended: `complete` or `failed`.
    pub fn teed(&self, result: &'static str) {
        self.teed_blobs
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A tag request, by who named its digest.
    pub fn tag_resolved(&self, source: &'static str) {
        self.tag_resolutions
            .get_or_create(&TagLabels { source })
            .inc();
    }

    /// The time of one upstream tag `HEAD`.
    pub fn tag_upstream(&self, elapsed: Duration) {
        self.tag_upstream_duration.observe(elapsed.as_secs_f64());
    }

    /// The time from a mirror lookup's start to its first peer.
    pub fn first_peer(&self, elapsed: Duration) {
        self.lookup_duration.observe(elapsed.as_secs_f64());
    }
}
