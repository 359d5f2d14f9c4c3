//! A private, real containerd for tests: Debian's `/usr/bin/containerd` as a child process with
//! its own root, state, sockets and config in a directory the test owns, stopped by PID.
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
    /// The `certs.d` tree containerd reads `hosts.toml` files from.
    pub registry_config_path: PathBuf,
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            namespace: "k8s.io".to_owned(),
            cri: None,
            netns: None,
        }
    }
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
        fs::write(&config, render_config(&dir, &socket, &options))?;
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

    /// The PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The store configuration pointing at this containerd (gRPC only: no `content_dir`).
    pub fn store_config(&self) -> ContainerdConfig {
        ContainerdConfig {
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

    /// `program`, prefixed with `ip netns exec <ns>` when running in a namespace.
    fn command(&self, program: &str) -> Command {
        match &self.options.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
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

/// The daemon's config.toml (version 2, read by containerd 1.6 and 1.7).
fn render_config(dir: &Path, socket: &Path, options: &Options) -> String {
    let p = |path: PathBuf| path.display().to_string();
    let mut cfg = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
{disabled}
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = p(dir.join("root")),
        state = p(dir.join("state")),
        socket = socket.display(),
        opt = p(dir.join("opt")),
        disabled = if options.cri.is_none() {
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#
        } else {
            ""
        },
    );
    if let Some(cri) = &options.cri {
        cfg.push_str(&format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    discard_unpacked_layers = {discard}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{hosts}"
"#,
            discard = cri.discard_unpacked_layers,
            cni_bin = p(dir.join("cni/bin")),
            cni_conf = p(dir.join("cni/conf")),
            hosts = cri.registry_config_path.display(),
        ));
    }
    cfg
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
