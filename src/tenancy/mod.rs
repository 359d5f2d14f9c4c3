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
//! - [`grants`]: pull grants — the verification keys (the webhook's ConfigMap, reloaded), the
//!   `x-speculum-grant` header, and the binding checks (namespace, pod, node, repository,
//!   manifest closure). Signatures and claims are the `speculum-grant` crate's, shared with
//!   the webhook that signs grants.
//!
//! How the registry uses these (the decision chain, the headers, the audit reasons) is written
//! down in `docs/tenancy.md`; this module only provides the parts.

pub mod grants;
pub mod peer_auth;
pub mod pods;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::shutdown::Shutdown;
use grants::{GrantChecker, GrantKeys};
use peer_auth::{JwksVerifier, PeerTokens, PeerVerifier, SharedKey, TokenFile};
use pods::{FilePods, KubePods, Pods};

/// Header carrying a grant from the requesting daemon to the serving one:
/// `<namespace>/<pod> <token>`, repeated for several candidate grants.
pub(crate) const GRANT_HEADER: &str = "x-speculum-grant";

/// At most this many grants travel with one peer request.
pub(crate) const MAX_GRANTS_PER_REQUEST: usize = 8;

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
            audience: speculum_grant::DEFAULT_AUDIENCE.to_owned(),
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

/// How often a pods file is checked for changes.
const PODS_FILE_POLL: Duration = Duration::from_secs(1);

/// Why the tenancy parts could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// No usable Kubernetes client (in-cluster config or kubeconfig) for a mode that needs one.
    #[error("kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    /// A key file could not be used (the reason never includes the key).
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// The config asks for something it does not provide (normally caught by `validate()`).
    #[error("tenancy config: {0}")]
    Config(String),
}

/// The tenancy parts the registry's guard uses (`docs/tenancy.md`), built from the
/// `tenancy:` section. `None` where the config turns a part off; `Tenancy::default()` is
/// everything off (a single-tenant daemon, most tests).
#[derive(Clone, Default)]
pub struct Tenancy {
    /// The node pod index and pod directory (`tenancy.pods.source` not `none`): fills the
    /// policy input `namespaces` on the mirror endpoint.
    pub pods: Option<Arc<dyn Pods>>,
    /// Grant checks. `None`: objects the policy marks `require_grant` are never served peer to
    /// peer (or from this node to its containerd through the mirror). Built always by
    /// [`Tenancy::build`]; with no `tenancy.grants.keys_dir` no grant verifies.
    pub grants: Option<Arc<GrantChecker>>,
    /// Tokens this daemon sends to peers (`tenancy.peer_auth.mode` not `none`).
    pub tokens: Option<Arc<dyn PeerTokens>>,
    /// Verifies tokens peers send (`tenancy.peer_auth.mode` not `none`).
    pub verifier: Option<Arc<dyn PeerVerifier>>,
}

impl std::fmt::Debug for Tenancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenancy")
            .field("pods", &self.pods.is_some())
            .field("grants", &self.grants.is_some())
            .field("tokens", &self.tokens.is_some())
            .field("verifier", &self.verifier.is_some())
            .finish()
    }
}

impl Tenancy {
    /// Builds the parts for this `node`; a Kubernetes client (`kube::Client::try_default`:
    /// in-cluster config, else kubeconfig) is made only when a mode needs one. Background
    /// tasks (pod watcher, pods file poll) run until `shutdown`.
    pub async fn build(
        config: &TenancyConfig,
        node: &str,
        shutdown: Shutdown,
    ) -> Result<Tenancy, TenancyError> {
        let needs_kube = config.pods.source == PodsSource::Kubernetes
            || config.peer_auth.mode == PeerAuthMode::Kubernetes;
        let client = if needs_kube {
            Some(
                kube::Client::try_default()
                    .await
                    .map_err(TenancyError::Kube)?,
            )
        } else {
            None
        };
        Tenancy::build_with(config, node, client, shutdown)
    }

    /// [`Tenancy::build`] with the Kubernetes client given (tests, or a caller that has one).
    /// Fails when a mode needs a client and `client` is `None`.
    pub fn build_with(
        config: &TenancyConfig,
        node: &str,
        client: Option<kube::Client>,
        shutdown: Shutdown,
    ) -> Result<Tenancy, TenancyError> {
        let need_client = |what: &str| {
            client
                .clone()
                .ok_or_else(|| TenancyError::Config(format!("{what} needs a Kubernetes client")))
        };
        if node.is_empty() {
            return Err(TenancyError::Config("the node name is empty".into()));
        }
        let pods: Option<Arc<dyn Pods>> = match config.pods.source {
            PodsSource::None => None,
            PodsSource::File => {
                let path =
                    config.pods.file.clone().ok_or_else(|| {
                        TenancyError::Config("tenancy.pods.file is required".into())
                    })?;
                Some(FilePods::start(
                    path,
                    node,
                    PODS_FILE_POLL,
                    shutdown.clone(),
                ))
            }
            PodsSource::Kubernetes => Some(KubePods::start(
                need_client("tenancy.pods.source: kubernetes")?,
                node.to_owned(),
                config.pods.cache_ttl,
                shutdown.clone(),
            )),
        };
        let auth = &config.peer_auth;
        type Pair = (Option<Arc<dyn PeerTokens>>, Option<Arc<dyn PeerVerifier>>);
        let (tokens, verifier): Pair = match auth.mode {
            PeerAuthMode::None => (None, None),
            PeerAuthMode::SharedKey => {
                let path = auth.shared_key_file.clone().ok_or_else(|| {
                    TenancyError::Config("tenancy.peer_auth.shared_key_file is required".into())
                })?;
                let key = Arc::new(
                    SharedKey::from_file(path, node, auth.token_ttl)?
                        .with_audience(auth.audience.clone()),
                );
                (Some(key.clone()), Some(key))
            }
            PeerAuthMode::Kubernetes => (
                Some(Arc::new(TokenFile::new(auth.token_file.clone()))),
                Some(Arc::new(JwksVerifier::new(
                    need_client("tenancy.peer_auth.mode: kubernetes")?,
                    auth.audience.clone(),
                    &auth.service_accounts,
                    auth.jwks_refresh,
                ))),
            ),
        };
        let keys = Arc::new(GrantKeys::new(
            config.grants.keys_dir.clone(),
            config.grants.audience.clone(),
        ));
        let grants = Some(Arc::new(GrantChecker::new(keys, pods.clone())));
        Ok(Tenancy {
            pods,
            grants,
            tokens,
            verifier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::type_complexity)]
    async fn build_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").expect("key");
        let short = dir.path().join("short");
        std::fs::write(&short, "too short").expect("key");
        let pods_file = dir.path().join("pods.yaml");
        std::fs::write(&pods_file, "pods: []\n").expect("pods");
        let (_trigger, shutdown) = crate::shutdown::channel();
        let with = |f: &dyn Fn(&mut TenancyConfig)| {
            let mut c = TenancyConfig::default();
            f(&mut c);
            c
        };
        // (name, config, want (pods, tokens, verifier) or an error)
        let cases: Vec<(&str, TenancyConfig, Result<(bool, bool, bool), ()>)> = vec![
            (
                "default: all off",
                TenancyConfig::default(),
                Ok((false, false, false)),
            ),
            (
                "pods file",
                with(&|c| {
                    c.pods.source = PodsSource::File;
                    c.pods.file = Some(pods_file.clone());
                }),
                Ok((true, false, false)),
            ),
            (
                "shared key",
                with(&|c| {
                    c.peer_auth.mode = PeerAuthMode::SharedKey;
                    c.peer_auth.shared_key_file = Some(key.clone());
                }),
                Ok((false, true, true)),
            ),
            (
                "shared key too short",
                with(&|c| {
                    c.peer_auth.mode = PeerAuthMode::SharedKey;
                    c.peer_auth.shared_key_file = Some(short.clone());
                }),
                Err(()),
            ),
            (
                "kubernetes pods without a client",
                with(&|c| c.pods.source = PodsSource::Kubernetes),
                Err(()),
            ),
            (
                "kubernetes auth without a client",
                with(&|c| {
                    c.peer_auth.mode = PeerAuthMode::Kubernetes;
                    c.peer_auth.service_accounts = vec!["speculum:speculum".into()];
                }),
                Err(()),
            ),
        ];
        for (name, config, want) in cases {
            let got = Tenancy::build_with(&config, "node-a", None, shutdown.clone());
            match (got, want) {
                (Ok(t), Ok((p, tk, v))) => assert_eq!(
                    (t.pods.is_some(), t.tokens.is_some(), t.verifier.is_some()),
                    (p, tk, v),
                    "{name}"
                ),
                (Err(e), Err(())) => assert!(!e.to_string().contains("0123456789"), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }
}
