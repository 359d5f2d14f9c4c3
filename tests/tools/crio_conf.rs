//! The CRI-O drop-in read by the real parser: `speculum configure --runtime cri-o` writes
//! `99-speculum.conf` into a [`CImageNode`]'s registries.conf.d, then containers/image (the
//! library CRI-O's image service pulls with) in skopeo and podman must
//! - accept the file (a drop-in it cannot parse fails every pull on the node),
//! - send the manifest request to the mirror with the upstream in the path, a port written
//!   `_port` (`/v2/127.0.0.1_PORT/<repo>/manifests/<tag>`),
//! - fall back to the upstream when the mirror answers 404, so the pull still succeeds.
//!
//! And `cleanup` must leave the node pulling straight from upstream again.
//!
//! The mirror here is a recording stub (the daemon's path-encoded serving is tested in the
//! crioserve files); the upstream is a real `docker-registry`. Needs root (the node's mount
//! namespace); skips, saying so, without it; fails under `CI=true` when skopeo or podman is
//! missing.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::cimage::CImageNode;
use testkit::registries::{Auth, Registry};

/// A stub registry that answers `GET /v2/` with 200 and everything else with 404, and records
/// each request line. Stops accepting when dropped.
struct RecordingMirror {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl RecordingMirror {
    fn start() -> RecordingMirror {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind mirror stub");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let seen = seen2.clone();
                std::thread::spawn(move || serve(conn, &seen));
            }
        });
        RecordingMirror { port, seen, stop }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for RecordingMirror {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One keep-alive connection: request heads (no bodies: GET and HEAD only), bounded by a read
/// timeout and a request count.
fn serve(conn: TcpStream, seen: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
        }
        let line = line.trim_end().to_owned();
        let ping = line.starts_with("GET /v2/ ") || line.starts_with("HEAD /v2/ ");
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        let (status, body) = if ping {
            ("200 OK", "{}".to_owned())
        } else {
            (
                "404 Not Found",
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"stub"}]}"#.to_owned(),
            )
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nDocker-Distribution-API-Version: registry/2.0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") && !why.starts_with("needs root") {
        panic!("crio_conf: {why}");
    }
    eprintln!("SKIP crio_conf: {why}");
}

/// `speculum configure|cleanup --runtime cri-o` for `node`, mirroring `upstream` through the
/// stub on `mirror_port`.
fn speculum(verb: &str, node: &CImageNode, upstream: &str, mirror_port: u16) -> String {
    let out = Command::new(testkit::cargo_bin("speculum"))
        .args([verb, "--runtime", "cri-o"])
        .arg("--mirrored-registry")
        .arg(format!("http://{upstream}"))
        .arg("--mirror-endpoint")
        .arg(format!("http://127.0.0.1:{mirror_port}"))
        .arg("--set")
        .arg(format!(
            "hosts.registries_conf_dir={}",
            node.registries_conf_dir().display()
        ))
        // Never signal a crio of this machine from a test.
        .args(["--set", "hosts.crio_find_process=false"])
        .output()
        .expect("run speculum");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "speculum {verb}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_podman_read_the_drop_in_and_fall_back_past_a_404_mirror() {
    if let Some(why) = CImageNode::available() {
        return skip_or_fail(&why);
    }
    let registry = Registry::start(Auth::None);
    let upstream = registry.host();
    let digest = registry
        .push_image("crio/small", "v1", "amd64", "crio-conf")
        .await;
    let mirror = RecordingMirror::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = CImageNode::new(tmp.path().join("node")).expect("node");

    let said = speculum("configure", &node, &upstream, mirror.port);
    assert!(said.contains("wrote"), "{said}");
    let segment = upstream.replace(':', "_");

    // skopeo: the manifest comes back (from upstream, after the mirror's 404) by tag.
    let reference = format!("{upstream}/crio/small:v1");
    let raw = tokio::task::block_in_place(|| node.skopeo_inspect_raw(&reference))
        .expect("skopeo inspect through the drop-in");
    assert_eq!(
        testkit::registries::sha256(raw.trim_end().as_bytes()),
        digest,
        "skopeo got the pushed manifest"
    );
    let want = format!("/v2/{segment}/crio/small/manifests/v1");
    let asked = mirror.requests();
    assert!(
        asked.iter().any(|r| r.contains(&want)),
        "the mirror was asked for {want}; it saw {asked:?}"
    );

    // podman parses the same directory: `podman info` lists our mirror for the registry.
    let info = tokio::task::block_in_place(|| {
        node.run(
            "podman",
            &[
                "--root",
                &node.root().to_string_lossy(),
                "--runroot",
                &node.runroot().to_string_lossy(),
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
                "info",
                "--format",
                "{{json .Registries}}",
            ],
        )
    })
    .expect("podman info");
    let mirror_location = format!("127.0.0.1:{}/{segment}", mirror.port);
    assert!(
        info.contains(&mirror_location) && info.contains("\"PullFromMirror\":\"all\""),
        "podman info shows the mirror {mirror_location} with pull-from-mirror all: {info}"
    );

    // Cleanup: the drop-in is gone and the pull no longer touches the mirror.
    speculum("cleanup", &node, &upstream, mirror.port);
    let before = mirror.requests().len();
    let plain = tokio::task::block_in_place(|| {
        node.run(
            "skopeo",
            &[
                "inspect",
                "--raw",
                "--retry-times",
                "0",
                "--tls-verify=false",
                &format!("docker://{reference}"),
            ],
        )
    })
    .expect("straight from upstream after cleanup");
    assert_eq!(
        testkit::registries::sha256(plain.trim_end().as_bytes()),
        digest
    );
    assert_eq!(
        mirror.requests().len(),
        before,
        "after cleanup nothing goes to the mirror"
    );
}
