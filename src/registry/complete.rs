//! Complete-or-nothing, one job: answer a containers/image client's manifest request (CRI-O,
//! podman, skopeo: the registry came in the path, [`PullRequest::path_encoded`]) only when
//! this node can deliver every blob the image names, because such a client takes every blob
//! from the source that answered the manifest and never falls back per blob.
//!
//! The manifest comes from this node's store, its cache (`crate::cache::manifests`), a peer,
//! or — public images only — an anonymous upstream `GET` into the cache. Then:
//! - an image manifest is answered when its config and every layer can be delivered: held by
//!   the store or the cache (complete or in flight), or a peer answers a `HEAD` for it (the
//!   router's holders, tried in the mirror's order: the liveness check), or — public images,
//!   with the cache's cold path on — upstream answers an anonymous `HEAD` (the blob request
//!   then fetches it once for the cluster into the cache);
//! - an index is answered when the manifests for this node's platform (`linux/<arch>`; all
//!   of them when the index has none for it) are complete in that sense; nested indexes are
//!   refused. The client may pick another platform: that manifest is then checked on its own
//!   request, and a 404 there fails the client's pull (the one case we cannot cover without
//!   checking every platform, which peers of one architecture never could pass).
//! - anything else — a private image (the policy's `require_grant` without a grant of a pod
//!   on this node, or upstream refusing anonymous access), an unparseable manifest, a blob
//!   nobody can deliver — is a 404: the client goes to the next source and upstream, with its
//!   own credentials (it never sends them to a mirror on another host).
//!
//! A private image with a valid grant is checked against peers only (the grant headers go
//! with every probe; the serving peer checks them) and never cached. Manifests this node
//! fetched for a public image (upstream or peers) are kept in the cache with the tag that
//! named them, so the node serves its neighbours without a containerd store.
//!
//! Also here: [`cached_manifest`], the responder serving manifests from the cache on both
//! endpoints, and [`registry_allowed`], which registries a client may name in the path.

use std::time::Instant;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http::{StatusCode, header};

use super::access_log::AccessLog;
use super::body::{Counted, content_head};
use super::guard::Guard;
use super::metrics::{Outcome, Source};
use super::{PullRequest, RegistryError, RegistryState};
use crate::audit::NullSink;
use crate::cache::upstream::UpstreamError;
use crate::oci::{Digest, Kind, Target, media};
use crate::policy;
use crate::wire::DOCKER_CONTENT_DIGEST;

/// Most blobs one image manifest may name for us to check it (beyond: 404, the client goes
/// upstream).
pub(crate) const MAX_BLOBS: usize = 512;
/// Most platform manifests of one index checked.
const MAX_PLATFORMS: usize = 16;

/// A manifest in hand.
struct Got {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
    source: Source,
}

/// Why no manifest could be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    /// Nobody has it (or upstream could not be asked).
    Missing,
    /// Upstream refused anonymous access: a private image.
    Private,
}

/// What the check needs to know about the request, beside the request.
struct Check<'a> {
    state: &'a RegistryState,
    guard: &'a Guard,
    req: &'a PullRequest,
    ns: &'a str,
    /// No grant needed: upstream may be asked, and what is fetched is cached.
    public: bool,
}

/// Whether a path-encoded request may name its registry: one of the mirrored registries
/// (`hosts.mirrored_registries`; any with `_default` or without a tag resolver). Requests
/// with `?ns=` are containerd's and always allowed.
pub(super) fn registry_allowed(state: &RegistryState, req: &PullRequest) -> bool {
    if !req.path_encoded {
        return true;
    }
    let (Some(ns), Some(mirror)) = (&req.ns, &state.mirror) else {
        return false;
    };
    mirror.tags().is_none_or(|t| t.mirrors(ns))
}

/// Mirror endpoint, a containers/image manifest request (the caller checked the policy and,
/// for a private object, put the grants on the request): the manifest when the whole image
/// can be delivered, else a 404. `asked` is the reference the client sent (a tag resolved
/// upstream-first arrives here as its digest; the tag is kept with the manifest).
pub(super) async fn manifest(
    state: &RegistryState,
    guard: &Guard,
    decision: &policy::Decision,
    asked: &Target,
    req: &mut PullRequest,
    log: &AccessLog,
) -> (Response, Outcome) {
    let started = Instant::now();
    state.add_peer_token(guard, req).await;
    let req: &PullRequest = req;
    let Some(ns) = req.ns.as_deref() else {
        return not_found(req, log, "no registry");
    };
    let check = Check {
        state,
        guard,
        req,
        ns,
        public: !decision.require_grant,
    };
    let got = match check.obtain(&req.path.target).await {
        Ok(got) => got,
        Err(miss) => {
            let why = match miss {
                Miss::Missing => "manifest not found",
                Miss::Private => "upstream refuses anonymous access",
            };
            return not_found(req, log, why);
        }
    };
    let complete = if media::is_index_type(&got.media_type) {
        check.index(&got).await
    } else {
        check.image(&got).await
    };
    tracing::debug!(
        registry = ns,
        reference = %req.path.target,
        digest = %got.digest,
        complete,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "complete-or-nothing check"
    );
    if !complete {
        return not_found(req, log, "image not complete here");
    }
    if check.public {
        let tag = match asked {
            Target::Tag(t) => Some(t.as_str()),
            Target::Digest(_) => None,
        };
        check.keep(&got, tag).await;
    }
    log.set_digest(got.digest.to_string());
    let outcome = match got.source {
        Source::Local | Source::Cache => Outcome::Local,
        _ => Outcome::Peer,
    };
    (respond(state, req, &got, log.clone()), outcome)
}

fn not_found(req: &PullRequest, log: &AccessLog, why: &str) -> (Response, Outcome) {
    tracing::debug!(
        registry = req.ns.as_deref().unwrap_or(""),
        reference = %req.path.target,
        decision = "not-complete",
        reason = why,
        "containers/image manifest refused: the client goes upstream"
    );
    let e = RegistryError::ManifestUnknown;
    log.finish(e.status(), 0, None);
    (e.into_response(), Outcome::Miss)
}

fn respond(state: &RegistryState, req: &PullRequest, got: &Got, log: AccessLog) -> Response {
    let status = StatusCode::OK;
    let b = content_head(
        status,
        &got.media_type,
        &got.digest.to_string(),
        got.bytes.len() as u64,
        None,
    );
    let body = if req.head {
        log.finish(status, 0, Some(got.source));
        Body::empty()
    } else {
        let stream = futures::stream::iter([Ok(got.bytes.clone())]).boxed();
        Counted::body(stream, state, got.source, log, status)
    };
    b.body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Both endpoints: manifest `digest` from the cache (`crate::cache::manifests`).
/// `Ok(None)` when the cache is off or does not hold it as a manifest.
pub(super) async fn cached_manifest(
    state: &RegistryState,
    req: &PullRequest,
    digest: &Digest,
    log: &AccessLog,
) -> Result<Option<Response>, RegistryError> {
    let (Some(c), Kind::Manifest) = (&state.cache, req.path.kind) else {
        return Ok(None);
    };
    let Some((media_type, bytes)) = c.cache().read_manifest(digest).await else {
        return Ok(None);
    };
    let got = Got {
        digest: digest.clone(),
        media_type,
        bytes,
        source: Source::Cache,
    };
    Ok(Some(respond(state, req, &got, log.clone())))
}

/// The node's platform as an index names it.
fn node_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "x86" => "386",
        other => other,
    };
    ("linux", arch)
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageManifest {
    config: Option<Blob>,
    #[serde(default)]
    layers: Vec<Blob>,
}

#[derive(serde::Deserialize)]
struct Blob {
    digest: Digest,
}

#[derive(serde::Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    digest: Digest,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

/// The platform manifests of an index to check: this node's platform, or every real platform
/// when none matches (attestations, `unknown/unknown`, are skipped).
fn platform_children(index: &Index, (os, arch): (&str, &str)) -> Vec<Digest> {
    let real: Vec<&IndexEntry> = index
        .manifests
        .iter()
        .filter(|m| {
            m.platform
                .as_ref()
                .is_none_or(|p| p.os != "unknown" && p.architecture != "unknown")
        })
        .collect();
    let mine: Vec<Digest> = real
        .iter()
        .filter(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == arch)
        })
        .map(|m| m.digest.clone())
        .collect();
    if mine.is_empty() {
        real.iter().map(|m| m.digest.clone()).collect()
    } else {
        mine
    }
}

/// The blobs an image manifest names (config first), `None` when it is not an image manifest.
fn image_blobs(bytes: &[u8]) -> Option<Vec<Digest>> {
    let m: ImageManifest = serde_json::from_slice(bytes).ok()?;
    let mut out: Vec<Digest> = m.config.into_iter().map(|b| b.digest).collect();
    out.extend(m.layers.into_iter().map(|b| b.digest));
    (!out.is_empty()).then_some(out)
}

impl Check<'_> {
    /// The manifest `target` names, from the first source that has it.
    async fn obtain(&self, target: &Target) -> Result<Got, Miss> {
        let (state, req, ns) = (self.state, self.req, self.ns);
        // 1. This node's store.
        let digest = match target {
            Target::Digest(d) => Some(d.clone()),
            Target::Tag(tag) => state
                .store
                .resolve(ns, &req.path.name, tag)
                .await
                .ok()
                .flatten(),
        };
        if let Some(d) = &digest
            && let Ok(Some(desc)) = state.store.descriptor(d).await
            && media::is_manifest_type(&desc.media_type)
            && let Ok(bytes) = state.store.read_small(d, media::MAX_MANIFEST_BYTES).await
            && Digest::sha256_of(&bytes) == *d
        {
            return Ok(Got {
                digest: d.clone(),
                media_type: desc.media_type,
                bytes,
                source: Source::Local,
            });
        }
        // 2. The own cache (by digest, or the tag it last saw).
        if let Some(c) = &state.cache {
            let d = match target {
                Target::Digest(d) => Some(d.clone()),
                Target::Tag(tag) => c.cache().tag(ns, &req.path.name, tag).await,
            };
            if let Some(d) = d
                && let Some((media_type, bytes)) = c.cache().read_manifest(&d).await
            {
                return Ok(Got {
                    digest: d,
                    media_type,
                    bytes,
                    source: Source::Cache,
                });
            }
        }
        // 3. Peers.
        if let Some(got) = self.ask_peers(target).await {
            return Ok(got);
        }
        // 4. Upstream, anonymously: public images of mirrored registries only.
        if self.public {
            return self.ask_upstream(target).await;
        }
        Err(Miss::Missing)
    }

    /// A probe: this request, re-aimed at `target` of `kind`, quietly logged (the client's
    /// record is the caller's).
    fn probe(&self, kind: Kind, target: &Target, head: bool) -> (PullRequest, AccessLog) {
        let mut probe = self.req.clone();
        probe.head = head;
        probe.range = None;
        probe.path.kind = kind;
        probe.path.target = target.clone();
        let log = AccessLog::new(
            &probe,
            self.state.handler,
            Instant::now(),
            &self.guard.node,
            std::sync::Arc::new(NullSink),
        );
        (probe, log)
    }

    async fn ask_peers(&self, target: &Target) -> Option<Got> {
        let mirror = self.state.mirror.as_ref()?;
        let (probe, log) = self.probe(Kind::Manifest, target, false);
        let key = probe.key()?;
        let resp = mirror.fetch(&key, &probe, self.state, log).await.ok()??;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|t| media::is_manifest_type(t))?
            .to_owned();
        let digest: Digest = resp
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|d| d.parse().ok())?;
        let bytes = axum::body::to_bytes(resp.into_body(), media::MAX_MANIFEST_BYTES as usize)
            .await
            .ok()?;
        (Digest::sha256_of(&bytes) == digest).then_some(Got {
            digest,
            media_type,
            bytes,
            source: Source::Peer,
        })
    }

    async fn ask_upstream(&self, target: &Target) -> Result<Got, Miss> {
        let tags = self
            .state
            .mirror
            .as_ref()
            .and_then(|m| m.tags())
            .filter(|t| t.mirrors(self.ns))
            .ok_or(Miss::Missing)?;
        let accept = self.req.accept.clone().unwrap_or_else(|| {
            [
                media::OCI_INDEX,
                media::OCI_MANIFEST,
                media::DOCKER_LIST,
                media::DOCKER_MANIFEST,
            ]
            .join(", ")
        });
        let resp = match tags
            .upstream()
            .manifest_get(self.ns, &self.req.path.name, &target.to_string(), &accept)
            .await
        {
            Ok(r) => r,
            Err(UpstreamError::Token {
                status: Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
                ..
            }) => return Err(Miss::Private),
            Err(e) => {
                tracing::debug!(registry = self.ns, error = %e, "upstream manifest fetch failed");
                return Err(Miss::Missing);
            }
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(Miss::Private),
            _ => return Err(Miss::Missing),
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|t| media::is_manifest_type(t))
            .ok_or(Miss::Missing)?;
        if resp
            .content_length()
            .is_some_and(|l| l > media::MAX_MANIFEST_BYTES)
        {
            return Err(Miss::Missing);
        }
        let bytes = resp.bytes().await.map_err(|_| Miss::Missing)?;
        if bytes.len() as u64 > media::MAX_MANIFEST_BYTES {
            return Err(Miss::Missing);
        }
        let digest = Digest::sha256_of(&bytes);
        if let Target::Digest(want) = target
            && *want != digest
        {
            return Err(Miss::Missing);
        }
        Ok(Got {
            digest,
            media_type,
            bytes,
            source: Source::Upstream,
        })
    }

    /// An index: the platform manifests to check, each obtained and complete (and, for a
    /// public image, kept in the cache).
    async fn index(&self, got: &Got) -> bool {
        let Ok(index) = serde_json::from_slice::<Index>(&got.bytes) else {
            return false;
        };
        let children = platform_children(&index, node_platform());
        if children.is_empty() || children.len() > MAX_PLATFORMS {
            return false;
        }
        for child in children {
            let Ok(m) = self.obtain(&Target::Digest(child)).await else {
                return false;
            };
            if media::is_index_type(&m.media_type) || !self.image(&m).await {
                return false;
            }
            if self.public {
                self.keep(&m, None).await;
            }
        }
        true
    }

    /// An image manifest: every blob it names can be delivered.
    async fn image(&self, got: &Got) -> bool {
        let Some(blobs) = image_blobs(&got.bytes) else {
            return false;
        };
        if blobs.len() > MAX_BLOBS {
            return false;
        }
        let checks = blobs.iter().map(|d| self.deliverable(d));
        futures::future::join_all(checks)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// Whether blob `digest` can be delivered to the client by the responder chain.
    async fn deliverable(&self, digest: &Digest) -> bool {
        let state = self.state;
        if matches!(state.store.descriptor(digest).await, Ok(Some(_))) {
            return true;
        }
        if let Some(c) = &state.cache
            && c.cache().contains(digest)
        {
            return true;
        }
        if let Some(mirror) = &state.mirror {
            let (probe, log) = self.probe(Kind::Blob, &Target::Digest(digest.clone()), true);
            if let Ok(Some(resp)) = mirror.fetch(&digest.to_string(), &probe, state, log).await
                && resp.status() == StatusCode::OK
            {
                return true;
            }
        }
        // The cold path will fetch it (once for the cluster) when the blob is asked for.
        if self.public
            && state.cache.as_ref().is_some_and(|c| c.upstream_fetch())
            && let Some(tags) = state.mirror.as_ref().and_then(|m| m.tags())
            && tags.mirrors(self.ns)
        {
            return matches!(
                tags.upstream()
                    .blob_head(self.ns, &self.req.path.name, digest)
                    .await,
                Ok(StatusCode::OK)
            );
        }
        false
    }

    /// Keeps a manifest fetched from elsewhere in the cache, with the tag that named it.
    async fn keep(&self, got: &Got, tag: Option<&str>) {
        let Some(c) = &self.state.cache else {
            return;
        };
        let cache = c.cache();
        if got.source != Source::Local
            && let Err(e) = cache
                .put_manifest(&got.digest, &got.media_type, &got.bytes)
                .await
        {
            tracing::warn!(digest = %got.digest, error = %e, "caching a manifest failed");
            return;
        }
        if let Some(tag) = tag
            && got.source != Source::Local
            && let Err(e) = cache
                .put_tag(self.ns, &self.req.path.name, tag, &got.digest)
                .await
        {
            tracing::warn!(digest = %got.digest, error = %e, "caching a tag failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn d(s: &str) -> Digest {
        s.parse().expect("digest")
    }

    #[test]
    fn platform_table() {
        let entry = |digest: &str, p: Option<(&str, &str)>| {
            let platform = p.map(|(os, arch)| {
                format!(r#","platform":{{"os":"{os}","architecture":"{arch}"}}"#)
            });
            format!(
                r#"{{"digest":"{digest}","size":1{}}}"#,
                platform.unwrap_or_default()
            )
        };
        let index = |entries: &[String]| -> Index {
            serde_json::from_str(&format!(r#"{{"manifests":[{}]}}"#, entries.join(",")))
                .expect("index")
        };
        let cases: Vec<(&str, Index, Vec<Digest>)> = vec![
            (
                "mine only",
                index(&[
                    entry(A, Some(("linux", "amd64"))),
                    entry(B, Some(("linux", "arm64"))),
                ]),
                vec![d(A)],
            ),
            (
                "none mine: all real ones",
                index(&[
                    entry(B, Some(("linux", "arm64"))),
                    entry(C, Some(("unknown", "unknown"))),
                ]),
                vec![d(B)],
            ),
            ("no platform: checked", index(&[entry(A, None)]), vec![d(A)]),
            (
                "attestations only",
                index(&[entry(C, Some(("unknown", "unknown")))]),
                vec![],
            ),
            ("empty", index(&[]), vec![]),
        ];
        for (name, idx, want) in cases {
            assert_eq!(platform_children(&idx, ("linux", "amd64")), want, "{name}");
        }
    }

    #[test]
    fn image_blobs_table() {
        let cases: Vec<(&str, String, Option<Vec<Digest>>)> = vec![
            (
                "config and layers",
                format!(
                    r#"{{"schemaVersion":2,"config":{{"digest":"{A}","size":1}},"layers":[{{"digest":"{B}","size":2}},{{"digest":"{C}","size":3}}]}}"#
                ),
                Some(vec![d(A), d(B), d(C)]),
            ),
            (
                "subject is not a blob to deliver",
                format!(
                    r#"{{"config":{{"digest":"{A}","size":1}},"layers":[],"subject":{{"digest":"{B}","size":2}}}}"#
                ),
                Some(vec![d(A)]),
            ),
            ("nothing named", r#"{"schemaVersion":2}"#.into(), None),
            ("not json", "nope".into(), None),
            (
                "bad digest",
                r#"{"config":{"digest":"md5:x","size":1}}"#.into(),
                None,
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(image_blobs(input.as_bytes()), want, "{name}");
        }
    }
}
