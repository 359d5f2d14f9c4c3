//! The Kubernetes E2E tier's control plane itself (tests/k8s/, testkit/src/k8s.rs): what later
//! tests of the node pod index and projected-token peer authentication rely on, checked against
//! the real kube-apiserver + etcd. Pods bound by `spec.nodeName` are listed by a field selector
//! with no scheduler or kubelet; projected ServiceAccount tokens are issued for an audience, are
//! signed by a key published at `/openid/v1/jwks` under the issuer's discovery document, and
//! pass a TokenReview only for that audience.
//!
//! Skipped with a message when not root or when `SPECULUM_SKIP_K8S=1`.

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use testkit::k8s;

async fn get_json(client: &kube::Client, path: &str) -> Value {
    let req = http::Request::get(path).body(Vec::new()).expect("request");
    client
        .request::<Value>(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The JSON of one part (header or claims) of a JWT, without verifying anything.
fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bind_by_node_name_and_projected_tokens_verify() {
    if k8s::skip() {
        return;
    }
    let cp = k8s::ControlPlane::start().await;
    let client = cp.client().await;
    k8s::namespace(&client, "nodes", &[]).await;

    // Pods bound to nodes by name; the field selector the node pod index will watch with.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "nodes");
    for (name, node) in [("a1", "node-a"), ("a2", "node-a"), ("b1", "node-b")] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "127.0.0.1:5000/x:1"}]}
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }
    // (node, want pod names)
    let cases: [(&str, &[&str]); 3] = [
        ("node-a", &["a1", "a2"]),
        ("node-b", &["b1"]),
        ("node-c", &[]),
    ];
    for (node, want) in cases {
        let list = Api::<Pod>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .expect("list by node");
        let mut names: Vec<String> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        assert_eq!(names, want, "{node}");
    }

    // A projected token for the daemon's audience.
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "speculum"}})).expect("sa");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "nodes");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": ["speculum-peers"], "expirationSeconds": 600}
    }))
    .expect("token request");
    let issued = sas
        .create_token_request("speculum", &PostParams::default(), &request)
        .await
        .expect("token request");
    let token = issued.status.expect("status").token;
    let header = jwt_part(&token, 0);
    let claims = jwt_part(&token, 1);
    assert_eq!(claims["iss"], json!(cp.server));
    assert_eq!(claims["aud"], json!(["speculum-peers"]));
    assert_eq!(claims["sub"], json!("system:serviceaccount:nodes:speculum"));
    assert_eq!(header["alg"], json!("RS256"));

    // The discovery document names the JWKS, which holds the key that signed the token.
    let discovery = get_json(&client, "/.well-known/openid-configuration").await;
    assert_eq!(discovery["issuer"], json!(cp.server));
    assert_eq!(
        discovery["jwks_uri"],
        json!(format!("{}/openid/v1/jwks", cp.server))
    );
    let jwks = get_json(&client, "/openid/v1/jwks").await;
    let kids: Vec<&Value> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| &k["kid"])
        .collect();
    assert!(kids.contains(&&header["kid"]), "{kids:?} vs {header}");

    // The API server itself accepts the token for its audience only.
    let reviews: Api<TokenReview> = Api::all(client.clone());
    // (name, audience, want authenticated)
    let cases = [
        ("right audience", "speculum-peers", true),
        ("other audience", "someone-else", false),
    ];
    for (name, audience, want) in cases {
        let review: TokenReview = serde_json::from_value(json!({
            "spec": {"token": token, "audiences": [audience]}
        }))
        .expect("review");
        let got = reviews
            .create(&PostParams::default(), &review)
            .await
            .expect("token review")
            .status
            .and_then(|s| s.authenticated)
            .unwrap_or(false);
        assert_eq!(got, want, "{name}");
    }
}
