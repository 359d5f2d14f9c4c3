//! The daemon's own blob cache: one job — keep verified blobs on disk, bounded, and let
//! readers follow a blob while it is still being written.
//!
//! Layout under `dir`: `blobs/sha256/<hex>` (complete, digest verified) and
//! `ingest/sha256-<hex>` (in flight). A blob is written to `ingest/`, hashed as it lands, and
//! only when its sha256 matches is it renamed into `blobs/` and becomes *complete*; a digest
//! mismatch deletes it. While in flight, readers open the ingest file and follow its growth
//! through a `tokio::sync::watch` of the bytes written: they get bytes as they land and an
//! error if the writer fails (the last byte only once the digest matched, so a reader never
//! passes on a complete body that is wrong). The rename keeps the inode, so a reader that opened the ingest
//! file keeps reading the same bytes after completion.
//!
//! Size is bounded by `max_bytes`: least recently used complete entries are evicted to make
//! room; an entry being read or written is never evicted. The index is rebuilt from disk at
//! start (LRU order from file modification times, which a read refreshes); files left in
//! `ingest/` by a crash are deleted.
//!
//! Manifests and the tags that named them are kept here too ([`manifests`]): a node with no
//! containerd store serves and advertises them like its blobs.
//!
//! What it leaves to others: *where* bytes come from ([`upstream`] fetches, [`coalesce`]
//! decides who fetches), HTTP responses (`crate::registry`), advertising (`crate::advertise`).

pub mod coalesce;
pub mod manifests;
pub mod metrics;
pub mod upstream;

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::oci::{ByteRange, Digest};

/// The `cache:` configuration section (the Helm chart uses these exact key names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Turns the cache, upstream fetches and coalescing on.
    pub enabled: bool,
    /// Where blobs are kept (`blobs/`, `ingest/`).
    pub dir: PathBuf,
    /// Upper bound of the bytes kept; least recently used blobs are evicted beyond it.
    pub max_bytes: u64,
    /// Whether this node may fetch a blob nobody holds from its upstream registry itself
    /// (public images only, anonymously). With `false` the cache only serves what it has.
    pub upstream_fetch: bool,
    /// Registries (`host[:port]`, as in `ns`) reached over plain http instead of https.
    pub plain_http: Vec<String>,
    /// How long a claim to fetch a blob holds on the coordinator.
    #[serde(with = "humantime_serde")]
    pub claim_ttl: Duration,
    /// Bound for asking the coordinator who fetches a blob.
    #[serde(with = "humantime_serde")]
    pub claim_timeout: Duration,
    /// How long a follower waits for the winner to start serving the blob before it fetches
    /// the blob itself.
    #[serde(with = "humantime_serde")]
    pub follow_wait: Duration,
    /// TCP connect timeout towards upstream registries.
    #[serde(with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// An upstream that sends nothing for this long is treated as broken.
    #[serde(with = "humantime_serde")]
    pub upstream_read_timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            dir: PathBuf::from("/var/lib/speculum/cache"),
            max_bytes: 10 * 1024 * 1024 * 1024,
            upstream_fetch: true,
            plain_http: Vec::new(),
            claim_ttl: Duration::from_secs(60),
            claim_timeout: Duration::from_secs(2),
            follow_wait: Duration::from_secs(3),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_read_timeout: Duration::from_secs(30),
        }
    }
}

impl CacheConfig {
    /// Every problem with this section, each naming its field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.dir.as_os_str().is_empty() || !self.dir.is_absolute() {
            errors.push("cache.dir: must be an absolute path".to_owned());
        }
        if self.max_bytes < 1024 * 1024 {
            errors.push("cache.max_bytes: must be at least 1 MiB".to_owned());
        }
        for host in &self.plain_http {
            if crate::oci::path::parse_ns(host).is_err() {
                errors.push(format!(
                    "cache.plain_http: {host:?} is not a registry host[:port]"
                ));
            }
        }
        for (name, d) in [
            ("claim_ttl", self.claim_ttl),
            ("claim_timeout", self.claim_timeout),
            ("follow_wait", self.follow_wait),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("upstream_read_timeout", self.upstream_read_timeout),
        ] {
            if d.is_zero() {
                errors.push(format!("cache.{name}: must be greater than zero"));
            }
        }
        if self.claim_ttl > Duration::from_secs(3600) {
            errors.push("cache.claim_ttl: must be at most 1h".to_owned());
        }
        if self.claim_timeout >= self.claim_ttl {
            errors.push("cache.claim_timeout: must be shorter than claim_ttl".to_owned());
        }
        errors
    }
}

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("blob {0} is already cached or being written")]
    Present(Digest),
    #[error("blob {0} is not cached")]
    NotFound(Digest),
    #[error("blob {digest} does not match its digest ({got} bytes written)")]
    DigestMismatch { digest: Digest, got: u64 },
    #[error("blob {digest} is {got} bytes, announced {want}")]
    SizeMismatch { digest: Digest, got: u64, want: u64 },
    #[error("writing blob {digest} failed: {reason}")]
    WriterFailed { digest: Digest, reason: String },
    #[error("range not satisfiable for a {size} byte blob")]
    Range { size: u64 },
    #[error("cache i/o on {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How far the writer of an in-flight blob is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Reserved; the size is not known yet (upstream headers pending).
    Pending,
    /// `written` of `size` bytes are in the file.
    Writing { size: u64, written: u64 },
    /// Verified and renamed: complete.
    Done { size: u64 },
    /// The writer gave up; readers get an error.
    Failed(String),
}

/// One blob in the index.
struct Entry {
    state: State,
    /// Readers and the writer holding the entry (never evicted while > 0).
    pins: Arc<AtomicUsize>,
    /// LRU clock value of the last use.
    used: u64,
}

enum State {
    Complete { size: u64 },
    InFlight { progress: watch::Receiver<Progress> },
}

struct Index {
    entries: HashMap<Digest, Entry>,
    /// Bytes of complete entries plus announced sizes of in-flight ones.
    bytes: u64,
    clock: u64,
}

/// A change of the set of complete blobs (for the advertiser).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    Added(Digest),
    Evicted(Digest),
}

/// The on-disk blob cache. Share it in an `Arc`.
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    // A std Mutex: held for map updates and a rename or an open, never across an `.await`.
    index: Mutex<Index>,
    /// Bumped on every change of the complete set; the advertiser reconciles on it.
    generation: watch::Sender<u64>,
    events: Mutex<Vec<CacheEvent>>,
}

/// Chunk size of reads from cache files.
const READ_CHUNK: usize = 256 * 1024;
/// The writer announces progress at least every this many bytes.
const WRITE_CHUNK: usize = 256 * 1024;

impl Cache {
    /// Opens (creating) the cache at `dir`: deletes leftovers of interrupted writes and
    /// rebuilds the index from `blobs/`, evicting down to `max_bytes` if needed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Cache>, CacheError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Io { path, source }
        };
        let blobs = dir.join("blobs").join("sha256");
        let ingest = dir.join("ingest");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        std::fs::create_dir_all(&ingest).map_err(io(&ingest))?;
        let mut removed = 0;
        for e in std::fs::read_dir(&ingest).map_err(io(&ingest))?.flatten() {
            if std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for e in std::fs::read_dir(&blobs).map_err(io(&blobs))?.flatten() {
            let name = e.file_name();
            let digest = name
                .to_str()
                .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
            let meta = e.metadata().ok().filter(|m| m.is_file());
            match (digest, meta) {
                (Some(d), Some(m)) => {
                    found.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), d, m.len()))
                }
                // Not ours: a cache directory holds nothing else.
                _ => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        found.sort();
        let mut index = Index {
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        };
        for (_, digest, size) in found {
            index.clock += 1;
            index.bytes += size;
            index.entries.insert(
                digest,
                Entry {
                    state: State::Complete { size },
                    pins: Arc::new(AtomicUsize::new(0)),
                    used: index.clock,
                },
            );
        }
        let cache = Arc::new(Cache {
            dir: dir.to_owned(),
            max_bytes,
            index: Mutex::new(index),
            generation: watch::channel(0).0,
            events: Mutex::new(Vec::new()),
        });
        {
            let mut index = cache.lock();
            cache.make_room(&mut index, 0);
        }
        let (entries, bytes) = cache.usage();
        tracing::info!(
            dir = %dir.display(),
            entries,
            bytes,
            removed_partial = removed,
            "blob cache opened"
        );
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Every critical section leaves the index consistent; a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    fn ingest_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("ingest")
            .join(format!("sha256-{}", digest.hex()))
    }

    /// Number of entries and bytes accounted (complete plus announced in-flight sizes).
    pub fn usage(&self) -> (usize, u64) {
        let index = self.lock();
        (index.entries.len(), index.bytes)
    }

    /// The cache's bound (`cache.max_bytes`): a blob larger than this is never written.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Digests of every complete blob.
    pub fn complete(&self) -> Vec<Digest> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Complete { .. }))
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// True when the blob is complete or being written.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// A receiver that changes whenever the set of complete blobs changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Takes the events since the last call (additions and evictions of complete blobs).
    pub fn take_events(&self) -> Vec<CacheEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn changed(&self, event: CacheEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Evicts least recently used, unpinned, complete entries until `extra` more bytes fit.
    fn make_room(&self, index: &mut Index, extra: u64) {
        while index.bytes + extra > self.max_bytes {
            let victim = index
                .entries
                .iter()
                .filter(|(_, e)| {
                    matches!(e.state, State::Complete { .. }) && e.pins.load(Ordering::Acquire) == 0
                })
                .min_by_key(|(_, e)| e.used)
                .map(|(d, _)| d.clone());
            let Some(digest) = victim else {
                tracing::warn!(
                    bytes = index.bytes,
                    extra,
                    max_bytes = self.max_bytes,
                    "cache over its limit: everything left is in use"
                );
                return;
            };
            if let Some(Entry {
                state: State::Complete { size },
                ..
            }) = index.entries.remove(&digest)
            {
                index.bytes -= size;
            }
            let _ = std::fs::remove_file(self.blob_path(&digest));
            tracing::info!(%digest, "evicted from the blob cache");
            self.changed(CacheEvent::Evicted(digest));
        }
    }

    /// Starts writing `digest`. Readers can open it at once and wait for its size.
    pub fn begin(self: &Arc<Self>, digest: &Digest) -> Result<Writer, CacheError> {
        let path = self.ingest_path(digest);
        let mut index = self.lock();
        if index.entries.contains_key(digest) {
            return Err(CacheError::Present(digest.clone()));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| CacheError::Io {
                path: path.clone(),
                source,
            })?;
        let (tx, rx) = watch::channel(Progress::Pending);
        let pins = Arc::new(AtomicUsize::new(1));
        index.clock += 1;
        let used = index.clock;
        index.entries.insert(
            digest.clone(),
            Entry {
                state: State::InFlight { progress: rx },
                pins: pins.clone(),
                used,
            },
        );
        Ok(Writer {
            cache: self.clone(),
            digest: digest.clone(),
            file: Some(tokio::fs::File::from_std(file)),
            path,
            verifier: digest.verifier(),
            size: None,
            written: 0,
            buffered: BytesMut::new(),
            progress: tx,
            pins,
            finished: false,
        })
    }

    /// The size of a blob: `Some` at once when complete or when its writer knows it; waits
    /// (bounded by `wait`) while the size is pending. `None` when absent or failed.
    pub async fn size(&self, digest: &Digest, wait: Duration) -> Option<u64> {
        let mut rx = {
            let index = self.lock();
            match &index.entries.get(digest)?.state {
                State::Complete { size } => return Some(*size),
                State::InFlight { progress } => progress.clone(),
            }
        };
        let wait_size = async {
            loop {
                match &*rx.borrow_and_update() {
                    Progress::Writing { size, .. } | Progress::Done { size } => return Some(*size),
                    Progress::Failed(_) => return None,
                    Progress::Pending => {}
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(wait, wait_size).await.ok().flatten()
    }

    /// Opens a blob for reading, complete or in flight, optionally one range of it (the size
    /// must be known: call [`Cache::size`] first for an in-flight blob). The returned stream
    /// follows an in-flight blob's growth and fails if its writer fails.
    pub fn read(
        self: &Arc<Self>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<(u64, BoxStream<'static, std::io::Result<Bytes>>), CacheError> {
        let mut index = self.lock();
        index.clock += 1;
        let clock = index.clock;
        let entry = index
            .entries
            .get_mut(digest)
            .ok_or_else(|| CacheError::NotFound(digest.clone()))?;
        entry.used = clock;
        let (path, size, progress) = match &entry.state {
            State::Complete { size } => (self.blob_path(digest), *size, None),
            State::InFlight { progress } => {
                let size = match &*progress.borrow() {
                    Progress::Writing { size, .. } | Progress::Done { size } => *size,
                    Progress::Pending | Progress::Failed(_) => {
                        return Err(CacheError::NotFound(digest.clone()));
                    }
                };
                (self.ingest_path(digest), size, Some(progress.clone()))
            }
        };
        let (start, end) = match range {
            Some(r) if r.end < size => (r.start, r.end + 1),
            Some(_) => return Err(CacheError::Range { size }),
            None => (0, size),
        };
        // Opened under the lock: the writer renames under it too, so the path is right.
        let file = std::fs::File::open(&path).map_err(|source| CacheError::Io {
            path: path.clone(),
            source,
        })?;
        if progress.is_none() {
            // Survives restarts as the LRU order; best effort.
            let _ = file.set_modified(SystemTime::now());
        }
        let pin = Pin::new(entry.pins.clone());
        drop(index);
        let reader = Reader {
            file: tokio::fs::File::from_std(file),
            next: start,
            end,
            progress,
            _pin: pin,
            digest: digest.clone(),
        };
        Ok((size, reader.into_stream()))
    }
}

/// Holds an entry against eviction while alive.
struct Pin(Arc<AtomicUsize>);

impl Pin {
    fn new(pins: Arc<AtomicUsize>) -> Pin {
        pins.fetch_add(1, Ordering::AcqRel);
        Pin(pins)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Reader {
    file: tokio::fs::File,
    /// Offset of the next byte to send; `end` is exclusive.
    next: u64,
    end: u64,
    progress: Option<watch::Receiver<Progress>>,
    _pin: Pin,
    digest: Digest,
}

impl Reader {
    fn into_stream(self) -> BoxStream<'static, std::io::Result<Bytes>> {
        use futures::StreamExt;
        futures::stream::unfold(self, |mut r| async move {
            if r.next >= r.end {
                return None;
            }
            let item = r.step().await;
            Some((item, r))
        })
        .boxed()
    }

    /// Bytes available to read now (waits for the writer when none are).
    async fn available(&mut self) -> std::io::Result<u64> {
        let Some(rx) = self.progress.as_mut() else {
            return Ok(self.end);
        };
        loop {
            let written = match &*rx.borrow_and_update() {
                Progress::Writing { written, .. } => *written,
                Progress::Done { size } => *size,
                Progress::Pending => 0,
                Progress::Failed(reason) => {
                    return Err(std::io::Error::other(format!(
                        "writer of {} failed: {reason}",
                        self.digest
                    )));
                }
            };
            if written > self.next {
                return Ok(written.min(self.end));
            }
            if rx.changed().await.is_err() {
                // The writer vanished without a final word: treat as failed.
                return Err(std::io::Error::other(format!(
                    "writer of {} went away",
                    self.digest
                )));
            }
        }
    }

    async fn step(&mut self) -> std::io::Result<Bytes> {
        let upto = self.available().await?;
        let want = ((upto - self.next) as usize).min(READ_CHUNK);
        let mut buf = vec![0u8; want];
        self.file.seek(SeekFrom::Start(self.next)).await?;
        self.file.read_exact(&mut buf).await?;
        self.next += want as u64;
        Ok(Bytes::from(buf))
    }
}

/// The one writer of an in-flight blob. Dropping it without [`Writer::finish`] fails the
/// blob: readers get an error, the partial file is deleted.
pub struct Writer {
    cache: Arc<Cache>,
    digest: Digest,
    file: Option<tokio::fs::File>,
    path: PathBuf,
    verifier: crate::oci::digest::Verifier,
    size: Option<u64>,
    written: u64,
    buffered: BytesMut,
    progress: watch::Sender<Progress>,
    pins: Arc<AtomicUsize>,
    finished: bool,
}

impl Writer {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Bytes written so far (the offset to resume an interrupted download from).
    pub fn written(&self) -> u64 {
        self.written + self.buffered.len() as u64
    }

    /// Announces the blob's size (from upstream's `Content-Length`) and makes room for it.
    pub fn set_size(&mut self, size: u64) {
        self.size = Some(size);
        {
            let mut index = self.cache.lock();
            self.cache.make_room(&mut index, size);
            index.bytes += size;
        }
        self.progress.send_replace(Progress::Writing {
            size,
            written: self.written,
        });
    }

    /// Appends bytes. Readers see them once they are in the file.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), CacheError> {
        if let Some(size) = self.size
            && self.written() + chunk.len() as u64 > size
        {
            return Err(CacheError::SizeMismatch {
                digest: self.digest.clone(),
                got: self.written() + chunk.len() as u64,
                want: size,
            });
        }
        self.verifier.update(chunk);
        self.buffered.extend_from_slice(chunk);
        if self.buffered.len() >= WRITE_CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), CacheError> {
        if self.buffered.is_empty() {
            return Ok(());
        }
        let io = |source| CacheError::Io {
            path: self.path.clone(),
            source,
        };
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let data = self.buffered.split().freeze();
        file.write_all(&data).await.map_err(io)?;
        // tokio's File completes writes in the background: flush so readers find the bytes.
        file.flush().await.map_err(io)?;
        self.written += data.len() as u64;
        if let Some(size) = self.size {
            // The last byte becomes readable only with `Done`, after the digest matched: a
            // reader never hands out a complete body that is wrong (a mismatch fails it).
            self.progress.send_replace(Progress::Writing {
                size,
                written: self.written.min(size.saturating_sub(1)),
            });
        }
        Ok(())
    }

    /// Verifies the digest, makes the file durable and renames it into place: the blob is
    /// complete. On a mismatch the blob is dropped and readers get an error.
    pub async fn finish(mut self) -> Result<u64, CacheError> {
        self.flush().await?;
        let size = self.size.unwrap_or(self.written);
        if self.written != size {
            let e = CacheError::SizeMismatch {
                digest: self.digest.clone(),
                got: self.written,
                want: size,
            };
            self.abort(&e.to_string());
            return Err(e);
        }
        let verifier = std::mem::replace(&mut self.verifier, self.digest.verifier());
        if !verifier.verify() {
            let e = CacheError::DigestMismatch {
                digest: self.digest.clone(),
                got: self.written,
            };
            self.abort(&e.to_string());
            return Err(e);
        }
        if let Some(file) = self.file.take() {
            let synced = file.sync_all().await;
            if let Err(source) = synced {
                let e = CacheError::Io {
                    path: self.path.clone(),
                    source,
                };
                self.abort(&e.to_string());
                return Err(e);
            }
        }
        let target = self.cache.blob_path(&self.digest);
        {
            let mut index = self.cache.lock();
            if let Err(source) = std::fs::rename(&self.path, &target) {
                drop(index);
                let e = CacheError::Io {
                    path: target,
                    source,
                };
                self.abort(&e.to_string());
                return Err(e);
            }
            if self.size.is_none() {
                index.bytes += size;
            }
            if let Some(entry) = index.entries.get_mut(&self.digest) {
                entry.state = State::Complete { size };
            }
            self.finished = true;
            self.progress.send_replace(Progress::Done { size });
        }
        self.pins.fetch_sub(1, Ordering::AcqRel);
        self.cache.changed(CacheEvent::Added(self.digest.clone()));
        Ok(size)
    }

    /// Gives up: readers get `reason` as an error, the partial file is deleted.
    pub fn abort(&mut self, reason: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.file = None;
        {
            let mut index = self.cache.lock();
            if index.entries.remove(&self.digest).is_some()
                && let Some(size) = self.size
            {
                index.bytes -= size;
            }
        }
        let _ = std::fs::remove_file(&self.path);
        self.pins.fetch_sub(1, Ordering::AcqRel);
        self.progress
            .send_replace(Progress::Failed(reason.to_owned()));
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.abort("writer dropped before the blob was complete");
    }
}

#[cfg(test)]
mod tests;
