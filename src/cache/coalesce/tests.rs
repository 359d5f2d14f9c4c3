//! Coalescing with the memory router: several nodes, each with its own cache and a real peer
//! endpoint on `127.0.0.1:0`, and a real HTTP upstream that counts its GETs and sends slowly.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;

use super::*;
use crate::readiness::Readiness;
use crate::registry::Handler;
use crate::registry::{self, RegistryState};
use crate::routing::memory::{MemoryNetwork, MemoryRouter};
use crate::store::memory::MemoryStore;
use crate::wire::PeerClient;

const REPO: &str = "rig/app";

#[derive(Clone)]
struct Upstream {
    blob: Bytes,
    gets: Arc<AtomicUsize>,
}

/// A registry serving one blob in 16 chunks, 15 ms apart (a slow link: the nodes' requests
/// overlap the download), with `Range` support.
async fn upstream_blob(State(up): State<Upstream>, uri: Uri, headers: HeaderMap) -> Response {
    if !uri.path().contains("/blobs/") {
        return StatusCode::NOT_FOUND.into_response();
    }
    up.gets.fetch_add(1, Ordering::SeqCst);
    let size = up.blob.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0);
    let body = up.blob.slice(start..);
    let step = size.div_ceil(16).max(1);
    let chunks: Vec<Bytes> = (0..body.len())
        .step_by(step)
        .map(|i| body.slice(i..(i + step).min(body.len())))
        .collect();
    let stream = futures::stream::iter(chunks).then(|c| async move {
        // A slow link, not synchronisation.
        tokio::time::sleep(Duration::from_millis(15)).await;
        Ok::<_, std::io::Error>(c)
    });
    let mut b = Response::builder().header(header::CONTENT_LENGTH, body.len());
    b = if start > 0 {
        b.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", size - 1),
        )
    } else {
        b.status(StatusCode::OK)
    };
    b.body(HttpBody::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn serve(listener: tokio::net::TcpListener, app: axum::Router) {
    // The production transport (`server::http1` first, hyper after a hand-off).
    let _ = crate::server::serve(
        listener,
        app,
        registry::serve_options(),
        std::future::pending::<()>(),
    )
    .await;
}

async fn bind() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    (l, addr)
}

struct Node {
    coalescer: Coalescer,
    _dir: tempfile::TempDir,
}

/// Node `i`: a cache, a coalescer on `network`, and its peer endpoint serving the cache.
async fn node(i: usize, network: &MemoryNetwork, upstream: SocketAddr) -> Node {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (listener, addr) = bind().await;
    let router: MemoryRouter = network.router(Peer {
        id: format!("node-{i}"),
        addr,
        load: None,
    });
    let cache = Cache::open(dir.path(), 64 * 1024 * 1024).unwrap_or_else(|e| panic!("{e}"));
    let config = CacheConfig {
        enabled: true,
        dir: dir.path().to_owned(),
        plain_http: vec![upstream.to_string()],
        ..CacheConfig::default()
    };
    let peers = PeerClient::new(Duration::from_millis(500), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let coalescer = Coalescer::new(cache, Arc::new(router), config, Default::default(), peers)
        .unwrap_or_else(|e| panic!("{e}"));
    let app = registry::app(RegistryState {
        store: Arc::new(MemoryStore::new()),
        mirror: None,
        cache: Some(coalescer.clone()),
        metrics: Default::default(),
        readiness: Readiness::new(),
        handler: Handler::Peer,
        serving: Default::default(),
    });
    tokio::spawn(serve(listener, app));
    Node {
        coalescer,
        _dir: dir,
    }
}

fn blob(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add((i >> 8) as u8))
        .collect::<Vec<u8>>()
        .into()
}

async fn body_bytes(body: Body) -> Result<Vec<u8>, String> {
    let chunks: Vec<Bytes> = body.stream.try_collect().await.map_err(|e| e.to_string())?;
    Ok(chunks.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_fetch_once_and_everyone_gets_the_blob() {
    let data = blob(3 * 1024 * 1024 + 11);
    let digest = Digest::sha256_of(&data);
    let gets = Arc::new(AtomicUsize::new(0));
    let (listener, up_addr) = bind().await;
    tokio::spawn(serve(
        listener,
        axum::Router::new()
            .fallback(upstream_blob)
            .with_state(Upstream {
                blob: data.clone(),
                gets: gets.clone(),
            }),
    ));
    let network = MemoryNetwork::new();
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(node(i, &network, up_addr).await);
    }
    let ns = up_addr.to_string();
    let path = format!("/v2/{REPO}/blobs/{digest}?ns={}", ns.replace(':', "%3A"));
    let fetches = nodes.iter().map(|n| {
        let (c, ns, digest, path) = (
            n.coalescer.clone(),
            ns.clone(),
            digest.clone(),
            path.clone(),
        );
        async move {
            let body = c
                .fetch(&ns, REPO, &digest, None, &path, &http::HeaderMap::new())
                .await
                .ok_or("no body")?;
            let origin = body.origin;
            let size = body.size;
            body_bytes(body).await.map(|b| (origin, size, b))
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(fetches))
        .await
        .unwrap_or_else(|_| panic!("coalesced fetches did not finish in 30s"));
    let mut origins = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (origin, size, bytes) = r.unwrap_or_else(|e| panic!("node {i}: {e}"));
        assert_eq!(size, data.len() as u64, "node {i}: announced size");
        assert!(
            bytes == data,
            "node {i}: wrong bytes ({} of {})",
            bytes.len(),
            data.len()
        );
        origins.push(origin);
    }
    assert_eq!(gets.load(Ordering::SeqCst), 1, "upstream GETs: {origins:?}");
    assert_eq!(
        origins.iter().filter(|o| **o == Origin::Upstream).count(),
        1,
        "one winner: {origins:?}"
    );
    assert_eq!(
        origins
            .iter()
            .filter(|o| **o == Origin::PeerInflight)
            .count(),
        3,
        "three followers: {origins:?}"
    );
    let followers: u64 = nodes
        .iter()
        .map(|n| n.coalescer.metrics().followers())
        .sum();
    let saved: u64 = nodes
        .iter()
        .map(|n| n.coalescer.metrics().saved_bytes())
        .sum();
    let fetched: u64 = nodes
        .iter()
        .map(|n| n.coalescer.metrics().upstream_bytes())
        .sum();
    assert_eq!(followers, 3);
    assert_eq!(
        saved,
        3 * data.len() as u64,
        "bytes served to followers from the cache"
    );
    assert_eq!(fetched, data.len() as u64);
    // The winner's copy completes and is verified. Readers may see the last byte before the
    // writer has verified and committed the file, so this is polled (bounded), not read once.
    let complete = || {
        nodes
            .iter()
            .filter(|n| n.coalescer.cache().complete() == vec![digest.clone()])
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while complete() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(complete(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_coordinator_means_fetch_it_yourself() {
    let data = blob(100_000);
    let digest = Digest::sha256_of(&data);
    let gets = Arc::new(AtomicUsize::new(0));
    let (listener, up_addr) = bind().await;
    tokio::spawn(serve(
        listener,
        axum::Router::new()
            .fallback(upstream_blob)
            .with_state(Upstream {
                blob: data.clone(),
                gets: gets.clone(),
            }),
    ));
    let network = MemoryNetwork::new();
    let lone = node(0, &network, up_addr).await;
    // Every node dead, this one included: the claim cannot be made.
    network.kill("node-0");
    let body = lone
        .coalescer
        .fetch(
            &up_addr.to_string(),
            REPO,
            &digest,
            None,
            "/unused",
            &http::HeaderMap::new(),
        )
        .await
        .unwrap_or_else(|| panic!("no body without a coordinator"));
    assert_eq!(body.origin, Origin::Upstream);
    assert!(body_bytes(body).await.ok() == Some(data.to_vec()));
    assert_eq!(gets.load(Ordering::SeqCst), 1);
}
