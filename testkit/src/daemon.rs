//! The `speculum registry` binary as a child process on loopback, reading a private
//! containerd (see `containerd.rs`): free ports, its log, its memory, readiness, and a kill by
//! PID when dropped. Used by the tests that need the whole daemon, not just its parts.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::Containerd;

/// A port free on 127.0.0.1 right now (the daemon binds it a moment later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running `speculum registry`, alone on 127.0.0.1 (its DHT finds nobody).
pub struct Daemon {
    pub child: Child,
    pub mirror: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on free ports against `rig`, its data and log under `dir`; `extra`
    /// arguments (e.g. `--set key=value`) come last.
    pub fn start(rig: &Containerd, dir: &Path, extra: &[&str]) -> Daemon {
        let content_dir = rig.content_dir.display().to_string();
        let mut args = vec!["--content-dir", content_dir.as_str()];
        args.extend_from_slice(extra);
        Daemon::start_without_content_dir(rig, dir, &args)
    }

    /// [`Daemon::start`] without `--content-dir`: the daemon must learn it from containerd.
    pub fn start_without_content_dir(rig: &Containerd, dir: &Path, extra: &[&str]) -> Daemon {
        let (mirror, peer, metrics) = (free_port(), free_port(), free_port());
        let log = dir.join("speculum.log");
        let child = Command::new(crate::cargo_bin("speculum"))
            .arg("registry")
            .args(["--mirror-listen", &format!("127.0.0.1:{mirror}")])
            .args(["--peer-listen", &format!("127.0.0.1:{peer}")])
            .args(["--registry-port", &peer.to_string()])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--data-dir", &dir.join("data").display().to_string()])
            .args(["--containerd-socket", &rig.socket.display().to_string()])
            .args(["--containerd-namespace", &rig.namespace])
            // No upstream exists for these daemons (their `ns` is a made-up 127.0.0.1:5000):
            // tags resolve through the node, as before upstream-first; `extra` may override.
            .args(["--set", "mirror.tag_resolution=cluster-first"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("speculum starts");
        Daemon {
            child,
            mirror: ([127, 0, 0, 1], mirror).into(),
            metrics: ([127, 0, 0, 1], metrics).into(),
            log,
        }
    }

    /// Everything the daemon logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Current and peak resident set size in KiB, from /proc.
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Polls `/readyz` on the metrics port until it answers 200 (bounded by `within`).
    pub async fn wait_ready(&self, within: Duration) {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let url = format!("http://{}/readyz", self.metrics);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon never ready; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
