//! Swarm distribution over real HTTP on loopback: the peer endpoint's serving cap (429 with
//! `Retry-After`, the mirror moving on at once), a big blob fetched as chunks from several
//! holders (a holder breaking mid-chunk replaced, a corrupt one never yielding a complete
//! body), an open-ended client range asked for one window at a time, and a whole peer blob
//! teed into the receiver's cache and advertised (`src/registry/peers.rs`, `src/wire/chunks.rs`,
//! `src/wire/verify.rs`).
//!
//! Holders are speculum's own peer endpoint over a memory store, each with its own metrics,
//! plus small hand-written servers for the broken and lying ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use speculum::cache::Cache;
use speculum::metrics::Metrics;
use speculum::oci::Digest;
use speculum::policy::Advert;
use speculum::readiness::Readiness;
use speculum::registry::peers::CacheTee;
use speculum::registry::{self, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::memory::{MemoryNetwork, MemoryRouter};
use speculum::routing::{Peer, Router, ServingLoad};
use speculum::store::memory::MemoryStore;
use testkit::peers::{peer, spawn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const NS: &str = "127.0.0.1%3A5000";

/// A holder: a real peer endpoint over a memory store with `blob`, its metrics and its cap.
struct Holder {
    addr: SocketAddr,
    metrics: Metrics,
    serving: ServingLoad,
}

async fn holder(blob: &[u8], limit: u32) -> Holder {
    let store = Arc::new(MemoryStore::new());
    store.add_blob(blob.to_vec());
    let metrics = Metrics::new();
    let serving = ServingLoad::new(limit);
    let addr = spawn(registry::app(RegistryState {
        store,
        mirror: None,
        cache: None,
        metrics: metrics.registry.clone(),
        readiness: Readiness::new(),
        handler: Handler::Peer,
        serving: serving.clone(),
    }))
    .await;
    Holder {
        addr,
        metrics,
        serving,
    }
}

struct Node {
    addr: SocketAddr,
    metrics: Metrics,
}

async fn mirror_on(router: MemoryRouter, config: MirrorConfig, tee: Option<CacheTee>) -> Node {
    let metrics = Metrics::new();
    let mut mirror =
        Mirror::new(Arc::new(router), config, metrics.registry.clone()).expect("client");
    if let Some(tee) = tee {
        mirror = mirror.with_tee(tee);
    }
    let addr = spawn(registry::app(RegistryState {
        store: Arc::new(MemoryStore::new()),
        mirror: Some(Arc::new(mirror)),
        cache: None,
        metrics: metrics.registry.clone(),
        readiness: Readiness::new(),
        handler: Handler::Mirror,
        serving: Default::default(),
    }))
    .await;
    Node { addr, metrics }
}

async fn mirror_node(d: &Digest, peers: Vec<Peer>, config: MirrorConfig) -> Node {
    let router = MemoryRouter::with_static(HashMap::from([(d.to_string(), peers)]));
    mirror_on(router, config, None).await
}

fn config() -> MirrorConfig {
    MirrorConfig {
        read_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(300),
        ..MirrorConfig::default()
    }
}

/// Chunked above 256 KiB, in 64 KiB chunks, 3 at a time.
fn chunky() -> MirrorConfig {
    MirrorConfig {
        chunk_threshold: 256 << 10,
        chunk_size: 64 << 10,
        chunk_parallel: 3,
        ..config()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn blob(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn metric(metrics: &Metrics, prefix: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Bytes a holder's peer endpoint served.
fn served(h: &Holder) -> f64 {
    metric(
        &h.metrics,
        "speculum_served_bytes_total{handler=\"peer\",source=\"local\"}",
    )
}

fn url(node: &Node, d: &Digest) -> String {
    format!("http://{}/v2/rig/app/blobs/{d}?ns={NS}", node.addr)
}

/// Polls `f` every 20 ms until it holds, at most `bound`.
async fn until(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test]
async fn a_holder_at_its_cap_answers_429_with_retry_after() {
    let content = blob(10_000);
    let d = Digest::sha256_of(&content);
    let h = holder(&content, 1).await;
    let _slot = h.serving.try_enter().expect("the one slot");
    let r = client()
        .get(format!("http://{}/v2/rig/app/blobs/{d}?ns={NS}", h.addr))
        .header("x-speculum-hop", "1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    // A HEAD and a manifest take no slot: only blob bodies count against the uplink.
    let r = client()
        .head(format!("http://{}/v2/rig/app/blobs/{d}?ns={NS}", h.addr))
        .header("x-speculum-hop", "1")
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_slot_is_held_for_the_body_and_given_back_after_it() {
    // Larger than the socket buffers: the holder's body is still alive while unread.
    let content = blob(32 << 20);
    let d = Digest::sha256_of(&content);
    let h = holder(&content, 4).await;
    let r = client()
        .get(format!("http://{}/v2/rig/app/blobs/{d}?ns={NS}", h.addr))
        .header("x-speculum-hop", "1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(h.serving.now().serving, 1, "held while the body streams");
    let body = r.bytes().await.expect("body");
    assert_eq!(body.len(), content.len());
    assert!(
        until(Duration::from_secs(5), || h.serving.now().serving == 0).await,
        "slot given back after the body"
    );
}

/// The first holder is at its cap: the mirror takes the second at once and the pull is whole.
#[tokio::test]
async fn the_mirror_moves_past_a_busy_holder_at_once() {
    let content = blob(300_000);
    let d = Digest::sha256_of(&content);
    let busy = holder(&content, 1).await;
    let _slot = busy.serving.try_enter().expect("the one slot");
    let free = holder(&content, 8).await;
    let node = mirror_node(
        &d,
        vec![peer("busy", busy.addr), peer("free", free.addr)],
        config(),
    )
    .await;
    let r = client().get(url(&node, &d)).send().await.expect("get");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(Digest::sha256_of(&body), d);
    assert_eq!(
        metric(
            &node.metrics,
            "speculum_mirror_peer_failures_total{reason=\"busy\"}"
        ),
        1.0
    );
    assert_eq!(served(&busy), 0.0, "the busy holder sent nothing");
}

/// Every holder busy: the mirror answers 404 (containerd goes upstream), never an error.
#[tokio::test]
async fn every_holder_busy_is_a_plain_miss() {
    let content = blob(1000);
    let d = Digest::sha256_of(&content);
    let a = holder(&content, 1).await;
    let b = holder(&content, 1).await;
    let _sa = a.serving.try_enter().expect("slot");
    let _sb = b.serving.try_enter().expect("slot");
    let node = mirror_node(&d, vec![peer("a", a.addr), peer("b", b.addr)], config()).await;
    let r = client().get(url(&node, &d)).send().await.expect("get");
    assert_eq!(r.status(), 404);
}

/// A big blob with three holders comes in chunks from all three, whole and in order.
#[tokio::test]
async fn a_big_blob_comes_from_every_holder() {
    let content = blob(1 << 20);
    let d = Digest::sha256_of(&content);
    let hs = [
        holder(&content, 0).await,
        holder(&content, 0).await,
        holder(&content, 0).await,
    ];
    let peers = hs
        .iter()
        .enumerate()
        .map(|(i, h)| peer(&format!("h{i}"), h.addr))
        .collect();
    let node = mirror_node(&d, peers, chunky()).await;
    let r = client().get(url(&node, &d)).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(content.len() as u64));
    let body = r.bytes().await.expect("body");
    assert_eq!(
        Digest::sha256_of(&body),
        d,
        "the chunks, in order, are the blob"
    );
    assert_eq!(
        metric(&node.metrics, "speculum_mirror_chunked_blobs_total"),
        1.0
    );
    for (i, h) in hs.iter().enumerate() {
        assert!(
            until(Duration::from_secs(2), || served(h) >= (64 << 10) as f64).await,
            "holder {i} served {} bytes, want at least one chunk",
            served(h)
        );
    }
}

/// A holder that answers ranges with 206 but breaks half-way through each: its chunks are
/// continued elsewhere from the first missing byte, and the body is whole.
#[tokio::test]
async fn a_chunk_whose_holder_breaks_is_fetched_elsewhere() {
    let content = blob(1 << 20);
    let d = Digest::sha256_of(&content);
    let good = holder(&content, 0).await;
    let broken = half_range_peer(d.clone(), content.clone()).await;
    let node = mirror_node(
        &d,
        vec![peer("good", good.addr), peer("broken", broken)],
        chunky(),
    )
    .await;
    let r = client().get(url(&node, &d)).send().await.expect("get");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(Digest::sha256_of(&body), d);
    assert!(metric(&node.metrics, "speculum_mirror_chunk_refetches_total") >= 1.0);
}

/// A holder that sends wrong bytes under the right digest: the client never gets a complete
/// body (the connection ends short of its Content-Length).
#[tokio::test]
async fn a_corrupt_blob_never_reaches_the_client_whole() {
    let content = blob(200_000);
    let d = Digest::sha256_of(&content);
    let mut wrong = content.clone();
    wrong[150_000] ^= 0xff;
    let liar = whole_peer(d.clone(), wrong).await;
    let node = mirror_node(&d, vec![peer("liar", liar)], config()).await;
    let r = client().get(url(&node, &d)).send().await.expect("get");
    assert_eq!(r.status(), 200);
    let mut got = 0usize;
    let mut failed = false;
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed || got < content.len(),
        "a wrong blob arrived complete ({got} bytes)"
    );
}

/// `Range: bytes=0-`, read for one window and dropped (containerd's parallel fetch): the
/// holder sends a few windows (what the socket buffers between absorb), not the whole
/// remainder. Read to the end, the same kind of range is the whole remainder, with the right
/// Content-Range.
#[tokio::test]
async fn an_open_ended_range_is_fetched_one_window_at_a_time() {
    const MIB: usize = 1 << 20;
    let content = blob(64 * MIB);
    let d = Digest::sha256_of(&content);
    let h = holder(&content, 0).await;
    let cfg = MirrorConfig {
        chunk_size: MIB as u64,
        ..config()
    };
    let node = mirror_node(&d, vec![peer("h", h.addr)], cfg).await;

    let r = client()
        .get(url(&node, &d))
        .header("range", "bytes=1000-")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 206);
    let size = content.len();
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1000-{}/{size}", size - 1).as_str()
    );
    let body = r.bytes().await.expect("body");
    assert!(body[..] == content[1000..], "the whole remainder, in order");
    let whole = served(&h);

    let r = client()
        .get(url(&node, &d))
        .header("range", "bytes=0-")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 206);
    let mut s = r.bytes_stream();
    let mut got = 0usize;
    while got < MIB {
        got += s.next().await.expect("more").expect("bytes").len();
    }
    drop(s);
    // Count once the holder is idle (no slot taken) and its byte count stopped moving between
    // two polls (between two windows it is idle for a moment too).
    let mut last = -1.0;
    let settled = until(Duration::from_secs(10), || {
        let now = served(&h);
        let idle = h.serving.now().serving == 0 && now == last;
        last = now;
        idle
    })
    .await;
    assert!(settled, "the holder kept sending");
    let sent = served(&h) - whole;
    assert!(
        sent <= (24 * MIB) as f64,
        "the holder sent {sent} bytes for a 1 MiB read of an open-ended range of 64 MiB"
    );
}

/// A whole blob streamed from a peer lands in the receiver's cache, verified, and the
/// receiver is a holder at once; a blob the policy keeps from being advertised is not teed.
#[tokio::test]
async fn a_peer_blob_is_teed_into_the_cache_and_advertised() {
    let content = blob(500_000);
    let d = Digest::sha256_of(&content);
    let h = holder(&content, 0).await;
    let network = MemoryNetwork::new();
    network.advertise_as(&peer("h", h.addr), [d.to_string()]);
    let me = peer("me", "127.0.0.1:1".parse().expect("addr"));
    let dir = tempfile::tempdir().expect("dir");
    let cache = Cache::open(dir.path(), 64 << 20).expect("cache");
    let allow = Arc::new(|_: &speculum::store::Image| Advert {
        content: true,
        tag: true,
    });
    let node = mirror_on(
        network.router(me.clone()),
        config(),
        Some(CacheTee {
            cache: cache.clone(),
            allow,
        }),
    )
    .await;
    let r = client().get(url(&node, &d)).send().await.expect("get");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(Digest::sha256_of(&body), d);
    assert!(
        until(Duration::from_secs(5), || cache.complete().contains(&d)).await,
        "the blob is complete in the cache"
    );
    let other = network.router(peer("other", "127.0.0.1:2".parse().expect("addr")));
    let mut rx = other.lookup(&d.to_string(), 5).await.expect("lookup");
    let mut found = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        found.push(p.id);
    }
    assert!(found.contains(&"me".to_owned()), "advertised: {found:?}");
    assert_eq!(
        metric(
            &node.metrics,
            "speculum_mirror_teed_blobs_total{result=\"complete\"}"
        ),
        1.0
    );

    // Denied by the policy: streamed, not kept.
    let other_blob = blob(300_000);
    let od = Digest::sha256_of(&other_blob);
    let h2 = holder(&other_blob, 0).await;
    network.advertise_as(&peer("h2", h2.addr), [od.to_string()]);
    let dir2 = tempfile::tempdir().expect("dir");
    let cache2 = Cache::open(dir2.path(), 64 << 20).expect("cache");
    let deny = Arc::new(|_: &speculum::store::Image| Advert {
        content: false,
        tag: false,
    });
    let node2 = mirror_on(
        network.router(peer("me2", "127.0.0.1:3".parse().expect("addr"))),
        config(),
        Some(CacheTee {
            cache: cache2.clone(),
            allow: deny,
        }),
    )
    .await;
    let r = client().get(url(&node2, &od)).send().await.expect("get");
    let body = r.bytes().await.expect("body");
    assert_eq!(Digest::sha256_of(&body), od);
    assert!(!cache2.contains(&od), "not teed against the policy");
}

/// Answers every request with the whole `body` (200) under `digest`, ignoring Range.
async fn whole_peer(digest: Digest, body: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            let digest = digest.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\ndocker-content-digest: {digest}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Answers a ranged request with a proper 206 head but only the first half of the range
/// (then closes); a request without a range gets 200 and half the blob.
async fn half_range_peer(digest: Digest, body: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            let digest = digest.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_lowercase();
                let size = body.len() as u64;
                let range = req.lines().find_map(|l| {
                    let spec = l.strip_prefix("range: bytes=")?.trim();
                    let (a, b) = spec.split_once('-')?;
                    let a: u64 = a.parse().ok()?;
                    let b: u64 = b.parse().unwrap_or(size - 1).min(size - 1);
                    Some((a, b))
                });
                let (status, start, end, extra) = match range {
                    Some((a, b)) => (
                        "206 Partial Content",
                        a,
                        b,
                        format!("content-range: bytes {a}-{b}/{size}\r\n"),
                    ),
                    None => ("200 OK", 0, size - 1, String::new()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}docker-content-digest: {digest}\r\nconnection: close\r\n\r\n",
                    end - start + 1
                );
                let half = start + (end - start + 1).div_euclid(2);
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body[start as usize..half as usize]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}
