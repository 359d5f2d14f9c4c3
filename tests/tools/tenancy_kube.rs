//! The Kubernetes-backed tenancy parts against a real kube-apiserver + etcd
//! (testkit/src/k8s.rs): the pod conformance suite on [`KubePods`] (a watcher with a
//! `spec.nodeName` field selector, pods created with `spec.nodeName` set, no kubelet), and
//! [`JwksVerifier`] on tokens the API server issues through the TokenRequest API, bound to a
//! pod, plus forged, expired, wrong-issuer, wrong-audience and wrong-ServiceAccount tokens.
//!
//! Skipped with a message when not root or when `SPECULUM_SKIP_K8S=1`.
//! Run: `cargo test -p speculum --test tools tenancy_kube::`.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use speculum::tenancy::peer_auth::{JwksVerifier, PeerVerifier};
use speculum::tenancy::pods::conformance::{self, Driver, DriverError, Timing};
use speculum::tenancy::pods::{GRANTS_ANNOTATION, KubePods, PodInfo, Pods};
use testkit::k8s;

/// Creates, finishes and deletes pods through the API server.
struct KubeDriver(kube::Client);

#[async_trait]
impl Driver for KubeDriver {
    async fn create(&self, pod: &PodInfo) -> Result<(), DriverError> {
        let containers: Vec<Value> = pod
            .images
            .iter()
            .enumerate()
            .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
            .collect();
        let mut metadata = json!({"name": pod.name});
        if !pod.grants.is_empty() {
            metadata["annotations"] =
                json!({ GRANTS_ANNOTATION: serde_json::to_string(&pod.grants)? });
        }
        let object: Pod = serde_json::from_value(json!({
            "metadata": metadata,
            "spec": {"nodeName": pod.node, "containers": containers},
        }))?;
        Api::<Pod>::namespaced(self.0.clone(), &pod.namespace)
            .create(&PostParams::default(), &object)
            .await?;
        Ok(())
    }

    async fn finish(&self, namespace: &str, name: &str) -> Result<(), DriverError> {
        // No kubelet: set the phase through the status subresource as a kubelet would.
        let patch = json!({"status": {"phase": "Succeeded"}});
        Api::<Pod>::namespaced(self.0.clone(), namespace)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<(), DriverError> {
        // Grace period 0: with no kubelet to confirm, a graceful delete would never finish.
        Api::<Pod>::namespaced(self.0.clone(), namespace)
            .delete(name, &DeleteParams::default().grace_period(0))
            .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_pods_conform() {
    if k8s::skip() {
        return;
    }
    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    for ns in conformance::NAMESPACES {
        k8s::namespace(&client, ns, &[]).await;
    }
    let (trigger, shutdown) = speculum::shutdown::channel();
    let pods = KubePods::start(
        client.clone(),
        conformance::NODE.to_owned(),
        Duration::from_secs(1),
        shutdown,
    );
    let started = Instant::now();
    assert!(
        pods.wait_ready(Duration::from_secs(30)).await,
        "KubePods ready after the first list"
    );
    eprintln!(
        "pod index ready (first list) in {} ms",
        started.elapsed().as_millis()
    );
    conformance::run(pods.as_ref(), &KubeDriver(client.clone()), Timing::slow()).await;

    // Index latency: a pod created through the API server shows in the index within (ms).
    let started = Instant::now();
    KubeDriver(client.clone())
        .create(&PodInfo {
            namespace: "tenancy-a".into(),
            name: "latency".into(),
            node: conformance::NODE.into(),
            images: vec!["127.0.0.1:5000/team/latency:v1".into()],
            grants: vec![],
        })
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pods
        .waiting_for("127.0.0.1:5000", "team/latency")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "new pod not indexed within 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("create → indexed in {} ms", started.elapsed().as_millis());
    trigger.fire();
}

/// One part (header or claims) of a JWT as JSON, unverified.
fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

async fn token_for(
    client: &kube::Client,
    ns: &str,
    sa: &str,
    audience: &str,
    pod: Option<&Pod>,
) -> String {
    let mut spec = json!({"audiences": [audience], "expirationSeconds": 600});
    if let Some(pod) = pod {
        spec["boundObjectRef"] = json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        });
    }
    let request: TokenRequest =
        serde_json::from_value(json!({ "spec": spec })).expect("token request");
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("token request")
        .status
        .expect("status")
        .token
}

/// Signs `claims` with the RSA private key in `pem` under `kid`.
fn sign(pem: &[u8], kid: &str, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem).expect("rsa key");
    jsonwebtoken::encode(&header, claims, &key).expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_verifier_on_projected_tokens() {
    if k8s::skip() {
        return;
    }
    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    let ns = "speculum";
    k8s::namespace(&client, ns, &[]).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    for name in ["speculum", "intruder"] {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("sa");
        sas.create(&PostParams::default(), &sa)
            .await
            .expect("create sa");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut created = Vec::new();
    for (name, sa) in [("daemon-a", "speculum"), ("intruder-a", "intruder")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": "node-a", "serviceAccountName": sa,
                     "containers": [{"name": "c", "image": "127.0.0.1:5000/speculum:v1"}]}
        }))
        .expect("pod");
        created.push(
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create pod"),
        );
    }
    let (daemon, intruder) = (&created[0], &created[1]);

    let good = token_for(&client, ns, "speculum", "speculum", Some(daemon)).await;
    let claims = jwt_part(&good, 1);
    eprintln!(
        "kubernetes.io claim of a pod-bound token: {}",
        claims["kubernetes.io"]
    );
    let kid = jwt_part(&good, 0)["kid"].as_str().expect("kid").to_owned();

    // A key the API server never saw, for forgeries under the real kid.
    let forger = cp.dir.path().join("forger.key");
    let status = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&forger)
        .arg("2048")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl genrsa");
    let forger_pem = std::fs::read(&forger).expect("forger key");
    // The API server's own signing key: well-signed tokens with bad claims.
    let real_pem = std::fs::read(cp.dir.path().join("sa.key")).expect("sa.key");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims.clone();
        f(&mut c);
        c
    };

    // (name, token, want node or error reason)
    let cases: Vec<(&str, String, Result<&str, &str>)> = vec![
        (
            "pod-bound token of the daemons' ServiceAccount",
            good.clone(),
            Ok("node-a"),
        ),
        (
            "another audience",
            token_for(&client, ns, "speculum", "someone-else", Some(daemon)).await,
            Err("wrong_audience"),
        ),
        (
            "another ServiceAccount",
            token_for(&client, ns, "intruder", "speculum", Some(intruder)).await,
            Err("not_a_daemon"),
        ),
        (
            "not bound to a pod: no node",
            token_for(&client, ns, "speculum", "speculum", None).await,
            Err("no_node"),
        ),
        (
            "forged: same claims and kid, another key",
            sign(&forger_pem, &kid, &claims),
            Err("bad_signature"),
        ),
        (
            "forged under an unknown kid",
            sign(&forger_pem, "no-such-kid", &claims),
            Err("bad_signature"),
        ),
        (
            "real key, another issuer",
            sign(
                &real_pem,
                &kid,
                &with(&|c| c["iss"] = json!("https://evil.example")),
            ),
            Err("wrong_issuer"),
        ),
        (
            "real key, expired",
            sign(
                &real_pem,
                &kid,
                &with(&|c| {
                    c["iat"] = json!(now - 7200);
                    c["nbf"] = json!(now - 7200);
                    c["exp"] = json!(now - 3600);
                }),
            ),
            Err("expired"),
        ),
        (
            "real key, node claim removed",
            sign(
                &real_pem,
                &kid,
                &with(&|c| c["kubernetes.io"]["node"] = Value::Null),
            ),
            Err("no_node"),
        ),
        ("garbage", "x.y.z".into(), Err("malformed")),
        ("empty", String::new(), Err("no_token")),
    ];

    let verifier = Arc::new(JwksVerifier::new(
        client.clone(),
        "speculum",
        &["speculum:speculum".to_owned()],
        Duration::from_secs(300),
    ));
    let started = Instant::now();
    let first = verifier.verify(&good).await;
    eprintln!(
        "first verify (discovery + JWKS fetch) in {} ms: {:?}",
        started.elapsed().as_millis(),
        first.as_ref().map(|id| &id.node)
    );
    for (name, token, want) in &cases {
        let got = verifier.verify(token).await;
        match (got, want) {
            (Ok(id), Ok(node)) => {
                assert_eq!(id.node, *node, "{name}");
                assert_eq!(
                    id.subject, "system:serviceaccount:speculum:speculum",
                    "{name}"
                );
            }
            (Err(e), Err(reason)) => assert_eq!(e.reason(), *reason, "{name}: {e}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }

    // Cached keys: how long one verification of a good token takes.
    let n = 200;
    let started = Instant::now();
    for _ in 0..n {
        verifier.verify(&good).await.expect("verify");
    }
    eprintln!(
        "verify (cached keys, RS256): {:.1} µs each over {n}",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
}
