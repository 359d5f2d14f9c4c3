//! Parsing of distribution-spec pull paths: `/v2/<name>/manifests/<reference>` and
//! `/v2/<name>/blobs/<digest>`, plus the `ns` query parameter containerd adds for mirrors.
//!
//! Grammar from the OCI distribution spec, "Pulling manifests" and "Pulling blobs":
//! `<name>` matches `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
//! a tag matches `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`. Everything is checked before use, so a
//! path with `..`, encoded slashes or odd bytes never reaches the store or a peer.

use super::digest::{Digest, DigestError};

/// The longest repository name accepted (the spec suggests clients keep host + name ≤ 255).
pub(crate) const MAX_NAME_LEN: usize = 255;

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
    #[error("the registry in the path and the ns parameter disagree")]
    NsConflict,
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

/// The registry a first path segment names, by docker's reference rule (a host with a `.` or a
/// port, or `localhost`), as `ns` spells it. A port is written `<host>_<port>` in the path:
/// containers/image refuses a mirror location with a `:` after the host (a path component
/// may not hold one: "rewriting reference: invalid reference format"), and a host name cannot
/// hold a `_`, so the spelling is unambiguous. `<host>:<port>` is accepted too.
pub(crate) fn path_registry(segment: &str) -> Option<String> {
    if let Some((host, port)) = segment.rsplit_once('_')
        && !host.contains(['_', ':'])
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        let ns = format!("{host}:{port}");
        return parse_ns(&ns).is_ok().then_some(ns);
    }
    ((segment.contains('.') || segment.contains(':') || segment == "localhost")
        && parse_ns(segment).is_ok())
    .then(|| segment.to_owned())
}

/// The upstream registry of a request, from the path or the `ns` parameter, and the path with
/// the registry segment taken out: what [`parse_v2_path`] then parses.
///
/// containers/image clients (CRI-O, podman, skopeo) cannot add `?ns=`; their mirror location
/// carries the registry (`127.0.0.1:5080/docker.io`, `127.0.0.1:5080/10.0.0.5_5000`), so
/// requests arrive as `/v2/<registry>/<repo>/…`. The rule, strict and pure:
/// - no `ns`: a first segment that names a registry ([`path_registry`]) is the registry
///   (`path_encoded`); anything else is a repository with no registry, as before;
/// - with `ns` (containerd): the path is the repository — registries such as Harbor allow dots
///   in project names, so `docker.io` or `a_1` there are repository components — except a
///   first segment with a `:` (never valid in a repository name): dropped when it names `ns`,
///   [`PathError::NsConflict`] when it names another registry. (So a peer path, always
///   `?ns=` plus the repository, parses back to the same request.)
pub(crate) fn split_registry<'a>(
    path: &'a str,
    ns: Option<&str>,
) -> Result<(std::borrow::Cow<'a, str>, Option<String>, bool), PathError> {
    use std::borrow::Cow;
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok((Cow::Borrowed(path), ns.map(str::to_owned), false));
    };
    let Some((first, after)) = rest.split_once('/') else {
        return Ok((Cow::Borrowed(path), ns.map(str::to_owned), false));
    };
    let stripped = || Cow::Owned(format!("/v2/{after}"));
    match (ns, path_registry(first)) {
        (None, Some(registry)) => Ok((stripped(), Some(registry), true)),
        (None, None) => Ok((Cow::Borrowed(path), None, false)),
        (Some(ns), Some(registry)) if first.contains(':') => match registry == ns {
            true => Ok((stripped(), Some(registry), false)),
            false => Err(PathError::NsConflict),
        },
        (Some(ns), _) => Ok((Cow::Borrowed(path), Some(ns.to_owned()), false)),
    }
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
    fn split_registry_table() {
        type Want<'a> = Result<(&'a str, Option<&'a str>, bool), PathError>;
        let cases: Vec<(&str, &str, Option<&str>, Want)> = vec![
            (
                "docker hub",
                "/v2/docker.io/library/alpine/manifests/3",
                None,
                Ok(("/v2/library/alpine/manifests/3", Some("docker.io"), true)),
            ),
            (
                "host with port",
                "/v2/127.0.0.1:5000/rig/app/blobs/x",
                None,
                Ok(("/v2/rig/app/blobs/x", Some("127.0.0.1:5000"), true)),
            ),
            (
                "port spelled with _",
                "/v2/127.0.0.1_5000/rig/app/blobs/x",
                None,
                Ok(("/v2/rig/app/blobs/x", Some("127.0.0.1:5000"), true)),
            ),
            (
                "single label with port",
                "/v2/registry_5000/app/manifests/v1",
                None,
                Ok(("/v2/app/manifests/v1", Some("registry:5000"), true)),
            ),
            (
                "bad port is a name",
                "/v2/a.io_99999/app/manifests/v1",
                None,
                Ok(("/v2/a.io_99999/app/manifests/v1", None, false)),
            ),
            (
                "two underscores",
                "/v2/a__5000/app/manifests/v1",
                None,
                Ok(("/v2/a__5000/app/manifests/v1", None, false)),
            ),
            (
                "ns: the _ spelling is a repository",
                "/v2/10.0.0.1_5000/a/manifests/1",
                Some("10.0.0.1:5000"),
                Ok((
                    "/v2/10.0.0.1_5000/a/manifests/1",
                    Some("10.0.0.1:5000"),
                    false,
                )),
            ),
            (
                "ns: a _ segment naming another registry stays a repository",
                "/v2/foo_1/a/manifests/1",
                Some("docker.io"),
                Ok(("/v2/foo_1/a/manifests/1", Some("docker.io"), false)),
            ),
            (
                "localhost",
                "/v2/localhost/app/manifests/v1",
                None,
                Ok(("/v2/app/manifests/v1", Some("localhost"), true)),
            ),
            (
                "plain name",
                "/v2/library/alpine/manifests/3",
                None,
                Ok(("/v2/library/alpine/manifests/3", None, false)),
            ),
            (
                "dotted project kept after the host",
                "/v2/harbor.example.com/my.proj/app/manifests/1",
                None,
                Ok((
                    "/v2/my.proj/app/manifests/1",
                    Some("harbor.example.com"),
                    true,
                )),
            ),
            (
                "bad host is a name",
                "/v2/a..b/app/manifests/1",
                None,
                Ok(("/v2/a..b/app/manifests/1", None, false)),
            ),
            (
                "port zero is no host",
                "/v2/a.io:0/app/manifests/1",
                None,
                Ok(("/v2/a.io:0/app/manifests/1", None, false)),
            ),
            (
                "ns: dotted repo stays",
                "/v2/my.proj/app/manifests/1",
                Some("harbor.example.com"),
                Ok((
                    "/v2/my.proj/app/manifests/1",
                    Some("harbor.example.com"),
                    false,
                )),
            ),
            (
                "ns: a dotted first segment is a repository",
                "/v2/docker.io/library/a/manifests/1",
                Some("docker.io"),
                Ok((
                    "/v2/docker.io/library/a/manifests/1",
                    Some("docker.io"),
                    false,
                )),
            ),
            (
                "ns equal to a host:port segment",
                "/v2/10.0.0.1:5000/a/manifests/1",
                Some("10.0.0.1:5000"),
                Ok(("/v2/a/manifests/1", Some("10.0.0.1:5000"), false)),
            ),
            (
                "ns and a different host:port",
                "/v2/10.0.0.1:5000/a/manifests/1",
                Some("docker.io"),
                Err(PathError::NsConflict),
            ),
            ("no slash after v2", "/v2/", None, Ok(("/v2/", None, false))),
            (
                "not v2",
                "/x/docker.io/a",
                None,
                Ok(("/x/docker.io/a", None, false)),
            ),
            (
                "only the registry",
                "/v2/docker.io/manifests",
                None,
                Ok(("/v2/manifests", Some("docker.io"), true)),
            ),
        ];
        for (name, path, ns, want) in cases {
            let got = split_registry(path, ns).map(|(p, ns, enc)| (p.into_owned(), ns, enc));
            let want = want.map(|(p, ns, enc)| (p.to_owned(), ns.map(str::to_owned), enc));
            assert_eq!(got, want, "{name}");
        }
    }

    /// Whatever the input, splitting never panics, and a path it splits parses the same way
    /// as the stripped path would on its own (the registry segment is really gone).
    #[test]
    fn split_registry_never_panics() {
        let alphabet: &[&str] = &[
            "/",
            "v2",
            "docker.io",
            "a",
            ":",
            "5000",
            ".",
            "localhost",
            "manifests",
            "blobs",
            "%2F",
            "..",
            "[::1]",
            "\u{e9}",
            "-",
            "_",
            "_5000",
            "9",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut p = String::from("/v2/");
            for _ in 0..(x % 7) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                p.push_str(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ns = x.is_multiple_of(3).then_some("docker.io");
            if let Ok((stripped, registry, encoded)) = split_registry(&p, ns) {
                if encoded {
                    let registry = registry.expect("an encoded path names its registry");
                    let first = p[4..].split('/').next().unwrap_or("");
                    assert_eq!(
                        path_registry(first).as_deref(),
                        Some(registry.as_str()),
                        "{p}"
                    );
                    assert_eq!(stripped, format!("/v2/{}", &p[4 + first.len() + 1..]));
                }
                let _ = parse_v2_path(&stripped);
            }
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
