//! Pull grants: proof that a namespace may pull one private image, checked by daemons before
//! they serve that image peer to peer.
//!
//! The admission webhook resolves each image of a new Pod with the pod's own pull secrets. When
//! the mirror policy marks the repository private (`require_grant`), the webhook signs a grant
//! with [`Signer`] and puts the tokens on the pod as the [`ANNOTATION`] (a JSON array of
//! strings). Daemons load the webhook's public keys into a [`KeySet`] and [`KeySet::verify`] a
//! grant before serving a private manifest to a peer.
//!
//! # Format
//! A grant is a compact JWS (RFC 7515) JWT (RFC 7519) signed with Ed25519 (`alg: EdDSA`,
//! RFC 8037). The header carries `kid`: the first 16 hex characters of the SHA-256 of the raw
//! 32-byte public key, so a verifier picks the key without trying each. Claims ([`Claims`]):
//!
//! | claim | value |
//! |---|---|
//! | `iss` | [`ISSUER`] (`speculum-webhook`) |
//! | `aud` | the configured audience, default [`DEFAULT_AUDIENCE`] |
//! | `sub` | the pod's namespace |
//! | `repo` | `registry/repository` with Docker's defaults (`docker.io/library/nginx`) |
//! | `digest` | the manifest or index digest the pod was pinned to |
//! | `iat`, `nbf`, `exp` | seconds since the epoch; `nbf = iat`, `exp = iat + ttl` |
//! | `jti` | 128 random bits, hex: a unique id for audit lines |
//!
//! Keys are PEM: the private key PKCS#8 (`-----BEGIN PRIVATE KEY-----`, what
//! `openssl genpkey -algorithm ed25519` and Helm's `genPrivateKey "ed25519"` write), the public
//! key SPKI (`-----BEGIN PUBLIC KEY-----`). Several public keys at once are normal: during a
//! rotation the old key stays until every grant it signed has expired.
//!
//! # Verification
//! [`KeySet::verify`] never trusts the header's `alg`: only `EdDSA` is accepted, so neither
//! `none` nor an HMAC keyed with the public key gets through. Tokens over [`MAX_TOKEN_BYTES`]
//! are refused before parsing. Times are checked against the `now` the caller passes, with
//! [`LEEWAY_SECS`] of clock skew allowed either way. What this crate leaves to its callers:
//! whether the grant's namespace, repository and digest match the request being served.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The pod annotation holding a JSON array of grant tokens.
pub const ANNOTATION: &str = "speculum.io/pull-grants";
/// The audience used unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "speculum.io/grant";
/// The issuer every grant names.
pub const ISSUER: &str = "speculum-webhook";
/// Tokens longer than this are refused unparsed (a real grant is about 450 bytes).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated on `nbf` and `exp`.
pub const LEEWAY_SECS: i64 = 30;

/// The SPKI DER prefix of an Ed25519 public key (RFC 8410 §4): the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// What a grant says. See the module docs for each claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The namespace allowed to pull.
    pub sub: String,
    /// `registry/repository`, Docker defaults applied (`docker.io/library/x`).
    pub repo: String,
    /// The pinned manifest or index digest.
    pub digest: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

/// Why a key could not be loaded or a grant could not be signed or verified. [`reason`]
/// gives a stable word for metrics and audit lines.
///
/// [`reason`]: GrantError::reason
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("malformed grant: {0}")]
    Malformed(String),
    #[error("grant of {0} bytes is larger than {MAX_TOKEN_BYTES}")]
    TooLarge(usize),
    #[error("grant uses algorithm {0}, only EdDSA is accepted")]
    WrongAlgorithm(String),
    #[error("grant signed by an unknown key")]
    UnknownKey,
    #[error("grant signature does not verify")]
    BadSignature,
    #[error("grant expired")]
    Expired,
    #[error("grant not yet valid")]
    NotYetValid,
    #[error("grant is for another audience")]
    WrongAudience,
    #[error("grant has another issuer")]
    WrongIssuer,
    #[error("bad key: {0}")]
    Key(String),
    #[error("invalid grant request: {0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl GrantError {
    /// A short stable word for audit lines and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            GrantError::Malformed(_) => "malformed",
            GrantError::TooLarge(_) => "too_large",
            GrantError::WrongAlgorithm(_) => "wrong_algorithm",
            GrantError::UnknownKey => "unknown_key",
            GrantError::BadSignature => "bad_signature",
            GrantError::Expired => "expired",
            GrantError::NotYetValid => "not_yet_valid",
            GrantError::WrongAudience => "wrong_audience",
            GrantError::WrongIssuer => "wrong_issuer",
            GrantError::Key(_) => "bad_key",
            GrantError::Invalid(_) => "invalid",
            GrantError::Read { .. } => "read",
        }
    }
}

/// Signs grants with one Ed25519 private key. Never printed: `Debug` shows the kid only.
pub struct Signer {
    key: EncodingKey,
    kid: String,
    public: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads a PKCS#8 `PRIVATE KEY` PEM (v1 as openssl and Helm write it, or v2).
    pub fn from_pem(pem: &[u8]) -> Result<Signer, GrantError> {
        let blocks = pem_blocks(pem, "PRIVATE KEY")?;
        let [der] = blocks.as_slice() else {
            return Err(GrantError::Key(format!(
                "expected one PRIVATE KEY block, found {}",
                blocks.len()
            )));
        };
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .map_err(|e| GrantError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| GrantError::Key("public key is not 32 bytes".into()))?;
        Ok(Signer {
            key: EncodingKey::from_ed_der(der),
            kid: kid_of(&public),
            public,
        })
    }

    /// The key id put in every grant's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The matching public key, SPKI `PUBLIC KEY` PEM.
    pub fn public_key_pem(&self) -> String {
        public_pem(&self.public)
    }

    /// Signs a grant letting `namespace` pull `repo@digest` for `ttl` from `now`.
    pub fn sign(
        &self,
        namespace: &str,
        repo: &str,
        digest: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, GrantError> {
        self.sign_for(DEFAULT_AUDIENCE, namespace, repo, digest, ttl, now)
    }

    /// [`Signer::sign`] with an explicit audience.
    pub fn sign_for(
        &self,
        audience: &str,
        namespace: &str,
        repo: &str,
        digest: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, GrantError> {
        for (what, v) in [
            ("audience", audience),
            ("namespace", namespace),
            ("repo", repo),
            ("digest", digest),
        ] {
            if v.is_empty() {
                return Err(GrantError::Invalid(format!("{what} is empty")));
            }
        }
        if ttl.is_zero() {
            return Err(GrantError::Invalid("ttl is zero".into()));
        }
        let iat = unix(now);
        let ttl = i64::try_from(ttl.as_secs().max(1))
            .map_err(|_| GrantError::Invalid("ttl too large".into()))?;
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti)
            .map_err(|_| GrantError::Invalid("no randomness for jti".into()))?;
        let claims = Claims {
            iss: ISSUER.into(),
            aud: audience.into(),
            sub: namespace.into(),
            repo: repo.into(),
            digest: digest.into(),
            iat,
            nbf: iat,
            exp: iat.saturating_add(ttl),
            jti: hex::encode(jti),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| GrantError::Key(format!("signing: {e}")))
    }
}

/// The public keys grants are verified with, by kid.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: BTreeMap<String, DecodingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeySet {
    /// Loads every `PUBLIC KEY` block of every PEM (a file may hold several).
    pub fn from_pems<'a>(pems: impl IntoIterator<Item = &'a [u8]>) -> Result<KeySet, GrantError> {
        let mut set = KeySet::default();
        for pem in pems {
            let blocks = pem_blocks(pem, "PUBLIC KEY")?;
            if blocks.is_empty() {
                return Err(GrantError::Key("no PUBLIC KEY block".into()));
            }
            for der in blocks {
                let raw = der
                    .strip_prefix(&SPKI_PREFIX[..])
                    .filter(|k| k.len() == 32)
                    .ok_or_else(|| GrantError::Key("not an Ed25519 SPKI public key".into()))?;
                set.keys.insert(kid_of(raw), DecodingKey::from_ed_der(raw));
            }
        }
        Ok(set)
    }

    /// Loads every `*.pem` file of `dir`, the mount of the webhook's key ConfigMap. Hidden
    /// entries (the ConfigMap's `..data` and `..<timestamp>` directories) are skipped; the
    /// visible names are symlinks into them and are followed.
    pub fn load_dir(dir: &Path) -> Result<KeySet, GrantError> {
        let read_err = |path: &Path, source| GrantError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut pems: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let entry = entry.map_err(|e| read_err(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') || !name.ends_with(".pem") || !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| read_err(&path, e))?;
            pems.push((name, bytes));
        }
        pems.sort();
        let mut set = KeySet::default();
        for (name, bytes) in &pems {
            let one = KeySet::from_pems([bytes.as_slice()])
                .map_err(|e| GrantError::Key(format!("{name}: {e}")))?;
            set.keys.extend(one.keys);
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids held, sorted.
    pub fn kids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Verifies a grant: size, algorithm, key, signature, issuer, audience, then `nbf`/`exp`
    /// against `now` with [`LEEWAY_SECS`]. See the module docs.
    pub fn verify(
        &self,
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Claims, GrantError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(GrantError::TooLarge(token.len()));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| GrantError::Malformed(format!("header: {e}")))?;
        if header.alg != Algorithm::EdDSA {
            return Err(GrantError::WrongAlgorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        // Times are checked below against the caller's clock; claims are checked on the typed
        // struct so that each failure has its own error.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let candidates: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => vec![self.keys.get(kid).ok_or(GrantError::UnknownKey)?],
            None if self.keys.is_empty() => return Err(GrantError::UnknownKey),
            None => self.keys.values().collect(),
        };
        let mut last = GrantError::BadSignature;
        let mut claims = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => last = map_jwt_error(e),
            }
        }
        let claims = claims.ok_or(last)?;
        if claims.iss != ISSUER {
            return Err(GrantError::WrongIssuer);
        }
        if claims.aud != audience {
            return Err(GrantError::WrongAudience);
        }
        if claims.sub.is_empty() || claims.repo.is_empty() || claims.digest.is_empty() {
            return Err(GrantError::Malformed("empty sub, repo or digest".into()));
        }
        let now = unix(now);
        if now.saturating_add(LEEWAY_SECS) < claims.nbf {
            return Err(GrantError::NotYetValid);
        }
        if now.saturating_sub(LEEWAY_SECS) > claims.exp {
            return Err(GrantError::Expired);
        }
        Ok(claims)
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> GrantError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => GrantError::BadSignature,
        ErrorKind::InvalidAlgorithm => GrantError::WrongAlgorithm("not EdDSA".into()),
        ErrorKind::InvalidEddsaKey | ErrorKind::InvalidKeyFormat => GrantError::Key(e.to_string()),
        // The signature verified but the payload is not our claims (or not JSON).
        _ => GrantError::Malformed(e.to_string()),
    }
}

/// Generates a key pair: (PKCS#8 v1 private PEM, SPKI public PEM).
pub fn generate() -> (String, String) {
    // Generation only fails when the system has no randomness; nothing sensible is left to do.
    #[allow(clippy::expect_used)]
    let pair = Ed25519KeyPair::generate().expect("system randomness");
    #[allow(clippy::expect_used)]
    let der = pair.to_pkcs8v1().expect("encoding a fresh key");
    let private = pem_encode("PRIVATE KEY", der.as_ref());
    let mut public = [0u8; 32];
    public.copy_from_slice(pair.public_key().as_ref());
    (private, public_pem(&public))
}

/// `kid` of a raw 32-byte public key: 16 hex characters of its SHA-256.
pub fn kid_of(raw_public: &[u8]) -> String {
    let digest = Sha256::digest(raw_public);
    hex::encode(&digest[..8])
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn public_pem(raw: &[u8; 32]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(raw);
    pem_encode("PUBLIC KEY", &der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER of every `label` block in `pem` (RFC 7468), other blocks ignored.
fn pem_blocks(pem: &[u8], label: &str) -> Result<Vec<Vec<u8>>, GrantError> {
    let text = std::str::from_utf8(pem).map_err(|_| GrantError::Key("PEM is not UTF-8".into()))?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let body = &rest[start + begin.len()..];
        let stop = body
            .find(&end)
            .ok_or_else(|| GrantError::Key(format!("{begin} without {end}")))?;
        let b64: String = body[..stop]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| GrantError::Key(format!("{label} is not base64: {e}")))?;
        out.push(der);
        rest = &body[stop + end.len()..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
