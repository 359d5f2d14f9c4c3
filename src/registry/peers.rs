//! The peers responder, one job: fetch from peers when the local store misses: look up who holds the key, try up to
//! `attempts` peers (least loaded first, [`rank`]; a holder at its cap answers 429 and the
//! next is asked at once), and stream the first good answer back. A blob stream that breaks is
//! resumed from another peer with `Range`, so the client still receives one whole, correct
//! body; a whole blob is checked against its digest before its last byte goes out
//! (`wire::verify`). A big blob with several holders comes as parallel `Range` chunks from
//! all of them (`wire::chunks`, `mirror.chunk_*`); an open-ended client range is asked for one
//! window at a time. With the blob cache on, a whole blob is also teed into it and this node
//! advertised as an in-flight holder at once ([`CacheTee`]), so later pulls spread over every
//! receiver. Manifests are small: they are buffered, checked against their digest and
//! bounded by an overall deadline. Any failure ends in `Ok(None)`: the caller answers 404 and
//! containerd goes upstream.

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
use crate::advertise::AdvertFilter;
use crate::cache::Cache;
use crate::oci::range::parse_content_range;
use crate::oci::{Digest, Kind, Target, media};
use crate::routing::PeerLoad;
use crate::routing::{Peer, Router};
use crate::store::Image;
use crate::wire::chunks::{Chunked, Observer};
use crate::wire::verify::verified;
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
    /// Where whole peer blobs are teed (`cache.enabled` and `mirror.tee`); `None`: not teed.
    tee: Option<CacheTee>,
}

/// The blob cache a peer blob is written into as it passes, and who may be advertised.
#[derive(Clone)]
pub struct CacheTee {
    pub cache: Arc<Cache>,
    /// The policy's advertisement decision (`policy::Advert`): only content it lets this node
    /// advertise is teed (and so advertised).
    pub allow: AdvertFilter,
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
            tee: None,
        }
    }

    /// Tees whole peer blobs into `tee`'s cache (when `mirror.tee` is on).
    pub fn with_tee(mut self, tee: CacheTee) -> Mirror {
        if self.config.tee {
            self.tee = Some(tee);
        }
        self
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

    /// A blob from one peer, streamed; a break mid-way resumes from the next peer. A whole
    /// blob is verified on the way (or by the cache it is teed into); a big one with further
    /// holders comes as chunks from all of them.
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
        // An open-ended range (`bytes=N-`) is asked for one window at a time: containerd's
        // parallel fetch opens one, reads a chunk from it and closes it.
        let open_from = req.range.as_deref().and_then(open_ended);
        if let Some(range) = &req.range
            && !req.head
        {
            let range = match open_from {
                Some(from) => format!(
                    "bytes={from}-{}",
                    from.saturating_add(self.config.chunk_size.max(1) - 1)
                ),
                None => range.clone(),
            };
            request = request.header(header::RANGE, range);
        }
        let resp = request.send().await.map_err(|_| "connect")?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            // At its serving cap: the next holder is asked at once, no retry sleep.
            return Err("busy");
        }
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
        // `windowed`: the peer sent one window of an open-ended range; the client gets the
        // range to the blob's end.
        let (status, start, end, content_range, windowed) = match resp.status() {
            StatusCode::OK => (StatusCode::OK, 0, length.saturating_sub(1), None, false),
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(resp.headers(), header::CONTENT_RANGE).ok_or("range")?;
                let (start, end, total) = parse_content_range(cr).ok_or("range")?;
                if end - start + 1 != length {
                    return Err("range");
                }
                match (open_from, total) {
                    (Some(from), Some(total)) if from == start && end + 1 < total => {
                        let cr = format!("bytes {start}-{}/{total}", total - 1);
                        (
                            StatusCode::PARTIAL_CONTENT,
                            start,
                            total - 1,
                            Some(cr),
                            true,
                        )
                    }
                    (Some(_), None) => return Err("range"),
                    _ => (
                        StatusCode::PARTIAL_CONTENT,
                        start,
                        end,
                        Some(cr.to_owned()),
                        false,
                    ),
                }
            }
            _ => return Err("status"),
        };
        let body_length = end - start + 1;
        let builder = Headers::new(status, &content_type, digest, body_length, content_range);
        if req.head || length == 0 {
            return Ok(Fetched::Whole(builder, Bytes::new()));
        }
        let first = io_stream(resp.bytes_stream());
        let whole = status == StatusCode::OK;
        let others = peers.known();
        let chunked = |parallel: usize, ramp: bool| Chunked {
            client: self.client.clone(),
            holders: std::iter::once(peer.addr)
                .chain(others.iter().map(|p| p.addr))
                .collect(),
            path: req.peer_path(),
            headers: req.peer_headers.clone(),
            chunk: self.config.chunk_size,
            parallel,
            ramp,
            observer: Arc::new(Counting(self.metrics.clone())),
        };
        let stream = if windowed {
            chunked(1, true).stream(start, end, Some(first))
        } else if whole
            && !others.is_empty()
            && self.config.chunk_threshold > 0
            && length >= self.config.chunk_threshold
        {
            self.metrics.chunked();
            tracing::debug!(
                %digest,
                bytes = length,
                holders = others.len() + 1,
                "fetching a big blob as chunks from several holders"
            );
            chunked(self.config.chunk_parallel, false).stream(start, end, Some(first))
        } else {
            let rest = FromPeers {
                peers: std::mem::replace(peers, PeerQueue::empty()),
                client: self.client.clone(),
                path: req.peer_path(),
                headers: req.peer_headers.clone(),
                budget: self.config.attempts,
                metrics: self.metrics.clone(),
            };
            resumable(first, start, end, rest)
        };
        if !whole {
            return Ok(Fetched::Stream(builder, stream));
        }
        let body = self.tee(req, digest, length, stream).await;
        Ok(Fetched::Stream(builder, body))
    }

    /// The client's body of a whole blob. Teed into the cache when it may be: then the body
    /// is read from the growing cache file (which verifies the digest before its last byte
    /// is readable), and the stream is driven into the cache by a task of its own (so the
    /// entry completes even if this client goes away). When it may not (no cache, policy, a
    /// grant needed, too big, already there): the stream itself, verified on the way.
    async fn tee(
        &self,
        req: &PullRequest,
        digest: &Digest,
        length: u64,
        stream: ByteStream,
    ) -> ByteStream {
        let Some(tee) = self
            .tee
            .as_ref()
            .filter(|t| self.may_tee(t, req, digest, length))
        else {
            return verified(stream, digest, length);
        };
        let mut writer = match tee.cache.begin(digest) {
            Ok(w) => w,
            // Present: another request on this node tees it already (or it just completed).
            Err(_) => return verified(stream, digest, length),
        };
        writer.set_size(length);
        // An in-flight holder at once: latecomers find this node through the DHT.
        let key = digest.to_string();
        if let Err(e) = self.router.advertise(vec![key.clone()]).await {
            tracing::warn!(%digest, error = %e, "advertising a teed blob failed");
        }
        let body = match tee.cache.read(digest, None) {
            Ok((_, body)) => body,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "reading a teed blob failed");
                writer.abort("unreadable");
                let _ = self.router.withdraw(vec![key]).await;
                return verified(stream, digest, length);
            }
        };
        tokio::spawn(drive(
            writer,
            stream,
            self.router.clone(),
            self.metrics.clone(),
        ));
        body
    }

    fn may_tee(&self, tee: &CacheTee, req: &PullRequest, digest: &Digest, length: u64) -> bool {
        let Some(ns) = req.ns.as_ref() else {
            return false;
        };
        // A private blob is never kept for others: it was fetched with this node's grants.
        if req.peer_headers.contains_key(crate::tenancy::GRANT_HEADER) {
            return false;
        }
        if length > tee.cache.max_bytes() {
            return false;
        }
        (tee.allow)(&Image {
            registry: ns.clone(),
            repository: req.path.name.clone(),
            tag: None,
            digest: digest.clone(),
        })
        .content
    }
}

/// Writes a teed blob into the cache; on failure (the stream broke with no holder left, or
/// the digest did not match) the entry is dropped and the in-flight advertisement withdrawn.
async fn drive(
    mut writer: crate::cache::Writer,
    mut stream: ByteStream,
    router: Arc<dyn Router>,
    metrics: RegistryMetrics,
) {
    let digest = writer.digest().clone();
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                if let Err(e) = writer.write(&bytes).await {
                    failure = Some(e.to_string());
                    break;
                }
            }
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    let result = match failure {
        Some(reason) => {
            writer.abort(&reason);
            Err(reason)
        }
        None => writer.finish().await.map_err(|e| e.to_string()),
    };
    match result {
        Ok(size) => {
            metrics.teed("complete");
            tracing::info!(%digest, bytes = size, "peer blob teed into the cache");
        }
        Err(reason) => {
            metrics.teed("failed");
            tracing::warn!(%digest, error = %reason, "teeing a peer blob failed; withdrawn");
            let _ = router.withdraw(vec![digest.to_string()]).await;
        }
    }
}

/// `bytes=N-`: the start of an open-ended range (not a suffix range `bytes=-N`).
fn open_ended(range: &str) -> Option<u64> {
    let spec = range.trim().strip_prefix("bytes=")?;
    let (from, to) = spec.split_once('-')?;
    if !to.trim().is_empty() {
        return None;
    }
    from.trim().parse().ok()
}

/// Chunk events into the registry's metrics.
struct Counting(RegistryMetrics);

impl Observer for Counting {
    fn received(&self, _: std::net::SocketAddr, _: u64) {}

    fn refetched(&self, holder: std::net::SocketAddr, offset: u64) {
        self.0.chunk_refetched();
        tracing::info!(peer.addr = %holder, offset, "chunk continues at another holder");
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

    /// The best peer known now, else (bounded by the resolve timeout) the next one found.
    async fn next(&mut self) -> Option<Peer> {
        self.drain();
        if let Some(p) = self.buffered.pop_front() {
            return Some(p);
        }
        let rx = self.rx.as_mut()?;
        match tokio::time::timeout(self.wait, rx.recv()).await {
            Ok(Some(p)) => {
                self.buffered.push_back(p);
                self.drain();
                self.buffered.pop_front()
            }
            Ok(None) | Err(_) => {
                self.rx = None;
                None
            }
        }
    }

    /// The peers found so far and not yet tried, best first (they stay queued).
    fn known(&mut self) -> Vec<Peer> {
        self.drain();
        self.buffered.iter().cloned().collect()
    }

    /// Takes every peer the lookup has already sent and orders the queue by [`rank`].
    fn drain(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            loop {
                match rx.try_recv() {
                    Ok(p) => self.buffered.push_back(p),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.rx = None;
                        break;
                    }
                }
            }
        }
        // Stable: among equals the lookup's order (nearest first) stays.
        self.buffered
            .make_contiguous()
            .sort_by_key(|p| rank(p.load));
    }
}

/// Where a holder goes in the queue, by the load it reported in its `has` answer: holders
/// with room first, fewest streams first; then holders that reported nothing (an older
/// daemon, a router that does not carry load: as likely to have room as not); holders at
/// their cap last (they would answer 429, but may have freed a slot by then).
pub fn rank(load: Option<PeerLoad>) -> (u8, u32) {
    match load {
        Some(l) if l.full() => (2, l.serving),
        Some(l) => (0, l.serving),
        None => (1, 0),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, load: Option<(u32, u32)>) -> Peer {
        let mut peer = Peer::new(id, ([127, 0, 0, 1], 1).into());
        peer.load = load.map(|(serving, limit)| PeerLoad { serving, limit });
        peer
    }

    #[test]
    fn rank_table() {
        let l = |serving, limit| Some(PeerLoad { serving, limit });
        let cases = [
            ("idle", l(0, 8), (0, 0)),
            ("busy with room", l(5, 8), (0, 5)),
            ("no cap", l(50, 0), (0, 50)),
            ("unknown", None, (1, 0)),
            ("full", l(8, 8), (2, 8)),
            ("over", l(9, 8), (2, 9)),
        ];
        for (name, load, want) in cases {
            assert_eq!(rank(load), want, "{name}");
        }
    }

    /// The queue hands out what the lookup already found least loaded first; unknown load
    /// after known room, full holders last; equals keep the lookup's order.
    #[tokio::test]
    async fn the_queue_orders_holders_by_load() {
        let (tx, rx) = mpsc::channel(16);
        for peer in [
            p("full", Some((4, 4))),
            p("unknown-1", None),
            p("busy", Some((3, 4))),
            p("idle", Some((0, 4))),
            p("unknown-2", None),
            p("uncapped", Some((1, 0))),
        ] {
            tx.send(peer).await.expect("send");
        }
        drop(tx);
        let mut queue = PeerQueue::new(rx, Duration::from_millis(100));
        let known: Vec<String> = queue.known().into_iter().map(|p| p.id).collect();
        let mut order = Vec::new();
        while let Some(peer) = queue.next().await {
            order.push(peer.id);
        }
        let want = ["idle", "uncapped", "busy", "unknown-1", "unknown-2", "full"];
        assert_eq!(order, want);
        assert_eq!(
            known, want,
            "known() is the same order, without taking them"
        );
    }

    /// A peer found later is still ordered against those not yet tried.
    #[tokio::test]
    async fn a_later_idle_holder_goes_before_a_known_busy_one() {
        let (tx, rx) = mpsc::channel(16);
        tx.send(p("busy", Some((7, 8)))).await.expect("send");
        tx.send(p("unknown", None)).await.expect("send");
        let mut queue = PeerQueue::new(rx, Duration::from_millis(100));
        assert_eq!(queue.next().await.map(|p| p.id).as_deref(), Some("busy"));
        tx.send(p("idle", Some((0, 8)))).await.expect("send");
        drop(tx);
        let rest: Vec<String> = [queue.next().await, queue.next().await, queue.next().await]
            .into_iter()
            .flatten()
            .map(|p| p.id)
            .collect();
        assert_eq!(rest, ["idle", "unknown"]);
    }

    #[test]
    fn open_ended_table() {
        let cases = [
            ("from zero", "bytes=0-", Some(0)),
            ("from n", "bytes=1048576-", Some(1048576)),
            ("closed", "bytes=0-99", None),
            ("suffix", "bytes=-500", None),
            ("not bytes", "items=0-", None),
            ("garbage", "bytes=x-", None),
        ];
        for (name, range, want) in cases {
            assert_eq!(open_ended(range), want, "{name}");
        }
    }
}
