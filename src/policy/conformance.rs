//! The decision table every implementation of the default policy must pass: the shipped
//! `policies/default` bundle through regorus, and [`super::StaticPolicy::default`]. One
//! function, two callers (the unit test below and `tests/loopback/policy.rs`).

use super::{Action, ImageInput, Input, NodeInput, Policy, RequestInput, Source};

/// A serve input for a manifest (tag or digest) of `registry/repository`.
pub fn input(registry: &str, repository: &str, tag: Option<&str>, digest: Option<&str>) -> Input {
    let reference = tag.or(digest).unwrap_or_default().to_owned();
    Input {
        request: RequestInput {
            action: Action::Serve,
            kind: "manifest".to_owned(),
            method: "GET".to_owned(),
            source: Source::Local,
            is_tag: tag.is_some(),
            reference,
        },
        image: ImageInput {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        },
        node: NodeInput {
            name: "node-1".to_owned(),
        },
        ..Input::default()
    }
}

const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Runs the default-policy table against `policy`; panics with the case name on a mismatch.
pub fn default_policy(policy: &dyn Policy) {
    let mut blob_from_peer = input("docker.io", "library/alpine", None, Some(DIGEST));
    blob_from_peer.request.kind = "blob".to_owned();
    blob_from_peer.request.source = Source::Peer;
    let mut advertise = input("ghcr.io", "org/app", Some("v1"), Some(DIGEST));
    advertise.request.action = Action::Advertise;
    advertise.request.method = String::new();
    let mut head = input("127.0.0.1:5000", "rig/x", Some("latest"), None);
    head.request.method = "HEAD".to_owned();
    // (name, input, want allow, want resolve_tag)
    let cases: Vec<(&str, Input, bool, bool)> = vec![
        (
            "tag manifest",
            input("127.0.0.1:5000", "rig/x", Some("v1"), None),
            true,
            true,
        ),
        ("latest via HEAD", head, true, true),
        (
            "digest manifest",
            input("docker.io", "library/alpine", None, Some(DIGEST)),
            true,
            true,
        ),
        ("blob for a peer", blob_from_peer, true, true),
        ("advertise", advertise, true, true),
        ("empty input fields", Input::default(), true, true),
    ];
    for (name, input, allow, resolve_tag) in cases {
        let got = policy
            .decide(&input)
            .unwrap_or_else(|e| panic!("{name}: {} failed: {e}", policy.describe()));
        assert_eq!(got.allow, allow, "{name}: allow ({})", policy.describe());
        assert_eq!(
            got.resolve_tag,
            resolve_tag,
            "{name}: resolve_tag ({})",
            policy.describe()
        );
        assert!(
            !got.require_grant,
            "{name}: the default never requires a grant"
        );
        assert!(!got.reason.is_empty(), "{name}: a decision always says why");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn static_default_passes() {
        super::default_policy(&super::super::StaticPolicy::default());
    }
}
