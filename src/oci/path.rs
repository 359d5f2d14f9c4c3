//! Parsing of distribution-spec pull paths: `/v2/<name>/manifests/<reference>` and
//! `/v2/<name>/blobs/<digest>`, plus the `ns` query parameter containerd adds for mirrors.
//!
//! Grammar from the OCI distribution spec, "Pulling manifests" and "Pulling blobs":
//! `<name>` matches `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
//! a tag matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`. Everything is checked before use, so a
//! path with `..`, encoded slashes or odd bytes never reaches the store or a peer.

use super::digest::{Digest, DigestError};

/// The longest repository name accepted (the spec suggests clients keep host + name ≤ 255).
pub const MAX_NAME_LEN: usize = 255;

/// What kind of object a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Manifest,
    Blob,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
        }
    }
}

/// A manifest is addressed by tag or digest; a blob only by digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tag(t) => f.write_str(t),
            Target::Digest(d) => d.fmt(f),
        }
    }
}

/// A parsed `/v2/<name>/<kind>/<target>` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Path {
    pub name: String,
    pub kind: Kind,
    pub target: Target,
}

/// Why a path is refused; each maps to one OCI error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("not a /v2/<name>/manifests|blobs/<reference> path")]
    NotFound,
    #[error("invalid repository name")]
    NameInvalid,
    #[error("invalid tag")]
    TagInvalid,
    #[error("invalid digest: {0}")]
    DigestInvalid(#[from] DigestError),
    #[error("invalid ns parameter")]
    NsInvalid,
}

/// Parses the path part of a request URI (already split from the query, not percent-decoded).
pub fn parse_v2_path(path: &str) -> Result<V2Path, PathError> {
    let rest = path.strip_prefix("/v2/").ok_or(PathError::NotFound)?;
    // The reference is the last segment; the kind is the one before; the rest is the name.
    let (head, reference) = rest.rsplit_once('/').ok_or(PathError::NotFound)?;
    let (name, kind) = head.rsplit_once('/').ok_or(PathError::NotFound)?;
    let kind = match kind {
        "manifests" => Kind::Manifest,
        "blobs" => Kind::Blob,
        _ => return Err(PathError::NotFound),
    };
    if !valid_name(name) {
        return Err(PathError::NameInvalid);
    }
    let target = if reference.contains(':') {
        Target::Digest(reference.parse()?)
    } else if kind == Kind::Blob {
        return Err(PathError::DigestInvalid(DigestError::MissingSeparator));
    } else if valid_tag(reference) {
        Target::Tag(reference.to_owned())
    } else {
        return Err(PathError::TagInvalid);
    };
    Ok(V2Path {
        name: name.to_owned(),
        kind,
        target,
    })
}

/// True when `name` is a repository name under the distribution spec grammar.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('/').all(|component| {
            let b = component.as_bytes();
            let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
                return false;
            }
            // Separators: '.', '_', '__', or one or more '-', always between alphanumerics.
            let mut i = 0;
            while i < b.len() {
                let c = b[i];
                if alnum(c) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < b.len() && !alnum(b[i]) {
                    i += 1;
                }
                let sep = &component[start..i];
                let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
                if !ok {
                    return false;
                }
            }
            true
        })
}

/// True when `tag` matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Validates the `ns` query value: a registry host with an optional port, as containerd sends
/// it (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`). Returns the value unchanged when valid.
pub fn parse_ns(ns: &str) -> Result<&str, PathError> {
    if ns.is_empty() || ns.len() > 255 {
        return Err(PathError::NsInvalid);
    }
    let (host, port) = if let Some(rest) = ns.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(PathError::NsInvalid)?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(PathError::NsInvalid);
        }
        // Only `:port` may follow the bracket: `[::1]\r:5000` or `[::1]x` must not pass.
        let port = match after {
            "" => None,
            a => Some(a.strip_prefix(':').ok_or(PathError::NsInvalid)?),
        };
        (None, port)
    } else {
        match ns.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(ns), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || !host.split('.').all(label_ok) {
            return Err(PathError::NsInvalid);
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(PathError::NsInvalid);
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn path_table() {
        let ok = |name: &str, kind, target: Target| {
            Ok(V2Path {
                name: name.into(),
                kind,
                target,
            })
        };
        let dig = || Target::Digest(D.parse().expect("test digest"));
        let long_name = "a".repeat(256);
        let long_tag = format!("t{}", "a".repeat(128));
        let cases: Vec<(&str, String, Result<V2Path, PathError>)> = vec![
            (
                "tag",
                "/v2/library/alpine/manifests/3.20".into(),
                ok("library/alpine", Kind::Manifest, Target::Tag("3.20".into())),
            ),
            (
                "digest manifest",
                format!("/v2/a/manifests/{D}"),
                ok("a", Kind::Manifest, dig()),
            ),
            (
                "blob",
                format!("/v2/a/b/c/blobs/{D}"),
                ok("a/b/c", Kind::Blob, dig()),
            ),
            (
                "name named manifests",
                format!("/v2/manifests/blobs/{D}"),
                ok("manifests", Kind::Blob, dig()),
            ),
            (
                "separators",
                "/v2/a.b_c__d---e/manifests/x".into(),
                ok("a.b_c__d---e", Kind::Manifest, Target::Tag("x".into())),
            ),
            (
                "blob by tag",
                "/v2/a/blobs/latest".into(),
                Err(PathError::DigestInvalid(DigestError::MissingSeparator)),
            ),
            (
                "no v2",
                "/v3/a/manifests/x".into(),
                Err(PathError::NotFound),
            ),
            (
                "no name",
                "/v2/manifests/x".into(),
                Err(PathError::NotFound),
            ),
            (
                "empty name",
                "/v2//manifests/x".into(),
                Err(PathError::NameInvalid),
            ),
            (
                "unknown kind",
                "/v2/a/tags/list".into(),
                Err(PathError::NotFound),
            ),
            (
                "dotdot",
                "/v2/a/../b/manifests/x".into(),
                Err(PathError::NameInvalid),
            ),
            (
                "uppercase name",
                "/v2/Alpine/manifests/x".into(),
                Err(PathError::NameInvalid),
            ),
            (
                "encoded slash",
                "/v2/a%2Fb/manifests/x".into(),
                Err(PathError::NameInvalid),
            ),
            (
                "trailing sep",
                "/v2/a-/manifests/x".into(),
                Err(PathError::NameInvalid),
            ),
            (
                "triple underscore",
                "/v2/a___b/manifests/x".into(),
                Err(PathError::NameInvalid),
            ),
            (
                "long name",
                format!("/v2/{long_name}/manifests/x"),
                Err(PathError::NameInvalid),
            ),
            (
                "long tag",
                format!("/v2/a/manifests/{long_tag}"),
                Err(PathError::TagInvalid),
            ),
            (
                "tag starts with dot",
                "/v2/a/manifests/.x".into(),
                Err(PathError::TagInvalid),
            ),
            (
                "empty tag",
                "/v2/a/manifests/".into(),
                Err(PathError::TagInvalid),
            ),
            (
                "bad digest",
                "/v2/a/blobs/sha256:abc".into(),
                Err(PathError::DigestInvalid(DigestError::BadHex { want: 64 })),
            ),
            (
                "non-utf8 escape",
                "/v2/a/manifests/%ff".into(),
                Err(PathError::TagInvalid),
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_v2_path(&input), want, "{name}: {input}");
        }
    }

    #[test]
    fn ns_table() {
        let cases = [
            ("docker.io", true),
            ("127.0.0.1:5000", true),
            ("registry-1.example.com:443", true),
            ("[::1]:5000", true),
            ("", false),
            ("a:0", false),
            ("a:99999", false),
            ("a/b", false),
            ("-a.com", false),
            ("a..com", false),
            ("[zz]:1", false),
            ("[::]\r:5000", false),
            ("[::1]x", false),
            ("[::1]", true),
            ("a b", false),
        ];
        for (ns, ok) in cases {
            assert_eq!(parse_ns(ns).is_ok(), ok, "{ns}");
        }
    }
}
