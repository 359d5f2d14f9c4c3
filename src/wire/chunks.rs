//! One blob from several holders, one job: fetch the bytes `start..=end` of a blob as disjoint
//! `Range` chunks from several peer endpoints at once (at most `parallel` chunks in flight),
//! and hand them on as one stream in order. A chunk whose holder fails (refused, 429, broken
//! mid-way) continues from its next byte at another holder; only when every holder failed it
//! does the stream end in an error. Checking the whole blob's digest is [`super::verify`]'s
//! job; choosing and ordering the holders is the caller's.
//!
//! With `parallel = 1` and one holder this is a windowed read: each window is asked for only
//! when the previous one has been passed on, so a client that stops reading (containerd's
//! open-ended first range, read for one chunk and closed) costs at most one window.
//!
//! Memory: a chunk not yet due is buffered as it arrives, so one blob holds at most
//! `parallel × chunk` bytes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{ByteStream, PeerClient, io_stream};

/// One chunk: the inclusive byte range `start..=end` of the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub start: u64,
    pub end: u64,
}

/// Splits `start..=end` into chunks of `size` bytes (the last one shorter), in order.
pub fn plan(start: u64, end: u64, size: u64) -> Vec<Chunk> {
    let size = size.max(1);
    let mut chunks = Vec::new();
    let mut next = start;
    while next <= end {
        let last = next.saturating_add(size - 1).min(end);
        chunks.push(Chunk {
            start: next,
            end: last,
        });
        if last == u64::MAX {
            break;
        }
        next = last + 1;
    }
    chunks
}

/// Windows for a client that may stop reading any time (an open-ended range): the first of
/// `size` bytes, then from `size / 8` doubling back up to `size`. A client that reads one
/// `size` chunk and closes (containerd's parallel fetch) costs at most one small window more,
/// however far the socket buffers let the sender run ahead of it.
pub fn ramp(start: u64, end: u64, size: u64) -> Vec<Chunk> {
    let size = size.max(1);
    let mut chunks = Vec::new();
    let mut next = start;
    let mut window = size;
    while next <= end {
        let last = next.saturating_add(window - 1).min(end);
        chunks.push(Chunk {
            start: next,
            end: last,
        });
        if last == u64::MAX {
            break;
        }
        next = last + 1;
        window = if chunks.len() == 1 {
            (size / 8).max(1)
        } else {
            window.saturating_mul(2).min(size)
        };
    }
    chunks
}

/// What a chunked fetch needs to know besides the range.
#[derive(Clone)]
pub struct Chunked {
    pub client: PeerClient,
    /// The holders' peer endpoints, best first. Chunk `i` starts at holder `i mod n`.
    pub holders: Vec<SocketAddr>,
    /// Path and query as a peer endpoint takes it.
    pub path: String,
    /// Peer token and grants, sent with every request.
    pub headers: HeaderMap,
    pub chunk: u64,
    pub parallel: usize,
    /// Windows as [`ramp`] plans them (an open-ended client range), not [`plan`]'s.
    pub ramp: bool,
    /// Called with the holder's address and the bytes it delivered, per finished piece (the
    /// caller's per-holder accounting); and once per chunk that had to move to another holder.
    pub observer: Arc<dyn Observer>,
}

/// What the caller learns from a chunked fetch (metrics, logs).
pub trait Observer: Send + Sync + 'static {
    fn received(&self, holder: SocketAddr, bytes: u64);
    fn refetched(&self, holder: SocketAddr, offset: u64);
}

/// An observer that notes nothing.
pub struct Quiet;

impl Observer for Quiet {
    fn received(&self, _: SocketAddr, _: u64) {}
    fn refetched(&self, _: SocketAddr, _: u64) {}
}

impl Chunked {
    /// The bytes `start..=end` in order. `first`, when given, is an open response from
    /// `holders[0]` whose first byte is `start`: it serves the first chunk (and is dropped
    /// after it), so the request already made is not made again.
    pub fn stream(self, start: u64, end: u64, first: Option<ByteStream>) -> ByteStream {
        let chunks: VecDeque<(usize, Chunk)> = plan(start, end, self.chunk)
            .into_iter()
            .enumerate()
            .collect();
        let state = Ordered {
            fetch: Arc::new(self),
            chunks,
            running: VecDeque::new(),
            first,
            failed: false,
        };
        futures::stream::unfold(state, |mut s| async move {
            let item = s.step().await?;
            Some((item, s))
        })
        .boxed()
    }
}

/// A chunk being fetched by a task of its own; the task ends when this is dropped.
struct Running {
    rx: mpsc::UnboundedReceiver<std::io::Result<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ordered {
    fetch: Arc<Chunked>,
    /// Chunks not started yet, with their index (which holder they start at).
    chunks: VecDeque<(usize, Chunk)>,
    /// Started chunks, in order; the front one is being passed on.
    running: VecDeque<Running>,
    first: Option<ByteStream>,
    failed: bool,
}

impl Ordered {
    async fn step(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            if self.failed {
                return None;
            }
            while self.running.len() < self.fetch.parallel.max(1)
                && let Some((i, chunk)) = self.chunks.pop_front()
            {
                let first = if i == 0 { self.first.take() } else { None };
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(fetch_chunk(self.fetch.clone(), i, chunk, first, tx));
                self.running.push_back(Running { rx, task });
            }
            let front = self.running.front_mut()?;
            match front.rx.recv().await {
                Some(Ok(bytes)) => return Some(Ok(bytes)),
                Some(Err(e)) => {
                    self.failed = true;
                    self.running.clear();
                    return Some(Err(e));
                }
                // The chunk is complete: on to the next (and start one more).
                None => {
                    self.running.pop_front();
                }
            }
        }
    }
}

/// Fetches one chunk into `tx`, moving to the next holder from the first missing byte when
/// one fails. Every holder gets at most two tries per chunk.
async fn fetch_chunk(
    fetch: Arc<Chunked>,
    index: usize,
    chunk: Chunk,
    first: Option<ByteStream>,
    tx: mpsc::UnboundedSender<std::io::Result<Bytes>>,
) {
    let n = fetch.holders.len().max(1);
    let mut next = chunk.start;
    let mut first = first;
    let tries = 2 * n;
    for attempt in 0..=tries {
        if next > chunk.end {
            return;
        }
        let Some(&holder) = fetch.holders.get((index + attempt) % n) else {
            break;
        };
        let stream = match first.take() {
            Some(s) if next == chunk.start => Some(s),
            _ => fetch
                .client
                .reopen_at(holder, &fetch.path, &fetch.headers, next, chunk.end)
                .await
                .map(|r| io_stream(r.bytes_stream())),
        };
        let Some(mut stream) = stream else {
            tracing::debug!(peer.addr = %holder, offset = next, "chunk refused; next holder");
            if attempt > 0 || next > chunk.start {
                fetch.observer.refetched(holder, next);
            }
            continue;
        };
        let before = next;
        while next <= chunk.end {
            match stream.next().await {
                Some(Ok(mut bytes)) => {
                    let remaining = chunk.end - next + 1;
                    if bytes.len() as u64 > remaining {
                        bytes.truncate(remaining as usize);
                    }
                    next += bytes.len() as u64;
                    if tx.send(Ok(bytes)).is_err() {
                        // The reader is gone (the client stopped): stop fetching.
                        return;
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        fetch.observer.received(holder, next - before);
        if next <= chunk.end {
            tracing::debug!(peer.addr = %holder, offset = next, "chunk broke; next holder");
            fetch.observer.refetched(holder, next);
        }
    }
    if next <= chunk.end {
        let _ = tx.send(Err(std::io::Error::other(format!(
            "no holder could deliver bytes {next}-{} of the blob",
            chunk.end
        ))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(start: u64, end: u64) -> Chunk {
        Chunk { start, end }
    }

    #[test]
    fn plan_table() {
        let cases = [
            (
                "exact multiple",
                0,
                99,
                25,
                vec![c(0, 24), c(25, 49), c(50, 74), c(75, 99)],
            ),
            ("short last", 0, 9, 4, vec![c(0, 3), c(4, 7), c(8, 9)]),
            ("one byte", 5, 5, 4, vec![c(5, 5)]),
            ("smaller than a chunk", 0, 2, 100, vec![c(0, 2)]),
            ("offset start", 10, 19, 5, vec![c(10, 14), c(15, 19)]),
            ("empty", 5, 4, 4, vec![]),
            ("zero size treated as one", 0, 1, 0, vec![c(0, 0), c(1, 1)]),
            (
                "at the end of u64",
                u64::MAX - 1,
                u64::MAX,
                4,
                vec![c(u64::MAX - 1, u64::MAX)],
            ),
        ];
        for (name, start, end, size, want) in cases {
            assert_eq!(plan(start, end, size), want, "{name}");
        }
    }

    #[test]
    fn ramp_table() {
        let cases = [
            (
                "one full window, then an eighth doubling back",
                0,
                99,
                32,
                vec![
                    c(0, 31),
                    c(32, 35),
                    c(36, 43),
                    c(44, 59),
                    c(60, 91),
                    c(92, 99),
                ],
            ),
            ("within the first window", 10, 20, 32, vec![c(10, 20)]),
            ("tiny windows", 0, 3, 2, vec![c(0, 1), c(2, 2), c(3, 3)]),
        ];
        for (name, start, end, size, want) in cases {
            assert_eq!(ramp(start, end, size), want, "{name}");
        }
    }

    #[test]
    fn plan_covers_every_byte_once() {
        for (start, end, size) in [(0u64, 1000u64, 7u64), (3, 3, 1), (0, 65535, 4096)] {
            let chunks = plan(start, end, size);
            let mut next = start;
            for ch in &chunks {
                assert_eq!(ch.start, next, "contiguous");
                assert!(ch.end >= ch.start && ch.end - ch.start < size, "bounded");
                next = ch.end + 1;
            }
            assert_eq!(next, end + 1, "covers the range");
        }
    }
}
