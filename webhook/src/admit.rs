//! One admission, start to end: envelope → sites → policy → credentials → resolution → patch →
//! response, with an audit line per image.
//!
//! [`Admitter::pin_object`] is shared with the offline `pin` command; [`Admitter::review`] adds
//! the AdmissionReview envelope and the failure policy around it. Nothing here knows about
//! HTTP: the server passes bytes in and gets a status and JSON back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{AuditLine, AuditSink};
use crate::credentials::{CredentialSource, Keychain, keychain_for, pod_credentials_refs};
use crate::grants::{self, Candidate, Evidence, Granter, ImageFacts};
use crate::metrics::Metrics;
use crate::mutate::{self, PatchOp, Prior, Site};
use crate::policy::{self, Action, OnFailure, Policy};
use crate::resolve::{ImageRef, Resolution, ResolveError, Resolver, Source};
use crate::review::{self, Operation, Response};

/// What the API server does when the webhook fails; also how the webhook treats its own
/// internal errors (`Ignore` admits unchanged, `Fail` denies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum FailurePolicy {
    #[default]
    Ignore,
    Fail,
}

/// Who is asking about which object.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub uid: String,
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub operation: String,
    pub username: String,
    pub dry_run: bool,
}

/// The result of pinning one object.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub ops: Vec<PatchOp>,
    /// JSON Patch operations on the pull-grant annotation (Pod CREATE with grants on).
    pub grant_ops: Vec<Value>,
    /// Denial messages; non-empty means the object must be refused.
    pub denials: Vec<String>,
    pub warnings: Vec<String>,
    /// One line per image site.
    pub lines: Vec<AuditLine>,
}

/// Turns reviews into responses. One per process, shared by all requests.
pub struct Admitter {
    pub resolver: Arc<Resolver>,
    pub policy: Arc<dyn Policy>,
    /// `None` in offline mode, where [`Admitter::offline_keychain`] is used instead.
    pub credentials: Option<Arc<dyn CredentialSource>>,
    pub offline_keychain: Keychain,
    pub audit: Arc<dyn AuditSink>,
    pub metrics: Arc<Metrics>,
    /// Pull grants for private images of new Pods; `None` when off.
    pub grants: Option<Arc<Granter>>,
    pub failure_policy: FailurePolicy,
    /// Bound on one whole admission; keep it below the webhook's `timeoutSeconds`.
    pub deadline: Duration,
}

impl Admitter {
    /// Answers one AdmissionReview body. Returns the HTTP status and the JSON body; 400 only
    /// when the body has no usable `request.uid` to answer with.
    pub async fn review(&self, body: &[u8]) -> (u16, Value) {
        let started = tokio::time::Instant::now();
        let req = match review::decode(body) {
            Ok(r) => r,
            Err((e, Some(uid))) => {
                self.metrics.admission("", "bad_request", started.elapsed());
                let resp = self.on_error(&uid, 400, format!("bad AdmissionReview: {e}"));
                return (200, resp.into_review());
            }
            Err((e, None)) => {
                self.metrics.admission("", "bad_request", started.elapsed());
                return (
                    400,
                    serde_json::json!({"error": format!("bad AdmissionReview: {e}")}),
                );
            }
        };
        let kind = req.kind.kind.clone();
        let Some(object) = req
            .object
            .as_ref()
            .filter(|_| matches!(req.operation, Operation::Create | Operation::Update))
        else {
            self.metrics.admission(&kind, "ignored", started.elapsed());
            return (200, Response::allow(&req.uid).into_review());
        };
        if mutate::pod_spec_pointer(&kind).is_none() {
            self.metrics.admission(&kind, "ignored", started.elapsed());
            return (200, Response::allow(&req.uid).into_review());
        }
        let ctx = Context {
            uid: req.uid.clone(),
            namespace: req.namespace.clone(),
            kind: kind.clone(),
            name: req.display_name(),
            operation: req.operation.as_str().to_owned(),
            username: req.username.clone(),
            dry_run: req.dry_run,
        };
        let old = if req.operation == Operation::Update {
            req.old_object.as_ref()
        } else {
            None
        };
        let outcome =
            match tokio::time::timeout(self.deadline, self.pin_object(&ctx, object, old)).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => {
                    self.metrics.admission(&kind, "error", started.elapsed());
                    return (
                        200,
                        self.on_error(&req.uid, 400, format!("cannot read {kind}: {e}"))
                            .into_review(),
                    );
                }
                Err(_) => {
                    self.metrics.admission(&kind, "timeout", started.elapsed());
                    let msg = format!("image pinning took longer than {:?}", self.deadline);
                    return (200, self.on_error(&req.uid, 504, msg).into_review());
                }
            };
        for line in &outcome.lines {
            if line.decision != GRANTED {
                self.metrics.image(&line.decision);
            }
            tracing::info!(
                target: "speculum_webhook::decision",
                namespace = %line.namespace, kind = %line.kind, name = %line.name,
                reference = %line.before, decision = %line.decision, source = line.source.as_deref().unwrap_or(""),
            );
            self.audit.record(line.clone());
        }
        let resp = if outcome.denials.is_empty() {
            let mut patch: Vec<Value> = outcome
                .ops
                .iter()
                .filter_map(|o| serde_json::to_value(o).ok())
                .collect();
            patch.extend(outcome.grant_ops.iter().cloned());
            let mut r = Response::allow(&req.uid).with_json_patch(&patch);
            r.warnings = outcome.warnings.clone();
            r.audit_annotations = annotations(&outcome);
            self.metrics.admission(
                &kind,
                if patch.is_empty() {
                    "unchanged"
                } else {
                    "patched"
                },
                started.elapsed(),
            );
            r
        } else {
            self.metrics.admission(&kind, "denied", started.elapsed());
            let mut r = Response::deny(&req.uid, 403, outcome.denials.join("; "));
            r.warnings = outcome.warnings.clone();
            r
        };
        (200, resp.into_review())
    }

    fn on_error(&self, uid: &str, code: u16, message: String) -> Response {
        tracing::warn!(uid, message = %message, "admission error");
        match self.failure_policy {
            FailurePolicy::Ignore => {
                let mut r = Response::allow(uid);
                r.warnings
                    .push(format!("speculum-webhook did not pin images: {message}"));
                r
            }
            FailurePolicy::Fail => Response::deny(uid, code, message),
        }
    }

    /// Pins the images of one object. `old` is the previous object on UPDATE.
    pub async fn pin_object(
        &self,
        ctx: &Context,
        object: &Value,
        old: Option<&Value>,
    ) -> Result<Outcome, mutate::MutateError> {
        let sites = mutate::plan(&ctx.kind, object, old)?;
        let mut out = Outcome::default();

        // Policy first: it may skip or deny without any network traffic.
        let mut wanted: Vec<(usize, policy::Decision)> = Vec::new();
        let mut decided: HashMap<usize, (String, String)> = HashMap::new(); // site → (decision, reason)
        for (i, site) in sites.iter().enumerate() {
            if !site.wants_resolution() {
                continue;
            }
            let parsed = ImageRef::parse(&site.image);
            let (reference, registry) = match &parsed {
                Ok(r) => (r.normalized(), r.registry().to_owned()),
                Err(_) => (site.image.clone(), String::new()),
            };
            let input = policy::Input {
                namespace: ctx.namespace.clone(),
                kind: ctx.kind.clone(),
                name: ctx.name.clone(),
                operation: ctx.operation.clone(),
                image: site.image.clone(),
                reference,
                registry,
                container: site.name.clone(),
                role: site.role.as_str().to_owned(),
                username: ctx.username.clone(),
            };
            let decision = match self.policy.decide(&input) {
                Ok(d) => d,
                Err(e) => {
                    let msg = format!("policy error for {}: {e}", site.image);
                    match self.failure_policy {
                        FailurePolicy::Fail => out.denials.push(msg.clone()),
                        FailurePolicy::Ignore => out.warnings.push(msg.clone()),
                    }
                    decided.insert(i, ("unresolved".into(), msg));
                    continue;
                }
            };
            match decision.action {
                Action::Skip => {
                    decided.insert(i, ("skipped".into(), decision.message.clone()));
                }
                Action::Deny => {
                    let msg = if decision.message.is_empty() {
                        format!("image {} denied by policy", site.image)
                    } else {
                        format!("image {}: {}", site.image, decision.message)
                    };
                    out.denials.push(msg.clone());
                    decided.insert(i, ("denied".into(), msg));
                }
                Action::Pin => wanted.push((i, decision)),
            }
        }

        // Pull grants: only Pod CREATE, only when configured. Images already pinned are checked
        // with the pod's credentials too (Pods of a pinned Deployment arrive that way).
        let granter = self
            .grants
            .as_ref()
            .filter(|_| ctx.kind == "Pod" && ctx.operation == "CREATE");
        let pinned_sites: Vec<usize> = match granter {
            Some(_) => (0..sites.len()).filter(|i| sites[*i].is_pinned()).collect(),
            None => Vec::new(),
        };

        // Credentials only when something will be resolved or checked.
        let keychain = if wanted.is_empty() && pinned_sites.is_empty() {
            Keychain::default()
        } else {
            self.keychain(ctx, &ctx.kind, object, &mut out.warnings)
                .await
        };

        // Resolve each distinct image once, concurrently.
        let mut distinct: Vec<String> = wanted
            .iter()
            .map(|(i, _)| sites[*i].image.clone())
            .collect();
        distinct.sort();
        distinct.dedup();
        let results = futures::future::join_all(
            distinct
                .iter()
                .map(|img| self.resolver.resolve(img, &keychain)),
        )
        .await;
        let resolved: HashMap<String, Result<Resolution, ResolveError>> =
            distinct.into_iter().zip(results).collect();

        let mut digests: HashMap<usize, (String, Source)> = HashMap::new();
        for (i, decision) in &wanted {
            let site = &sites[*i];
            match resolved.get(&site.image) {
                Some(Ok(r)) => {
                    if r.source == Source::Cluster {
                        out.warnings.push(format!(
                            "{} was pinned to {} by the cluster's speculum daemons: its registry was unreachable",
                            site.image, r.digest
                        ));
                    }
                    digests.insert(*i, (r.digest.clone(), r.source));
                }
                Some(Err(e)) => {
                    let msg = format!("cannot pin {}: {e}", site.image);
                    if decision.on_failure == OnFailure::Deny {
                        let why = if decision.message.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", decision.message)
                        };
                        out.denials.push(format!("{msg}{why}"));
                        decided.insert(*i, ("denied".into(), msg));
                    } else {
                        out.warnings.push(msg.clone());
                        decided.insert(*i, ("unresolved".into(), msg));
                    }
                }
                None => {}
            }
        }

        if let Some(granter) = granter {
            let mut candidates = Vec::new();
            for (i, (digest, _)) in &digests {
                let site = &sites[*i];
                let credential = resolved
                    .get(&site.image)
                    .and_then(|r| r.as_ref().ok())
                    .and_then(|r| r.credential.clone());
                if let Some(c) = candidate(site, Some(digest), credential) {
                    candidates.push(c);
                }
            }
            for i in &pinned_sites {
                let site = &sites[*i];
                let Some(c) = candidate(site, None, None) else {
                    continue;
                };
                // Only private images are worth a registry round trip.
                if !matches!(
                    granter.privacy.require_grant(&ctx.namespace, &c.facts),
                    Ok(true)
                ) {
                    candidates.push(c);
                    continue;
                }
                let credential = match self.resolver.check_access(&site.image, &keychain).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::debug!(reference = %site.image, error = %e, "access check for a grant failed");
                        None
                    }
                };
                candidates.extend(candidate(site, None, credential));
            }
            // Deterministic order (digests is a HashMap): by site pointer.
            candidates.sort_by(|a, b| a.container.cmp(&b.container).then(a.image.cmp(&b.image)));
            let signed = granter.grant(&ctx.kind, &ctx.operation, &ctx.namespace, &candidates);
            let tokens: Vec<String> = signed.iter().map(|(_, s)| s.token.clone()).collect();
            out.grant_ops = grants::annotation_ops(object, &tokens);
            for (i, s) in &signed {
                let c = &candidates[*i];
                out.lines.push(AuditLine {
                    uid: ctx.uid.clone(),
                    namespace: ctx.namespace.clone(),
                    kind: ctx.kind.clone(),
                    name: ctx.name.clone(),
                    operation: ctx.operation.clone(),
                    container: c.container.clone(),
                    role: String::new(),
                    path: format!(
                        "/metadata/annotations/{}",
                        speculum_grant::ANNOTATION.replace('/', "~1")
                    ),
                    before: c.image.clone(),
                    after: None,
                    digest: Some(s.digest.clone()),
                    source: None,
                    decision: GRANTED.into(),
                    reason: format!("repo={} kid={} jti={} exp={}", s.repo, s.kid, s.jti, s.exp),
                    dry_run: ctx.dry_run,
                });
            }
        }

        let by_pointer: HashMap<&str, usize> = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.pointer.as_str(), i))
            .collect();
        out.ops = mutate::patch(&sites, |s: &Site| {
            by_pointer
                .get(s.pointer.as_str())
                .and_then(|i| digests.get(i))
                .map(|(d, _)| d.as_str())
        });
        for (i, site) in sites.iter().enumerate() {
            let op = out.ops.iter().find(|o| o.path == site.pointer);
            let (decision, reason, digest, source) = match (&site.prior, op, decided.get(&i)) {
                (_, _, Some((d, r))) => (d.clone(), r.clone(), None, None),
                (Prior::PinnedBefore(d), Some(_), _) => (
                    "pinned".into(),
                    String::new(),
                    Some(d.clone()),
                    Some(Source::Previous),
                ),
                (_, Some(_), _) => {
                    let (d, s) = digests
                        .get(&i)
                        .cloned()
                        .map_or((None, None), |(d, s)| (Some(d), Some(s)));
                    ("pinned".into(), String::new(), d, s)
                }
                (Prior::Unchanged, None, _) => {
                    ("kept".into(), "unchanged on update".into(), None, None)
                }
                (_, None, _) => ("kept".into(), "already pinned".into(), None, None),
            };
            out.lines.push(AuditLine {
                uid: ctx.uid.clone(),
                namespace: ctx.namespace.clone(),
                kind: ctx.kind.clone(),
                name: ctx.name.clone(),
                operation: ctx.operation.clone(),
                container: site.name.clone(),
                role: site.role.as_str().to_owned(),
                path: site.pointer.clone(),
                before: site.image.clone(),
                after: op.map(|o| o.value.clone()),
                digest,
                source: source.map(|s| s.as_str().to_owned()),
                decision,
                reason,
                dry_run: ctx.dry_run,
            });
        }
        Ok(out)
    }

    async fn keychain(
        &self,
        ctx: &Context,
        kind: &str,
        object: &Value,
        warnings: &mut Vec<String>,
    ) -> Keychain {
        let Some(source) = &self.credentials else {
            return self.offline_keychain.clone();
        };
        let spec = mutate::pod_spec_pointer(kind)
            .and_then(|p| object.pointer(p))
            .cloned()
            .unwrap_or(Value::Null);
        let (secrets, sa) = pod_credentials_refs(&spec);
        match keychain_for(source.as_ref(), &ctx.namespace, &secrets, sa.as_deref()).await {
            Ok(k) => {
                warnings.extend(k.problems.iter().map(|p| format!("pull secrets: {p}")));
                k
            }
            Err(e) => {
                warnings.push(format!(
                    "could not read pull secrets, resolving anonymously: {e}"
                ));
                Keychain::default()
            }
        }
    }
}

/// The audit decision of a signed pull grant (one line per grant; the token is never logged).
pub const GRANTED: &str = "granted";

/// A grant candidate for `site`: its digest (`digest`, or the one it is pinned to) and the
/// credential evidence. `None` when the reference does not parse or has no digest.
fn candidate(site: &Site, digest: Option<&str>, credential: Option<String>) -> Option<Candidate> {
    let r = ImageRef::parse(&site.image).ok()?;
    let digest = digest.or(r.digest())?.to_owned();
    Some(Candidate {
        image: site.image.clone(),
        container: site.name.clone(),
        facts: ImageFacts {
            registry: r.registry().to_owned(),
            repository: r.repository().to_owned(),
            tag: r.written_tag().map(str::to_owned),
            digest,
        },
        evidence: credential.map_or(Evidence::Unauthenticated, Evidence::Credential),
    })
}

/// Audit annotations: which source pinned what (the API server prefixes the webhook name).
fn annotations(o: &Outcome) -> BTreeMap<String, String> {
    let pinned: Vec<Value> = o
        .lines
        .iter()
        .filter(|l| l.decision == "pinned")
        .map(|l| serde_json::json!({"path": l.path, "image": l.after, "source": l.source}))
        .collect();
    let mut m = BTreeMap::new();
    if !pinned.is_empty() {
        m.insert("pinned-images".to_owned(), Value::Array(pinned).to_string());
    }
    m
}
