//! A blob stream that survives a break: when the bytes stop early (an error, or the end of
//! the stream before the last promised byte), it asks a [`Reopen`] for the rest, from the
//! exact byte it got to, and carries on. The mirror reopens at another peer; a coalescing
//! follower at another holder or upstream. What to try, and how often, is the `Reopen`'s
//! business; this module only keeps the offsets and the contract that the client gets the
//! promised range once, in order, or an error.

use std::future::Future;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

/// Bytes of a body, as a response sends them.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Finds the rest of a broken stream.
pub trait Reopen: Send + 'static {
    /// A stream whose first byte is byte `next` of the content, running up to `end`
    /// (inclusive) or beyond; an error when no source is left.
    fn reopen(
        &mut self,
        next: u64,
        end: u64,
    ) -> impl Future<Output = std::io::Result<ByteStream>> + Send;
}

/// `first` (which starts at byte `start`), continued through `reopen` whenever it breaks
/// before byte `end` (inclusive). Bytes past `end` are dropped.
pub fn resumable<R: Reopen>(first: ByteStream, start: u64, end: u64, reopen: R) -> ByteStream {
    let state = Resumable {
        current: Some(first),
        next: start,
        end,
        failed: false,
        reopen,
    };
    futures::stream::unfold(state, |mut s| async move {
        let item = s.step().await?;
        Some((item, s))
    })
    .boxed()
}

struct Resumable<R> {
    current: Option<ByteStream>,
    /// Absolute offset of the next byte the client expects.
    next: u64,
    /// Absolute offset of the last byte to send (inclusive).
    end: u64,
    /// Set once reopening failed: the stream ends after that error.
    failed: bool,
    reopen: R,
}

impl<R: Reopen> Resumable<R> {
    /// The next chunk, reopening when the current stream breaks.
    async fn step(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            if self.failed || self.next > self.end {
                return None;
            }
            let chunk = match self.current.as_mut() {
                Some(stream) => stream.next().await,
                None => None,
            };
            match chunk {
                Some(Ok(mut chunk)) => {
                    let remaining = self.end - self.next + 1;
                    if chunk.len() as u64 > remaining {
                        // More than the source promised: keep what was asked for, drop the rest.
                        chunk.truncate(remaining as usize);
                    }
                    self.next += chunk.len() as u64;
                    return Some(Ok(chunk));
                }
                // Broken (error) or ended early (`None` before `end`): continue elsewhere.
                Some(Err(_)) | None => {
                    self.current = None;
                    match self.reopen.reopen(self.next, self.end).await {
                        Ok(stream) => self.current = Some(stream),
                        Err(e) => {
                            self.failed = true;
                            return Some(Err(e));
                        }
                    }
                }
            }
        }
    }
}
