//! containers/image clients (the code CRI-O pulls with) through the mirror endpoint, on
//! loopback: `skopeo copy docker://… containers-storage:[vfs@…]` configured by its own
//! `registries.conf` whose mirror location carries the registry in the path
//! (`127.0.0.1:<mirror>/127.0.0.1_<registry port>`: containers/image refuses a `:` there), against in-process nodes with no containerd
//! store (an empty memory store, the blob cache, the real registry code, a memory DHT) and a
//! real `docker-registry` upstream.
//!
//! podman (`podman pull`, `--root/--runroot`, vfs, `CONTAINERS_REGISTRIES_CONF`) takes the same
//! path. What is checked: a public image is fetched anonymously into the first node's cache
//! (manifest, tag and blobs) and the second node pulls it from the first with upstream
//! stopped (image and index); a private image (htpasswd) gets a 404 on the manifest and
//! skopeo pulls it upstream with its own credentials, the mirror seeing no blob request; an
//! image the node cannot deliver whole gets a 404 and skopeo goes upstream; a registry that
//! is not mirrored gets a 404 and one that disagrees with `?ns=` a 400.
//!
//! Needs root (containers-storage, mount namespaces), skopeo, docker-registry and unshare
//! (`scripts/setup.sh`). Never skips: a missing tool fails the test. Nothing of the host's
//! `/etc/containers` or `/var/lib/containers` is read or written: skopeo runs in a mount
//! namespace of its own with the client's directories bound over `/var/lib` and
//! `/etc/containers`, and every path is the test's own (`--registries-conf`, `--policy`,
//! `[vfs@root+runroot]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use speculum::advertise::{Advertiser, SyncConfig};
use speculum::audit::AuditRecord;
use speculum::audit::memory::MemorySink;
use speculum::cache::coalesce::Coalescer;
use speculum::cache::{Cache, CacheConfig};
use speculum::metrics::Metrics;
use speculum::oci::Digest;
use speculum::policy::TagResolution;
use speculum::readiness::Readiness;
use speculum::registry::tags::TagResolver;
use speculum::registry::{self, Guard, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::memory::{MemoryNetwork, MemoryRouter};
use speculum::routing::{Peer, Router};
use speculum::shutdown::{self, Trigger};
use speculum::store::memory::MemoryStore;
use speculum::wire::PeerClient;
use testkit::registries::{Auth, OCI_INDEX, OCI_MANIFEST, Registry};
use tokio::net::TcpListener;

/// One node: a mirror endpoint and a peer endpoint over an empty store (no containerd), with
/// the blob cache and an advertiser.
struct Node {
    mirror: SocketAddr,
    audit: Arc<MemorySink>,
    cache: Arc<Cache>,
    router: MemoryRouter,
    _stop: Trigger,
    _dir: tempfile::TempDir,
}

async fn serve(listener: TcpListener, app: axum::Router) {
    tokio::spawn(speculum::server::serve(
        listener,
        app,
        registry::serve_options(),
        std::future::pending::<()>(),
    ));
}

async fn node(net: &MemoryNetwork, name: &str, upstream: &str, upstream_fetch: bool) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mirror_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mirror_addr = mirror_listener.local_addr().expect("addr");
    let router = net.router(Peer::new(
        name.to_owned(),
        peer_listener.local_addr().expect("addr"),
    ));
    let router_dyn: Arc<dyn Router> = Arc::new(router.clone());
    let metrics = Metrics::new();
    let config = CacheConfig {
        enabled: true,
        dir: dir.path().join("cache"),
        upstream_fetch,
        plain_http: vec![upstream.to_owned()],
        ..CacheConfig::default()
    };
    let cache = Cache::open(&config.dir, 1 << 30).expect("cache");
    let client = PeerClient::new(Duration::from_secs(1), Duration::from_secs(5)).expect("client");
    let coalescer = Coalescer::new(
        cache.clone(),
        router_dyn.clone(),
        config,
        metrics.cache.clone(),
        client.clone(),
    )
    .expect("coalescer");
    let tags = TagResolver::new(
        TagResolution::UpstreamFirst,
        Duration::from_secs(2),
        vec![upstream.to_owned()],
        metrics.registry.clone(),
    )
    .expect("tags")
    .only_for(Some(vec![upstream.to_owned()]));
    let mirror = Mirror::with_client(
        router_dyn.clone(),
        MirrorConfig::default(),
        metrics.registry.clone(),
        client,
    )
    .with_tags(tags);
    let store = Arc::new(MemoryStore::new());
    let audit = Arc::new(MemorySink::new());
    let guard = Guard {
        audit: audit.clone(),
        node: name.to_owned(),
        ..Guard::open()
    };
    let state = |handler, mirror: Option<Arc<Mirror>>| RegistryState {
        store: store.clone(),
        mirror,
        cache: Some(coalescer.clone()),
        metrics: metrics.registry.clone(),
        readiness: Readiness::new(),
        handler,
        serving: Default::default(),
    };
    serve(
        peer_listener,
        registry::app_with(state(Handler::Peer, None), guard.clone()),
    )
    .await;
    serve(
        mirror_listener,
        registry::app_with(state(Handler::Mirror, Some(Arc::new(mirror))), guard),
    )
    .await;
    let (stop, shutdown) = shutdown::channel();
    let advertiser = Advertiser::new(
        store.clone(),
        router_dyn,
        SyncConfig {
            reconcile_interval: Duration::from_secs(1),
            debounce: Duration::from_millis(20),
        },
        metrics.routing.clone(),
        Readiness::new(),
    )
    .with_cache(Some(cache.clone()));
    tokio::spawn(advertiser.run(shutdown));
    Node {
        mirror: mirror_addr,
        audit,
        cache,
        router,
        _stop: stop,
        _dir: dir,
    }
}

/// Runs `$3…` with `$1` over /var/lib and `$2` over /etc/containers, in the mount namespace
/// `unshare -m` made (private, so nothing propagates to the host's mounts).
const PRIVATE_MOUNTS: &str = r#"mount --make-rprivate / && mount --bind "$1" /var/lib && mount --bind "$2" /etc/containers && shift 2 && exec "$@""#;

/// A containers/image client's own files: registries.conf with the node's mirror in front of
/// `registry`, a permissive policy, a vfs storage root.
struct Client {
    dir: tempfile::TempDir,
}

impl Client {
    fn new(mirror: SocketAddr, registry: &str) -> Client {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("registries.conf"),
            format!(
                "[[registry]]\nprefix = \"{registry}\"\nlocation = \"{registry}\"\ninsecure = true\n\n\
                 [[registry.mirror]]\nlocation = \"{mirror}/{}\"\ninsecure = true\n",
                // containers/image refuses a `:` in a path component: the port is `_<port>`.
                registry.replace(':', "_")
            ),
        )
        .expect("registries.conf");
        std::fs::write(
            dir.path().join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("policy.json");
        Client { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `skopeo copy docker://<reference> containers-storage:[vfs@root+runroot]<reference>`;
    /// the exit status and stderr.
    async fn skopeo_copy(&self, reference: &str, creds: Option<&str>) -> (bool, String) {
        let storage = format!(
            "containers-storage:[vfs@{}+{}]{reference}",
            self.path("root").display(),
            self.path("runroot").display()
        );
        // containers/image as root writes /var/lib/containers/cache whatever the storage
        // says, and reads /etc/containers: a private mount namespace gives it the client's own.
        for d in ["var-lib", "etc-containers"] {
            std::fs::create_dir_all(self.path(d)).expect("client dir");
        }
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args(["-m", "--", "sh", "-c", PRIVATE_MOUNTS, "sh"])
            .arg(self.path("var-lib"))
            .arg(self.path("etc-containers"))
            .arg("skopeo")
            .arg("--registries-conf")
            .arg(self.path("registries.conf"))
            .arg("--policy")
            .arg(self.path("policy.json"))
            .args(["--tmpdir"])
            .arg(self.dir.path())
            .args(["copy", "--retry-times", "0"]);
        if let Some(c) = creds {
            cmd.args(["--src-creds", c]);
        }
        cmd.arg(format!("docker://{reference}"))
            .arg(storage)
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("skopeo finished within 120 s")
            .expect("skopeo runs (scripts/setup.sh installs it)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Client {
    /// `podman pull <reference>` with the client's registries.conf (`CONTAINERS_REGISTRIES_CONF`),
    /// `--root/--runroot` of its own and the vfs driver; the exit status and stderr.
    async fn podman_pull(&self, reference: &str) -> (bool, String) {
        for d in ["var-lib", "etc-containers", "tmp"] {
            std::fs::create_dir_all(self.path(d)).expect("client dir");
        }
        // podman reads /etc/containers/policy.json: the client's, through the bind mount.
        std::fs::copy(
            self.path("policy.json"),
            self.path("etc-containers/policy.json"),
        )
        .expect("policy");
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args(["-m", "--", "sh", "-c", PRIVATE_MOUNTS, "sh"])
            .arg(self.path("var-lib"))
            .arg(self.path("etc-containers"))
            .arg("podman")
            .arg("--root")
            .arg(self.path("podman-root"))
            .arg("--runroot")
            .arg(self.path("podman-run"))
            .args(["--storage-driver", "vfs", "pull", "--quiet", reference])
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .env("TMPDIR", self.path("tmp"))
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("podman finished within 120 s")
            .expect("podman runs (scripts/setup.sh installs it)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn records(node: &Node, kind: &str) -> Vec<AuditRecord> {
    node.audit
        .records()
        .into_iter()
        .filter(|r| r.kind == kind)
        .collect()
}

fn summary(node: &Node) -> String {
    node.audit
        .records()
        .iter()
        .map(|r| {
            format!(
                "{} {}:{} {} {}\n",
                r.kind, r.repository, r.reference, r.status, r.served_from
            )
        })
        .collect()
}

/// Waits (bounded) until the DHT says `holder` has `key`.
async fn wait_advertised(by: &MemoryRouter, key: &str, holder: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut rx) = by.lookup(key, 8).await {
            while let Ok(Some(p)) =
                tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
            {
                if p.id == holder {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{key} never advertised by {holder}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn digest(s: &str) -> Digest {
    s.parse().expect("digest")
}

/// A one-file tar (ustar), what containers-storage can apply as a layer.
fn tar_layer(name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", content.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// Deterministic incompressible-looking bytes.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Pushes an image for `arch` whose one layer is a tar holding `size` bytes; the manifest's
/// bytes and digest (not tagged).
async fn image_manifest(r: &Registry, repo: &str, arch: &str, size: usize) -> (Vec<u8>, String) {
    let layer = tar_layer(
        &format!("{arch}.bin"),
        &noise(size, size as u32 ^ arch.len() as u32),
    );
    let layer_digest = r.push_blob(repo, &layer).await;
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    })
    .to_string()
    .into_bytes();
    let config_digest = r.push_blob(repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}]
    }))
    .expect("json");
    let digest = testkit::registries::sha256(&manifest);
    (manifest, digest)
}

/// Pushes and tags an image; its manifest digest.
async fn push_image(r: &Registry, repo: &str, tag: &str, size: usize) -> String {
    let (m, _) = image_manifest(r, repo, "amd64", size).await;
    r.push_manifest(repo, tag, OCI_MANIFEST, &m).await
}

/// Pushes and tags an amd64 + arm64 index; its digest and the children's.
async fn push_index(r: &Registry, repo: &str, tag: &str) -> (String, Vec<String>) {
    let mut children = Vec::new();
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (m, d) = image_manifest(r, repo, arch, 4096).await;
        r.push_manifest(repo, &d, OCI_MANIFEST, &m).await;
        entries.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": {"architecture": arch, "os": "linux"}}));
        children.push(d);
    }
    let index = serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    )
    .expect("json");
    (
        r.push_manifest(repo, tag, OCI_INDEX, &index).await,
        children,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_pulls_image_and_index_from_the_first_with_upstream_stopped() {
    let mut upstream = Registry::start(Auth::None);
    let reg = upstream.host();
    let image = push_image(&upstream, "rig/app", "v1", 300_000).await;
    let (index, children) = push_index(&upstream, "rig/multi", "v1").await;
    let net = MemoryNetwork::new();
    let a = node(&net, "a", &reg, true).await;
    let b = node(&net, "b", &reg, true).await;

    // First node: nobody has anything; upstream (anonymous) fills its cache.
    let client_a = Client::new(a.mirror, &reg);
    for repo in ["rig/app", "rig/multi"] {
        let (ok, err) = client_a
            .skopeo_copy(&format!("{reg}/{repo}:v1"), None)
            .await;
        assert!(ok, "skopeo through node a: {err}\n{}", summary(&a));
    }
    let served: Vec<_> = records(&a, "manifest")
        .into_iter()
        .filter(|r| r.status == 200)
        .collect();
    assert!(
        served
            .iter()
            .any(|r| r.repository == "rig/app" && r.reference == "v1"),
        "the mirror answered the manifest (not upstream directly):\n{}",
        summary(&a)
    );
    assert!(
        records(&a, "blob").iter().all(|r| r.status == 200),
        "every blob from the mirror:\n{}",
        summary(&a)
    );
    assert_eq!(
        a.cache.tag(&reg, "rig/app", "v1").await,
        Some(digest(&image)),
        "the tag is kept in the cache"
    );
    assert_eq!(
        a.cache.tag(&reg, "rig/multi", "v1").await,
        Some(digest(&index)),
        "the index and its tag are kept:\n{}",
        summary(&a)
    );
    assert!(a.cache.read_manifest(&digest(&children[0])).await.is_some());
    wait_advertised(&b.router, &format!("{reg}/rig/app:v1"), "a").await;
    wait_advertised(&b.router, &format!("{reg}/rig/multi:v1"), "a").await;
    wait_advertised(&b.router, &children[0], "a").await;

    // Second node, upstream gone: everything comes from the first node's cache.
    upstream.stop();
    let client_b = Client::new(b.mirror, &reg);
    for repo in ["rig/app", "rig/multi"] {
        let (ok, err) = client_b
            .skopeo_copy(&format!("{reg}/{repo}:v1"), None)
            .await;
        assert!(
            ok,
            "skopeo through node b, upstream stopped: {err}\n{}",
            summary(&b)
        );
    }
    let peer_served = records(&b, "manifest")
        .iter()
        .filter(|r| r.status == 200 && r.served_from == "peer")
        .count();
    assert!(peer_served >= 2, "manifests from node a:\n{}", summary(&b));
    // The amd64 child of the index was checked and kept by b too.
    assert!(b.cache.read_manifest(&digest(&children[0])).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_image_is_refused_and_pulled_upstream_with_credentials() {
    let upstream = Registry::start(Auth::Htpasswd(vec![("u".into(), "p".into())]));
    let reg = upstream.host();
    let image = push_image(&upstream, "team/secret", "v1", 4096).await;
    let net = MemoryNetwork::new();
    let a = node(&net, "a", &reg, true).await;
    let client = Client::new(a.mirror, &reg);
    let (ok, err) = client
        .skopeo_copy(&format!("{reg}/team/secret:v1"), Some("u:p"))
        .await;
    assert!(ok, "skopeo with credentials: {err}\n{}", summary(&a));
    let manifests = records(&a, "manifest");
    assert!(
        !manifests.is_empty() && manifests.iter().all(|r| r.status == 404),
        "the mirror refused the private manifest:\n{}",
        summary(&a)
    );
    assert!(
        records(&a, "blob").is_empty(),
        "no blob asked of the mirror:\n{}",
        summary(&a)
    );
    assert!(a.cache.read_manifest(&digest(&image)).await.is_none());
    assert!(a.cache.tag(&reg, "team/secret", "v1").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_the_node_cannot_deliver_whole_goes_upstream() {
    let upstream = Registry::start(Auth::None);
    let reg = upstream.host();
    push_image(&upstream, "rig/cold", "v1", 4096).await;
    // No cold path (`cache.upstream_fetch: false`), no peer: the manifest is fetchable
    // anonymously but its blobs are not deliverable by this node.
    let net = MemoryNetwork::new();
    let a = node(&net, "a", &reg, false).await;
    let client = Client::new(a.mirror, &reg);
    let (ok, err) = client
        .skopeo_copy(&format!("{reg}/rig/cold:v1"), None)
        .await;
    assert!(ok, "skopeo falls back upstream: {err}\n{}", summary(&a));
    let manifests = records(&a, "manifest");
    assert!(
        !manifests.is_empty() && manifests.iter().all(|r| r.status == 404),
        "an incomplete image is not answered:\n{}",
        summary(&a)
    );
    assert!(records(&a, "blob").is_empty(), "{}", summary(&a));
    assert!(
        a.cache.tag(&reg, "rig/cold", "v1").await.is_none(),
        "nothing cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_registry_must_be_mirrored_and_agree_with_ns() {
    let upstream = Registry::start(Auth::None);
    let reg = upstream.host();
    let net = MemoryNetwork::new();
    let a = node(&net, "a", &reg, true).await;
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = format!("http://{}", a.mirror);
    let cases: &[(&str, String, u16)] = &[
        ("ping", "/v2/".into(), 200),
        (
            "not mirrored",
            "/v2/other.example:5000/rig/app/manifests/v1".into(),
            404,
        ),
        (
            "disagrees with ns",
            "/v2/10.1.2.3:5000/rig/app/manifests/v1?ns=docker.io".into(),
            400,
        ),
        (
            "unknown image",
            format!("/v2/{reg}/rig/none/manifests/v1"),
            404,
        ),
    ];
    for (name, path, want) in cases {
        let r = c.get(format!("{base}{path}")).send().await.expect(name);
        assert_eq!(r.status().as_u16(), *want, "{name}: {path}");
        if *want >= 400 {
            let text = r.text().await.expect("body");
            let body: serde_json::Value = serde_json::from_str(&text).expect("OCI error body");
            assert!(body["errors"][0]["code"].is_string(), "{name}: {body}");
        }
    }
}

/// A TCP relay in front of a node's mirror endpoint that "kills the daemon" once `kill_after`
/// bytes went to the client: every open connection is dropped mid-stream and the port stops
/// accepting — what a client sees when the daemon process dies (EOF or reset, then refused).
struct Relay {
    addr: SocketAddr,
    killed: tokio::sync::watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(port: u16, target: SocketAddr, kill_after: u64) -> Relay {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (kill, killed) = tokio::sync::watch::channel(false);
        let kill = Arc::new(kill);
        let sent = Arc::new(AtomicU64::new(0));
        let mut stop = killed.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.wait_for(|k| *k) => break,
                };
                let Ok((mut down, _)) = accepted else { break };
                let (kill, sent) = (kill.clone(), sent.clone());
                conns.spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ur, mut uw) = up.split();
                    let (mut dr, mut dw) = down.split();
                    let upward = tokio::io::copy(&mut dr, &mut uw);
                    let downward = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = ur.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            dw.write_all(&buf[..n]).await?;
                            if sent.fetch_add(n as u64, Ordering::AcqRel) + n as u64 >= kill_after {
                                kill.send_replace(true);
                            }
                        }
                    };
                    tokio::select! {
                        _ = upward => {}
                        _ = downward => {}
                    }
                });
            }
            // Dropping the set aborts every relayed connection: the bytes stop mid-body.
            conns.abort_all();
        });
        Relay { addr, killed, task }
    }

    async fn wait_dead(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(60), self.killed.wait_for(|k| *k)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_pull_then_retries_succeed() {
    let upstream = Registry::start(Auth::None);
    let reg = upstream.host();
    push_image(&upstream, "rig/big", "v1", 24 << 20).await;
    let net = MemoryNetwork::new();
    let a = node(&net, "a", &reg, true).await;
    // Killed once 4 MiB of the 24 MiB layer went out.
    let relay = Relay::start(0, a.mirror, 4 << 20).await;
    let port = relay.addr.port();
    let client = Client::new(relay.addr, &reg);
    let reference = format!("{reg}/rig/big:v1");
    let (ok, err) = client.skopeo_copy(&reference, None).await;
    relay.wait_dead().await;
    let last = err.lines().last().unwrap_or("").to_owned();
    println!("client saw, daemon killed mid-blob: ok={ok}: {last}");
    assert!(!ok, "the pull broke with the daemon: {err}");
    assert!(
        records(&a, "manifest").iter().any(|r| r.status == 200),
        "the mirror had answered the manifest:\n{}",
        summary(&a)
    );

    // Retry with the daemon still down: the mirror is refused at the ping, upstream serves.
    let (ok, err) = client.skopeo_copy(&reference, None).await;
    assert!(ok, "retry with the daemon down goes upstream: {err}");

    // The daemon back on its port: a fresh client pulls through it (the layer went on into
    // the cache while the client was gone).
    let _back = Relay::start(port, a.mirror, u64::MAX).await;
    let before = records(&a, "blob").len();
    let fresh = Client::new(_back.addr, &reg);
    let (ok, err) = fresh.skopeo_copy(&reference, None).await;
    assert!(
        ok,
        "retry through the restarted daemon: {err}\n{}",
        summary(&a)
    );
    let blobs: Vec<_> = records(&a, "blob").into_iter().skip(before).collect();
    assert!(
        !blobs.is_empty() && blobs.iter().all(|r| r.status == 200),
        "every blob through the mirror after the restart:\n{}",
        summary(&a)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_from_a_peer_through_the_mirror_with_upstream_stopped() {
    let mut upstream = Registry::start(Auth::None);
    let reg = upstream.host();
    let image = push_image(&upstream, "rig/pod", "v1", 200_000).await;
    let net = MemoryNetwork::new();
    let a = node(&net, "a", &reg, true).await;
    let b = node(&net, "b", &reg, true).await;
    let (ok, err) = Client::new(a.mirror, &reg)
        .podman_pull(&format!("{reg}/rig/pod:v1"))
        .await;
    assert!(ok, "podman through node a: {err}\n{}", summary(&a));
    assert_eq!(
        a.cache.tag(&reg, "rig/pod", "v1").await,
        Some(digest(&image))
    );
    wait_advertised(&b.router, &format!("{reg}/rig/pod:v1"), "a").await;
    upstream.stop();
    let (ok, err) = Client::new(b.mirror, &reg)
        .podman_pull(&format!("{reg}/rig/pod:v1"))
        .await;
    assert!(
        ok,
        "podman through node b, upstream stopped: {err}\n{}",
        summary(&b)
    );
    assert!(
        records(&b, "manifest")
            .iter()
            .any(|r| r.status == 200 && r.served_from == "peer"),
        "{}",
        summary(&b)
    );
}
