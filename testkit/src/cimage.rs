//! A containers/image "node" for tests: the configuration CRI-O's image service, podman and
//! skopeo read, private to one test, so a pull goes through a registries.conf.d drop-in
//! without the host's `/etc/containers` or `/var/lib/containers` ever being read or written.
//!
//! Every command runs in a private mount namespace (`unshare -m`, propagation private) where
//! the node's own `etc/` is bind-mounted over `/etc/containers` and its `var-lib/` over
//! `/var/lib` (containers/image keeps its blob-info cache in `/var/lib/containers/cache` for
//! root, whatever the storage flags say) (so
//! `/etc/containers/registries.conf.d` is [`CImageNode::registries_conf_dir`], which
//! `speculum configure --runtime cri-o` writes into), with `HOME`, `REGISTRY_AUTH_FILE` and
//! `CONTAINERS_REGISTRIES_CONF` pointing into the node's directory too (containers/image also
//! reads `$HOME/.config/containers/…`). Storage is vfs under the node's `storage/` (explicit
//! `[vfs@root+runroot]` references for skopeo, `--root/--runroot` for podman). With
//! [`CImageNode::in_netns`] the commands run inside a rig node's network namespace
//! (`ip netns exec`), so `127.0.0.1:5080` is that node's daemon.
//!
//! Needs root (mount namespaces) and an existing `/etc/containers` to mount over (Debian's
//! `containers-common`, which skopeo and podman bring); [`CImageNode::available`] says why not.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use testkit::cimage::CImageNode;
//! let node = CImageNode::new("/tmp/spr-x/c1")?.in_netns("cs-n1");
//! // Point the node at its daemon: the drop-in lands in node.registries_conf_dir().
//! let dir = node.registries_conf_dir();
//! std::process::Command::new("speculum")
//!     .args(["configure", "--runtime", "cri-o"])
//!     .arg("--set").arg(format!("hosts.registries_conf_dir={}", dir.display()))
//!     .status()?;
//! let out = node.skopeo_copy("10.250.92.2:5000/library/small:v1", "small:v1")?;
//! assert!(out.contains("Writing manifest"));
//! let id = node.podman_pull("10.250.92.2:5000/library/small:v1")?;
//! # let _ = id; Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// How long one skopeo or podman run may take before the test fails.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(180);

/// The registries.conf every node starts with: v2 format, no unqualified-search registries
/// (a short name must never leave the machine), so only drop-ins add `[[registry]]` tables.
const REGISTRIES_CONF: &str = "# testkit::cimage: no search registries; drop-ins add the rest\n\
unqualified-search-registries = []\n\
short-name-mode = \"enforcing\"\n";

/// Signature policy: the test images are unsigned.
const POLICY_JSON: &str = r#"{"default": [{"type": "insecureAcceptAnything"}]}"#;

/// One containers/image node: its directory and, optionally, the network namespace it runs in.
#[derive(Debug, Clone)]
pub struct CImageNode {
    /// Holds `etc/` (mounted over /etc/containers), `var-lib/` (over /var/lib),
    /// `storage/{root,runroot,tmp}`, `home/`, `auth.json`, `logs/`.
    pub dir: PathBuf,
    /// `ip netns exec` this namespace first; `None`: the caller's (loopback tests).
    pub netns: Option<String>,
}

impl CImageNode {
    /// Creates the node's directories and base configuration under `dir` (kept if present:
    /// a second call is a no-op, so a restarted test can reuse a node's storage).
    pub fn new(dir: impl Into<PathBuf>) -> Result<CImageNode> {
        let node = CImageNode {
            dir: dir.into(),
            netns: None,
        };
        for d in [
            node.registries_conf_dir(),
            node.etc().join("registries.d"),
            node.root(),
            node.runroot(),
            node.dir.join("storage/tmp"),
            node.dir.join("home"),
            node.dir.join("var-lib"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let files = [
            ("registries.conf", REGISTRIES_CONF.to_owned()),
            ("policy.json", POLICY_JSON.to_owned()),
            // `graphroot`, not `root`: podman 4.3's containers/storage warns "Failed to decode
            // the keys [storage.root]" and then refuses to start without a graphroot.
            (
                "storage.conf",
                format!(
                    "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                    node.root().display(),
                    node.runroot().display()
                ),
            ),
        ];
        for (name, text) in files {
            let path = node.etc().join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let auth = node.auth_file();
        if !auth.exists() {
            std::fs::write(&auth, "{\"auths\": {}}\n")
                .with_context(|| format!("writing {}", auth.display()))?;
        }
        Ok(node)
    }

    /// The same node, its commands run inside network namespace `ns` (a rig node).
    pub fn in_netns(mut self, ns: &str) -> CImageNode {
        self.netns = Some(ns.to_owned());
        self
    }

    /// `None` when this machine can run nodes; otherwise why not (for a test's skip line).
    pub fn available() -> Option<String> {
        if !crate::rig::is_root().unwrap_or(false) {
            return Some("needs root for mount namespaces".to_owned());
        }
        if !Path::new("/etc/containers").is_dir() {
            return Some("no /etc/containers to mount over (apt-get install skopeo)".to_owned());
        }
        for tool in ["skopeo", "podman", "unshare"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Some(format!("no {tool} (scripts/setup.sh installs it)"));
            }
        }
        None
    }

    /// The node's `/etc/containers`.
    pub fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }

    /// What the node's containers/image sees as `/etc/containers/registries.conf.d`.
    pub fn registries_conf_dir(&self) -> PathBuf {
        self.etc().join("registries.conf.d")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("storage/root")
    }

    pub fn runroot(&self) -> PathBuf {
        self.dir.join("storage/runroot")
    }

    /// `REGISTRY_AUTH_FILE` of every command (empty until [`CImageNode::login`]).
    pub fn auth_file(&self) -> PathBuf {
        self.dir.join("auth.json")
    }

    /// Stores Basic credentials for `registry` (`host:port`) in the node's auth file, as
    /// `podman login` would.
    pub fn login(&self, registry: &str, user: &str, password: &str) -> Result<()> {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let text = serde_json::json!({ "auths": { registry: { "auth": token } } }).to_string();
        std::fs::write(self.auth_file(), text).context("writing auth.json")
    }

    /// `containers-storage:[vfs@root+runroot]NAME`: the node's store, as skopeo names it.
    pub fn storage_ref(&self, name: &str) -> String {
        format!(
            "containers-storage:[vfs@{}+{}]{name}",
            self.root().display(),
            self.runroot().display()
        )
    }

    /// `program args…` in the node: its network namespace, a private mount namespace with
    /// the node's `etc/` over `/etc/containers`, its environment. Not yet run.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        // Arguments stay arguments: the script only mounts and execs "$@".
        cmd.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/containers && mount --bind "$2" /var/lib && shift 2 && exec "$@""#)
            .arg("cimage")
            .arg(self.etc())
            .arg(self.dir.join("var-lib"))
            .arg(program)
            .args(args)
            .env("HOME", self.dir.join("home"))
            .env("REGISTRY_AUTH_FILE", self.auth_file())
            .env("CONTAINERS_REGISTRIES_CONF", "/etc/containers/registries.conf")
            .env("CONTAINERS_STORAGE_CONF", "/etc/containers/storage.conf")
            .env("TMPDIR", self.dir.join("storage/tmp"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs [`CImageNode::command`] to completion within [`COMMAND_LIMIT`] (killed, by its
    /// pid, after that); its output whatever the exit status. Output goes through files, not
    /// pipes: `skopeo --debug` says more than a pipe holds while nobody reads it.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).context("creating logs/")?;
        let n = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
        let (out_path, err_path) = (
            logs.join(format!("{n:04}-{program}.out")),
            logs.join(format!("{n:04}-{program}.err")),
        );
        let child = self
            .command(program, args)
            .stdout(std::fs::File::create(&out_path).context("creating stdout log")?)
            .stderr(std::fs::File::create(&err_path).context("creating stderr log")?)
            .spawn()
            .with_context(|| format!("starting {program} {args:?}"))?;
        let status = crate::rig::wait_child(child, COMMAND_LIMIT)
            .with_context(|| format!("{program} {args:?} in {}", self.dir.display()))?
            .status;
        Ok(Output {
            status,
            stdout: std::fs::read(&out_path).unwrap_or_default(),
            stderr: std::fs::read(&err_path).unwrap_or_default(),
        })
    }

    /// Like [`CImageNode::output`], failing (with everything it printed) unless it exits 0;
    /// its stdout and stderr together (skopeo reports progress on stderr).
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{text}",
            out.status
        );
        Ok(text)
    }

    /// `skopeo copy docker://REFERENCE containers-storage:[vfs@…]NAME`: containers/image's
    /// `copy.Image`, the call CRI-O's image service makes. `reference` must name a local
    /// registry host (`127.0.0.1:…` or a namespace address), never a short name.
    pub fn skopeo_copy(&self, reference: &str, name: &str) -> Result<String> {
        check_reference(reference)?;
        let src = format!("docker://{reference}");
        let dest = self.storage_ref(name);
        self.run(
            "skopeo",
            &[
                "--debug",
                "copy",
                "--retry-times",
                "0",
                "--policy",
                "/etc/containers/policy.json",
                &src,
                &dest,
            ],
        )
    }

    /// `skopeo inspect --raw docker://REFERENCE`: the manifest as the client resolved it.
    pub fn skopeo_inspect_raw(&self, reference: &str) -> Result<String> {
        check_reference(reference)?;
        self.run(
            "skopeo",
            &[
                "inspect",
                "--raw",
                "--retry-times",
                "0",
                &format!("docker://{reference}"),
            ],
        )
    }

    /// `podman pull REFERENCE` into the node's store; the image ID it prints.
    pub fn podman_pull(&self, reference: &str) -> Result<String> {
        check_reference(reference)?;
        let root = self.root();
        let runroot = self.runroot();
        let tmp = self.dir.join("storage/tmp");
        let out = self.run(
            "podman",
            &[
                "--root",
                &root.to_string_lossy(),
                "--runroot",
                &runroot.to_string_lossy(),
                "--storage-driver",
                "vfs",
                "--tmpdir",
                &tmp.to_string_lossy(),
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
                "pull",
                "--quiet",
                reference,
            ],
        )?;
        // `--quiet` prints only the ID, but warnings may come first on stderr.
        match out.lines().rev().find(|l| is_image_id(l.trim())) {
            Some(id) => Ok(id.trim().to_owned()),
            None => bail!("podman pull {reference} printed no image ID:\n{out}"),
        }
    }
}

fn is_image_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// References name a registry host with a port or an IP (a local registry), never a short
/// name or a public registry: a test must not send traffic off the machine.
fn check_reference(reference: &str) -> Result<()> {
    let host = reference.split('/').next().unwrap_or_default();
    let local = host.starts_with("127.")
        || host.starts_with("localhost:")
        || host.starts_with("10.250.")
        || host.starts_with("[::1]");
    ensure!(
        local && reference.contains('/'),
        "{reference:?}: tests pull from a local registry only (127.x, localhost:port or a rig address)"
    );
    Ok(())
}
