//! The registry API and the peer mirror path, over real HTTP on loopback.
//!
//! Peers here are real servers: speculum's own peer endpoint over a memory store (good),
//! one that answers 404, a closed port (unreachable), one that accepts and never answers
//! (silent), one that breaks mid-body (flaky), and one that lies about a digest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use speculum::metrics::Metrics;
use speculum::oci::Digest;
use speculum::readiness::Readiness;
use speculum::registry::{self, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::Peer;
use speculum::routing::memory::MemoryRouter;
use speculum::store::memory::MemoryStore;
use testkit::peers::{
    flaky_peer, good_peer, lying_peer, not_found_peer, peer, silent_peer, spawn, unreachable_peer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "127.0.0.1%3A5000";
const REG: &str = "127.0.0.1:5000";

struct Node {
    addr: SocketAddr,
    store: Arc<MemoryStore>,
    metrics: Metrics,
}

/// A mirror endpoint whose router returns `peers` for each key.
async fn mirror_node(peers: HashMap<String, Vec<Peer>>, config: MirrorConfig) -> Node {
    mirror_node_on(MemoryRouter::with_static(peers), config).await
}

/// A mirror endpoint on `router`.
async fn mirror_node_on(router: MemoryRouter, config: MirrorConfig) -> Node {
    let store = Arc::new(MemoryStore::new());
    let metrics = Metrics::new();
    let mirror = Mirror::new(Arc::new(router), config, metrics.registry.clone()).expect("client");
    let addr = spawn(registry::app(RegistryState {
        store: store.clone(),
        mirror: Some(Arc::new(mirror)),
        cache: None,
        metrics: metrics.registry.clone(),
        readiness: Readiness::new(),
        handler: Handler::Mirror,
        serving: Default::default(),
    }))
    .await;
    Node {
        addr,
        store,
        metrics,
    }
}

fn quick() -> MirrorConfig {
    MirrorConfig {
        read_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        manifest_deadline: Duration::from_secs(2),
        ..MirrorConfig::default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Deterministic incompressible-looking content.
fn blob(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
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

fn manifest_for(config: &Digest, layer: &Digest, layer_len: usize) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{layer_len}}}]}}"#
    )
}

#[tokio::test]
async fn serves_local_content_with_registry_headers() {
    let node = mirror_node(HashMap::new(), quick()).await;
    let layer = blob(300_000);
    let ld = node.store.add_blob(layer.clone());
    let cd = node
        .store
        .add_blob(r#"{"architecture":"amd64","rootfs":{"type":"layers"}}"#);
    let m = manifest_for(&cd, &ld, layer.len());
    let md = node.store.add_blob(m.clone());
    node.store
        .set_image(&format!("{REG}/rig/app:v1"), md.clone());
    let c = client();
    let base = format!("http://{}", node.addr);

    let r = c.get(format!("{base}/v2/")).send().await.expect("v2");
    assert_eq!(r.status(), 200);

    // containerd's first request: HEAD by tag must carry the digest (notes/containerd-rig.md).
    let r = c
        .head(format!("{base}/v2/rig/app/manifests/v1?ns={NS}"))
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        md.to_string().as_str()
    );
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());

    let r = c
        .get(format!("{base}/v2/rig/app/manifests/{md}?ns={NS}"))
        .send()
        .await
        .expect("get manifest");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), m.as_bytes());

    let r = c
        .get(format!("{base}/v2/rig/app/blobs/{ld}?ns={NS}"))
        .send()
        .await
        .expect("blob");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.expect("body").as_ref(), layer.as_slice());

    let r = c
        .get(format!("{base}/v2/rig/app/blobs/{ld}"))
        .header("range", "bytes=100-199")
        .send()
        .await
        .expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{}", layer.len()).as_str()
    );
    assert_eq!(r.bytes().await.expect("body").as_ref(), &layer[100..200]);

    let r = c
        .get(format!("{base}/v2/rig/app/blobs/{ld}"))
        .header("range", format!("bytes={}-", layer.len()))
        .send()
        .await
        .expect("416");
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", layer.len()).as_str()
    );

    // A layer asked for as a manifest is a miss, not a broken manifest.
    let r = c
        .get(format!("{base}/v2/rig/app/manifests/{ld}"))
        .send()
        .await
        .expect("layer as manifest");
    assert_eq!(r.status(), 404);

    assert_eq!(
        metric(
            &node.metrics,
            "speculum_served_bytes_total{handler=\"mirror\",source=\"local\"}"
        ),
        (m.len() + layer.len() + 100) as f64
    );
}

#[tokio::test]
async fn errors_are_oci_json_and_never_5xx() {
    let node = mirror_node(HashMap::new(), quick()).await;
    let c = client();
    let base = format!("http://{}", node.addr);
    let d = Digest::sha256_of(b"nobody has this");
    let cases: Vec<(&str, reqwest::Method, String, u16, &str)> = vec![
        (
            "tag without ns",
            reqwest::Method::GET,
            "/v2/a/manifests/v1".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "unknown tag",
            reqwest::Method::HEAD,
            format!("/v2/a/manifests/v1?ns={NS}"),
            404,
            "",
        ),
        (
            "unknown blob",
            reqwest::Method::GET,
            format!("/v2/a/blobs/{d}"),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            "bad digest",
            reqwest::Method::GET,
            "/v2/a/blobs/sha256:1234".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "bad algorithm",
            reqwest::Method::GET,
            format!("/v2/a/blobs/md5:{}", d.hex()),
            400,
            "DIGEST_INVALID",
        ),
        (
            "bad name",
            reqwest::Method::GET,
            "/v2/A/manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "dots",
            reqwest::Method::GET,
            "/v2/a/.../manifests/v1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "push",
            reqwest::Method::POST,
            "/v2/a/blobs/uploads/".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "delete",
            reqwest::Method::DELETE,
            format!("/v2/a/manifests/{d}"),
            405,
            "UNSUPPORTED",
        ),
        (
            "catalog",
            reqwest::Method::GET,
            "/v2/_catalog".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "bad ns",
            reqwest::Method::GET,
            "/v2/a/manifests/v1?ns=a%2Fb".into(),
            400,
            "NAME_INVALID",
        ),
    ];
    for (name, method, path, status, code) in cases {
        let r = c
            .request(method, format!("{base}{path}"))
            .send()
            .await
            .expect(name);
        assert_eq!(r.status().as_u16(), status, "{name}");
        if !code.is_empty() {
            let body: serde_json::Value =
                serde_json::from_slice(&r.bytes().await.expect(name)).expect(name);
            assert_eq!(body["errors"][0]["code"], code, "{name}");
        }
    }
}

/// Sends a raw request line (HTTP clients normalise `..` away) and returns the status code.
async fn raw_status(addr: SocketAddr, target: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn path_traversal_is_refused_before_any_lookup() {
    let node = mirror_node(HashMap::new(), quick()).await;
    let d = Digest::sha256_of(b"x");
    for target in [
        "/v2/a/../../etc/manifests/v1".to_owned(),
        format!("/v2/../blobs/{d}"),
        "/v2/a/%2e%2e/b/manifests/v1".to_owned(),
        "/v2/a%2fb/manifests/v1".to_owned(),
    ] {
        assert_eq!(raw_status(node.addr, &target).await, 400, "{target}");
    }
}

#[tokio::test]
async fn mirror_skips_bad_peers_until_a_good_one() {
    let upstream = Arc::new(MemoryStore::new());
    let content = blob(200_000);
    let d = upstream.add_blob(content.clone());
    let good = good_peer(upstream).await;
    let peers = vec![
        peer("404", not_found_peer().await),
        peer("unreachable", unreachable_peer().await),
        peer("good", good),
    ];
    let node = mirror_node(HashMap::from([(d.to_string(), peers)]), quick()).await;
    let r = client()
        .get(format!("http://{}/v2/rig/app/blobs/{d}?ns={NS}", node.addr))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), content.as_slice());
    assert_eq!(
        metric(&node.metrics, "speculum_mirror_peer_failures_total"),
        2.0
    );
    assert_eq!(
        metric(
            &node.metrics,
            "speculum_served_bytes_total{handler=\"mirror\",source=\"peer\"}"
        ),
        content.len() as f64
    );
}

#[tokio::test]
async fn a_slow_lookup_still_finds_a_blob_but_a_manifest_goes_upstream() {
    let held = Arc::new(MemoryStore::new());
    let content = blob(50_000);
    let layer = held.add_blob(content.clone());
    let config = held.add_blob(b"{}".to_vec());
    let manifest = held.add_blob(manifest_for(&config, &layer, content.len()).into_bytes());
    let good = good_peer(held).await;
    let router = MemoryRouter::with_static([
        (layer.to_string(), vec![peer("good", good)]),
        (manifest.to_string(), vec![peer("good", good)]),
    ]);
    // Slower than the manifest budget, well inside the blob budget (defaults 20 / 250 ms).
    router.set_lookup_delay(Duration::from_millis(100));
    let defaults = MirrorConfig::default();
    assert!(defaults.resolve_timeout < Duration::from_millis(100));
    assert!(defaults.blob_resolve_timeout > Duration::from_millis(100));
    let node = mirror_node_on(router, quick()).await;
    let r = client()
        .get(format!(
            "http://{}/v2/rig/app/blobs/{layer}?ns={NS}",
            node.addr
        ))
        .send()
        .await
        .expect("get blob");
    assert_eq!(r.status(), 200, "the blob waits for the slow lookup");
    assert_eq!(r.bytes().await.expect("body").as_ref(), content.as_slice());
    let r = client()
        .get(format!(
            "http://{}/v2/rig/app/manifests/{manifest}?ns={NS}",
            node.addr
        ))
        .send()
        .await
        .expect("get manifest");
    assert_eq!(
        r.status(),
        404,
        "the manifest does not: containerd goes upstream at once"
    );
}

#[tokio::test]
async fn silent_peer_costs_one_read_timeout() {
    let upstream = Arc::new(MemoryStore::new());
    let d = upstream.add_blob(blob(1000));
    let peers = vec![
        peer("silent", silent_peer().await),
        peer("good", good_peer(upstream).await),
    ];
    let node = mirror_node(HashMap::from([(d.to_string(), peers)]), quick()).await;
    let r = client()
        .get(format!("http://{}/v2/a/blobs/{d}", node.addr))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").len(), 1000);
}

#[tokio::test]
async fn broken_stream_resumes_from_another_peer() {
    let upstream = Arc::new(MemoryStore::new());
    let content = blob(1_000_000);
    let d = upstream.add_blob(content.clone());
    let peers = vec![
        peer(
            "flaky",
            flaky_peer(d.clone(), content.clone(), 400_000).await,
        ),
        peer("good", good_peer(upstream).await),
    ];
    let node = mirror_node(HashMap::from([(d.to_string(), peers)]), quick()).await;
    let r = client()
        .get(format!("http://{}/v2/a/blobs/{d}", node.addr))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("whole body");
    assert_eq!(body.len(), content.len());
    assert_eq!(Digest::sha256_of(&body), d, "stitched body is the blob");
    assert_eq!(metric(&node.metrics, "speculum_mirror_resumes_total"), 1.0);
}

#[tokio::test]
async fn broken_stream_with_nobody_to_resume_fails_the_body_not_silently() {
    let content = blob(100_000);
    let d = Digest::sha256_of(&content);
    let peers = vec![peer(
        "flaky",
        flaky_peer(d.clone(), content.clone(), 1000).await,
    )];
    let node = mirror_node(HashMap::from([(d.to_string(), peers)]), quick()).await;
    let r = client()
        .get(format!("http://{}/v2/a/blobs/{d}", node.addr))
        .send()
        .await
        .expect("headers arrive");
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a short body must be an error, never a short blob"
    );
}

#[tokio::test]
async fn manifest_by_tag_from_peer_and_liars_are_refused() {
    let upstream = Arc::new(MemoryStore::new());
    let cd = upstream.add_blob("{}");
    let ld = upstream.add_blob(blob(10));
    let m = manifest_for(&cd, &ld, 10);
    let md = upstream.add_blob(m.clone());
    upstream.set_image(&format!("{REG}/rig/app:v1"), md.clone());
    let good = good_peer(upstream).await;
    let tag_key = format!("{REG}/rig/app:v1");
    let peers = HashMap::from([
        (
            tag_key.clone(),
            vec![
                peer("liar1", lying_peer(md.clone()).await),
                peer("good", good),
            ],
        ),
        (
            md.to_string(),
            vec![peer("liar2", lying_peer(md.clone()).await)],
        ),
    ]);
    let node = mirror_node(peers, quick()).await;
    let c = client();
    let base = format!("http://{}", node.addr);

    let r = c
        .head(format!("{base}/v2/rig/app/manifests/v1?ns={NS}"))
        .send()
        .await
        .expect("head");
    // The liar's HEAD looks plausible (it cannot be checked without a body), so HEAD may be
    // answered by either; the digest it names must be the true one here.
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        md.to_string().as_str()
    );

    let r = c
        .get(format!("{base}/v2/rig/app/manifests/v1?ns={NS}"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200, "liar skipped, good peer serves");
    assert_eq!(r.bytes().await.expect("body"), m.as_bytes());

    let r = c
        .get(format!("{base}/v2/rig/app/manifests/{md}"))
        .send()
        .await
        .expect("get by digest");
    assert_eq!(r.status(), 404, "only a liar holds it: fall back upstream");
    assert!(
        metric(
            &node.metrics,
            "speculum_mirror_peer_failures_total{reason=\"digest-mismatch\"}"
        ) >= 2.0
    );
}

#[tokio::test]
async fn attempts_bound_and_hop_header_stop_mirroring() {
    let upstream = Arc::new(MemoryStore::new());
    let d = upstream.add_blob(blob(100));
    let good = good_peer(upstream).await;
    let peers = HashMap::from([(
        d.to_string(),
        vec![peer("404", not_found_peer().await), peer("good", good)],
    )]);
    let node = mirror_node(
        peers.clone(),
        MirrorConfig {
            attempts: 1,
            ..quick()
        },
    )
    .await;
    let r = client()
        .get(format!("http://{}/v2/a/blobs/{d}", node.addr))
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        404,
        "one attempt allowed, the first peer had nothing"
    );

    let node = mirror_node(peers, quick()).await;
    let r = client()
        .get(format!("http://{}/v2/a/blobs/{d}", node.addr))
        .header(registry::HOP_HEADER, "1")
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        404,
        "a request from a peer is answered from the local store only"
    );
}

#[tokio::test]
async fn range_request_is_passed_to_the_peer() {
    let upstream = Arc::new(MemoryStore::new());
    let content = blob(50_000);
    let d = upstream.add_blob(content.clone());
    let peers = HashMap::from([(d.to_string(), vec![peer("good", good_peer(upstream).await)])]);
    let node = mirror_node(peers, quick()).await;
    let r = client()
        .get(format!("http://{}/v2/a/blobs/{d}", node.addr))
        .header("range", "bytes=1000-")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 1000-49999/50000");
    assert_eq!(r.bytes().await.expect("body").as_ref(), &content[1000..]);
}

// ------------------------------------------------------------------------------------------------
// Policy decisions and the audit trail (the policy issue).

mod guarded {
    use super::*;
    use speculum::audit::{AuditRecord, MemorySink};
    use speculum::policy::{Decision, Gate, PolicyMetrics, RegoPolicy, StaticPolicy, Switches};
    use speculum::registry::Guard;

    fn guard(
        policy: Arc<dyn speculum::policy::Policy>,
        switches: Switches,
        audit: &MemorySink,
    ) -> Guard {
        Guard {
            gate: Gate::new(policy, switches, PolicyMetrics::unregistered()),
            audit: Arc::new(audit.clone()),
            node: "node-1".to_owned(),
            tenancy: Default::default(),
        }
    }

    /// A mirror endpoint (peers from `peers`) or, with `peers == None`, a peer endpoint.
    async fn node(
        store: Arc<MemoryStore>,
        peers: Option<HashMap<String, Vec<Peer>>>,
        guard: Guard,
    ) -> SocketAddr {
        let metrics = speculum::registry::RegistryMetrics::default();
        let (mirror, handler) = match peers {
            Some(p) => (
                Some(Arc::new(
                    Mirror::new(
                        Arc::new(MemoryRouter::with_static(p)),
                        quick(),
                        metrics.clone(),
                    )
                    .expect("client"),
                )),
                Handler::Mirror,
            ),
            None => (None, Handler::Peer),
        };
        spawn(registry::app_with(
            RegistryState {
                store,
                mirror,
                cache: None,
                metrics,
                readiness: Readiness::new(),
                handler,
                serving: Default::default(),
            },
            guard,
        ))
        .await
    }

    /// An image `rig/app` tagged `v1` and `latest`; returns (manifest digest, layer digest, layer).
    fn image(store: &MemoryStore) -> (Digest, Digest, Vec<u8>) {
        let layer = blob(100_000);
        let ld = store.add_blob(layer.clone());
        let cd = store.add_blob(r#"{"architecture":"amd64","rootfs":{"type":"layers"}}"#);
        let md = store.add_blob(manifest_for(&cd, &ld, layer.len()));
        store.set_image(&format!("{REG}/rig/app:v1"), md.clone());
        store.set_image(&format!("{REG}/rig/app:latest"), md.clone());
        (md, ld, layer)
    }

    /// Waits (bounded) until `n` records are in; body records land when the body is finished.
    async fn records(sink: &MemorySink, n: usize) -> Vec<AuditRecord> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = sink.records();
            if r.len() >= n || tokio::time::Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn allowlist() -> Arc<dyn speculum::policy::Policy> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/registry-allowlist");
        Arc::new(RegoPolicy::load(&dir, Duration::from_millis(50)).expect("shipped bundle"))
    }

    #[tokio::test]
    async fn decisions_switches_and_audit_lines_with_every_byte() {
        let store = Arc::new(MemoryStore::new());
        let (md, ld, layer) = image(&store);
        let audit = MemorySink::new();
        let switches = Switches {
            resolve_tags: true,
            resolve_latest_tag: false,
        };
        let addr = node(
            store,
            Some(HashMap::new()),
            guard(allowlist(), switches, &audit),
        )
        .await;
        let c = client();
        let base = format!("http://{addr}");
        // (name, method, path, want status, want decision, want served_from)
        let cases = [
            (
                "tag v1",
                "HEAD",
                "/v2/rig/app/manifests/v1?ns=127.0.0.1%3A5000".to_owned(),
                200,
                "allow",
                "local",
            ),
            (
                "latest not resolved",
                "HEAD",
                "/v2/rig/app/manifests/latest?ns=127.0.0.1%3A5000".to_owned(),
                404,
                "deny",
                "upstream",
            ),
            (
                "manifest by digest",
                "GET",
                format!("/v2/rig/app/manifests/{md}?ns=127.0.0.1%3A5000"),
                200,
                "allow",
                "local",
            ),
            (
                "layer",
                "GET",
                format!("/v2/rig/app/blobs/{ld}?ns=127.0.0.1%3A5000"),
                200,
                "allow",
                "local",
            ),
            (
                "registry not allowlisted",
                "GET",
                format!("/v2/rig/app/blobs/{ld}?ns=docker.io"),
                404,
                "deny",
                "upstream",
            ),
        ];
        let mut received = 0u64;
        for (name, method, path, status, _, _) in &cases {
            let req = if *method == "HEAD" {
                c.head(format!("{base}{path}"))
            } else {
                c.get(format!("{base}{path}"))
            };
            let r = req.send().await.expect("request");
            assert_eq!(r.status().as_u16(), *status, "{name}");
            let body = r.bytes().await.expect("body");
            if *status == 200 {
                received += body.len() as u64;
            }
            if *name == "layer" {
                assert_eq!(body.as_ref(), layer.as_slice());
            }
        }
        let got = records(&audit, cases.len()).await;
        assert_eq!(
            got.len(),
            cases.len(),
            "one audit line per request: {got:#?}"
        );
        // Records land when bodies finish, which may reorder neighbours: match each case by
        // method, reference and registry.
        let find = |method: &str, path: &str| -> &AuditRecord {
            got.iter()
                .find(|r| {
                    r.method == method
                        && path.contains(&format!("/{}?", r.reference))
                        && path.contains(&r.registry.replace(':', "%3A"))
                })
                .unwrap_or_else(|| panic!("no record for {method} {path}: {got:#?}"))
        };
        let ordered: Vec<&AuditRecord> = cases.iter().map(|(_, m, p, ..)| find(m, p)).collect();
        for (r, (name, method, _, status, decision, from)) in ordered.iter().zip(&cases) {
            assert_eq!(r.status, *status, "{name}");
            assert_eq!(r.method, *method, "{name}");
            assert_eq!(r.decision, *decision, "{name}");
            assert_eq!(r.served_from, *from, "{name}");
            assert_eq!(r.node, "node-1");
            assert_eq!(r.source, "containerd");
            assert!(
                r.client.starts_with("127.0.0.1:"),
                "{name}: client from the socket"
            );
            assert!(!r.reason.is_empty(), "{name}: a reason");
        }
        assert_eq!(
            ordered[0].digest.as_deref(),
            Some(md.to_string().as_str()),
            "tag resolved to"
        );
        assert_eq!(ordered[1].reason, "resolveLatestTag=false");
        assert_eq!(ordered[4].reason, "registry not in allowlist");
        let audited: u64 = got
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.bytes)
            .sum();
        assert_eq!(audited, received, "every served byte is accounted for");
        assert_eq!(ordered[3].bytes, layer.len() as u64);
    }

    #[tokio::test]
    async fn resolve_tags_off_refuses_every_tag_but_serves_digests() {
        let store = Arc::new(MemoryStore::new());
        let (md, _, _) = image(&store);
        let audit = MemorySink::new();
        let switches = Switches {
            resolve_tags: false,
            resolve_latest_tag: true,
        };
        let addr = node(
            store,
            Some(HashMap::new()),
            guard(Arc::new(StaticPolicy::default()), switches, &audit),
        )
        .await;
        let c = client();
        for (path, want) in [
            (
                "/v2/rig/app/manifests/v1?ns=127.0.0.1%3A5000".to_owned(),
                404,
            ),
            (
                "/v2/rig/app/manifests/latest?ns=127.0.0.1%3A5000".to_owned(),
                404,
            ),
            (
                format!("/v2/rig/app/manifests/{md}?ns=127.0.0.1%3A5000"),
                200,
            ),
        ] {
            let r = c
                .head(format!("http://{addr}{path}"))
                .send()
                .await
                .expect("head");
            assert_eq!(r.status().as_u16(), want, "{path}");
        }
        let got = records(&audit, 3).await;
        assert_eq!(got[0].reason, "resolveTags=false");
    }

    #[tokio::test]
    async fn a_peer_that_denies_is_a_miss_and_both_sides_audit_it() {
        // The peer holds the layer but its policy denies serving to peers.
        let peer_store = Arc::new(MemoryStore::new());
        let (_, ld, _) = image(&peer_store);
        let peer_audit = MemorySink::new();
        let deny = Arc::new(StaticPolicy::fixed(Decision::deny("private")));
        let peer_addr = node(
            peer_store,
            None,
            guard(deny, Switches::default(), &peer_audit),
        )
        .await;

        let audit = MemorySink::new();
        let peers = HashMap::from([(ld.to_string(), vec![peer("p1", peer_addr)])]);
        let addr = node(
            Arc::new(MemoryStore::new()),
            Some(peers),
            guard(
                Arc::new(StaticPolicy::default()),
                Switches::default(),
                &audit,
            ),
        )
        .await;
        let r = client()
            .get(format!("http://{addr}/v2/rig/app/blobs/{ld}?ns={NS}"))
            .send()
            .await
            .expect("get");
        assert_eq!(
            r.status(),
            404,
            "denied by the peer: containerd goes upstream"
        );
        let theirs = records(&peer_audit, 1).await;
        assert_eq!(theirs.len(), 1);
        assert_eq!(
            (theirs[0].source.as_str(), theirs[0].decision.as_str()),
            ("peer", "deny")
        );
        assert_eq!(theirs[0].reason, "private");
        let ours = records(&audit, 1).await;
        assert_eq!(
            (ours[0].decision.as_str(), ours[0].served_from.as_str()),
            ("allow", "upstream")
        );
    }

    #[tokio::test]
    async fn a_failing_policy_is_a_404_never_a_5xx() {
        let store = Arc::new(MemoryStore::new());
        let (md, _, _) = image(&store);
        let audit = MemorySink::new();
        let addr = node(
            store,
            Some(HashMap::new()),
            guard(
                Arc::new(StaticPolicy::failing()),
                Switches::default(),
                &audit,
            ),
        )
        .await;
        let r = client()
            .get(format!("http://{addr}/v2/rig/app/manifests/{md}?ns={NS}"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 404);
        let got = records(&audit, 1).await;
        assert_eq!(
            (got[0].decision.as_str(), got[0].reason.as_str()),
            ("deny", "policy-error")
        );
    }
}
