//! The Bearer-token flow against a real distribution registry configured with `auth: token`:
//! the registry answers 401 with a `WWW-Authenticate: Bearer realm=…` challenge, the resolver
//! fetches a token from the realm with the pull secret's username and password (Basic), and
//! retries with it. The token server is ours (a few lines of axum); the JWTs it issues are
//! ES256, signed by a key whose certificate is the registry's `rootcertbundle` and travels
//! in the `x5c` header, which is how distribution verifies them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use speculum_webhook::credentials::{MemoryCredentials, keychain_for};
use speculum_webhook::metrics::Metrics;
use speculum_webhook::resolve::{RegistryOptions, ResolveError, Resolver, ResolverConfig, Source};
use testkit::registries::{Auth, Registry};

const SERVICE: &str = "speculum-test-registry";
const ISSUER: &str = "speculum-test-issuer";

struct Issuer {
    key: jsonwebtoken::EncodingKey,
    x5c: String,
    users: HashMap<String, String>,
}

impl Issuer {
    fn mint(&self, subject: &str, repo: &str, actions: &[&str]) -> String {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{subject}-{now}-{repo}"),
            "access": if actions.is_empty() { serde_json::json!([]) } else {
                serde_json::json!([{"type": "repository", "name": repo, "actions": actions}])
            },
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.x5c = Some(vec![self.x5c.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}

/// `GET /token?scope=repository:<name>:pull&service=…`, Basic auth optional.
async fn token(
    State(issuer): State<Arc<Issuer>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    let user = match headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
    {
        None => None,
        Some(b64) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&decoded).into_owned();
            match text.split_once(':') {
                Some((u, p)) if issuer.users.get(u).is_some_and(|want| want == p) => {
                    Some(u.to_owned())
                }
                _ => {
                    return (StatusCode::UNAUTHORIZED, "bad credentials".to_owned())
                        .into_response();
                }
            }
        }
    };
    let repo = q
        .get("scope")
        .and_then(|s| s.strip_prefix("repository:"))
        .and_then(|s| s.rsplit_once(':'))
        .map(|(name, _)| name.to_owned())
        .unwrap_or_default();
    // Anonymous callers get a valid token that grants nothing.
    let t = match &user {
        Some(u) => issuer.mint(u, &repo, &["pull"]),
        None => issuer.mint("", &repo, &[]),
    };
    axum::Json(serde_json::json!({"token": t, "access_token": t, "expires_in": 300}))
        .into_response()
}

#[tokio::test]
async fn bearer_token_flow_with_pull_secret() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["token-signer".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "token-signer");
    let cert = params.self_signed(&key).expect("cert");
    let issuer = Arc::new(Issuer {
        key: jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())
            .expect("ec key"),
        x5c: base64::engine::general_purpose::STANDARD.encode(cert.der()),
        users: [("carol".to_owned(), "c-pass".to_owned())].into(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let realm = format!("http://{}/token", listener.local_addr().expect("addr"));
    let app = axum::Router::new()
        .route("/token", axum::routing::get(token))
        .with_state(issuer.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut reg = Registry::start(Auth::Token {
        realm,
        service: SERVICE.into(),
        issuer: ISSUER.into(),
        root_cert_pem: cert.pem(),
    });
    reg.push_auth = Some(format!(
        "Bearer {}",
        issuer.mint("carol", "vault/app", &["pull", "push"])
    ));
    let digest = reg.push_image("vault/app", "v1", "amd64", "t").await;
    let host = reg.host();

    let resolver = Resolver::new(
        ResolverConfig {
            timeout: Duration::from_secs(3),
            registries: [(
                host.clone(),
                RegistryOptions {
                    insecure: true,
                    ..Default::default()
                },
            )]
            .into(),
            ..ResolverConfig::default()
        },
        Arc::new(Metrics::new()),
    );
    let image = format!("{host}/vault/app:v1");
    let mut creds = MemoryCredentials::default();
    creds.add_docker_config("ns", "good", &host, "carol", "c-pass");
    creds.add_docker_config("ns", "bad", &host, "carol", "wrong");
    let good = keychain_for(&creds, "ns", &["good".into()], None)
        .await
        .expect("keychain");
    let bad = keychain_for(&creds, "ns", &["bad".into()], None)
        .await
        .expect("keychain");

    let got = resolver.resolve(&image, &good).await.expect("token flow");
    assert_eq!(
        (got.digest.as_str(), got.source),
        (digest.as_str(), Source::Registry)
    );
    let denied = resolver.resolve(&image, &bad).await;
    assert!(
        matches!(denied, Err(ResolveError::Unauthorized { .. })),
        "{denied:?}"
    );
    let anon = resolver.resolve(&image, &Default::default()).await;
    assert!(
        matches!(anon, Err(ResolveError::Unauthorized { .. })),
        "{anon:?}"
    );
}
