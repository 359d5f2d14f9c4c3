//! Real peers for mirror tests, each a server on 127.0.0.1:0: speculum's own peer endpoint over
//! a memory store (good), the same over an empty store (404), a closed port (unreachable), one
//! that accepts and never answers (silent), one that breaks mid-body (flaky), and one that lies
//! about a digest. Plus [`spawn`], which serves any axum app on loopback through the daemon's
//! production transport (`speculum::server`: the GET/HEAD writer first, hyper after a hand-off).

use std::net::SocketAddr;
use std::sync::Arc;

use speculum::oci::Digest;
use speculum::readiness::Readiness;
use speculum::registry::{self, Handler, RegistryState};
use speculum::routing::Peer;
use speculum::store::memory::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `app` on a fresh 127.0.0.1 port (with the client address as `ConnectInfo`).
pub async fn spawn(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(speculum::server::serve(
        listener,
        app,
        registry::serve_options(),
        std::future::pending::<()>(),
    ));
    addr
}

/// The router's view of a peer at `addr`.
pub fn peer(name: &str, addr: SocketAddr) -> Peer {
    Peer {
        id: name.to_owned(),
        addr,
        load: None,
    }
}

/// A real speculum peer endpoint serving `store`.
pub async fn good_peer(store: Arc<MemoryStore>) -> SocketAddr {
    spawn(registry::app(RegistryState {
        store,
        mirror: None,
        cache: None,
        metrics: Default::default(),
        readiness: Readiness::new(),
        handler: Handler::Peer,
        serving: Default::default(),
    }))
    .await
}

/// A real peer endpoint with nothing in its store: 404 for everything.
pub async fn not_found_peer() -> SocketAddr {
    good_peer(Arc::new(MemoryStore::new())).await
}

/// A port nothing listens on.
pub async fn unreachable_peer() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// Accepts connections and never answers.
pub async fn silent_peer() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Answers 200 with the full Content-Length, sends only the first `cut` bytes, then closes.
pub async fn flaky_peer(digest: Digest, body: Vec<u8>, cut: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\ndocker-content-digest: {digest}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body[..cut]).await;
            let _ = s.shutdown().await;
        }
    });
    addr
}

/// Claims a digest for a manifest whose bytes hash to something else.
pub async fn lying_peer(claimed: Digest) -> SocketAddr {
    use axum::routing::get;
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
    spawn(axum::Router::new().fallback(get(move || {
        let claimed = claimed.to_string();
        async move {
            (
                [
                    (
                        "content-type",
                        "application/vnd.oci.image.manifest.v1+json".to_owned(),
                    ),
                    ("docker-content-digest", claimed),
                ],
                body,
            )
        }
    })))
    .await
}
