//! Grants on the daemon side: the verification key set (kept fresh from a directory, usually
//! the webhook's ConfigMap mount), the `x-speculum-grant` header format, and the checks that
//! turn a presented grant into "this namespace may be served this object" — or a reason why not.
//!
//! The cryptography and the claims are the `speculum-grant` crate's; the bindings (namespace,
//! pod, node, repository, manifest closure) are checked here, by [`GrantChecker`], against the
//! pod directory and this node's own store. The order of the checks and what each defends
//! against is the attack matrix in `docs/tenancy.md`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use speculum_grant::{Claims, KeySet};

use super::pods::Pods;
use crate::oci::Digest;
use crate::store::{self, Store};

/// How often the key directory is looked at for changes (ConfigMap updates land within the
/// kubelet's sync period anyway).
const KEYS_RECHECK: Duration = Duration::from_secs(5);

/// Closures remembered per granted manifest (each a few dozen digests).
const CLOSURE_CACHE: usize = 256;

/// The grant verification keys, reloaded when the directory changes. No directory, an empty
/// one or an unreadable one: nothing verifies (fail closed for P2P).
pub struct GrantKeys {
    dir: Option<PathBuf>,
    audience: String,
    // A std lock: held for a swap or a clone of the Arc, never across an `.await`.
    state: RwLock<KeysState>,
}

struct KeysState {
    /// `None` until a directory was read successfully: nothing verifies.
    keys: Option<Arc<KeySet>>,
    stamp: Option<Vec<(PathBuf, SystemTime, u64)>>,
    checked: Instant,
}

impl GrantKeys {
    /// Keys from `dir` (every `*.pem` file), checked against `audience`.
    pub fn new(dir: Option<PathBuf>, audience: String) -> GrantKeys {
        let keys = GrantKeys {
            dir,
            audience,
            state: RwLock::new(KeysState {
                keys: None,
                stamp: None,
                checked: Instant::now() - KEYS_RECHECK * 2,
            }),
        };
        keys.refresh();
        keys
    }

    /// A fixed key set (tests).
    pub fn fixed(keys: KeySet, audience: &str) -> GrantKeys {
        GrantKeys {
            dir: None,
            audience: audience.to_owned(),
            state: RwLock::new(KeysState {
                keys: Some(Arc::new(keys)),
                stamp: None,
                checked: Instant::now(),
            }),
        }
    }

    /// Number of keys loaded.
    pub fn len(&self) -> usize {
        self.current().map_or(0, |k| k.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies signature, audience and times; bindings are [`GrantChecker`]'s job.
    pub fn verify(&self, token: &str) -> Result<Claims, speculum_grant::GrantError> {
        self.refresh();
        match self.current() {
            Some(keys) => keys.verify(token, &self.audience, SystemTime::now()),
            None => Err(speculum_grant::GrantError::UnknownKey),
        }
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .clone()
    }

    /// Reloads the key set when the directory's listing (names, mtimes, sizes) changed since
    /// the last look, at most every [`KEYS_RECHECK`].
    fn refresh(&self) {
        let Some(dir) = &self.dir else { return };
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            if state.checked.elapsed() < KEYS_RECHECK {
                return;
            }
        }
        let stamp = listing(dir);
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.checked = Instant::now();
        if state.stamp.is_some() && state.stamp == stamp {
            return;
        }
        match KeySet::load_dir(dir) {
            Ok(keys) => {
                tracing::info!(dir = %dir.display(), keys = keys.len(), "grant keys loaded");
                state.keys = Some(Arc::new(keys));
            }
            Err(e) => {
                // Keep what we had: a half-written ConfigMap update must not drop every key.
                tracing::warn!(dir = %dir.display(), error = %e, "grant keys not reloaded");
            }
        }
        state.stamp = stamp;
    }
}

/// Names, modification times and sizes of the `*.pem` files in `dir` (following the
/// symlinks a ConfigMap mount is made of), sorted; `None` when the directory is unreadable.
fn listing(dir: &Path) -> Option<Vec<(PathBuf, SystemTime, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pem") {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(&path) {
            out.push((path, meta.modified().ok()?, meta.len()));
        }
    }
    out.sort();
    Some(out)
}

/// One grant as presented in an `x-speculum-grant` header: `<namespace>/<pod> <token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub namespace: String,
    pub pod: String,
    pub token: String,
}

impl Presented {
    /// Parses one header value; `None` for anything not of the form above.
    pub fn parse(value: &str) -> Option<Presented> {
        let (who, token) = value.trim().split_once(' ')?;
        let (namespace, pod) = who.split_once('/')?;
        let token = token.trim();
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        let token_ok = !token.is_empty()
            && token.len() <= 8192
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        (name_ok(namespace) && name_ok(pod) && token_ok).then(|| Presented {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            token: token.to_owned(),
        })
    }

    /// The header value.
    pub fn header_value(&self) -> String {
        format!("{}/{} {}", self.namespace, self.pod, self.token)
    }
}

/// A grant that passed every check: who it was for and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub namespace: String,
    pub pod: String,
    pub claims: Claims,
}

impl Granted {
    /// The policy input `grant` (see `docs/policy.md`).
    pub fn input(&self) -> serde_json::Value {
        serde_json::json!({
            "namespace": self.namespace,
            "pod": self.pod,
            "repository": self.claims.repo,
            "digest": self.claims.digest,
            "expires": self.claims.exp,
        })
    }
}

/// Why no presented grant was accepted: the reason of the check that got furthest (the most
/// telling one for an operator reading the audit line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// No grant was presented at all (or none on this node's pods).
    NoGrant,
    /// A header that is not `<namespace>/<pod> <token>`.
    Malformed,
    /// Signature, key, audience, issuer or time check failed.
    Invalid(&'static str),
    /// The grant names another repository.
    OtherRepository,
    /// The grant was issued to another namespace than the presenting pod's.
    OtherNamespace,
    /// The pod directory could not answer (fail closed).
    PodsUnavailable,
    /// The presenting pod does not exist, or does not carry this grant.
    NotThePodsGrant,
    /// The pod carrying the grant runs on another node than the requester's.
    OtherNode,
    /// The requested object is not part of the granted manifest's closure.
    OutsideClosure,
}

impl Refusal {
    pub fn reason(&self) -> String {
        match self {
            Refusal::NoGrant => "private: no grant".into(),
            Refusal::Malformed => "private: malformed grant header".into(),
            Refusal::Invalid(why) => format!("private: grant {why}"),
            Refusal::OtherRepository => "private: grant for another repository".into(),
            Refusal::OtherNamespace => "private: grant for another namespace".into(),
            Refusal::PodsUnavailable => "private: pod directory unavailable".into(),
            Refusal::NotThePodsGrant => "private: grant not held by the named pod".into(),
            Refusal::OtherNode => "private: grant of a pod on another node".into(),
            Refusal::OutsideClosure => "private: object outside the granted image".into(),
        }
    }
}

/// Checks presented grants against keys, the pod directory and this node's store.
pub struct GrantChecker {
    pub keys: Arc<GrantKeys>,
    pub pods: Option<Arc<dyn Pods>>,
    closures: Mutex<HashMap<Digest, Arc<HashSet<Digest>>>>,
}

impl GrantChecker {
    pub fn new(keys: Arc<GrantKeys>, pods: Option<Arc<dyn Pods>>) -> GrantChecker {
        GrantChecker {
            keys,
            pods,
            closures: Mutex::new(HashMap::new()),
        }
    }

    /// The requesting side: grants held by pods on this node waiting for `registry/repository`,
    /// checked for signature, time, namespace and repository (the serving node checks the rest
    /// with its own store). At most `limit`, each with the claims it verified to.
    pub fn candidates(
        &self,
        registry: &str,
        repository: &str,
        limit: usize,
    ) -> Vec<(Presented, Claims)> {
        let Some(pods) = &self.pods else {
            return Vec::new();
        };
        let repo = format!("{registry}/{repository}");
        let mut out = Vec::new();
        for pod in pods.waiting_for(registry, repository) {
            for token in &pod.grants {
                let Ok(claims) = self.keys.verify(token) else {
                    continue;
                };
                if claims.sub == pod.namespace && claims.repo == repo {
                    let presented = Presented {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        token: token.clone(),
                    };
                    out.push((presented, claims));
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// The serving side: the first presented grant that proves `requester_node` may be served
    /// `object` of `registry/repository`, or the most telling refusal.
    pub async fn check(
        &self,
        presented: &[Result<Presented, ()>],
        requester_node: &str,
        registry: &str,
        repository: &str,
        object: &Digest,
        store: &dyn Store,
    ) -> Result<Granted, Refusal> {
        let repo = format!("{registry}/{repository}");
        let mut worst = Refusal::NoGrant;
        for p in presented {
            let result = match p {
                Err(()) => Err(Refusal::Malformed),
                Ok(p) => {
                    self.check_one(p, requester_node, &repo, object, store)
                        .await
                }
            };
            match result {
                Ok(granted) => return Ok(granted),
                Err(r) => worst = worst.max(r),
            }
        }
        Err(worst)
    }

    async fn check_one(
        &self,
        p: &Presented,
        requester_node: &str,
        repo: &str,
        object: &Digest,
        store: &dyn Store,
    ) -> Result<Granted, Refusal> {
        let claims = self
            .keys
            .verify(&p.token)
            .map_err(|e| Refusal::Invalid(e.reason()))?;
        if claims.repo != repo {
            return Err(Refusal::OtherRepository);
        }
        if claims.sub != p.namespace {
            return Err(Refusal::OtherNamespace);
        }
        let Some(pods) = &self.pods else {
            return Err(Refusal::PodsUnavailable);
        };
        let pod = match pods.get(&p.namespace, &p.pod).await {
            Ok(Some(pod)) => pod,
            Ok(None) => return Err(Refusal::NotThePodsGrant),
            Err(e) => {
                tracing::warn!(error = %e, "pod directory unavailable; grant refused");
                return Err(Refusal::PodsUnavailable);
            }
        };
        if !pod.grants.iter().any(|g| g == &p.token) {
            return Err(Refusal::NotThePodsGrant);
        }
        if pod.node != requester_node {
            return Err(Refusal::OtherNode);
        }
        let root: Digest = claims
            .digest
            .parse()
            .map_err(|_| Refusal::Invalid("malformed"))?;
        if *object != root && !self.closure(store, &root).await.contains(object) {
            return Err(Refusal::OutsideClosure);
        }
        Ok(Granted {
            namespace: p.namespace.clone(),
            pod: p.pod.clone(),
            claims,
        })
    }

    /// Everything reachable from `root` in this node's store (index → manifests → config and
    /// layers), remembered per root. An unreadable store gives an empty closure (refuse).
    async fn closure(&self, store: &dyn Store, root: &Digest) -> Arc<HashSet<Digest>> {
        if let Some(hit) = self
            .closures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(root)
        {
            return hit.clone();
        }
        let set: Arc<HashSet<Digest>> = match store::closure(store, root).await {
            Ok(all) => Arc::new(all.into_iter().collect()),
            Err(e) => {
                tracing::debug!(digest = %root, error = %e, "closure unreadable");
                return Arc::new(HashSet::new());
            }
        };
        let mut cache = self.closures.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CLOSURE_CACHE {
            cache.clear();
        }
        cache.insert(root.clone(), set.clone());
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presented_header_table() {
        type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str, &'a str)>);
        let cases: &[Case] = &[
            (
                "good",
                "team-a/web-1 aaa.bbb.ccc",
                Some(("team-a", "web-1", "aaa.bbb.ccc")),
            ),
            (
                "spaces trimmed",
                "  ns/p  t.t.t ",
                Some(("ns", "p", "t.t.t")),
            ),
            ("no pod", "ns t.t.t", None),
            ("no token", "ns/p", None),
            ("empty token", "ns/p ", None),
            ("uppercase ns", "NS/p t.t.t", None),
            ("token with space", "ns/p t.t t", None),
            ("token with quote", "ns/p t\"t", None),
            ("empty", "", None),
            ("slash in pod", "ns/p/q t.t.t", None),
        ];
        for (name, input, want) in cases {
            let got = Presented::parse(input);
            let want = want.map(|(ns, pod, token)| Presented {
                namespace: ns.into(),
                pod: pod.into(),
                token: token.into(),
            });
            assert_eq!(got, want, "{name}");
            if let Some(p) = got {
                assert_eq!(
                    Presented::parse(&p.header_value()),
                    Some(p),
                    "{name}: round trip"
                );
            }
        }
    }

    #[test]
    fn refusals_order_from_least_to_most_telling() {
        assert!(Refusal::NoGrant < Refusal::Invalid("expired"));
        assert!(Refusal::Invalid("expired") < Refusal::OtherNode);
        assert!(Refusal::OtherNode < Refusal::OutsideClosure);
    }
}
