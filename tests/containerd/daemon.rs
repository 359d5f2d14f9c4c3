//! The `speculum registry` binary as a whole, on a real private containerd: a lone node
//! becomes ready and serves its own content, and SIGTERM drains a blob that is still
//! streaming (readiness drops first, the body arrives whole, the process exits 0).
//!
//! It also reports the node's containerd configuration (introspection): the content root
//! without `--content-dir`, and what keeps the node from serving, without holding readiness.
//!
//! Needs root and a containerd of the matrix (`RIG_CONTAINERD`, as the store conformance test).

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use speculum::oci::Digest;
use speculum::store::conformance::{Fixture, Seeder, pseudo_random};
use testkit::containerd::{Containerd, CriOptions, Options};
use testkit::daemon::Daemon;

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

/// A node whose containerd discards layers and reads no hosts directory of ours: the daemon
/// still becomes ready (the pull path is not its to break), says so in `/readyz` and in
/// `speculum_containerd_config_problem`, and, given no `--content-dir`, serves blobs from the
/// content root containerd reported, with `sendfile(2)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_containerd_config_problems_without_blocking_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let rig = Containerd::start_with(
        dir.path(),
        Options {
            cri: Some(CriOptions {
                registry_config_path: None,
                discard_unpacked_layers: true,
            }),
            ..Options::default()
        },
    )
    .expect("containerd with cri");
    let big = ingest_big(&rig, dir.path());
    let certs_set = format!("hosts.certs_dir={}", certs.display());
    let d = Daemon::start_without_content_dir(&rig, dir.path(), &["--set", &certs_set]);
    let metrics = format!("http://{}", d.metrics);
    wait_status(
        &format!("{metrics}/readyz"),
        200,
        Duration::from_secs(20),
        &d,
    )
    .await;

    // What each version can tell (docs/containerd.md): 1.x through CRI status, 2.4 through
    // plugin exports (an unset config_path is its default list, not ours), 2.3 nothing.
    let want: &[&str] = match rig.version() {
        (1, _) => &["hosts_dir_not_set", "layers_discarded"],
        (2, minor) if minor >= 4 => &["hosts_dir_differs", "layers_discarded"],
        _ => &["hosts_dir_unknown"],
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = client()
            .get(format!("{metrics}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        if want.iter().all(|p| {
            text.contains(&format!(
                "speculum_containerd_config_problem{{problem=\"{p}\"}} 1"
            ))
        }) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "want problems {want:?} for containerd {}; metrics:\n{text}\nlog:\n{}",
            rig.line(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let on: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("speculum_containerd_config_problem{") && l.ends_with(" 1"))
        .collect();
    assert_eq!(on.len(), want.len(), "exactly {want:?}: {on:?}");
    let readyz = client()
        .get(format!("{metrics}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 200, "problems never hold readiness back");
    let body = readyz.text().await.expect("readyz body");
    assert!(body.contains("containerd-config: "), "{body}");
    let key = if rig.version().0 >= 2 {
        "io.containerd.cri.v1.images"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    assert!(
        body.contains(key),
        "the note names the config key to change: {body}"
    );
    let log = d.log();
    assert!(log.contains("\"containerd configuration\""), "{log}");

    // No --content-dir: the blob still leaves through sendfile, from the discovered root.
    let resp = client()
        .get(format!("http://{}/v2/any/blobs/{big}", d.mirror))
        .send()
        .await
        .expect("blob");
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(Digest::sha256_of(&bytes), big);
    let text = client()
        .get(format!("{metrics}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let sent: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("speculum_served_sendfile_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        sent >= BIG as f64,
        "{sent} bytes by sendfile; the discovered content root was not used\n{}",
        d.log()
    );
}
