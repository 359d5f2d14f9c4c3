//! Response bodies and heads, one job: how a successful response goes out whoever serves it.
//! [`Counted`] counts a body's bytes into `served_bytes` and finishes the access log when the
//! body ends or is dropped; [`LocalSend`] is the same accounting for a file the transport sends
//! with `sendfile(2)` (a [`SendObserver`]); [`content_head`] is the one builder of content
//! response headers, for local, cache and peer responses alike.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use http::{StatusCode, header};
use prometheus_client::metrics::counter::Counter;

use super::RegistryState;
use super::access_log::AccessLog;
use super::metrics::Source;
use crate::oci::ByteRange;
use crate::server::SendObserver;
use crate::wire::DOCKER_CONTENT_DIGEST;

/// A body stream that counts bytes into a metric and writes the access line when it ends or
/// is dropped (a client that disconnects mid-blob still gets its line, with `complete=false`
/// visible as a short byte count and status).
pub(crate) struct Counted {
    inner: BoxStream<'static, std::io::Result<Bytes>>,
    sent: u64,
    counter: Counter,
    log: AccessLog,
    status: StatusCode,
    source: Source,
    /// Set when the bytes went out through the response's [`FileBody`] instead: then the
    /// file sender writes the record, and this stream, never polled, must not write a 0.
    claimed: Option<Arc<AtomicBool>>,
}

impl Counted {
    /// A body that counts into this listener's `served_bytes` for `source` and finishes `log`.
    pub fn body(
        inner: BoxStream<'static, std::io::Result<Bytes>>,
        state: &RegistryState,
        source: Source,
        log: AccessLog,
        status: StatusCode,
    ) -> Body {
        Body::from_stream(Counted {
            inner,
            sent: 0,
            counter: bytes_counter(state, source),
            log,
            status,
            source,
            claimed: None,
        })
    }

    /// [`Counted::body`] for a stream whose bytes may instead go out through the response's
    /// [`FileBody`](crate::server::FileBody): once `claimed` is set, this stream writes nothing.
    pub fn body_of_file(
        inner: BoxStream<'static, std::io::Result<Bytes>>,
        state: &RegistryState,
        log: AccessLog,
        status: StatusCode,
        claimed: Arc<AtomicBool>,
    ) -> Body {
        Body::from_stream(Counted {
            inner,
            sent: 0,
            counter: bytes_counter(state, Source::Local),
            log,
            status,
            source: Source::Local,
            claimed: Some(claimed),
        })
    }
}

/// The bytes-served counter of this listener for `source`.
pub(super) fn bytes_counter(state: &RegistryState, source: Source) -> Counter {
    state.metrics.bytes(state.handler, source)
}

/// What the registry hears from the transport's file sender ([`FileBody`]): bytes counted
/// into the listener's `served_bytes` and `served_sendfile_bytes`, and the one audit record
/// with the bytes really sent.
pub(super) struct LocalSend {
    pub(super) counter: Counter,
    pub(super) sendfile_counter: Counter,
    pub(super) log: AccessLog,
    pub(super) status: StatusCode,
}

impl SendObserver for LocalSend {
    fn sent(&self, n: u64) {
        self.counter.inc_by(n);
        self.sendfile_counter.inc_by(n);
    }

    fn done(&self, total: u64) {
        self.log.finish(self.status, total, Some(Source::Local));
    }
}

impl Stream for Counted {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &item {
            let n = chunk.len() as u64;
            self.sent += n;
            self.counter.inc_by(n);
        }
        item
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self
            .claimed
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Acquire))
        {
            return;
        }
        self.log.finish(self.status, self.sent, Some(self.source));
    }
}

/// The head of a content response (manifest or blob), the same whoever serves it — this node's
/// store, its cache, or a peer: `Content-Type`, `Docker-Content-Digest`, `Accept-Ranges`,
/// `ETag` (the digest, quoted: content-addressed bytes never change), `Content-Range` for a
/// 206, status and `Content-Length`.
pub(crate) fn content_head(
    status: StatusCode,
    media_type: &str,
    digest: &str,
    len: u64,
    content_range: Option<String>,
) -> http::response::Builder {
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, media_type)
        .header(DOCKER_CONTENT_DIGEST, digest)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""));
    if let Some(cr) = content_range {
        b = b.header(header::CONTENT_RANGE, cr);
    }
    b.status(status).header(header::CONTENT_LENGTH, len)
}

/// Status, body length and `Content-Range` of a response with `range` of `size` bytes.
pub fn ranged(range: Option<ByteRange>, size: u64) -> (StatusCode, u64, Option<String>) {
    match range {
        Some(r) => (
            StatusCode::PARTIAL_CONTENT,
            r.len(),
            Some(r.content_range(size)),
        ),
        None => (StatusCode::OK, size, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_head_table() {
        let d = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let cases = [
            ("whole", None, 10, 200, "10", None),
            (
                "range",
                Some(ByteRange { start: 2, end: 4 }),
                10,
                206,
                "3",
                Some("bytes 2-4/10"),
            ),
        ];
        for (name, range, size, status, len, cr) in cases {
            let (s, l, c) = ranged(range, size);
            let r = content_head(s, "application/octet-stream", d, l, c)
                .body(())
                .expect("response");
            let h = r.headers();
            assert_eq!(r.status().as_u16(), status, "{name}");
            assert_eq!(h[header::CONTENT_LENGTH], len, "{name}");
            assert_eq!(h[header::ETAG], format!("\"{d}\"").as_str(), "{name}");
            assert_eq!(h[DOCKER_CONTENT_DIGEST], d, "{name}");
            assert_eq!(h[header::ACCEPT_RANGES], "bytes", "{name}");
            assert_eq!(
                h.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()),
                cr,
                "{name}"
            );
        }
    }
}
