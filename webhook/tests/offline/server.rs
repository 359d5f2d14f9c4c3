//! The webhook end to end over HTTPS on 127.0.0.1:0: AdmissionReviews in, patches out, with
//! real registries behind (an open one, an htpasswd one read with a pull secret, and a
//! stand-in cluster endpoint), the metrics port, bad requests, and shutdown.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use speculum_webhook::admit::{Admitter, FailurePolicy};
use speculum_webhook::audit::MemoryAudit;
use speculum_webhook::certs::{self, TlsState};
use speculum_webhook::credentials::{Keychain, MemoryCredentials};
use speculum_webhook::metrics::Metrics;
use speculum_webhook::policy::StaticPolicy;
use speculum_webhook::resolve::{RegistryOptions, Resolver, ResolverConfig};
use speculum_webhook::server::{self, Readiness};
use testkit::registries::{Auth, Registry};

const BODY_LIMIT: usize = 64 * 1024;

struct Rig {
    base: String,
    metrics_base: String,
    client: reqwest::Client,
    audit: Arc<MemoryAudit>,
    ready: Readiness,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(registries: &[String], cluster: &[String], creds: MemoryCredentials) -> Rig {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let metrics = Arc::new(Metrics::new());
    let resolver = Resolver::new(
        ResolverConfig {
            timeout: Duration::from_secs(2),
            registries: registries
                .iter()
                .chain(cluster)
                .map(|h| {
                    (
                        h.clone(),
                        RegistryOptions {
                            insecure: true,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            cluster_endpoints: cluster.to_vec(),
            ..ResolverConfig::default()
        },
        metrics.clone(),
    );
    let audit = Arc::new(MemoryAudit::default());
    let admitter = Arc::new(Admitter {
        resolver: Arc::new(resolver),
        policy: Arc::new(StaticPolicy {
            skip_prefixes: vec![format!("{}/skip/", registries[0])],
            strict_namespaces: vec!["strict".into()],
        }),
        credentials: Some(Arc::new(creds)),
        offline_keychain: Keychain::default(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        grants: None,
        failure_policy: FailurePolicy::Ignore,
        deadline: Duration::from_secs(5),
    });
    let bundle = certs::generate(&["localhost".into()], Duration::from_secs(3600)).expect("certs");
    let tls = TlsState::new(
        certs::server_config(bundle.cert_pem.as_bytes(), bundle.key_pem.as_bytes()).expect("tls"),
    );
    let ready = Readiness::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let metrics_port = metrics_listener.local_addr().expect("addr").port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = server::router(admitter, ready.clone(), BODY_LIMIT);
    let server = tokio::spawn(server::serve_tls(
        listener,
        tls,
        app,
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(2),
    ));
    tokio::spawn(server::serve_metrics(
        metrics_listener,
        metrics,
        std::future::pending(),
    ));
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(bundle.ca_pem.as_bytes()).expect("ca")])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    Rig {
        base: format!("https://localhost:{port}"),
        metrics_base: format!("http://127.0.0.1:{metrics_port}"),
        client,
        audit,
        ready,
        stop: Some(stop_tx),
        server,
    }
}

fn pod_review(uid: &str, namespace: &str, containers: Value, pull_secrets: &[&str]) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": namespace, "userInfo": {"username": "alice"},
            "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "namespace": namespace},
                "spec": {"containers": containers,
                         "imagePullSecrets": pull_secrets.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}}
        }
    })
}

impl Rig {
    async fn post(&self, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/mutate", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn review(&self, review: &Value) -> Value {
        let (status, body) = self.post(review.to_string()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["response"]["uid"], review["request"]["uid"],
            "uid echoed"
        );
        body["response"].clone()
    }
}

fn patch_of(resp: &Value) -> Value {
    let Some(p) = resp["patch"].as_str() else {
        return json!([]);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(p)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("patch json")
}

#[tokio::test]
async fn admission_over_https() {
    let public = Registry::start(Auth::None);
    let private = Registry::start(Auth::Htpasswd(vec![("alice".into(), "a-pass".into())]));
    let (ph, qh) = (public.host(), private.host());
    let d_pub = public.push_image("team/app", "v1", "amd64", "a").await;
    let (d_idx, _) = public.push_index("team/multi", "v1", "m").await;
    let d_priv = private.push_image("secret/app", "v1", "amd64", "s").await;
    let mut creds = MemoryCredentials::default();
    creds.add_docker_config("team", "regcred", &qh, "alice", "a-pass");
    let mut rig = start(&[ph.clone(), qh.clone()], &[], creds).await;

    // Probes.
    let get = |path: &str| rig.client.get(format!("{}{path}", rig.base)).send();
    assert_eq!(get("/livez").await.expect("livez").status().as_u16(), 200);
    assert_eq!(get("/readyz").await.expect("readyz").status().as_u16(), 503);
    rig.ready.set(true);
    assert_eq!(get("/readyz").await.expect("readyz").status().as_u16(), 200);

    // A pod with a public image, a multi-arch image, a private image read with its pull
    // secret, an already pinned one and a skipped one.
    let pinned = format!("{ph}/team/app:v1@{d_pub}");
    let review = pod_review(
        "u-1",
        "team",
        json!([
            {"name": "a", "image": format!("{ph}/team/app:v1")},
            {"name": "b", "image": format!("{ph}/team/multi:v1")},
            {"name": "c", "image": format!("{qh}/secret/app:v1")},
            {"name": "d", "image": pinned},
            {"name": "e", "image": format!("{ph}/skip/me:v1")}
        ]),
        &["regcred"],
    );
    let resp = rig.review(&review).await;
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");
    assert_eq!(
        patch_of(&resp),
        json!([
            {"op": "replace", "path": "/spec/containers/0/image", "value": format!("{ph}/team/app:v1@{d_pub}")},
            {"op": "replace", "path": "/spec/containers/1/image", "value": format!("{ph}/team/multi:v1@{d_idx}")},
            {"op": "replace", "path": "/spec/containers/2/image", "value": format!("{qh}/secret/app:v1@{d_priv}")}
        ])
    );
    let decisions: Vec<(String, String)> = rig
        .audit
        .lines()
        .iter()
        .map(|l| (l.container.clone(), l.decision.clone()))
        .collect();
    assert_eq!(
        decisions,
        [
            ("a", "pinned"),
            ("b", "pinned"),
            ("c", "pinned"),
            ("d", "kept"),
            ("e", "skipped")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let line = &rig.audit.lines()[0];
    assert_eq!(
        (
            line.namespace.as_str(),
            line.kind.as_str(),
            line.name.as_str()
        ),
        ("team", "Pod", "web-*")
    );
    assert_eq!(line.source.as_deref(), Some("registry"));
    assert!(
        resp["auditAnnotations"]["pinned-images"]
            .as_str()
            .is_some_and(|s| s.contains("registry"))
    );

    // The private image without its pull secret cannot be pinned: admitted with a warning...
    let review = pod_review(
        "u-2",
        "team",
        json!([{"name": "c", "image": format!("{qh}/secret/app:v1")}]),
        &[],
    );
    let resp = rig.review(&review).await;
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none());
    assert!(
        resp["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("refused every credential")),
        "{resp}"
    );
    // ...but denied in a strict namespace.
    let review = pod_review(
        "u-3",
        "strict",
        json!([{"name": "c", "image": format!("{ph}/team/app:missing")}]),
        &[],
    );
    let resp = rig.review(&review).await;
    assert_eq!(resp["allowed"], false);
    assert_eq!(resp["status"]["code"], 403);
    assert!(
        resp["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not found")),
        "{resp}"
    );

    // Broken requests: never a panic, the uid whenever it can be read.
    let (status, _) = rig.post("{not json").await;
    assert_eq!(status, 400);
    let (status, body) = rig
        .post(r#"{"apiVersion":"admission.k8s.io/v1","kind":"Nope","request":{"uid":"u-4"}}"#)
        .await;
    assert_eq!(
        (status, body["response"]["uid"].as_str()),
        (200, Some("u-4"))
    );
    assert_eq!(
        body["response"]["allowed"], true,
        "failurePolicy Ignore admits"
    );
    // Written the way the API server (Go, fields in declaration order) writes it: uid first.
    let huge = format!(
        r#"{{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{{"uid":"u-5","kind":{{"group":"","version":"v1","kind":"Pod"}},"operation":"CREATE","object":{{"metadata":{{"annotations":{{"big":"{}"}}}}}}}}}}"#,
        "x".repeat(BODY_LIMIT * 2)
    );
    let (status, body) = rig.post(huge).await;
    assert_eq!(
        (status, body["response"]["uid"].as_str()),
        (200, Some("u-5")),
        "{body}"
    );
    assert!(
        body["response"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("larger than"))
    );
    let (status, _) = rig.post(vec![b'{'; BODY_LIMIT * 2]).await;
    assert_eq!(status, 413);
    // Not a workload: allowed untouched.
    let mut svc = pod_review("u-6", "team", json!([]), &[]);
    svc["request"]["kind"]["kind"] = json!("Service");
    let resp = rig.review(&svc).await;
    assert_eq!(resp, json!({"uid": "u-6", "allowed": true}));

    // Metrics on their own port.
    let text = reqwest::get(format!("{}/metrics", rig.metrics_base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for want in [
        "speculum_webhook_admission_duration_seconds_count{kind=\"Pod\",outcome=\"patched\"} 1",
        "speculum_webhook_admission_duration_seconds_count{kind=\"Pod\",outcome=\"denied\"} 1",
        "speculum_webhook_images_total{decision=\"skipped\"} 1",
        &format!(
            "speculum_webhook_resolution_errors_total{{registry=\"{qh}\",reason=\"unauthorized\"}} 1"
        ),
    ] {
        assert!(text.contains(want), "missing {want} in\n{text}");
    }

    // Shutdown: the server stops accepting and its task ends.
    let _ = rig.stop.take().map(|s| s.send(()));
    tokio::time::timeout(Duration::from_secs(5), &mut rig.server)
        .await
        .expect("server stops")
        .expect("join")
        .expect("ok");
}

#[tokio::test]
async fn registry_outage_pins_through_the_cluster_and_says_so() {
    let mut upstream = Registry::start(Auth::None);
    let node = Registry::start(Auth::None);
    let host = upstream.host();
    let d = upstream.push_image("team/app", "v2", "amd64", "z").await;
    node.push_image("team/app", "v2", "amd64", "z").await;
    upstream.stop();
    let rig = start(
        std::slice::from_ref(&host),
        &[node.host()],
        MemoryCredentials::default(),
    )
    .await;
    let review = pod_review(
        "u-7",
        "team",
        json!([{"name": "a", "image": format!("{host}/team/app:v2")}]),
        &[],
    );
    let resp = rig.review(&review).await;
    assert_eq!(
        patch_of(&resp),
        json!([{"op": "replace", "path": "/spec/containers/0/image", "value": format!("{host}/team/app:v2@{d}")}])
    );
    assert!(
        resp["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("cluster")),
        "{resp}"
    );
    assert!(
        resp["auditAnnotations"]["pinned-images"]
            .as_str()
            .is_some_and(|s| s.contains("cluster"))
    );
    assert_eq!(rig.audit.lines()[0].source.as_deref(), Some("cluster"));
}
