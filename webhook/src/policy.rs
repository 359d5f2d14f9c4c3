//! Per image decisions: pin it, skip it, or deny the object; and, for images that cannot be
//! pinned, whether to admit them anyway.
//!
//! Two implementations behind the [`Policy`] trait: [`StaticPolicy`] (skip prefixes and strict
//! namespaces from the config file) and [`RegoPolicy`] (a Rego module, `package
//! speculum.admission`, evaluated with regorus). `skipPrefixes` always apply first. Which
//! namespaces reach the webhook at all is decided earlier, by the namespace selector of the
//! MutatingWebhookConfiguration (opt-in and opt-out labels, see [`crate::certs`]).

use serde::{Deserialize, Serialize};

/// What the policy sees about one image.
#[derive(Debug, Clone, Serialize)]
pub struct Input {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub operation: String,
    /// The image as written.
    pub image: String,
    /// `registry/repository:tag` with Docker defaults applied.
    pub reference: String,
    pub registry: String,
    pub container: String,
    pub role: String,
    pub username: String,
}

/// What to do with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    Pin,
    Skip,
    Deny,
}

/// What to do when an image that should be pinned cannot be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    #[default]
    Allow,
    Deny,
}

/// A policy decision.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub action: Action,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default)]
    pub message: String,
}

impl Decision {
    pub fn pin() -> Decision {
        Decision {
            action: Action::Pin,
            on_failure: OnFailure::Allow,
            message: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("loading policy {path}: {message}")]
    Load { path: String, message: String },
    #[error("evaluating policy: {0}")]
    Eval(String),
    #[error("policy returned {0}, expected {{\"action\": \"pin\"|\"skip\"|\"deny\", ...}}")]
    Shape(String),
}

/// Decides about one image.
pub trait Policy: Send + Sync + 'static {
    fn decide(&self, input: &Input) -> Result<Decision, PolicyError>;
}

/// The policy section of the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Normalised references starting with one of these are left alone
    /// (`docker.io/library/`, `registry.k8s.io/pause`).
    pub skip_prefixes: Vec<String>,
    /// Namespaces where an image that cannot be pinned is denied.
    pub strict_namespaces: Vec<String>,
    /// A Rego file (`package speculum.admission`, rule `decision`); replaces `strictNamespaces`.
    pub rego_file: Option<std::path::PathBuf>,
}

/// Skip prefixes and strict namespaces, no Rego.
#[derive(Debug, Clone, Default)]
pub struct StaticPolicy {
    pub skip_prefixes: Vec<String>,
    pub strict_namespaces: Vec<String>,
}

fn skipped(prefixes: &[String], input: &Input) -> Option<Decision> {
    prefixes
        .iter()
        .find(|p| input.reference.starts_with(p.as_str()) || input.image.starts_with(p.as_str()))
        .map(|p| Decision {
            action: Action::Skip,
            on_failure: OnFailure::Allow,
            message: format!("skip prefix {p}"),
        })
}

impl Policy for StaticPolicy {
    fn decide(&self, input: &Input) -> Result<Decision, PolicyError> {
        if let Some(d) = skipped(&self.skip_prefixes, input) {
            return Ok(d);
        }
        let strict = self.strict_namespaces.iter().any(|n| n == &input.namespace);
        Ok(Decision {
            action: Action::Pin,
            on_failure: if strict {
                OnFailure::Deny
            } else {
                OnFailure::Allow
            },
            message: if strict {
                format!("namespace {} requires pinned images", input.namespace)
            } else {
                String::new()
            },
        })
    }
}

const RULE: &str = "data.speculum.admission.decision";

/// A Rego policy. `data.speculum.admission.decision` must be an object like
/// `{"action": "pin", "onFailure": "deny", "message": "…"}`; when it is undefined the image is
/// pinned and admitted on failure.
#[derive(Clone)]
pub struct RegoPolicy {
    skip_prefixes: Vec<String>,
    engine: regorus::Engine,
}

impl RegoPolicy {
    pub fn from_source(
        skip_prefixes: Vec<String>,
        path: &str,
        rego: &str,
    ) -> Result<RegoPolicy, PolicyError> {
        let mut engine = regorus::Engine::new();
        let package = engine
            .add_policy(path.to_owned(), rego.to_owned())
            .map_err(|e| PolicyError::Load {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if package != "data.speculum.admission" {
            return Err(PolicyError::Load {
                path: path.to_owned(),
                message: format!("package is {package}, expected speculum.admission"),
            });
        }
        // Catch a missing `decision` rule now: at admission time it would fail every request.
        let mut probe = engine.clone();
        probe
            .set_input_json("{}")
            .and_then(|_| probe.eval_rule(RULE.to_owned()))
            .map_err(|e| PolicyError::Load {
                path: path.to_owned(),
                message: format!("rule `decision` of package speculum.admission: {e}"),
            })?;
        Ok(RegoPolicy {
            skip_prefixes,
            engine,
        })
    }

    pub fn from_file(
        skip_prefixes: Vec<String>,
        path: &std::path::Path,
    ) -> Result<RegoPolicy, PolicyError> {
        let rego = std::fs::read_to_string(path).map_err(|e| PolicyError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        RegoPolicy::from_source(skip_prefixes, &path.display().to_string(), &rego)
    }
}

impl Policy for RegoPolicy {
    fn decide(&self, input: &Input) -> Result<Decision, PolicyError> {
        if let Some(d) = skipped(&self.skip_prefixes, input) {
            return Ok(d);
        }
        // eval needs `&mut`; a clone per decision is cheap (shared compiled modules).
        let mut engine = self.engine.clone();
        let json = serde_json::to_string(input).map_err(|e| PolicyError::Eval(e.to_string()))?;
        engine
            .set_input_json(&json)
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        let v = engine
            .eval_rule(RULE.to_owned())
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        if v == regorus::Value::Undefined {
            return Ok(Decision::pin());
        }
        let s = v
            .to_json_str()
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        serde_json::from_str::<Decision>(&s)
            .map_err(|_| PolicyError::Shape(s.chars().take(200).collect()))
    }
}

/// Builds the configured policy.
pub fn from_config(cfg: &PolicyConfig) -> Result<Box<dyn Policy>, PolicyError> {
    match &cfg.rego_file {
        Some(path) => Ok(Box::new(RegoPolicy::from_file(
            cfg.skip_prefixes.clone(),
            path,
        )?)),
        None => Ok(Box::new(StaticPolicy {
            skip_prefixes: cfg.skip_prefixes.clone(),
            strict_namespaces: cfg.strict_namespaces.clone(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(namespace: &str, image: &str, reference: &str) -> Input {
        Input {
            namespace: namespace.into(),
            kind: "Pod".into(),
            name: "p".into(),
            operation: "CREATE".into(),
            image: image.into(),
            reference: reference.into(),
            registry: reference.split('/').next().unwrap_or_default().into(),
            container: "app".into(),
            role: "container".into(),
            username: "alice".into(),
        }
    }

    const REGO: &str = r#"
package speculum.admission

default decision := {"action": "pin"}

decision := {"action": "pin", "onFailure": "deny", "message": "strict namespace"} if {
    startswith(input.namespace, "prod-")
}

decision := {"action": "deny", "message": "images from untrusted.io are not allowed"} if {
    input.registry == "untrusted.io"
}

decision := {"action": "skip"} if {
    input.namespace == "kube-system"
}
"#;

    #[test]
    fn rego_and_static_agree_on_shape() {
        let rego = RegoPolicy::from_source(vec!["r.io/skipped/".into()], "test.rego", REGO)
            .expect("policy");
        let st = StaticPolicy {
            skip_prefixes: vec!["r.io/skipped/".into()],
            strict_namespaces: vec!["prod-a".into()],
        };
        let cases = [
            (
                "default",
                input("dev", "r.io/a:1", "r.io/a:1"),
                Action::Pin,
                OnFailure::Allow,
            ),
            (
                "strict",
                input("prod-a", "r.io/a:1", "r.io/a:1"),
                Action::Pin,
                OnFailure::Deny,
            ),
            (
                "skip prefix",
                input("prod-a", "r.io/skipped/a:1", "r.io/skipped/a:1"),
                Action::Skip,
                OnFailure::Allow,
            ),
        ];
        for (name, inp, action, on_failure) in cases {
            for (which, p) in [
                ("rego", &rego as &dyn Policy),
                ("static", &st as &dyn Policy),
            ] {
                let d = p.decide(&inp).expect(name);
                assert_eq!(
                    (d.action, d.on_failure),
                    (action, on_failure),
                    "{which}: {name}"
                );
            }
        }
        let d = rego
            .decide(&input("dev", "untrusted.io/x:1", "untrusted.io/x:1"))
            .expect("deny");
        assert_eq!(d.action, Action::Deny);
        assert!(d.message.contains("untrusted"));
        assert_eq!(
            rego.decide(&input("kube-system", "r.io/a:1", "r.io/a:1"))
                .expect("skip")
                .action,
            Action::Skip
        );
    }

    #[test]
    fn rego_errors() {
        let cases = [
            ("syntax", "package speculum.admission\ndecision := {"),
            (
                "wrong package",
                "package other\ndecision := {\"action\": \"pin\"}",
            ),
        ];
        for (name, src) in cases {
            assert!(
                RegoPolicy::from_source(vec![], name, src).is_err(),
                "{name}"
            );
        }
        let bad_shape = RegoPolicy::from_source(
            vec![],
            "t",
            "package speculum.admission\ndecision := \"pin\"",
        )
        .expect("loads");
        assert!(matches!(
            bad_shape.decide(&input("a", "r.io/a:1", "r.io/a:1")),
            Err(PolicyError::Shape(_))
        ));
        assert!(
            RegoPolicy::from_source(vec![], "t", "package speculum.admission\nx := 1").is_err(),
            "no decision rule"
        );
        let undefined = RegoPolicy::from_source(
            vec![],
            "t",
            "package speculum.admission\ndecision := {\"action\": \"skip\"} if { input.namespace == \"x\" }",
        )
        .expect("loads");
        assert_eq!(
            undefined
                .decide(&input("a", "r.io/a:1", "r.io/a:1"))
                .expect("pin"),
            Decision::pin()
        );
    }
}
