//! The `Store` seam: read-only access to the content a node already holds.
//!
//! The daemon never writes to containerd; it lists images, resolves tags to digests, describes
//! content (size and media type) and streams it, optionally from an offset; a store whose
//! content lives in plain files can also hand out the file itself ([`Store::open_file`]), so
//! the registry can let the kernel send it (`sendfile(2)`). Two
//! implementations: [`containerd::ContainerdStore`] (the real one) and
//! [`memory::MemoryStore`] (the twin for unit tests). [`conformance`] holds the one suite both
//! must pass. Which content belongs to which image ([`closure`]) is computed here, once, for
//! every implementation.

pub mod conformance;
pub mod containerd;
pub mod introspect;
pub mod memory;

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::oci::{ByteRange, Digest, Reference, media};

/// A stream of content bytes.
pub type ContentStream = BoxStream<'static, std::io::Result<Bytes>>;

/// One byte range of a content file, opened: what [`Store::open_file`] hands out so that the
/// bytes can go from the page cache to a socket without passing through user space.
#[derive(Debug)]
pub struct ContentFile {
    pub file: std::fs::File,
    /// Where the range starts in the file.
    pub offset: u64,
    /// Bytes in the range (the file holds at least `offset + len`).
    pub len: u64,
}

impl ContentFile {
    /// The same bytes as a stream, for writers that cannot send a file (hyper). Reads the
    /// file in [`FILE_CHUNK_BYTES`] chunks on tokio's blocking pool, and ends with an error if
    /// the file turns out shorter than `len`. The file's position is the stream's, so a
    /// `ContentFile` is either streamed or sent, never both.
    pub fn stream(self) -> std::io::Result<ContentStream> {
        use std::io::{Seek, SeekFrom};
        use tokio::io::AsyncReadExt;
        let mut file = self.file;
        if self.len == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let reader = tokio::fs::File::from_std(file).take(self.len);
        let stream = tokio_util::io::ReaderStream::with_capacity(reader, FILE_CHUNK_BYTES);
        Ok(exact_length(stream.boxed(), self.len))
    }
}

/// Read buffer when content files are streamed: big enough that a 1 GB layer is a few
/// thousand reads, small enough that hundreds of concurrent streams stay in the tens of MiB.
pub(crate) const FILE_CHUNK_BYTES: usize = 256 * 1024;

/// Passes exactly `len` bytes through: extra bytes are cut, and a stream that ends early ends
/// with an `UnexpectedEof` error so that a short body is never mistaken for a whole one.
pub(crate) fn exact_length(stream: ContentStream, len: u64) -> ContentStream {
    futures::stream::unfold(
        (stream, len, false),
        |(mut stream, remaining, done)| async move {
            if done || remaining == 0 {
                return None;
            }
            match stream.next().await {
                Some(Ok(mut chunk)) => {
                    if chunk.len() as u64 > remaining {
                        chunk.truncate(remaining as usize);
                    }
                    let left = remaining - chunk.len() as u64;
                    Some((Ok(chunk), (stream, left, false)))
                }
                Some(Err(e)) => Some((Err(e), (stream, remaining, true))),
                None => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("content ended {remaining} bytes early"),
                    )),
                    (stream, remaining, true),
                )),
            }
        },
    )
    .boxed()
}

/// Size and media type of one piece of content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: u64,
    /// Detected from the bytes for manifests, indexes and configs; `application/octet-stream`
    /// for everything else (containerd does not record media types of blobs).
    pub media_type: String,
}

/// An image record: a fully qualified name pointing at a manifest or index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Image {
    pub registry: String,
    pub repository: String,
    /// `None` for images recorded by digest only (`repo@sha256:…`).
    pub tag: Option<String>,
    pub digest: Digest,
}

impl Image {
    /// Builds an image from a containerd image name and its target digest. Names that are not
    /// fully qualified references (such as CRI's `sha256:<config>` records) yield `None`.
    pub fn from_name(name: &str, digest: Digest) -> Option<Image> {
        let r = Reference::parse(name).ok()?;
        Some(Image {
            registry: r.registry,
            repository: r.repository,
            tag: r.tag,
            digest,
        })
    }

    /// The DHT key of this image's tag, if it has one.
    pub fn tag_key(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| Reference::tag_key(&self.registry, &self.repository, t))
    }
}

/// A change in the set of images, as reported by the store's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// An image was created or now points elsewhere (containerd `/images/create|update`).
    ImageChanged { name: String },
    /// An image record was deleted (containerd `/images/delete`).
    ImageDeleted { name: String },
    /// A blob was committed to the content store (containerd ≥ 2.1 `/content/create`); it may
    /// belong to a pull still in progress, so no image names it yet. `sources`: where it was
    /// pulled from, `(registry host without port, repository)` from containerd's
    /// distribution-source labels; empty when it has none.
    ContentAdded {
        digest: Digest,
        sources: Vec<(String, String)>,
    },
}

/// Errors of the store seam.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content {0} not found")]
    NotFound(Digest),
    #[error("store unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("reading content failed")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            message: message.into(),
            source: None,
        }
    }
}

/// Read-only access to a node's content. See the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every image record that names a fully qualified reference.
    async fn images(&self) -> Result<Vec<Image>, StoreError>;

    /// The digest `registry/repository:tag` points at, if the node has that image.
    async fn resolve(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<Digest>, StoreError>;

    /// Size and media type of content, or `None` when the node does not hold it.
    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError>;

    /// Streams content, all of it or one range. `NotFound` when absent.
    async fn open(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ContentStream, StoreError>;

    /// The content file behind `digest` (all of it or one range), when the content lives in
    /// a plain file this process can open; `Ok(None)` when it does not (the caller then uses
    /// [`Store::open`]). `NotFound` when absent. Stores without files keep the default.
    async fn open_file(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ContentFile>, StoreError> {
        let _ = (digest, range);
        Ok(None)
    }

    /// Image events. The stream ends when the connection to the backing store breaks; the
    /// caller re-subscribes (and reconciles, because events may have been missed).
    async fn watch(&self) -> Result<BoxStream<'static, StoreEvent>, StoreError>;

    /// Reads small content (manifests, indexes) whole, refusing anything over `limit` bytes.
    async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Bytes, StoreError> {
        use futures::TryStreamExt;
        let Some(desc) = self.descriptor(digest).await? else {
            return Err(StoreError::NotFound(digest.clone()));
        };
        if desc.size > limit {
            return Err(StoreError::unavailable(format!(
                "{digest} is {} bytes, over the {limit} byte limit",
                desc.size
            )));
        }
        let chunks: Vec<Bytes> = self.open(digest, None).await?.try_collect().await?;
        Ok(chunks.concat().into())
    }
}

/// What the manifests and indexes a store has described declare about their children: the
/// `mediaType` of each descriptor. containerd keeps no media type for content, and a blob's
/// bytes cannot say whether it is a gzip, zstd, zstd:chunked or plain tar layer, Docker or
/// OCI, distributable or not — but the descriptor that references it does, whatever type a
/// registry invents next. Bounded (oldest first out); a std Mutex, never held across `.await`.
#[derive(Debug, Default)]
pub(crate) struct Declared {
    inner: std::sync::Mutex<DeclaredInner>,
}

#[derive(Debug, Default)]
struct DeclaredInner {
    types: std::collections::HashMap<Digest, String>,
    order: std::collections::VecDeque<Digest>,
}

/// Declared media types remembered per store: well above the blobs of the images a node holds
/// (a few MiB at most).
const DECLARED_ENTRIES: usize = 64 * 1024;

impl Declared {
    /// Records the media types `manifest` (a manifest or index) declares for its children.
    /// The first declaration of a digest stays: content is immutable, and one image's
    /// manifest must not relabel what another's described.
    pub fn learn(&self, manifest: &[u8]) {
        let children = media::children(manifest);
        if children.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for child in children {
            if child.media_type.is_empty()
                || child.media_type.len() > 255
                || inner.types.contains_key(&child.digest)
            {
                continue;
            }
            inner.types.insert(child.digest.clone(), child.media_type);
            inner.order.push_back(child.digest);
            while inner.order.len() > DECLARED_ENTRIES {
                if let Some(old) = inner.order.pop_front() {
                    inner.types.remove(&old);
                }
            }
        }
    }

    /// The media type a described manifest or index declared for `digest`.
    pub fn get(&self, digest: &Digest) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.types.get(digest).cloned()
    }
}

/// The media type a store reports for content: a manifest or index is what its own bytes say
/// (it is served from `/manifests/`, so a parent may not relabel it, nor make a layer one);
/// anything else is what a parent declared (every layer type, configs, artifacts), and only
/// without a declaration what detection found (`application/octet-stream` for non-JSON).
pub fn classify(detected: &str, declared: Option<String>) -> String {
    if media::is_manifest_type(detected) {
        return detected.to_owned();
    }
    match declared {
        Some(d) if !media::is_manifest_type(&d) => d,
        _ => detected.to_owned(),
    }
}

/// Every digest reachable from `root` that this store holds: the root, and for an index its
/// manifests, for a manifest its config and layers. Children the node lacks (other platforms
/// of a multi-arch index) are skipped: only what can be served is returned.
pub async fn closure(store: &dyn Store, root: &Digest) -> Result<Vec<Digest>, StoreError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut queue = vec![root.clone()];
    while let Some(d) = queue.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Some(desc) = store.descriptor(&d).await? else {
            continue;
        };
        out.push(d.clone());
        if media::is_manifest_type(&desc.media_type) {
            let bytes = store.read_small(&d, media::MAX_MANIFEST_BYTES).await?;
            queue.extend(media::children(&bytes).into_iter().map(|c| c.digest));
        }
    }
    Ok(out)
}
