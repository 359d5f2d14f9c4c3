//! The `Policy` seam: one decision per served object and per advertised image — may this be
//! served peer to peer, and may this tag be resolved by the cluster?
//!
//! The decision document (input and output) is written down in `docs/policy.md`; the types
//! below are that document. Two implementations: [`rego::RegoPolicy`] (regorus, Rego v1, an OPA
//! bundle directory) and [`memory::StaticPolicy`] (the twin for tests and the built-in default).
//! [`conformance`] holds the decision table both must pass.
//!
//! [`Gate`] is what the registry and the advertiser hold: the active policy (swapped whole on a
//! hot reload), the global `resolve_tags` / `resolve_latest_tag` switches, and the one rule of
//! this module — **fail closed for P2P, never for the pull**: an error, a timeout or an
//! undefined result becomes "deny" (the caller answers 404 and containerd goes upstream), logged
//! and counted. Loading bundles from disk and watching them is [`reload`]'s job.

pub mod conformance;
pub mod memory;
pub mod rego;
pub mod reload;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

pub use memory::StaticPolicy;
pub use rego::RegoPolicy;

/// The tag containerd sends when a reference names none (`docker pull x` means `x:latest`).
pub(crate) const LATEST: &str = "latest";

/// What is being decided. Serialised as the policy's `input` (see `docs/policy.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Input {
    pub request: RequestInput,
    pub image: ImageInput,
    pub node: NodeInput,
    /// Namespaces of pods on this node waiting for the image (filled by the tenancy issue;
    /// empty until then).
    pub namespaces: Vec<String>,
    /// The other daemon involved: the requester on the peer endpoint; `null` otherwise.
    pub peer: Option<PeerInput>,
    /// For an object the policy marked `require_grant`: the grant that passed every check
    /// (`{namespace, pod, repository, digest, expires}`, see `docs/tenancy.md`); `null`
    /// otherwise. The policy is asked again with it filled in.
    pub grant: Option<serde_json::Value>,
}

/// `input.request`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestInput {
    /// `serve` (a request is being answered) or `advertise` (may this node announce it?).
    pub action: Action,
    /// `manifest` or `blob`.
    pub kind: String,
    /// `GET` or `HEAD` (empty for `advertise`).
    pub method: String,
    /// `local` (this node's containerd) or `peer` (another daemon).
    pub source: Source,
    /// The tag or digest as requested.
    pub reference: String,
    /// True when `reference` is a tag (the cluster would resolve it).
    pub is_tag: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Serve,
    Advertise,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Local,
    Peer,
}

/// `input.image`: registry and repository always; tag and digest when known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageInput {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

/// `input.node`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeInput {
    pub name: String,
}

/// `input.peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerInput {
    /// libp2p peer id, when known.
    pub id: Option<String>,
    /// The socket address the request came from.
    pub addr: Option<String>,
    /// The node the requesting daemon proved it runs on (peer authentication), when on.
    pub node: Option<String>,
}

/// The policy's answer (`data.speculum.mirror.decision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// May this be served (or advertised) peer to peer / from this node's store?
    pub allow: bool,
    /// Why; lands in the audit log and, bounded, in a metric label.
    #[serde(default)]
    pub reason: String,
    /// May the cluster resolve this tag? (Ignored for digests.)
    #[serde(default = "yes")]
    pub resolve_tag: bool,
    /// The image is private: serving needs a grant (the tenancy issue acts on it; until then
    /// a policy that sets it should also deny).
    #[serde(default)]
    pub require_grant: bool,
    /// How this tag is resolved on the mirror endpoint; absent: `mirror.tag_resolution`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_resolution: Option<TagResolution>,
}

/// Who decides which digest a tag names (`mirror.tag_resolution`, or the policy's
/// `tag_resolution` per image; `docs/policy.md`, "Tag resolution").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagResolution {
    /// One anonymous `HEAD` upstream first; the cluster answers only when upstream cannot
    /// (unreachable, timeout, 429, 5xx) or will not tell anonymous clients (401/403).
    #[default]
    UpstreamFirst,
    /// The cluster answers from the tags its nodes hold (Spegel's behaviour): fast and
    /// upstream-independent, but a tag moved upstream keeps its old digest in the cluster.
    ClusterFirst,
}

impl TagResolution {
    pub fn as_str(self) -> &'static str {
        match self {
            TagResolution::UpstreamFirst => "upstream-first",
            TagResolution::ClusterFirst => "cluster-first",
        }
    }
}

fn yes() -> bool {
    true
}

impl Decision {
    pub fn allow(reason: impl Into<String>) -> Decision {
        Decision {
            allow: true,
            reason: reason.into(),
            resolve_tag: true,
            require_grant: false,
            tag_resolution: None,
        }
    }

    pub fn deny(reason: impl Into<String>) -> Decision {
        Decision {
            allow: false,
            reason: reason.into(),
            resolve_tag: false,
            require_grant: false,
            tag_resolution: None,
        }
    }
}

/// Errors of the policy seam. Every one of them means "not from peers" to a caller.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading bundle {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {path}: {message}")]
    Load { path: String, message: String },
    #[error("bundle has no rego files: {0}")]
    Empty(String),
    #[error("policy tests failed: {0}")]
    TestsFailed(String),
    #[error("evaluation failed: {0}")]
    Eval(String),
    #[error("evaluation exceeded its time limit")]
    Timeout,
    #[error("decision is undefined (declare defaults in the policy)")]
    Undefined,
    #[error("decision has the wrong shape: {0}")]
    Output(String),
}

impl PolicyError {
    /// The `kind` label of `speculum_policy_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::Timeout => "timeout",
            PolicyError::Undefined => "undefined",
            PolicyError::Output(_) => "output",
            PolicyError::Eval(_) => "error",
            _ => "load",
        }
    }
}

/// A decision maker. Evaluation is synchronous and short (microseconds); implementations bound
/// their own run time.
pub trait Policy: Send + Sync {
    fn decide(&self, input: &Input) -> Result<Decision, PolicyError>;
    /// What is active, for logs and readiness (`bundle default@rev` or `static`).
    fn describe(&self) -> String;
}

/// Settings of the policy engine and the tag switches (`policy:` config section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// A bundle directory (`*.rego`, optional `data.json`/`data.yaml`, optional `.manifest`).
    /// Empty: the built-in policy (allow every image, resolve tags), Spegel's behaviour.
    pub bundle: String,
    /// `false`: the cluster never resolves tags (`configure` writes `capabilities = ["pull"]`
    /// and tag manifest requests get 404).
    pub resolve_tags: bool,
    /// `false`: `latest` is never resolved by the cluster (nor advertised); other tags are.
    pub resolve_latest_tag: bool,
    /// Time limit of one evaluation; past it the decision is "not from peers".
    #[serde(with = "humantime_serde")]
    pub eval_timeout: Duration,
    /// How often the bundle directory is checked for changes (a ConfigMap update is a symlink
    /// swap, which file-change events do not report reliably; polling does).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            bundle: String::new(),
            resolve_tags: true,
            resolve_latest_tag: true,
            eval_timeout: Duration::from_millis(50),
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.eval_timeout.is_zero() || self.eval_timeout > Duration::from_secs(1) {
            errors.push("policy.eval_timeout must be between 1ns and 1s".to_owned());
        }
        if self.reload_interval < Duration::from_millis(100) {
            errors.push("policy.reload_interval must be at least 100ms".to_owned());
        }
        errors
    }

    pub fn switches(&self) -> Switches {
        Switches {
            resolve_tags: self.resolve_tags,
            resolve_latest_tag: self.resolve_latest_tag,
        }
    }
}

/// The global tag switches (config/flags/env), applied before the policy's own `resolve_tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    pub resolve_tags: bool,
    pub resolve_latest_tag: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            resolve_tags: true,
            resolve_latest_tag: true,
        }
    }
}

impl Switches {
    /// May the cluster resolve `tag` at all?
    pub fn tag_allowed(&self, tag: &str) -> bool {
        self.resolve_tags && (self.resolve_latest_tag || tag != LATEST)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    action: &'static str,
    decision: &'static str,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// The policy metrics, registered into the daemon's registry by `Metrics::new`.
#[derive(Clone)]
pub struct PolicyMetrics {
    decisions: Family<DecisionLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    duration: Histogram,
    reloads: Family<ReloadLabels, Counter>,
}

impl PolicyMetrics {
    pub fn register(registry: &mut Registry) -> PolicyMetrics {
        let m = PolicyMetrics {
            decisions: Family::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.000_001, 2.0, 20)),
            reloads: Family::default(),
        };
        registry.register(
            "policy_decisions",
            "Policy decisions by action (serve, advertise), decision (allow, deny) and reason",
            m.decisions.clone(),
        );
        registry.register(
            "policy_errors",
            "Evaluations that failed closed, by kind (error, timeout, undefined, output)",
            m.errors.clone(),
        );
        registry.register(
            "policy_evaluation_duration_seconds",
            "Time of one policy evaluation",
            m.duration.clone(),
        );
        registry.register(
            "policy_reloads",
            "Bundle reloads by result (ok, rejected)",
            m.reloads.clone(),
        );
        m
    }

    /// A set of metrics registered nowhere (for tools and tests that need a `Gate`).
    pub fn unregistered() -> PolicyMetrics {
        PolicyMetrics::register(&mut Registry::default())
    }

    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}

/// Reasons become label values: bound their length and alphabet so a bundle cannot blow up
/// the series count with per-request text.
fn reason_label(reason: &str) -> String {
    reason
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == ' ' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The active policy plus the switches, shared by the registry listeners and the advertiser.
/// Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    // A std RwLock: held only to clone an `Arc`, never across an `.await`.
    current: Arc<RwLock<Arc<dyn Policy>>>,
    switches: Switches,
    metrics: PolicyMetrics,
}

/// What may be announced of one image ([`Gate::advert`], read by `src/advertise.rs`): its
/// content (every digest of its closure) and its tag key. A tag the cluster must not resolve
/// (`resolveLatestTag=false`, say) is not announced, while its content still is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advert {
    pub content: bool,
    pub tag: bool,
}

impl Gate {
    pub fn new(policy: Arc<dyn Policy>, switches: Switches, metrics: PolicyMetrics) -> Gate {
        Gate {
            current: Arc::new(RwLock::new(policy)),
            switches,
            metrics,
        }
    }

    /// Allow everything, resolve every tag: what the daemon did before policies existed.
    pub fn allow_all() -> Gate {
        Gate::new(
            Arc::new(StaticPolicy::default()),
            Switches::default(),
            PolicyMetrics::unregistered(),
        )
    }

    pub fn switches(&self) -> Switches {
        self.switches
    }

    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// Replaces the active policy (a reload that passed its tests).
    pub fn swap(&self, policy: Arc<dyn Policy>) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = policy;
    }

    pub fn active(&self) -> Arc<dyn Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Decides, failing closed: any error is a deny with the error as reason. Tag switches are
    /// applied on top: a tag the switches or the policy will not resolve gets
    /// `resolve_tag = false`. Counted and timed.
    pub fn decide(&self, input: &Input) -> Decision {
        let started = Instant::now();
        let result = self.active().decide(input);
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let mut decision = match result {
            Ok(d) => d,
            Err(e) => {
                self.metrics
                    .errors
                    .get_or_create(&KindLabels { kind: e.kind() })
                    .inc();
                tracing::warn!(
                    error = %e,
                    registry = %input.image.registry,
                    reference = %input.request.reference,
                    "policy evaluation failed; not serving from peers"
                );
                Decision::deny(format!("policy-{}", e.kind()))
            }
        };
        if let Some(tag) = &input.image.tag
            && !self.switches.tag_allowed(tag)
        {
            decision.resolve_tag = false;
            if input.request.is_tag && decision.allow {
                decision.reason = if self.switches.resolve_tags {
                    "resolveLatestTag=false".to_owned()
                } else {
                    "resolveTags=false".to_owned()
                };
            }
        }
        let action = match input.request.action {
            Action::Serve => "serve",
            Action::Advertise => "advertise",
        };
        let verdict = if decision.allow && (!input.request.is_tag || decision.resolve_tag) {
            "allow"
        } else {
            "deny"
        };
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                action,
                decision: verdict,
                reason: reason_label(&decision.reason),
            })
            .inc();
        decision
    }

    /// What of `image` this node may advertise: its content when the policy allows serving it
    /// to peers, its tag key when, in addition, the switches and the policy let the cluster
    /// resolve that tag (what may not be served is not advertised). A `require_grant` object
    /// is advertised even when the policy denies it without a grant: serving it checks the
    /// grant, and a private image nobody may find could never travel peer to peer.
    pub fn advert(&self, image: &crate::store::Image, node: &str) -> Advert {
        let input = Input {
            request: RequestInput {
                action: Action::Advertise,
                kind: "manifest".to_owned(),
                method: String::new(),
                source: Source::Peer,
                reference: image
                    .tag
                    .clone()
                    .unwrap_or_else(|| image.digest.to_string()),
                is_tag: image.tag.is_some(),
            },
            image: ImageInput {
                registry: image.registry.clone(),
                repository: image.repository.clone(),
                tag: image.tag.clone(),
                digest: Some(image.digest.to_string()),
            },
            node: NodeInput {
                name: node.to_owned(),
            },
            ..Input::default()
        };
        let d = self.decide(&input);
        let content = d.allow || d.require_grant;
        Advert {
            content,
            tag: content && d.resolve_tag,
        }
    }

    /// May the object of `input` be served? (`allow`, and for a tag also `resolve_tag`.)
    pub fn permits(decision: &Decision, input: &Input) -> bool {
        decision.allow && (!input.request.is_tag || decision.resolve_tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_objects_are_advertised_and_denied_ones_are_not() {
        let image = crate::store::Image {
            registry: "ghcr.io".into(),
            repository: "acme/app".into(),
            tag: Some("v1".into()),
            digest: crate::oci::Digest::sha256_of(b"m"),
        };
        let switches = Switches {
            resolve_tags: true,
            resolve_latest_tag: true,
        };
        let private = Decision {
            allow: false,
            reason: "private: no grant".into(),
            resolve_tag: true,
            require_grant: true,
            tag_resolution: None,
        };
        let cases = [
            ("private", private, true, true),
            ("denied", Decision::deny("no"), false, false),
            ("public", Decision::allow("yes"), true, true),
        ];
        for (name, decision, content, tag) in cases {
            let gate = Gate::new(
                Arc::new(StaticPolicy::fixed(decision)),
                switches,
                PolicyMetrics::unregistered(),
            );
            let advert = gate.advert(&image, "n1");
            assert_eq!((advert.content, advert.tag), (content, tag), "{name}");
        }
    }

    #[test]
    fn switch_table() {
        let cases = [
            ("all on, v1", true, true, "v1", true),
            ("all on, latest", true, true, "latest", true),
            ("no latest, v1", true, false, "v1", true),
            ("no latest, latest", true, false, "latest", false),
            ("no tags, v1", false, true, "v1", false),
            ("no tags, latest", false, true, "latest", false),
        ];
        for (name, resolve_tags, resolve_latest_tag, tag, want) in cases {
            let s = Switches {
                resolve_tags,
                resolve_latest_tag,
            };
            assert_eq!(s.tag_allowed(tag), want, "{name}");
        }
    }

    #[test]
    fn errors_fail_closed_and_switches_restrict_tags() {
        let failing = Gate::new(
            Arc::new(StaticPolicy::failing()),
            Switches::default(),
            PolicyMetrics::unregistered(),
        );
        let input = conformance::input("127.0.0.1:5000", "rig/x", Some("v1"), None);
        let d = failing.decide(&input);
        assert!(!d.allow, "an evaluation error must deny");
        assert_eq!(d.reason, "policy-error");

        let no_latest = Gate::new(
            Arc::new(StaticPolicy::default()),
            Switches {
                resolve_tags: true,
                resolve_latest_tag: false,
            },
            PolicyMetrics::unregistered(),
        );
        let latest = conformance::input("127.0.0.1:5000", "rig/x", Some("latest"), None);
        assert!(!Gate::permits(&no_latest.decide(&latest), &latest));
        assert!(Gate::permits(&no_latest.decide(&input), &input));
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table of cases
    fn advert_table() {
        let digest: crate::oci::Digest =
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                .parse()
                .expect("digest");
        let image = |tag: Option<&str>| crate::store::Image {
            registry: "127.0.0.1:5000".to_owned(),
            repository: "rig/x".to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.clone(),
        };
        let no_latest = Switches {
            resolve_tags: true,
            resolve_latest_tag: false,
        };
        let deny = Arc::new(StaticPolicy::deny_all("private"));
        // (name, policy, switches, tag, want content, want tag)
        let cases: Vec<(&str, Arc<dyn Policy>, Switches, Option<&str>, bool, bool)> = vec![
            (
                "default",
                Arc::new(StaticPolicy::default()),
                Switches::default(),
                Some("v1"),
                true,
                true,
            ),
            (
                "latest off: v1",
                Arc::new(StaticPolicy::default()),
                no_latest,
                Some("v1"),
                true,
                true,
            ),
            (
                "latest off: latest",
                Arc::new(StaticPolicy::default()),
                no_latest,
                Some("latest"),
                true,
                false,
            ),
            (
                "digest-only image",
                Arc::new(StaticPolicy::default()),
                no_latest,
                None,
                true,
                true, // no tag key exists to advertise anyway
            ),
            (
                "denied",
                deny,
                Switches::default(),
                Some("v1"),
                false,
                false,
            ),
            (
                "failing",
                Arc::new(StaticPolicy::failing()),
                Switches::default(),
                Some("v1"),
                false,
                false,
            ),
        ];
        for (name, policy, switches, tag, content, tag_key) in cases {
            let gate = Gate::new(policy, switches, PolicyMetrics::unregistered());
            let a = gate.advert(&image(tag), "n1");
            assert_eq!((a.content, a.tag), (content, tag_key), "{name}");
        }
    }

    #[test]
    fn reason_labels_are_bounded() {
        let long = "x".repeat(500) + "\n{}\"";
        let l = reason_label(&long);
        assert!(l.len() <= 48);
        assert!(
            l.chars()
                .all(|c| c.is_ascii_alphanumeric() || " -_".contains(c))
        );
    }
}
