//! Content served through a peer carries the same content headers as content served from the
//! node itself — `ETag` included (it was missing on peer responses before the registry's one
//! content-header builder, `src/registry/body.rs`). One job: compare the heads of one blob and
//! one manifest served locally (peer endpoint) and through the mirror endpoint from that peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use speculum::readiness::Readiness;
use speculum::registry::{self, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::Peer;
use speculum::routing::memory::MemoryRouter;
use speculum::store::memory::MemoryStore;
use tokio::net::TcpListener;

async fn spawn(app: axum::Router) -> SocketAddr {
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

fn state(store: Arc<MemoryStore>, mirror: Option<Mirror>, handler: Handler) -> RegistryState {
    RegistryState {
        store,
        mirror: mirror.map(Arc::new),
        cache: None,
        metrics: Default::default(),
        readiness: Readiness::new(),
        handler,
        serving: Default::default(),
    }
}

#[tokio::test]
async fn peer_served_content_has_the_local_headers() {
    let store = Arc::new(MemoryStore::new());
    let layer = store.add_blob(vec![3u8; 4096]);
    let config = store.add_blob(r#"{"rootfs":{"type":"layers"}}"#);
    let manifest = store.add_blob(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":28}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":4096}}]}}"#
    ));
    let peer = spawn(registry::app(state(store, None, Handler::Peer))).await;
    let routes: HashMap<String, Vec<Peer>> = [&layer, &manifest]
        .into_iter()
        .map(|d| {
            (
                d.to_string(),
                vec![Peer {
                    id: "p".into(),
                    addr: peer,
                    load: None,
                }],
            )
        })
        .collect();
    let mirror = Mirror::new(
        Arc::new(MemoryRouter::with_static(routes)),
        MirrorConfig::default(),
        Default::default(),
    )
    .expect("client");
    let node = spawn(registry::app(state(
        Arc::new(MemoryStore::new()),
        Some(mirror),
        Handler::Mirror,
    )))
    .await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let cases = [
        ("blob", format!("/v2/rig/x/blobs/{layer}"), None, "200"),
        (
            "blob range",
            format!("/v2/rig/x/blobs/{layer}"),
            Some("bytes=10-19"),
            "206",
        ),
        (
            "manifest",
            format!("/v2/rig/x/manifests/{manifest}"),
            None,
            "200",
        ),
    ];
    for (name, path, range, status) in cases {
        let mut heads = Vec::new();
        for addr in [peer, node] {
            let mut req = client.get(format!("http://{addr}{path}"));
            if let Some(r) = range {
                req = req.header("range", r);
            }
            let resp = req.send().await.expect("request");
            let h = resp.headers();
            let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
            heads.push((
                resp.status().as_str().to_owned(),
                get("etag"),
                get("docker-content-digest"),
                get("content-length"),
                get("content-range"),
                get("accept-ranges"),
                get("content-type"),
            ));
        }
        let (local, via_peer) = (&heads[0], &heads[1]);
        assert_eq!(local.0, status, "{name}: local status");
        let digest = local.2.clone().expect("digest header");
        assert_eq!(local.1, Some(format!("\"{digest}\"")), "{name}: local etag");
        assert_eq!(
            via_peer, local,
            "{name}: peer-served head equals the local one"
        );
    }
}
