//! The authenticated data plane: tokens daemons send each other, and their verification.
//!
//! SKELETON: the traits and types below are the agreed interface; implementations
//! (`SharedKey`, `TokenFile`, `JwksVerifier`) are to be written.

use async_trait::async_trait;

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
