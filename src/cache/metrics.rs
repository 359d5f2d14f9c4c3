//! The blob cache's metrics, one job: `speculum_upstream_*` and `speculum_cache_*` (bytes
//! fetched from and saved on upstream, coalesced followers, downloads started, bytes held),
//! private, with one recording method per event and readers for tests. Registered into the
//! daemon's registry by the aggregator ([`crate::metrics`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The cache's metrics. Cheap to clone; [`Default`] is registered nowhere.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    /// Bytes this node fetched from upstream registries.
    upstream_bytes: Counter,
    /// Bytes served from this node's cache that would otherwise have gone upstream.
    saved_bytes: Counter,
    /// Pulls that followed another node's fetch instead of going upstream.
    followers: Counter,
    /// Blob downloads this node started from upstream (claims won or fallen back to).
    fetches: Counter,
    /// Bytes held in the cache.
    bytes: Gauge,
}

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> CacheMetrics {
        let m = CacheMetrics::default();
        registry.register(
            "upstream_bytes",
            "Bytes this node fetched from upstream registries itself (cache.upstream_fetch)",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "upstream_saved_bytes",
            "Bytes served from the blob cache (to containerd or peers) that would otherwise have come from upstream",
            m.saved_bytes.clone(),
        );
        registry.register(
            "cache_coalesced_followers",
            "Cold blob pulls that followed another node's upstream fetch",
            m.followers.clone(),
        );
        registry.register(
            "cache_upstream_fetches",
            "Blob downloads this node started from upstream",
            m.fetches.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held in the blob cache",
            m.bytes.clone(),
        );
        m
    }

    /// `n` bytes arrived from upstream.
    pub fn fetched_upstream(&self, n: u64) {
        self.upstream_bytes.inc_by(n);
    }

    /// `n` bytes went out of the cache instead of coming from upstream.
    pub fn saved(&self, n: u64) {
        self.saved_bytes.inc_by(n);
    }

    /// A cold pull followed another node's fetch.
    pub fn followed(&self) {
        self.followers.inc();
    }

    /// This node started a download from upstream.
    pub fn fetch_started(&self) {
        self.fetches.inc();
    }

    /// The cache holds `n` bytes now.
    pub fn held(&self, n: u64) {
        self.bytes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Bytes fetched from upstream so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.upstream_bytes.get()
    }

    /// Bytes served from the cache so far.
    pub fn saved_bytes(&self) -> u64 {
        self.saved_bytes.get()
    }

    /// Followers so far.
    pub fn followers(&self) -> u64 {
        self.followers.get()
    }
}
