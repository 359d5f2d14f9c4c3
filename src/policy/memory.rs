//! `StaticPolicy`: the in-process twin of the Rego engine. Its default is the shipped default
//! bundle (`policies/default`) written in Rust — allow every image, resolve every tag — and the
//! conformance table proves the two agree. It also stands in for a broken engine in tests.

use super::{Decision, Input, Policy, PolicyError};

/// A policy decided by a fixed rule in Rust.
#[derive(Debug, Clone)]
pub struct StaticPolicy {
    rule: Rule,
}

#[derive(Debug, Clone)]
enum Rule {
    /// The default bundle's behaviour.
    Default,
    /// The same decision for everything.
    Fixed(Decision),
    /// Every evaluation fails (for fail-closed tests).
    Failing,
}

impl Default for StaticPolicy {
    fn default() -> Self {
        StaticPolicy {
            rule: Rule::Default,
        }
    }
}

impl StaticPolicy {
    pub fn fixed(decision: Decision) -> StaticPolicy {
        StaticPolicy {
            rule: Rule::Fixed(decision),
        }
    }

    /// Denies everything with `reason` (used while no valid bundle is loaded).
    pub fn deny_all(reason: &str) -> StaticPolicy {
        StaticPolicy::fixed(Decision::deny(reason))
    }

    pub fn failing() -> StaticPolicy {
        StaticPolicy {
            rule: Rule::Failing,
        }
    }
}

impl Policy for StaticPolicy {
    fn decide(&self, input: &Input) -> Result<Decision, PolicyError> {
        match &self.rule {
            Rule::Default => {
                // Mirrors policies/default/mirror.rego rule for rule.
                let _ = input;
                Ok(Decision::allow("public"))
            }
            Rule::Fixed(d) => Ok(d.clone()),
            Rule::Failing => Err(PolicyError::Eval("static failing policy".to_owned())),
        }
    }

    fn describe(&self) -> String {
        match &self.rule {
            Rule::Default => "static default (allow all, resolve tags)".to_owned(),
            Rule::Fixed(d) => format!("static fixed (allow={}, reason={})", d.allow, d.reason),
            Rule::Failing => "static failing".to_owned(),
        }
    }
}
