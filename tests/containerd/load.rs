//! Load on one real daemon: 1,000 concurrent keep-alive connections, 10 requests each (10 k in
//! all) mixing manifests by digest and tag, HEADs, small blobs, a 1 MiB blob and ranges of it,
//! all served from a real private containerd. Every reply is checked (status, length, bytes);
//! the test records latency percentiles and the daemon's peak RSS, and runs the load twice to
//! check that memory returns to the pre-load baseline once the clients are gone, every round
//! (glibc malloc kept ~70 MiB of freed arena memory here; the daemon's jemalloc purges it).
//!
//! Bounded everywhere: a fixed request count, a per-request and a whole-run timeout, and a
//! bounded poll for memory. Needs root and containerd, like tests/containerd/daemon.rs.
//! Run: `make load` (prints the numbers) or `cargo test --test containerd load:: -- --nocapture`.
//! `SPECULUM_LOAD_REPORT=<file>` appends the result as one JSON line.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use speculum::oci::Digest;
use speculum::store::conformance::{Fixture, Seeder, pseudo_random};
use testkit::containerd::Containerd;
use testkit::daemon::Daemon;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CONNECTIONS: usize = 1_000;
const PER_CONNECTION: usize = 10;
const BIG: usize = 1024 * 1024;
const REGISTRY: &str = "127.0.0.1:5000";
/// Whole-run bound: generous for a debug build on 2 shared cores.
const RUN_WITHIN: Duration = Duration::from_secs(240);
/// "Back at the baseline": RSS at most this far above the pre-load figure. Measured with
/// jemalloc: +7–12 MiB after 9–22 s (tokio's idle blocking threads, connection-table slack);
/// glibc malloc stayed at +45–75 MiB for good (ROBUSTNESS.md §4).
const RSS_RETURN_SLACK_KIB: u64 = 16 * 1024;
/// How long memory may take to go back: jemalloc's dirty pages decay over 10 s, purged by its
/// background threads.
const RSS_RETURN_WITHIN: Duration = Duration::from_secs(60);

/// 1,000 sockets on each side may exceed a default soft limit of 1024 descriptors; raise it for
/// `pid` (best effort: where it cannot be raised, the run reports connect errors).
fn raise_nofile(pid: u32) {
    let _ = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=65536:65536"])
        .stderr(Stdio::null())
        .status();
}

/// One request of the mix, with what its reply must be.
#[derive(Clone)]
struct Probe {
    label: &'static str,
    head: bool,
    path: String,
    range: Option<(u64, u64)>,
    /// Expected body (for HEAD: only its length is checked).
    body: Arc<Vec<u8>>,
}

/// A minimal HTTP/1.1 keep-alive exchange: sends one request and reads exactly one reply.
async fn exchange(
    conn: &mut BufReader<TcpStream>,
    probe: &Probe,
) -> Result<(u16, Vec<u8>), String> {
    let method = if probe.head { "HEAD" } else { "GET" };
    let range = probe
        .range
        .map(|(a, b)| format!("Range: bytes={a}-{b}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: speculum-load\r\n{range}\r\n",
        probe.path
    );
    conn.get_mut()
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    conn.read_line(&mut line)
        .await
        .map_err(|e| format!("status line: {e}"))?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = None;
    loop {
        line.clear();
        let n = conn
            .read_line(&mut line)
            .await
            .map_err(|e| format!("header: {e}"))?;
        if n == 0 {
            return Err("connection closed in headers".into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let length = length.ok_or("no content-length")?;
    if probe.head {
        // No body follows a HEAD; the length stands in for it in the check.
        return Ok((status, vec![0; length]));
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok((status, body))
}

fn check(probe: &Probe, status: u16, body: &[u8]) -> Result<(), String> {
    let (want_status, want): (u16, &[u8]) = match probe.range {
        Some((a, b)) => (206, &probe.body[a as usize..=b as usize]),
        None => (200, &probe.body),
    };
    if status != want_status {
        return Err(format!("{}: status {status}", probe.label));
    }
    if body.len() != want.len() {
        return Err(format!(
            "{}: {} bytes, want {}",
            probe.label,
            body.len(),
            want.len()
        ));
    }
    if !probe.head && body != want {
        return Err(format!("{}: wrong bytes", probe.label));
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Puts `data` into containerd's content store as the only layer of an image, so the GC keeps
/// it (bare `ctr content ingest` leaves unreferenced content the GC may drop at once).
fn ingest(rig: &Containerd, dir: &Path, data: &[u8]) -> Digest {
    let digest = Digest::sha256_of(data);
    let layout = dir.join("big-layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    let put = |bytes: &[u8]| -> (Digest, usize) {
        let d = Digest::sha256_of(bytes);
        std::fs::write(blobs.join(d.hex()), bytes).expect("write blob");
        (d, bytes.len())
    };
    put(data);
    let (config, config_len) =
        put(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config.to_string(), "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest.to_string(), "size": data.len()}],
    })
    .to_string();
    let (m, m_len) = put(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": m.to_string(), "size": m_len,
                       "annotations": {"io.containerd.image.name": format!("{REGISTRY}/load/big:v1")}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let tar = dir.join("big-layout.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&layout)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(status.success(), "tar failed");
    rig.ctr(&[
        "images",
        "import",
        "--all-platforms",
        "--no-unpack",
        &tar.display().to_string(),
    ])
    .expect("ctr images import");
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_connections_ten_thousand_requests() {
    raise_nofile(std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let rig = Containerd::start(dir.path()).expect("containerd");
    let fixture = Fixture::new(REGISTRY);
    rig.seeder().seed(&fixture).await.expect("seed");
    let big = pseudo_random(0x2545_f491_4f6c_dd1d, BIG);
    let big_digest = ingest(&rig, dir.path(), &big);
    let big = Arc::new(big);
    let d = Daemon::start(&rig, dir.path(), &[]);
    raise_nofile(d.child.id());

    // Ready (bounded poll).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(format!("http://{}/readyz", d.metrics))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let image = &fixture.images[0];
    let (repo, tag) = image
        .name
        .strip_prefix(&format!("{REGISTRY}/"))
        .and_then(|r| r.rsplit_once(':'))
        .expect("fixture names are registry/repo:tag");
    let bytes = |b: &speculum::store::conformance::Blob| Arc::new(b.bytes.to_vec());
    let manifest = &fixture.oci_manifest;
    let layer = &fixture.oci_layers[0];
    let mix: Vec<Probe> = vec![
        Probe {
            label: "manifest by digest",
            head: false,
            path: format!(
                "/v2/{repo}/manifests/{}?ns=127.0.0.1%3A5000",
                manifest.digest
            ),
            range: None,
            body: bytes(manifest),
        },
        Probe {
            label: "index by digest",
            head: false,
            path: format!("/v2/{repo}/manifests/{}", fixture.oci_index.digest),
            range: None,
            body: bytes(&fixture.oci_index),
        },
        Probe {
            label: "HEAD manifest by tag",
            head: true,
            path: format!("/v2/{repo}/manifests/{tag}?ns=127.0.0.1%3A5000"),
            range: None,
            body: bytes(&image.target),
        },
        Probe {
            label: "GET manifest by tag",
            head: false,
            path: format!("/v2/{repo}/manifests/{tag}?ns=127.0.0.1%3A5000"),
            range: None,
            body: bytes(&image.target),
        },
        Probe {
            label: "config blob",
            head: false,
            path: format!("/v2/{repo}/blobs/{}", fixture.oci_config.digest),
            range: None,
            body: bytes(&fixture.oci_config),
        },
        Probe {
            label: "layer blob",
            head: false,
            path: format!("/v2/{repo}/blobs/{}", layer.digest),
            range: None,
            body: bytes(layer),
        },
        Probe {
            label: "HEAD big blob",
            head: true,
            path: format!("/v2/{repo}/blobs/{big_digest}"),
            range: None,
            body: big.clone(),
        },
        Probe {
            label: "big blob",
            head: false,
            path: format!("/v2/{repo}/blobs/{big_digest}"),
            range: None,
            body: big.clone(),
        },
        Probe {
            label: "range of big blob",
            head: false,
            path: format!("/v2/{repo}/blobs/{big_digest}"),
            range: Some((4096, 4096 + 65535)),
            body: big.clone(),
        },
        Probe {
            label: "tail range of big blob",
            head: false,
            path: format!("/v2/{repo}/blobs/{big_digest}"),
            range: Some((BIG as u64 - 100, BIG as u64 - 1)),
            body: big.clone(),
        },
    ];
    assert_eq!(mix.len(), PER_CONNECTION);

    // Warm up, then the baseline.
    {
        let tcp = TcpStream::connect(d.mirror).await.expect("connect");
        let mut conn = BufReader::new(tcp);
        for p in &mix {
            let (s, b) = exchange(&mut conn, p).await.expect("warm-up");
            check(p, s, &b).expect("warm-up reply");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (baseline, _) = d.rss();

    // Two identical rounds, each followed by a return to the baseline: a leak would fail the
    // second even if the first passed.
    for round in 1..=2 {
        // Sample RSS during the run.
        let pid = d.child.id();
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let mut peak = 0u64;
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    let s =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    if let Some(v) = s
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        peak = peak.max(v);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                peak
            })
        };

        // All connections open first, then everyone sends at once.
        let barrier = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(CONNECTIONS);
        for c in 0..CONNECTIONS {
            let barrier = barrier.clone();
            let mix = mix.clone();
            let addr = d.mirror;
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(PER_CONNECTION);
                let mut errors = Vec::new();
                let conn = TcpStream::connect(addr).await;
                barrier.wait().await;
                let mut conn = match conn {
                    Ok(t) => BufReader::with_capacity(64 * 1024, t),
                    Err(e) => {
                        errors.push(format!("connect: {e}"));
                        return (latencies, errors);
                    }
                };
                for r in 0..PER_CONNECTION {
                    // Rotate the mix so each moment sees every kind of request.
                    let probe = &mix[(c + r) % mix.len()];
                    let t = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(60), exchange(&mut conn, probe))
                        .await
                    {
                        Ok(Ok((status, body))) => match check(probe, status, &body) {
                            Ok(()) => latencies.push(t.elapsed()),
                            Err(e) => errors.push(e),
                        },
                        Ok(Err(e)) => {
                            errors.push(format!("{}: {e}", probe.label));
                            break;
                        }
                        Err(_) => {
                            errors.push(format!("{}: no reply within 60 s", probe.label));
                            break;
                        }
                    }
                }
                (latencies, errors)
            }));
        }
        let mut latencies = Vec::with_capacity(CONNECTIONS * PER_CONNECTION);
        let mut errors = Vec::new();
        let all = futures::future::join_all(tasks);
        let results = tokio::time::timeout(RUN_WITHIN, all)
            .await
            .expect("the run finishes within its bound");
        for r in results {
            let (l, e) = r.expect("client task");
            latencies.extend(l);
            errors.extend(e);
        }
        let elapsed = started.elapsed();
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let sampled_peak = sampler.await.unwrap_or(0);
        let (_, hwm) = d.rss();

        // After the run: connections are closed (tasks ended); poll (bounded) until RSS is back
        // within the slack of the baseline.
        let idle = Instant::now();
        let right_after = d.rss().0;
        let after = loop {
            let (rss, _) = d.rss();
            if rss <= baseline + RSS_RETURN_SLACK_KIB || idle.elapsed() > RSS_RETURN_WITHIN {
                break rss;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let returned_after = idle.elapsed();

        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let report = serde_json::json!({
            "connections": CONNECTIONS,
            "requests": CONNECTIONS * PER_CONNECTION,
            "ok": latencies.len(),
            "errors": errors.len(),
            "elapsed_s": elapsed.as_secs_f64(),
            "requests_per_s": latencies.len() as f64 / elapsed.as_secs_f64(),
            "latency_ms": {
                "p50": ms(percentile(&latencies, 0.50)),
                "p90": ms(percentile(&latencies, 0.90)),
                "p99": ms(percentile(&latencies, 0.99)),
                "max": ms(latencies.last().copied().unwrap_or_default()),
            },
            "round": round,
            "rss_kib": {"baseline": baseline, "peak_sampled": sampled_peak, "peak_hwm": hwm,
                        "right_after": right_after, "after": after},
            "rss_returned_after_s": returned_after.as_secs_f64(),
        });
        println!("load: {report}");
        if let Some(path) = std::env::var_os("SPECULUM_LOAD_REPORT")
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(f, "{report}");
        }
        errors.sort();
        errors.dedup();
        assert!(
            errors.is_empty(),
            "{} distinct errors, e.g.:\n{}\ndaemon log tail:\n{}",
            errors.len(),
            errors
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            d.log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(latencies.len(), CONNECTIONS * PER_CONNECTION);
        // Peaks vary with scheduling (how many 1 MiB bodies are in flight at once); what stays
        // afterwards is what would show a leak or an allocator hoarding freed memory.
        assert!(
            after <= baseline + RSS_RETURN_SLACK_KIB,
            "round {round}: RSS {after} KiB {returned_after:?} after the load, baseline \
             {baseline} KiB (+{} KiB allowed); peak {hwm} KiB",
            RSS_RETURN_SLACK_KIB
        );
    }
}
