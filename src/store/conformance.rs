//! The one conformance suite every [`Store`] implementation must pass, and the fixture it
//! runs on.
//!
//! [`run`] seeds a deterministic image set ([`Fixture`]) through a [`Seeder`] (the part that
//! knows how to put content into the backing store: `MemoryStore` methods, or `ctr images
//! import` for containerd), then checks what the seam promises: image listing, tag
//! resolution, sizes and detected media types, whole and ranged reads (and, where a store
//! hands out content files, the same bytes from those files), absent content,
//! [`closure`], and image events. Every failed check is reported by name, all at once.
//!
//! The fixture:
//! - `<registry>/conformance/oci:v1` → OCI index → OCI manifest → OCI config + two layers
//!   (an uncompressed tar, and a gzip tar of about 1.5 MiB so reads span many chunks);
//! - `<registry>/conformance/docker:v1` → docker v2 schema 2 manifest → config + gzip layer;
//! - `<registry>/conformance/oci@<manifest digest>`: a digest-only record (no tag);
//! - `sha256:<oci config digest>` → OCI manifest: a name that is not a reference, as CRI
//!   creates, which `images()` must skip;
//! - `<registry>/conformance/layers:v1` → OCI manifest → config + a zstd layer (past the 64 KiB
//!   sniffing threshold), a zstd:chunked one (annotations, a skippable frame), and
//!   non-distributable gzip and zstd layers; `<registry>/conformance/docker-layers:v1` →
//!   docker manifest → config + an uncompressed docker layer and a foreign (non-distributable)
//!   one. A store must describe every one of them with the media type its manifest declares
//!   (checked after the manifest was described, as a pull and `closure` do).
//!
//! Layers are real tar archives (gzip with stored deflate blocks), so containerd can unpack
//! the fixture if a test pulls it. [`Fixture::layout_tar`] packs everything as an OCI image
//! layout tar for `ctr images import` or for pushing to a registry.

use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::memory::MemoryStore;
use super::{Store, StoreError, StoreEvent, closure};
use crate::oci::{ByteRange, Digest, media};

/// Any error a seeder reports; the suite only prints it.
pub type SeedError = Box<dyn std::error::Error + Send + Sync>;

/// Puts fixture content and image records into the store under test.
#[async_trait]
pub trait Seeder: Send + Sync {
    /// Stores every blob of `fixture` and creates every record of `fixture.images`.
    async fn seed(&self, fixture: &Fixture) -> Result<(), SeedError>;

    /// Creates image record `name` (or moves it) to point at `target`, already seeded.
    async fn set_image(&self, name: &str, target: &Blob) -> Result<(), SeedError>;

    /// Deletes image record `name`.
    async fn delete_image(&self, name: &str) -> Result<(), SeedError>;
}

/// The suite found problems; each line names the failed check.
#[derive(Debug, thiserror::Error)]
#[error("store conformance failed:\n  {}", failures.join("\n  "))]
pub struct ConformanceError {
    pub failures: Vec<String>,
}

/// OCI layer media types (image-spec "Image Layer Filesystem Changeset").
pub(crate) const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub(crate) const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The docker v2 schema 2 layer media type (always gzip).
pub(crate) const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub(crate) const OCI_LAYER_ND_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub(crate) const OCI_LAYER_ND_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
pub(crate) const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub(crate) const DOCKER_LAYER_FOREIGN_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
/// The annotation containers/storage puts on zstd:chunked layers (same media type as zstd).
const ZSTD_CHUNKED_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";

/// The containerd annotation `ctr images import` takes an image's full name from.
const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// How long any one store call (including reading a whole stream) may take in the suite.
const CALL_BOUND: Duration = Duration::from_secs(30);
/// Image events: how many probe images to create before giving up on seeing one, and how
/// long to wait after each. Subscriptions may register asynchronously (containerd's do), so
/// the suite re-creates probes rather than trusting the first event to be caught.
const WATCH_ATTEMPTS: usize = 20;
const WATCH_WAIT: Duration = Duration::from_millis(500);
/// Once events are known to flow, how long a delete event may take to arrive.
const WATCH_DELETE_WAIT: Duration = Duration::from_secs(10);

/// One piece of fixture content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// A short label for failure messages, like `oci manifest`.
    pub label: &'static str,
    pub digest: Digest,
    pub bytes: Bytes,
    /// The media type its parent's descriptor (or an image record) gives it.
    pub media_type: &'static str,
    /// What [`media::detect`] finds in the bytes (`application/octet-stream` for layers).
    /// `Store::descriptor` reports this for manifests and indexes, and `media_type` for
    /// everything else ([`super::classify`]).
    pub detected: &'static str,
    /// Descriptor annotations (zstd:chunked layers carry some).
    pub annotations: Option<serde_json::Value>,
}

impl Blob {
    fn new(
        label: &'static str,
        bytes: Vec<u8>,
        media_type: &'static str,
        detected: &'static str,
    ) -> Blob {
        Blob {
            label,
            digest: Digest::sha256_of(&bytes),
            bytes: bytes.into(),
            media_type,
            detected,
            annotations: None,
        }
    }

    /// The media type `Store::descriptor` must report.
    pub fn reported(&self) -> String {
        super::classify(self.detected, Some(self.media_type.to_owned()))
    }

    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// This blob as an OCI descriptor.
    pub fn descriptor(&self) -> serde_json::Value {
        let mut d = json!({
            "mediaType": self.media_type,
            "digest": self.digest.to_string(),
            "size": self.size(),
        });
        if let Some(a) = &self.annotations {
            d["annotations"] = a.clone();
        }
        d
    }
}

/// An image record of the fixture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub target: Blob,
}

/// The deterministic image set the suite runs on (see the module docs).
#[derive(Debug, Clone)]
pub struct Fixture {
    pub registry: String,
    pub oci_index: Blob,
    pub oci_manifest: Blob,
    pub oci_config: Blob,
    pub oci_layers: [Blob; 2],
    pub docker_manifest: Blob,
    pub docker_config: Blob,
    pub docker_layer: Blob,
    /// Every other layer media type, in an OCI and a docker image.
    pub kinds: LayerKinds,
    pub images: Vec<ImageRecord>,
}

/// The `conformance/layers` (OCI) and `conformance/docker-layers` images.
#[derive(Debug, Clone)]
pub struct LayerKinds {
    pub oci_manifest: Blob,
    pub oci_config: Blob,
    pub oci_layers: Vec<Blob>,
    pub docker_manifest: Blob,
    pub docker_config: Blob,
    pub docker_layers: Vec<Blob>,
}

impl LayerKinds {
    fn new(arch: &str) -> LayerKinds {
        let file = |name: &str, seed: u64, len: usize| tar(&[(name, pseudo_random(seed, len))]);
        let zstd_tar = file("kinds/zstd.bin", 0x25d, 96 * 1024);
        let chunked_tar = file("kinds/chunked.bin", 0xc4c, 8 * 1024);
        let nd_gzip_tar = file("kinds/nd-gzip.bin", 0x9d1, 4 * 1024);
        let nd_zstd_tar = file("kinds/nd-zstd.bin", 0x9d2, 4 * 1024);
        let mut chunked_bytes = zstd_raw(&chunked_tar);
        // zstd:chunked keeps its table of contents in a skippable frame at the end.
        chunked_bytes.extend(zstd_skippable(br#"{"version":1,"entries":[]}"#));
        let mut chunked = Blob::new(
            "oci layer zstd:chunked",
            chunked_bytes,
            OCI_LAYER_ZSTD,
            media::OCTET_STREAM,
        );
        chunked.annotations = Some(json!({
            ZSTD_CHUNKED_CHECKSUM: Digest::sha256_of(b"toc").to_string(),
        }));
        let oci_layers = vec![
            Blob::new(
                "oci layer zstd",
                zstd_raw(&zstd_tar),
                OCI_LAYER_ZSTD,
                media::OCTET_STREAM,
            ),
            chunked,
            Blob::new(
                "oci layer non-distributable gzip",
                gzip_stored(&nd_gzip_tar),
                OCI_LAYER_ND_GZIP,
                media::OCTET_STREAM,
            ),
            Blob::new(
                "oci layer non-distributable zstd",
                zstd_raw(&nd_zstd_tar),
                OCI_LAYER_ND_ZSTD,
                media::OCTET_STREAM,
            ),
        ];
        let diff_ids = [&zstd_tar, &chunked_tar, &nd_gzip_tar, &nd_zstd_tar]
            .map(|t| Digest::sha256_of(t).to_string());
        let oci_config = Blob::new(
            "kinds oci config",
            json_bytes(&json!({
                "architecture": arch,
                "os": "linux",
                "config": { "Cmd": ["/kinds/zstd.bin"] },
                "rootfs": { "type": "layers", "diff_ids": diff_ids },
            })),
            media::OCI_CONFIG,
            media::OCI_CONFIG,
        );
        let oci_manifest = Blob::new(
            "kinds oci manifest",
            json_bytes(&json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_MANIFEST,
                "config": oci_config.descriptor(),
                "layers": oci_layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
            })),
            media::OCI_MANIFEST,
            media::OCI_MANIFEST,
        );

        let plain_tar = file("kinds/docker-plain.bin", 0xd71, 4 * 1024);
        let foreign_tar = file("kinds/docker-foreign.bin", 0xf07, 4 * 1024);
        let docker_layers = vec![
            Blob::new(
                "docker layer tar",
                plain_tar.clone(),
                DOCKER_LAYER_TAR,
                media::OCTET_STREAM,
            ),
            Blob::new(
                "docker foreign layer",
                gzip_stored(&foreign_tar),
                DOCKER_LAYER_FOREIGN_GZIP,
                media::OCTET_STREAM,
            ),
        ];
        let docker_config = Blob::new(
            "kinds docker config",
            json_bytes(&json!({
                "architecture": arch,
                "os": "linux",
                "config": { "Cmd": ["/kinds/docker-plain.bin"] },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [
                        Digest::sha256_of(&plain_tar).to_string(),
                        Digest::sha256_of(&foreign_tar).to_string(),
                    ],
                },
            })),
            media::DOCKER_CONFIG,
            media::OCI_CONFIG,
        );
        let docker_manifest = Blob::new(
            "kinds docker manifest",
            json_bytes(&json!({
                "schemaVersion": 2,
                "mediaType": media::DOCKER_MANIFEST,
                "config": docker_config.descriptor(),
                "layers": docker_layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
            })),
            media::DOCKER_MANIFEST,
            media::DOCKER_MANIFEST,
        );
        LayerKinds {
            oci_manifest,
            oci_config,
            oci_layers,
            docker_manifest,
            docker_config,
            docker_layers,
        }
    }

    /// Parents first, as a pull (and [`closure`]) reaches them.
    fn blobs(&self) -> Vec<&Blob> {
        let mut out = vec![&self.oci_manifest, &self.oci_config];
        out.extend(&self.oci_layers);
        out.extend([&self.docker_manifest, &self.docker_config]);
        out.extend(&self.docker_layers);
        out
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new("127.0.0.1:5000")
    }
}

impl Fixture {
    /// The fixture with image names under `registry` (a host, or host:port). Content does not
    /// depend on the registry; configs and the index name this machine's architecture, so a
    /// test may unpack them.
    pub fn new(registry: &str) -> Fixture {
        let arch = go_arch();

        let layer_tar = tar(&[("conformance/hello.txt", b"hello from speculum\n".to_vec())]);
        let big = tar(&[("conformance/big.bin", pseudo_random(0x5eed, 1536 * 1024))]);
        let oci_layers = [
            Blob::new(
                "oci layer tar",
                layer_tar.clone(),
                OCI_LAYER_TAR,
                media::OCTET_STREAM,
            ),
            Blob::new(
                "oci layer gzip",
                gzip_stored(&big),
                OCI_LAYER_GZIP,
                media::OCTET_STREAM,
            ),
        ];
        let oci_config = Blob::new(
            "oci config",
            json_bytes(&json!({
                "architecture": arch,
                "os": "linux",
                "config": { "Cmd": ["/conformance/hello.txt"] },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [
                        Digest::sha256_of(&layer_tar).to_string(),
                        Digest::sha256_of(&big).to_string(),
                    ],
                },
            })),
            media::OCI_CONFIG,
            media::OCI_CONFIG,
        );
        let oci_manifest = Blob::new(
            "oci manifest",
            json_bytes(&json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_MANIFEST,
                "config": oci_config.descriptor(),
                "layers": [oci_layers[0].descriptor(), oci_layers[1].descriptor()],
            })),
            media::OCI_MANIFEST,
            media::OCI_MANIFEST,
        );
        let mut platform_manifest = oci_manifest.descriptor();
        platform_manifest["platform"] = json!({ "architecture": arch, "os": "linux" });
        let oci_index = Blob::new(
            "oci index",
            json_bytes(&json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_INDEX,
                "manifests": [platform_manifest],
            })),
            media::OCI_INDEX,
            media::OCI_INDEX,
        );

        let docker_tar = tar(&[("conformance/docker.txt", pseudo_random(0xd0c, 96 * 1024))]);
        let docker_layer = Blob::new(
            "docker layer",
            gzip_stored(&docker_tar),
            DOCKER_LAYER_GZIP,
            media::OCTET_STREAM,
        );
        let docker_config = Blob::new(
            "docker config",
            json_bytes(&json!({
                "architecture": arch,
                "os": "linux",
                "config": { "Cmd": ["/conformance/docker.txt"] },
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [Digest::sha256_of(&docker_tar).to_string()],
                },
            })),
            media::DOCKER_CONFIG,
            // Detection cannot tell a docker config from an OCI one (same shape); both are
            // served from /blobs/, where the media type does not matter.
            media::OCI_CONFIG,
        );
        let docker_manifest = Blob::new(
            "docker manifest",
            json_bytes(&json!({
                "schemaVersion": 2,
                "mediaType": media::DOCKER_MANIFEST,
                "config": docker_config.descriptor(),
                "layers": [docker_layer.descriptor()],
            })),
            media::DOCKER_MANIFEST,
            media::DOCKER_MANIFEST,
        );

        let images = vec![
            ImageRecord {
                name: format!("{registry}/conformance/oci:v1"),
                target: oci_index.clone(),
            },
            ImageRecord {
                name: format!("{registry}/conformance/docker:v1"),
                target: docker_manifest.clone(),
            },
            ImageRecord {
                name: format!("{registry}/conformance/oci@{}", oci_manifest.digest),
                target: oci_manifest.clone(),
            },
            ImageRecord {
                name: oci_config.digest.to_string(),
                target: oci_manifest.clone(),
            },
        ];
        let kinds = LayerKinds::new(arch);
        let mut images = images;
        images.push(ImageRecord {
            name: format!("{registry}/conformance/layers:v1"),
            target: kinds.oci_manifest.clone(),
        });
        images.push(ImageRecord {
            name: format!("{registry}/conformance/docker-layers:v1"),
            target: kinds.docker_manifest.clone(),
        });
        Fixture {
            registry: registry.to_owned(),
            oci_index,
            oci_manifest,
            oci_config,
            oci_layers,
            docker_manifest,
            docker_config,
            docker_layer,
            kinds,
            images,
        }
    }

    /// Every blob, each once.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut out = vec![
            &self.oci_index,
            &self.oci_manifest,
            &self.oci_config,
            &self.oci_layers[0],
            &self.oci_layers[1],
            &self.docker_manifest,
            &self.docker_config,
            &self.docker_layer,
        ];
        out.extend(self.kinds.blobs());
        out
    }

    /// An OCI image layout (image-spec "Image Layout") as a tar: `oci-layout`, `index.json`
    /// naming every image record through the `io.containerd.image.name` annotation, and
    /// `blobs/sha256/…`. `ctr images import --all-platforms --no-unpack` takes it as is.
    pub fn layout_tar(&self) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = self
            .images
            .iter()
            .map(|img| {
                let mut d = img.target.descriptor();
                d["annotations"] = json!({ CONTAINERD_IMAGE_NAME: img.name });
                d
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "manifests": manifests });
        let mut entries = vec![
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_owned(), json_bytes(&index)),
        ];
        for b in self.blobs() {
            entries.push((
                format!("blobs/{}/{}", b.digest.algorithm().as_str(), b.digest.hex()),
                b.bytes.to_vec(),
            ));
        }
        tar(&entries)
    }

    fn name(&self, repo: &str, tag: &str) -> String {
        format!("{}/conformance/{repo}:{tag}", self.registry)
    }
}

/// Runs the suite against `store`, seeding it through `seeder`. The store must not hold
/// other images under `<registry>/conformance/`.
pub async fn run<S: Store>(store: &S, seeder: &dyn Seeder) -> Result<(), ConformanceError> {
    run_with(store, seeder, &Fixture::default()).await
}

/// [`run`] with a chosen fixture (for instance one named after a running registry).
pub(crate) async fn run_with<S: Store>(
    store: &S,
    seeder: &dyn Seeder,
    fixture: &Fixture,
) -> Result<(), ConformanceError> {
    let mut c = Checks::default();
    if let Err(e) = seeder.seed(fixture).await {
        c.fail("seed", format!("seeding the fixture failed: {e}"));
        return c.finish();
    }
    check_images(store, fixture, &mut c).await;
    check_resolve(store, fixture, &mut c).await;
    check_descriptors(store, fixture, &mut c).await;
    check_reads(store, fixture, &mut c).await;
    check_absent(store, &mut c).await;
    check_closure(store, fixture, &mut c).await;
    check_watch(store, seeder, fixture, &mut c).await;
    c.finish()
}

async fn check_images<S: Store>(store: &S, f: &Fixture, c: &mut Checks) {
    let Some(images) = c.call("images()", store.images()).await else {
        return;
    };
    // The CRI-style `sha256:<config>` record points at the OCI manifest too; only the
    // digest-only reference may show up for it.
    let for_manifest = images
        .iter()
        .filter(|i| i.digest == f.oci_manifest.digest)
        .count();
    c.eq(
        "images() skips names that are not references",
        for_manifest,
        1,
    );
    let ours: HashSet<(String, String, Option<String>, Digest)> = images
        .into_iter()
        .filter(|i| i.registry == f.registry && i.repository.starts_with("conformance/"))
        .map(|i| (i.registry, i.repository, i.tag, i.digest))
        .collect();
    let t = |repo: &str, tag: Option<&str>, d: &Digest| {
        (
            f.registry.clone(),
            format!("conformance/{repo}"),
            tag.map(str::to_owned),
            d.clone(),
        )
    };
    let want: HashSet<_> = [
        t("oci", Some("v1"), &f.oci_index.digest),
        t("docker", Some("v1"), &f.docker_manifest.digest),
        t("oci", None, &f.oci_manifest.digest),
        t("layers", Some("v1"), &f.kinds.oci_manifest.digest),
        t("docker-layers", Some("v1"), &f.kinds.docker_manifest.digest),
    ]
    .into_iter()
    .collect();
    c.eq(
        "images() lists the tagged and digest-only records",
        ours,
        want,
    );
}

async fn check_resolve<S: Store>(store: &S, f: &Fixture, c: &mut Checks) {
    let reg = f.registry.as_str();
    let cases: Vec<(&str, &str, &str, &str, Option<Digest>)> = vec![
        (
            "oci tag",
            reg,
            "conformance/oci",
            "v1",
            Some(f.oci_index.digest.clone()),
        ),
        (
            "docker tag",
            reg,
            "conformance/docker",
            "v1",
            Some(f.docker_manifest.digest.clone()),
        ),
        ("unknown tag", reg, "conformance/oci", "v2", None),
        ("unknown repository", reg, "conformance/nope", "v1", None),
        (
            "other registry",
            "other.test:5000",
            "conformance/oci",
            "v1",
            None,
        ),
    ];
    for (name, registry, repo, tag, want) in cases {
        if let Some(got) = c
            .call(
                &format!("resolve: {name}"),
                store.resolve(registry, repo, tag),
            )
            .await
        {
            c.eq(&format!("resolve: {name}"), got, want);
        }
    }
}

async fn check_descriptors<S: Store>(store: &S, f: &Fixture, c: &mut Checks) {
    for b in f.blobs() {
        let name = format!("descriptor: {}", b.label);
        let Some(got) = c.call(&name, store.descriptor(&b.digest)).await else {
            continue;
        };
        let Some(got) = got else {
            c.fail(&name, "content is missing".to_owned());
            continue;
        };
        c.eq(&format!("{name}: digest"), &got.digest, &b.digest);
        c.eq(&format!("{name}: size"), got.size, b.size());
        c.eq(&format!("{name}: media type"), got.media_type, b.reported());
    }
}

async fn check_reads<S: Store>(store: &S, f: &Fixture, c: &mut Checks) {
    for b in f.blobs() {
        let name = format!("open whole: {}", b.label);
        if let Some(got) = c.call(&name, read(store, &b.digest, None)).await {
            c.check(&name, got == b.bytes, || {
                format!(
                    "got {} bytes, want {} (or different bytes)",
                    got.len(),
                    b.size()
                )
            });
        }
        let name = format!("open_file whole: {}", b.label);
        if let Some(Some(got)) = c.call(&name, read_file(store, &b.digest, None)).await {
            c.check(&name, got == b.bytes, || {
                format!("file region of {} bytes, want {}", got.len(), b.size())
            });
        }
    }
    let big = &f.oci_layers[1];
    let size = big.size();
    let r = |start: u64, end: u64| ByteRange { start, end };
    // Boundaries of the 64 KiB, 256 KiB and 1 MiB chunks that stores and gRPC use.
    let cases = [
        ("first byte", r(0, 0)),
        ("first 10 bytes", r(0, 9)),
        ("across 64 KiB", r(65_530, 65_545)),
        ("across 256 KiB", r(262_000, 262_300)),
        ("across 1 MiB", r(1_048_000, 1_049_000)),
        ("from 1000 to the end", r(1000, size - 1)),
        ("last byte", r(size - 1, size - 1)),
        ("end past the size is clamped", r(size - 5, size + 100)),
    ];
    for (label, range) in cases {
        let name = format!("open range: {label}");
        let end = range.end.min(size - 1);
        let want = big.bytes.slice(range.start as usize..=end as usize);
        if let Some(got) = c.call(&name, read(store, &big.digest, Some(range))).await {
            c.check(&name, got == want, || {
                format!(
                    "range {}-{}: got {} bytes, want {} (or different bytes)",
                    range.start,
                    range.end,
                    got.len(),
                    want.len()
                )
            });
        }
        let name = format!("open_file range: {label}");
        if let Some(Some(got)) = c
            .call(&name, read_file(store, &big.digest, Some(range)))
            .await
        {
            c.check(&name, got == want, || {
                format!("file region of {} bytes, want {}", got.len(), want.len())
            });
        }
    }
    let small = &f.oci_manifest;
    let name = "open range: small json";
    if let Some(got) = c
        .call(name, read(store, &small.digest, Some(r(1, 5))))
        .await
    {
        c.eq(name, got, small.bytes.slice(1..=5));
    }
    let name = "read_small: manifest";
    if let Some(got) = c
        .call(
            name,
            store.read_small(&small.digest, media::MAX_MANIFEST_BYTES),
        )
        .await
    {
        c.eq(name, got, small.bytes.clone());
    }
    let name = "read_small: over the limit is refused";
    match bounded(store.read_small(&big.digest, 1024)).await {
        Ok(Ok(_)) => c.fail(name, "read succeeded".to_owned()),
        Ok(Err(StoreError::NotFound(_))) => c.fail(name, "NotFound for present content".to_owned()),
        Ok(Err(_)) => {}
        Err(e) => c.fail(name, e),
    }
}

async fn check_absent<S: Store>(store: &S, c: &mut Checks) {
    let missing = Digest::sha256_of(b"speculum conformance: content nobody has");
    if let Some(got) = c
        .call("descriptor: missing", store.descriptor(&missing))
        .await
    {
        c.eq("descriptor: missing", got, None);
    }
    let name = "open: missing is NotFound";
    match bounded(store.open(&missing, None)).await {
        Ok(Err(StoreError::NotFound(d))) => c.eq(name, d, missing.clone()),
        Ok(Err(e)) => c.fail(name, format!("wrong error: {e}")),
        Ok(Ok(_)) => c.fail(name, "opened content that does not exist".to_owned()),
        Err(e) => c.fail(name, e),
    }
    let name = "open range: missing is NotFound";
    match bounded(store.open(&missing, Some(ByteRange { start: 0, end: 9 }))).await {
        Ok(Err(StoreError::NotFound(_))) => {}
        Ok(Err(e)) => c.fail(name, format!("wrong error: {e}")),
        Ok(Ok(_)) => c.fail(name, "opened content that does not exist".to_owned()),
        Err(e) => c.fail(name, e),
    }
    let name = "open_file: missing is NotFound (or no file)";
    match bounded(store.open_file(&missing, None)).await {
        Ok(Err(StoreError::NotFound(_)) | Ok(None)) => {}
        Ok(Err(e)) => c.fail(name, format!("wrong error: {e}")),
        Ok(Ok(Some(_))) => c.fail(
            name,
            "opened a file for content that does not exist".to_owned(),
        ),
        Err(e) => c.fail(name, e),
    }
    let name = "read_small: missing is NotFound";
    match bounded(store.read_small(&missing, 1024)).await {
        Ok(Err(StoreError::NotFound(_))) => {}
        Ok(Err(e)) => c.fail(name, format!("wrong error: {e}")),
        Ok(Ok(_)) => c.fail(name, "read content that does not exist".to_owned()),
        Err(e) => c.fail(name, e),
    }
}

async fn check_closure<S: Store>(store: &S, f: &Fixture, c: &mut Checks) {
    let cases = [
        (
            "closure: oci index",
            &f.oci_index,
            vec![
                &f.oci_index,
                &f.oci_manifest,
                &f.oci_config,
                &f.oci_layers[0],
                &f.oci_layers[1],
            ],
        ),
        (
            "closure: docker manifest",
            &f.docker_manifest,
            vec![&f.docker_manifest, &f.docker_config, &f.docker_layer],
        ),
        (
            "closure: every layer type",
            &f.kinds.oci_manifest,
            [&f.kinds.oci_manifest, &f.kinds.oci_config]
                .into_iter()
                .chain(&f.kinds.oci_layers)
                .collect(),
        ),
        (
            "closure: docker layer types",
            &f.kinds.docker_manifest,
            [&f.kinds.docker_manifest, &f.kinds.docker_config]
                .into_iter()
                .chain(&f.kinds.docker_layers)
                .collect(),
        ),
        (
            "closure: a layer is its own closure",
            &f.oci_layers[0],
            vec![&f.oci_layers[0]],
        ),
    ];
    for (name, root, want) in cases {
        let Some(got) = c.call(name, closure(store, &root.digest)).await else {
            continue;
        };
        let mut got: Vec<Digest> = got;
        let mut want: Vec<Digest> = want.iter().map(|b| b.digest.clone()).collect();
        got.sort();
        want.sort();
        c.eq(name, got, want);
    }
}

async fn check_watch<S: Store>(store: &S, seeder: &dyn Seeder, f: &Fixture, c: &mut Checks) {
    let Some(mut events) = c.call("watch()", store.watch()).await else {
        return;
    };
    let mut probes: Vec<String> = Vec::new();
    let mut created: Option<String> = None;
    'attempts: for attempt in 0..WATCH_ATTEMPTS {
        let name = f.name("watch", &format!("probe{attempt}"));
        if let Err(e) = seeder.set_image(&name, &f.oci_index).await {
            c.fail("watch: create a probe image", e.to_string());
            return;
        }
        probes.push(name);
        let deadline = tokio::time::Instant::now() + WATCH_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Err(_) => break,
                Ok(None) => {
                    c.fail(
                        "watch: stream stays open",
                        "the event stream ended".to_owned(),
                    );
                    return;
                }
                Ok(Some(StoreEvent::ImageChanged { name })) if probes.contains(&name) => {
                    created = Some(name);
                    break 'attempts;
                }
                Ok(Some(_)) => {}
            }
        }
    }
    let Some(name) = created else {
        c.fail(
            "watch: reports an image create",
            format!("no ImageChanged for {} probe images", probes.len()),
        );
        return;
    };
    let resolved = bounded(store.resolve(&f.registry, "conformance/watch", tag_of(&name))).await;
    c.check(
        "watch: the created image resolves",
        matches!(resolved, Ok(Ok(Some(ref d))) if *d == f.oci_index.digest),
        || format!("{resolved:?}"),
    );
    if let Err(e) = seeder.delete_image(&name).await {
        c.fail("watch: delete the probe image", e.to_string());
        return;
    }
    let want = StoreEvent::ImageDeleted { name: name.clone() };
    let deadline = tokio::time::Instant::now() + WATCH_DELETE_WAIT;
    let mut deleted = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.next()).await {
        if ev == want {
            deleted = true;
            break;
        }
    }
    c.check("watch: reports an image delete", deleted, || {
        format!("no {want:?} within {WATCH_DELETE_WAIT:?}")
    });
    let resolved = bounded(store.resolve(&f.registry, "conformance/watch", tag_of(&name))).await;
    c.check(
        "watch: the deleted image no longer resolves",
        matches!(resolved, Ok(Ok(None))),
        || format!("{resolved:?}"),
    );
    for probe in probes.iter().filter(|p| **p != name) {
        if let Err(e) = seeder.delete_image(probe).await {
            c.fail("watch: clean up probe images", e.to_string());
        }
    }
}

fn tag_of(name: &str) -> &str {
    name.rsplit_once(':').map(|(_, t)| t).unwrap_or_default()
}

/// Reads content (all or a range) into one buffer.
async fn read<S: Store>(
    store: &S,
    digest: &Digest,
    range: Option<ByteRange>,
) -> Result<Bytes, StoreError> {
    let chunks: Vec<Bytes> = store.open(digest, range).await?.try_collect().await?;
    Ok(chunks.concat().into())
}

/// The bytes of the file region [`Store::open_file`] hands out (read at its offset, as
/// `sendfile` would), or `None` when the store hands out no file.
async fn read_file<S: Store>(
    store: &S,
    digest: &Digest,
    range: Option<ByteRange>,
) -> Result<Option<Bytes>, StoreError> {
    use std::os::unix::fs::FileExt;
    let Some(f) = store.open_file(digest, range).await? else {
        return Ok(None);
    };
    let len = usize::try_from(f.len).map_err(|_| StoreError::unavailable("region too large"))?;
    let mut buf = vec![0u8; len];
    // Small fixture content: a blocking read is fine in a test suite.
    f.file.read_exact_at(&mut buf, f.offset)?;
    Ok(Some(buf.into()))
}

async fn bounded<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CALL_BOUND, fut)
        .await
        .map_err(|_| format!("no answer within {CALL_BOUND:?}"))
}

/// Collects failed checks instead of stopping at the first.
#[derive(Default)]
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    fn fail(&mut self, name: &str, detail: String) {
        self.failures.push(format!("{name}: {detail}"));
    }

    fn check(&mut self, name: &str, ok: bool, detail: impl FnOnce() -> String) {
        if !ok {
            let d = detail();
            self.fail(name, d);
        }
    }

    fn eq<T: PartialEq + Debug>(&mut self, name: &str, got: T, want: T) {
        self.check(name, got == want, || format!("got {got:?}, want {want:?}"));
    }

    /// Runs one store call within [`CALL_BOUND`]; a failure is recorded and yields `None`.
    async fn call<T>(
        &mut self,
        name: &str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        match bounded(fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.fail(name, format!("error: {e} ({e:?})"));
                None
            }
            Err(e) => {
                self.fail(name, e);
                None
            }
        }
    }

    fn finish(self) -> Result<(), ConformanceError> {
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(ConformanceError {
                failures: self.failures,
            })
        }
    }
}

/// The in-memory twin seeds itself.
#[async_trait]
impl Seeder for MemoryStore {
    async fn seed(&self, fixture: &Fixture) -> Result<(), SeedError> {
        for b in fixture.blobs() {
            self.add_blob(b.bytes.clone());
        }
        for img in &fixture.images {
            self.set_image(&img.name, img.target.digest.clone());
        }
        Ok(())
    }

    async fn set_image(&self, name: &str, target: &Blob) -> Result<(), SeedError> {
        MemoryStore::set_image(self, name, target.digest.clone());
        Ok(())
    }

    async fn delete_image(&self, name: &str) -> Result<(), SeedError> {
        MemoryStore::delete_image(self, name);
        Ok(())
    }
}

// ---- Fixture content generators: deterministic, dependency-free. ----

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    // serde_json's output for a Value is deterministic (keys sorted: no preserve_order).
    v.to_string().into_bytes()
}

/// GOARCH of this machine, as image configs and platforms name it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Deterministic incompressible bytes (xorshift64*).
/// Deterministic, incompressible-looking bytes (xorshift64*), for fixtures and tests that need
/// large content whose digest is the same on every run.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A ustar archive of regular files (POSIX.1-1988 header layout), mtime 0, root-owned.
fn tar(files: &[(impl AsRef<str>, impl AsRef<[u8]>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let (name, data) = (name.as_ref(), data.as_ref());
        let mut h = [0u8; 512];
        let put = |h: &mut [u8; 512], at: usize, s: &[u8]| h[at..at + s.len()].copy_from_slice(s);
        // Names here are short fixture paths; longer ones would need the prefix field.
        put(&mut h, 0, &name.as_bytes()[..name.len().min(100)]);
        put(&mut h, 100, b"0000644\0");
        put(&mut h, 108, b"0000000\0");
        put(&mut h, 116, b"0000000\0");
        put(&mut h, 124, format!("{:011o}\0", data.len()).as_bytes());
        put(&mut h, 136, b"00000000000\0");
        put(&mut h, 148, b"        ");
        h[156] = b'0';
        put(&mut h, 257, b"ustar\0");
        put(&mut h, 263, b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A zstd frame (RFC 8878, 3.1.1) of raw blocks only: valid zstd that any decoder reads,
/// without a compression library. Single segment, 8-byte content size, no checksum.
fn zstd_raw(data: &[u8]) -> Vec<u8> {
    // Raw blocks may not exceed Block_Maximum_Size = min(window, 128 KiB) (3.1.1.2.3).
    const BLOCK: usize = 128 * 1024;
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(BLOCK).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        // Block_Header: Last_Block (bit 0), Block_Type 0 = raw (bits 1-2), Block_Size.
        let header = ((chunk.len() as u32) << 3) | u32::from(i == last);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(chunk);
    }
    out
}

/// A zstd skippable frame (RFC 8878, 3.1.2) carrying `data`.
fn zstd_skippable(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x50, 0x2a, 0x4d, 0x18];
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// A gzip member (RFC 1952) whose deflate stream uses stored blocks only (RFC 1951, 3.2.4):
/// valid gzip that any decompressor reads, without a compression library.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = u8::from(chunks.peek().is_none());
        let len = chunk.len() as u16;
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// CRC-32 (IEEE 802.3, reflected), as gzip's trailer needs.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_passes_the_suite() {
        let store = MemoryStore::new();
        if let Err(e) = run(&store, &store).await {
            panic!("{e}");
        }
    }

    #[test]
    fn fixture_is_deterministic_and_well_formed() {
        let a = Fixture::default();
        let b = Fixture::default();
        assert_eq!(a.blobs(), b.blobs());
        assert_eq!(a.layout_tar(), b.layout_tar());
        let digests: HashSet<&Digest> = a.blobs().iter().map(|b| &b.digest).collect();
        assert_eq!(digests.len(), a.blobs().len(), "blobs are distinct");
        for blob in a.blobs() {
            assert_eq!(media::detect(&blob.bytes), blob.detected, "{}", blob.label);
        }
        let kids: Vec<Digest> = media::children(&a.oci_manifest.bytes)
            .into_iter()
            .map(|c| c.digest)
            .collect();
        assert_eq!(
            kids,
            vec![
                a.oci_config.digest.clone(),
                a.oci_layers[0].digest.clone(),
                a.oci_layers[1].digest.clone()
            ]
        );
        assert!(
            a.oci_layers[1].size() > 1024 * 1024,
            "spans 1 MiB gRPC chunks"
        );
    }

    #[test]
    fn crc32_and_tar_known_values() {
        // RFC 3720 / common check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let t = tar(&[("a", b"x".to_vec())]);
        assert_eq!(t.len(), 512 + 512 + 1024);
        assert_eq!(&t[257..263], b"ustar\0");
        let g = gzip_stored(b"");
        assert_eq!(&g[..2], &[0x1f, 0x8b]);
    }

    /// A store that breaks one promise must fail the suite, or the suite proves nothing.
    #[tokio::test]
    async fn suite_catches_a_broken_store() {
        struct Truncating(MemoryStore);
        #[async_trait]
        impl Store for Truncating {
            async fn images(&self) -> Result<Vec<super::super::Image>, StoreError> {
                self.0.images().await
            }
            async fn resolve(
                &self,
                r: &str,
                n: &str,
                t: &str,
            ) -> Result<Option<Digest>, StoreError> {
                self.0.resolve(r, n, t).await
            }
            async fn descriptor(
                &self,
                d: &Digest,
            ) -> Result<Option<super::super::Descriptor>, StoreError> {
                self.0.descriptor(d).await
            }
            async fn open(
                &self,
                d: &Digest,
                r: Option<ByteRange>,
            ) -> Result<super::super::ContentStream, StoreError> {
                // Loses the last byte of every read.
                let all = read(&self.0, d, r).await?;
                let cut = all.slice(..all.len().saturating_sub(1));
                Ok(futures::stream::iter(vec![Ok(cut)]).boxed())
            }
            async fn watch(
                &self,
            ) -> Result<futures::stream::BoxStream<'static, StoreEvent>, StoreError> {
                self.0.watch().await
            }
        }
        let store = Truncating(MemoryStore::new());
        let err = run(&store, &store.0)
            .await
            .expect_err("a truncating store must fail");
        assert!(
            err.failures
                .iter()
                .any(|f| f.starts_with("open whole: oci layer tar")),
            "{err}"
        );
    }
}
