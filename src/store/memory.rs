//! `MemoryStore`: the in-memory twin of the containerd store, for unit tests of logic that
//! sits on the `Store` seam. It passes the same conformance suite as the real store.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use super::{ContentStream, Descriptor, Image, Store, StoreError, StoreEvent};
use crate::oci::{ByteRange, Digest, media};

/// Content and image records held in memory.
pub struct MemoryStore {
    // A std Mutex: it is never held across an `.await`.
    inner: Mutex<Inner>,
    events: broadcast::Sender<StoreEvent>,
    declared: super::Declared,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<Digest, Bytes>,
    images: HashMap<String, Digest>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            events: broadcast::channel(1024).0,
            declared: super::Declared::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated, so poisoning is
        // ignored rather than propagated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds content and returns its sha256 digest.
    pub fn add_blob(&self, bytes: impl Into<Bytes>) -> Digest {
        let bytes = bytes.into();
        let d = Digest::sha256_of(&bytes);
        self.lock().blobs.insert(d.clone(), bytes);
        d
    }

    /// Removes content (an image pointing at it stays, as in containerd after a GC race).
    pub fn remove_blob(&self, digest: &Digest) {
        self.lock().blobs.remove(digest);
    }

    /// Creates or moves an image record and emits an event.
    pub fn set_image(&self, name: &str, digest: Digest) {
        self.lock().images.insert(name.to_owned(), digest);
        let _ = self.events.send(StoreEvent::ImageChanged {
            name: name.to_owned(),
        });
    }

    /// Deletes an image record and emits an event.
    pub fn delete_image(&self, name: &str) {
        self.lock().images.remove(name);
        let _ = self.events.send(StoreEvent::ImageDeleted {
            name: name.to_owned(),
        });
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn images(&self) -> Result<Vec<Image>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .images
            .iter()
            .filter_map(|(name, d)| Image::from_name(name, d.clone()))
            .collect())
    }

    async fn resolve(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<Digest>, StoreError> {
        let name = format!("{registry}/{repository}:{tag}");
        Ok(self.lock().images.get(&name).cloned())
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        let Some(b) = self.lock().blobs.get(digest).cloned() else {
            return Ok(None);
        };
        let detected = if b.len() as u64 <= media::MAX_MANIFEST_BYTES {
            media::detect(&b)
        } else {
            media::OCTET_STREAM
        };
        // As the containerd store: what a described manifest declares for its children.
        if media::is_manifest_type(detected) {
            self.declared.learn(&b);
        }
        Ok(Some(Descriptor {
            digest: digest.clone(),
            size: b.len() as u64,
            media_type: super::classify(detected, self.declared.get(digest)),
        }))
    }

    async fn open(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ContentStream, StoreError> {
        let bytes = self
            .lock()
            .blobs
            .get(digest)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(digest.clone()))?;
        let bytes = match range {
            Some(r) if r.start < bytes.len() as u64 => {
                let end = (r.end as usize).min(bytes.len() - 1);
                bytes.slice(r.start as usize..=end)
            }
            Some(_) => Bytes::new(),
            None => bytes,
        };
        // Chunk the content so consumers see a multi-part stream, as from a file or gRPC.
        let chunks: Vec<std::io::Result<Bytes>> = (0..bytes.len())
            .step_by(64 * 1024)
            .map(|i| Ok(bytes.slice(i..(i + 64 * 1024).min(bytes.len()))))
            .collect();
        Ok(futures::stream::iter(chunks).boxed())
    }

    async fn watch(&self) -> Result<BoxStream<'static, StoreEvent>, StoreError> {
        Ok(BroadcastStream::new(self.events.subscribe())
            .filter_map(|e| async move { e.ok() })
            .boxed())
    }
}
