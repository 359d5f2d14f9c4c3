//! A private image and a containers/image client (registry in the path): complete-or-nothing
//! with grants, over real HTTP on loopback with the in-memory twins (store, pods, router) and
//! the real grant and peer-token code (as `tenancy_registry.rs` does for containerd requests).
//!
//! One job: the manifest of a private image is a 404 without a grant of a pod on the asking
//! node; with one it is answered when a peer serves every blob under that grant (and the
//! blobs follow), and still a 404 when one blob has no holder — never fetched upstream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use speculum::audit::MemorySink;
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
/// How a containers/image client names the registry in the path.
const PATH_REG: &str = "127.0.0.1_5000";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-cluster";

fn private_gate() -> Gate {
    Gate::new(
        Arc::new(StaticPolicy::fixed(Decision {
            allow: true,
            reason: "private".into(),
            resolve_tag: true,
            require_grant: true,
            tag_resolution: None,
        })),
        Switches {
            resolve_tags: true,
            resolve_latest_tag: true,
        },
        PolicyMetrics::unregistered(),
    )
}

fn shared_key(node: &str) -> Arc<SharedKey> {
    Arc::new(SharedKey::from_secret(SECRET, node, Duration::from_secs(300)).expect("key"))
}

fn manifest_json(config: &Digest, layer: &Digest, len: usize) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":24}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":{len}}}]}}"#
    )
}

#[tokio::test]
async fn private_image_is_answered_only_with_a_grant_and_every_blob_on_a_peer() {
    let (private_pem, public_pem) = speculum_grant::generate();
    let signer = Signer::from_pem(private_pem.as_bytes()).expect("signer");
    let keys = || {
        Arc::new(GrantKeys::fixed(
            KeySet::from_pems([public_pem.as_bytes()]).expect("keys"),
            speculum_grant::DEFAULT_AUDIENCE,
        ))
    };
    // Node "a" holds `whole` (config + layer) and `partial`, whose layer nobody holds.
    let store = Arc::new(MemoryStore::new());
    let layer_bytes = vec![7u8; 40_000];
    let layer = store.add_blob(layer_bytes.clone());
    let config = store.add_blob(r#"{"architecture":"amd64"}"#);
    let whole = store.add_blob(manifest_json(&config, &layer, layer_bytes.len()));
    store.set_image(&format!("{REG}/team/app:v1"), whole.clone());
    let missing = Digest::sha256_of(b"a layer nobody has");
    let partial = store.add_blob(manifest_json(&config, &missing, 18));
    store.set_image(&format!("{REG}/team/app:v2"), partial.clone());
    let a_pods = Arc::new(MemoryPods::new("a"));
    let a_pods_dyn: Arc<dyn Pods> = a_pods.clone();
    let verifier: Arc<dyn PeerVerifier> = shared_key("a");
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
            audit: Arc::new(MemorySink::new()),
            node: "a".into(),
            tenancy: Tenancy {
                pods: Some(a_pods_dyn.clone()),
                grants: Some(Arc::new(GrantChecker::new(keys(), Some(a_pods_dyn)))),
                tokens: None,
                verifier: Some(verifier),
            },
        },
    ))
    .await;
    let at_a = vec![Peer::new("a", server)];
    let routes: HashMap<String, Vec<Peer>> = [&whole, &partial, &config, &layer]
        .into_iter()
        .map(|d| (d.to_string(), at_a.clone()))
        .collect();
    // Node "b": a containers/image client asks its mirror endpoint.
    let b_pods = Arc::new(MemoryPods::new("b"));
    let b_pods_dyn: Arc<dyn Pods> = b_pods.clone();
    let metrics = speculum::registry::RegistryMetrics::default();
    let mirror = Mirror::new(
        Arc::new(MemoryRouter::with_static(routes)),
        MirrorConfig {
            resolve_timeout: Duration::from_millis(200),
            ..MirrorConfig::default()
        },
        metrics.clone(),
    )
    .expect("client");
    let tokens: Arc<dyn PeerTokens> = shared_key("b");
    let audit = MemorySink::new();
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
            audit: Arc::new(audit.clone()),
            node: "b".into(),
            tenancy: Tenancy {
                pods: Some(b_pods_dyn.clone()),
                grants: Some(Arc::new(GrantChecker::new(keys(), Some(b_pods_dyn)))),
                tokens: Some(tokens),
                verifier: None,
            },
        },
    ))
    .await;
    let c = reqwest::Client::new();
    let get = |what: &str| {
        let url = format!("http://{mirror}/v2/{PATH_REG}/team/app/{what}");
        let c = c.clone();
        async move { c.get(url).send().await.expect("send") }
    };
    let manifest = |d: &Digest| format!("manifests/{d}");

    // No pod on node b holds a grant: 404, the client goes upstream with its credentials.
    assert_eq!(get(&manifest(&whole)).await.status(), 404);

    // A pod of team-a on node b holds grants for both images.
    let grant = |d: &Digest| {
        signer
            .sign(
                "team-a",
                &format!("{REG}/team/app"),
                &d.to_string(),
                Duration::from_secs(600),
                SystemTime::now(),
            )
            .expect("sign")
    };
    let pod = PodInfo {
        namespace: "team-a".into(),
        name: "web".into(),
        node: "b".into(),
        images: vec![format!("{REG}/team/app:v1")],
        grants: vec![grant(&whole), grant(&partial)],
    };
    a_pods.insert(pod.clone());
    b_pods.insert(pod);
    let r = get(&manifest(&whole)).await;
    assert_eq!(
        r.status(),
        200,
        "every blob is on a peer that honours the grant"
    );
    assert_eq!(
        Digest::sha256_of(&r.bytes().await.expect("body")),
        whole,
        "the manifest itself"
    );
    for blob in [&config, &layer] {
        let r = get(&format!("blobs/{blob}")).await;
        assert_eq!(r.status(), 200, "{blob}");
        assert_eq!(Digest::sha256_of(&r.bytes().await.expect("body")), *blob);
    }
    // Granted, but one layer has no holder (and upstream is never asked for a private image).
    assert_eq!(get(&manifest(&partial)).await.status(), 404);
    let records = audit.records();
    let partial_record = records
        .iter()
        .rev()
        .find(|r| r.reference == partial.to_string())
        .expect("a record of the partial image");
    assert_eq!(partial_record.status, 404);
    assert_eq!(partial_record.grant.as_deref(), Some("team-a/web"));
}
