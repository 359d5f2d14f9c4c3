//! The peers responder, one job: fetch from peers when the local store misses: look up who holds the key, try up to
//! `attempts` peers, and stream the first good answer back. A blob stream that breaks is
//! resumed from another peer with `Range`, so the client still receives one whole, correct
//! body. Manifests are small: they are buffered, checked against their digest and bounded by
//! an overall deadline. Any failure ends in `Ok(None)`: the caller answers 404 and containerd
//! goes upstream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use http::{StatusCode, header};
use tokio::sync::mpsc;

use super::access_log::AccessLog;
use super::body::{Counted, content_head};
use super::config::MirrorConfig;
use super::metrics::{RegistryMetrics, Source};
use super::tags::TagResolver;
use super::{PullRequest, RegistryError, RegistryState};
use crate::oci::range::parse_content_range;
use crate::oci::{Digest, Kind, Target, media};
use crate::routing::{Peer, Router};
use crate::wire::{
    ByteStream, DOCKER_CONTENT_DIGEST, PeerClient, Reopen, header_str, io_stream, resumable,
};

/// The peer mirror: a router to find peers and an HTTP client to fetch from them.
pub struct Mirror {
    router: Arc<dyn Router>,
    client: PeerClient,
    config: MirrorConfig,
    metrics: RegistryMetrics,
    /// Asks upstream which digest a tag names; `None`: every tag resolves through the cluster.
    tags: Option<TagResolver>,
}

/// Why one peer attempt failed; the label of `speculum_mirror_peer_failures_total`.
type Failure = &'static str;

impl Mirror {
    /// A mirror with a peer client of its own, built from `config`'s timeouts.
    pub fn new(
        router: Arc<dyn Router>,
        config: MirrorConfig,
        metrics: RegistryMetrics,
    ) -> Result<Mirror, reqwest::Error> {
        let client = PeerClient::new(config.connect_timeout, config.read_timeout)?;
        Ok(Mirror::with_client(router, config, metrics, client))
    }

    /// A mirror fetching through `client` (the daemon's one peer client, shared with the
    /// coalescer).
    pub fn with_client(
        router: Arc<dyn Router>,
        config: MirrorConfig,
        metrics: RegistryMetrics,
        client: PeerClient,
    ) -> Mirror {
        Mirror {
            router,
            client,
            config,
            metrics,
            tags: None,
        }
    }

    /// Resolves tags with `resolver` (`upstream-first`); without one (the default of
    /// [`Mirror::new`], so tests never reach out) the cluster answers every tag.
    pub fn with_tags(mut self, resolver: TagResolver) -> Mirror {
        self.tags = Some(resolver);
        self
    }

    pub fn tags(&self) -> Option<&TagResolver> {
        self.tags.as_ref()
    }

    /// Fetches the object of `req` from peers holding `key`. `Ok(None)` when no peer could
    /// serve it; `Err` only for an answer that must reach the client as is (a 416).
    pub async fn fetch(
        &self,
        key: &str,
        req: &PullRequest,
        state: &RegistryState,
        log: AccessLog,
    ) -> Result<Option<Response>, RegistryError> {
        let started = Instant::now();
        let rx = match self.router.lookup(key, self.config.attempts).await {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(key, error = %e, "lookup failed");
                return Ok(None);
            }
        };
        let wait = match req.path.kind {
            Kind::Blob => self.config.blob_resolve_timeout,
            _ => self.config.resolve_timeout,
        };
        let mut peers = PeerQueue::new(rx, wait);
        let deadline = tokio::time::Instant::now() + self.config.manifest_deadline;
        for attempt in 0..self.config.attempts {
            let Some(peer) = peers.next().await else {
                break;
            };
            if attempt == 0 {
                self.metrics.first_peer(started.elapsed());
            }
            let result = match req.path.kind {
                Kind::Manifest => {
                    match tokio::time::timeout_at(deadline, self.manifest(&peer, req)).await {
                        Ok(r) => r,
                        Err(_) => Err("deadline"),
                    }
                }
                Kind::Blob => self.blob(&peer, req, &mut peers).await,
            };
            if let Ok(Fetched::Whole(builder, _) | Fetched::Stream(builder, _)) = &result {
                log.set_peer(peer.id.to_string());
                log.set_digest(builder.digest.clone());
            }
            match result {
                Ok(Fetched::Whole(builder, bytes)) => {
                    let status = builder.status_code();
                    let body = if req.head {
                        log.finish(status, 0, Some(Source::Peer));
                        Body::empty()
                    } else {
                        let stream = futures::stream::iter([Ok(bytes)]).boxed();
                        Counted::body(stream, state, Source::Peer, log, status)
                    };
                    tracing::debug!(peer.id = %peer.id, key, "served from peer");
                    return Ok(Some(builder.into_response(body)));
                }
                Ok(Fetched::Stream(builder, stream)) => {
                    let status = builder.status_code();
                    let body = Counted::body(stream, state, Source::Peer, log, status);
                    tracing::debug!(peer.id = %peer.id, key, "streaming from peer");
                    return Ok(Some(builder.into_response(body)));
                }
                Ok(Fetched::Unsatisfiable(size)) => {
                    return Err(RegistryError::Range {
                        source: crate::oci::range::RangeError::Unsatisfiable,
                        size,
                    });
                }
                Err(reason) => {
                    self.failed(&peer, reason);
                }
            }
        }
        Ok(None)
    }

    fn failed(&self, peer: &Peer, reason: Failure) {
        self.metrics.peer_failed(reason);
        tracing::debug!(peer.id = %peer.id, peer.addr = %peer.addr, reason, "peer attempt failed");
    }

    fn request(&self, peer: &Peer, req: &PullRequest) -> reqwest::RequestBuilder {
        let method = if req.head {
            reqwest::Method::HEAD
        } else {
            reqwest::Method::GET
        };
        self.client
            .request(method, peer.addr, &req.peer_path(), &req.peer_headers)
    }

    /// A manifest from one peer: buffered whole and checked against its digest.
    async fn manifest(&self, peer: &Peer, req: &PullRequest) -> Result<Fetched, Failure> {
        let accept = [
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            media::DOCKER_LIST,
            media::DOCKER_MANIFEST,
        ]
        .join(", ");
        let mut resp = self
            .request(peer, req)
            .header(header::ACCEPT, accept)
            .send()
            .await
            .map_err(|_| "connect")?;
        if resp.status() != StatusCode::OK {
            return Err("status");
        }
        let digest: Digest = header_str(resp.headers(), DOCKER_CONTENT_DIGEST)
            .and_then(|d| d.parse().ok())
            .ok_or("digest-header")?;
        if let Target::Digest(want) = &req.path.target
            && *want != digest
        {
            return Err("digest-mismatch");
        }
        let media_type = header_str(resp.headers(), header::CONTENT_TYPE)
            .filter(|t| media::is_manifest_type(t))
            .ok_or("media-type")?
            .to_owned();
        let length: u64 = header_str(resp.headers(), header::CONTENT_LENGTH)
            .and_then(|l| l.parse().ok())
            .filter(|l| *l <= media::MAX_MANIFEST_BYTES)
            .ok_or("length")?;
        let builder = Headers::new(StatusCode::OK, &media_type, &digest, length, None);
        if req.head {
            return Ok(Fetched::Whole(builder, Bytes::new()));
        }
        let mut body = BytesMut::with_capacity(length as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|_| "body")? {
            if body.len() + chunk.len() > length as usize {
                return Err("length");
            }
            body.extend_from_slice(&chunk);
        }
        // A tag is only as trustworthy as the bytes behind the digest header we pass on.
        if Digest::sha256_of(&body) != digest || body.len() as u64 != length {
            return Err("digest-mismatch");
        }
        Ok(Fetched::Whole(builder, body.freeze()))
    }

    /// A blob from one peer, streamed; a break mid-way resumes from the next peer.
    async fn blob(
        &self,
        peer: &Peer,
        req: &PullRequest,
        peers: &mut PeerQueue,
    ) -> Result<Fetched, Failure> {
        let Target::Digest(digest) = &req.path.target else {
            return Err("not-a-digest");
        };
        let mut request = self.request(peer, req);
        if let Some(range) = &req.range
            && !req.head
        {
            request = request.header(header::RANGE, range);
        }
        let resp = request.send().await.map_err(|_| "connect")?;
        if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            let size = header_str(resp.headers(), header::CONTENT_RANGE)
                .and_then(|v| v.strip_prefix("bytes */"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok(Fetched::Unsatisfiable(size));
        }
        if let Some(d) = header_str(resp.headers(), DOCKER_CONTENT_DIGEST)
            && d != digest.to_string()
        {
            return Err("digest-mismatch");
        }
        let length: u64 = header_str(resp.headers(), header::CONTENT_LENGTH)
            .and_then(|l| l.parse().ok())
            .ok_or("length")?;
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE)
            .unwrap_or(media::OCTET_STREAM)
            .to_owned();
        let (status, start, end, content_range) = match resp.status() {
            StatusCode::OK => (StatusCode::OK, 0, length.saturating_sub(1), None),
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(resp.headers(), header::CONTENT_RANGE).ok_or("range")?;
                let (start, end, _total) = parse_content_range(cr).ok_or("range")?;
                if end - start + 1 != length {
                    return Err("range");
                }
                (StatusCode::PARTIAL_CONTENT, start, end, Some(cr.to_owned()))
            }
            _ => return Err("status"),
        };
        let builder = Headers::new(status, &content_type, digest, length, content_range);
        if req.head || length == 0 {
            return Ok(Fetched::Whole(builder, Bytes::new()));
        }
        let rest = FromPeers {
            peers: std::mem::replace(peers, PeerQueue::empty()),
            client: self.client.clone(),
            path: req.peer_path(),
            headers: req.peer_headers.clone(),
            budget: self.config.attempts,
            metrics: self.metrics.clone(),
        };
        let body = resumable(io_stream(resp.bytes_stream()), start, end, rest);
        Ok(Fetched::Stream(builder, body))
    }
}

/// A successful peer answer: headers plus a whole body or a stream.
enum Fetched {
    Whole(Headers, Bytes),
    Stream(Headers, BoxStream<'static, std::io::Result<Bytes>>),
    Unsatisfiable(u64),
}

/// The response headers passed on to the client.
struct Headers {
    status: StatusCode,
    content_type: String,
    digest: String,
    length: u64,
    content_range: Option<String>,
}

impl Headers {
    fn new(
        status: StatusCode,
        content_type: &str,
        digest: &Digest,
        length: u64,
        content_range: Option<String>,
    ) -> Headers {
        Headers {
            status,
            content_type: content_type.to_owned(),
            digest: digest.to_string(),
            length,
            content_range,
        }
    }

    fn status_code(&self) -> StatusCode {
        self.status
    }

    /// The client's response: the same content headers as a local or cache response
    /// ([`content_head`], `ETag` included).
    fn into_response(self, body: Body) -> Response {
        content_head(
            self.status,
            &self.content_type,
            &self.digest,
            self.length,
            self.content_range,
        )
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
    }
}

/// Peers as the lookup finds them. Each wait for the next one is bounded by the resolve
/// timeout, so a slow or empty lookup costs at most that much per attempt.
struct PeerQueue {
    rx: Option<mpsc::Receiver<Peer>>,
    buffered: VecDeque<Peer>,
    wait: Duration,
}

impl PeerQueue {
    fn new(rx: mpsc::Receiver<Peer>, wait: Duration) -> PeerQueue {
        PeerQueue {
            rx: Some(rx),
            buffered: VecDeque::new(),
            wait,
        }
    }

    fn empty() -> PeerQueue {
        PeerQueue {
            rx: None,
            buffered: VecDeque::new(),
            wait: Duration::ZERO,
        }
    }

    async fn next(&mut self) -> Option<Peer> {
        if let Some(p) = self.buffered.pop_front() {
            return Some(p);
        }
        let rx = self.rx.as_mut()?;
        match tokio::time::timeout(self.wait, rx.recv()).await {
            Ok(Some(p)) => Some(p),
            Ok(None) | Err(_) => {
                self.rx = None;
                None
            }
        }
    }
}

/// Where a broken peer blob stream continues: the lookup's further peers, `budget` of them.
struct FromPeers {
    peers: PeerQueue,
    client: PeerClient,
    path: String,
    /// Peer token and grants, sent again on every resume.
    headers: http::HeaderMap,
    budget: usize,
    metrics: RegistryMetrics,
}

impl Reopen for FromPeers {
    async fn reopen(&mut self, next: u64, end: u64) -> std::io::Result<ByteStream> {
        while self.budget > 0 {
            self.budget -= 1;
            let Some(peer) = self.peers.next().await else {
                break;
            };
            if let Some(resp) = self
                .client
                .reopen_at(peer.addr, &self.path, &self.headers, next, end)
                .await
            {
                self.metrics.resumed();
                tracing::info!(peer.id = %peer.id, offset = next, "resumed blob from another peer");
                return Ok(io_stream(resp.bytes_stream()));
            }
        }
        Err(std::io::Error::other(
            "peer stream broke and no other peer could resume it",
        ))
    }
}
