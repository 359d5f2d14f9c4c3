//! Registry credentials for one pod: its `imagePullSecrets` and its ServiceAccount's, read
//! through the [`CredentialSource`] seam, parsed into a [`Keychain`] that picks the entries
//! matching a registry the way the kubelet does.
//!
//! Two sources: [`KubeCredentials`] (the API server, through kube) and [`MemoryCredentials`]
//! (the twin for tests). Parsing and matching are pure and shared. Passwords never reach logs:
//! [`Credential`] prints only the username and an identity hash.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The Secret types that hold registry credentials.
pub const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
pub const DOCKER_CFG: &str = "kubernetes.io/dockercfg";

/// A Secret's type and data, as far as credentials care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    pub type_: String,
    pub data: HashMap<String, Vec<u8>>,
}

/// Errors of the credential seam.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading {what} {namespace}/{name} failed")]
    Api {
        what: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Reads pull secrets and service accounts. See the module docs.
#[async_trait]
pub trait CredentialSource: Send + Sync + 'static {
    /// A secret by name; `None` when it does not exist (the kubelet ignores missing ones too).
    async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretData>, CredentialError>;

    /// The `imagePullSecrets` names of a service account; empty when it does not exist.
    async fn service_account_pull_secrets(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Vec<String>, CredentialError>;
}

/// One username/password pair and the identity the cache keys on.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
    /// Hash of registry pattern, username and password: entries resolved with one credential
    /// are never served to a request holding another.
    pub identity: String,
}

impl Credential {
    pub fn new(pattern: &str, username: &str, password: &str) -> Credential {
        let mut h = Sha256::new();
        for part in [pattern, username, password] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        Credential {
            username: username.to_owned(),
            password: password.to_owned(),
            identity: hex::encode(&h.finalize()[..12]),
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The identity used for anonymous access in cache keys.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Host (may start with `*.`), optionally followed by a path prefix.
    host: String,
    path: String,
    credential: Credential,
}

/// The credentials one pod can use, in the kubelet's order (pod secrets, then the service
/// account's), with the problems met while parsing them.
#[derive(Debug, Clone, Default)]
pub struct Keychain {
    entries: Vec<Entry>,
    /// Secrets that could not be parsed; reported as warnings, never fatal.
    pub problems: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
}

impl Keychain {
    /// Adds the entries of one Secret. Secrets of other types are ignored.
    pub fn add_secret(&mut self, name: &str, secret: &SecretData) {
        let parsed = match secret.type_.as_str() {
            DOCKER_CONFIG_JSON => secret
                .data
                .get(".dockerconfigjson")
                .ok_or("has no .dockerconfigjson key".to_owned())
                .and_then(|b| {
                    serde_json::from_slice::<ConfigJson>(b)
                        .map(|c| c.auths)
                        .map_err(|e| format!("is not a docker config: {e}"))
                }),
            DOCKER_CFG => secret
                .data
                .get(".dockercfg")
                .ok_or("has no .dockercfg key".to_owned())
                .and_then(|b| {
                    serde_json::from_slice::<HashMap<String, AuthEntry>>(b)
                        .map_err(|e| format!("is not a docker config: {e}"))
                }),
            _ => return,
        };
        let auths = match parsed {
            Ok(a) => a,
            Err(e) => {
                self.problems.push(format!("secret {name} {e}"));
                return;
            }
        };
        // HashMap order is random; sort so that matching is deterministic.
        let mut auths: Vec<_> = auths.into_iter().collect();
        auths.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, auth) in auths {
            match auth.user_pass() {
                Some((u, p)) => {
                    let (host, path) = split_key(&key);
                    self.entries.push(Entry {
                        credential: Credential::new(&key, &u, &p),
                        host,
                        path,
                    });
                }
                None => self.problems.push(format!(
                    "secret {name}: entry {key} has no usable username/password"
                )),
            }
        }
    }

    /// The credentials to try for `registry/repository`, best match first: the kubelet
    /// prefers longer (more specific) matches.
    pub fn matching(&self, registry: &str, repository: &str) -> Vec<Credential> {
        let registry = normalize_host(registry);
        let mut found: Vec<(usize, usize, &Entry)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| host_matches(&e.host, &registry) && path_matches(&e.path, repository))
            .map(|(i, e)| (e.host.len() + e.path.len(), i, e))
            .collect();
        found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out: Vec<Credential> = Vec::new();
        for (_, _, e) in found {
            if !out.contains(&e.credential) {
                out.push(e.credential.clone());
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl AuthEntry {
    fn user_pass(&self) -> Option<(String, String)> {
        if let (Some(u), Some(p)) = (&self.username, &self.password)
            && !u.is_empty()
        {
            return Some((u.clone(), p.clone()));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(self.auth.as_deref()?.trim())
            .ok()?;
        let s = String::from_utf8(decoded).ok()?;
        let (u, p) = s.split_once(':')?;
        Some((u.to_owned(), p.to_owned()))
    }
}

/// `https://index.docker.io/v1/` → (`docker.io`, ``); `r.io/team` → (`r.io`, `team`).
fn split_key(key: &str) -> (String, String) {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let path = if normalize_host(host) == "docker.io" && (path == "v1" || path == "v2") {
        ""
    } else {
        path
    };
    (normalize_host(host), path.trim_end_matches('/').to_owned())
}

fn normalize_host(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => h,
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        // A wildcard matches exactly one label, like the kubelet's glob (`*.r.io` ≠ `a.b.r.io`).
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|p| p.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == host,
    }
}

fn path_matches(prefix: &str, repository: &str) -> bool {
    prefix.is_empty()
        || repository == prefix
        || repository
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Builds a pod's keychain: `pull_secrets` first, then those of `service_account`.
pub async fn keychain_for(
    source: &dyn CredentialSource,
    namespace: &str,
    pull_secrets: &[String],
    service_account: Option<&str>,
) -> Result<Keychain, CredentialError> {
    let mut names: Vec<String> = pull_secrets.to_vec();
    if let Some(sa) = service_account {
        for n in source.service_account_pull_secrets(namespace, sa).await? {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let mut chain = Keychain::default();
    for name in names {
        match source.secret(namespace, &name).await? {
            Some(s) => chain.add_secret(&name, &s),
            None => chain.problems.push(format!("secret {name} not found")),
        }
    }
    Ok(chain)
}

/// The pull secret names and service account of a pod spec (a `serde_json` value).
pub fn pod_credentials_refs(pod_spec: &serde_json::Value) -> (Vec<String>, Option<String>) {
    let secrets = pod_spec
        .get("imagePullSecrets")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.get("name").and_then(serde_json::Value::as_str))
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // `serviceAccount` is the deprecated alias the API server still fills in.
    let sa = ["serviceAccountName", "serviceAccount"]
        .iter()
        .find_map(|f| pod_spec.get(*f).and_then(serde_json::Value::as_str))
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_owned();
    (secrets, Some(sa))
}

/// In-memory twin of the credential source.
#[derive(Debug, Default, Clone)]
pub struct MemoryCredentials {
    pub secrets: HashMap<(String, String), SecretData>,
    pub service_accounts: HashMap<(String, String), Vec<String>>,
}

impl MemoryCredentials {
    /// Adds a `kubernetes.io/dockerconfigjson` secret for one registry.
    pub fn add_docker_config(
        &mut self,
        namespace: &str,
        name: &str,
        registry: &str,
        user: &str,
        pass: &str,
    ) {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let json = serde_json::json!({"auths": {registry: {"auth": auth}}});
        self.secrets.insert(
            (namespace.to_owned(), name.to_owned()),
            SecretData {
                type_: DOCKER_CONFIG_JSON.to_owned(),
                data: HashMap::from([(
                    ".dockerconfigjson".to_owned(),
                    json.to_string().into_bytes(),
                )]),
            },
        );
    }
}

#[async_trait]
impl CredentialSource for MemoryCredentials {
    async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretData>, CredentialError> {
        Ok(self
            .secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned())
    }

    async fn service_account_pull_secrets(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Vec<String>, CredentialError> {
        Ok(self
            .service_accounts
            .get(&(namespace.to_owned(), service_account.to_owned()))
            .cloned()
            .unwrap_or_default())
    }
}

/// Reads Secrets and ServiceAccounts from the API server. Needs RBAC `get` on both.
#[derive(Clone)]
pub struct KubeCredentials {
    client: kube::Client,
}

impl KubeCredentials {
    pub fn new(client: kube::Client) -> KubeCredentials {
        KubeCredentials { client }
    }
}

fn api_error(what: &'static str, namespace: &str, name: &str, e: kube::Error) -> CredentialError {
    CredentialError::Api {
        what,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(e),
    }
}

#[async_trait]
impl CredentialSource for KubeCredentials {
    async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<SecretData>, CredentialError> {
        use k8s_openapi::api::core::v1::Secret;
        let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), namespace);
        let Some(s) = api
            .get_opt(name)
            .await
            .map_err(|e| api_error("secret", namespace, name, e))?
        else {
            return Ok(None);
        };
        Ok(Some(SecretData {
            type_: s.type_.unwrap_or_default(),
            data: s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        }))
    }

    async fn service_account_pull_secrets(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Vec<String>, CredentialError> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let api: kube::Api<ServiceAccount> = kube::Api::namespaced(self.client.clone(), namespace);
        let sa = api
            .get_opt(service_account)
            .await
            .map_err(|e| api_error("serviceaccount", namespace, service_account, e))?;
        Ok(sa
            .and_then(|sa| sa.image_pull_secrets)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .filter(|n| !n.is_empty())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(type_: &str, key: &str, json: &str) -> SecretData {
        SecretData {
            type_: type_.into(),
            data: HashMap::from([(key.to_owned(), json.as_bytes().to_vec())]),
        }
    }

    #[test]
    fn matching_table() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut chain = Keychain::default();
        chain.add_secret(
            "a",
            &secret(
                DOCKER_CONFIG_JSON,
                ".dockerconfigjson",
                &serde_json::json!({"auths": {
                    "https://index.docker.io/v1/": {"auth": b64("hub:p1")},
                    "r.io": {"username": "plain", "password": "p2"},
                    "r.io/team": {"auth": b64("team:p3")},
                    "*.corp.io": {"auth": b64("wild:p4")},
                    "127.0.0.1:5000": {"auth": b64("local:p:with:colons")},
                    "broken": {"auth": "!!"}
                }})
                .to_string(),
            ),
        );
        chain.add_secret(
            "b",
            &secret(
                DOCKER_CFG,
                ".dockercfg",
                &serde_json::json!({"r.io": {"auth": b64("old:p5")}}).to_string(),
            ),
        );
        chain.add_secret(
            "c",
            &secret(DOCKER_CONFIG_JSON, ".dockerconfigjson", "nope"),
        );
        chain.add_secret("d", &secret("Opaque", "x", "{}"));
        assert_eq!(chain.problems.len(), 2, "{:?}", chain.problems);

        let cases = [
            ("docker.io", "library/nginx", vec!["hub"]),
            ("r.io", "team/app", vec!["team", "plain", "old"]),
            ("r.io", "teamx/app", vec!["plain", "old"]),
            ("a.corp.io", "x", vec!["wild"]),
            ("a.b.corp.io", "x", vec![]),
            ("corp.io", "x", vec![]),
            ("127.0.0.1:5000", "x", vec!["local"]),
            ("127.0.0.1:5001", "x", vec![]),
        ];
        for (reg, repo, want) in cases {
            let got: Vec<String> = chain
                .matching(reg, repo)
                .into_iter()
                .map(|c| c.username)
                .collect();
            assert_eq!(got, want, "{reg}/{repo}");
        }
        let local = &chain.matching("127.0.0.1:5000", "x")[0];
        assert_eq!(local.password, "p:with:colons");
        assert!(
            !format!("{local:?}").contains("colons"),
            "password must not be printed"
        );
    }

    #[test]
    fn identity_differs_per_credential() {
        let a = Credential::new("r", "u", "p1");
        let b = Credential::new("r", "u", "p2");
        let c = Credential::new("r", "u", "p1");
        assert_ne!(a.identity, b.identity);
        assert_eq!(a.identity, c.identity);
        assert_ne!(
            Credential::new("ru", "", "p").identity,
            Credential::new("r", "u", "p").identity
        );
    }

    #[tokio::test]
    async fn keychain_from_pod_and_service_account() {
        let mut src = MemoryCredentials::default();
        src.add_docker_config("ns", "pod-secret", "r.io", "pod", "p");
        src.add_docker_config("ns", "sa-secret", "r.io", "sa", "p");
        src.service_accounts.insert(
            ("ns".into(), "builder".into()),
            vec!["sa-secret".into(), "gone".into()],
        );
        let spec = serde_json::json!({"imagePullSecrets": [{"name": "pod-secret"}], "serviceAccountName": "builder"});
        let (secrets, sa) = pod_credentials_refs(&spec);
        let chain = keychain_for(&src, "ns", &secrets, sa.as_deref())
            .await
            .expect("keychain");
        let users: Vec<String> = chain
            .matching("r.io", "x")
            .into_iter()
            .map(|c| c.username)
            .collect();
        assert_eq!(users, vec!["pod", "sa"]);
        assert_eq!(chain.problems, vec!["secret gone not found"]);
        assert_eq!(
            pod_credentials_refs(&serde_json::json!({})),
            (vec![], Some("default".into()))
        );
    }
}
