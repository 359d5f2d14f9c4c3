//! The tenancy decision chain over real HTTP on loopback, with the in-memory twins (store, pods,
//! router) and the real grant and peer-token code: fast enough for every `cargo test`, so a
//! regression in the chain shows up without the namespace rig. The rig version with real
//! containerd is `tests/rig/tenancy.rs`; both follow the attack matrix of `docs/tenancy.md`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use speculum::audit::{AuditRecord, MemorySink};
use speculum::oci::Digest;
use speculum::policy::{Decision, Gate, PolicyMetrics, StaticPolicy, Switches};
use speculum::readiness::Readiness;
use speculum::registry::{self, Guard, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::Peer;
use speculum::routing::memory::MemoryRouter;
use speculum::store::memory::MemoryStore;
use speculum::tenancy::Tenancy;
use speculum::tenancy::grants::{GrantChecker, GrantKeys};
use speculum::tenancy::peer_auth::{PeerTokens, PeerVerifier, SharedKey};
use speculum::tenancy::pods::{MemoryPods, PodInfo, Pods};
use speculum_grant::{KeySet, Signer};
use testkit::peers::spawn;

const REG: &str = "127.0.0.1:5000";
const NS: &str = "127.0.0.1%3A5000";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-cluster";

/// A policy that marks everything private (and allows it once a grant passed).
fn private_gate() -> Gate {
    let decision = Decision {
        allow: true,
        reason: "private".into(),
        resolve_tag: true,
        require_grant: true,
        tag_resolution: None,
    };
    Gate::new(
        Arc::new(StaticPolicy::fixed(decision)),
        Switches {
            resolve_tags: true,
            resolve_latest_tag: true,
        },
        PolicyMetrics::unregistered(),
    )
}

fn shared_key(node: &str, secret: &[u8]) -> Arc<SharedKey> {
    Arc::new(SharedKey::from_secret(secret, node, Duration::from_secs(300)).expect("key"))
}

struct World {
    signer: Signer,
    manifest: Digest,
    layer: Digest,
    foreign: Digest,
    server: SocketAddr,
    server_audit: MemorySink,
    server_pods: Arc<MemoryPods>,
    mirror: SocketAddr,
    mirror_pods: Arc<MemoryPods>,
    mirror_audit: MemorySink,
}

fn pod(ns: &str, name: &str, node: &str, grants: &[&str]) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        node: node.into(),
        images: vec![format!("{REG}/team/app:v1")],
        grants: grants.iter().map(|g| g.to_string()).collect(),
    }
}

impl World {
    async fn new() -> World {
        let (private_pem, public_pem) = speculum_grant::generate();
        let signer = Signer::from_pem(private_pem.as_bytes()).expect("signer");
        let keys = || {
            Arc::new(GrantKeys::fixed(
                KeySet::from_pems([public_pem.as_bytes()]).expect("keys"),
                speculum_grant::DEFAULT_AUDIENCE,
            ))
        };

        // Node "a" holds the image and serves peers.
        let store = Arc::new(MemoryStore::new());
        let layer_bytes = vec![7u8; 50_000];
        let layer = store.add_blob(layer_bytes.clone());
        let config = store.add_blob(r#"{"architecture":"amd64"}"#);
        let manifest = store.add_blob(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":24}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{}}}]}}"#,
            layer_bytes.len()
        ));
        store.set_image(&format!("{REG}/team/app:v1"), manifest.clone());
        let foreign = store.add_blob(vec![9u8; 1000]);
        store.set_image(&format!("{REG}/team/app:other"), foreign.clone());
        let server_pods = Arc::new(MemoryPods::new("a"));
        let server_audit = MemorySink::new();
        let pods_dyn: Arc<dyn Pods> = server_pods.clone();
        let verifier: Arc<dyn PeerVerifier> = shared_key("a", SECRET);
        let server = spawn(registry::app_with(
            RegistryState {
                store,
                mirror: None,
                cache: None,
                metrics: Default::default(),
                readiness: Readiness::new(),
                handler: Handler::Peer,
                serving: Default::default(),
            },
            Guard {
                gate: private_gate(),
                audit: Arc::new(server_audit.clone()),
                node: "a".into(),
                tenancy: Tenancy {
                    pods: Some(pods_dyn.clone()),
                    grants: Some(Arc::new(GrantChecker::new(keys(), Some(pods_dyn)))),
                    tokens: None,
                    verifier: Some(verifier),
                },
            },
        ))
        .await;

        // Node "b" has nothing and asks node "a" through its mirror endpoint.
        let mirror_pods = Arc::new(MemoryPods::new("b"));
        let mirror_audit = MemorySink::new();
        let routes: HashMap<String, Vec<Peer>> = [manifest.to_string(), layer.to_string()]
            .into_iter()
            .map(|k| {
                (
                    k,
                    vec![Peer {
                        id: "a".into(),
                        addr: server,
                        load: None,
                    }],
                )
            })
            .collect();
        let metrics = speculum::registry::RegistryMetrics::default();
        let config = MirrorConfig {
            resolve_timeout: Duration::from_millis(200),
            ..MirrorConfig::default()
        };
        let mirror = Mirror::new(
            Arc::new(MemoryRouter::with_static(routes)),
            config,
            metrics.clone(),
        )
        .expect("client");
        let pods_dyn: Arc<dyn Pods> = mirror_pods.clone();
        let tokens: Arc<dyn PeerTokens> = shared_key("b", SECRET);
        let mirror = spawn(registry::app_with(
            RegistryState {
                store: Arc::new(MemoryStore::new()),
                mirror: Some(Arc::new(mirror)),
                cache: None,
                metrics,
                readiness: Readiness::new(),
                handler: Handler::Mirror,
                serving: Default::default(),
            },
            Guard {
                gate: private_gate(),
                audit: Arc::new(mirror_audit.clone()),
                node: "b".into(),
                tenancy: Tenancy {
                    pods: Some(pods_dyn.clone()),
                    grants: Some(Arc::new(GrantChecker::new(keys(), Some(pods_dyn)))),
                    tokens: Some(tokens),
                    verifier: None,
                },
            },
        ))
        .await;
        World {
            signer,
            manifest,
            layer,
            foreign,
            server,
            server_audit,
            server_pods,
            mirror,
            mirror_pods,
            mirror_audit,
        }
    }

    fn grant(&self, ns: &str, digest: &Digest) -> String {
        self.signer
            .sign(
                ns,
                &format!("{REG}/team/app"),
                &digest.to_string(),
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .expect("sign")
    }

    /// Both pod views: node "b"'s index and node "a"'s directory see the same pods.
    fn add_pod(&self, p: PodInfo) {
        self.server_pods.insert(p.clone());
        self.mirror_pods.insert(p);
    }
}

async fn last_record(sink: &MemorySink, n: usize) -> AuditRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = sink.records();
        if r.len() >= n || tokio::time::Instant::now() > deadline {
            return r.last().cloned().unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn granted_pod_on_the_asking_node_gets_the_private_image_from_its_peer() {
    let w = World::new().await;
    let c = reqwest::Client::new();
    let url = format!("http://{}/v2/team/app/blobs/{}?ns={NS}", w.mirror, w.layer);

    // No pod waits for the image on node b: 404, containerd goes upstream.
    let r = c.get(&url).send().await.expect("send");
    assert_eq!(r.status(), 404);
    let rec = last_record(&w.mirror_audit, 1).await;
    assert_eq!(rec.reason, "private: no grant");
    assert_eq!(rec.decision, "deny");

    // A pod of team-a on node b holds a grant: served from node a, whole.
    let g = w.grant("team-a", &w.manifest);
    w.add_pod(pod("team-a", "web", "b", &[&g]));
    let r = c.get(&url).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").len(), 50_000);
    let rec = last_record(&w.mirror_audit, 2).await;
    assert_eq!(rec.served_from, "peer");
    assert_eq!(rec.namespaces, vec!["team-a".to_string()]);
    assert_eq!(rec.grant.as_deref(), Some("team-a/web"));
    let served = last_record(&w.server_audit, 1).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.requester.as_deref(), Some("b"));
    assert_eq!(served.grant.as_deref(), Some("team-a/web"));
}

#[tokio::test]
async fn the_serving_node_refuses_every_attack_and_audits_it() {
    let w = World::new().await;
    let good = w.grant("team-a", &w.manifest);
    let other_digest = w.grant("team-a", &w.foreign);
    w.add_pod(pod("team-a", "web", "b", &[&good, &other_digest]));
    w.add_pod(pod("team-b", "api", "c", &[&good]));
    w.add_pod(pod("team-a", "idle", "b", &[]));
    let b = shared_key("b", SECRET).token().await.expect("token");
    let c_token = shared_key("c", SECRET).token().await.expect("token");
    let forged_token = shared_key("b", b"another-secret-of-at-least-32-bytes!!")
        .token()
        .await
        .expect("token");
    let (rogue_pem, _) = speculum_grant::generate();
    let rogue = Signer::from_pem(rogue_pem.as_bytes()).expect("rogue");
    let forged_grant = rogue
        .sign(
            "team-a",
            &format!("{REG}/team/app"),
            &w.manifest.to_string(),
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .expect("sign");
    let expired = w
        .signer
        .sign(
            "team-a",
            &format!("{REG}/team/app"),
            &w.manifest.to_string(),
            Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(3600),
        )
        .expect("sign");
    let layer = format!("/v2/team/app/blobs/{}", w.layer);
    let foreign = format!("/v2/team/app/blobs/{}", w.foreign);
    let web = |t: &str| format!("team-a/web {t}");
    // (name, token, grants, path, status, audit reason)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<String>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no token", None, vec![], &layer, 401, "peer auth: no_token"),
        (
            "forged token",
            Some(&forged_token),
            vec![],
            &layer,
            401,
            "peer auth: bad_signature",
        ),
        (
            "no grant",
            Some(&b),
            vec![],
            &layer,
            403,
            "private: no grant",
        ),
        (
            "forged grant",
            Some(&b),
            vec![web(&forged_grant)],
            &layer,
            403,
            "private: grant unknown_key",
        ),
        (
            "expired grant",
            Some(&b),
            vec![web(&expired)],
            &layer,
            403,
            "private: grant expired",
        ),
        (
            "grant for another digest",
            Some(&b),
            vec![web(&other_digest)],
            &layer,
            403,
            "private: object outside the granted image",
        ),
        (
            "another namespace's pod",
            Some(&c_token),
            vec![format!("team-b/api {good}")],
            &layer,
            403,
            "private: grant for another namespace",
        ),
        (
            "replayed from another node",
            Some(&c_token),
            vec![web(&good)],
            &layer,
            403,
            "private: grant of a pod on another node",
        ),
        (
            "pod without that grant",
            Some(&b),
            vec![format!("team-a/idle {good}")],
            &layer,
            403,
            "private: grant not held by the named pod",
        ),
        (
            "unknown pod",
            Some(&b),
            vec![format!("team-a/ghost {good}")],
            &layer,
            403,
            "private: grant not held by the named pod",
        ),
        (
            "blob outside the manifest",
            Some(&b),
            vec![web(&good)],
            &foreign,
            403,
            "private: object outside the granted image",
        ),
        (
            "malformed grant header",
            Some(&b),
            vec!["garbage".into()],
            &layer,
            403,
            "private: malformed grant header",
        ),
        (
            "control: everything right",
            Some(&b),
            vec![web(&good)],
            &layer,
            200,
            "private",
        ),
    ];
    let client = reqwest::Client::new();
    for (i, (name, token, grants, path, status, reason)) in cases.into_iter().enumerate() {
        let mut req = client.get(format!("http://{}{path}?ns={NS}", w.server));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        for g in &grants {
            req = req.header("x-speculum-grant", g);
        }
        let r = req.send().await.expect("send");
        assert_eq!(r.status().as_u16(), status, "{name}");
        let body = r.text().await.expect("body");
        match status {
            401 => assert!(body.contains("UNAUTHORIZED"), "{name}: {body}"),
            403 => assert!(body.contains("DENIED"), "{name}: {body}"),
            _ => {}
        }
        let rec = last_record(&w.server_audit, i + 1).await;
        assert_eq!(rec.reason, reason, "{name}");
        assert_eq!(rec.status, status, "{name}");
        let want = if status == 200 { "allow" } else { "deny" };
        assert_eq!(rec.decision, want, "{name}");
    }
}
