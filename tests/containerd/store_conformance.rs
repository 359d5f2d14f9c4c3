//! `ContainerdStore` against a real, private containerd: the store conformance suite on both
//! read paths, the file fast path's fallbacks, behaviour while containerd is down and after it
//! comes back, content-create events (2.1+) and what introspection finds out about the
//! node's configuration.
//!
//! Which containerd: `RIG_CONTAINERD=1.6|1.7|2.3|2.4` (tests/containerd/containerd.sh; 1.6 is
//! Debian's, the others are built on first use), default the 2.x LTS. `make test` runs this
//! file once per line. Needs root (containerd's root directory and snapshotters).
//! Run: `RIG_CONTAINERD=1.7 cargo test --test containerd store_conformance::`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use speculum::oci::{ByteRange, Digest};
use speculum::store::conformance::{self, Fixture, Seeder};
use speculum::store::containerd::{ContainerdConfig, ContainerdStore};
use speculum::store::{Store, StoreError, StoreEvent};
use testkit::containerd::{Containerd, CriOptions, Options};

/// "Quickly" for a down containerd: a refused or missing socket fails at once, so anything
/// near this bound means the store waited on something it should not have.
const UNAVAILABLE_WITHIN: Duration = Duration::from_secs(2);
/// How long a restarted containerd may take until the same store works again.
const RECONNECT_WITHIN: Duration = Duration::from_secs(20);

fn start() -> (tempfile::TempDir, Containerd) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rig = Containerd::start(dir.path()).expect("private containerd starts");
    (dir, rig)
}

async fn read(
    store: &impl Store,
    digest: &Digest,
    range: Option<ByteRange>,
) -> Result<Bytes, StoreError> {
    let chunks: Vec<Bytes> = store.open(digest, range).await?.try_collect().await?;
    Ok(chunks.concat().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_grpc() {
    let (_dir, rig) = start();
    let store = ContainerdStore::new(rig.store_config()).expect("store");
    if let Err(e) = conformance::run(&store, &rig.seeder()).await {
        panic!("{e}\ncontainerd log:\n{}", rig.log_tail(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_content_files() {
    let (_dir, rig) = start();
    let store = ContainerdStore::new(ContainerdConfig {
        content_dir: Some(rig.content_dir.clone()),
        ..rig.store_config()
    })
    .expect("store");
    if let Err(e) = conformance::run(&store, &rig.seeder()).await {
        panic!("{e}\ncontainerd log:\n{}", rig.log_tail(20));
    }
}

/// Proves the fast path really reads files (a doctored copy of the content directory shows
/// through) and falls back to gRPC when a file is absent or has the wrong size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_files_are_read_directly_and_fall_back_to_grpc() {
    let (dir, rig) = start();
    let fixture = Fixture::default();
    rig.seeder().seed(&fixture).await.expect("seed");

    // A copy of blobs/sha256 where each case's file is doctored.
    let copy = dir.path().join("content-copy");
    let blobs = copy.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let file = |b: &conformance::Blob| blobs.join(b.digest.hex());
    let doctored = &fixture.oci_layers[1];
    let mut changed = doctored.bytes.to_vec();
    changed[0] ^= 0xff;
    std::fs::write(file(doctored), &changed).expect("write doctored");
    let truncated = &fixture.docker_layer;
    std::fs::write(file(truncated), &truncated.bytes[..10]).expect("write truncated");
    // fixture.oci_layers[0] has no file in the copy at all.

    let store = ContainerdStore::new(ContainerdConfig {
        content_dir: Some(copy.clone()),
        ..rig.store_config()
    })
    .expect("store");
    let absent = &fixture.oci_layers[0];
    let cases: Vec<(&str, &conformance::Blob, Option<ByteRange>, Bytes)> = vec![
        (
            "a same-size file is served as is (fast path taken)",
            doctored,
            None,
            Bytes::from(changed.clone()),
        ),
        (
            "ranges come from the file too",
            doctored,
            Some(ByteRange { start: 0, end: 3 }),
            Bytes::from(changed[..4].to_vec()),
        ),
        (
            "a file of the wrong size is ignored",
            truncated,
            None,
            truncated.bytes.clone(),
        ),
        (
            "a missing file falls back to gRPC",
            absent,
            None,
            absent.bytes.clone(),
        ),
        (
            "a missing file falls back to gRPC for ranges",
            absent,
            Some(ByteRange { start: 5, end: 9 }),
            absent.bytes.slice(5..=9),
        ),
    ];
    for (name, blob, range, want) in cases {
        let got = read(&store, &blob.digest, range).await.expect(name);
        assert!(
            got == want,
            "{name}: got {} bytes, want {}",
            got.len(),
            want.len()
        );
    }

    // Namespaces: a file that exists is not served to a namespace that does not have the
    // content in its metadata.
    let other = ContainerdStore::new(ContainerdConfig {
        namespace: "other".into(),
        content_dir: Some(rig.content_dir.clone()),
        ..rig.store_config()
    })
    .expect("store");
    assert!(
        matches!(
            other.open(&doctored.digest, None).await,
            Err(StoreError::NotFound(_))
        ),
        "content of another namespace must not be served from its file"
    );
}

/// The daemon must start while containerd is down and keep working across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_while_down_and_reconnects_after_restart() {
    let (_dir, mut rig) = start();
    let fixture = Fixture::default();
    rig.seeder().seed(&fixture).await.expect("seed");
    let store = ContainerdStore::new(rig.store_config()).expect("store");
    let index = &fixture.oci_index.digest;

    store.ping().await.expect("ping while up");
    let before = store.descriptor(index).await.expect("descriptor while up");
    assert!(before.is_some());
    let mut events = store.watch().await.expect("watch while up");

    rig.stop().expect("stop containerd");

    let started = Instant::now();
    let down: Vec<(&str, Result<(), StoreError>)> = vec![
        ("ping", store.ping().await),
        ("images", store.images().await.map(drop)),
        (
            "resolve",
            store
                .resolve(&fixture.registry, "conformance/oci", "v1")
                .await
                .map(drop),
        ),
        ("descriptor", store.descriptor(index).await.map(drop)),
        ("open", store.open(index, None).await.map(drop)),
        ("watch", store.watch().await.map(drop)),
    ];
    let elapsed = started.elapsed();
    for (name, result) in down {
        assert!(
            matches!(result, Err(StoreError::Unavailable { .. })),
            "{name} while containerd is down: {result:?}"
        );
    }
    assert!(
        elapsed < UNAVAILABLE_WITHIN * 6,
        "six calls took {elapsed:?} while containerd was down"
    );
    // The subscription made while containerd was up ends, so its owner can re-subscribe.
    let ended = tokio::time::timeout(UNAVAILABLE_WITHIN, async {
        while events.next().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "event stream did not end when containerd stopped"
    );

    rig.restart().expect("restart containerd");

    // Bounded poll: the channel reconnects on the first call after the socket is back.
    let deadline = Instant::now() + RECONNECT_WITHIN;
    loop {
        match store.ping().await {
            Ok(()) => break,
            // Paces the poll; the bound is the deadline, not the pause.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("store did not reconnect within {RECONNECT_WITHIN:?}: {e}"),
        }
    }
    assert_eq!(
        store
            .descriptor(index)
            .await
            .expect("descriptor after restart"),
        before,
        "content survives the restart"
    );
    assert_eq!(
        store
            .resolve(&fixture.registry, "conformance/oci", "v1")
            .await
            .expect("resolve after restart"),
        Some(index.clone())
    );
    let got = read(&store, &fixture.oci_layers[1].digest, None)
        .await
        .expect("read after restart");
    assert!(got == fixture.oci_layers[1].bytes, "content after restart");
    let mut events = store.watch().await.expect("watch after restart");
    // Subscriptions register asynchronously: create probes until one is reported (bounded).
    let seeder = rig.seeder();
    let mut seen = false;
    for attempt in 0..20 {
        let name = format!("{}/conformance/restart:p{attempt}", fixture.registry);
        seeder
            .set_image(&name, &fixture.oci_index)
            .await
            .expect("create probe");
        let wait = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(ev) = events.next().await {
                if ev == (StoreEvent::ImageChanged { name: name.clone() }) {
                    return true;
                }
            }
            false
        });
        if let Ok(true) = wait.await {
            seen = true;
            break;
        }
    }
    assert!(seen, "no image event after the restart");
}

/// Not a check: prints throughput and CPU cost of the two read paths for one large blob.
/// Run: `cargo test --release --test containerd store_conformance::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_read_paths() {
    const MIB: usize = 1024 * 1024;
    const SIZE: usize = 256 * MIB;
    const ROUNDS: usize = 3;
    let (dir, rig) = start();
    // Incompressible content; the digest is computed on the way to the file.
    let mut bytes = vec![0u8; SIZE];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let digest = Digest::sha256_of(&bytes);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &bytes).expect("write blob");
    drop(bytes);
    let status = rig
        .ctr_command(&[
            "content",
            "ingest",
            "--expected-size",
            &SIZE.to_string(),
            "--expected-digest",
            &digest.to_string(),
            "measure-big",
        ])
        .stdin(std::fs::File::open(&path).expect("open blob"))
        .status()
        .expect("ctr content ingest");
    assert!(status.success(), "ingest failed");
    // Without a reference the garbage collector may remove it.
    rig.ctr(&[
        "content",
        "label",
        &digest.to_string(),
        "containerd.io/gc.root=measure",
    ])
    .expect("label");

    let pid = rig.pid().expect("running");
    for (name, content_dir) in [("grpc", None), ("file", Some(rig.content_dir.clone()))] {
        let store = ContainerdStore::new(ContainerdConfig {
            content_dir,
            ..rig.store_config()
        })
        .expect("store");
        let (self_cpu, cd_cpu, started) = (
            cpu_seconds("self"),
            cpu_seconds(&pid.to_string()),
            Instant::now(),
        );
        let mut largest = 0usize;
        for _ in 0..ROUNDS {
            let mut stream = store.open(&digest, None).await.expect("open");
            let mut n = 0usize;
            while let Some(chunk) = stream.next().await {
                let len = chunk.expect("chunk").len();
                largest = largest.max(len);
                n += len;
            }
            assert_eq!(n, SIZE);
        }
        let wall = started.elapsed().as_secs_f64();
        let gb = (SIZE * ROUNDS) as f64 / 1e9;
        eprintln!(
            "MEASURE {name}: {:.0} MB/s, speculum {:.2} CPU-s/GB, containerd {:.2} CPU-s/GB, \
             largest chunk {largest} bytes",
            gb * 1000.0 / wall,
            (cpu_seconds("self") - self_cpu) / gb,
            (cpu_seconds(&pid.to_string()) - cd_cpu) / gb,
        );
    }
}

/// utime + stime of a process from /proc/<pid>/stat, in seconds (USER_HZ = 100).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// The rig itself, as other integration tests use it: with the CRI plugin and a hosts.toml
/// tree, the plugin loads (`ctr plugins ls` reports it ok).
#[test]
fn rig_starts_with_the_cri_plugin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let rig = Containerd::start_with(
        dir.path(),
        Options {
            cri: Some(CriOptions {
                registry_config_path: Some(certs),
                discard_unpacked_layers: false,
            }),
            ..Options::default()
        },
    )
    .expect("containerd with cri starts");
    let plugins = rig.ctr(&["plugins", "ls"]).expect("ctr plugins ls");
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri "))
        .unwrap_or_default();
    assert!(
        cri.trim_end().ends_with("ok"),
        "cri plugin: {cri:?}\n{plugins}"
    );
}

/// The fixture's layers are real archives: containerd unpacks the OCI and docker images
/// (gzip, zstd with a skippable frame, and tar decoded, diff IDs verified against the configs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_images_unpack() {
    let (dir, rig) = start();
    let fixture = Fixture::default();
    let path = dir.path().join("layout.tar");
    std::fs::write(&path, fixture.layout_tar()).expect("write layout");
    let path = path.display().to_string();
    rig.ctr_async(&["images", "import", &path])
        .await
        .expect("import with unpack");
    let snapshots = rig
        .ctr_async(&["snapshots", "ls"])
        .await
        .expect("snapshots ls");
    // One committed snapshot per layer: two for the OCI image, one for the docker image, four
    // (zstd, zstd:chunked, non-distributable gzip and zstd) for `layers`, two (tar, foreign)
    // for `docker-layers`.
    let committed = snapshots
        .lines()
        .filter(|l| l.contains("Committed"))
        .count();
    let layers = 2 + 1 + fixture.kinds.oci_layers.len() + fixture.kinds.docker_layers.len();
    assert_eq!(committed, layers, "{snapshots}");
    assert_eq!(layers, 9);
}

/// containerd ≥ 2.1 reports each committed blob (`/content/create`) and the store forwards it
/// as `ContentAdded`; older versions send nothing, which the store must survive (its image
/// events still work: the conformance suite's watch checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_create_events_where_containerd_has_them() {
    let (dir, rig) = start();
    let store = ContainerdStore::new(rig.store_config()).expect("store");
    let mut events = store.watch().await.expect("watch");
    let has_events = rig.version() >= (2, 1);
    // Subscriptions register asynchronously: ingest probes until one is reported (bounded).
    let mut seen = None;
    for attempt in 0..10 {
        let bytes = format!("content-event probe {attempt} of {:?}", dir.path());
        let digest = Digest::sha256_of(bytes.as_bytes());
        let file = dir.path().join(format!("probe{attempt}"));
        std::fs::write(&file, &bytes).expect("write probe");
        let mut cmd = rig.ctr_command(&["content", "ingest", &format!("probe-{attempt}")]);
        cmd.stdin(std::fs::File::open(&file).expect("open probe"));
        let status = cmd.status().expect("ctr content ingest");
        assert!(status.success(), "ctr content ingest: {status}");
        // Content without a distribution-source label waits out the store's label poll
        // (2 s) before it is reported.
        let wait = tokio::time::timeout(Duration::from_secs(4), async {
            while let Some(ev) = events.next().await {
                if let StoreEvent::ContentAdded { digest: d, sources } = ev
                    && d == digest
                {
                    return Some(sources);
                }
            }
            None
        });
        if let Ok(Some(sources)) = wait.await {
            seen = Some(sources);
            break;
        }
        if !has_events && attempt >= 1 {
            break; // two probes unreported: enough to say "none" for a version without them
        }
    }
    if has_events {
        let sources = seen.unwrap_or_else(|| {
            panic!(
                "containerd {} sent no content-create event\n{}",
                rig.line(),
                rig.log_tail(20)
            )
        });
        assert!(
            sources.is_empty(),
            "ingested content has no source: {sources:?}"
        );
    } else {
        assert!(
            seen.is_none(),
            "containerd {} has no content events",
            rig.line()
        );
    }
}

/// Introspection finds the content root (so `content_dir` need not be configured), and, where
/// the version exposes them (1.x: CRI status; 2.4+: plugin exports), CRI's `config_path` and
/// `discard_unpacked_layers`; 2.0–2.3 say neither, which must come out as "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_reports_content_root_and_cri_settings() {
    use speculum::store::introspect::{Finding, findings};
    let exposes = |rig: &Containerd| rig.version() < (2, 0) || rig.version() >= (2, 4);
    let cases = [
        ("well configured", true, false),
        ("no config_path, layers discarded", false, true),
    ];
    for (name, with_path, discard) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs.d");
        std::fs::create_dir_all(&certs).expect("mkdir");
        let rig = Containerd::start_with(
            dir.path(),
            Options {
                cri: Some(CriOptions {
                    registry_config_path: with_path.then(|| certs.clone()),
                    discard_unpacked_layers: discard,
                }),
                ..Options::default()
            },
        )
        .expect("containerd with cri starts");
        // gRPC only, no content_dir: introspection must supply it.
        let store = ContainerdStore::new(rig.store_config()).expect("store");
        assert_eq!(store.content_dir(), None);
        let facts = store.introspect().await.expect("introspect");
        assert_eq!(
            facts.content_root.as_deref(),
            Some(rig.content_dir.as_path()),
            "{name}: content root"
        );
        assert_eq!(
            store.content_dir(),
            Some(rig.content_dir.as_path()),
            "{name}: adopted"
        );
        let labels: Vec<&str> = findings(&facts, &certs, true)
            .iter()
            .map(Finding::label)
            .collect();
        if exposes(&rig) {
            // 1.x leaves an unset config_path empty; 2.x fills in its default directories.
            let (want_path, unset) = match (with_path, rig.version() >= (2, 0)) {
                (true, _) => (certs.display().to_string(), None),
                (false, false) => (String::new(), Some("hosts_dir_not_set")),
                (false, true) => (
                    "/etc/containerd/certs.d:/etc/docker/certs.d".to_owned(),
                    Some("hosts_dir_differs"),
                ),
            };
            assert_eq!(
                facts.registry_config_path,
                Some(want_path),
                "{name}: {facts:?}"
            );
            assert_eq!(
                facts.discard_unpacked_layers,
                Some(discard),
                "{name}: {facts:?}"
            );
            let want: Vec<&str> = unset
                .into_iter()
                .chain(discard.then_some("layers_discarded"))
                .collect();
            assert_eq!(labels, want, "{name}: {facts:?}");
        } else {
            assert_eq!(facts.registry_config_path, None, "{name}: {facts:?}");
            assert_eq!(labels, vec!["hosts_dir_unknown"], "{name}: {facts:?}");
        }
        let expected_config_version = if rig.version() >= (2, 0) { 3 } else { 2 };
        assert_eq!(
            facts.config_version(),
            expected_config_version,
            "{}",
            facts.version
        );
    }
}
