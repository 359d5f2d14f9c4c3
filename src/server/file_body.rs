//! The body of a response as a region of an open file, one job: the [`FileBody`] response
//! extension a writer that can send files (`sendfile(2)` in [`super::http1`]) picks up, and the
//! [`SendObserver`] the application gives it to hear what was sent. The response's own body
//! streams the same bytes, so a writer that ignores this extension sends the same response.
//!
//! The contract: whoever sends the bytes accounts for them exactly once. Claiming the region
//! ([`FileBody::claim`]) sets a flag the application's body stream checks (it then writes
//! nothing when dropped), and the returned [`FileSend`] reports every chunk
//! ([`SendObserver::sent`]) and, when dropped — complete, failed or abandoned alike — the
//! total ([`SendObserver::done`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Hears what a [`FileSend`] sent (the registry counts bytes and writes the audit line).
pub trait SendObserver: Send + Sync + 'static {
    /// `n` more bytes went out.
    fn sent(&self, n: u64);
    /// Sending ended (or was abandoned) after `total` bytes.
    fn done(&self, total: u64);
}

/// Response extension: the body's bytes as `len` bytes at `offset` of `file`.
#[derive(Clone)]
pub struct FileBody {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
    observer: Arc<dyn SendObserver>,
    claimed: Arc<AtomicBool>,
}

impl FileBody {
    pub fn new(
        file: Arc<std::fs::File>,
        offset: u64,
        len: u64,
        observer: Arc<dyn SendObserver>,
    ) -> FileBody {
        FileBody {
            file,
            offset,
            len,
            observer,
            claimed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Bytes in the region (the response's body length).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The flag [`FileBody::claim`] sets: the body stream that carries the same bytes checks it
    /// and, once set, leaves the accounting to the [`FileSend`].
    pub fn claimed(&self) -> Arc<AtomicBool> {
        self.claimed.clone()
    }

    /// Takes over sending: from now on the body stream writes no record when dropped.
    pub fn claim(self) -> FileSend {
        self.claimed.store(true, Ordering::Release);
        FileSend {
            body: self,
            sent: 0,
        }
    }
}

/// A file region being sent: reports what went out, and the total when dropped.
pub struct FileSend {
    body: FileBody,
    sent: u64,
}

impl FileSend {
    pub fn file(&self) -> &std::fs::File {
        &self.body.file
    }

    /// The file, for work on the blocking pool.
    pub fn shared_file(&self) -> Arc<std::fs::File> {
        self.body.file.clone()
    }

    /// The file offset of the next byte to send.
    pub fn position(&self) -> u64 {
        self.body.offset + self.sent
    }

    /// Bytes still to send.
    pub fn remaining(&self) -> u64 {
        self.body.len - self.sent
    }

    /// Records `n` more bytes as sent.
    pub fn advance(&mut self, n: u64) {
        let n = n.min(self.remaining());
        self.sent += n;
        self.body.observer.sent(n);
    }
}

impl Drop for FileSend {
    fn drop(&mut self) {
        self.body.observer.done(self.sent);
    }
}
