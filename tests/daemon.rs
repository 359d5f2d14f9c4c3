//! The `speculum registry` binary as a whole, on a real private containerd: a lone node
//! becomes ready and serves its own content, and SIGTERM drains a blob that is still
//! streaming (readiness drops first, the body arrives whole, the process exits 0).
//!
//! Needs root and Debian's containerd (as the store conformance test does).

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::daemon::Daemon;
use speculum::oci::Digest;
use speculum::store::conformance::{Fixture, Seeder, pseudo_random};

const BIG: usize = 96 * 1024 * 1024;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

async fn status(url: &str) -> Option<u16> {
    client()
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Polls `url` until it answers `want` (bounded).
async fn wait_status(url: &str, want: u16, within: Duration, d: &Daemon) {
    let deadline = Instant::now() + within;
    while status(url).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{url} never answered {want}; daemon log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Puts a large blob into containerd's content store (no image needed: digests are served
/// for any content the node holds).
fn ingest_big(rig: &Containerd, dir: &std::path::Path) -> Digest {
    let data = pseudo_random(0x9e37_79b9_7f4a_7c15, BIG);
    let digest = Digest::sha256_of(&data);
    let path = dir.join("big.bin");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&data))
        .expect("write big blob");
    let status = rig
        .ctr_command(&[
            "content",
            "ingest",
            "--expected-digest",
            &digest.to_string(),
            "big-blob",
        ])
        .stdin(std::fs::File::open(&path).expect("open"))
        .status()
        .expect("ctr runs");
    assert!(status.success(), "ctr content ingest failed");
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_node_serves_its_store_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rig = Containerd::start(dir.path()).expect("containerd");
    let fixture = Fixture::new("127.0.0.1:5000");
    rig.seeder().seed(&fixture).await.expect("seed");
    let big = ingest_big(&rig, dir.path());
    let d = Daemon::start(&rig, dir.path(), &["--set", "registry.drain_grace=20s"]);
    let base = format!("http://{}", d.mirror);

    // A lone node is ready: it can serve its own content.
    wait_status(
        &format!("http://{}/readyz", d.metrics),
        200,
        Duration::from_secs(20),
        &d,
    )
    .await;

    // containerd's first request, by tag, answered from the node's own store.
    let image = &fixture.images[0];
    let (repo, tag) = image
        .name
        .strip_prefix("127.0.0.1:5000/")
        .and_then(|r| r.rsplit_once(':'))
        .expect("fixture names are registry/repo:tag");
    let r = client()
        .head(format!(
            "{base}/v2/{repo}/manifests/{tag}?ns=127.0.0.1%3A5000"
        ))
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), 200, "log:\n{}", d.log());
    assert_eq!(
        r.headers()["docker-content-digest"],
        image.target.digest.to_string().as_str()
    );

    // Start a large blob, read a first chunk, then SIGTERM while the rest is in flight.
    let mut resp = client()
        .get(format!("{base}/v2/{repo}/blobs/{big}"))
        .send()
        .await
        .expect("blob");
    assert_eq!(resp.status(), 200);
    let mut received = Vec::with_capacity(BIG);
    let first = resp.chunk().await.expect("first chunk").expect("data");
    received.extend_from_slice(&first);
    let pid = d.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());

    // Readiness drops before anything else (or the listener is already closed).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match status(&format!("http://{}/readyz", d.metrics)).await {
            Some(503) | None => break,
            _ => assert!(Instant::now() < deadline, "still ready after SIGTERM"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The in-flight body still arrives whole.
    while let Some(chunk) = resp
        .chunk()
        .await
        .expect("body keeps streaming during drain")
    {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received.len(), BIG);
    assert_eq!(Digest::sha256_of(&received), big);

    // And the process exits cleanly, in order.
    let mut d = d;
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = d.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit; log:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = d.log();
    assert!(code.success(), "exit {code:?}; log:\n{log}");
    let order = [
        "signal received",
        "withdrawing",
        "draining",
        "speculum stopped",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|m| {
            log.find(m)
                .unwrap_or_else(|| panic!("no {m:?} in log:\n{log}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "shutdown out of order:\n{log}"
    );
}
