//! The local responder, one job: serve a manifest or blob from this node's store (with
//! `Range` support), or say it is not here (`Ok(None)`) so the next responder is asked.
//!
//! When the store can hand out the content file ([`Store::open_file`](crate::store::Store)),
//! the response carries it as a [`FileBody`] extension next to an ordinary body streaming the
//! same bytes: the transport's writer (`crate::server::http1`) sends the file with
//! `sendfile(2)`, any other writer (hyper) streams the body. Whichever runs counts the bytes
//! and writes the one audit record ([`super::body`]).

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::stream::BoxStream;
use http::StatusCode;

use super::access_log::AccessLog;
use super::body::{Counted, LocalSend, bytes_counter, content_head, ranged};
use super::metrics::Source;
use super::{PullRequest, RegistryError, RegistryState};
use crate::oci::range::parse_range;
use crate::oci::{Digest, Kind, media};
use crate::server::FileBody;
use crate::store::ContentFile;

/// Serves `digest` from this node's store. `Ok(None)` when the node does not hold it (or, for
/// a manifest request, holds it but it is not a manifest), so the caller can try peers.
pub async fn local(
    state: &RegistryState,
    req: &PullRequest,
    digest: &Digest,
    log: AccessLog,
) -> Result<Option<Response>, RegistryError> {
    let desc = match state.store.descriptor(digest).await {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!(%digest, error = %e, "store descriptor failed; treating as a miss");
            return Ok(None);
        }
    };
    if req.path.kind == Kind::Manifest && !media::is_manifest_type(&desc.media_type) {
        // Sending a layer as a manifest would break containerd's pull; a miss lets it go on.
        return Ok(None);
    }
    let range = match (&req.range, req.head) {
        (Some(h), false) => {
            Some(
                parse_range(h, desc.size).map_err(|source| RegistryError::Range {
                    source,
                    size: desc.size,
                })?,
            )
        }
        _ => None,
    };
    let (status, length, content_range) = ranged(range, desc.size);
    let builder = content_head(
        status,
        &desc.media_type,
        &digest.to_string(),
        length,
        content_range,
    );
    if req.head {
        log.finish(status, 0, Some(Source::Local));
        return Ok(builder.body(Body::empty()).ok());
    }
    let file = match state.store.open_file(digest, range).await {
        Ok(f) => f.and_then(|f| file_body(f, state, &log, status)),
        Err(e) => {
            // Garbage collected between descriptor and open, or containerd went away.
            tracing::warn!(%digest, error = %e, "store open failed; treating as a miss");
            return Ok(None);
        }
    };
    if let Some((stream, file)) = file {
        let body = Counted::body_of_file(stream, state, log, status, file.claimed());
        return Ok(builder.extension(file).body(body).ok());
    }
    let stream = match state.store.open(digest, range).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%digest, error = %e, "store open failed; treating as a miss");
            return Ok(None);
        }
    };
    let body = Counted::body(stream, state, Source::Local, log, status);
    Ok(builder.body(body).ok())
}

/// The two ways to send an opened content file: a stream over a duplicate of its descriptor
/// (for hyper) and the [`FileBody`] (for sendfile). `None` when the descriptor cannot be
/// duplicated (out of descriptors): the caller streams through the store instead.
fn file_body(
    opened: ContentFile,
    state: &RegistryState,
    log: &AccessLog,
    status: StatusCode,
) -> Option<(BoxStream<'static, std::io::Result<Bytes>>, FileBody)> {
    // A duplicate shares the file position with the original; only the stream uses the
    // position (sendfile is given explicit offsets), so the two never disturb each other.
    let dup = opened.file.try_clone().ok()?;
    let stream = ContentFile {
        file: dup,
        offset: opened.offset,
        len: opened.len,
    }
    .stream()
    .ok()?;
    let observer = LocalSend {
        counter: bytes_counter(state, Source::Local),
        sendfile_counter: state.metrics.sendfile_bytes(),
        log: log.clone(),
        status,
    };
    let file = FileBody::new(
        Arc::new(opened.file),
        opened.offset,
        opened.len,
        Arc::new(observer),
    );
    Some((stream, file))
}
