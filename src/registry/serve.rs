//! Writing successful responses: content from this node's store (with `Range` support), the
//! byte-counting body wrapper shared with the mirror path, and the one audit record each
//! request produces once its body is finished (or abandoned).
//!
//! When the store can hand out the content file ([`Store::open_file`](crate::store::Store)),
//! the response carries it as a [`FileBody`] extension next to an ordinary body streaming the
//! same bytes: the connection writer in [`crate::server::http1`] sends the file with `sendfile(2)`,
//! any other writer (hyper) streams the body. Whichever runs counts the bytes and writes the
//! one audit record.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use http::{StatusCode, header};
use prometheus_client::metrics::counter::Counter;

use super::metrics::{Handler, Source};
use super::{Guard, PullRequest, RegistryError, RegistryState};
use crate::audit::{AuditRecord, AuditSink};
use crate::oci::range::parse_range;
use crate::oci::{Digest, Kind, media};
use crate::server::{FileBody, SendObserver};
use crate::store::ContentFile;
use crate::wire::DOCKER_CONTENT_DIGEST;

/// One audit record per request, written once: when an error is answered, when a HEAD is
/// answered, or when a body has been fully sent or dropped by the client (a client that
/// disconnects mid-blob still gets its record, with the short byte count).
#[derive(Clone)]
pub struct AccessLog(Arc<AccessInner>);

struct AccessInner {
    done: AtomicBool,
    started: Instant,
    method: &'static str,
    handler: Handler,
    kind: Kind,
    registry: String,
    repository: String,
    reference: String,
    client: std::net::SocketAddr,
    hop: bool,
    node: String,
    audit: Arc<dyn AuditSink>,
    // A std Mutex: set once or twice per request, never held across an `.await`.
    learned: Mutex<Learned>,
}

/// What the request learns on its way: the decision, the digest, the peer that served it.
#[derive(Default)]
struct Learned {
    allowed: Option<bool>,
    reason: String,
    digest: Option<String>,
    peer: Option<String>,
    namespaces: Vec<String>,
    requester: Option<String>,
    grant: Option<String>,
    tag_source: Option<&'static str>,
    tag_upstream: Option<String>,
}

impl AccessLog {
    pub fn new(req: &PullRequest, handler: Handler, started: Instant, guard: &Guard) -> AccessLog {
        AccessLog(Arc::new(AccessInner {
            done: AtomicBool::new(false),
            started,
            method: if req.head { "HEAD" } else { "GET" },
            handler,
            kind: req.path.kind,
            registry: req.ns.clone().unwrap_or_default(),
            repository: req.path.name.clone(),
            reference: req.path.target.to_string(),
            client: req.client,
            hop: req.hop,
            node: guard.node.clone(),
            audit: guard.audit.clone(),
            learned: Mutex::new(Learned {
                digest: match &req.path.target {
                    crate::oci::Target::Digest(d) => Some(d.to_string()),
                    crate::oci::Target::Tag(_) => None,
                },
                ..Learned::default()
            }),
        }))
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.0.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the policy decision.
    pub fn decided(&self, allowed: bool, reason: &str) {
        let mut l = self.learned();
        l.allowed = Some(allowed);
        l.reason = reason.to_owned();
    }

    /// Records the digest being served (what a tag resolved to).
    pub fn set_digest(&self, digest: String) {
        self.learned().digest = Some(digest);
    }

    /// Records the namespaces the decision was made for.
    pub fn set_namespaces(&self, namespaces: Vec<String>) {
        self.learned().namespaces = namespaces;
    }

    /// Records the node a peer request proved it came from.
    pub fn set_requester(&self, node: String) {
        self.learned().requester = Some(node);
    }

    /// Records the grant (`namespace/pod`) a private object is served under.
    pub fn set_grant(&self, grant: String) {
        self.learned().grant = Some(grant);
    }

    /// Records who named a tag's digest (`upstream`, `cluster`, `stale`) and what upstream
    /// answered, when it was asked.
    pub fn set_tag(&self, source: &'static str, upstream: Option<String>) {
        let mut l = self.learned();
        l.tag_source = Some(source);
        l.tag_upstream = upstream;
    }

    /// Records the peer the bytes come from.
    pub fn set_peer(&self, peer: String) {
        self.learned().peer = Some(peer);
    }

    /// Writes the record (only the first call writes). `source` is where the bytes came from:
    /// `local`, `peer`, or `none` (nobody had it: containerd goes upstream).
    pub fn finish(&self, status: StatusCode, bytes: u64, source: &str) {
        let a = &self.0;
        if a.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let learned = std::mem::take(&mut *self.learned());
        let from_peer = a.handler == Handler::Peer || a.hop;
        let record = AuditRecord {
            time: crate::audit::now(),
            event: "request".to_owned(),
            node: a.node.clone(),
            client: a.client.to_string(),
            source: if from_peer { "peer" } else { "containerd" }.to_owned(),
            registry: a.registry.clone(),
            repository: a.repository.clone(),
            reference: a.reference.clone(),
            digest: learned.digest,
            kind: a.kind.as_str().to_owned(),
            method: a.method.to_owned(),
            namespaces: learned.namespaces,
            requester: learned.requester,
            grant: learned.grant,
            tag_source: learned.tag_source.map(str::to_owned),
            tag_upstream: learned.tag_upstream,
            decision: match learned.allowed {
                Some(true) | None => "allow",
                Some(false) => "deny",
            }
            .to_owned(),
            reason: learned.reason,
            // `upstream` also for a miss: containerd then goes there itself (status 404).
            served_from: match source {
                "local" | "peer" | "cache" | "peer-inflight" => source,
                _ => "upstream",
            }
            .to_owned(),
            peer: learned.peer,
            status: status.as_u16(),
            bytes,
            duration_ms: a.started.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::debug!(
            handler = ?a.handler,
            registry = %record.registry,
            reference = %record.reference,
            client.addr = %a.client,
            http.status = record.status,
            bytes,
            source,
            decision = %record.decision,
            tag.source = record.tag_source.as_deref().unwrap_or(""),
            "request"
        );
        a.audit.record(record);
    }
}

/// A body stream that counts bytes into a metric and writes the access line when it ends or
/// is dropped (a client that disconnects mid-blob still gets its line, with `complete=false`
/// visible as a short byte count and status).
pub struct Counted {
    inner: BoxStream<'static, std::io::Result<Bytes>>,
    sent: u64,
    counter: Counter,
    log: AccessLog,
    status: StatusCode,
    source: &'static str,
    /// Set when the bytes went out through the response's [`FileBody`] instead: then the
    /// file sender writes the record, and this stream, never polled, must not write a 0.
    claimed: Option<Arc<AtomicBool>>,
}

impl Counted {
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
            source: source.as_str(),
            claimed: None,
        })
    }
}

/// The bytes-served counter of this listener for `source`.
fn bytes_counter(state: &RegistryState, source: Source) -> Counter {
    state.metrics.bytes(state.handler, source)
}

/// What the registry hears from the transport's file sender ([`FileBody`]): bytes counted
/// into the listener's `served_bytes` and `served_sendfile_bytes`, and the one audit record
/// with the bytes really sent.
struct LocalSend {
    counter: Counter,
    sendfile_counter: Counter,
    log: AccessLog,
    status: StatusCode,
}

impl SendObserver for LocalSend {
    fn sent(&self, n: u64) {
        self.counter.inc_by(n);
        self.sendfile_counter.inc_by(n);
    }

    fn done(&self, total: u64) {
        self.log.finish(self.status, total, Source::Local.as_str());
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
        self.log.finish(self.status, self.sent, self.source);
    }
}

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
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, &desc.media_type)
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""));
    let (status, length) = match range {
        Some(r) => {
            builder = builder.header(header::CONTENT_RANGE, r.content_range(desc.size));
            (StatusCode::PARTIAL_CONTENT, r.len())
        }
        None => (StatusCode::OK, desc.size),
    };
    builder = builder
        .status(status)
        .header(header::CONTENT_LENGTH, length);
    if req.head {
        log.finish(status, 0, "local");
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
        let body = Body::from_stream(Counted {
            inner: stream,
            sent: 0,
            counter: bytes_counter(state, Source::Local),
            log,
            status,
            source: Source::Local.as_str(),
            claimed: Some(file.claimed()),
        });
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
