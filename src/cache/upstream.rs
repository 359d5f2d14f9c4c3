//! Anonymous requests to a registry: one job — ask the registry named by the request's `ns`,
//! with no credentials, for the bytes of one public blob (or the rest of it, with `Range`), or
//! (`HEAD`) for the digest a tag names right now (`registry::tags`).
//!
//! Follows the distribution token flow for anonymous access: a `401` with
//! `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is answered by asking the realm for an
//! anonymous token and retrying with it (tokens are cached per registry and scope until they
//! expire). Redirects (S3-style blob storage) are followed; reqwest drops `Authorization` when
//! a redirect leaves the host. **Never** sends tenant credentials: this client has none.
//! Registries in the client's plain-http list are reached over http, every other over https.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{StatusCode, header};
use serde::Deserialize;

use super::CacheConfig;
use crate::oci::Digest;

/// Why an upstream fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("token from {realm} refused: {reason}")]
    Token {
        realm: String,
        reason: String,
        /// The realm's answer when it answered (401/403: anonymous pulls refused).
        status: Option<StatusCode>,
    },
    #[error("{url} answered without a usable Content-Length")]
    Length { url: String },
}

/// A blob response from upstream: where the body starts, the whole blob's size, the body.
pub struct Fetch {
    /// Offset of the first body byte within the blob.
    pub start: u64,
    /// The blob's total size.
    pub size: u64,
    pub response: reqwest::Response,
}

/// Anonymous upstream client. One per daemon.
pub struct Upstream {
    client: reqwest::Client,
    plain_http: Vec<String>,
    // A std Mutex: never held across an `.await`.
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Upstream {
    pub fn new(config: &CacheConfig) -> Result<Upstream, reqwest::Error> {
        Upstream::with(
            config.plain_http.clone(),
            config.upstream_connect_timeout,
            config.upstream_read_timeout,
        )
    }

    /// A client for registries reached over http when `plain_http` lists them (`host[:port]`
    /// as in `ns`), https otherwise.
    pub fn with(
        plain_http: Vec<String>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Upstream, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("speculum/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Upstream {
            client,
            plain_http,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The base URL of registry `ns` (`docker.io` is served by `registry-1.docker.io`).
    pub fn base(&self, ns: &str) -> String {
        let host = if ns == "docker.io" {
            "registry-1.docker.io"
        } else {
            ns
        };
        let scheme = if self.plain_http.iter().any(|h| h == ns) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}")
    }

    /// GETs blob `digest` of `repository` on registry `ns`, from byte `from` on.
    pub async fn blob(
        &self,
        ns: &str,
        repository: &str,
        digest: &Digest,
        from: u64,
    ) -> Result<Fetch, UpstreamError> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base(ns));
        let response = self
            .send(ns, repository, &url, |client| {
                let request = client.get(&url);
                if from > 0 {
                    request.header(header::RANGE, format!("bytes={from}-"))
                } else {
                    request
                }
            })
            .await?;
        match response.status() {
            StatusCode::OK => {
                let size = response
                    .content_length()
                    .ok_or(UpstreamError::Length { url: url.clone() })?;
                if from > 0 {
                    // The registry ignored the Range: the caller skips what it has.
                    tracing::debug!(registry = ns, %digest, "upstream ignored Range");
                }
                Ok(Fetch {
                    start: 0,
                    size,
                    response,
                })
            }
            StatusCode::PARTIAL_CONTENT => {
                let (start, size) = response
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or(UpstreamError::Length { url: url.clone() })?;
                Ok(Fetch {
                    start,
                    size,
                    response,
                })
            }
            status => Err(UpstreamError::Status { url, status }),
        }
    }

    /// `HEAD`s manifest `reference` (a tag) of `repository` on registry `ns` and returns the
    /// answer whatever its status: the caller reads the status and `Docker-Content-Digest`.
    /// `accept` is what the client asked for (the digest of a tag depends on it: an index
    /// and a single manifest have different digests); nothing else of the client's request
    /// is passed on.
    pub async fn manifest_head(
        &self,
        ns: &str,
        repository: &str,
        reference: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.manifest(reqwest::Method::HEAD, ns, repository, reference, accept)
            .await
    }

    /// `GET`s manifest `reference` (tag or digest) of `repository` on registry `ns`,
    /// anonymously, and returns the answer whatever its status (the caller reads status,
    /// `Content-Type` and body). A refused anonymous token is the caller's "private image".
    pub async fn manifest_get(
        &self,
        ns: &str,
        repository: &str,
        reference: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.manifest(reqwest::Method::GET, ns, repository, reference, accept)
            .await
    }

    /// One anonymous manifest request with the client's `Accept` and nothing else of its
    /// request; the answer whatever its status.
    async fn manifest(
        &self,
        method: reqwest::Method,
        ns: &str,
        repository: &str,
        reference: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base(ns));
        self.send(ns, repository, &url, |client| {
            client
                .request(method.clone(), &url)
                .header(header::ACCEPT, accept)
        })
        .await
    }

    /// `HEAD`s blob `digest` of `repository` on registry `ns`, anonymously: the status.
    pub async fn blob_head(
        &self,
        ns: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<StatusCode, UpstreamError> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base(ns));
        let response = self
            .send(ns, repository, &url, |client| client.head(&url))
            .await?;
        Ok(response.status())
    }

    /// Sends the request `build` makes, anonymously: with the cached token of this
    /// repository's pull scope if there is one; a `401` carrying a Bearer challenge is
    /// answered once with a fresh anonymous token. Returns the last response, any status.
    async fn send(
        &self,
        ns: &str,
        repository: &str,
        url: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repository}:pull");
        let mut token = self.cached_token(ns, &scope);
        let mut retried = false;
        loop {
            let mut request = build(&self.client);
            if let Some(t) = &token {
                request = request.bearer_auth(t);
            }
            let response = request
                .send()
                .await
                .map_err(|source| UpstreamError::Request {
                    url: url.to_owned(),
                    source,
                })?;
            if response.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(response);
            }
            let Some(challenge) = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_bearer)
            else {
                return Ok(response);
            };
            token = Some(self.anonymous_token(ns, &scope, challenge).await?);
            retried = true;
        }
    }

    fn cached_token(&self, ns: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(&(ns.to_owned(), scope.to_owned()))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t.clone())
    }

    /// Asks the challenge's realm for an anonymous token (no credentials, ever).
    async fn anonymous_token(
        &self,
        ns: &str,
        scope: &str,
        challenge: Challenge,
    ) -> Result<String, UpstreamError> {
        let refused = |reason: String, status: Option<StatusCode>| UpstreamError::Token {
            realm: challenge.realm.clone(),
            reason,
            status,
        };
        // The challenge's scope if it names one, else the pull scope of this repository.
        let scope = challenge.scope.as_deref().unwrap_or(scope).to_owned();
        let mut url = challenge.realm.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        if let Some(s) = &challenge.service {
            url.push_str(&format!("service={}&", encode(s)));
        }
        url.push_str(&format!("scope={}", encode(&scope)));
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| refused(e.to_string(), None))?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(refused(format!("status {status}"), Some(status)));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| refused(e.to_string(), None))?;
        let body: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| refused(e.to_string(), None))?;
        let token = if body.token.is_empty() {
            body.access_token
        } else {
            body.token
        };
        if token.is_empty() {
            return Err(refused("no token in the answer".to_owned(), None));
        }
        // Default lifetime per the token spec is 60 s; renew a little early.
        let life = Duration::from_secs(body.expires_in.unwrap_or(60).max(10) - 5);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (ns.to_owned(), scope),
                (token.clone(), Instant::now() + life),
            );
        Ok(token)
    }
}

/// A `Bearer` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted values may contain commas).
pub(crate) fn parse_bearer(value: &str) -> Option<Challenge> {
    let rest = value.trim();
    let (scheme, params) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut s = params.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (val, remaining) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_owned(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        fields.insert(key, val);
        s = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    let realm = fields.remove("realm").filter(|r| r.starts_with("http"))?;
    Some(Challenge {
        realm,
        service: fields.remove("service"),
        scope: fields.remove("scope"),
    })
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `bytes START-END/TOTAL` → (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_table() {
        let c = |realm: &str, service: Option<&str>, scope: Option<&str>| {
            Some(Challenge {
                realm: realm.to_owned(),
                service: service.map(str::to_owned),
                scope: scope.map(str::to_owned),
            })
        };
        let cases = [
            (
                "docker hub",
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
                c(
                    "https://auth.docker.io/token",
                    Some("registry.docker.io"),
                    Some("repository:library/alpine:pull"),
                ),
            ),
            (
                "comma in scope, spaces",
                r#"Bearer realm="https://r/t", scope="repository:a/b:pull,push""#,
                c("https://r/t", None, Some("repository:a/b:pull,push")),
            ),
            ("basic", r#"Basic realm="x""#, None),
            ("no realm", r#"Bearer service="x""#, None),
            (
                "realm not a url",
                r#"Bearer realm="file:///etc/passwd""#,
                None,
            ),
            ("garbage", "Bearer", None),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_bearer(input), want, "{name}");
        }
    }

    #[test]
    fn scheme_follows_plain_http_list() {
        let config = CacheConfig {
            plain_http: vec!["10.250.77.2:5000".to_owned()],
            ..CacheConfig::default()
        };
        let up = Upstream::new(&config).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(up.base("10.250.77.2:5000"), "http://10.250.77.2:5000");
        assert_eq!(up.base("ghcr.io"), "https://ghcr.io");
        assert_eq!(up.base("docker.io"), "https://registry-1.docker.io");
    }
}
