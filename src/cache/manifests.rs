//! Manifests and tags in the own cache: one job — keep the manifests this node fetched (from
//! upstream, or from peers) as ordinary cache entries together with their media type, and the
//! tags that named them, so a node with no containerd store (CRI-O, a containerd that discards
//! unpacked layers) serves them to its neighbours by digest and by tag.
//!
//! A manifest is a blob of the cache (`blobs/sha256/<hex>`: verified, bounded, evicted like any
//! blob, advertised by digest with the other complete entries). Beside it, under `meta/`:
//! - `meta/media/<hex>`: the media type it is served with (written before the blob completes,
//!   so a complete manifest always has one);
//! - `meta/tags/<sha256 of the tag key>`: `<registry>/<repository>:<tag>` and the digest it
//!   named when this node last fetched it, at most [`MAX_TAGS`] (the oldest go first).
//!
//! A tag or a media type whose manifest was evicted is ignored (and dropped when found):
//! only complete entries are served and advertised. Public content only: the caller decides
//! (`crate::registry` puts nothing here that needs a grant).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::TryStreamExt;

use super::{Cache, CacheError, State};
use crate::oci::{Digest, Reference, media};

/// Tags kept at most; beyond it the least recently written go.
pub(crate) const MAX_TAGS: usize = 4096;
/// Media-type files kept at most (one per manifest ever cached, evicted ones included).
const MAX_MEDIA: usize = 4 * MAX_TAGS;

impl Cache {
    fn meta_dir(&self, what: &str) -> PathBuf {
        self.dir.join("meta").join(what)
    }

    fn is_complete(&self, digest: &Digest) -> bool {
        matches!(
            self.lock().entries.get(digest).map(|e| &e.state),
            Some(State::Complete { .. })
        )
    }

    /// Keeps manifest `bytes` (media type `media_type`) as entry `digest`. Already present
    /// (complete or being written) is fine. Refuses a non-manifest type or a digest mismatch.
    pub async fn put_manifest(
        self: &Arc<Self>,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), CacheError> {
        if !media::is_manifest_type(media_type) || bytes.len() as u64 > media::MAX_MANIFEST_BYTES {
            return Err(CacheError::WriterFailed {
                digest: digest.clone(),
                reason: format!("not a manifest ({media_type}, {} bytes)", bytes.len()),
            });
        }
        if self.contains(digest) {
            return Ok(());
        }
        let dir = self.meta_dir("media");
        write_small(&dir, digest.hex(), media_type.as_bytes()).await?;
        prune(&dir, MAX_MEDIA).await;
        let mut writer = match self.begin(digest) {
            Ok(w) => w,
            Err(CacheError::Present(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        writer.set_size(bytes.len() as u64);
        writer.write(bytes).await?;
        writer.finish().await?;
        Ok(())
    }

    /// The media type of cached manifest `digest`, when it is complete here.
    pub async fn manifest_type(&self, digest: &Digest) -> Option<String> {
        if !self.is_complete(digest) {
            return None;
        }
        let t = tokio::fs::read_to_string(self.meta_dir("media").join(digest.hex()))
            .await
            .ok()?;
        media::is_manifest_type(&t).then_some(t)
    }

    /// Cached manifest `digest` whole, with its media type; `None` when not (completely) here.
    pub async fn read_manifest(self: &Arc<Self>, digest: &Digest) -> Option<(String, Bytes)> {
        let media_type = self.manifest_type(digest).await?;
        let (size, stream) = self.read(digest, None).ok()?;
        if size > media::MAX_MANIFEST_BYTES {
            return None;
        }
        let chunks: Vec<Bytes> = stream.try_collect().await.ok()?;
        Some((media_type, Bytes::from(chunks.concat())))
    }

    /// Remembers that `registry/repository:tag` named `digest` (its manifest is cached).
    pub async fn put_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<(), CacheError> {
        let key = Reference::tag_key(registry, repository, tag);
        let dir = self.meta_dir("tags");
        let name = Digest::sha256_of(key.as_bytes()).hex().to_owned();
        write_small(&dir, &name, format!("{key}\n{digest}\n").as_bytes()).await?;
        prune(&dir, MAX_TAGS).await;
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// The digest `registry/repository:tag` named, when its manifest is complete here.
    pub async fn tag(&self, registry: &str, repository: &str, tag: &str) -> Option<Digest> {
        let key = Reference::tag_key(registry, repository, tag);
        let name = Digest::sha256_of(key.as_bytes()).hex().to_owned();
        let text = tokio::fs::read_to_string(self.meta_dir("tags").join(name))
            .await
            .ok()?;
        let (k, digest) = parse_tag_file(&text)?;
        (k == key && self.is_complete(&digest)).then_some(digest)
    }

    /// Every tag key whose manifest is complete here (what the advertiser adds to the wanted
    /// keys). Bounded by [`MAX_TAGS`].
    pub fn tag_keys(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.meta_dir("tags")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .take(MAX_TAGS)
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| parse_tag_file(&t))
            .filter(|(_, d)| self.is_complete(d))
            .map(|(k, _)| k)
            .collect()
    }
}

fn parse_tag_file(text: &str) -> Option<(String, Digest)> {
    let mut lines = text.lines();
    let key = lines.next()?.to_owned();
    let digest = lines.next()?.parse().ok()?;
    Some((key, digest))
}

/// Writes a small file atomically (temporary file, rename), creating `dir`.
async fn write_small(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<(), CacheError> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| CacheError::Io { path, source }
    };
    tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
    let tmp = dir.join(format!(".tmp.{name}"));
    let target = dir.join(name);
    tokio::fs::write(&tmp, bytes).await.map_err(io(&tmp))?;
    tokio::fs::rename(&tmp, &target)
        .await
        .map_err(io(&target))?;
    Ok(())
}

/// Deletes the oldest files of `dir` beyond `max` (best effort).
async fn prune(dir: &std::path::Path, max: usize) {
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), e.path()))
            })
            .collect();
        if files.len() <= max {
            return;
        }
        files.sort();
        for (_, path) in files.iter().take(files.len() - max) {
            let _ = std::fs::remove_file(path);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> (Digest, Vec<u8>) {
        let bytes = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","size":4},"layers":[]}"#.to_vec();
        (Digest::sha256_of(&bytes), bytes)
    }

    #[tokio::test]
    async fn manifest_and_tag_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 20).expect("cache");
        let (d, bytes) = manifest();
        assert!(cache.tag("r.io:5000", "app", "v1").await.is_none());
        cache
            .put_manifest(&d, media::OCI_MANIFEST, &bytes)
            .await
            .expect("put");
        cache
            .put_tag("r.io:5000", "app", "v1", &d)
            .await
            .expect("tag");
        let (t, got) = cache.read_manifest(&d).await.expect("read");
        assert_eq!(
            (t.as_str(), got.as_ref()),
            (media::OCI_MANIFEST, &bytes[..])
        );
        assert_eq!(cache.tag("r.io:5000", "app", "v1").await, Some(d.clone()));
        assert_eq!(cache.tag_keys(), vec!["r.io:5000/app:v1".to_owned()]);
        assert!(cache.complete().contains(&d), "advertised with the blobs");
        drop(cache);
        let cache = Cache::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(cache.tag("r.io:5000", "app", "v1").await, Some(d.clone()));
        assert!(cache.read_manifest(&d).await.is_some());
    }

    #[tokio::test]
    async fn refuses_a_mismatch_and_non_manifests_and_forgets_evicted_tags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 1 << 20).expect("cache");
        let (d, bytes) = manifest();
        let wrong = Digest::sha256_of(b"other");
        assert!(
            cache
                .put_manifest(&wrong, media::OCI_MANIFEST, &bytes)
                .await
                .is_err()
        );
        assert!(!cache.contains(&wrong), "a mismatch leaves nothing");
        assert!(
            cache
                .put_manifest(&d, media::OCTET_STREAM, &bytes)
                .await
                .is_err()
        );
        // A tag naming a manifest that is not here is not served nor advertised.
        cache.put_tag("r.io", "app", "v1", &d).await.expect("tag");
        assert_eq!(cache.tag("r.io", "app", "v1").await, None);
        assert!(cache.tag_keys().is_empty());
        // Fill the cache past its bound: the manifest is evicted, and so is its tag.
        cache
            .put_manifest(&d, media::OCI_MANIFEST, &bytes)
            .await
            .expect("put");
        assert!(cache.tag("r.io", "app", "v1").await.is_some());
        let big = vec![7u8; (1 << 20) - 10];
        let bd = Digest::sha256_of(&big);
        let mut w = cache.begin(&bd).expect("begin");
        w.set_size(big.len() as u64);
        w.write(&big).await.expect("write");
        w.finish().await.expect("finish");
        assert_eq!(cache.tag("r.io", "app", "v1").await, None);
        assert!(cache.read_manifest(&d).await.is_none());
    }
}
