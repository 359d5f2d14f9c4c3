//! The request, one job: parse method, URI and headers into a validated [`PullRequest`] before
//! anything is looked up (bad input is a 4xx), and derive what the responders need from it
//! (the routing key, the path to send to a peer). Pure: no I/O, fuzzed by `fuzz/targets/oci.rs`.

use std::net::SocketAddr;

use axum::http::{HeaderMap, Method, Uri};

use super::RegistryError;
use crate::oci::path::{PathError, parse_ns, parse_v2_path, split_registry};
use crate::oci::range::parse_range;
use crate::oci::{Kind, Reference, Target, V2Path};
use crate::tenancy::grants::Presented;
use crate::tenancy::peer_auth::PeerIdentity;
use crate::tenancy::{GRANT_HEADER, MAX_GRANTS_PER_REQUEST};
use crate::wire::HOP_HEADER;

/// A parsed, validated pull request.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub head: bool,
    pub path: V2Path,
    /// The upstream registry: the `ns` query parameter containerd adds for mirrors, or the
    /// first path segment of a containers/image client (`/v2/<registry>/<repo>/…`).
    pub ns: Option<String>,
    /// True when the registry came from the path: a containers/image client (CRI-O, podman,
    /// skopeo), which takes every blob from the source that answered the manifest, so its
    /// manifests are answered complete-or-nothing (`super::complete`).
    pub path_encoded: bool,
    /// The raw `Range` header, syntax already checked.
    pub range: Option<String>,
    /// True when another daemon sent this request.
    pub hop: bool,
    pub client: SocketAddr,
    /// Grants presented in `x-speculum-grant` headers (peer endpoint; `Err` for a malformed
    /// one). Bounded to [`MAX_GRANTS_PER_REQUEST`].
    pub presented: Vec<Result<Presented, ()>>,
    /// Peer endpoint: who sent the request, once its token verified.
    pub requester: Option<PeerIdentity>,
    /// Mirror endpoint: headers to send with this request to peers (peer token, grants).
    pub peer_headers: HeaderMap,
    /// The client's `Accept` header: what an upstream tag `HEAD` asks for ([`tags`]).
    pub accept: Option<String>,
}

impl PullRequest {
    /// Parses method, URI and headers. Errors are the client's fault and become 4xx.
    pub fn parse(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        client: SocketAddr,
    ) -> Result<PullRequest, RegistryError> {
        let head = match *method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(RegistryError::MethodNotAllowed),
        };
        let ns = query_ns(uri.query())?;
        let (path, ns, path_encoded) = split_registry(uri.path(), ns.as_deref())?;
        let path = parse_v2_path(&path)?;
        let range = match headers.get(http::header::RANGE) {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| RegistryError::Range {
                    source: crate::oci::range::RangeError::Malformed,
                    size: 0,
                })?;
                // Syntax is checked now; satisfiability once the size is known.
                if let Err(
                    e @ (crate::oci::range::RangeError::Malformed
                    | crate::oci::range::RangeError::MultipleRanges),
                ) = parse_range(v, u64::MAX)
                {
                    return Err(RegistryError::Range { source: e, size: 0 });
                }
                Some(v.to_owned())
            }
        };
        let presented = headers
            .get_all(GRANT_HEADER)
            .iter()
            .take(MAX_GRANTS_PER_REQUEST)
            .map(|v| v.to_str().ok().and_then(Presented::parse).ok_or(()))
            .collect();
        Ok(PullRequest {
            head,
            path,
            ns,
            path_encoded,
            range,
            hop: headers.contains_key(HOP_HEADER),
            client,
            presented,
            requester: None,
            peer_headers: HeaderMap::new(),
            accept: accept(headers),
        })
    }

    /// The routing key: the digest, or `registry/repository:tag` for a tag (which needs `ns`).
    pub fn key(&self) -> Option<String> {
        match &self.path.target {
            Target::Digest(d) => Some(d.to_string()),
            Target::Tag(t) => self
                .ns
                .as_deref()
                .map(|ns| Reference::tag_key(ns, &self.path.name, t)),
        }
    }

    /// The path and query to send to a peer for the same object.
    pub fn peer_path(&self) -> String {
        let kind = match self.path.kind {
            Kind::Manifest => "manifests",
            Kind::Blob => "blobs",
        };
        let mut p = format!("/v2/{}/{kind}/{}", self.path.name, self.path.target);
        if let Some(ns) = &self.ns {
            // `ns` was validated as host[:port] or [v6]:port, so only these need escaping.
            let enc = ns
                .replace(':', "%3A")
                .replace('[', "%5B")
                .replace(']', "%5D");
            p.push_str("?ns=");
            p.push_str(&enc);
        }
        p
    }

    /// The 404 for this request's kind (containerd then goes upstream).
    pub(crate) fn not_found(&self) -> RegistryError {
        match self.path.kind {
            Kind::Manifest => RegistryError::ManifestUnknown,
            Kind::Blob => RegistryError::BlobUnknown,
        }
    }
}

/// The client's `Accept` values as one list. containers/image sends one `Accept` header per
/// media type; reading only the first would ask upstream for a plain manifest, and a registry
/// then answers 404 for a tag naming an index.
fn accept(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// Extracts and validates the single `ns` parameter. Other parameters are ignored.
fn query_ns(query: Option<&str>) -> Result<Option<String>, RegistryError> {
    let mut ns = None;
    for pair in query.unwrap_or("").split('&') {
        let Some(value) = pair.strip_prefix("ns=") else {
            continue;
        };
        if ns.is_some() {
            return Err(PathError::NsInvalid.into());
        }
        let decoded = percent_decode(value).ok_or(PathError::NsInvalid)?;
        parse_ns(&decoded)?;
        ns = Some(decoded);
    }
    Ok(ns)
}

/// Decodes `%XX` escapes; `None` for a broken escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: Method, uri: &str, range: Option<&str>) -> Result<PullRequest, String> {
        let mut headers = HeaderMap::new();
        if let Some(r) = range {
            headers.insert(http::header::RANGE, r.parse().map_err(|_| "hdr")?);
        }
        let uri: Uri = uri.parse().map_err(|e| format!("{e}"))?;
        PullRequest::parse(&method, &uri, &headers, ([127, 0, 0, 1], 1).into())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn request_table() {
        let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        type Case<'a> = (
            &'a str,
            Method,
            String,
            Option<&'a str>,
            Result<Option<&'a str>, ()>,
        );
        let cases: Vec<Case> = vec![
            (
                "ns decoded",
                Method::GET,
                "/v2/a/manifests/t?ns=127.0.0.1%3A5000".into(),
                None,
                Ok(Some("127.0.0.1:5000")),
            ),
            (
                "no ns",
                Method::HEAD,
                format!("/v2/a/blobs/{d}"),
                None,
                Ok(None),
            ),
            (
                "other params ignored",
                Method::GET,
                "/v2/a/manifests/t?x=1&ns=docker.io".into(),
                None,
                Ok(Some("docker.io")),
            ),
            (
                "two ns",
                Method::GET,
                "/v2/a/manifests/t?ns=a.io&ns=b.io".into(),
                None,
                Err(()),
            ),
            (
                "bad ns",
                Method::GET,
                "/v2/a/manifests/t?ns=a%2Fb".into(),
                None,
                Err(()),
            ),
            (
                "broken escape",
                Method::GET,
                "/v2/a/manifests/t?ns=a%2".into(),
                None,
                Err(()),
            ),
            (
                "non-utf8 ns",
                Method::GET,
                "/v2/a/manifests/t?ns=%ff".into(),
                None,
                Err(()),
            ),
            (
                "post",
                Method::POST,
                "/v2/a/blobs/uploads/".into(),
                None,
                Err(()),
            ),
            (
                "delete",
                Method::DELETE,
                format!("/v2/a/blobs/{d}"),
                None,
                Err(()),
            ),
            (
                "path-encoded registry",
                Method::GET,
                "/v2/docker.io/library/alpine/manifests/3".into(),
                None,
                Ok(Some("docker.io")),
            ),
            (
                "path-encoded host:port blob",
                Method::HEAD,
                format!("/v2/127.0.0.1:5000/rig/app/blobs/{d}"),
                None,
                Ok(Some("127.0.0.1:5000")),
            ),
            (
                "path and ns agree",
                Method::GET,
                "/v2/10.0.0.1:5000/app/manifests/3?ns=10.0.0.1%3A5000".into(),
                None,
                Ok(Some("10.0.0.1:5000")),
            ),
            (
                "path and ns disagree",
                Method::GET,
                "/v2/10.0.0.1:5000/app/manifests/3?ns=docker.io".into(),
                None,
                Err(()),
            ),
            (
                "path-encoded with nothing after the registry",
                Method::GET,
                "/v2/docker.io/manifests/3".into(),
                None,
                Err(()),
            ),
            (
                "path-encoded with a bad repository",
                Method::GET,
                "/v2/docker.io/Alpine/manifests/3".into(),
                None,
                Err(()),
            ),
            (
                "range ok",
                Method::GET,
                format!("/v2/a/blobs/{d}"),
                Some("bytes=5-"),
                Ok(None),
            ),
            (
                "multi range",
                Method::GET,
                format!("/v2/a/blobs/{d}"),
                Some("bytes=0-1,4-5"),
                Err(()),
            ),
            (
                "inverted range",
                Method::GET,
                format!("/v2/a/blobs/{d}"),
                Some("bytes=5-1"),
                Err(()),
            ),
        ];
        for (name, method, uri, range, want) in cases {
            let got = parse(method, &uri, range);
            match want {
                Ok(ns) => {
                    let req = got.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(req.ns.as_deref(), ns, "{name}");
                }
                Err(()) => assert!(got.is_err(), "{name}: expected an error"),
            }
        }
    }

    #[test]
    fn accept_headers_are_joined() {
        let mut headers = HeaderMap::new();
        assert_eq!(accept(&headers), None);
        headers.append(
            http::header::ACCEPT,
            "application/a".parse().expect("value"),
        );
        headers.append(
            http::header::ACCEPT,
            "application/b, application/c".parse().expect("value"),
        );
        assert_eq!(
            accept(&headers).as_deref(),
            Some("application/a, application/b, application/c")
        );
    }

    #[test]
    fn keys_and_peer_paths() {
        let req = parse(
            Method::GET,
            "/v2/rig/x/manifests/v1?ns=10.0.0.2%3A5000",
            None,
        )
        .expect("valid");
        assert_eq!(req.key().as_deref(), Some("10.0.0.2:5000/rig/x:v1"));
        assert_eq!(req.peer_path(), "/v2/rig/x/manifests/v1?ns=10.0.0.2%3A5000");
        let no_ns = parse(Method::GET, "/v2/rig/x/manifests/v1", None).expect("valid");
        assert_eq!(no_ns.key(), None, "a tag without ns has no key");
        assert!(!no_ns.path_encoded && !req.path_encoded);
        // A containers/image request has containerd's key and asks peers with `?ns=`.
        let enc = parse(Method::GET, "/v2/10.0.0.2_5000/rig/x/manifests/v1", None).expect("valid");
        assert!(enc.path_encoded);
        assert_eq!(enc.key(), req.key());
        assert_eq!(enc.peer_path(), req.peer_path());
    }
}
