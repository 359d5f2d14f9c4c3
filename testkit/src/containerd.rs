//! A private, real containerd for tests: a child process with its own root, state, sockets and
//! config in a directory the test owns, stopped by PID.
//!
//! Which containerd: `RIG_CONTAINERD` (a line of `tests/containerd/containerd.sh`: `1.6` is
//! Debian's `/usr/bin/containerd`, `1.7`, `2.3`, `2.4` are built from the Go module proxy and
//! cached on first use), default the 2.x LTS. The config comes from the same script's writer
//! (config version 2 for 1.x, 3 for 2.x), the one the rig uses.
//!
//! - [`Containerd::start`] boots one with the CRI plugin disabled (enough for content and image
//!   tests; no network needed); [`Containerd::start_with`] takes [`Options`] to enable CRI
//!   (with its registry `config_path`, for hosts.toml tests) or to run inside a network
//!   namespace the calling test created.
//! - [`Containerd::ctr`] runs `ctr` against it; [`Containerd::stop`] and
//!   [`Containerd::restart`] let a test take it away and bring it back on the same socket.
//! - [`CtrSeeder`] puts the store conformance fixture into it (`ctr images import` of an OCI
//!   layout tar; image records moved and deleted through the images gRPC service).
//!
//! Dropping a `Containerd` kills the process (by its PID, nothing else). If the test process
//! itself is killed with SIGKILL, the daemon is orphaned: its PID is in `<dir>/containerd.pid`.

use std::fs;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, Image, UpdateImageRequest,
};
use containerd_client::tonic::{Code, Request};
use containerd_client::types::Descriptor;
use speculum::store::conformance::{Blob, Fixture, SeedError, Seeder};
use speculum::store::containerd::ContainerdConfig;

/// containerd boots in well under a second here; 20 s covers a loaded 2-core CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// A graceful stop (SIGTERM) gets this long before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Any one `ctr` invocation; imports of the conformance fixture take well under a second.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(25);

/// CRI plugin settings (see shared/notes/containerd-rig.md for why each is set).
#[derive(Debug, Clone)]
pub struct CriOptions {
    /// The `certs.d` tree containerd reads `hosts.toml` files from; `None` leaves CRI's
    /// `config_path` unset (the misconfiguration the daemon must detect).
    pub registry_config_path: Option<PathBuf>,
    pub discard_unpacked_layers: bool,
}

/// How to run the private containerd.
#[derive(Debug, Clone)]
pub struct Options {
    /// The namespace `ctr` uses and [`Containerd::store_config`] names.
    pub namespace: String,
    /// `None` disables the CRI plugin.
    pub cri: Option<CriOptions>,
    /// Run containerd (and `ctr`) inside this network namespace, created by the test.
    pub netns: Option<String>,
    /// Extra `KEY=VALUE` settings for the config writer (`tests/containerd/containerd.sh
    /// config`), e.g. `concurrent_layer_fetch_buffer=1048576`.
    pub extra_config: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: "k8s.io".to_owned(),
            cri: None,
            netns: None,
            extra_config: Vec::new(),
        }
    }
}

/// `tests/containerd/containerd.sh`: the version matrix's builder and config writer.
fn matrix_script() -> PathBuf {
    crate::repo_root().join("tests/containerd/containerd.sh")
}

/// Runs the matrix script; its stdout, trimmed, or an error with what it said.
fn matrix(args: &[&str]) -> io::Result<String> {
    let out = Command::new("bash")
        .arg(matrix_script())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "containerd.sh {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The containerd line under test: `RIG_CONTAINERD`, else the matrix's default.
pub fn line() -> String {
    static LINE: OnceLock<String> = OnceLock::new();
    LINE.get_or_init(|| match std::env::var("RIG_CONTAINERD") {
        Ok(l) if !l.is_empty() => l,
        _ => matrix(&["default"]).expect("containerd.sh default"),
    })
    .clone()
}

/// The directory with `containerd`, `ctr` and `containerd-shim-runc-v2` of [`line`] (built on
/// first use: minutes; one build at a time machine-wide, others wait for it).
pub fn bin_dir() -> io::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        matrix(&["bin", &line()])
            .map(PathBuf::from)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(io::Error::other)
}

/// A running (or stopped) private containerd. See the module docs.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    /// `<root>/io.containerd.content.v1.content`: the content store's files.
    pub content_dir: PathBuf,
    pub namespace: String,
    pub config: PathBuf,
    pub log: PathBuf,
    options: Options,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd in `dir` (which must exist and outlive it) without the CRI plugin.
    pub fn start(dir: &Path) -> io::Result<Containerd> {
        Containerd::start_with(dir, Options::default())
    }

    /// Starts containerd in `dir` with `options`.
    pub fn start_with(dir: &Path, options: Options) -> io::Result<Containerd> {
        let dir = dir.to_path_buf();
        let root = dir.join("root");
        let state = dir.join("state");
        let socket = dir.join("containerd.sock");
        // sockaddr_un.sun_path holds 107 bytes plus NUL; the ttrpc socket name is longer.
        if socket.as_os_str().len() + 6 > 107 {
            return Err(io::Error::other(format!(
                "directory {dir:?} is too deep for unix socket paths"
            )));
        }
        let config = dir.join("config.toml");
        fs::write(&config, render_config(&dir, &socket, &options)?)?;
        let mut rig = Containerd {
            content_dir: root.join("io.containerd.content.v1.content"),
            namespace: options.namespace.clone(),
            log: dir.join("containerd.log"),
            dir,
            socket,
            root,
            state,
            config,
            options,
            child: None,
        };
        rig.spawn()?;
        Ok(rig)
    }

    /// The containerd line this daemon runs (`1.6`, `1.7`, `2.3`, …; see [`line`]).
    pub fn line(&self) -> String {
        line()
    }

    /// `(major, minor)` of [`line`], e.g. `(2, 3)`.
    pub fn version(&self) -> (u32, u32) {
        let l = line();
        let mut parts = l.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    /// The PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The store configuration pointing at this containerd (gRPC only: no `content_dir`).
    pub fn store_config(&self) -> ContainerdConfig {
        ContainerdConfig {
            enabled: true,
            socket: self.socket.clone(),
            namespace: self.namespace.clone(),
            content_dir: None,
        }
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]. Idempotent.
    pub fn stop(&mut self) -> io::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id().to_string();
        // std only sends SIGKILL; `kill` sends SIGTERM to exactly this PID.
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                let _ = fs::remove_file(self.dir.join("containerd.pid"));
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        child.kill()?;
        child.wait()?;
        let _ = fs::remove_file(self.dir.join("containerd.pid"));
        Ok(())
    }

    /// Starts the daemon again with the same configuration, root and sockets.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// Runs `ctr -a <socket> -n <namespace> <args>` (inside the network namespace, if any) and
    /// returns its stdout; a non-zero exit is an error carrying stderr.
    pub fn ctr(&self, args: &[&str]) -> io::Result<String> {
        let mut child = self
            .ctr_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + CTR_TIMEOUT;
        loop {
            if child.try_wait()?.is_some() {
                return ctr_result(args, child.wait_with_output()?);
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Err(io::Error::other(format!(
                    "ctr {args:?} did not finish within {CTR_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`Containerd::ctr`] without blocking the async runtime.
    pub async fn ctr_async(&self, args: &[&str]) -> io::Result<String> {
        let mut cmd = tokio::process::Command::from(self.ctr_command(args));
        cmd.kill_on_drop(true);
        let output = tokio::time::timeout(CTR_TIMEOUT, cmd.output())
            .await
            .map_err(|_| io::Error::other(format!("ctr {args:?} timed out")))??;
        ctr_result(args, output)
    }

    /// The last lines of containerd's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A seeder for the store conformance suite.
    pub fn seeder(&self) -> CtrSeeder<'_> {
        CtrSeeder { rig: self }
    }

    /// The `ctr` command line [`Containerd::ctr`] runs, for callers that need stdin or a
    /// different way of waiting. Callers bound its run time themselves.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("ctr");
        cmd.arg("-a")
            .arg(&self.socket)
            .args(["-n", &self.namespace])
            .args(args);
        cmd
    }

    /// `program` of the containerd under test (from [`bin_dir`]), prefixed with
    /// `ip netns exec <ns>` when running in a namespace. PATH leads with the same directory:
    /// containerd finds `containerd-shim-runc-v2` through it.
    fn command(&self, program: &str) -> Command {
        let dir = bin_dir().unwrap_or_else(|e| panic!("containerd {}: {e}", line()));
        let program = dir.join(program);
        let path = format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = match &self.options.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.env("PATH", path);
        cmd
    }

    fn spawn(&mut self) -> io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self
            .command("containerd")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        fs::write(self.dir.join("containerd.pid"), child.id().to_string())?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls the gRPC socket until it accepts a connection, the process exits, or
    /// [`BOOT_TIMEOUT`] passes.
    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "containerd exited during boot ({status}):\n{}",
                    self.log_tail(20)
                )));
            }
            // In a network namespace the socket is still a file on the shared filesystem.
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.stop();
                return Err(io::Error::other(format!(
                    "containerd socket {:?} not ready within {BOOT_TIMEOUT:?}:\n{}",
                    self.socket,
                    self.log_tail(20)
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL: a test is over, nothing needs a graceful shutdown.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ctr_result(args: &[&str], output: Output) -> io::Result<String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "ctr {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The daemon's config.toml, from the matrix's one writer (`containerd.sh config`).
fn render_config(dir: &Path, socket: &Path, options: &Options) -> io::Result<String> {
    let mut args = vec![
        "config".to_owned(),
        line(),
        dir.display().to_string(),
        format!("socket={}", socket.display()),
    ];
    match &options.cri {
        None => args.push("cri=off".to_owned()),
        Some(cri) => {
            if let Some(path) = &cri.registry_config_path {
                args.push(format!("config_path={}", path.display()));
            }
            args.push(format!(
                "discard_unpacked_layers={}",
                cri.discard_unpacked_layers
            ));
        }
    }
    args.extend(options.extra_config.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    matrix(&args).map(|toml| toml + "\n")
}

/// Seeds the store conformance fixture into a rig (see the module docs).
pub struct CtrSeeder<'a> {
    rig: &'a Containerd,
}

impl CtrSeeder<'_> {
    async fn images(
        &self,
    ) -> Result<ImagesClient<containerd_client::tonic::transport::Channel>, SeedError> {
        let channel = containerd_client::connect(&self.rig.socket).await?;
        Ok(ImagesClient::new(channel))
    }

    /// A request in the rig's namespace (the `containerd-namespace` metadata header).
    fn request<T>(&self, message: T) -> Result<Request<T>, SeedError> {
        let mut req = Request::new(message);
        req.metadata_mut()
            .insert("containerd-namespace", self.rig.namespace.parse()?);
        Ok(req)
    }
}

#[async_trait]
impl Seeder for CtrSeeder<'_> {
    async fn seed(&self, fixture: &Fixture) -> Result<(), SeedError> {
        let path = self.rig.dir.join("conformance-layout.tar");
        tokio::fs::write(&path, fixture.layout_tar()).await?;
        let path = path.display().to_string();
        // --all-platforms: import everything, not only this machine's platform;
        // --no-unpack: the content store is what is under test, not the snapshotter.
        self.rig
            .ctr_async(&["images", "import", "--all-platforms", "--no-unpack", &path])
            .await?;
        Ok(())
    }

    async fn set_image(&self, name: &str, target: &Blob) -> Result<(), SeedError> {
        let image = Image {
            name: name.to_owned(),
            target: Some(Descriptor {
                media_type: target.media_type.to_owned(),
                digest: target.digest.to_string(),
                size: i64::try_from(target.size())?,
                annotations: Default::default(),
            }),
            ..Default::default()
        };
        let mut client = self.images().await?;
        let created = client
            .create(self.request(CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            })?)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                client
                    .update(self.request(UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    })?)
                    .await?;
                Ok(())
            }
            Err(s) => Err(s.into()),
        }
    }

    async fn delete_image(&self, name: &str) -> Result<(), SeedError> {
        let mut client = self.images().await?;
        client
            .delete(self.request(DeleteImageRequest {
                name: name.to_owned(),
                sync: false,
                target: None,
            })?)
            .await?;
        Ok(())
    }
}
