//! `ContainerdStore`: the [`Store`] seam backed by the node's containerd, over its gRPC socket.
//!
//! Its one job is translating the seam's read-only questions into containerd API calls: image
//! records come from the images service, sizes from the content service, bytes from the
//! content store's files (fast path) or the content service's `Read` stream, and image changes
//! from the events service. It never writes to containerd and decides nothing about serving.
//!
//! Things worth knowing before changing this file (details and sources in `docs/containerd.md`):
//! - Every namespaced call carries the `containerd-namespace` gRPC metadata header; CRI keeps
//!   its images in `k8s.io`.
//! - The connection is lazy: the daemon starts while containerd is down and reconnects by
//!   itself after a containerd restart; meanwhile calls fail fast with
//!   [`StoreError::Unavailable`].
//! - containerd keeps no media type for blobs: manifests and indexes are recognised from their
//!   bytes ([`media::detect`], cached per digest: content is immutable), and everything they
//!   reference gets the media type their descriptors declare ([`super::Declared`]).
//! - Image events (`/images/create|update|delete`) and content-create events are watched.
//!   containerd 1.6, 1.7 and 2.0 publish no `/content/create` (2.1 added it, fired when a blob
//!   is committed, before any image names it), and content removed by garbage collection never
//!   produces an event. Whoever consumes the events also reconciles.
//! - The content root need not be configured: [`ContainerdStore::introspect`] adopts the one
//!   containerd reports (`introspect.rs`) when it is visible here.
//! - `events.Subscribe` answers with no response headers until the first event, so it is run
//!   in a spawned task and never under a timeout.
//! - The content store is `<root>/io.containerd.content.v1.content/blobs/<alg>/<hex>` in 1.6,
//!   1.7 and 2.x; reading those files directly avoids copying every byte through gRPC.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use containerd_client::events::ContentCreate;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    GetImageRequest, ImageCreate, ImageDelete, ImageUpdate, InfoRequest, ListImagesRequest,
    ReadContentRequest, SubscribeRequest,
};
use containerd_client::types::Envelope;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::introspect::{self, NodeFacts};
use super::{
    ContentFile, ContentStream, Descriptor, Image, Store, StoreError, StoreEvent, exact_length,
};
use crate::oci::{ByteRange, Digest, media};

/// The gRPC metadata header containerd reads the namespace from (containerd
/// `pkg/namespaces/grpc.go`, the same name in 1.6, 1.7 and 2.x).
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// containerd answers unary calls on a local socket in milliseconds; a call that takes longer
/// than this means containerd is wedged, and the registry should 404 rather than hang a pull.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connecting to a unix socket either works at once or fails at once (missing socket, refused);
/// the bound only matters when containerd accepts but does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// containerd's own client raises the receive limit to 16 MiB (`defaults.DefaultMaxRecvMsgSize`)
/// because `images.List` on a busy node is larger than tonic's 4 MiB default.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Content up to this size is read whole to detect its type (one read: manifests, indexes and
/// configs are almost always smaller). Larger content, up to `MAX_MANIFEST_BYTES`, is first
/// sniffed: layers are gzip/zstd/tar and are told apart from JSON by their first bytes.
const READ_WHOLE_BYTES: u64 = 64 * 1024;
const SNIFF_BYTES: u64 = 64;

/// Detected media types remembered. A digest's type never changes, so the cache only has to
/// be bounded, not invalidated; 16 Ki entries is well over the manifests a node holds and
/// costs about 2 MiB.
const MEDIA_TYPE_CACHE_ENTRIES: usize = 16 * 1024;

/// Events buffered between the subscription task and the consumer.
const EVENT_BUFFER: usize = 256;

/// The `containerd:` section of the daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdConfig {
    /// `false` on nodes without containerd (CRI-O): the daemon then has an empty store, never
    /// dials the socket, and containerd holds no part of readiness.
    pub enabled: bool,
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The containerd namespace whose images are served; CRI (kubelet) uses `k8s.io`.
    pub namespace: String,
    /// The content store root (`<containerd root>/io.containerd.content.v1.content`). When
    /// set and readable, blobs are streamed from its files instead of through gRPC.
    pub content_dir: Option<PathBuf>,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            enabled: true,
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "k8s.io".to_owned(),
            content_dir: None,
        }
    }
}

impl ContainerdConfig {
    /// Every problem with this configuration, as human-readable sentences; empty when valid.
    /// Pure: nothing is checked on disk, because containerd may start after the daemon.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.socket.is_absolute() {
            problems.push(format!(
                "containerd.socket must be an absolute path, got {:?}",
                self.socket
            ));
        }
        // sockaddr_un.sun_path is 108 bytes including the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            problems.push(format!(
                "containerd.socket is longer than the 107 bytes a unix socket path may have: {:?}",
                self.socket
            ));
        }
        if !valid_namespace(&self.namespace) {
            problems.push(format!(
                "containerd.namespace {:?} is not a containerd namespace (letters, digits and \
                 single '.', '_' or '-' between them, at most 76 characters)",
                self.namespace
            ));
        }
        if let Some(dir) = &self.content_dir
            && !dir.is_absolute()
        {
            problems.push(format!(
                "containerd.content_dir must be an absolute path, got {dir:?}"
            ));
        }
        problems
    }
}

/// containerd's identifier rule for namespaces (`identifiers.Validate`): at most 76 characters,
/// alphanumeric components joined by single `.`, `_` or `-`.
fn valid_namespace(ns: &str) -> bool {
    if ns.is_empty() || ns.len() > 76 {
        return false;
    }
    ns.split(['.', '_', '-'])
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The store backed by containerd. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct ContainerdStore {
    channel: Channel,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    content_dir: Option<PathBuf>,
    /// The content root containerd reported, used when `content_dir` is not configured.
    discovered_content_dir: OnceLock<PathBuf>,
    // A std Mutex: it is never held across an `.await`.
    media_types: Mutex<MediaTypeCache>,
    /// Media types the manifests described so far declare for their children.
    declared: super::Declared,
}

impl std::fmt::Debug for ContainerdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdStore")
            .field("namespace", &self.namespace)
            .field("content_dir", &self.content_dir)
            .finish_non_exhaustive()
    }
}

impl ContainerdStore {
    /// Builds the store without connecting: the first call connects, and every call after a
    /// broken connection tries again. Must be called inside a tokio runtime (the channel's
    /// worker task is spawned on it). Fails only for an invalid configuration.
    pub fn new(config: ContainerdConfig) -> Result<ContainerdStore, StoreError> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(StoreError::unavailable(format!(
                "invalid containerd configuration: {}",
                problems.join("; ")
            )));
        }
        let namespace_header: AsciiMetadataValue = MetadataValue::try_from(&config.namespace)
            .map_err(|e| StoreError::Unavailable {
                message: "containerd namespace is not a valid header value".to_owned(),
                source: Some(Box::new(e)),
            })?;
        let socket = config.socket.clone();
        // The URI is a placeholder: tonic requires one, the connector ignores it and dials
        // the socket (the same trick as `containerd_client::connect`, but lazy).
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }));
        Ok(ContainerdStore {
            channel,
            namespace: config.namespace,
            namespace_header,
            content_dir: config.content_dir,
            discovered_content_dir: OnceLock::new(),
            media_types: Mutex::new(MediaTypeCache::default()),
            declared: super::Declared::default(),
        })
    }

    /// Asks containerd about its own configuration (see `introspect.rs`). When
    /// `containerd.content_dir` is not configured (it stays an override), adopts the content
    /// root containerd reports. Where that directory is not visible here, reads fall back to
    /// gRPC file by file, as for a configured one (and the caller reports it).
    pub async fn introspect(&self) -> Result<NodeFacts, StoreError> {
        let facts = introspect::inspect(&self.channel).await?;
        if self.content_dir.is_none()
            && let Some(root) = &facts.content_root
            && self.discovered_content_dir.set(root.clone()).is_ok()
        {
            tracing::info!(content_dir = %root.display(), "content root from containerd introspection");
        }
        Ok(facts)
    }

    /// The content store directory in use: the configured one, else the discovered one.
    pub fn content_dir(&self) -> Option<&Path> {
        self.content_dir
            .as_deref()
            .or_else(|| self.discovered_content_dir.get().map(PathBuf::as_path))
    }

    /// The containerd namespace this store reads.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A cheap health check for readiness: containerd answers `version.Version`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut client = VersionClient::new(self.channel.clone());
        bounded(client.version(()))
            .await
            .map_err(|s| unavailable("version", s))?;
        Ok(())
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        req
    }

    fn images_client(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn content_client(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The size of `digest` in this namespace, or `None` when containerd does not have it.
    ///
    /// Asked before every read, also on the file fast path: blob files are shared by all
    /// namespaces, and only the metadata says whether this namespace may see the content.
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let req = self.request(InfoRequest {
            digest: digest.to_string(),
        });
        let info = match bounded(self.content_client().info(req)).await {
            Ok(resp) => resp.into_inner().info,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(unavailable("content.Info", s)),
        };
        let Some(info) = info else {
            return Err(StoreError::unavailable(format!(
                "containerd content.Info for {digest} returned no info"
            )));
        };
        u64::try_from(info.size).map(Some).map_err(|_| {
            StoreError::unavailable(format!(
                "containerd reports a negative size {} for {digest}",
                info.size
            ))
        })
    }

    /// Streams `len` bytes of `digest` from `offset`, from the content file when possible.
    async fn stream(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<ContentStream, StoreError> {
        if len == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        if let Some(file) = self.content_file(digest, size, offset, len).await {
            return Ok(file.stream()?);
        }
        let req = self.request(ReadContentRequest {
            digest: digest.to_string(),
            offset: to_i64(offset)?,
            size: to_i64(len)?,
        });
        let mut client = self.content_client();
        let stream = match bounded(client.read(req)).await {
            Ok(resp) => resp.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(StoreError::NotFound(digest.clone()));
            }
            Err(s) => return Err(unavailable("content.Read", s)),
        };
        let stream = stream
            .map_ok(|chunk| Bytes::from(chunk.data))
            .map_err(|s| std::io::Error::other(format!("containerd content.Read: {s}")));
        Ok(exact_length(stream.boxed(), len))
    }

    /// The content file for `len` bytes of `digest` from `offset`, when `content_dir` is set
    /// and the file is there with the size containerd reported. `None` otherwise: absent or
    /// unreadable (another mount, GC in progress, permissions) costs only a failed open,
    /// because gRPC still works.
    async fn content_file(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Option<ContentFile> {
        let path = blob_path(self.content_dir()?, digest);
        let opened = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_checked(&path, size)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match opened {
            Ok(file) => Some(ContentFile { file, offset, len }),
            Err(e) => {
                tracing::debug!(digest = %digest, path = %path.display(), error = %e,
                    "content file not usable, reading through containerd");
                None
            }
        }
    }

    async fn read_all(&self, digest: &Digest, size: u64, len: u64) -> Result<Bytes, StoreError> {
        let chunks: Vec<Bytes> = self
            .stream(digest, size, 0, len)
            .await?
            .try_collect()
            .await?;
        Ok(chunks.concat().into())
    }

    /// The media type of small content, recovered from its bytes (see the module docs).
    async fn detect_media_type(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<&'static str, StoreError> {
        if size > media::MAX_MANIFEST_BYTES {
            return Ok(media::OCTET_STREAM);
        }
        if let Some(t) = self.cache().get(digest) {
            return Ok(t);
        }
        let whole = if size <= READ_WHOLE_BYTES {
            Some(self.read_all(digest, size, size).await?)
        } else {
            let prefix = self.read_all(digest, size, SNIFF_BYTES).await?;
            match prefix.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') | None => Some(self.read_all(digest, size, size).await?),
                Some(_) => None,
            }
        };
        let detected = whole.as_deref().map_or(media::OCTET_STREAM, media::detect);
        // A manifest or index names the media type of everything it references: remember
        // them, so its layers are described (and served) as what they are.
        if let Some(bytes) = &whole
            && media::is_manifest_type(detected)
        {
            self.declared.learn(bytes);
        }
        self.cache().insert(digest.clone(), detected);
        Ok(detected)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, MediaTypeCache> {
        // The cache is a pure memo: a panic mid-update leaves at worst a missing entry.
        self.media_types.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for ContainerdStore {
    async fn images(&self) -> Result<Vec<Image>, StoreError> {
        let req = self.request(ListImagesRequest { filters: vec![] });
        let resp = bounded(self.images_client().list(req))
            .await
            .map_err(|s| unavailable("images.List", s))?;
        Ok(resp
            .into_inner()
            .images
            .into_iter()
            .filter_map(|img| {
                let digest = target_digest(&img.name, img.target.as_ref())?;
                Image::from_name(&img.name, digest)
            })
            .collect())
    }

    async fn resolve(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<Digest>, StoreError> {
        let name = crate::oci::Reference::tag_key(registry, repository, tag);
        let req = self.request(GetImageRequest { name: name.clone() });
        match bounded(self.images_client().get(req)).await {
            Ok(resp) => {
                let image = resp.into_inner().image;
                Ok(image.and_then(|img| target_digest(&name, img.target.as_ref())))
            }
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(unavailable("images.Get", s)),
        }
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        let Some(size) = self.size(digest).await? else {
            return Ok(None);
        };
        let media_type = match self.detect_media_type(digest, size).await {
            Ok(t) => t,
            // Deleted between Info and Read (garbage collection): the node no longer has it.
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(Descriptor {
            digest: digest.clone(),
            size,
            media_type: super::classify(media_type, self.declared.get(digest)),
        }))
    }

    async fn open(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ContentStream, StoreError> {
        let Some(size) = self.size(digest).await? else {
            return Err(StoreError::NotFound(digest.clone()));
        };
        let (offset, len) = span(size, range);
        self.stream(digest, size, offset, len).await
    }

    async fn open_file(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ContentFile>, StoreError> {
        if self.content_dir().is_none() {
            return Ok(None);
        }
        // The namespace check comes first, as for `open`: the file alone says nothing about it.
        let Some(size) = self.size(digest).await? else {
            return Err(StoreError::NotFound(digest.clone()));
        };
        let (offset, len) = span(size, range);
        Ok(self.content_file(digest, size, offset, len).await)
    }

    async fn watch(&self) -> Result<BoxStream<'static, StoreEvent>, StoreError> {
        // Subscribing never fails by itself while containerd is down (the stream just ends),
        // so ask once to give the caller a clear Unavailable.
        self.ping().await?;
        let req = self.request(SubscribeRequest {
            filters: event_filters(&self.namespace),
        });
        let client = EventsClient::new(self.channel.clone());
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        // containerd's Subscribe sends response headers only with the first event, so the
        // call cannot be awaited here; a task owns it and ends when the consumer goes away.
        let sources = SourceReader {
            client: self.content_client(),
            header: self.namespace_header.clone(),
        };
        tokio::spawn(forward_events(
            client,
            req,
            self.namespace.clone(),
            sources,
            tx,
        ));
        Ok(ReceiverStream::new(rx).boxed())
    }
}

/// Receives image events and forwards them as [`StoreEvent`]s until the subscription breaks
/// or the receiver is dropped.
async fn forward_events(
    mut client: EventsClient<Channel>,
    req: tonic::Request<SubscribeRequest>,
    namespace: String,
    sources: SourceReader,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut stream = tokio::select! {
        _ = tx.closed() => return,
        r = client.subscribe(req) => match r {
            Ok(resp) => resp.into_inner(),
            Err(s) => {
                tracing::warn!(error = %s, "containerd events.Subscribe failed");
                return;
            }
        },
    };
    loop {
        let envelope = tokio::select! {
            _ = tx.closed() => return,
            m = stream.message() => match m {
                Ok(Some(envelope)) => envelope,
                Ok(None) => {
                    tracing::info!("containerd event subscription ended");
                    return;
                }
                Err(s) => {
                    tracing::info!(error = %s, "containerd event subscription broke");
                    return;
                }
            },
        };
        let event = match decode_event(&envelope, &namespace) {
            // The distribution-source label lands just after the commit event: wait for it
            // off this loop, so image events are not held up.
            Some(StoreEvent::ContentAdded { digest, .. }) => {
                let (sources, tx) = (sources.clone(), tx.clone());
                tokio::spawn(async move {
                    let found = sources.wait_for(&digest).await;
                    let _ = tx
                        .send(StoreEvent::ContentAdded {
                            digest,
                            sources: found,
                        })
                        .await;
                });
                continue;
            }
            Some(event) => event,
            None => continue,
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// How long a content-create event waits for its blob's distribution-source label.
/// containerd adds it right after the commit, in the same pull's handler chain (containerd
/// `core/remotes/docker/handler.go`), so this bound only matters for content that never gets
/// one (`ctr content ingest`, imports): those are left to the image-driven reconcile.
const SOURCE_LABEL_WAIT: Duration = Duration::from_secs(2);
const SOURCE_LABEL_POLL: Duration = Duration::from_millis(20);
/// `containerd.io/distribution.source.<registry host without port>=<repo>[,<repo>…]`.
const SOURCE_LABEL_PREFIX: &str = "containerd.io/distribution.source.";

/// Reads where a blob was pulled from (its distribution-source labels).
#[derive(Clone)]
struct SourceReader {
    client: ContentClient<Channel>,
    header: AsciiMetadataValue,
}

impl SourceReader {
    /// `(registry host, repository)` pairs of `digest`, polled until they appear or
    /// [`SOURCE_LABEL_WAIT`] passes (then empty).
    async fn wait_for(&self, digest: &Digest) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + SOURCE_LABEL_WAIT;
        loop {
            let mut req = tonic::Request::new(InfoRequest {
                digest: digest.to_string(),
            });
            req.metadata_mut()
                .insert(NAMESPACE_HEADER, self.header.clone());
            let mut client = self.client.clone();
            if let Ok(resp) = bounded(client.info(req)).await
                && let Some(info) = resp.into_inner().info
            {
                let found = distribution_sources(&info.labels);
                if !found.is_empty() {
                    return found;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Vec::new();
            }
            tokio::time::sleep(SOURCE_LABEL_POLL).await;
        }
    }
}

/// The `(registry host, repository)` pairs in a blob's labels.
fn distribution_sources(labels: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = labels
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(SOURCE_LABEL_PREFIX)?, v)))
        .flat_map(|(host, repos)| {
            repos
                .split(',')
                .filter(|r| !r.is_empty())
                .map(move |r| (host.to_owned(), r.to_owned()))
        })
        .collect();
    out.sort();
    out
}

/// The events-service filters for one namespace: image events, and content-create events
/// (2.1+; older versions have none, so asking costs nothing). containerd filter syntax: a
/// comma joins conditions that must all hold, several filters are alternatives, `~=` is a
/// regular expression match.
fn event_filters(namespace: &str) -> Vec<String> {
    // Namespaces are validated identifiers, so quoting needs no escaping.
    vec![
        format!(r#"namespace=="{namespace}",topic~="^/images/""#),
        format!(r#"namespace=="{namespace}",topic=="/content/create""#),
    ]
}

/// Turns an event envelope into a [`StoreEvent`]. The payload is decoded by its type URL,
/// which containerd sets to the protobuf full name (`containerd.services.images.v1.…`, with no
/// `type.googleapis.com/` prefix, so `Any::to_msg` would refuse it).
fn decode_event(envelope: &Envelope, namespace: &str) -> Option<StoreEvent> {
    if envelope.namespace != namespace {
        return None;
    }
    let any = envelope.event.as_ref()?;
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    let bytes = any.value.as_slice();
    let event = match type_name {
        "containerd.services.images.v1.ImageCreate" => StoreEvent::ImageChanged {
            name: ImageCreate::decode(bytes).ok()?.name,
        },
        "containerd.services.images.v1.ImageUpdate" => StoreEvent::ImageChanged {
            name: ImageUpdate::decode(bytes).ok()?.name,
        },
        "containerd.services.images.v1.ImageDelete" => StoreEvent::ImageDeleted {
            name: ImageDelete::decode(bytes).ok()?.name,
        },
        // The blob is committed; no image names it yet (its labels come later).
        "containerd.events.ContentCreate" => {
            let digest = ContentCreate::decode(bytes).ok()?.digest.parse().ok()?;
            return Some(StoreEvent::ContentAdded {
                digest,
                sources: Vec::new(),
            });
        }
        _ => return None,
    };
    match &event {
        StoreEvent::ImageChanged { name } | StoreEvent::ImageDeleted { name }
            if name.is_empty() =>
        {
            None
        }
        _ => Some(event),
    }
}

/// The digest an image record points at; `None` (logged) for records we cannot serve.
fn target_digest(
    name: &str,
    target: Option<&containerd_client::types::Descriptor>,
) -> Option<Digest> {
    let target = target?;
    match target.digest.parse() {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::debug!(reference = name, error = %e, "image target digest not supported");
            None
        }
    }
}

/// Offset and length to read for `range` of content of `size` bytes. A range starting at or
/// past the end reads nothing; an end past the end is clamped (as `MemoryStore` does).
fn span(size: u64, range: Option<ByteRange>) -> (u64, u64) {
    match range {
        None => (0, size),
        Some(r) if r.start >= size => (size, 0),
        Some(r) => (r.start, r.end.min(size - 1) - r.start + 1),
    }
}

/// `<content_dir>/blobs/<algorithm>/<hex>`: the layout of containerd's local content store.
fn blob_path(content_dir: &Path, digest: &Digest) -> PathBuf {
    content_dir
        .join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

/// Opens a content file, refusing one whose length is not the size containerd reported (a
/// half-written or foreign file must not be served). Blocking: run it off the runtime.
fn open_checked(path: &Path, size: u64) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len != size {
        return Err(std::io::Error::other(format!(
            "file is {len} bytes, containerd says {size}"
        )));
    }
    Ok(file)
}

/// Runs a containerd call with [`CALL_TIMEOUT`]. Only for calls whose response headers come
/// at once: containerd's events `Subscribe` sends none until the first event.
pub(super) async fn bounded<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer from containerd within {CALL_TIMEOUT:?}"
        ))),
    }
}

pub(super) fn unavailable(op: &str, status: tonic::Status) -> StoreError {
    StoreError::Unavailable {
        message: format!(
            "containerd {op} failed: {:?}: {}",
            status.code(),
            status.message()
        ),
        source: Some(Box::new(status)),
    }
}

fn to_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::unavailable(format!("offset {n} out of range")))
}

/// A bounded memo of detected media types, evicting the oldest entry when full.
#[derive(Default)]
struct MediaTypeCache {
    types: HashMap<Digest, &'static str>,
    order: VecDeque<Digest>,
}

impl MediaTypeCache {
    fn get(&self, digest: &Digest) -> Option<&'static str> {
        self.types.get(digest).copied()
    }

    fn insert(&mut self, digest: Digest, media_type: &'static str) {
        if self.types.insert(digest.clone(), media_type).is_some() {
            return;
        }
        self.order.push_back(digest);
        while self.order.len() > MEDIA_TYPE_CACHE_ENTRIES {
            if let Some(old) = self.order.pop_front() {
                self.types.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validate_table() {
        let ok = ContainerdConfig::default();
        let cases: Vec<(&str, ContainerdConfig, usize)> = vec![
            ("default", ok.clone(), 0),
            (
                "relative socket",
                ContainerdConfig {
                    socket: "run/containerd.sock".into(),
                    ..ok.clone()
                },
                1,
            ),
            (
                "socket too long",
                ContainerdConfig {
                    socket: format!("/{}", "s".repeat(120)).into(),
                    ..ok.clone()
                },
                1,
            ),
            (
                "empty namespace",
                ContainerdConfig {
                    namespace: String::new(),
                    ..ok.clone()
                },
                1,
            ),
            (
                "namespace with slash",
                ContainerdConfig {
                    namespace: "k8s/io".into(),
                    ..ok.clone()
                },
                1,
            ),
            (
                "namespace double dot",
                ContainerdConfig {
                    namespace: "k8s..io".into(),
                    ..ok.clone()
                },
                1,
            ),
            (
                "relative content dir",
                ContainerdConfig {
                    content_dir: Some("content".into()),
                    ..ok.clone()
                },
                1,
            ),
            (
                "everything wrong",
                ContainerdConfig {
                    enabled: true,
                    socket: "x".into(),
                    namespace: "-".into(),
                    content_dir: Some("c".into()),
                },
                3,
            ),
        ];
        for (name, config, want) in cases {
            assert_eq!(
                config.validate().len(),
                want,
                "{name}: {:?}",
                config.validate()
            );
        }
    }

    #[test]
    fn config_deserialises_with_defaults_and_refuses_unknown_keys() {
        let c: ContainerdConfig =
            serde_json::from_str(r#"{"namespace":"default"}"#).expect("valid config");
        assert_eq!(c.namespace, "default");
        assert_eq!(c.socket, ContainerdConfig::default().socket);
        assert!(serde_json::from_str::<ContainerdConfig>(r#"{"sockit":"/x"}"#).is_err());
    }

    #[test]
    fn span_table() {
        let r = |start, end| Some(ByteRange { start, end });
        let cases = [
            ("whole", 10, None, (0, 10)),
            ("empty whole", 0, None, (0, 0)),
            ("first byte", 10, r(0, 0), (0, 1)),
            ("middle", 10, r(2, 4), (2, 3)),
            ("end clamped", 10, r(8, 100), (8, 2)),
            ("start at end", 10, r(10, 12), (10, 0)),
            ("start past end", 10, r(50, 60), (10, 0)),
        ];
        for (name, size, range, want) in cases {
            assert_eq!(span(size, range), want, "{name}");
        }
    }

    fn envelope(ns: &str, type_url: &str, value: Vec<u8>) -> Envelope {
        // The payload type is prost_types::Any, reached through Default so that the test
        // needs no direct prost-types dependency.
        let mut env = Envelope {
            namespace: ns.to_owned(),
            topic: "/images/create".to_owned(),
            event: Some(Default::default()),
            ..Default::default()
        };
        if let Some(any) = env.event.as_mut() {
            any.type_url = type_url.to_owned();
            any.value = value;
        }
        env
    }

    #[test]
    fn decode_event_table() {
        let create = ImageCreate {
            name: "r.io/a:1".into(),
            labels: Default::default(),
        }
        .encode_to_vec();
        let update = ImageUpdate {
            name: "r.io/a:2".into(),
            labels: Default::default(),
        }
        .encode_to_vec();
        let delete = ImageDelete {
            name: "r.io/a:3".into(),
        }
        .encode_to_vec();
        let changed = |n: &str| Some(StoreEvent::ImageChanged { name: n.to_owned() });
        let cases = vec![
            (
                "create, 1.6 type url",
                envelope(
                    "k8s.io",
                    "containerd.services.images.v1.ImageCreate",
                    create.clone(),
                ),
                changed("r.io/a:1"),
            ),
            (
                "create, prefixed type url",
                envelope(
                    "k8s.io",
                    "type.googleapis.com/containerd.services.images.v1.ImageCreate",
                    create.clone(),
                ),
                changed("r.io/a:1"),
            ),
            (
                "update",
                envelope(
                    "k8s.io",
                    "containerd.services.images.v1.ImageUpdate",
                    update,
                ),
                changed("r.io/a:2"),
            ),
            (
                "delete",
                envelope(
                    "k8s.io",
                    "containerd.services.images.v1.ImageDelete",
                    delete,
                ),
                Some(StoreEvent::ImageDeleted {
                    name: "r.io/a:3".into(),
                }),
            ),
            (
                "other namespace",
                envelope(
                    "default",
                    "containerd.services.images.v1.ImageCreate",
                    create,
                ),
                None,
            ),
            (
                "content delete event",
                envelope("k8s.io", "containerd.events.ContentDelete", vec![]),
                None,
            ),
            (
                "content create event (2.1+)",
                envelope(
                    "k8s.io",
                    "containerd.events.ContentCreate",
                    ContentCreate {
                        digest: Digest::sha256_of(b"layer").to_string(),
                        size: 5,
                    }
                    .encode_to_vec(),
                ),
                Some(StoreEvent::ContentAdded {
                    digest: Digest::sha256_of(b"layer"),
                    sources: Vec::new(),
                }),
            ),
            (
                "content create event with a bad digest",
                envelope(
                    "k8s.io",
                    "containerd.events.ContentCreate",
                    ContentCreate {
                        digest: "nope".into(),
                        size: 5,
                    }
                    .encode_to_vec(),
                ),
                None,
            ),
            (
                "garbage payload",
                envelope(
                    "k8s.io",
                    "containerd.services.images.v1.ImageCreate",
                    vec![0xff, 0xff, 0xff],
                ),
                None,
            ),
            (
                "empty name",
                envelope(
                    "k8s.io",
                    "containerd.services.images.v1.ImageDelete",
                    vec![],
                ),
                None,
            ),
        ];
        for (name, env, want) in cases {
            assert_eq!(decode_event(&env, "k8s.io"), want, "{name}");
        }
    }

    #[test]
    fn distribution_sources_are_split_per_repository() {
        let labels: HashMap<String, String> = [
            ("containerd.io/distribution.source.10.0.0.2", "a/b,c"),
            (
                "containerd.io/distribution.source.docker.io",
                "library/redis",
            ),
            ("containerd.io/gc.ref.content.l.0", "sha256:x"),
            ("containerd.io/distribution.source.empty", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect()
        };
        assert_eq!(
            distribution_sources(&labels),
            pairs(&[
                ("10.0.0.2", "a/b"),
                ("10.0.0.2", "c"),
                ("docker.io", "library/redis")
            ])
        );
    }

    #[test]
    fn media_type_cache_is_bounded() {
        let mut cache = MediaTypeCache::default();
        let digests: Vec<Digest> = (0..MEDIA_TYPE_CACHE_ENTRIES + 10)
            .map(|i| Digest::sha256_of(&i.to_le_bytes()))
            .collect();
        for d in &digests {
            cache.insert(d.clone(), media::OCI_MANIFEST);
        }
        assert_eq!(cache.types.len(), MEDIA_TYPE_CACHE_ENTRIES);
        assert_eq!(cache.get(&digests[0]), None, "oldest evicted");
        assert_eq!(
            cache.get(&digests[digests.len() - 1]),
            Some(media::OCI_MANIFEST)
        );
    }

    #[tokio::test]
    async fn exact_length_cuts_and_reports_short_streams() {
        let chunks = |parts: &[&'static [u8]]| -> ContentStream {
            futures::stream::iter(
                parts
                    .iter()
                    .map(|p| Ok(Bytes::from_static(p)))
                    .collect::<Vec<_>>(),
            )
            .boxed()
        };
        let got: Vec<Bytes> = exact_length(chunks(&[b"abc", b"def"]), 4)
            .try_collect()
            .await
            .expect("long enough");
        assert_eq!(got.concat(), b"abcd");
        let short: Result<Vec<Bytes>, _> = exact_length(chunks(&[b"ab"]), 4).try_collect().await;
        let err = short.expect_err("short stream must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn unreachable_socket_is_unavailable_quickly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ContainerdStore::new(ContainerdConfig {
            socket: dir.path().join("absent.sock"),
            ..ContainerdConfig::default()
        })
        .expect("valid config");
        let started = std::time::Instant::now();
        let digest = Digest::sha256_of(b"x");
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(matches!(
            store.descriptor(&digest).await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(matches!(
            store.open(&digest, None).await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(matches!(
            store.watch().await,
            Err(StoreError::Unavailable { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
