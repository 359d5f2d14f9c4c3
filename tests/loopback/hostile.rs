//! Hostile requests against a real mirror endpoint over raw TCP: every one must come back as a
//! clean 4xx (an OCI error body wherever our code answers), the server must survive all of
//! them, and no malformed argument may ever reach the store (containerd in production).
//!
//! Raw TCP on purpose: HTTP clients normalise paths, refuse non-UTF-8 and cap header sizes, so
//! they cannot send what an attacker sends. The store behind the endpoint records every call
//! so the test can check the arguments that got through, and the mirror path (router lookup)
//! is live too, so a bad key would also reach the peer side if the parser let it through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use speculum::oci::path::{parse_ns, valid_name, valid_tag};
use speculum::oci::{ByteRange, Digest};
use speculum::readiness::Readiness;
use speculum::registry::{self, Handler, Mirror, MirrorConfig, RegistryState};
use speculum::routing::Peer;
use speculum::routing::memory::MemoryRouter;
use speculum::server::ServeOptions;
use speculum::server::options as listen;
use speculum::store::memory::MemoryStore;
use speculum::store::{ContentStream, Descriptor, Image, Store, StoreError, StoreEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One argument the store was called with.
#[derive(Debug, Clone)]
enum Call {
    Resolve {
        registry: String,
        repository: String,
        tag: String,
    },
    Descriptor(Digest),
    Open(Digest, Option<ByteRange>),
}

/// A `MemoryStore` that records every call, standing in for containerd.
struct RecordingStore {
    inner: MemoryStore,
    calls: Mutex<Vec<Call>>,
}

impl RecordingStore {
    fn record(&self, call: Call) {
        // A std Mutex is fine: it is never held across an await.
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }
}

#[async_trait]
impl Store for RecordingStore {
    async fn images(&self) -> Result<Vec<Image>, StoreError> {
        self.inner.images().await
    }
    async fn resolve(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<Digest>, StoreError> {
        self.record(Call::Resolve {
            registry: registry.into(),
            repository: repository.into(),
            tag: tag.into(),
        });
        self.inner.resolve(registry, repository, tag).await
    }
    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        self.record(Call::Descriptor(digest.clone()));
        self.inner.descriptor(digest).await
    }
    async fn open(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<ContentStream, StoreError> {
        self.record(Call::Open(digest.clone(), range));
        self.inner.open(digest, range).await
    }
    async fn watch(&self) -> Result<BoxStream<'static, StoreEvent>, StoreError> {
        self.inner.watch().await
    }
}

/// A parsed raw HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `code` of the first entry of an OCI error body, if the body is one.
    fn oci_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("errors")?
            .get(0)?
            .get("code")?
            .as_str()
            .map(str::to_owned)
    }
}

/// Sends `request` verbatim and reads until the server closes (requests carry
/// `Connection: close`), bounded in time and size.
async fn raw(addr: SocketAddr, request: &[u8]) -> Result<Reply, String> {
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The server may answer and close before it has read a huge request; a write error
        // after that is expected, the reply is what counts.
        let _ = s.write_all(request).await;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 1 << 20 {
                        return Err("reply over 1 MiB".to_owned());
                    }
                }
                // A reset after the reply was sent (unread request bytes) still leaves the
                // reply in `buf`.
                Err(_) if !buf.is_empty() => break,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        parse_reply(&buf)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no reply within 10 s".to_owned())?
}

fn parse_reply(buf: &[u8]) -> Result<Reply, String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(buf)))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "non-UTF-8 response head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let mut body = buf[end + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

const NS: &str = "127.0.0.1%3A5000";
const H64: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// What a case must get back.
enum Want {
    /// This status with an OCI error body carrying this code.
    Oci(u16, &'static str),
    /// This status from hyper, before any of our code runs: no body is possible, because
    /// hyper could not parse a request (see `server::listen`; `sendfile` off only).
    Http(u16),
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

fn with_header(method: &str, target: &str, header: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

fn bytes_get(target: &[u8]) -> Vec<u8> {
    let mut r = b"GET ".to_vec();
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    r
}

struct Rig {
    addr: SocketAddr,
    store: Arc<RecordingStore>,
    blob: Digest,
}

async fn start(options: ServeOptions) -> Rig {
    let inner = MemoryStore::new();
    let blob = inner.add_blob(vec![7u8; 1000]);
    let store = Arc::new(RecordingStore {
        inner,
        calls: Mutex::new(Vec::new()),
    });
    let metrics = speculum::registry::RegistryMetrics::default();
    // No peers hold anything: every lookup that gets through misses and answers 404.
    let mirror = Mirror::new(
        Arc::new(MemoryRouter::with_static(
            HashMap::<String, Vec<Peer>>::new(),
        )),
        MirrorConfig::default(),
        metrics.clone(),
    )
    .expect("mirror client");
    let app = registry::app(RegistryState {
        store: store.clone(),
        mirror: Some(Arc::new(mirror)),
        cache: None,
        metrics,
        readiness: Readiness::new(),
        handler: Handler::Mirror,
        serving: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The daemon's own serving loop: its header limits are part of what is tested.
    // Refusals get the registry's OCI body, as in the daemon (`RegistryConfig::serve_options`).
    let options = ServeOptions {
        refuse: registry::refusal,
        ..options
    };
    tokio::spawn(speculum::server::serve(
        listener,
        app,
        options,
        std::future::pending::<()>(),
    ));
    Rig { addr, store, blob }
}

/// The cases; `ours` says whether our own parser reads the heads (`sendfile` on) or hyper
/// does (off), which only changes what the unparseable and oversized ones get back.
fn cases(blob: &Digest, ours: bool) -> Vec<(&'static str, Vec<u8>, Want)> {
    use Want::*;
    let long_name = "a".repeat(300);
    let long_tag = format!("t{}", "a".repeat(128));
    let huge_path = format!("/v2/{}/manifests/x", "a/".repeat(4000));
    let blob_path = format!("/v2/a/blobs/{blob}");
    let headers = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };
    let many_headers = headers(200);
    let too_many_for_hyper = headers(listen::HYPER_MAX_HEADERS + 50);
    // Refusals only hyper makes when it parses: bare; ours carry an OCI body.
    let beyond_hyper = |status: u16| {
        if ours {
            Oci(status, "UNSUPPORTED")
        } else {
            Http(status)
        }
    };
    vec![
        // Path traversal and odd path shapes: the name grammar refuses all of them.
        (
            "dotdot in name",
            get("/v2/a/../../etc/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "dotdot only name",
            get("/v2/../manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "encoded dotdot",
            get("/v2/a/%2e%2e/b/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "encoded slash",
            get("/v2/a%2Fb/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "encoded slash lowercase",
            get(&format!("/v2/a%2fb/blobs/sha256:{H64}")),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "double slash",
            get("/v2/a//b/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "encoded NUL in name",
            get("/v2/a%00/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "unicode name",
            get("/v2/%C3%A9/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "uppercase name",
            get("/v2/Library/alpine/manifests/x"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "overlong name",
            get(&format!("/v2/{long_name}/manifests/x")),
            Oci(400, "NAME_INVALID"),
        ),
        ("huge path", get(&huge_path), Oci(400, "NAME_INVALID")),
        (
            "not a v2 path",
            get("/v1/a/manifests/x"),
            Oci(404, "NAME_UNKNOWN"),
        ),
        (
            "traversal in blob ref",
            get("/v2/a/blobs/..%2f..%2fetc%2fpasswd"),
            Oci(400, "DIGEST_INVALID"),
        ),
        // Digests: algorithm, length, case, encoding.
        (
            "digest md5",
            get(&format!("/v2/a/blobs/md5:{H64}")),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest short",
            get("/v2/a/blobs/sha256:abc"),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest long",
            get(&format!("/v2/a/blobs/sha256:{H64}0")),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest uppercase hex",
            get(&format!("/v2/a/blobs/sha256:{}", H64.to_uppercase())),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest sha512 short",
            get(&format!("/v2/a/blobs/sha512:{H64}")),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest empty algorithm",
            get(&format!("/v2/a/blobs/:{H64}")),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest empty hex",
            get("/v2/a/blobs/sha256:"),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest traversal",
            get("/v2/a/blobs/sha256:..%2f..%2fx"),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest plus algorithm",
            get(&format!("/v2/a/manifests/sha256+b64:{H64}")),
            Oci(400, "DIGEST_INVALID"),
        ),
        (
            "digest percent-encoded colon",
            get(&format!("/v2/a/blobs/sha256%3A{H64}")),
            Oci(400, "DIGEST_INVALID"),
        ),
        // Tags.
        (
            "overlong tag",
            get(&format!("/v2/a/manifests/{long_tag}?ns={NS}")),
            Oci(400, "MANIFEST_UNKNOWN"),
        ),
        (
            "tag dotdot",
            get(&format!("/v2/a/manifests/..?ns={NS}")),
            Oci(400, "MANIFEST_UNKNOWN"),
        ),
        (
            "tag bad char",
            get(&format!("/v2/a/manifests/t$g?ns={NS}")),
            Oci(400, "MANIFEST_UNKNOWN"),
        ),
        (
            "tag non-UTF-8 escape",
            get(&format!("/v2/a/manifests/%ff?ns={NS}")),
            Oci(400, "MANIFEST_UNKNOWN"),
        ),
        // The `ns` parameter.
        (
            "ns with slash",
            get("/v2/a/manifests/t?ns=evil.com%2Fx"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns with userinfo",
            get("/v2/a/manifests/t?ns=u%40evil.com"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns twice",
            get("/v2/a/manifests/t?ns=a.io&ns=b.io"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns port zero",
            get("/v2/a/manifests/t?ns=a.io%3A0"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns non-UTF-8",
            get("/v2/a/manifests/t?ns=%ff%fe"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns broken escape",
            get("/v2/a/manifests/t?ns=a%2"),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns overlong",
            get(&format!("/v2/a/manifests/t?ns={}", "a".repeat(300))),
            Oci(400, "NAME_INVALID"),
        ),
        (
            "ns empty",
            get("/v2/a/manifests/t?ns="),
            Oci(400, "NAME_INVALID"),
        ),
        // Found by the pull_request fuzz target: `[::]\r:5000` used to pass (anything after
        // the bracket was ignored) and put a CR into the routing key and the peer URL.
        (
            "ns v6 with trailing CR",
            get("/v2/a/manifests/t?ns=%5B%3A%3A%5D%0D%3A5000"),
            Oci(400, "NAME_INVALID"),
        ),
        // Ranges (RFC 9110 14.1.2): one range only, well formed, satisfiable.
        (
            "multi-range",
            with_header("GET", &blob_path, "Range: bytes=0-1,5-9"),
            Oci(416, "RANGE_INVALID"),
        ),
        (
            "inverted range",
            with_header("GET", &blob_path, "Range: bytes=9-1"),
            Oci(416, "RANGE_INVALID"),
        ),
        (
            "range wrong unit",
            with_header("GET", &blob_path, "Range: items=0-1"),
            Oci(416, "RANGE_INVALID"),
        ),
        (
            "range overflow",
            with_header("GET", &blob_path, "Range: bytes=0-999999999999999999999999"),
            Oci(416, "RANGE_INVALID"),
        ),
        (
            "range past end",
            with_header("GET", &blob_path, "Range: bytes=5000-"),
            Oci(416, "RANGE_INVALID"),
        ),
        (
            "range negative",
            with_header("GET", &blob_path, "Range: bytes=--5"),
            Oci(416, "RANGE_INVALID"),
        ),
        (
            "range non-UTF-8",
            {
                let mut r = format!("GET {blob_path} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=\u{ff}-1\r\nConnection: close\r\n\r\n").into_bytes();
                // Replace the UTF-8 encoding of U+00FF with a lone 0xFF byte.
                if let Some(p) = r.windows(2).position(|w| w == [0xc3, 0xbf]) {
                    r.splice(p..p + 2, [0xff]);
                }
                r
            },
            Oci(416, "RANGE_INVALID"),
        ),
        // Methods: pull-only.
        (
            "POST upload",
            with_header("POST", "/v2/a/blobs/uploads/", "Content-Length: 0"),
            Oci(405, "UNSUPPORTED"),
        ),
        (
            "PUT manifest",
            with_header("PUT", "/v2/a/manifests/t", "Content-Length: 2\r\n\r\n{}"),
            Oci(405, "UNSUPPORTED"),
        ),
        (
            "DELETE blob",
            with_header("DELETE", &blob_path, "Content-Length: 0"),
            Oci(405, "UNSUPPORTED"),
        ),
        (
            "PATCH",
            with_header("PATCH", "/v2/a/blobs/uploads/x", "Content-Length: 0"),
            Oci(405, "UNSUPPORTED"),
        ),
        // Header limits: ours (100 fields, 64 KiB) answer with an OCI body; hyper's, raised
        // above ours, only catch what does not even fit its buffer.
        (
            "huge header",
            with_header(
                "GET",
                &blob_path,
                &format!("X-Big: {}", "a".repeat(512 * 1024)),
            ),
            Oci(431, "UNSUPPORTED"),
        ),
        (
            "header just over our limit",
            with_header(
                "GET",
                &blob_path,
                &format!("X-Big: {}", "a".repeat(listen::MAX_HEADER_BYTES)),
            ),
            Oci(431, "UNSUPPORTED"),
        ),
        (
            "too many headers",
            with_header("GET", &blob_path, many_headers.trim_end()),
            Oci(431, "UNSUPPORTED"),
        ),
        // Beyond hyper's own limits: hyper answers before any request exists; with
        // `registry.sendfile` on, our own parser (`server::http1`) reads every GET head first
        // and refuses these with an OCI body too.
        (
            "header beyond hyper's buffer",
            with_header(
                "GET",
                &blob_path,
                &format!("X-Big: {}", "a".repeat(listen::HYPER_MAX_BUF + 1024)),
            ),
            beyond_hyper(431),
        ),
        (
            "headers beyond hyper's count",
            with_header("GET", &blob_path, too_many_for_hyper.trim_end()),
            beyond_hyper(431),
        ),
        // Unparseable request lines: there is no request to route; hyper answers a bare 400,
        // our parser an OCI one.
        (
            "raw non-UTF-8 path",
            bytes_get(b"/v2/\xff\xfe/manifests/x"),
            beyond_hyper(400),
        ),
        (
            "raw space in path",
            bytes_get(b"/v2/a b/manifests/x"),
            beyond_hyper(400),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clean_4xx_and_never_reach_the_store() {
    hostile_requests(ServeOptions::default()).await;
}

/// The same with `registry.sendfile` off: hyper parses every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_through_hyper_only() {
    hostile_requests(ServeOptions {
        sendfile: false,
        ..ServeOptions::default()
    })
    .await;
}

async fn hostile_requests(options: ServeOptions) {
    let rig = start(options).await;
    let cases = cases(&rig.blob, options.sendfile);
    assert!(cases.len() >= 30, "the issue asks for at least 30 cases");
    let mut failures = Vec::new();
    for (name, request, want) in &cases {
        let reply = match raw(rig.addr, request).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        match want {
            Want::Oci(status, code) => {
                if reply.status != *status || reply.oci_code().as_deref() != Some(code) {
                    failures.push(format!(
                        "{name}: want {status} {code}, got {} {:?} body {:?}",
                        reply.status,
                        reply.oci_code(),
                        String::from_utf8_lossy(&reply.body)
                    ));
                }
                if reply.header("content-type") != Some("application/json") {
                    failures.push(format!(
                        "{name}: error body content-type {:?}",
                        reply.header("content-type")
                    ));
                }
            }
            Want::Http(status) => {
                if reply.status != *status {
                    failures.push(format!("{name}: want {status}, got {}", reply.status));
                }
            }
        }
        // After every hostile request the server still answers a good one.
        match raw(rig.addr, &get(&format!("/v2/a/blobs/{}", rig.blob))).await {
            Ok(r) if r.status == 200 && r.body.len() == 1000 => {}
            other => failures.push(format!("{name}: server unhealthy afterwards: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Only well-formed arguments ever reached the store.
    let calls = rig
        .store
        .calls
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    for call in &calls {
        match call {
            Call::Resolve {
                registry,
                repository,
                tag,
            } => {
                assert!(
                    parse_ns(registry).is_ok(),
                    "resolve with registry {registry:?}"
                );
                assert!(
                    valid_name(repository),
                    "resolve with repository {repository:?}"
                );
                assert!(valid_tag(tag), "resolve with tag {tag:?}");
            }
            Call::Descriptor(d) | Call::Open(d, _) => {
                assert_eq!(
                    d.to_string().parse::<Digest>().ok().as_ref(),
                    Some(d),
                    "non-canonical digest reached the store"
                );
            }
        }
        if let Call::Open(_, Some(r)) = call {
            assert!(
                r.start <= r.end && r.end < 1000,
                "bad range reached the store: {r:?}"
            );
        }
    }
}

/// A client that opens connections and sends nothing, or half a request, must not stop the
/// server from answering others (bounded: 200 idle connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_truncated_connections_do_not_starve_others() {
    let rig = start(ServeOptions::default()).await;
    let mut held = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(rig.addr).await.expect("connect");
        if i % 2 == 0 {
            let _ = s.write_all(b"GET /v2/a/blobs/sha256:").await;
        }
        held.push(s);
    }
    let r = raw(rig.addr, &get(&format!("/v2/a/blobs/{}", rig.blob)))
        .await
        .expect("reply while 200 connections are idle");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1000);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(rig.blob.to_string().as_str())
    );
    drop(held);
}
