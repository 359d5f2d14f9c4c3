//! Cold pulls coalesced: one job — make sure a blob nobody in the cluster holds is fetched
//! from upstream once, and every node that wants it gets its bytes as they arrive.
//!
//! On a miss the mirror asks the blob's coordinator ([`Router::claim`]). The winner reserves
//! the blob in its [`Cache`], advertises itself as an *in-flight provider* at once, downloads
//! the blob in a task of its own (so it completes even if its containerd gives up) and answers
//! its containerd from the growing file. Losers stream from the winner's peer endpoint, which
//! serves in-flight cache entries by following the growing file. A follower whose stream
//! breaks resumes with `Range` from another holder, else from upstream itself; when the
//! winner cannot be reached in `follow_wait`, or the coordinator does not answer, the node
//! fetches the blob itself. Coalescing never fails a pull: at worst a blob is fetched twice.
//!
//! Policy (public, anonymous images only) is decided by the caller before it asks.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http::{StatusCode, header};

pub use super::metrics::CacheMetrics;
use super::upstream::Upstream;
use super::{Cache, CacheConfig, CacheError};
use crate::oci::range::{RangeError, parse_content_range, parse_range};
use crate::oci::{ByteRange, Digest};
use crate::routing::{Claim, Peer, Router};
use crate::wire::{ByteStream, PeerClient, Reopen, io_stream, resumable};

/// Where the bytes of a coalesced response come from (audit `served_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node's cache, complete or in flight, filled earlier.
    Cache,
    /// This node fetched it from upstream just now (it won the claim).
    Upstream,
    /// Another node's in-flight (or complete) cache entry.
    PeerInflight,
}

/// A body ready to send: the blob's size, the range sent (if any) and the bytes.
pub struct Body {
    pub size: u64,
    pub range: Option<ByteRange>,
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
    pub origin: Origin,
    /// The node the bytes come from, for [`Origin::PeerInflight`].
    pub peer: Option<String>,
}

/// The coalescing front of the cache. Cheap to clone.
#[derive(Clone)]
pub struct Coalescer {
    cache: Arc<Cache>,
    upstream: Arc<Upstream>,
    router: Arc<dyn Router>,
    peers: PeerClient,
    config: Arc<CacheConfig>,
    metrics: CacheMetrics,
}

/// Budget of resumptions of one stream (peers and upstream together).
const RESUMES: usize = 4;
/// Poll step while waiting for the winner to start serving.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
/// Attempts of one upstream download before the blob is given up.
const DOWNLOAD_ATTEMPTS: usize = 3;

impl Coalescer {
    /// `peers` is the daemon's one peer client (`mirror.connect_timeout`,
    /// `mirror.read_timeout`), shared with the mirror.
    pub fn new(
        cache: Arc<Cache>,
        router: Arc<dyn Router>,
        config: CacheConfig,
        metrics: CacheMetrics,
        peers: PeerClient,
    ) -> Result<Coalescer, reqwest::Error> {
        let upstream = Arc::new(Upstream::new(&config)?);
        metrics.held(cache.usage().1);
        Ok(Coalescer {
            cache,
            upstream,
            router,
            peers,
            config: Arc::new(config),
            metrics,
        })
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Whether the cold path may fetch from upstream (`cache.upstream_fetch`).
    pub fn upstream_fetch(&self) -> bool {
        self.config.upstream_fetch
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// Serves `digest` from this node's cache, complete or in flight. `Ok(None)` when absent.
    pub async fn cached(
        &self,
        digest: &Digest,
        range: Option<&str>,
    ) -> Result<Option<Body>, RangeError> {
        if !self.cache.contains(digest) {
            return Ok(None);
        }
        let Some(size) = self.cache.size(digest, self.config.follow_wait).await else {
            return Ok(None);
        };
        let range = range.map(|h| parse_range(h, size)).transpose()?;
        let Ok((size, stream)) = self.cache.read(digest, range) else {
            return Ok(None);
        };
        let metrics = self.metrics.clone();
        let stream = stream
            .inspect(move |c| {
                if let Ok(c) = c {
                    metrics.saved(c.len() as u64);
                }
            })
            .boxed();
        Ok(Some(Body {
            size,
            range,
            stream,
            origin: Origin::Cache,
            peer: None,
        }))
    }

    /// The cold path: nobody holds `digest`. Claims it and either fetches it from upstream
    /// (`ns`, `repository`) or follows the node that does. `None` when neither worked: the
    /// caller answers 404 and containerd goes upstream itself. `peer_path` is the request's
    /// path and query as a peer endpoint takes it; `headers` go with every request to a peer
    /// (the daemon's peer token).
    pub async fn fetch(
        &self,
        ns: &str,
        repository: &str,
        digest: &Digest,
        range: Option<&str>,
        peer_path: &str,
        headers: &http::HeaderMap,
    ) -> Option<Body> {
        if !self.config.upstream_fetch || digest.algorithm().as_str() != "sha256" {
            return None;
        }
        let key = digest.to_string();
        let claim = match tokio::time::timeout(
            self.config.claim_timeout,
            self.router.claim(&key, self.config.claim_ttl),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::info!(%digest, error = %e, "claim failed; fetching it myself");
                Claim::Won
            }
            Err(_) => {
                tracing::info!(%digest, "claim timed out; fetching it myself");
                Claim::Won
            }
        };
        if let Claim::Follow(peer) = &claim {
            match self
                .follow(peer, ns, repository, digest, range, peer_path, headers)
                .await
            {
                Some(body) => return Some(body),
                None => {
                    tracing::info!(%digest, peer.id = %peer.id, "winner not serving; fetching it myself")
                }
            }
        }
        self.lead(ns, repository, digest, range).await
    }

    /// Fetches `digest` from upstream into the cache (unless this node already is) and
    /// serves it from the growing file.
    async fn lead(
        &self,
        ns: &str,
        repository: &str,
        digest: &Digest,
        range: Option<&str>,
    ) -> Option<Body> {
        match self.cache.begin(digest) {
            Ok(writer) => {
                self.metrics.fetch_started();
                // In-flight provider at once: latecomers find us through the DHT.
                if let Err(e) = self.router.advertise(vec![digest.to_string()]).await {
                    tracing::warn!(%digest, error = %e, "advertising an in-flight blob failed");
                }
                tracing::info!(%digest, registry = ns, "fetching blob from upstream");
                tokio::spawn(
                    self.clone()
                        .download(writer, ns.to_owned(), repository.to_owned()),
                );
            }
            // Another request on this node is already fetching it (or it just completed).
            Err(CacheError::Present(_)) => {}
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot cache the blob");
                return None;
            }
        }
        let wait = self.config.upstream_connect_timeout + self.config.upstream_read_timeout;
        let size = self.cache.size(digest, wait).await?;
        let range = match range.map(|h| parse_range(h, size)).transpose() {
            Ok(r) => r,
            Err(_) => return None,
        };
        let (size, stream) = self.cache.read(digest, range).ok()?;
        Some(Body {
            size,
            range,
            stream,
            origin: Origin::Upstream,
            peer: None,
        })
    }

    /// Downloads into `writer`, resuming with `Range` after a break, then completes it.
    async fn download(self, mut writer: super::Writer, ns: String, repository: String) {
        let digest = writer.digest().clone();
        let mut failures = 0;
        let mut last_error = String::new();
        loop {
            if failures >= DOWNLOAD_ATTEMPTS {
                tracing::warn!(%digest, registry = %ns, error = %last_error, "upstream fetch failed");
                writer.abort(&last_error);
                let _ = self.router.withdraw(vec![digest.to_string()]).await;
                return;
            }
            let from = writer.written();
            let fetch = match self.upstream.blob(&ns, &repository, &digest, from).await {
                Ok(f) => f,
                Err(e) => {
                    failures += 1;
                    last_error = e.to_string();
                    continue;
                }
            };
            if from == 0 {
                writer.set_size(fetch.size);
            }
            let mut skip = from.saturating_sub(fetch.start);
            let mut body = fetch.response.bytes_stream();
            let mut broke = false;
            while let Some(chunk) = body.next().await {
                let mut chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        last_error = e.to_string();
                        broke = true;
                        break;
                    }
                };
                self.metrics.fetched_upstream(chunk.len() as u64);
                if skip > 0 {
                    let n = skip.min(chunk.len() as u64);
                    skip -= n;
                    chunk = chunk.slice(n as usize..);
                }
                if let Err(e) = writer.write(&chunk).await {
                    last_error = e.to_string();
                    failures = DOWNLOAD_ATTEMPTS;
                    broke = true;
                    break;
                }
            }
            if broke {
                failures += 1;
                continue;
            }
            break;
        }
        match writer.finish().await {
            Ok(size) => {
                tracing::info!(%digest, bytes = size, "blob cached from upstream");
                self.metrics.held(self.cache.usage().1);
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "upstream blob refused");
                let _ = self.router.withdraw(vec![digest.to_string()]).await;
            }
        }
    }

    /// Streams from the winner's peer endpoint, polling (bounded by `follow_wait`) until it
    /// serves the blob; the stream resumes elsewhere if the winner dies mid-blob.
    // The request's parts, passed through as they are; a struct for one private call site
    // would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        peer: &Peer,
        ns: &str,
        repository: &str,
        digest: &Digest,
        range: Option<&str>,
        peer_path: &str,
        headers: &http::HeaderMap,
    ) -> Option<Body> {
        let deadline = tokio::time::Instant::now() + self.config.follow_wait;
        let resp = loop {
            let mut request = self.peers.get(peer.addr, peer_path, headers);
            if let Some(r) = range {
                request = request.header(header::RANGE, r);
            }
            match request.send().await {
                Ok(r)
                    if r.status() == StatusCode::OK
                        || r.status() == StatusCode::PARTIAL_CONTENT =>
                {
                    break r;
                }
                // At its serving cap: polling would only add to its load; fetch it myself.
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => return None,
                _ if tokio::time::Instant::now() + FOLLOW_POLL < deadline => {
                    // Bounded poll: the winner reserves the blob a moment after its claim.
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                _ => return None,
            }
        };
        let length = resp.content_length()?;
        let (start, end, size, sent_range) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())?;
                // The total is required here: it is the size the response announces.
                let (s, e, total) = parse_content_range(cr)?;
                (s, e, total?, Some(ByteRange { start: s, end: e }))
            }
            _ => (0, length.saturating_sub(1), length, None),
        };
        self.metrics.followed();
        tracing::info!(%digest, peer.id = %peer.id, bytes = size, "following another node's fetch");
        let mut tried = HashSet::new();
        tried.insert(peer.id.clone());
        let rest = FromHolders {
            budget: RESUMES,
            tried,
            coalescer: self.clone(),
            ns: ns.to_owned(),
            repository: repository.to_owned(),
            digest: digest.clone(),
            peer_path: peer_path.to_owned(),
            headers: headers.clone(),
        };
        let stream = if length == 0 {
            futures::stream::empty().boxed()
        } else {
            resumable(io_stream(resp.bytes_stream()), start, end, rest)
        };
        Some(Body {
            size,
            range: sent_range,
            stream,
            origin: Origin::PeerInflight,
            peer: Some(peer.id.clone()),
        })
    }
}

/// Where a follower's broken stream continues: another holder, else upstream, `budget` times.
struct FromHolders {
    budget: usize,
    tried: HashSet<String>,
    coalescer: Coalescer,
    ns: String,
    repository: String,
    digest: Digest,
    peer_path: String,
    /// The daemon's peer token, sent again on every resume.
    headers: http::HeaderMap,
}

impl Reopen for FromHolders {
    async fn reopen(&mut self, next: u64, end: u64) -> std::io::Result<ByteStream> {
        let c = self.coalescer.clone();
        while self.budget > 0 {
            self.budget -= 1;
            // Another holder first (complete, or another in-flight provider).
            if let Ok(mut rx) = c.router.lookup(&self.digest.to_string(), 3).await {
                while let Ok(Some(peer)) =
                    tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
                {
                    if !self.tried.insert(peer.id.clone()) {
                        continue;
                    }
                    if let Some(resp) = c
                        .peers
                        .reopen_at(peer.addr, &self.peer_path, &self.headers, next, end)
                        .await
                    {
                        tracing::info!(digest = %self.digest, peer.id = %peer.id, offset = next, "follower resumed from another holder");
                        return Ok(io_stream(resp.bytes_stream()));
                    }
                }
            }
            // Else upstream, from where we are.
            match c
                .upstream
                .blob(&self.ns, &self.repository, &self.digest, next)
                .await
            {
                Ok(fetch) if fetch.start <= next => {
                    tracing::info!(digest = %self.digest, offset = next, "follower resumed from upstream");
                    let skip = next - fetch.start;
                    let metrics = c.metrics.clone();
                    let stream = io_stream(fetch.response.bytes_stream())
                        .inspect(move |r| {
                            if let Ok(b) = r {
                                metrics.fetched_upstream(b.len() as u64);
                            }
                        })
                        .boxed();
                    return Ok(skip_bytes(stream, skip));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(digest = %self.digest, error = %e, "upstream resume failed")
                }
            }
        }
        Err(std::io::Error::other(
            "in-flight provider broke and neither a holder nor upstream could resume",
        ))
    }
}

/// Drops the first `skip` bytes of a stream (an upstream that ignored `Range`).
fn skip_bytes(
    stream: BoxStream<'static, std::io::Result<Bytes>>,
    skip: u64,
) -> BoxStream<'static, std::io::Result<Bytes>> {
    if skip == 0 {
        return stream;
    }
    futures::stream::unfold((stream, skip), |(mut s, mut skip)| async move {
        loop {
            match s.next().await? {
                Ok(mut c) => {
                    if skip >= c.len() as u64 {
                        skip -= c.len() as u64;
                        continue;
                    }
                    let c2 = c.split_off(skip as usize);
                    skip = 0;
                    return Some((Ok(c2), (s, skip)));
                }
                Err(e) => return Some((Err(e), (s, skip))),
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests;
