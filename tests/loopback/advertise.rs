//! The advertisement loop (`advertise::Advertiser`) on the memory twins: what the store
//! holds is advertised, deletions are withdrawn, an unreadable store keeps the current set,
//! and shutdown withdraws everything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use speculum::advertise::{Advertiser, SyncConfig};
use speculum::metrics::Metrics;
use speculum::oci::{ByteRange, Digest};
use speculum::readiness::Readiness;
use speculum::routing::memory::MemoryNetwork;
use speculum::routing::{Peer, Router};
use speculum::shutdown;
use speculum::store::memory::MemoryStore;
use speculum::store::{ContentStream, Descriptor, Image, Store, StoreError, StoreEvent};

/// A memory store whose image listing can be made to fail, like containerd restarting.
struct Flaky {
    inner: MemoryStore,
    down: AtomicBool,
}

#[async_trait]
impl Store for Flaky {
    async fn images(&self) -> Result<Vec<Image>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("containerd restarting"));
        }
        self.inner.images().await
    }
    async fn resolve(&self, r: &str, n: &str, t: &str) -> Result<Option<Digest>, StoreError> {
        self.inner.resolve(r, n, t).await
    }
    async fn descriptor(&self, d: &Digest) -> Result<Option<Descriptor>, StoreError> {
        self.inner.descriptor(d).await
    }
    async fn open(&self, d: &Digest, r: Option<ByteRange>) -> Result<ContentStream, StoreError> {
        self.inner.open(d, r).await
    }
    async fn watch(&self) -> Result<BoxStream<'static, StoreEvent>, StoreError> {
        self.inner.watch().await
    }
}

fn peer(id: &str) -> Peer {
    Peer {
        id: id.to_owned(),
        addr: SocketAddr::from(([127, 0, 0, 1], 5081)),
        load: None,
    }
}

/// Polls `lookup(key)` from `from` until the set of provider ids equals `want` (bounded).
async fn wait_for(from: &dyn Router, key: &str, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut rx = from.lookup(key, 10).await.expect("lookup");
        let mut got = Vec::new();
        while let Some(p) = rx.recv().await {
            got.push(p.id);
        }
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "key {key}: providers {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn advertises_what_the_store_holds_and_withdraws_on_delete_and_shutdown() {
    let net = MemoryNetwork::new();
    let router_a = Arc::new(net.router(peer("a")));
    let router_b = net.router(peer("b"));
    let store = Arc::new(Flaky {
        inner: MemoryStore::new(),
        down: AtomicBool::new(false),
    });
    let layer = store.inner.add_blob(vec![7u8; 1000]);
    let config = store.inner.add_blob(r#"{"rootfs":{"type":"layers"}}"#);
    let manifest = store.inner.add_blob(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"digest":"{config}","size":28}},"layers":[{{"digest":"{layer}","size":1000}}]}}"#
    ));
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let (trigger, stop) = shutdown::channel();
    let advertiser = Advertiser::new(
        store.clone(),
        router_a.clone(),
        SyncConfig {
            reconcile_interval: Duration::from_secs(3600),
            debounce: Duration::from_millis(10),
        },
        metrics.routing.clone(),
        readiness.clone(),
    );
    let task = tokio::spawn(advertiser.run(stop));

    // An image event makes the whole closure and the tag appear.
    store
        .inner
        .set_image("127.0.0.1:5000/rig/app:v1", manifest.clone());
    for key in [
        "127.0.0.1:5000/rig/app:v1".to_owned(),
        manifest.to_string(),
        config.to_string(),
        layer.to_string(),
    ] {
        wait_for(&router_b, &key, &["a"]).await;
    }
    assert!(
        readiness.is_ready(),
        "store part released after a good reconcile"
    );

    // A store that cannot be read keeps what is advertised (a containerd restart must not
    // make the node vanish), even when an event asks for a reconcile.
    store.down.store(true, Ordering::SeqCst);
    store
        .inner
        .set_image("127.0.0.1:5000/rig/other:v1", manifest.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while readiness.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never reflected the failure"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for(&router_b, &layer.to_string(), &["a"]).await;
    store.down.store(false, Ordering::SeqCst);

    // Deleting the tag withdraws the tag key; the digests stay while another image uses them.
    store.inner.delete_image("127.0.0.1:5000/rig/app:v1");
    wait_for(&router_b, "127.0.0.1:5000/rig/app:v1", &[]).await;
    wait_for(&router_b, "127.0.0.1:5000/rig/other:v1", &["a"]).await;
    wait_for(&router_b, &layer.to_string(), &["a"]).await;

    // Shutdown withdraws everything.
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("advertiser stops")
        .expect("no panic");
    wait_for(&router_b, &layer.to_string(), &[]).await;
    wait_for(&router_b, "127.0.0.1:5000/rig/other:v1", &[]).await;
    assert!(
        metrics
            .encode()
            .contains("speculum_routing_advertised_keys 0")
    );
}

/// A memory store whose events come from the test (the content events of containerd 2.1+).
struct Scripted {
    inner: MemoryStore,
    events: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<StoreEvent>>>,
}

#[async_trait]
impl Store for Scripted {
    async fn images(&self) -> Result<Vec<Image>, StoreError> {
        self.inner.images().await
    }
    async fn resolve(&self, r: &str, n: &str, t: &str) -> Result<Option<Digest>, StoreError> {
        self.inner.resolve(r, n, t).await
    }
    async fn descriptor(&self, d: &Digest) -> Result<Option<Descriptor>, StoreError> {
        self.inner.descriptor(d).await
    }
    async fn open(&self, d: &Digest, r: Option<ByteRange>) -> Result<ContentStream, StoreError> {
        self.inner.open(d, r).await
    }
    async fn watch(&self) -> Result<BoxStream<'static, StoreEvent>, StoreError> {
        use futures::StreamExt;
        let rx = self
            .events
            .lock()
            .expect("lock")
            .take()
            .ok_or_else(|| StoreError::unavailable("one subscription only"))?;
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }
}

/// containerd ≥ 2.1's content events: a blob that lands is advertised at once when the policy
/// allows one of its sources, before any image names it, and stays advertised through
/// reconciles while the store has it; no source, a refused source, or a blob gone by the next
/// reconcile: not advertised (or withdrawn).
#[tokio::test]
async fn content_events_advertise_a_blob_before_its_image_exists() {
    let net = MemoryNetwork::new();
    let router_a = Arc::new(net.router(peer("a")));
    let router_b = net.router(peer("b"));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let store = Arc::new(Scripted {
        inner: MemoryStore::new(),
        events: std::sync::Mutex::new(Some(rx)),
    });
    let allowed = store.inner.add_blob(vec![1u8; 100]);
    let unlabelled = store.inner.add_blob(vec![2u8; 100]);
    let refused = store.inner.add_blob(vec![3u8; 100]);
    let vanishing = store.inner.add_blob(vec![4u8; 100]);
    let (trigger, stop) = shutdown::channel();
    let advertiser = Advertiser::new(
        store.clone(),
        router_a.clone(),
        SyncConfig {
            reconcile_interval: Duration::from_secs(3600),
            debounce: Duration::from_millis(10),
        },
        Default::default(),
        Readiness::new(),
    )
    .with_filter(Arc::new(|image: &Image| image.repository != "private/app"));
    let task = tokio::spawn(advertiser.run(stop));
    let added = |digest: &Digest, sources: &[(&str, &str)]| StoreEvent::ContentAdded {
        digest: digest.clone(),
        sources: sources
            .iter()
            .map(|(r, p)| ((*r).to_owned(), (*p).to_owned()))
            .collect(),
    };
    for event in [
        added(&allowed, &[("10.0.0.2", "rig/app")]),
        added(&unlabelled, &[]),
        added(&refused, &[("10.0.0.2", "private/app")]),
        added(&vanishing, &[("10.0.0.2", "rig/app")]),
    ] {
        tx.send(event).await.expect("send");
    }
    wait_for(&router_b, &allowed.to_string(), &["a"]).await;
    wait_for(&router_b, &vanishing.to_string(), &["a"]).await;
    wait_for(&router_b, &unlabelled.to_string(), &[]).await;
    wait_for(&router_b, &refused.to_string(), &[]).await;

    // A reconcile (an image event for an unrelated image) keeps the early blob that is still
    // there and withdraws the one the store lost (a failed pull's content, collected).
    store.inner.remove_blob(&vanishing);
    let other = store.inner.add_blob(r#"{"rootfs":{"type":"layers"}}"#);
    store
        .inner
        .set_image("10.0.0.2:5000/rig/other:v1", other.clone());
    tx.send(StoreEvent::ImageChanged {
        name: "10.0.0.2:5000/rig/other:v1".to_owned(),
    })
    .await
    .expect("send");
    wait_for(&router_b, &vanishing.to_string(), &[]).await;
    wait_for(&router_b, &allowed.to_string(), &["a"]).await;

    trigger.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("advertiser stops")
        .expect("no panic");
    wait_for(&router_b, &allowed.to_string(), &[]).await;
}
