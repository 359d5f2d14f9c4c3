//! Tag → digest resolution: the registry first (through oci-client), the cluster's speculum
//! daemons when the registry cannot be reached, and a credential-keyed cache in front.
//!
//! The digest pinned is the one the tag points at: for a multi-arch image that is the index
//! (oci-client sends a HEAD that accepts index and manifest types and reads
//! `Docker-Content-Digest`, falling back to GET and hashing the body), so every node still
//! picks its own platform. Credentials are tried in the kubelet's order; anonymous only when
//! none match. Failures are never cached, and neither are answers from the cluster fallback:
//! as soon as the registry is back, its answer wins.
//!
//! What this module leaves to others: which images to resolve ([`crate::mutate`]), whether an
//! unresolvable image is denied ([`crate::policy`]), and where credentials come from
//! ([`crate::credentials`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, Key};
use crate::credentials::{ANONYMOUS, Credential, Keychain};
use crate::metrics::Metrics;

/// Per-registry connection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryOptions {
    /// Talk plain HTTP to this registry. Only registries listed with this flag ever get HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// PEM file with extra CA certificates for this registry.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Loaded from `ca_file` by [`ResolverConfig::load`].
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
}

/// The resolver's own configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// Upper bound for resolving one reference against the registry (all credentials tried).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    pub cache_capacity: usize,
    /// Registry host (as written in image names, with port) → options.
    pub registries: HashMap<String, RegistryOptions>,
    /// speculum daemon registry endpoints (`host:port`, plain HTTP) asked when a registry
    /// cannot be reached. Usually the node-local daemon service.
    pub cluster_endpoints: Vec<String>,
    /// A bearer token for the cluster endpoints, re-read on every use (a projected
    /// ServiceAccount token rotates): daemons with peer authentication (`tenancy.peer_auth`)
    /// refuse anonymous requests on their peer port. Unset: ask anonymously.
    pub cluster_token_file: Option<std::path::PathBuf>,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 10_000,
            registries: HashMap::new(),
            cluster_endpoints: Vec::new(),
            cluster_token_file: None,
        }
    }
}

impl ResolverConfig {
    /// Reads CA files; returns every problem at once.
    pub fn load(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, opts) in &mut self.registries {
            if let Some(path) = &opts.ca_file {
                match std::fs::read(path) {
                    Ok(pem) => {
                        if reqwest::Certificate::from_pem_bundle(&pem)
                            .map_or(true, |c| c.is_empty())
                        {
                            errors.push(format!(
                                "registries.{name}.caFile {}: no PEM certificate",
                                path.display()
                            ));
                        }
                        opts.ca_pem = Some(pem);
                    }
                    Err(e) => {
                        errors.push(format!("registries.{name}.caFile {}: {e}", path.display()))
                    }
                }
            }
        }
        if self.timeout.is_zero() {
            errors.push("resolver.timeout must be above zero".into());
        }
        errors
    }
}

/// Which source answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// The registry, just now.
    Registry,
    /// The cache (of an earlier registry answer).
    Cache,
    /// A speculum daemon, because the registry could not be reached.
    Cluster,
    /// The digest the old object carried (re-applied unpinned tag on UPDATE).
    Previous,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Registry => "registry",
            Source::Cache => "cache",
            Source::Cluster => "cluster",
            Source::Previous => "previous",
        }
    }
}

/// A successful resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub digest: String,
    pub source: Source,
    /// The identity of the pod's credential the registry accepted (now, or for a cache hit:
    /// earlier, for exactly this credential); `None` for anonymous access and the cluster
    /// fallback. Pull grants need `Some` (see [`crate::grants`]).
    pub credential: Option<String>,
}

/// Why a reference could not be resolved. Callers branch on the variant: `NotFound` and
/// `Unauthorized` are definitive, `Unreachable` is an outage.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error("{reference} not found in {registry}")]
    NotFound { registry: String, reference: String },
    #[error("{registry} refused every credential for {reference}")]
    Unauthorized { registry: String, reference: String },
    #[error("{registry} unreachable: {message}")]
    Unreachable { registry: String, message: String },
    #[error("{registry} answered with an error: {message}")]
    Registry { registry: String, message: String },
    #[error("{registry} returned an invalid digest {digest:?}")]
    BadDigest { registry: String, digest: String },
}

impl ResolveError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::InvalidReference { .. } => "invalid_reference",
            ResolveError::NotFound { .. } => "not_found",
            ResolveError::Unauthorized { .. } => "unauthorized",
            ResolveError::Unreachable { .. } => "unreachable",
            ResolveError::Registry { .. } => "registry_error",
            ResolveError::BadDigest { .. } => "bad_digest",
        }
    }

    pub fn registry(&self) -> &str {
        match self {
            ResolveError::InvalidReference { .. } => "",
            ResolveError::NotFound { registry, .. }
            | ResolveError::Unauthorized { registry, .. }
            | ResolveError::Unreachable { registry, .. }
            | ResolveError::Registry { registry, .. }
            | ResolveError::BadDigest { registry, .. } => registry,
        }
    }
}

/// A parsed image reference with Docker's defaults applied (`nginx` → `docker.io/library/nginx:latest`).
#[derive(Debug, Clone)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    pub fn parse(image: &str) -> Result<ImageRef, ResolveError> {
        let inner: Reference =
            image
                .parse()
                .map_err(|e: oci_client::ParseError| ResolveError::InvalidReference {
                    reference: image.to_owned(),
                    message: e.to_string(),
                })?;
        // Docker refuses upper case in repository names; the parser lets some through.
        if inner.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ResolveError::InvalidReference {
                reference: image.to_owned(),
                message: "repository names must be lower case".into(),
            });
        }
        Ok(ImageRef { inner })
    }

    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    pub fn tag(&self) -> &str {
        self.inner.tag().unwrap_or("latest")
    }

    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The tag as written (no `latest` default); `None` for `name@digest`.
    pub fn written_tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// `registry/repository:tag`, the cache key and the form `skipPrefixes` are matched against.
    pub fn normalized(&self) -> String {
        format!("{}/{}:{}", self.registry(), self.repository(), self.tag())
    }
}

/// Resolves tags to digests. Cheap to share (`Arc`); one per process.
pub struct Resolver {
    cfg: ResolverConfig,
    insecure: Vec<String>,
    cache: Cache<String>,
    /// One oci-client per (registry, credential identity): the client remembers the first auth
    /// it sees for a registry, so sharing one across credentials would mix them up.
    clients: Mutex<HashMap<(String, String), Arc<Client>>>,
    metrics: Arc<Metrics>,
}

const MAX_CLIENTS: usize = 512;

impl Resolver {
    pub fn new(cfg: ResolverConfig, metrics: Arc<Metrics>) -> Resolver {
        let mut insecure: Vec<String> = cfg
            .registries
            .iter()
            .filter(|(_, o)| o.insecure)
            .map(|(n, _)| n.clone())
            .collect();
        // Cluster endpoints are the daemons' plain-HTTP registry ports.
        insecure.extend(cfg.cluster_endpoints.iter().cloned());
        Resolver {
            cache: Cache::new(cfg.cache_ttl, cfg.cache_capacity),
            cfg,
            insecure,
            clients: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Resolves `image` (not already pinned) with the credentials of `keychain`.
    pub async fn resolve(
        &self,
        image: &str,
        keychain: &Keychain,
    ) -> Result<Resolution, ResolveError> {
        let r = ImageRef::parse(image)?;
        let key_ref = r.normalized();
        let registry = r.registry().to_owned();
        let creds = keychain.matching(&registry, r.repository());
        let candidates: Vec<(String, RegistryAuth)> = if creds.is_empty() {
            vec![(ANONYMOUS.to_owned(), RegistryAuth::Anonymous)]
        } else {
            creds
                .iter()
                .map(|c: &Credential| (c.identity.clone(), basic(c)))
                .collect()
        };

        for (identity, _) in &candidates {
            let key = Key {
                reference: key_ref.clone(),
                identity: identity.clone(),
            };
            if let Some(digest) = self.cache.get(&key) {
                self.metrics.cache_lookup(true);
                return Ok(Resolution {
                    digest,
                    source: Source::Cache,
                    credential: authenticated(identity),
                });
            }
        }
        self.metrics.cache_lookup(false);

        let started = tokio::time::Instant::now();
        let upstream =
            tokio::time::timeout(self.cfg.timeout, self.ask_registry(&r, &candidates)).await;
        let err = match upstream {
            Ok(Ok((identity, digest))) => {
                self.metrics
                    .resolved(Source::Registry.as_str(), &registry, started.elapsed());
                let credential = authenticated(&identity);
                self.cache.insert(
                    Key {
                        reference: key_ref,
                        identity,
                    },
                    digest.clone(),
                );
                return Ok(Resolution {
                    digest,
                    source: Source::Registry,
                    credential,
                });
            }
            Ok(Err(e)) => e,
            Err(_) => ResolveError::Unreachable {
                registry: registry.clone(),
                message: format!("no answer within {:?}", self.cfg.timeout),
            },
        };
        self.metrics.resolution_error(&registry, err.reason());
        if !matches!(err, ResolveError::Unreachable { .. }) || self.cfg.cluster_endpoints.is_empty()
        {
            return Err(err);
        }
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(self.cfg.timeout, self.ask_cluster(&r)).await {
            Ok(Ok(digest)) => {
                self.metrics
                    .resolved(Source::Cluster.as_str(), &registry, started.elapsed());
                tracing::info!(reference = %key_ref, registry = %registry, "resolved through the cluster: registry unreachable");
                Ok(Resolution {
                    digest,
                    source: Source::Cluster,
                    credential: None,
                })
            }
            Ok(Err(fallback)) => {
                tracing::debug!(reference = %key_ref, error = %fallback, "cluster fallback failed");
                Err(err)
            }
            Err(_) => Err(err),
        }
    }

    /// For an image already pinned (`name[:tag]@digest`): which of the pod's credentials the
    /// registry accepts for that manifest (a HEAD by digest), cached like resolutions under
    /// `registry/repository@digest` and the credential identity. `Ok(None)` when the keychain
    /// has no credential for the registry (anonymous access proves nothing) or every
    /// credential was refused. Used only to decide pull grants.
    pub async fn check_access(
        &self,
        image: &str,
        keychain: &Keychain,
    ) -> Result<Option<String>, ResolveError> {
        let r = ImageRef::parse(image)?;
        let Some(digest) = r.digest().map(str::to_owned) else {
            return Ok(None);
        };
        let key_ref = format!("{}/{}@{digest}", r.registry(), r.repository());
        let creds = keychain.matching(r.registry(), r.repository());
        for c in &creds {
            let key = Key {
                reference: key_ref.clone(),
                identity: c.identity.clone(),
            };
            if self.cache.get(&key).is_some() {
                self.metrics.cache_lookup(true);
                return Ok(Some(c.identity.clone()));
            }
        }
        if creds.is_empty() {
            return Ok(None);
        }
        self.metrics.cache_lookup(false);
        let reference = Reference::with_digest(
            r.registry().to_owned(),
            r.repository().to_owned(),
            digest.clone(),
        );
        let check = async {
            for c in &creds {
                let client = self.client(r.registry(), &c.identity)?;
                match client.fetch_manifest_digest(&reference, &basic(c)).await {
                    Ok(_) => return Ok(Some(c.identity.clone())),
                    Err(e) => match classify(&r, e) {
                        ResolveError::Unauthorized { .. } => {
                            self.forget_client(r.registry(), &c.identity);
                        }
                        other => return Err(other),
                    },
                }
            }
            Ok(None)
        };
        let found = tokio::time::timeout(self.cfg.timeout, check)
            .await
            .map_err(|_| ResolveError::Unreachable {
                registry: r.registry().to_owned(),
                message: format!("no answer within {:?}", self.cfg.timeout),
            })??;
        if let Some(identity) = &found {
            self.cache.insert(
                Key {
                    reference: key_ref,
                    identity: identity.clone(),
                },
                digest,
            );
        }
        Ok(found)
    }

    /// Tries each credential in order; the first that the registry accepts decides.
    async fn ask_registry(
        &self,
        r: &ImageRef,
        candidates: &[(String, RegistryAuth)],
    ) -> Result<(String, String), ResolveError> {
        let reference = Reference::with_tag(
            r.registry().to_owned(),
            r.repository().to_owned(),
            r.tag().to_owned(),
        );
        let mut last = None;
        for (identity, auth) in candidates {
            let client = self.client(r.registry(), identity)?;
            match client.fetch_manifest_digest(&reference, auth).await {
                Ok(d) => return Ok((identity.clone(), check_digest(r.registry(), d)?)),
                Err(e) => {
                    let e = classify(r, e);
                    if matches!(e, ResolveError::Unauthorized { .. }) {
                        // A stale token or a refused credential must not stick to this client.
                        self.forget_client(r.registry(), identity);
                        last = Some(e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or(ResolveError::Unauthorized {
            registry: r.registry().to_owned(),
            reference: r.normalized(),
        }))
    }

    /// Asks the daemons' mirror endpoints (`HEAD /v2/<repo>/manifests/<tag>?ns=<registry>`,
    /// what containerd sends them) in order; the first digest wins.
    async fn ask_cluster(&self, r: &ImageRef) -> Result<String, ResolveError> {
        let (auth, identity) = self.cluster_auth(r)?;
        let mut last = None;
        for endpoint in &self.cfg.cluster_endpoints {
            let mut reference = Reference::with_tag(
                r.registry().to_owned(),
                r.repository().to_owned(),
                r.tag().to_owned(),
            );
            reference.set_mirror_registry(endpoint.clone());
            let client = self.client(endpoint, &identity)?;
            match client.fetch_manifest_digest(&reference, &auth).await {
                Ok(d) => return check_digest(endpoint, d),
                Err(e) => last = Some(classify(r, e)),
            }
        }
        Err(last.unwrap_or(ResolveError::Unreachable {
            registry: r.registry().to_owned(),
            message: "no cluster endpoint".into(),
        }))
    }

    /// How to ask the daemons: with the token of `cluster_token_file` (one client per token,
    /// since a client keeps the first auth it saw), else anonymously.
    fn cluster_auth(&self, r: &ImageRef) -> Result<(RegistryAuth, String), ResolveError> {
        let Some(path) = &self.cfg.cluster_token_file else {
            return Ok((RegistryAuth::Anonymous, ANONYMOUS.to_owned()));
        };
        let token = std::fs::read_to_string(path).map_err(|e| ResolveError::Unreachable {
            registry: r.registry().to_owned(),
            message: format!("cluster token {}: {e}", path.display()),
        })?;
        let token = token.trim().to_owned();
        let identity = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            token.hash(&mut h);
            format!("cluster-token:{:016x}", h.finish())
        };
        Ok((RegistryAuth::Bearer(token), identity))
    }

    fn client(&self, registry: &str, identity: &str) -> Result<Arc<Client>, ResolveError> {
        let key = (registry.to_owned(), identity.to_owned());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let opts = self.cfg.registries.get(registry);
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            extra_root_certificates: opts
                .and_then(|o| o.ca_pem.clone())
                .map(|data| {
                    vec![Certificate {
                        encoding: CertificateEncoding::Pem,
                        data,
                    }]
                })
                .unwrap_or_default(),
            platform_resolver: None,
            connect_timeout: Some(self.cfg.timeout),
            read_timeout: Some(self.cfg.timeout),
            user_agent: concat!("speculum-webhook/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client = Arc::new(
            Client::try_from(config).map_err(|e| ResolveError::Registry {
                registry: registry.to_owned(),
                message: format!("client setup: {e}"),
            })?,
        );
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn forget_client(&self, registry: &str, identity: &str) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.remove(&(registry.to_owned(), identity.to_owned()));
    }
}

/// `Some(identity)` unless it is the anonymous one.
fn authenticated(identity: &str) -> Option<String> {
    (identity != ANONYMOUS).then(|| identity.to_owned())
}

fn basic(c: &Credential) -> RegistryAuth {
    RegistryAuth::Basic(c.username.clone(), c.password.clone())
}

/// Accepts `sha256:<64 hex>` and `sha512:<128 hex>` only: the digest goes into pod specs.
fn check_digest(registry: &str, digest: String) -> Result<String, ResolveError> {
    let ok = match digest.split_once(':') {
        Some(("sha256", h)) => h.len() == 64,
        Some(("sha512", h)) => h.len() == 128,
        _ => false,
    } && digest.split_once(':').is_some_and(|(_, h)| {
        h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(digest)
    } else {
        Err(ResolveError::BadDigest {
            registry: registry.to_owned(),
            digest: digest.chars().take(200).collect(),
        })
    }
}

fn classify(r: &ImageRef, e: OciDistributionError) -> ResolveError {
    let registry = r.registry().to_owned();
    let reference = r.normalized();
    let by_status = |code: u16, message: String| match code {
        401 | 403 => ResolveError::Unauthorized {
            registry: registry.clone(),
            reference: reference.clone(),
        },
        404 => ResolveError::NotFound {
            registry: registry.clone(),
            reference: reference.clone(),
        },
        // 429 and 5xx: the registry is there but not serving; treat like an outage.
        429 | 500..=599 => ResolveError::Unreachable {
            registry: registry.clone(),
            message,
        },
        _ => ResolveError::Registry {
            registry: registry.clone(),
            message,
        },
    };
    match e {
        OciDistributionError::RequestError(e) => ResolveError::Unreachable {
            registry,
            message: error_chain(&e),
        },
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => ResolveError::Unauthorized {
            registry,
            reference,
        },
        OciDistributionError::ImageManifestNotFoundError(_) => ResolveError::NotFound {
            registry,
            reference,
        },
        OciDistributionError::ServerError { code, message, .. } => {
            by_status(code, message.chars().take(200).collect())
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                ResolveError::NotFound {
                    registry,
                    reference,
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ResolveError::Unauthorized {
                    registry,
                    reference,
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                ResolveError::Unreachable {
                    registry,
                    message: "too many requests".into(),
                }
            } else {
                ResolveError::Registry {
                    registry,
                    message: format!("{envelope}"),
                }
            }
        }
        other => ResolveError::Registry {
            registry,
            message: other.to_string(),
        },
    }
}

/// reqwest's Display hides the cause ("error sending request"); walk the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ref_table() {
        let cases = [
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
            ("127.0.0.1:5000/rig/x:v1", "127.0.0.1:5000/rig/x:v1"),
            ("localhost/x", "localhost/x:latest"),
            (
                "index.docker.io/library/busybox:1",
                "docker.io/library/busybox:1",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                ImageRef::parse(input).expect(input).normalized(),
                want,
                "{input}"
            );
        }
        for bad in [
            "",
            "UPPER/x:1",
            "a:b:c",
            "r.io/x:bad tag",
            "r.io/x@sha256:12",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn digest_check() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(check_digest("r", good).is_ok());
        for bad in [
            "",
            "sha256:",
            "md5:abc",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}\n", "a".repeat(64)),
        ] {
            assert!(check_digest("r", bad.to_owned()).is_err(), "{bad:?}");
        }
    }
}
