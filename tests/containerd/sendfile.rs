//! Blob bodies sent with `sendfile(2)` (`server::http1`) from a real containerd content
//! store, over real sockets on `127.0.0.1:0`: the bytes and headers are those of the streaming
//! path (the same server with `sendfile` off), ranges and HEAD included; keep-alive and
//! pipelining mix sendfile bodies with every other kind of response; a client that leaves or
//! stops reading mid-body gets an audit record with the bytes really sent and costs the server
//! nothing else; shutdown finishes the body in flight.
//!
//! Needs `/usr/bin/containerd` and `ctr`, and root. Run: `cargo test --test containerd sendfile::`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use speculum::audit::AuditRecord;
use speculum::audit::memory::MemorySink;
use speculum::metrics::Metrics;
use speculum::policy::Gate;
use speculum::readiness::Readiness;
use speculum::registry::{self, Guard, Handler, RegistryState};
use speculum::server::{self as listen, ServeOptions};
use speculum::store::containerd::{ContainerdConfig, ContainerdStore};
use speculum::tenancy::Tenancy;
use testkit::containerd::Containerd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Big enough that a client that stops reading leaves most of it unsent, whatever the
/// socket buffers on loopback grow to (a few MiB each way).
const BLOB_BYTES: usize = 32 * 1024 * 1024;
/// Bounded polling: how long an expected audit record may take to appear.
const WITHIN: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
/// A client receive buffer small enough that the server cannot park the whole blob in it.
const SMALL_RCVBUF: u32 = 64 * 1024;

/// A private containerd holding one large blob and one manifest.
struct Fixture {
    _dir: tempfile::TempDir,
    rig: Containerd,
    blob: Vec<u8>,
    blob_digest: String,
    manifest: Vec<u8>,
    manifest_digest: String,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic bytes that do not compress or repeat (xorshift).
fn blob_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

async fn ingest(rig: &Containerd, dir: &std::path::Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let path = dir.join(digest.replace(':', "-"));
    std::fs::write(&path, bytes).expect("write blob");
    let size = bytes.len().to_string();
    let mut cmd = tokio::process::Command::from(rig.ctr_command(&[
        "content",
        "ingest",
        "--expected-size",
        &size,
        "--expected-digest",
        &digest,
        &format!("test-{digest}"),
    ]));
    cmd.stdin(Stdio::from(std::fs::File::open(&path).expect("open blob")))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("ctr ingest in time")
        .expect("ctr runs");
    assert!(
        out.status.success(),
        "ctr content ingest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    digest
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let rig = Containerd::start(dir.path()).expect("private containerd starts");
    let blob = blob_bytes(BLOB_BYTES);
    let blob_digest = ingest(&rig, dir.path(), &blob).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": blob_digest,
            "size": BLOB_BYTES,
        },
        "layers": [],
    }))
    .expect("manifest json");
    let manifest_digest = ingest(&rig, dir.path(), &manifest).await;
    Fixture {
        _dir: dir,
        rig,
        blob,
        blob_digest,
        manifest,
        manifest_digest,
    }
}

/// A peer endpoint over `fixture`'s containerd, reading content files, with an audit sink.
struct Server {
    addr: SocketAddr,
    audit: MemorySink,
    metrics: Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn server(f: &Fixture, options: ServeOptions) -> Server {
    let store = ContainerdStore::new(ContainerdConfig {
        content_dir: Some(f.rig.content_dir.clone()),
        ..f.rig.store_config()
    })
    .expect("store");
    let audit = MemorySink::new();
    let metrics = Metrics::new();
    let app = registry::app_with(
        RegistryState {
            store: Arc::new(store),
            mirror: None,
            cache: None,
            metrics: metrics.registry.clone(),
            readiness: Readiness::new(),
            handler: Handler::Peer,
            serving: Default::default(),
        },
        Guard {
            gate: Gate::allow_all(),
            audit: Arc::new(audit.clone()),
            node: "test".to_owned(),
            tenancy: Tenancy::default(),
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        refuse: registry::refusal,
        ..options
    };
    let task = tokio::spawn(listen::serve(listener, app, options, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        audit,
        metrics,
        stop: Some(stop),
        task,
    }
}

fn on() -> ServeOptions {
    ServeOptions::default()
}

fn off() -> ServeOptions {
    ServeOptions {
        sendfile: false,
        ..ServeOptions::default()
    }
}

/// One response read off a connection.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lower-case names, in order, without `date` (it differs between any two responses).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The header set, sorted: what must not differ between the two writers.
    fn header_set(&self) -> Vec<(String, String)> {
        let mut h = self.headers.clone();
        h.sort();
        h
    }
}

/// A client connection that reads responses one by one (content-length framing).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    /// A connection whose receive buffer is small, so the server cannot send ahead much.
    async fn open_small(addr: SocketAddr) -> Conn {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(SMALL_RCVBUF).expect("rcvbuf");
        Conn {
            stream: socket.connect(addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) {
        self.stream
            .write_all(raw.as_bytes())
            .await
            .expect("send request");
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = vec![0u8; 256 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
            .await
            .expect("server answers in time")
            .expect("read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response head, and its body unless `head_only`.
    async fn reply(&mut self, head_only: bool) -> Reply {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            assert!(self.fill().await > 0, "connection closed before a response");
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).expect("ascii head");
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .filter(|(k, _)| k != "date")
            .collect();
        let len: usize = if head_only {
            0
        } else {
            headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .expect("content-length on every response")
        };
        while self.buf.len() < len {
            assert!(self.fill().await > 0, "connection closed mid-body");
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// True when the server closed the connection (EOF) within [`WITHIN`].
    async fn closed(&mut self) -> bool {
        let deadline = Instant::now() + WITHIN;
        let mut chunk = [0u8; 4096];
        while Instant::now() < deadline {
            match tokio::time::timeout(POLL * 10, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) | Err(_) => {}
            }
        }
        false
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n")
}

fn head(path: &str) -> String {
    format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n")
}

fn range(r: &str) -> String {
    format!("Range: bytes={r}\r\n")
}

/// Waits for the audit record of a `GET` of `digest` with `status`, bounded.
async fn record(audit: &MemorySink, digest: &str, status: u16) -> AuditRecord {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(r) = audit.records().into_iter().find(|r| {
            r.method == "GET" && r.status == status && r.digest.as_deref() == Some(digest)
        }) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record for {digest} {status}: {:?}",
            audit.records()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn sendfile_bytes(s: &Server) -> u64 {
    s.metrics.registry.sendfile_bytes().get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_and_headers_match_the_streaming_path() {
    let f = fixture().await;
    let with = server(&f, on()).await;
    let without = server(&f, off()).await;
    let n = f.blob.len();
    let blob = format!("/v2/a/blobs/{}", f.blob_digest);
    // (name, request, HEAD?, want status, want body)
    let cases: Vec<(&str, String, bool, u16, &[u8])> = vec![
        ("full", get(&blob, ""), false, 200, &f.blob[..]),
        (
            "first byte",
            get(&blob, &range("0-0")),
            false,
            206,
            &f.blob[..1],
        ),
        (
            "last byte",
            get(&blob, &range(&format!("{}-{}", n - 1, n - 1))),
            false,
            206,
            &f.blob[n - 1..],
        ),
        (
            "middle",
            get(&blob, &range("1000-2999999")),
            false,
            206,
            &f.blob[1000..3_000_000],
        ),
        (
            "suffix",
            get(&blob, &range("-4097")),
            false,
            206,
            &f.blob[n - 4097..],
        ),
        (
            "open end",
            get(&blob, &range("5000000-")),
            false,
            206,
            &f.blob[5_000_000..],
        ),
        (
            "end past the end",
            get(&blob, &range(&format!("{}-{}", n - 10, n + 100))),
            false,
            206,
            &f.blob[n - 10..],
        ),
        ("head", head(&blob), true, 200, b""),
        (
            "manifest",
            get(&format!("/v2/a/manifests/{}", f.manifest_digest), ""),
            false,
            200,
            &f.manifest[..],
        ),
    ];
    // One connection per server for the whole table: keep-alive across sendfile bodies.
    let mut a = Conn::open(with.addr).await;
    let mut b = Conn::open(without.addr).await;
    for (name, request, head_only, status, body) in &cases {
        a.send(request).await;
        b.send(request).await;
        let (ra, rb) = (a.reply(*head_only).await, b.reply(*head_only).await);
        assert_eq!(ra.status, *status, "{name}: status");
        assert_eq!(
            sha256(&ra.body),
            sha256(body),
            "{name}: sendfile body differs from the blob"
        );
        assert_eq!(
            sha256(&rb.body),
            sha256(body),
            "{name}: streamed body differs from the blob"
        );
        assert_eq!(ra.header_set(), rb.header_set(), "{name}: headers differ");
    }
    let r = {
        a.send(&head(&blob)).await;
        a.reply(true).await
    };
    assert_eq!(r.header("content-length"), Some(n.to_string().as_str()));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(f.blob_digest.as_str())
    );
    let bodies: u64 = cases
        .iter()
        .filter(|c| !c.2)
        .map(|c| c.4.len() as u64)
        .sum();
    assert_eq!(
        sendfile_bytes(&with),
        bodies,
        "every body went out by sendfile"
    );
    assert_eq!(
        sendfile_bytes(&without),
        0,
        "switch off: nothing by sendfile"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_pipelining_mix_every_kind_of_response() {
    let f = fixture().await;
    let s = server(&f, on()).await;
    let blob = format!("/v2/a/blobs/{}", f.blob_digest);
    let unknown = format!("/v2/a/blobs/sha256:{}", "0".repeat(64));
    let manifest = format!("/v2/a/manifests/{}", f.manifest_digest);
    // (request, HEAD?, want status, want body: None = only the status is checked)
    let steps: Vec<(String, bool, u16, Option<&[u8]>)> = vec![
        (get(&blob, ""), false, 200, Some(&f.blob[..])),
        (get("/v2/", ""), false, 200, Some(b"{}")),
        (get(&unknown, ""), false, 404, None),
        (get(&manifest, ""), false, 200, Some(&f.manifest[..])),
        (head(&blob), true, 200, Some(b"")),
        (
            get(&blob, &range("7-70000")),
            false,
            206,
            Some(&f.blob[7..70001]),
        ),
        (get("/v2/a/tags/list", ""), false, 404, None),
        (
            get(&blob, &range("-1")),
            false,
            206,
            Some(&f.blob[f.blob.len() - 1..]),
        ),
        // A method only hyper answers: the connection is handed over mid-way and goes on.
        (
            format!("DELETE {blob} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"),
            false,
            405,
            None,
        ),
        (get(&blob, &range("0-99")), false, 206, Some(&f.blob[..100])),
    ];

    // Sequential: one request, one response.
    let mut c = Conn::open(s.addr).await;
    for (i, (request, head_only, status, body)) in steps.iter().enumerate() {
        c.send(request).await;
        let r = c.reply(*head_only).await;
        assert_eq!(r.status, *status, "step {i}");
        if let Some(body) = body {
            assert_eq!(sha256(&r.body), sha256(body), "step {i}: body");
        }
    }

    // Pipelined: every request in one write, the responses in order.
    let mut c = Conn::open(s.addr).await;
    let all: String = steps.iter().map(|s| s.0.as_str()).collect();
    c.send(&all).await;
    for (i, (_, head_only, status, body)) in steps.iter().enumerate() {
        let r = c.reply(*head_only).await;
        assert_eq!(r.status, *status, "pipelined step {i}");
        if let Some(body) = body {
            assert_eq!(sha256(&r.body), sha256(body), "pipelined step {i}: body");
        }
    }

    // `Connection: close` is honoured after a sendfile body.
    let mut c = Conn::open(s.addr).await;
    c.send(&get(
        &blob,
        &format!("{}Connection: close\r\n", range("0-9")),
    ))
    .await;
    let r = c.reply(false).await;
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        c.closed().await,
        "connection closed after Connection: close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_body_is_audited_with_the_bytes_sent() {
    let f = fixture().await;
    let s = server(&f, on()).await;
    let blob = format!("/v2/a/blobs/{}", f.blob_digest);
    let mut c = Conn::open_small(s.addr).await;
    c.send(&get(&blob, "")).await;
    while c.buf.len() < 1024 * 1024 {
        assert!(c.fill().await > 0, "server sends");
    }
    drop(c);
    let r = record(&s.audit, &f.blob_digest, 200).await;
    assert!(
        r.bytes > 0 && r.bytes < BLOB_BYTES as u64,
        "partial byte count, got {}",
        r.bytes
    );
    assert_eq!(r.served_from, "local");
    assert_eq!(sendfile_bytes(&s), r.bytes, "metric and record agree");

    // The server goes on serving others.
    let mut c = Conn::open(s.addr).await;
    c.send(&get(&blob, "")).await;
    assert_eq!(sha256(&c.reply(false).await.body), f.blob_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_write_stall_timeout() {
    let f = fixture().await;
    let s = server(
        &f,
        ServeOptions {
            write_stall: Duration::from_secs(1),
            ..on()
        },
    )
    .await;
    let blob = format!("/v2/a/blobs/{}", f.blob_digest);
    let mut stuck = Conn::open_small(s.addr).await;
    stuck.send(&get(&blob, "")).await;
    // Never read: the server's writes stall once the buffers are full.
    let r = record(&s.audit, &f.blob_digest, 200).await;
    assert!(
        r.bytes < BLOB_BYTES as u64,
        "abandoned with a partial count, got {}",
        r.bytes
    );
    assert!(stuck.closed().await, "the stalled connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_body_in_flight_and_closes_idle_connections() {
    let f = fixture().await;
    let mut s = server(&f, on()).await;
    let blob = format!("/v2/a/blobs/{}", f.blob_digest);
    let mut idle = Conn::open(s.addr).await;
    idle.send(&get("/v2/", "")).await;
    assert_eq!(idle.reply(false).await.status, 200);

    let mut busy = Conn::open_small(s.addr).await;
    busy.send(&get(&blob, "")).await;
    while busy.buf.len() < 64 * 1024 {
        assert!(busy.fill().await > 0, "server sends");
    }
    if let Some(stop) = s.stop.take() {
        let _ = stop.send(());
    }
    assert!(
        idle.closed().await,
        "an idle keep-alive connection closes on shutdown"
    );
    let r = busy.reply(false).await;
    assert_eq!(
        sha256(&r.body),
        f.blob_digest,
        "the body in flight is whole"
    );
    assert_eq!(
        r.header("connection"),
        None,
        "its head went out before shutdown"
    );
    assert!(busy.closed().await, "then the connection closes");
    tokio::time::timeout(WITHIN, &mut s.task)
        .await
        .expect("serve returns once all connections are closed")
        .expect("task")
        .expect("serve");
}

/// Whether the page of `file` at `offset` is in the page cache (a `RWF_NOWAIT` read of it
/// does not have to wait).
fn page_cached(file: &std::fs::File, offset: u64) -> bool {
    let mut byte = [0u8; 1];
    !matches!(
        rustix::io::preadv2(
            file,
            &mut [std::io::IoSliceMut::new(&mut byte)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        ),
        Err(rustix::io::Errno::AGAIN)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_out_of_the_page_cache_is_read_off_the_runtime_and_sent_whole() {
    let f = fixture().await;
    let s = server(&f, on()).await;
    let hex = f.blob_digest.trim_start_matches("sha256:");
    let path = f.rig.content_dir.join("blobs/sha256").join(hex);
    let evict = || {
        let file = std::fs::File::open(&path).expect("blob file");
        file.sync_all().expect("sync");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
        file
    };
    let file = evict();
    if page_cached(&file, 0) {
        // tmpfs and some overlay setups keep the pages: then only the bytes are checked.
        eprintln!("note: the blob's pages stayed cached; the warm-up path is not exercised");
    }
    let blob = format!("/v2/a/blobs/{}", f.blob_digest);
    let mut c = Conn::open(s.addr).await;
    c.send(&get(&blob, "")).await;
    assert_eq!(
        sha256(&c.reply(false).await.body),
        f.blob_digest,
        "whole blob"
    );
    drop(evict());
    c.send(&get(&blob, &range("3000000-9000000"))).await;
    let r = c.reply(false).await;
    assert_eq!(r.status, 206);
    assert_eq!(
        sha256(&r.body),
        sha256(&f.blob[3_000_000..=9_000_000]),
        "range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed_after_the_idle_timeout() {
    let f = fixture().await;
    for (mode, options) in [("sendfile on", on()), ("sendfile off (hyper)", off())] {
        let s = server(
            &f,
            ServeOptions {
                idle: Duration::from_secs(1),
                ..options
            },
        )
        .await;
        // Silent from the start: never sends a byte.
        let mut silent = Conn::open(s.addr).await;
        // Trickling: a head that never completes, one byte at a time.
        let mut trickle = Conn::open(s.addr).await;
        trickle.send("GET /v2/ HTTP/1.1\r\nX-Slow: ").await;
        // Kept alive after one answered request, then idle.
        let mut idle = Conn::open(s.addr).await;
        idle.send(&get("/v2/", "")).await;
        assert_eq!(idle.reply(false).await.status, 200, "{mode}: served first");
        let trickler = tokio::spawn(async move {
            // Bounded: 40 bytes, well past the 1 s bound, stops at the first failed write.
            for _ in 0..40 {
                if trickle.stream.write_all(b"a").await.is_err() {
                    break;
                }
                tokio::time::sleep(POLL * 5).await;
            }
            trickle
        });
        assert!(
            silent.closed().await,
            "{mode}: a silent connection is closed"
        );
        assert!(
            idle.closed().await,
            "{mode}: an idle keep-alive connection is closed"
        );
        let mut trickle = trickler.await.expect("trickler");
        assert!(trickle.closed().await, "{mode}: a trickled head is cut off");
        // A client that asks in time is served as usual.
        let mut prompt = Conn::open(s.addr).await;
        prompt.send(&get("/v2/", "")).await;
        assert_eq!(
            prompt.reply(false).await.status,
            200,
            "{mode}: prompt client served"
        );
    }
}
