//! Tag resolution on the mirror endpoint: one job — decide which digest a tag request names
//! right now, and who said so.
//!
//! `upstream-first` (the default) asks the registry itself with one anonymous `HEAD
//! /v2/<repo>/manifests/<tag>` under a short deadline (`mirror.tag_upstream_timeout`), so a
//! tag moved upstream is seen by every node at once; the content behind the digest still
//! comes from this node's store or from peers. Only when upstream cannot answer does the
//! cluster's tag answer (stale-if-error). `cluster-first` is the older behaviour: the tags the
//! nodes hold answer, upstream is never asked. The policy can choose per image
//! (`tag_resolution` in the decision, `docs/policy.md`).
//!
//! What upstream said, and what the mirror then does ([`plan`]):
//!
//! | upstream answer | plan | `tag_source` |
//! |---|---|---|
//! | 2xx with a `Docker-Content-Digest` | serve that digest from the node or peers, else 404 | `upstream` |
//! | 2xx without a usable digest | 404: containerd resolves the tag itself | `upstream` |
//! | 404 / 410 | 404: the tag is gone; a stale one is never served | `upstream` |
//! | 401 / 403 (anonymous pulls refused: a private repository) | the cluster, as the policy allows | `cluster` |
//! | 429, 5xx, any other status, refused, TLS error, timeout | the cluster (stale-if-error) | `stale` |
//! | (not asked: `ns` is not a mirrored registry) | the cluster | `cluster` |
//!
//! Every path ends in a 404 (containerd goes upstream with its own credentials) or in the
//! cluster's answer: a pull never fails because of tag resolution. The `HEAD` carries no
//! credentials of anyone's (the client has none; the request's `Authorization` is never
//! passed on); only containerd's `Accept` travels with it, because a tag's digest depends on
//! it (an index and a single-platform manifest differ). What the policy decides, the HTTP
//! answer and the audit line are the caller's (`super::RegistryState::answer`).

use std::time::{Duration, Instant};

use http::StatusCode;

use super::metrics::RegistryMetrics;
use crate::cache::upstream::{Upstream, UpstreamError};
use crate::oci::{Digest, media};
use crate::policy::TagResolution;
use crate::wire::DOCKER_CONTENT_DIGEST;

/// What the upstream registry said about a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAnswer {
    /// 2xx with a valid `Docker-Content-Digest`.
    Digest(Digest),
    /// 2xx without a (valid) digest header: the tag exists, its digest was not said.
    NoDigest,
    /// 404 or 410: the tag does not exist (any more).
    NotFound,
    /// 401 or 403 after the anonymous token flow: anonymous clients may not see it.
    Refused(u16),
    /// Upstream could not answer: an overload or server status, or a status nobody expects.
    Status(u16),
    /// No answer within `mirror.tag_upstream_timeout`.
    Timeout,
    /// Connection refused or reset, DNS, TLS, a token realm that did not answer.
    Unreachable,
}

impl UpstreamAnswer {
    /// Classifies a response by its status and `Docker-Content-Digest` header.
    pub fn from_response(status: StatusCode, digest: Option<&str>) -> UpstreamAnswer {
        match status.as_u16() {
            200..=299 => match digest.and_then(|d| d.parse::<Digest>().ok()) {
                Some(d) => UpstreamAnswer::Digest(d),
                None => UpstreamAnswer::NoDigest,
            },
            404 | 410 => UpstreamAnswer::NotFound,
            401 | 403 => UpstreamAnswer::Refused(status.as_u16()),
            other => UpstreamAnswer::Status(other),
        }
    }

    /// The audit `tag_upstream` value: short, fixed vocabulary plus the status.
    pub fn label(&self) -> String {
        match self {
            UpstreamAnswer::Digest(_) => "digest".to_owned(),
            UpstreamAnswer::NoDigest => "no-digest".to_owned(),
            UpstreamAnswer::NotFound => "not-found".to_owned(),
            UpstreamAnswer::Refused(s) => format!("refused-{s}"),
            UpstreamAnswer::Status(s) => format!("status-{s}"),
            UpstreamAnswer::Timeout => "timeout".to_owned(),
            UpstreamAnswer::Unreachable => "unreachable".to_owned(),
        }
    }
}

/// Who named the digest a tag request was answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagSource {
    /// The upstream registry (its digest, or its 404).
    Upstream,
    /// The cluster, by choice: `cluster-first`, or upstream refused anonymous clients.
    Cluster,
    /// The cluster, because upstream could not answer (stale-if-error).
    Stale,
}

impl TagSource {
    /// The audit `tag_source` value and the metric's `source` label.
    pub fn as_str(self) -> &'static str {
        match self {
            TagSource::Upstream => "upstream",
            TagSource::Cluster => "cluster",
            TagSource::Stale => "stale",
        }
    }
}

/// What the mirror does with a tag request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Serve this digest's manifest from this node or peers; 404 when nobody holds it.
    Serve(Digest),
    /// Answer 404 at once: containerd asks upstream itself.
    NotFound,
    /// Resolve the tag through the cluster (this node's store, then peers).
    Cluster,
}

/// The decision table of the module docs.
pub fn plan(answer: &UpstreamAnswer) -> (Plan, TagSource) {
    match answer {
        UpstreamAnswer::Digest(d) => (Plan::Serve(d.clone()), TagSource::Upstream),
        UpstreamAnswer::NoDigest | UpstreamAnswer::NotFound => {
            (Plan::NotFound, TagSource::Upstream)
        }
        UpstreamAnswer::Refused(_) => (Plan::Cluster, TagSource::Cluster),
        UpstreamAnswer::Status(_) | UpstreamAnswer::Timeout | UpstreamAnswer::Unreachable => {
            (Plan::Cluster, TagSource::Stale)
        }
    }
}

/// The outcome of resolving one tag request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub plan: Plan,
    pub source: TagSource,
    /// What upstream answered ([`UpstreamAnswer::label`]); `None` when it was not asked.
    pub upstream: Option<String>,
}

/// Asks upstream registries which digest a tag names. One per daemon (mirror endpoint).
pub struct TagResolver {
    upstream: Upstream,
    mode: TagResolution,
    timeout: Duration,
    metrics: RegistryMetrics,
    /// The registries upstream may be asked about (`None`: any).
    registries: Option<Vec<String>>,
}

impl TagResolver {
    /// `plain_http`: registries (`host[:port]` as in `ns`) reached over http, not https.
    pub fn new(
        mode: TagResolution,
        timeout: Duration,
        plain_http: Vec<String>,
        metrics: RegistryMetrics,
    ) -> Result<TagResolver, reqwest::Error> {
        // Connect and read bounds inside the overall deadline, which is what really limits.
        let upstream = Upstream::with(plain_http, timeout, timeout)?;
        Ok(TagResolver {
            upstream,
            mode,
            timeout,
            metrics,
            registries: None,
        })
    }

    /// Asks upstream only about these registries (`ns` values: the mirrored registries);
    /// a tag of any other registry resolves through the cluster. A made-up `ns` from a local
    /// client then cannot make the daemon send requests to a host of its choosing.
    pub fn only_for(mut self, registries: Option<Vec<String>>) -> TagResolver {
        self.registries = registries;
        self
    }

    /// True when registry `ns` is one of the mirrored registries (every registry without a
    /// list): the registries a containers/image client may name in the path (`super::complete`).
    pub fn mirrors(&self, ns: &str) -> bool {
        self.registries
            .as_ref()
            .is_none_or(|r| r.iter().any(|h| h == ns))
    }

    /// The anonymous upstream client (mirrored registries only: check [`TagResolver::mirrors`]).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// The configured mode (`mirror.tag_resolution`), used when the policy does not choose.
    pub fn mode(&self) -> TagResolution {
        self.mode
    }

    /// Resolves `tag` of `repository` on registry `ns` the way `mode` says, and counts it.
    /// `accept` is the client's `Accept` header.
    pub async fn resolve(
        &self,
        mode: TagResolution,
        ns: &str,
        repository: &str,
        tag: &str,
        accept: Option<&str>,
    ) -> Resolution {
        let mirrored = self
            .registries
            .as_ref()
            .is_none_or(|r| r.iter().any(|h| h == ns));
        let resolution = match mode {
            TagResolution::UpstreamFirst if !mirrored => Resolution {
                plan: Plan::Cluster,
                source: TagSource::Cluster,
                upstream: Some("not-mirrored".to_owned()),
            },
            TagResolution::ClusterFirst => Resolution {
                plan: Plan::Cluster,
                source: TagSource::Cluster,
                upstream: None,
            },
            TagResolution::UpstreamFirst => {
                let started = Instant::now();
                let answer = self.ask(ns, repository, tag, accept).await;
                let elapsed = started.elapsed();
                self.metrics.tag_upstream(elapsed);
                let (plan, source) = plan(&answer);
                tracing::debug!(
                    registry = ns,
                    reference = tag,
                    upstream = %answer.label(),
                    tag.source = source.as_str(),
                    elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                    "tag resolved"
                );
                Resolution {
                    plan,
                    source,
                    upstream: Some(answer.label()),
                }
            }
        };
        self.metrics.tag_resolved(resolution.source.as_str());
        resolution
    }

    /// One anonymous `HEAD` for the tag, under the deadline.
    pub async fn ask(
        &self,
        ns: &str,
        repository: &str,
        tag: &str,
        accept: Option<&str>,
    ) -> UpstreamAnswer {
        let all = [
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            media::DOCKER_LIST,
            media::DOCKER_MANIFEST,
        ]
        .join(", ");
        // containerd names the manifest types it accepts; a client that names none (`*/*`)
        // gets what containerd would ask for, not whatever a registry sends for `*/*`.
        let accept = accept
            .filter(|a| {
                [
                    media::OCI_INDEX,
                    media::OCI_MANIFEST,
                    media::DOCKER_LIST,
                    media::DOCKER_MANIFEST,
                ]
                .iter()
                .any(|t| a.contains(t))
            })
            .unwrap_or(&all);
        let head = self.upstream.manifest_head(ns, repository, tag, accept);
        match tokio::time::timeout(self.timeout, head).await {
            Err(_) => UpstreamAnswer::Timeout,
            Ok(Ok(response)) => UpstreamAnswer::from_response(
                response.status(),
                response
                    .headers()
                    .get(DOCKER_CONTENT_DIGEST)
                    .and_then(|v| v.to_str().ok()),
            ),
            Ok(Err(e)) => from_error(&e),
        }
    }
}

/// A failed request: a token realm that refuses anonymous clients means "private"; anything
/// else means upstream could not be asked.
fn from_error(e: &UpstreamError) -> UpstreamAnswer {
    match e {
        UpstreamError::Token {
            status: Some(s), ..
        } if matches!(s.as_u16(), 401 | 403) => UpstreamAnswer::Refused(s.as_u16()),
        UpstreamError::Request { source, .. } if source.is_timeout() => UpstreamAnswer::Timeout,
        _ => UpstreamAnswer::Unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn upstream_answer_table() {
        let d: Digest = D.parse().expect("digest");
        let cases: Vec<(&str, u16, Option<&str>, UpstreamAnswer)> = vec![
            (
                "200 with digest",
                200,
                Some(D),
                UpstreamAnswer::Digest(d.clone()),
            ),
            ("200 without digest", 200, None, UpstreamAnswer::NoDigest),
            (
                "200 bad digest",
                200,
                Some("sha256:xyz"),
                UpstreamAnswer::NoDigest,
            ),
            ("204 with digest", 204, Some(D), UpstreamAnswer::Digest(d)),
            ("404", 404, None, UpstreamAnswer::NotFound),
            ("410", 410, None, UpstreamAnswer::NotFound),
            ("404 with digest", 404, Some(D), UpstreamAnswer::NotFound),
            ("401", 401, None, UpstreamAnswer::Refused(401)),
            ("403", 403, None, UpstreamAnswer::Refused(403)),
            ("429", 429, None, UpstreamAnswer::Status(429)),
            ("500", 500, None, UpstreamAnswer::Status(500)),
            ("503", 503, Some(D), UpstreamAnswer::Status(503)),
            ("400", 400, None, UpstreamAnswer::Status(400)),
            ("302 not followed", 302, None, UpstreamAnswer::Status(302)),
        ];
        for (name, status, digest, want) in cases {
            let status = StatusCode::from_u16(status).expect("status");
            assert_eq!(
                UpstreamAnswer::from_response(status, digest),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn plan_table() {
        let d: Digest = D.parse().expect("digest");
        let cases: Vec<(&str, UpstreamAnswer, Plan, TagSource)> = vec![
            (
                "upstream names a digest",
                UpstreamAnswer::Digest(d.clone()),
                Plan::Serve(d),
                TagSource::Upstream,
            ),
            (
                "no digest: containerd resolves itself",
                UpstreamAnswer::NoDigest,
                Plan::NotFound,
                TagSource::Upstream,
            ),
            (
                "tag gone: never a stale one",
                UpstreamAnswer::NotFound,
                Plan::NotFound,
                TagSource::Upstream,
            ),
            (
                "private: the policy decides",
                UpstreamAnswer::Refused(401),
                Plan::Cluster,
                TagSource::Cluster,
            ),
            (
                "forbidden: the policy decides",
                UpstreamAnswer::Refused(403),
                Plan::Cluster,
                TagSource::Cluster,
            ),
            (
                "rate limited",
                UpstreamAnswer::Status(429),
                Plan::Cluster,
                TagSource::Stale,
            ),
            (
                "server error",
                UpstreamAnswer::Status(502),
                Plan::Cluster,
                TagSource::Stale,
            ),
            (
                "timeout",
                UpstreamAnswer::Timeout,
                Plan::Cluster,
                TagSource::Stale,
            ),
            (
                "unreachable",
                UpstreamAnswer::Unreachable,
                Plan::Cluster,
                TagSource::Stale,
            ),
        ];
        for (name, answer, want_plan, want_source) in cases {
            assert_eq!(plan(&answer), (want_plan, want_source), "{name}");
        }
    }

    #[test]
    fn labels_are_lower_case_and_bounded() {
        for (answer, want) in [
            (UpstreamAnswer::NotFound, "not-found"),
            (UpstreamAnswer::Refused(401), "refused-401"),
            (UpstreamAnswer::Status(503), "status-503"),
            (UpstreamAnswer::Timeout, "timeout"),
            (UpstreamAnswer::Unreachable, "unreachable"),
        ] {
            assert_eq!(answer.label(), want);
        }
        for s in [TagSource::Upstream, TagSource::Cluster, TagSource::Stale] {
            assert_eq!(s.as_str(), s.as_str().to_ascii_lowercase());
        }
    }

    #[test]
    fn token_refusals_are_private_other_errors_unreachable() {
        let refused = |status: Option<u16>| UpstreamError::Token {
            realm: "http://127.0.0.1:1/token".into(),
            reason: "x".into(),
            status: status.map(|s| StatusCode::from_u16(s).expect("status")),
        };
        assert_eq!(
            from_error(&refused(Some(401))),
            UpstreamAnswer::Refused(401)
        );
        assert_eq!(
            from_error(&refused(Some(403))),
            UpstreamAnswer::Refused(403)
        );
        assert_eq!(from_error(&refused(Some(500))), UpstreamAnswer::Unreachable);
        assert_eq!(from_error(&refused(None)), UpstreamAnswer::Unreachable);
        let length = UpstreamError::Length { url: "u".into() };
        assert_eq!(from_error(&length), UpstreamAnswer::Unreachable);
    }
}
