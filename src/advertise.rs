//! Keeps what this node advertises in step with what its store holds.
//!
//! containerd 1.6 emits image events but no content events, so the loop reconciles on every
//! image event (debounced: one pull emits several) and also periodically, and after every
//! re-subscription (events may have been missed while disconnected). A reconcile computes
//! the wanted keys — each image's tag key and every digest of its closure — and advertises or
//! withdraws the difference. A store that cannot be read keeps the current set: a containerd
//! restart must not make the node vanish from the cluster. On shutdown everything is
//! withdrawn.
//!
//! With the blob cache on (`src/cache`), its complete entries are wanted too (also right after
//! a restart: the cache rebuilds its index from disk); the loop reconciles whenever the cache's
//! complete set changes, so evicted blobs are withdrawn. In-flight blobs are advertised by the
//! coalescer itself, at once. Manifests the node fetched are cache entries too, and the tags
//! that named them (`cache::manifests`) are wanted while their manifest is complete.
//!
//! Order: tag keys and manifests (they gate a pull: a node that cannot find the manifest goes
//! upstream for all of it) go out with [`Router::advertise_first`], ahead of any backlog; the
//! other digests with [`Router::advertise`], which the router paces (`routing.publish_rate`).
//! A node starting with 10 k blobs is findable by tag within the first announcements.
//!
//! containerd ≥ 2.1 also says when each blob lands (`StoreEvent::ContentAdded`, before any
//! image names it): such a blob is advertised at once, without waiting for the pull to end,
//! when the policy allows it for one of the repositories it was pulled from. Until an image's
//! closure covers it, reconciles keep it for [`EARLY_GRACE`] while the store still has it;
//! after that only images keep it (a pull that failed leaves nothing advertised for long).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::oci::{Digest, media};
use crate::policy::Advert;
use crate::readiness::Readiness;
use crate::routing::Router;
use crate::routing::metrics::RoutingMetrics;
use crate::shutdown::Shutdown;
use crate::store::{Image, Store, StoreError, StoreEvent};

/// Settings of the advertisement loop (`sync:` config section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Full reconcile interval, in addition to event-driven ones.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Quiet time after an image event before reconciling, to batch the events of one pull.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            reconcile_interval: Duration::from_secs(60),
            debounce: Duration::from_millis(200),
        }
    }
}

impl SyncConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.reconcile_interval < Duration::from_secs(1) {
            errors.push("sync.reconcile_interval must be at least 1s".to_owned());
        }
        if self.debounce > Duration::from_secs(10) {
            errors.push("sync.debounce must be at most 10s".to_owned());
        }
        errors
    }
}

/// Decides whether an image may be advertised (the policy hook; everything by default).
pub(crate) type ImageFilter = Arc<dyn Fn(&Image) -> bool + Send + Sync>;

/// The richer policy hook: decides per image what of it is advertised.
pub(crate) type AdvertFilter = Arc<dyn Fn(&Image) -> Advert + Send + Sync>;

/// The advertisement loop. Build it, then `run` it until shutdown.
pub struct Advertiser {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    config: SyncConfig,
    filter: AdvertFilter,
    metrics: RoutingMetrics,
    readiness: Readiness,
    advertised: BTreeSet<String>,
    cache: Option<Arc<Cache>>,
    /// Blobs advertised from content events that no image covers yet, and since when.
    early: BTreeMap<String, tokio::time::Instant>,
}

const READINESS_PART: crate::readiness::Part = crate::readiness::Part::Store;

/// How long a blob advertised from its content event stays advertised without an image
/// naming it: longer than any pull takes to end (a pull of many large layers on a slow link).
pub(crate) const EARLY_GRACE: Duration = Duration::from_secs(15 * 60);

impl Advertiser {
    pub fn new(
        store: Arc<dyn Store>,
        router: Arc<dyn Router>,
        config: SyncConfig,
        metrics: RoutingMetrics,
        readiness: Readiness,
    ) -> Advertiser {
        readiness.block(READINESS_PART, "first reconcile pending");
        Advertiser {
            store,
            router,
            config,
            filter: Arc::new(|_| Advert {
                content: true,
                tag: true,
            }),
            metrics,
            readiness,
            advertised: BTreeSet::new(),
            cache: None,
            early: BTreeMap::new(),
        }
    }

    /// Also advertises the complete blobs of this node's own cache.
    pub fn with_cache(mut self, cache: Option<Arc<Cache>>) -> Advertiser {
        self.cache = cache;
        self
    }

    /// Only images the filter accepts are advertised (what may not be served is not
    /// advertised either).
    pub fn with_filter(mut self, filter: ImageFilter) -> Advertiser {
        self.filter = Arc::new(move |image| {
            let ok = filter(image);
            Advert {
                content: ok,
                tag: ok,
            }
        });
        self
    }

    /// Like [`Advertiser::with_filter`], deciding content and tag separately.
    pub fn with_advert_filter(mut self, filter: AdvertFilter) -> Advertiser {
        self.filter = filter;
        self
    }

    /// The keys advertised now (for tests and the debug view).
    pub fn advertised(&self) -> &BTreeSet<String> {
        &self.advertised
    }

    /// Runs until `shutdown`, then withdraws every advertised key.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut ticker = tokio::time::interval(self.config.reconcile_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events: Option<BoxStream<'static, StoreEvent>> = None;
        let mut backoff = Backoff::new();
        let mut dirty = true;
        let mut cache_changes = self.cache.as_ref().map(|c| c.changes());
        let stop = shutdown.clone().wait();
        tokio::pin!(stop);
        loop {
            if events.is_none() && backoff.due() {
                match self.store.watch().await {
                    Ok(stream) => {
                        events = Some(stream);
                        backoff.reset();
                        dirty = true; // events may have been missed while unsubscribed
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching store events failed; retrying");
                        backoff.failed();
                    }
                }
            }
            if dirty {
                self.reconcile().await;
                dirty = false;
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = ticker.tick() => dirty = true,
                _ = backoff.sleep(), if events.is_none() => {}
                changed = cache_changed(&mut cache_changes) => {
                    if changed {
                        // Batch a burst of completions into one reconcile.
                        tokio::time::sleep(self.config.debounce).await;
                        dirty = true;
                    } else {
                        cache_changes = None;
                    }
                }
                event = next(&mut events) => match event {
                    Some(StoreEvent::ContentAdded { digest, sources }) => {
                        self.advertise_early(&digest, &sources).await;
                    }
                    Some(event) => {
                        tracing::debug!(?event, "store event");
                        self.debounce(&mut events).await;
                        dirty = true;
                    }
                    None => {
                        tracing::info!("store event stream ended; re-subscribing");
                        events = None;
                    }
                },
            }
        }
        self.withdraw_all().await;
    }

    /// Swallows further image events until `debounce` passes without one; content events
    /// met on the way are still advertised.
    async fn debounce(&mut self, events: &mut Option<BoxStream<'static, StoreEvent>>) {
        while let Ok(Some(event)) = tokio::time::timeout(self.config.debounce, next(events)).await {
            if let StoreEvent::ContentAdded { digest, sources } = event {
                self.advertise_early(&digest, &sources).await;
            }
        }
    }

    /// Advertises a blob that just landed, if the policy allows it for one of the
    /// repositories it came from (the image is not known yet: the policy sees that
    /// repository, no tag, and the blob's digest). No sources: left to the reconcile.
    async fn advertise_early(&mut self, digest: &crate::oci::Digest, sources: &[(String, String)]) {
        let key = digest.to_string();
        if self.advertised.contains(&key) {
            return;
        }
        let allowed = sources.iter().any(|(registry, repository)| {
            (self.filter)(&Image {
                registry: registry.clone(),
                repository: repository.clone(),
                tag: None,
                digest: digest.clone(),
            })
            .content
        });
        if !allowed {
            tracing::debug!(digest = %digest, ?sources, "content event: not advertised early");
            return;
        }
        // A pull is in progress and other nodes may be waiting for it: ahead of any backlog.
        match self.router.advertise_first(vec![key.clone()]).await {
            Ok(()) => {
                self.advertised.insert(key.clone());
                self.early.insert(key, tokio::time::Instant::now());
                self.metrics.advertised_keys(self.advertised.len());
                tracing::debug!(digest = %digest, "advertised on its content event");
            }
            Err(e) => tracing::warn!(error = %e, digest = %digest, "advertise failed"),
        }
    }

    /// Computes the wanted keys and advertises/withdraws the difference.
    pub async fn reconcile(&mut self) {
        let wanted = match self.wanted().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "reading the store failed; keeping current advertisements");
                self.readiness
                    .block(READINESS_PART, format!("store unreadable: {e}"));
                return;
            }
        };
        self.readiness.release(READINESS_PART);
        let (mut wanted, first) = wanted;
        self.keep_early(&mut wanted).await;
        let add: Vec<String> = wanted.difference(&self.advertised).cloned().collect();
        let remove: Vec<String> = self.advertised.difference(&wanted).cloned().collect();
        let (urgent, backlog): (Vec<String>, Vec<String>) =
            add.iter().cloned().partition(|k| first.contains(k));
        for (keys, urgent) in [(urgent, true), (backlog, false)] {
            if keys.is_empty() {
                continue;
            }
            let sent = if urgent {
                self.router.advertise_first(keys.clone()).await
            } else {
                self.router.advertise(keys.clone()).await
            };
            match sent {
                Ok(()) => self.advertised.extend(keys),
                Err(e) => tracing::warn!(error = %e, "advertise failed"),
            }
        }
        if !remove.is_empty() {
            match self.router.withdraw(remove.clone()).await {
                Ok(()) => {
                    for k in &remove {
                        self.advertised.remove(k);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "withdraw failed"),
            }
        }
        self.metrics.advertised_keys(self.advertised.len());
        if !add.is_empty() || !remove.is_empty() {
            tracing::info!(
                added = add.len(),
                removed = remove.len(),
                total = self.advertised.len(),
                "advertisements reconciled"
            );
        }
    }

    /// The keys wanted, and of those the ones to announce first (tags and manifests).
    async fn wanted(&self) -> Result<(BTreeSet<String>, BTreeSet<String>), StoreError> {
        let mut wanted = BTreeSet::new();
        let mut first = BTreeSet::new();
        for image in self.store.images().await? {
            let advert = (self.filter)(&image);
            if !advert.content {
                continue;
            }
            let (digests, manifests) =
                closure_manifests(self.store.as_ref(), &image.digest).await?;
            if digests.is_empty() {
                continue; // an image record whose content is gone
            }
            if advert.tag {
                wanted.extend(image.tag_key());
                first.extend(image.tag_key());
            }
            wanted.extend(digests.iter().map(ToString::to_string));
            first.extend(manifests.iter().map(ToString::to_string));
        }
        if let Some(cache) = &self.cache {
            // Public blobs only ever enter the cache (policy is checked before a fetch).
            cache.take_events();
            wanted.extend(cache.complete().iter().map(ToString::to_string));
            // And the tags of the manifests it holds (`cache::manifests`): a node with no
            // containerd store answers tags too; tags go ahead of the backlog.
            let tags = cache.tag_keys();
            first.extend(tags.iter().cloned());
            wanted.extend(tags);
        }
        Ok((wanted, first))
    }

    /// Adds the early-advertised blobs no image covers yet to `wanted`, while they are young
    /// and the store still has them; forgets the rest (covered, expired or gone).
    async fn keep_early(&mut self, wanted: &mut BTreeSet<String>) {
        let early = std::mem::take(&mut self.early);
        for (key, since) in early {
            if wanted.contains(&key) || since.elapsed() >= EARLY_GRACE {
                continue;
            }
            let Ok(digest) = key.parse::<crate::oci::Digest>() else {
                continue;
            };
            match self.store.descriptor(&digest).await {
                Ok(None) => {}
                // Present, or cannot tell right now: keep it.
                Ok(Some(_)) | Err(_) => {
                    wanted.insert(key.clone());
                    self.early.insert(key, since);
                }
            }
        }
    }

    async fn withdraw_all(&mut self) {
        let all: Vec<String> = std::mem::take(&mut self.advertised).into_iter().collect();
        if all.is_empty() {
            return;
        }
        let n = all.len();
        if let Err(e) = self.router.withdraw(all).await {
            tracing::warn!(error = %e, "withdrawing on shutdown failed");
        }
        self.metrics.advertised_keys(0);
        tracing::info!(keys = n, "withdrew all advertisements");
    }
}

/// The next event, or pending forever when not subscribed (so `select!` ignores it).
/// The digests reachable from `root` (as [`crate::store::closure`]: parents first), and which
/// of them are manifests or indexes.
async fn closure_manifests(
    store: &dyn Store,
    root: &Digest,
) -> Result<(Vec<Digest>, Vec<Digest>), StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut manifests = Vec::new();
    let mut queue = vec![root.clone()];
    while let Some(d) = queue.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Some(desc) = store.descriptor(&d).await? else {
            continue;
        };
        out.push(d.clone());
        if media::is_manifest_type(&desc.media_type) {
            let bytes = store.read_small(&d, media::MAX_MANIFEST_BYTES).await?;
            queue.extend(media::children(&bytes).into_iter().map(|c| c.digest));
            manifests.push(d);
        }
    }
    Ok((out, manifests))
}

async fn next(events: &mut Option<BoxStream<'static, StoreEvent>>) -> Option<StoreEvent> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Waits for the cache's complete set to change; `false` once the cache is gone, pending
/// forever without a cache (so `select!` ignores it).
async fn cache_changed(rx: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Exponential backoff for re-subscribing: 0.5 s doubling to 30 s.
struct Backoff {
    delay: Duration,
    at: tokio::time::Instant,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            delay: Duration::from_millis(500),
            at: tokio::time::Instant::now(),
        }
    }
    fn due(&self) -> bool {
        tokio::time::Instant::now() >= self.at
    }
    fn reset(&mut self) {
        self.delay = Duration::from_millis(500);
    }
    fn failed(&mut self) {
        self.at = tokio::time::Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(30));
    }
    async fn sleep(&self) {
        tokio::time::sleep_until(self.at).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::mpsc;

    use super::*;
    use crate::metrics::Metrics;
    use crate::routing::{Claim, Peer, RouterError};
    use crate::store::memory::MemoryStore;

    /// Records every advertise call: its keys and whether it was `advertise_first`.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(bool, Vec<String>)>>,
    }

    #[async_trait]
    impl Router for Recorder {
        fn ready(&self) -> bool {
            true
        }
        async fn lookup(&self, _: &str, _: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
            Err(RouterError::Closed)
        }
        async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((false, keys));
            Ok(())
        }
        async fn advertise_first(&self, keys: Vec<String>) -> Result<(), RouterError> {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((true, keys));
            Ok(())
        }
        async fn withdraw(&self, _: Vec<String>) -> Result<(), RouterError> {
            Ok(())
        }
        async fn claim(&self, _: &str, _: Duration) -> Result<Claim, RouterError> {
            Err(RouterError::Closed)
        }
    }

    #[tokio::test]
    async fn tags_and_manifests_are_advertised_first_and_the_rest_as_backlog() {
        let store = Arc::new(MemoryStore::new());
        let layer = store.add_blob(vec![7u8; 1000]);
        let config = store.add_blob(r#"{"rootfs":{"type":"layers"}}"#);
        let manifest = store.add_blob(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"digest":"{config}","size":28}},"layers":[{{"digest":"{layer}","size":1000}}]}}"#
        ));
        let index = store.add_blob(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest}","size":300,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        ));
        store.set_image("127.0.0.1:5000/rig/multi:v1", index.clone());
        let router = Arc::new(Recorder::default());
        let mut advertiser = Advertiser::new(
            store,
            router.clone(),
            SyncConfig::default(),
            Metrics::new().routing.clone(),
            Readiness::new(),
        );
        advertiser.reconcile().await;
        let calls = router
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let urgent = sorted(vec![
            "127.0.0.1:5000/rig/multi:v1".to_owned(),
            index.to_string(),
            manifest.to_string(),
        ]);
        let backlog = sorted(vec![config.to_string(), layer.to_string()]);
        assert_eq!(
            calls,
            vec![(true, urgent), (false, backlog)],
            "urgent first, then the backlog"
        );
        // Nothing new: nothing sent again.
        advertiser.reconcile().await;
        assert_eq!(
            router.calls.lock().unwrap_or_else(|p| p.into_inner()).len(),
            2
        );
    }
}
