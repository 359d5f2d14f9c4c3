//! Image references as containerd names images: `registry/repository[:tag][@digest]`.
//!
//! The daemon sees fully qualified names only (containerd stores `docker.io/library/x:tag`),
//! so no short-name defaulting happens here except the implicit `latest` tag, which the
//! `resolveLatestTag` switch needs to recognise.

use std::fmt;

use super::digest::Digest;
use super::path::{valid_name, valid_tag};

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("reference has no registry host")]
    NoRegistry,
    #[error("invalid repository name")]
    NameInvalid,
    #[error("invalid tag")]
    TagInvalid,
    #[error("invalid digest")]
    DigestInvalid,
    #[error("reference names neither tag nor digest")]
    NoTagOrDigest,
}

impl Reference {
    /// Parses `registry/repo:tag`, `registry/repo@digest` or `registry/repo:tag@digest`.
    /// A reference with neither tag nor digest is refused: callers decide about `latest`.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(d.parse().map_err(|_| ReferenceError::DigestInvalid)?),
            ),
            None => (s, None),
        };
        let (registry, path) = rest.split_once('/').ok_or(ReferenceError::NoRegistry)?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(ReferenceError::NoRegistry);
        }
        if crate::oci::path::parse_ns(registry).is_err() {
            return Err(ReferenceError::NoRegistry);
        }
        // A ':' after the last '/' separates the tag.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (path, None),
        };
        if !valid_name(repository) {
            return Err(ReferenceError::NameInvalid);
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(ReferenceError::TagInvalid);
        }
        if tag.is_none() && digest.is_none() {
            return Err(ReferenceError::NoTagOrDigest);
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// The key under which a tag is advertised and resolved: `registry/repository:tag`.
    pub fn tag_key(registry: &str, repository: &str, tag: &str) -> String {
        format!("{registry}/{repository}:{tag}")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn reference_table() {
        let ok = |reg: &str, repo: &str, tag: Option<&str>, dig: bool| {
            Ok(Reference {
                registry: reg.into(),
                repository: repo.into(),
                tag: tag.map(Into::into),
                digest: dig.then(|| D.parse().expect("digest")),
            })
        };
        let cases: Vec<(String, Result<Reference, ReferenceError>)> = vec![
            (
                "docker.io/library/alpine:3.20".into(),
                ok("docker.io", "library/alpine", Some("3.20"), false),
            ),
            (
                "127.0.0.1:5000/rig/x:v1".into(),
                ok("127.0.0.1:5000", "rig/x", Some("v1"), false),
            ),
            (
                format!("127.0.0.1:5000/rig/x@{D}"),
                ok("127.0.0.1:5000", "rig/x", None, true),
            ),
            (
                format!("ghcr.io/a/b:t@{D}"),
                ok("ghcr.io", "a/b", Some("t"), true),
            ),
            (
                "localhost/a:t".into(),
                ok("localhost", "a", Some("t"), false),
            ),
            ("rig/x:v1".into(), Err(ReferenceError::NoRegistry)),
            (
                "docker.io/library/alpine".into(),
                Err(ReferenceError::NoTagOrDigest),
            ),
            (
                "docker.io/Library/alpine:1".into(),
                Err(ReferenceError::NameInvalid),
            ),
            (
                "docker.io/a:bad tag".into(),
                Err(ReferenceError::TagInvalid),
            ),
            (
                "docker.io/a@sha256:1".into(),
                Err(ReferenceError::DigestInvalid),
            ),
            ("alpine".into(), Err(ReferenceError::NoRegistry)),
        ];
        for (input, want) in cases {
            let got = Reference::parse(&input);
            assert_eq!(got, want, "{input}");
            if let Ok(r) = got {
                assert_eq!(r.to_string(), input, "round trip");
            }
        }
    }
}
