//! Multi-tenant protection on the daemon side: who on this node is waiting for an image, may a
//! private image be served to them, and is the other end of a peer request really one of our
//! daemons.
//!
//! Three seams, each with an in-memory twin and a real implementation:
//! - [`pods::Pods`]: the **node pod index** (pods bound to this node and the images they wait
//!   for → the policy input `namespaces`, and the grants they carry) and the **pod directory**
//!   (one pod by name, on any node: the serving side checks that a presented grant belongs to
//!   a pod on the requesting node). Backed by a Kubernetes watcher (`kubernetes`), a file
//!   (`file`, for non-Kubernetes use and the namespace-node rig) or memory (tests).
//! - [`peer_auth::PeerTokens`] / [`peer_auth::PeerVerifier`]: the **authenticated data plane**.
//!   Every daemon-to-daemon request carries `Authorization: Bearer <token>`; the peer endpoint
//!   verifies it (projected ServiceAccount token checked against the API server's JWKS, or a
//!   shared signing key) and learns the requesting node.
//! - Grant verification itself is the `speculum-grant` crate (`KeySet`), shared with the
//!   webhook that signs grants.
//!
//! How the registry uses these (the decision chain, the headers, the audit reasons) is written
//! down in `docs/tenancy.md`; this module only provides the parts.

pub mod peer_auth;
pub mod pods;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Header carrying a grant from the requesting daemon to the serving one:
/// `<namespace>/<pod> <token>`, repeated for several candidate grants.
pub const GRANT_HEADER: &str = "x-speculum-grant";

/// At most this many grants travel with one peer request.
pub const MAX_GRANTS_PER_REQUEST: usize = 8;

/// The `tenancy:` config section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    pub pods: PodsConfig,
    pub grants: GrantsConfig,
    pub peer_auth: PeerAuthConfig,
}

impl TenancyConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = self.pods.validate();
        errors.extend(self.grants.validate());
        errors.extend(self.peer_auth.validate());
        errors
    }
}

/// Where the node pod index and the pod directory come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodsSource {
    /// No pod index: `namespaces` stays empty and no grant can be presented.
    #[default]
    None,
    /// Watch pods with `spec.nodeName=<node.name>` through the API server (in-cluster config).
    Kubernetes,
    /// A YAML/JSON file listing every pod of the cluster (see [`pods::PodsFile`]), re-read when
    /// it changes.
    File,
}

/// `tenancy.pods`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodsConfig {
    pub source: PodsSource,
    /// The pods file (`source: file`).
    pub file: Option<PathBuf>,
    /// How long a pod looked up by name (the pod directory) is cached.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for PodsConfig {
    fn default() -> Self {
        PodsConfig {
            source: PodsSource::None,
            file: None,
            cache_ttl: Duration::from_secs(10),
        }
    }
}

impl PodsConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.source == PodsSource::File && self.file.is_none() {
            errors.push("tenancy.pods.file is required when tenancy.pods.source is file".into());
        }
        if self.cache_ttl > Duration::from_secs(300) {
            errors.push("tenancy.pods.cache_ttl must be at most 5m".into());
        }
        errors
    }
}

/// `tenancy.grants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantsConfig {
    /// Directory of Ed25519 public keys (`*.pem`) that grants are verified with. Empty: no
    /// grant verifies, so an image the policy marks `require_grant` is never served P2P.
    pub keys_dir: Option<PathBuf>,
    /// The audience grants must name.
    pub audience: String,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        GrantsConfig {
            keys_dir: None,
            // Must equal `speculum_grant::DEFAULT_AUDIENCE`.
            audience: "speculum.io/grant".to_owned(),
        }
    }
}

impl GrantsConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.audience.trim().is_empty() {
            errors.push("tenancy.grants.audience must not be empty".into());
        }
        errors
    }
}

/// How daemons prove to each other that they are daemons of this cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerAuthMode {
    /// No proof asked or sent: anyone who reaches the peer port is served public content.
    #[default]
    None,
    /// A projected ServiceAccount token (audience [`PeerAuthConfig::audience`]) sent to peers,
    /// verified against the API server's published keys (OIDC discovery / JWKS).
    Kubernetes,
    /// A short-lived token signed with a key every daemon holds (non-Kubernetes use).
    SharedKey,
}

/// `tenancy.peer_auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerAuthConfig {
    pub mode: PeerAuthMode,
    /// `kubernetes`: the projected token file sent to peers (re-read as the kubelet rotates it).
    pub token_file: PathBuf,
    /// The audience peer tokens must carry.
    pub audience: String,
    /// `kubernetes`: ServiceAccounts (`namespace:name`) whose tokens identify a daemon.
    pub service_accounts: Vec<String>,
    /// `kubernetes`: how often the API server's JWKS is refetched (also on an unknown `kid`,
    /// rate-limited).
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// `shared_key`: a file holding at least 32 bytes of secret.
    pub shared_key_file: Option<PathBuf>,
    /// `shared_key`: lifetime of the tokens this daemon signs.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
}

impl Default for PeerAuthConfig {
    fn default() -> Self {
        PeerAuthConfig {
            mode: PeerAuthMode::None,
            token_file: PathBuf::from("/var/run/secrets/speculum/token"),
            audience: "speculum".to_owned(),
            service_accounts: Vec::new(),
            jwks_refresh: Duration::from_secs(300),
            shared_key_file: None,
            token_ttl: Duration::from_secs(300),
        }
    }
}

impl PeerAuthConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        match self.mode {
            PeerAuthMode::None => {}
            PeerAuthMode::Kubernetes => {
                if self.service_accounts.is_empty() {
                    errors.push(
                        "tenancy.peer_auth.service_accounts must name the daemons' \
                         ServiceAccount (namespace:name) in kubernetes mode"
                            .into(),
                    );
                }
                for sa in &self.service_accounts {
                    let ok = sa
                        .split_once(':')
                        .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty());
                    if !ok {
                        errors.push(format!(
                            "tenancy.peer_auth.service_accounts: {sa:?} is not namespace:name"
                        ));
                    }
                }
            }
            PeerAuthMode::SharedKey => {
                if self.shared_key_file.is_none() {
                    errors.push(
                        "tenancy.peer_auth.shared_key_file is required in shared_key mode".into(),
                    );
                }
            }
        }
        if self.audience.trim().is_empty() {
            errors.push("tenancy.peer_auth.audience must not be empty".into());
        }
        if self.jwks_refresh < Duration::from_secs(10) {
            errors.push("tenancy.peer_auth.jwks_refresh must be at least 10s".into());
        }
        if self.token_ttl < Duration::from_secs(30) || self.token_ttl > Duration::from_secs(3600) {
            errors.push("tenancy.peer_auth.token_ttl must be between 30s and 1h".into());
        }
        errors
    }
}
