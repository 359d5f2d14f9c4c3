//! The authenticated data plane: tokens daemons send each other, and their verification.
//!
//! Every daemon-to-daemon request carries `Authorization: Bearer <token>` from a
//! [`PeerTokens`]; the peer endpoint asks a [`PeerVerifier`] who sent it. Two pairs:
//! - Kubernetes: [`TokenFile`] sends the projected ServiceAccount token the kubelet keeps
//!   fresh in a file; [`JwksVerifier`] checks it against the keys the API server publishes
//!   (OIDC discovery + JWKS, fetched through the kube client, cached, refetched periodically
//!   and on an unknown `kid`), its issuer, audience, lifetime and subject (one of the daemons'
//!   ServiceAccounts), and takes the node from the `kubernetes.io.node.name` claim that a
//!   pod-bound token carries.
//! - Shared key (no Kubernetes): [`SharedKey`] signs and checks short-lived HS256 tokens with
//!   a secret every daemon holds.
//!
//! Tokens and keys are never logged. Deciding what a verified peer may fetch is the
//! registry's job (docs/tenancy.md).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::TenancyError;

/// Issuer and subject of shared-key tokens.
pub(crate) const SHARED_KEY_ISSUER: &str = "speculum-daemon";
/// Shared keys shorter than this are refused.
pub(crate) const MIN_SHARED_KEY_BYTES: usize = 32;
/// Clock skew allowed on `exp`/`nbf`.
const LEEWAY_SECS: u64 = 30;
/// Refetches of the JWKS on an unknown `kid` are at least this far apart.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// Tokens longer than this are refused unparsed.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Who sent a peer request, as proven by its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node the requesting daemon runs on (from the projected token's
    /// `kubernetes.io.node.name` claim, or the shared-key token's `node` claim).
    pub node: String,
    /// The token's subject (`system:serviceaccount:<ns>:<name>` or `speculum-daemon`).
    pub subject: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerAuthError {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("wrong audience")]
    WrongAudience,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("subject {0:?} is not a daemon of this cluster")]
    NotADaemon(String),
    #[error("token carries no node")]
    NoNode,
    /// Keys or token could not be obtained (JWKS fetch failed, token file unreadable).
    #[error("peer auth unavailable: {0}")]
    Unavailable(String),
}

impl PeerAuthError {
    /// A short stable word for audit lines and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerAuthError::Missing => "no_token",
            PeerAuthError::Malformed => "malformed",
            PeerAuthError::BadSignature => "bad_signature",
            PeerAuthError::Expired => "expired",
            PeerAuthError::WrongAudience => "wrong_audience",
            PeerAuthError::WrongIssuer => "wrong_issuer",
            PeerAuthError::NotADaemon(_) => "not_a_daemon",
            PeerAuthError::NoNode => "no_node",
            PeerAuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// The sending side: the token to put on the next request to a peer.
#[async_trait]
pub trait PeerTokens: Send + Sync + 'static {
    async fn token(&self) -> Result<String, PeerAuthError>;
}

/// The receiving side: who sent this token?
#[async_trait]
pub trait PeerVerifier: Send + Sync + 'static {
    async fn verify(&self, token: &str) -> Result<PeerIdentity, PeerAuthError>;
}

/// Maps a jsonwebtoken validation error to the seam's error.
fn jwt_error(e: &jsonwebtoken::errors::Error) -> PeerAuthError {
    match e.kind() {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => PeerAuthError::BadSignature,
        // Not yet valid counts as outside its lifetime.
        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => PeerAuthError::Expired,
        ErrorKind::InvalidAudience => PeerAuthError::WrongAudience,
        ErrorKind::InvalidIssuer => PeerAuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => PeerAuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => PeerAuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => PeerAuthError::Expired,
        _ => PeerAuthError::Malformed,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_shape(token: &str) -> Result<(), PeerAuthError> {
    if token.is_empty() {
        return Err(PeerAuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
        return Err(PeerAuthError::Malformed);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Shared key

#[derive(Debug, Serialize, Deserialize)]
struct SharedClaims {
    iss: String,
    sub: String,
    aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    iat: u64,
    exp: u64,
}

/// HS256 tokens signed and checked with a secret every daemon holds. Both [`PeerTokens`] (a
/// token naming this node, cached and re-signed when half its lifetime is gone) and
/// [`PeerVerifier`].
pub struct SharedKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    node: String,
    audience: String,
    ttl: Duration,
    cached: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SharedKey")
            .field("node", &self.node)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SharedKey {
    /// Reads the secret from `path` (a trailing newline is not part of it; at least
    /// [`MIN_SHARED_KEY_BYTES`] must remain). Tokens name `node` and live `ttl`; the audience
    /// is `speculum` until [`SharedKey::with_audience`].
    pub fn from_file(
        path: impl AsRef<Path>,
        node: impl Into<String>,
        ttl: Duration,
    ) -> Result<SharedKey, TenancyError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| TenancyError::Key {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        SharedKey::from_secret(&bytes, node, ttl).map_err(|reason| TenancyError::Key {
            path: path.to_owned(),
            reason,
        })
    }

    /// As [`SharedKey::from_file`], from the secret's bytes.
    pub fn from_secret(
        secret: &[u8],
        node: impl Into<String>,
        ttl: Duration,
    ) -> Result<SharedKey, String> {
        let mut secret = secret;
        while let Some(rest) = secret
            .strip_suffix(b"\n")
            .or_else(|| secret.strip_suffix(b"\r"))
        {
            secret = rest;
        }
        if secret.len() < MIN_SHARED_KEY_BYTES {
            return Err(format!(
                "shared key has {} bytes, at least {MIN_SHARED_KEY_BYTES} are needed",
                secret.len()
            ));
        }
        let node = node.into();
        if node.is_empty() {
            return Err("node name is empty".into());
        }
        Ok(SharedKey {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            node,
            audience: super::PeerAuthConfig::default().audience,
            ttl,
            cached: Mutex::new(None),
        })
    }

    /// Tokens carry, and must carry, `audience`.
    pub fn with_audience(mut self, audience: impl Into<String>) -> SharedKey {
        self.audience = audience.into();
        self
    }

    /// Signs a token for `node`, issued at `iat` (seconds since the epoch). Public for tests
    /// (expired tokens, tokens of other nodes).
    pub fn sign(
        &self,
        node: Option<&str>,
        iat: u64,
        ttl: Duration,
    ) -> Result<String, PeerAuthError> {
        let claims = SharedClaims {
            iss: SHARED_KEY_ISSUER.into(),
            sub: SHARED_KEY_ISSUER.into(),
            aud: self.audience.clone(),
            node: node.map(str::to_owned),
            iat,
            exp: iat + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| PeerAuthError::Unavailable(format!("signing failed: {e}")))
    }
}

#[async_trait]
impl PeerTokens for SharedKey {
    async fn token(&self) -> Result<String, PeerAuthError> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((token, refresh_at)) = cached.as_ref()
            && Instant::now() < *refresh_at
        {
            return Ok(token.clone());
        }
        let token = self.sign(Some(&self.node), now_secs(), self.ttl)?;
        // Re-sign when half the lifetime is gone: a token in flight never expires on the way.
        *cached = Some((token.clone(), Instant::now() + self.ttl / 2));
        Ok(token)
    }
}

#[async_trait]
impl PeerVerifier for SharedKey {
    async fn verify(&self, token: &str) -> Result<PeerIdentity, PeerAuthError> {
        check_shape(token)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[SHARED_KEY_ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<SharedClaims>(token, &self.decoding, &validation)
            .map_err(|e| jwt_error(&e))?;
        if data.claims.sub != SHARED_KEY_ISSUER {
            return Err(PeerAuthError::NotADaemon(data.claims.sub));
        }
        match data.claims.node {
            Some(node) if !node.is_empty() => Ok(PeerIdentity {
                node,
                subject: data.claims.sub,
            }),
            _ => Err(PeerAuthError::NoNode),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Projected token file

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileVersion {
    modified: Option<SystemTime>,
    len: u64,
}

/// The projected ServiceAccount token the kubelet writes (and rotates) in a file; re-read when
/// the file changes, checked at most once a second.
#[derive(Debug)]
pub(crate) struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenFileState>,
}

#[derive(Default)]
struct TokenFileState {
    checked: Option<Instant>,
    version: Option<FileVersion>,
    token: Option<String>,
}

impl std::fmt::Debug for TokenFileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("TokenFileState")
            .field("version", &self.version)
            .field("loaded", &self.token.is_some())
            .finish()
    }
}

impl TokenFile {
    pub fn new(path: impl Into<PathBuf>) -> TokenFile {
        TokenFile {
            path: path.into(),
            state: Mutex::new(TokenFileState::default()),
        }
    }

    fn read(&self) -> Result<String, PeerAuthError> {
        let unavailable = |e: String| {
            PeerAuthError::Unavailable(format!("token file {}: {e}", self.path.display()))
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = state
            .checked
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if fresh && let Some(token) = &state.token {
            return Ok(token.clone());
        }
        state.checked = Some(Instant::now());
        // Metadata follows the kubelet's `..data` symlink swap to the new file.
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                state.token = None;
                state.version = None;
                return Err(unavailable(e.to_string()));
            }
        };
        let version = FileVersion {
            modified: meta.modified().ok(),
            len: meta.len(),
        };
        if state.version.as_ref() == Some(&version)
            && let Some(token) = &state.token
        {
            return Ok(token.clone());
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| unavailable(e.to_string()))?;
        let token = text.trim().to_owned();
        if token.is_empty() {
            return Err(unavailable("empty".into()));
        }
        state.version = Some(version);
        state.token = Some(token.clone());
        Ok(token)
    }
}

#[async_trait]
impl PeerTokens for TokenFile {
    async fn token(&self) -> Result<String, PeerAuthError> {
        // A stat per second and a read per rotation of a small file on a tmpfs volume.
        self.read()
    }
}

// ---------------------------------------------------------------------------------------------
// JWKS

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
}

#[derive(Debug, Deserialize)]
struct ProjectedClaims {
    sub: String,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Debug, Deserialize)]
struct KubernetesClaim {
    #[serde(default)]
    node: Option<NamedRef>,
}

#[derive(Debug, Deserialize)]
struct NamedRef {
    #[serde(default)]
    name: String,
}

/// The API server's published keys, as last fetched.
struct Keys {
    issuer: String,
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    fetched: Instant,
}

/// Checks projected ServiceAccount tokens against the keys the API server publishes.
///
/// Keys are fetched on first use, refetched when older than `refresh`, and refetched early on
/// an unknown `kid` (at most once per 10 s, so garbage tokens cannot make us hammer the API
/// server). A failed refetch keeps the previous keys; with none at all, verification answers
/// `Unavailable`. RBAC: the `system:service-account-issuer-discovery` ClusterRole (bound to
/// all ServiceAccounts by default).
pub struct JwksVerifier {
    client: kube::Client,
    audience: String,
    subjects: HashSet<String>,
    refresh: Duration,
    keys: tokio::sync::RwLock<Option<Keys>>,
    /// Serialises fetches; holds when the last one was attempted.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("audience", &self.audience)
            .field("subjects", &self.subjects)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl JwksVerifier {
    /// `service_accounts` are `namespace:name`; tokens of any other subject are refused.
    pub fn new(
        client: kube::Client,
        audience: impl Into<String>,
        service_accounts: &[String],
        refresh: Duration,
    ) -> JwksVerifier {
        let subjects = service_accounts
            .iter()
            .filter_map(|sa| sa.split_once(':'))
            .map(|(ns, name)| format!("system:serviceaccount:{ns}:{name}"))
            .collect();
        JwksVerifier {
            client,
            audience: audience.into(),
            subjects,
            refresh,
            keys: tokio::sync::RwLock::new(None),
            fetching: tokio::sync::Mutex::new(None),
        }
    }

    /// Fetches discovery and keys now; the number of usable keys.
    pub async fn refresh_now(&self) -> Result<usize, PeerAuthError> {
        let mut last = self.fetching.lock().await;
        *last = Some(Instant::now());
        self.fetch().await
    }

    async fn fetch(&self) -> Result<usize, PeerAuthError> {
        let get = |path: &str| {
            http::Request::get(path)
                .body(Vec::new())
                .map_err(|e| PeerAuthError::Unavailable(e.to_string()))
        };
        let unavailable = |what: &str, e: kube::Error| {
            tracing::warn!(error = %e, "fetching the API server's {what} failed");
            PeerAuthError::Unavailable(format!("{what}: {e}"))
        };
        let discovery: Discovery = self
            .client
            .request(get("/.well-known/openid-configuration")?)
            .await
            .map_err(|e| unavailable("OIDC discovery document", e))?;
        let set: JwkSet = self
            .client
            .request(get("/openid/v1/jwks")?)
            .await
            .map_err(|e| unavailable("JWKS", e))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (_, Some(a)) => match Algorithm::try_from(a) {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(_), None) => Algorithm::ES256,
                _ => continue,
            };
            if !matches!(alg, Algorithm::RS256 | Algorithm::ES256) {
                continue;
            }
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    by_kid.insert(kid, (key, alg));
                }
                Err(e) => {
                    tracing::warn!(kid = %kid, error = %e, "unusable key in the API server's JWKS")
                }
            }
        }
        let count = by_kid.len();
        tracing::info!(keys = count, issuer = %discovery.issuer, "API server JWKS fetched");
        *self.keys.write().await = Some(Keys {
            issuer: discovery.issuer,
            by_kid,
            fetched: Instant::now(),
        });
        Ok(count)
    }

    /// Refetches if the keys are stale (`refresh`) or if `kid` is unknown and the last fetch
    /// is at least [`UNKNOWN_KID_REFETCH`] old. A failure keeps the old keys.
    async fn maybe_refetch(&self, kid: &str) {
        let (stale, known) = {
            let keys = self.keys.read().await;
            match keys.as_ref() {
                None => (true, false),
                Some(k) => (
                    k.fetched.elapsed() >= self.refresh,
                    k.by_kid.contains_key(kid),
                ),
            }
        };
        if !stale && known {
            return;
        }
        let mut last = self.fetching.lock().await;
        // Someone else may have fetched while we waited for the lock.
        let recent = last.is_some_and(|at| at.elapsed() < UNKNOWN_KID_REFETCH);
        if recent {
            return;
        }
        *last = Some(Instant::now());
        let _ = self.fetch().await;
    }
}

#[async_trait]
impl PeerVerifier for JwksVerifier {
    async fn verify(&self, token: &str) -> Result<PeerIdentity, PeerAuthError> {
        check_shape(token)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| PeerAuthError::Malformed)?;
        let kid = header.kid.clone().unwrap_or_default();
        self.maybe_refetch(&kid).await;
        let keys = self.keys.read().await;
        let keys = keys.as_ref().ok_or_else(|| {
            PeerAuthError::Unavailable("no keys fetched from the API server".into())
        })?;
        let (key, alg) = keys.by_kid.get(&kid).ok_or(PeerAuthError::BadSignature)?;
        if header.alg != *alg {
            return Err(PeerAuthError::BadSignature);
        }
        let mut validation = Validation::new(*alg);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&keys.issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let data = jsonwebtoken::decode::<ProjectedClaims>(token, key, &validation)
            .map_err(|e| jwt_error(&e))?;
        let claims = data.claims;
        if !self.subjects.contains(&claims.sub) {
            return Err(PeerAuthError::NotADaemon(claims.sub));
        }
        let node = claims
            .kubernetes
            .and_then(|k| k.node)
            .map(|n| n.name)
            .filter(|n| !n.is_empty())
            .ok_or(PeerAuthError::NoNode)?;
        Ok(PeerIdentity {
            node,
            subject: claims.sub,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef\n";
    const OTHER_KEY: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn key(secret: &[u8]) -> SharedKey {
        SharedKey::from_secret(secret, "node-a", Duration::from_secs(300)).expect("key")
    }

    #[test]
    fn shared_key_file_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        // (name, content, want ok)
        let cases: Vec<(&str, Option<&[u8]>, bool)> = vec![
            ("32 bytes + newline", Some(KEY), true),
            ("32 bytes", Some(OTHER_KEY), true),
            (
                "31 bytes + newline",
                Some(b"0123456789abcdef0123456789abcde\n"),
                false,
            ),
            ("empty", Some(b""), false),
            ("missing", None, false),
        ];
        for (i, (name, content, want)) in cases.into_iter().enumerate() {
            let path = dir.path().join(format!("key{i}"));
            if let Some(c) = content {
                std::fs::write(&path, c).expect("write");
            }
            let got = SharedKey::from_file(&path, "node-a", Duration::from_secs(60));
            assert_eq!(got.is_ok(), want, "{name}: {got:?}");
            if let Err(e) = got {
                let text = e.to_string();
                assert!(!text.contains("0123456789"), "{name}: key in error: {text}");
            }
        }
    }

    #[tokio::test]
    async fn shared_key_verify_table() {
        let ours = key(KEY);
        let forger = key(OTHER_KEY);
        let now = now_secs();
        let ttl = Duration::from_secs(300);
        let good = ours.token().await.expect("token");
        let other_aud = key(KEY).with_audience("someone-else");
        // (name, token, want node or error reason)
        let cases: Vec<(&str, String, Result<&str, &str>)> = vec![
            ("good", good.clone(), Ok("node-a")),
            (
                "another node's token",
                ours.sign(Some("node-b"), now, ttl).expect("sign"),
                Ok("node-b"),
            ),
            (
                "forged with another key",
                forger.sign(Some("node-a"), now, ttl).expect("sign"),
                Err("bad_signature"),
            ),
            (
                "expired",
                ours.sign(Some("node-a"), now - 600, ttl).expect("sign"),
                Err("expired"),
            ),
            (
                "expired within leeway",
                ours.sign(Some("node-a"), now - 310, ttl).expect("sign"),
                Ok("node-a"),
            ),
            (
                "wrong audience",
                other_aud.sign(Some("node-a"), now, ttl).expect("sign"),
                Err("wrong_audience"),
            ),
            (
                "no node",
                ours.sign(None, now, ttl).expect("sign"),
                Err("no_node"),
            ),
            (
                "empty node",
                ours.sign(Some(""), now, ttl).expect("sign"),
                Err("no_node"),
            ),
            ("empty", String::new(), Err("no_token")),
            ("garbage", "not a token".into(), Err("malformed")),
            ("garbage with dots", "a.b.c".into(), Err("malformed")),
            (
                "signature stripped",
                format!("{}.", good.rsplit_once('.').map(|(h, _)| h).unwrap_or("")),
                Err("bad_signature"),
            ),
            ("huge", "a".repeat(MAX_TOKEN_BYTES + 1), Err("malformed")),
        ];
        for (name, token, want) in cases {
            let got = ours.verify(&token).await;
            match (got, want) {
                (Ok(id), Ok(node)) => {
                    assert_eq!(id.node, node, "{name}");
                    assert_eq!(id.subject, SHARED_KEY_ISSUER, "{name}");
                }
                (Err(e), Err(reason)) => assert_eq!(e.reason(), reason, "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[tokio::test]
    async fn shared_key_token_is_cached_and_resigned() {
        let k = SharedKey::from_secret(KEY, "node-a", Duration::from_secs(30)).expect("key");
        let first = k.token().await.expect("token");
        assert_eq!(k.token().await.expect("token"), first, "cached");
        // Pretend half the lifetime is gone.
        if let Some((_, at)) = k.cached.lock().expect("lock").as_mut() {
            *at = Instant::now();
        }
        let later = k.token().await.expect("token");
        assert!(k.verify(&later).await.is_ok(), "re-signed token verifies");
        assert!(
            !format!("{k:?}").contains("0123456789"),
            "Debug hides the key"
        );
    }

    #[tokio::test]
    async fn token_file_follows_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        let tokens = TokenFile::new(&path);
        let err = tokens.token().await.expect_err("missing file");
        assert_eq!(err.reason(), "unavailable");
        std::fs::write(&path, "first.token.value\n").expect("write");
        // The missing-file result is not cached: the next call reads the file.
        assert_eq!(tokens.token().await.expect("token"), "first.token.value");
        // Rotation: a new file swapped in (another size), seen after the 1 s check interval.
        std::fs::write(dir.path().join("new"), "second.token.value.longer").expect("write");
        std::fs::rename(dir.path().join("new"), &path).expect("rename");
        tokens.state.lock().expect("lock").checked = None;
        assert_eq!(
            tokens.token().await.expect("token"),
            "second.token.value.longer"
        );
        std::fs::write(&path, "   \n").expect("write");
        tokens.state.lock().expect("lock").checked = None;
        assert_eq!(
            tokens.token().await.expect_err("empty").reason(),
            "unavailable"
        );
        assert!(
            !format!("{tokens:?}").contains("second"),
            "Debug hides the token"
        );
    }
}
