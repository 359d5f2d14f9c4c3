//! Tag resolution on the mirror endpoint (`upstream-first`, `cluster-first`), over real HTTP on
//! loopback: the upstream registries here are real servers that name a digest (directly or
//! after the anonymous token flow), answer 404, 401/403, 429 or 503, accept and never answer
//! (silent), or do not listen at all (unreachable). The node holds the tag's *old* digest;
//! the new one is on this node, on a peer (a real speculum peer endpoint), or nowhere.
//! Each case checks the HTTP answer, the digest header, the audit line's `tag_source` and
//! `tag_upstream`, the metric, and what reached the upstream (never a credential).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use speculum::audit::{AuditRecord, MemorySink};
use speculum::metrics::Metrics;
use speculum::oci::Digest;
use speculum::policy::{
    Decision, Gate, PolicyMetrics, RegoPolicy, StaticPolicy, Switches, TagResolution,
};
use speculum::readiness::Readiness;
use speculum::registry::tags::TagResolver;
use speculum::registry::{self, Guard, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::Peer;
use speculum::routing::memory::MemoryRouter;
use speculum::store::memory::MemoryStore;
use testkit::peers::{silent_peer, spawn, unreachable_peer};

const ACCEPT: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
const TIMEOUT: Duration = Duration::from_millis(400);

/// How a fake upstream registry answers `HEAD /v2/<repo>/manifests/<tag>`.
#[derive(Clone, Debug)]
enum Up {
    /// 200 with this digest.
    Digest(Digest),
    /// 200 without a digest header.
    NoDigest,
    /// This status, no body.
    Status(u16),
    /// 401 with a Bearer challenge; the realm answers `token_status` (200: a token, and the
    /// HEAD with that token gets 200 with the digest).
    Challenge { token_status: u16, digest: Digest },
    /// Accepts connections, never answers.
    Silent,
    /// Nothing listens.
    Unreachable,
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    accept: Option<String>,
    cookie: Option<String>,
}

#[derive(Clone)]
struct Upstream {
    up: Up,
    seen: Arc<Mutex<Vec<Seen>>>,
    addr: Arc<Mutex<Option<SocketAddr>>>,
}

const TOKEN: &str = "anonymous-token-from-the-realm";

async fn upstream_handler(
    State(u): State<Upstream>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = h("authorization");
    u.seen.lock().expect("lock").push(Seen {
        method: method.to_string(),
        path: uri.path().to_owned(),
        authorization: authorization.clone(),
        accept: h("accept"),
        cookie: h("cookie"),
    });
    let digest_ok = |d: &Digest| {
        (
            StatusCode::OK,
            [
                ("docker-content-digest", d.to_string()),
                (
                    "content-type",
                    "application/vnd.oci.image.manifest.v1+json".to_owned(),
                ),
            ],
        )
            .into_response()
    };
    match &u.up {
        Up::Digest(d) => digest_ok(d),
        Up::NoDigest => StatusCode::OK.into_response(),
        Up::Status(s) => StatusCode::from_u16(*s).expect("status").into_response(),
        Up::Challenge {
            token_status,
            digest,
        } => {
            if uri.path() == "/token" {
                return if *token_status == 200 {
                    format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#).into_response()
                } else {
                    StatusCode::from_u16(*token_status)
                        .expect("status")
                        .into_response()
                };
            }
            if authorization.as_deref() == Some(&format!("Bearer {TOKEN}")) {
                return digest_ok(digest);
            }
            let addr = u.addr.lock().expect("lock").expect("addr");
            (
                StatusCode::UNAUTHORIZED,
                [(
                    "www-authenticate",
                    format!(
                        r#"Bearer realm="http://{addr}/token",service="test",scope="repository:rig/app:pull""#
                    ),
                )],
            )
                .into_response()
        }
        Up::Silent | Up::Unreachable => unreachable!("no server for {:?}", u.up),
    }
}

/// A fake upstream; returns its address (as `ns`) and what it saw.
async fn upstream(up: Up) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    match up {
        Up::Silent => (silent_peer().await, seen),
        Up::Unreachable => (unreachable_peer().await, seen),
        up => {
            let state = Upstream {
                up,
                seen: seen.clone(),
                addr: Arc::new(Mutex::new(None)),
            };
            let cell = state.addr.clone();
            let addr = spawn(
                axum::Router::new()
                    .fallback(upstream_handler)
                    .with_state(state),
            )
            .await;
            *cell.lock().expect("lock") = Some(addr);
            (addr, seen)
        }
    }
}

fn manifest(seed: &str) -> String {
    let d = Digest::sha256_of(seed.as_bytes());
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}},"layers":[]}}"#
    )
}

/// Where the tag's new digest is held.
#[derive(Clone, Copy, Debug, PartialEq)]
enum NewAt {
    Local,
    Peer,
    Nowhere,
}

struct Setup {
    mirror: SocketAddr,
    ns: String,
    old: Digest,
    new: Digest,
    new_body: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    audit: MemorySink,
    metrics: Metrics,
}

/// A mirror node holding `rig/app:v1` → old digest; `up` is the upstream (its address is
/// the `ns`); the new digest's manifest is `new_at`.
async fn setup(up: Up, new_at: NewAt, mode: TagResolution, policy: Option<TagResolution>) -> Setup {
    let new_body = manifest("new");
    let new = Digest::sha256_of(new_body.as_bytes());
    let up = match up {
        Up::Digest(_) => Up::Digest(new.clone()),
        Up::Challenge { token_status, .. } => Up::Challenge {
            token_status,
            digest: new.clone(),
        },
        other => other,
    };
    let (up_addr, seen) = upstream(up).await;
    let ns = up_addr.to_string();

    let store = Arc::new(MemoryStore::new());
    let old = store.add_blob(manifest("old"));
    store.set_image(&format!("{ns}/rig/app:v1"), old.clone());
    let mut peers: HashMap<String, Vec<Peer>> = HashMap::new();
    match new_at {
        NewAt::Local => {
            store.add_blob(new_body.clone());
        }
        NewAt::Peer => {
            let peer_store = Arc::new(MemoryStore::new());
            peer_store.add_blob(new_body.clone());
            let addr = spawn(registry::app(RegistryState {
                store: peer_store,
                mirror: None,
                cache: None,
                metrics: Default::default(),
                readiness: Readiness::new(),
                handler: Handler::Peer,
                serving: Default::default(),
            }))
            .await;
            peers.insert(
                new.to_string(),
                vec![Peer {
                    id: "peer-new".into(),
                    addr,
                    load: None,
                }],
            );
        }
        NewAt::Nowhere => {}
    }

    let metrics = Metrics::new();
    let config = MirrorConfig {
        connect_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_millis(300),
        tag_resolution: mode,
        tag_upstream_timeout: TIMEOUT,
        ..MirrorConfig::default()
    };
    let resolver = TagResolver::new(mode, TIMEOUT, vec![ns.clone()], metrics.registry.clone())
        .expect("upstream client")
        .only_for(Some(vec![ns.clone(), "other.test:5000".to_owned()]));
    let mirror = Mirror::new(
        Arc::new(MemoryRouter::with_static(peers)),
        config,
        metrics.registry.clone(),
    )
    .expect("client")
    .with_tags(resolver);
    let audit = MemorySink::new();
    let decision = Decision {
        tag_resolution: policy,
        ..Decision::allow("public")
    };
    let guard = Guard {
        gate: Gate::new(
            Arc::new(StaticPolicy::fixed(decision)),
            Switches::default(),
            PolicyMetrics::unregistered(),
        ),
        audit: Arc::new(audit.clone()),
        node: "node-1".into(),
        tenancy: Default::default(),
    };
    let addr = spawn(registry::app_with(
        RegistryState {
            store,
            mirror: Some(Arc::new(mirror)),
            cache: None,
            metrics: metrics.registry.clone(),
            readiness: Readiness::new(),
            handler: Handler::Mirror,
            serving: Default::default(),
        },
        guard,
    ))
    .await;
    Setup {
        mirror: addr,
        ns,
        old,
        new,
        new_body,
        seen,
        audit,
        metrics,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Waits (bounded) until `n` audit records are in.
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

fn metric(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Which digest a case expects in the answer.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Old,
    New,
    NotFound,
}

#[tokio::test]
async fn upstream_first_table() {
    use TagResolution::{ClusterFirst, UpstreamFirst};
    let any = Digest::sha256_of(b"placeholder");
    let challenge = |token_status| Up::Challenge {
        token_status,
        digest: any.clone(),
    };
    // (name, upstream, new digest held, config mode, policy override, want answer,
    //  want tag_source, want tag_upstream, want upstream HEADs)
    type Case<'a> = (
        &'a str,
        Up,
        NewAt,
        TagResolution,
        Option<TagResolution>,
        Want,
        &'a str,
        Option<&'a str>,
        usize,
    );
    let cases: Vec<Case> = vec![
        (
            "moved, new digest on this node",
            Up::Digest(any.clone()),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::New,
            "upstream",
            Some("digest"),
            1,
        ),
        (
            "moved, new digest on a peer",
            Up::Digest(any.clone()),
            NewAt::Peer,
            UpstreamFirst,
            None,
            Want::New,
            "upstream",
            Some("digest"),
            1,
        ),
        (
            "moved, nobody has the new digest",
            Up::Digest(any.clone()),
            NewAt::Nowhere,
            UpstreamFirst,
            None,
            Want::NotFound,
            "upstream",
            Some("digest"),
            1,
        ),
        (
            "public behind the token flow",
            challenge(200),
            NewAt::Peer,
            UpstreamFirst,
            None,
            Want::New,
            "upstream",
            Some("digest"),
            2,
        ),
        (
            "upstream says no digest",
            Up::NoDigest,
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::NotFound,
            "upstream",
            Some("no-digest"),
            1,
        ),
        (
            "tag gone upstream",
            Up::Status(404),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::NotFound,
            "upstream",
            Some("not-found"),
            1,
        ),
        (
            "private: 401 without challenge",
            Up::Status(401),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "cluster",
            Some("refused-401"),
            1,
        ),
        (
            "private: the realm refuses",
            challenge(403),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "cluster",
            Some("refused-403"),
            1,
        ),
        (
            "forbidden",
            Up::Status(403),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "cluster",
            Some("refused-403"),
            1,
        ),
        (
            "rate limited",
            Up::Status(429),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "stale",
            Some("status-429"),
            1,
        ),
        (
            "server error",
            Up::Status(503),
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "stale",
            Some("status-503"),
            1,
        ),
        (
            "silent upstream",
            Up::Silent,
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "stale",
            Some("timeout"),
            0,
        ),
        (
            "unreachable upstream",
            Up::Unreachable,
            NewAt::Local,
            UpstreamFirst,
            None,
            Want::Old,
            "stale",
            Some("unreachable"),
            0,
        ),
        (
            "cluster-first by config",
            Up::Digest(any.clone()),
            NewAt::Local,
            ClusterFirst,
            None,
            Want::Old,
            "cluster",
            None,
            0,
        ),
        (
            "cluster-first by policy",
            Up::Digest(any.clone()),
            NewAt::Local,
            UpstreamFirst,
            Some(ClusterFirst),
            Want::Old,
            "cluster",
            None,
            0,
        ),
        (
            "upstream-first by policy",
            Up::Digest(any.clone()),
            NewAt::Local,
            ClusterFirst,
            Some(UpstreamFirst),
            Want::New,
            "upstream",
            Some("digest"),
            1,
        ),
    ];
    let c = client();
    for (name, up, new_at, mode, policy, want, source, upstream_label, heads) in cases {
        let s = setup(up, new_at, mode, policy).await;
        let url = format!(
            "http://{}/v2/rig/app/manifests/v1?ns={}",
            s.mirror,
            s.ns.replace(':', "%3A")
        );
        let started = Instant::now();
        // containerd never sends credentials to a mirror; if anything did, none may travel on.
        let r = c
            .head(&url)
            .header("accept", ACCEPT)
            .header("authorization", "Basic c2VjcmV0OnNlY3JldA==")
            .header("cookie", "session=secret")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let elapsed = started.elapsed();
        let digest = r
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match want {
            Want::NotFound => assert_eq!(r.status(), 404, "{name}"),
            Want::Old => {
                assert_eq!(r.status(), 200, "{name}");
                assert_eq!(
                    digest,
                    Some(s.old.to_string()),
                    "{name}: the cluster's digest"
                );
            }
            Want::New => {
                assert_eq!(r.status(), 200, "{name}");
                assert_eq!(digest, Some(s.new.to_string()), "{name}: upstream's digest");
            }
        }
        assert!(
            elapsed < TIMEOUT + Duration::from_secs(1),
            "{name}: answered after {elapsed:?} (upstream budget {TIMEOUT:?})"
        );
        let audit = records(&s.audit, 1).await;
        assert_eq!(audit.len(), 1, "{name}: one audit line: {audit:#?}");
        assert_eq!(audit[0].tag_source.as_deref(), Some(source), "{name}");
        assert_eq!(audit[0].tag_upstream.as_deref(), upstream_label, "{name}");
        assert_eq!(
            audit[0].reference, "v1",
            "{name}: the reference as requested"
        );
        if want == Want::New {
            assert_eq!(audit[0].digest, Some(s.new.to_string()), "{name}");
        }
        assert_eq!(
            metric(
                &s.metrics,
                &format!("speculum_mirror_tag_resolutions_total{{source=\"{source}\"}}")
            ),
            1.0,
            "{name}: counted once under {source}"
        );
        let seen = s.seen.lock().expect("lock").clone();
        let manifest_heads = seen
            .iter()
            .filter(|r| r.method == "HEAD" && r.path == "/v2/rig/app/manifests/v1")
            .count();
        assert_eq!(manifest_heads, heads, "{name}: HEADs upstream: {seen:#?}");
        assert!(
            seen.iter()
                .all(|r| r.method == "HEAD" || r.path == "/token"),
            "{name}: only HEADs (and the token) upstream: {seen:#?}"
        );
        for r in &seen {
            assert!(
                r.authorization.is_none()
                    || r.authorization.as_deref() == Some(&format!("Bearer {TOKEN}")),
                "{name}: a credential reached upstream: {r:?}"
            );
            assert!(
                r.cookie.is_none(),
                "{name}: a cookie reached upstream: {r:?}"
            );
            if r.method == "HEAD" {
                assert_eq!(
                    r.accept.as_deref(),
                    Some(ACCEPT),
                    "{name}: containerd's Accept"
                );
            }
        }
    }
}

/// A GET by tag (containerd sends one when a HEAD answer lacks the digest) returns the bytes
/// of upstream's digest, from a peer, checked against it.
#[tokio::test]
async fn get_by_tag_serves_upstreams_manifest_bytes() {
    let s = setup(
        Up::Digest(Digest::sha256_of(b"x")),
        NewAt::Peer,
        TagResolution::UpstreamFirst,
        None,
    )
    .await;
    let url = format!(
        "http://{}/v2/rig/app/manifests/v1?ns={}",
        s.mirror,
        s.ns.replace(':', "%3A")
    );
    let r = client().get(&url).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(s.new.to_string().as_str())
    );
    assert_eq!(r.text().await.expect("body"), s.new_body);
    let audit = records(&s.audit, 1).await;
    assert_eq!(audit[0].served_from, "peer");
    // The default Accept list went upstream when the client sent none.
    let seen = s.seen.lock().expect("lock").clone();
    let accept = seen[0].accept.clone().unwrap_or_default();
    assert!(
        accept.contains("application/vnd.oci.image.index.v1+json")
            && accept.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{accept}"
    );
}

/// Digests and blobs never cause an upstream request; a request from a peer (hop) is answered
/// from the node only.
#[tokio::test]
async fn only_tags_from_containerd_go_upstream() {
    let s = setup(
        Up::Digest(Digest::sha256_of(b"x")),
        NewAt::Local,
        TagResolution::UpstreamFirst,
        None,
    )
    .await;
    let ns = s.ns.replace(':', "%3A");
    let c = client();
    let by_digest = format!("http://{}/v2/rig/app/manifests/{}?ns={ns}", s.mirror, s.old);
    assert_eq!(c.head(&by_digest).send().await.expect("head").status(), 200);
    let hop = format!("http://{}/v2/rig/app/manifests/v1?ns={ns}", s.mirror);
    let r = c
        .head(&hop)
        .header(registry::HOP_HEADER, "1")
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(s.old.to_string().as_str()),
        "a hop is answered from the node's own tag"
    );
    assert!(
        s.seen.lock().expect("lock").is_empty(),
        "nothing but a containerd tag request goes upstream"
    );
    let audit = records(&s.audit, 2).await;
    assert!(audit.iter().all(|r| r.tag_source.is_none()), "{audit:#?}");
}

/// A registry the node does not mirror is never asked: a local client's made-up `ns` cannot
/// point the daemon at a host of its choosing.
#[tokio::test]
async fn registries_not_mirrored_are_never_asked() {
    let (addr, seen) = upstream(Up::Status(404)).await;
    let metrics = speculum::registry::RegistryMetrics::default();
    let resolver = TagResolver::new(
        TagResolution::UpstreamFirst,
        TIMEOUT,
        vec![addr.to_string()],
        metrics.clone(),
    )
    .expect("client")
    .only_for(Some(vec!["ghcr.io".to_owned()]));
    let r = resolver
        .resolve(
            TagResolution::UpstreamFirst,
            &addr.to_string(),
            "rig/app",
            "v1",
            None,
        )
        .await;
    assert_eq!(r.plan, speculum::registry::tags::Plan::Cluster);
    assert_eq!(r.upstream.as_deref(), Some("not-mirrored"));
    assert!(
        seen.lock().expect("lock").is_empty(),
        "nothing sent upstream"
    );
    let any = TagResolver::new(
        TagResolution::UpstreamFirst,
        TIMEOUT,
        vec![addr.to_string()],
        metrics,
    )
    .expect("client")
    .only_for(None);
    let r = any
        .resolve(
            TagResolution::UpstreamFirst,
            &addr.to_string(),
            "rig/app",
            "v1",
            None,
        )
        .await;
    assert_eq!(
        r.plan,
        speculum::registry::tags::Plan::NotFound,
        "`_default`: any registry"
    );
    assert_eq!(seen.lock().expect("lock").len(), 1);
}

/// The policy's `tag_resolution` through a real Rego bundle: per repository, and a value that
/// is not a mode fails closed (deny: containerd goes upstream).
#[tokio::test]
async fn rego_decision_chooses_the_mode_per_repository() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("mirror.rego"),
        r#"package speculum.mirror

default tag_resolution := "upstream-first"

tag_resolution := "cluster-first" if startswith(input.image.repository, "pinned/")

tag_resolution := "sometimes" if input.image.repository == "broken/app"

decision := {"allow": true, "reason": "public", "tag_resolution": tag_resolution}
"#,
    )
    .expect("write");
    let policy = RegoPolicy::load(dir.path(), Duration::from_millis(50)).expect("bundle");
    let gate = Gate::new(
        Arc::new(policy),
        Switches::default(),
        PolicyMetrics::unregistered(),
    );
    let input =
        |repo: &str| speculum::policy::conformance::input("ghcr.io", repo, Some("v1"), None);
    let cases = [
        (
            "default",
            "org/app",
            true,
            Some(TagResolution::UpstreamFirst),
        ),
        (
            "pinned",
            "pinned/app",
            true,
            Some(TagResolution::ClusterFirst),
        ),
        ("not a mode", "broken/app", false, None),
    ];
    for (name, repo, allow, mode) in cases {
        let d = gate.decide(&input(repo));
        assert_eq!(d.allow, allow, "{name}: {d:?}");
        assert_eq!(d.tag_resolution, mode, "{name}");
        if !allow {
            assert_eq!(d.reason, "policy-output", "{name}");
        }
    }
}
