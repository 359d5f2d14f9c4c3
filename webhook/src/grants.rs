//! Pull grants on Pods: which images of a new Pod get a signed grant, the annotation patch
//! that carries them, the mirror-policy question "is this repository private?", and publishing
//! the public key to a ConfigMap the daemons mount.
//!
//! A grant is signed only for an image the webhook itself resolved (or, for an image already
//! pinned, checked) with **the pod's own pull-secret credentials** ([`Evidence::Credential`]),
//! and only when the daemons' mirror bundle says `require_grant` for it. Anonymous answers and
//! the cluster fallback never earn a grant. The resolution cache is keyed by credential
//! identity (a hash of registry pattern, username and password), so a cache hit proves the pod
//! holds a credential the registry accepted for this reference within the cache TTL; one
//! namespace's pull never makes another namespace's anonymous (or differently credentialed)
//! request look authorised.
//!
//! The token format lives in `speculum-grant`; [`plan`] and [`annotation_ops`] are pure and
//! unit-tested; [`Granter`] adds the key, clock and metrics.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};
use speculum_grant::{ANNOTATION, DEFAULT_AUDIENCE, GrantError, Signer};

use crate::metrics::Metrics;

/// Longest grant lifetime accepted in the config.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The `grants:` config section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GrantsConfig {
    /// Ed25519 PKCS#8 PEM; empty turns grants off.
    pub signing_key_file: PathBuf,
    /// Lifetime of one grant.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    pub audience: String,
    /// The daemons' mirror policy bundle (Rego), asked for `require_grant`; empty: no image
    /// is private, so no grant is ever signed.
    pub mirror_policy_dir: PathBuf,
    /// `namespace/name` of the ConfigMap that receives `<kid>.pem`; empty: do not publish.
    pub publish_config_map: String,
    /// How often the key file is re-read (rotation) and the public key re-published.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        GrantsConfig {
            signing_key_file: PathBuf::new(),
            ttl: Duration::from_secs(600),
            audience: DEFAULT_AUDIENCE.into(),
            mirror_policy_dir: PathBuf::new(),
            publish_config_map: String::new(),
            check_interval: Duration::from_secs(60),
        }
    }
}

impl GrantsConfig {
    pub fn enabled(&self) -> bool {
        !self.signing_key_file.as_os_str().is_empty()
    }

    /// Checks every field and loads the key and bundle once; returns every problem.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.ttl.is_zero() || self.ttl > MAX_TTL {
            e.push(format!(
                "grants.ttl ({:?}) must be above zero and at most 24h",
                self.ttl
            ));
        }
        if self.audience.trim().is_empty() {
            e.push("grants.audience must not be empty".into());
        }
        if self.check_interval.is_zero() {
            e.push("grants.checkInterval must be above zero".into());
        }
        if !self.publish_config_map.is_empty()
            && parse_object_name(&self.publish_config_map).is_none()
        {
            e.push(format!(
                "grants.publishConfigMap {:?} must be namespace/name",
                self.publish_config_map
            ));
        }
        if self.enabled()
            && let Err(err) = load_signer(&self.signing_key_file)
        {
            e.push(format!("grants.signingKeyFile: {err}"));
        }
        if !self.enabled()
            && (!self.mirror_policy_dir.as_os_str().is_empty()
                || !self.publish_config_map.is_empty())
        {
            e.push(
                "grants.mirrorPolicyDir and grants.publishConfigMap need grants.signingKeyFile"
                    .into(),
            );
        }
        if !self.mirror_policy_dir.as_os_str().is_empty()
            && let Err(err) = MirrorPolicy::load(&self.mirror_policy_dir)
        {
            e.push(format!("grants.mirrorPolicyDir: {err}"));
        }
        e
    }
}

/// `namespace/name` → its parts (both non-empty, one slash).
pub fn parse_object_name(s: &str) -> Option<(&str, &str)> {
    let (ns, name) = s.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then_some((ns, name))
}

/// Errors of the grants seam.
#[derive(Debug, thiserror::Error)]
pub enum GrantsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("mirror policy {path}: {message}")]
    Policy { path: String, message: String },
    #[error("publishing the grant key to {config_map}: {message}")]
    Publish { config_map: String, message: String },
}

fn load_signer(path: &Path) -> Result<Signer, GrantsError> {
    let pem = std::fs::read(path).map_err(|source| GrantsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Signer::from_pem(&pem)?)
}

/// The image facts the mirror policy is asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: String,
}

/// "Does serving this image peer to peer need a grant?"
pub trait Privacy: Send + Sync + 'static {
    fn require_grant(&self, namespace: &str, image: &ImageFacts) -> Result<bool, GrantsError>;
}

/// No image is private (no mirror bundle configured).
pub struct NothingPrivate;

impl Privacy for NothingPrivate {
    fn require_grant(&self, _: &str, _: &ImageFacts) -> Result<bool, GrantsError> {
        Ok(false)
    }
}

/// The twin for tests: `registry/repository` prefixes that are private.
pub struct PrivatePrefixes(pub Vec<String>);

impl Privacy for PrivatePrefixes {
    fn require_grant(&self, _: &str, image: &ImageFacts) -> Result<bool, GrantsError> {
        let name = format!("{}/{}", image.registry, image.repository);
        Ok(self.0.iter().any(|p| name.starts_with(p.as_str())))
    }
}

/// The daemons' mirror bundle (`data.speculum.mirror.decision`), loaded the way the daemon
/// loads it: `*.rego` below the directory (not `*_test.rego`), `data.json`/`data.yaml` placed
/// by their directory, hidden entries (a ConfigMap's `..data`) skipped.
#[derive(Clone)]
pub struct MirrorPolicy {
    engine: regorus::Engine,
    path: String,
}

const MIRROR_RULE: &str = "data.speculum.mirror.decision";

impl MirrorPolicy {
    pub fn load(dir: &Path) -> Result<MirrorPolicy, GrantsError> {
        let path = dir.display().to_string();
        let err = |message: String| GrantsError::Policy {
            path: path.clone(),
            message,
        };
        let mut modules = Vec::new();
        let mut data = Vec::new();
        walk(dir, dir, &mut modules, &mut data, 0).map_err(err)?;
        if modules.is_empty() {
            return Err(err("no .rego module".into()));
        }
        modules.sort();
        data.sort_by(|a: &(Vec<String>, Value), b| a.0.cmp(&b.0));
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        for (at, value) in data {
            let mut nested = value;
            for key in at.iter().rev() {
                nested = json!({ key: nested });
            }
            let v = regorus::Value::from_json_str(&nested.to_string())
                .map_err(|e| err(e.to_string()))?;
            engine.add_data(v).map_err(|e| err(e.to_string()))?;
        }
        for (name, text) in modules {
            engine
                .add_policy(name.clone(), text)
                .map_err(|e| err(format!("{name}: {e}")))?;
        }
        let policy = MirrorPolicy {
            engine,
            path: path.clone(),
        };
        // A bundle without the rule would fail every admission: find out now.
        policy.eval(&json!({}))?;
        Ok(policy)
    }

    fn eval(&self, input: &Value) -> Result<Value, GrantsError> {
        let err = |message: String| GrantsError::Policy {
            path: self.path.clone(),
            message,
        };
        // eval needs `&mut`; a clone shares the compiled modules.
        let mut engine = self.engine.clone();
        engine
            .set_input_json(&input.to_string())
            .map_err(|e| err(e.to_string()))?;
        let v = engine
            .eval_rule(MIRROR_RULE.to_owned())
            .map_err(|e| err(format!("rule decision: {e}")))?;
        if v == regorus::Value::Undefined {
            return Ok(Value::Null);
        }
        let s = v.to_json_str().map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&s).map_err(|e| err(e.to_string()))
    }

    /// The input a daemon builds for a peer's GET of this manifest by digest (docs/policy.md).
    pub fn input(namespace: &str, image: &ImageFacts) -> Value {
        json!({
            "request": {"action": "serve", "kind": "manifest", "method": "GET", "source": "peer",
                        "reference": image.digest, "is_tag": false},
            "image": {"registry": image.registry, "repository": image.repository,
                      "tag": image.tag, "digest": image.digest},
            "node": {"name": ""},
            "namespaces": [namespace],
            "peer": null,
            "grant": null,
        })
    }
}

impl Privacy for MirrorPolicy {
    fn require_grant(&self, namespace: &str, image: &ImageFacts) -> Result<bool, GrantsError> {
        let d = self.eval(&MirrorPolicy::input(namespace, image))?;
        match d.get("require_grant") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(GrantsError::Policy {
                path: self.path.clone(),
                message: format!("require_grant is {other}, expected a bool"),
            }),
        }
    }
}

type Modules = Vec<(String, String)>;
type Data = Vec<(Vec<String>, Value)>;

fn walk(
    root: &Path,
    dir: &Path,
    modules: &mut Modules,
    data: &mut Data,
    depth: usize,
) -> Result<(), String> {
    if depth > 16 {
        return Err(format!("{}: nested too deep", dir.display()));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, modules, data, depth + 1)?;
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let read =
            || std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()));
        let at = || -> Vec<String> {
            rel.parent()
                .map(|p| {
                    p.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        if name.ends_with("_test.rego") {
            continue;
        } else if name.ends_with(".rego") {
            modules.push((rel.to_string_lossy().into_owned(), read()?));
        } else if name == "data.json" {
            let v =
                serde_json::from_str(&read()?).map_err(|e| format!("{}: {e}", rel.display()))?;
            data.push((at(), v));
        } else if name == "data.yaml" || name == "data.yml" {
            let v =
                yaml_serde::from_str(&read()?).map_err(|e| format!("{}: {e}", rel.display()))?;
            data.push((at(), v));
        }
    }
    Ok(())
}

/// How the webhook learned the digest of one image of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// The registry accepted this credential of the pod (now, or within the cache TTL for
    /// exactly this credential).
    Credential(String),
    /// Anonymous access, the cluster fallback, or not checked: never earns a grant.
    Unauthenticated,
}

/// One image of a Pod the webhook has a digest for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The image as written (for audit lines).
    pub image: String,
    pub container: String,
    pub facts: ImageFacts,
    pub evidence: Evidence,
}

/// What to do about one candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Sign a grant for `registry/repository@digest`.
    Grant,
    /// No grant, with the metric outcome: `public`, `anonymous`, `policy_error`, `duplicate`.
    NoGrant(&'static str),
}

/// The pure decision: which candidates of a `kind` admission (`operation`) get a grant.
/// Only Pod CREATE; only private images; only with credential evidence; one per (repo, digest).
pub fn plan(
    kind: &str,
    operation: &str,
    namespace: &str,
    candidates: &[Candidate],
    privacy: &dyn Privacy,
) -> Vec<Verdict> {
    if kind != "Pod" || operation != "CREATE" {
        return Vec::new();
    }
    let mut seen = BTreeSet::new();
    candidates
        .iter()
        .map(|c| match privacy.require_grant(namespace, &c.facts) {
            Ok(false) => Verdict::NoGrant("public"),
            Err(e) => {
                tracing::warn!(reference = %c.image, error = %e, "mirror policy failed: no grant");
                Verdict::NoGrant("policy_error")
            }
            Ok(true) if c.evidence == Evidence::Unauthenticated => Verdict::NoGrant("anonymous"),
            Ok(true) => {
                let key = (repo_of(&c.facts), c.facts.digest.clone());
                if seen.insert(key) {
                    Verdict::Grant
                } else {
                    Verdict::NoGrant("duplicate")
                }
            }
        })
        .collect()
}

/// `registry/repository`, the grant's `repo` claim.
pub fn repo_of(f: &ImageFacts) -> String {
    format!("{}/{}", f.registry, f.repository)
}

/// JSON Patch operations that leave exactly `tokens` in the [`ANNOTATION`] of `pod` (RFC 6902:
/// `add` on an existing member replaces it). With no tokens, a value the user wrote is
/// removed, so a pod never carries grants the webhook did not sign for it.
pub fn annotation_ops(pod: &Value, tokens: &[String]) -> Vec<Value> {
    let path = format!(
        "/metadata/annotations/{}",
        ANNOTATION.replace('~', "~0").replace('/', "~1")
    );
    let annotations = pod.pointer("/metadata/annotations");
    let present = annotations.and_then(|a| a.get(ANNOTATION)).is_some();
    if tokens.is_empty() {
        return if present {
            vec![json!({"op": "remove", "path": path})]
        } else {
            Vec::new()
        };
    }
    let value = Value::String(Value::from(tokens.to_vec()).to_string());
    match annotations {
        Some(Value::Object(_)) => vec![json!({"op": "add", "path": path, "value": value})],
        _ if pod.get("metadata").is_some_and(Value::is_object) => vec![json!({
            "op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: value}
        })],
        _ => vec![
            json!({"op": "add", "path": "/metadata", "value": {"annotations": {ANNOTATION: value}}}),
        ],
    }
}

/// A signed grant, for the audit line (the token itself is a bearer secret and never logged).
#[derive(Debug, Clone)]
pub struct Signed {
    pub token: String,
    pub repo: String,
    pub digest: String,
    pub kid: String,
    pub jti: String,
    pub exp: i64,
}

/// Signs grants with the configured key (reloaded when the file changes).
pub struct Granter {
    key_file: PathBuf,
    signer: RwLock<(Vec<u8>, Arc<Signer>)>,
    pub ttl: Duration,
    pub audience: String,
    pub privacy: Arc<dyn Privacy>,
    metrics: Arc<Metrics>,
}

impl Granter {
    /// `None` when grants are off.
    pub fn from_config(
        cfg: &GrantsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Granter>, GrantsError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let privacy: Arc<dyn Privacy> = if cfg.mirror_policy_dir.as_os_str().is_empty() {
            Arc::new(NothingPrivate)
        } else {
            Arc::new(MirrorPolicy::load(&cfg.mirror_policy_dir)?)
        };
        let pem = std::fs::read(&cfg.signing_key_file).map_err(|source| GrantsError::Read {
            path: cfg.signing_key_file.display().to_string(),
            source,
        })?;
        let signer = Arc::new(Signer::from_pem(&pem)?);
        Ok(Some(Granter {
            key_file: cfg.signing_key_file.clone(),
            signer: RwLock::new((pem, signer)),
            ttl: cfg.ttl,
            audience: cfg.audience.clone(),
            privacy,
            metrics,
        }))
    }

    /// A granter over an in-memory key (tests).
    pub fn with_signer(
        signer: Signer,
        privacy: Arc<dyn Privacy>,
        metrics: Arc<Metrics>,
    ) -> Granter {
        Granter {
            key_file: PathBuf::new(),
            signer: RwLock::new((Vec::new(), Arc::new(signer))),
            ttl: Duration::from_secs(600),
            audience: DEFAULT_AUDIENCE.into(),
            privacy,
            metrics,
        }
    }

    pub fn signer(&self) -> Arc<Signer> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Re-reads the key file; `Ok(true)` when the key changed. A broken file keeps the old key.
    pub fn reload(&self) -> Result<bool, GrantsError> {
        if self.key_file.as_os_str().is_empty() {
            return Ok(false);
        }
        let pem = std::fs::read(&self.key_file).map_err(|source| GrantsError::Read {
            path: self.key_file.display().to_string(),
            source,
        })?;
        if self.signer.read().unwrap_or_else(|p| p.into_inner()).0 == pem {
            return Ok(false);
        }
        let signer = Arc::new(Signer::from_pem(&pem)?);
        tracing::info!(kid = signer.kid(), "grant signing key changed");
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = (pem, signer);
        Ok(true)
    }

    /// Decides and signs for one admission; counts every outcome.
    pub fn grant(
        &self,
        kind: &str,
        operation: &str,
        namespace: &str,
        candidates: &[Candidate],
    ) -> Vec<(usize, Signed)> {
        let verdicts = plan(
            kind,
            operation,
            namespace,
            candidates,
            self.privacy.as_ref(),
        );
        let signer = self.signer();
        let mut out = Vec::new();
        for (i, (c, v)) in candidates.iter().zip(verdicts).enumerate() {
            if let Verdict::NoGrant(outcome) = v {
                self.metrics.grant(outcome);
                continue;
            }
            let repo = repo_of(&c.facts);
            match signer.sign_for(
                &self.audience,
                namespace,
                &repo,
                &c.facts.digest,
                self.ttl,
                SystemTime::now(),
            ) {
                Ok(token) => {
                    self.metrics.grant("signed");
                    let (jti, exp) = claims_of(&token);
                    out.push((
                        i,
                        Signed {
                            token,
                            repo,
                            digest: c.facts.digest.clone(),
                            kid: signer.kid().to_owned(),
                            jti,
                            exp,
                        },
                    ));
                }
                Err(e) => {
                    self.metrics.grant("sign_error");
                    tracing::warn!(reference = %c.image, error = %e, "signing a grant failed");
                }
            }
        }
        out
    }
}

/// `jti` and `exp` of a token we just signed (for audit lines).
fn claims_of(token: &str) -> (String, i64) {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice::<speculum_grant::Claims>(&b).ok())
        .map_or((String::new(), 0), |c| (c.jti, c.exp))
}

/// Merges `<kid>.pem` into the ConfigMap `namespace/name`, keeping its other keys (older keys
/// stay for rotation). Creates the ConfigMap when it does not exist (needs `create`; with only
/// `get`/`patch` the chart must create it).
pub async fn publish_key(
    client: &kube::Client,
    config_map: &str,
    signer: &Signer,
) -> Result<(), GrantsError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let err = |message: String| GrantsError::Publish {
        config_map: config_map.to_owned(),
        message,
    };
    let (ns, name) =
        parse_object_name(config_map).ok_or_else(|| err("not namespace/name".into()))?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let key = format!("{}.pem", signer.kid());
    let pem = signer.public_key_pem();
    let patch = json!({"data": {key.clone(): pem}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns},
                "data": {key: pem},
            }))
            .map_err(|e| err(e.to_string()))?;
            api.create(&PostParams::default(), &cm)
                .await
                .map(|_| ())
                .map_err(|e| err(format!("creating: {e}")))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Re-reads the key every `interval` and (re)publishes it when it changed or publishing failed
/// before; ends when `shutdown` resolves.
pub async fn run(
    granter: Arc<Granter>,
    client: Option<kube::Client>,
    config_map: String,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut published = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        match granter.reload() {
            Ok(true) => published = false,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "grant key reload failed; keeping the current key")
            }
        }
        if let (Some(c), false, false) = (&client, published, config_map.is_empty()) {
            let signer = granter.signer();
            match publish_key(c, &config_map, &signer).await {
                Ok(()) => {
                    published = true;
                    tracing::info!(kid = signer.kid(), config_map = %config_map, "grant public key published");
                }
                Err(e) => tracing::warn!(error = %e, "publishing the grant key failed; retrying"),
            }
        }
    }
}

/// Writes a fresh key pair: `grant.key` (0600) and `grant.pub.pem`, refusing to overwrite.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf, String), GrantsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (private, public) = speculum_grant::generate();
    let kid = Signer::from_pem(private.as_bytes())?.kid().to_owned();
    std::fs::create_dir_all(dir).map_err(|source| GrantsError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    let key = dir.join("grant.key");
    let pub_path = dir.join("grant.pub.pem");
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), GrantsError> {
        let io = |source| GrantsError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)
    };
    write(&key, &private, 0o600)?;
    write(&pub_path, &public, 0o644)?;
    Ok((key, pub_path, kid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn cand(registry: &str, repo: &str, digest: &str, evidence: Evidence) -> Candidate {
        Candidate {
            image: format!("{registry}/{repo}:v1"),
            container: "c".into(),
            facts: ImageFacts {
                registry: registry.into(),
                repository: repo.into(),
                tag: Some("v1".into()),
                digest: digest.into(),
            },
            evidence,
        }
    }

    fn cred() -> Evidence {
        Evidence::Credential("id1".into())
    }

    #[test]
    fn plan_table() {
        let private = PrivatePrefixes(vec!["r.io/private/".into()]);
        let p = |repo, d, e| cand("r.io", repo, d, e);
        // (name, kind, operation, candidates, want)
        type Case<'a> = (&'a str, &'a str, &'a str, Vec<Candidate>, Vec<Verdict>);
        let cases: Vec<Case> = vec![
            (
                "private, own credential",
                "Pod",
                "CREATE",
                vec![p("private/a", D1, cred())],
                vec![Verdict::Grant],
            ),
            (
                "public",
                "Pod",
                "CREATE",
                vec![p("open/a", D1, cred())],
                vec![Verdict::NoGrant("public")],
            ),
            (
                "private but anonymous",
                "Pod",
                "CREATE",
                vec![p("private/a", D1, Evidence::Unauthenticated)],
                vec![Verdict::NoGrant("anonymous")],
            ),
            (
                "deployment",
                "Deployment",
                "CREATE",
                vec![p("private/a", D1, cred())],
                vec![],
            ),
            (
                "pod update",
                "Pod",
                "UPDATE",
                vec![p("private/a", D1, cred())],
                vec![],
            ),
            (
                "one grant per repo and digest",
                "Pod",
                "CREATE",
                vec![
                    p("private/a", D1, cred()),
                    p("private/a", D1, cred()),
                    p("private/a", D2, cred()),
                    p("private/b", D1, cred()),
                ],
                vec![
                    Verdict::Grant,
                    Verdict::NoGrant("duplicate"),
                    Verdict::Grant,
                    Verdict::Grant,
                ],
            ),
        ];
        for (name, kind, op, cands, want) in cases {
            assert_eq!(plan(kind, op, "ns", &cands, &private), want, "{name}");
        }
    }

    #[test]
    fn annotation_ops_table() {
        let tokens = vec!["t1".to_owned(), "t2".to_owned()];
        let value = json!("[\"t1\",\"t2\"]");
        let path = "/metadata/annotations/speculum.io~1pull-grants";
        // (name, pod, tokens, want)
        let cases: Vec<(&str, Value, &[String], Vec<Value>)> = vec![
            (
                "no annotations",
                json!({"metadata": {"name": "p"}}),
                &tokens,
                vec![
                    json!({"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: value}}),
                ],
            ),
            (
                "other annotations kept",
                json!({"metadata": {"annotations": {"a": "b"}}}),
                &tokens,
                vec![json!({"op": "add", "path": path, "value": value})],
            ),
            (
                "user value replaced",
                json!({"metadata": {"annotations": {ANNOTATION: "[\"forged\"]"}}}),
                &tokens,
                vec![json!({"op": "add", "path": path, "value": value})],
            ),
            (
                "user value removed when none signed",
                json!({"metadata": {"annotations": {ANNOTATION: "[\"forged\"]"}}}),
                &[],
                vec![json!({"op": "remove", "path": path})],
            ),
            ("nothing to do", json!({"metadata": {}}), &[], vec![]),
            (
                "no metadata at all",
                json!({"spec": {}}),
                &tokens,
                vec![
                    json!({"op": "add", "path": "/metadata", "value": {"annotations": {ANNOTATION: value}}}),
                ],
            ),
        ];
        for (name, pod, toks, want) in cases {
            let ops = annotation_ops(&pod, toks);
            assert_eq!(ops, want, "{name}");
            // The patch applies and leaves exactly the tokens (or nothing).
            let mut patched = pod.clone();
            json_patch_apply(&mut patched, &ops);
            let got = patched
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(ANNOTATION))
                .cloned();
            let want_value = (!toks.is_empty()).then(|| value.clone());
            assert_eq!(got, want_value, "{name}: result");
        }
    }

    /// A minimal RFC 6902 add/remove on object members, enough to check the ops above.
    fn json_patch_apply(v: &mut Value, ops: &[Value]) {
        for op in ops {
            let path = op["path"].as_str().expect("path");
            let (parent, last) = path.rsplit_once('/').expect("slash");
            let last = last.replace("~1", "/").replace("~0", "~");
            let target = if parent.is_empty() {
                &mut *v
            } else {
                v.pointer_mut(parent).expect("parent")
            };
            let obj = target.as_object_mut().expect("object");
            match op["op"].as_str() {
                Some("add") => {
                    obj.insert(last, op["value"].clone());
                }
                Some("remove") => {
                    obj.remove(&last).expect("exists");
                }
                other => panic!("op {other:?}"),
            }
        }
    }

    #[test]
    fn mirror_policy_from_the_private_grant_example() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/private-grant");
        std::fs::copy(src.join("mirror.rego"), dir.path().join("mirror.rego")).expect("copy");
        std::fs::copy(
            src.join("mirror_test.rego"),
            dir.path().join("mirror_test.rego"),
        )
        .expect("copy");
        std::fs::write(
            dir.path().join("data.json"),
            r#"{"private": {"prefixes": ["r.io/private/"]}}"#,
        )
        .expect("write");
        let policy = MirrorPolicy::load(dir.path()).expect("bundle");
        let facts = |repo: &str| ImageFacts {
            registry: "r.io".into(),
            repository: repo.into(),
            tag: None,
            digest: D1.into(),
        };
        // The twin and the bundle agree.
        let twin = PrivatePrefixes(vec!["r.io/private/".into()]);
        for (repo, want) in [("private/a", true), ("open/a", false), ("privatex", false)] {
            for (which, p) in [
                ("rego", &policy as &dyn Privacy),
                ("twin", &twin as &dyn Privacy),
            ] {
                assert_eq!(
                    p.require_grant("ns", &facts(repo)).expect(repo),
                    want,
                    "{which}: {repo}"
                );
            }
        }
        let bad = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            bad.path().join("m.rego"),
            "package speculum.mirror\ndecision := {",
        )
        .expect("write");
        assert!(
            MirrorPolicy::load(bad.path()).is_err(),
            "syntax error refused at load"
        );
        assert!(MirrorPolicy::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn config_validation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, _, _) = keygen(dir.path()).expect("keygen");
        assert!(keygen(dir.path()).is_err(), "never overwrites");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let ok = GrantsConfig {
            signing_key_file: key.clone(),
            publish_config_map: "speculum-system/grant-keys".into(),
            ..GrantsConfig::default()
        };
        assert_eq!(ok.validate(), Vec::<String>::new());
        assert_eq!(
            GrantsConfig::default().validate(),
            Vec::<String>::new(),
            "off is valid"
        );
        let bad = GrantsConfig {
            signing_key_file: dir.path().join("missing.key"),
            ttl: Duration::from_secs(25 * 3600),
            audience: " ".into(),
            mirror_policy_dir: dir.path().join("no-bundle"),
            publish_config_map: "no-slash".into(),
            check_interval: Duration::from_secs(60),
        };
        assert_eq!(bad.validate().len(), 5, "{:?}", bad.validate());
    }
}
