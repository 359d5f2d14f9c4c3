//! The cache responder, one job: responses from the blob cache (`src/cache`): blobs this node holds in its own cache,
//! complete or in flight (both endpoints), and the cold path where the mirror endpoint
//! coalesces a blob nobody holds (fetch it once from upstream, or follow the node that does).
//! `Content-Length` is always the blob's size as upstream announced it, also while the bytes
//! are still arriving.

use axum::body::Body;
use axum::response::Response;

use super::access_log::AccessLog;
use super::body::{Counted, content_head, ranged};
use super::metrics::Source;
use super::{PullRequest, RegistryError, RegistryState};
use crate::cache::coalesce::{Body as CachedBody, Origin};
use crate::oci::{Digest, Kind, media};

/// A blob from this node's cache. `Ok(None)` when the cache is off or lacks it.
pub(crate) async fn from_cache(
    state: &RegistryState,
    req: &PullRequest,
    digest: &Digest,
    log: &AccessLog,
) -> Result<Option<Response>, RegistryError> {
    let Some(c) = &state.cache else {
        return Ok(None);
    };
    if req.path.kind != Kind::Blob {
        return Ok(None);
    }
    let range = if req.head { None } else { req.range.as_deref() };
    match c.cached(digest, range).await {
        Ok(Some(body)) => Ok(Some(respond(state, req, digest, body, log.clone()))),
        Ok(None) => Ok(None),
        Err(source) => {
            let size = c
                .cache()
                .size(digest, std::time::Duration::ZERO)
                .await
                .unwrap_or(0);
            Err(RegistryError::Range { source, size })
        }
    }
}

/// The cold path on the mirror endpoint (the caller checked policy: allowed, no grant needed).
pub async fn coalesce(
    state: &RegistryState,
    req: &PullRequest,
    digest: &Digest,
    log: &AccessLog,
) -> Option<Response> {
    let c = state.cache.as_ref()?;
    let ns = req.ns.as_deref()?;
    if req.path.kind != Kind::Blob || req.head || req.hop {
        return None;
    }
    let body = c
        .fetch(
            ns,
            &req.path.name,
            digest,
            req.range.as_deref(),
            &req.peer_path(),
            &req.peer_headers,
        )
        .await?;
    Some(respond(state, req, digest, body, log.clone()))
}

fn respond(
    state: &RegistryState,
    req: &PullRequest,
    digest: &Digest,
    body: CachedBody,
    log: AccessLog,
) -> Response {
    let source = match body.origin {
        Origin::Cache => Source::Cache,
        Origin::Upstream => Source::Upstream,
        Origin::PeerInflight => Source::PeerInflight,
    };
    if let Some(peer) = body.peer.clone() {
        log.set_peer(peer);
    }
    let (status, length, content_range) = ranged(body.range, body.size);
    let b = content_head(
        status,
        media::OCTET_STREAM,
        &digest.to_string(),
        length,
        content_range,
    );
    let body = if req.head {
        log.finish(status, 0, Some(source));
        Body::empty()
    } else {
        Counted::body(body.stream, state, source, log, status)
    };
    b.body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
