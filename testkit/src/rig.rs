//! Driving the namespace-node rig (`tests/rig/rig.sh`) from Rust tests: bring it up, push
//! images, start daemons, pull with CRI or `ctr`, read the upstream access log, audit files and
//! metrics. The scenarios live in the test files (`tests/rig/cluster.rs`, `tests/rig/coalesce.rs`,
//! `tests/rig/tenancy.rs`); one rig exists per machine at a time (the machine-wide lock).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// How long any single wait in rig tests may take.
pub const WAIT: Duration = Duration::from_secs(120);

/// Keeps one test binary's rig tests serial (the machine-wide lock orders binaries).
static SERIAL: Mutex<()> = Mutex::new(());

/// One Prometheus series, matched by name and a subset of its labels (values compared without
/// regard to case, since label enums may render as `Peer` or `peer`).
pub struct Series {
    pub name: &'static str,
    pub labels: &'static [(&'static str, &'static str)],
}

// ------------------------------------------------------------------------------------------------
// Driving the rig.

/// A running rig; `rig.sh down` when dropped. Holds the lock that keeps rig tests serial.
pub struct Rig {
    pub script: PathBuf,
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub started: Instant,
    // Field order matters: `Drop for Rig` runs `rig.sh down` first, then the fields drop, so the
    // machine-wide lock is released only after the rig is gone.
    pub _serial: MutexGuard<'static, ()>,
    pub _machine: std::fs::File,
    /// Extra environment for every rig call from now on (e.g. `RIG_RESOLVE_TAGS=false` before
    /// starting a node's daemon).
    pub extra_env: std::cell::RefCell<Vec<(String, String)>>,
}

impl Rig {
    /// Brings the rig up and pushes `images` (all when empty), or returns `None` after printing
    /// why the test is skipped.
    pub fn start(test: &str, images: &[&str]) -> Result<Option<Rig>> {
        Rig::start_with(test, images, &[])
    }

    /// [`Rig::start`] with extra rig environment from the start (`RIG_NODES`, `RIG_CACHE`, …),
    /// so that `rig.sh up` already sees it.
    pub fn start_with(test: &str, images: &[&str], env: &[(&str, &str)]) -> Result<Option<Rig>> {
        if std::env::var("SPECULUM_SKIP_RIG").as_deref() == Ok("1") {
            skip(test, "SPECULUM_SKIP_RIG=1");
            return Ok(None);
        }
        if !is_root()? {
            skip(
                test,
                "needs root for network namespaces (run the tests as root)",
            );
            return Ok(None);
        }
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let machine = machine_lock()?;
        let here = crate::repo_root();
        let rig = Rig {
            script: here.join("tests/rig/rig.sh"),
            dir: PathBuf::from(
                std::env::var("RIG_DIR").unwrap_or_else(|_| "/tmp/speculum-rig".to_string()),
            ),
            bin: std::env::var_os("SPECULUM_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| crate::cargo_bin("speculum")),
            started: Instant::now(),
            _serial: serial,
            _machine: machine,
            extra_env: std::cell::RefCell::new(
                env.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
        };
        rig.step(&format!("{test}: rig up"));
        rig.run(Command::new("bash").arg(&rig.script).arg("up"))?;
        rig.step("pushing images");
        let push = here.join("tests/rig/push-images.sh");
        rig.run(Command::new("bash").arg(push).args(images))?;
        Ok(Some(rig))
    }

    pub fn step(&self, what: &str) {
        eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// A command with the rig's environment.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("RIG_DIR", &self.dir)
            .env("SPECULUM_BIN", &self.bin)
            .stdin(Stdio::null());
        // These scenarios need three nodes; without this, `up` reuses the count a previous rig
        // user recorded in RIG_DIR/nodes (a 2-node bench run, say).
        if std::env::var_os("RIG_NODES").is_none() {
            cmd.env("RIG_NODES", "3");
        }
        for (k, v) in self.extra_env.borrow().iter() {
            cmd.env(k, v);
        }
    }

    /// Runs a command to completion; its stdout on success, everything it said on failure.
    pub fn run(&self, cmd: &mut Command) -> Result<String> {
        self.env(cmd);
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `bash -c 'source rig.sh; FUNCTION ARGS…'`, arguments passed as arguments (never quoted into
    /// a script).
    pub fn function(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#"source "$1" && shift && "$@""#)
            .arg("rig")
            .arg(&self.script)
            .args(args);
        cmd
    }

    pub fn call(&self, args: &[&str]) -> Result<String> {
        self.run(&mut self.function(args))
    }

    pub fn spawn(&self, args: &[&str]) -> Result<Child> {
        let mut cmd = self.function(args);
        self.env(&mut cmd);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {args:?}"))
    }

    pub fn images(&self) -> Result<BTreeMap<String, Image>> {
        let path = self.dir.join("images.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let file: ImagesFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(file
            .images
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect())
    }

    /// `speculum configure` (the node's hosts.toml now names the daemon), then `speculum registry`.
    pub fn start_speculum(&self, n: u32) -> Result<()> {
        let node = n.to_string();
        self.call(&["write_speculum_config", &node])?;
        self.call(&["configure_node", &node])?;
        let hosts = self
            .dir
            .join(format!("n{n}/certs.d/{}/hosts.toml", upstream_host()));
        let text = std::fs::read_to_string(&hosts)
            .with_context(|| format!("reading {}", hosts.display()))?;
        ensure!(
            text.contains("127.0.0.1:5080"),
            "`speculum configure` left node {n}'s hosts.toml without the mirror:\n{text}"
        );
        self.call(&["start_speculum", &node])?;
        self.step(&format!("speculum runs on node {n}"));
        Ok(())
    }

    /// CRI PullImage on node `n`; containerd must record the image under its pushed digest.
    pub fn cri_pull(&self, n: u32, reference: &str, want: &Image) -> Result<()> {
        let t0 = Instant::now();
        let out = self
            .call(&["cri_pull", &n.to_string(), reference])
            .with_context(|| format!("node {n}: CRI pull {reference}"))?;
        check_cri_result(&out, want).with_context(|| format!("node {n}: CRI pull {reference}"))?;
        self.step(&format!(
            "node {n}: CRI pulled {reference} in {:?}",
            t0.elapsed()
        ));
        Ok(())
    }

    /// `ctr images pull` on node `n`, through the node's hosts.toml.
    pub fn ctr_pull(&self, n: u32, reference: &str, want: &Image) -> Result<()> {
        let node = n.to_string();
        let t0 = Instant::now();
        self.call(&["ctr_pull", &node, reference])
            .with_context(|| format!("node {n}: ctr pull {reference}"))?;
        let got = self.call(&["image_digest", &node, reference])?;
        ensure!(
            got.trim() == want.digest,
            "node {n}: ctr recorded {reference} as {:?}, want {}",
            got.trim(),
            want.digest
        );
        self.step(&format!(
            "node {n}: ctr pulled {reference} in {:?}",
            t0.elapsed()
        ));
        Ok(())
    }

    /// Every blob of the image's amd64 closure is in node `n`'s store and hashes to its digest.
    pub fn verify_blobs(&self, n: u32, image: &Image) -> Result<()> {
        for blob in &image.blobs {
            self.call(&["content_verify", &n.to_string(), &blob.digest])
                .with_context(|| format!("node {n}: blob {} of {}", blob.digest, image.name))?;
        }
        Ok(())
    }

    /// GET requests in the upstream access log containing `pattern`, from node `n` or anyone.
    pub fn upstream_gets(&self, pattern: &str, node: Option<u32>) -> Result<u64> {
        let ip = node.map(node_ip).unwrap_or_default();
        let out = self.call(&["upstream_gets", pattern, &ip])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_gets printed {out:?}"))
    }

    /// Polls node `n`'s mirror endpoint until it answers 200 for the image's manifest `reference`.
    pub fn wait_mirror_finds(&self, n: u32, image: &Image, reference: &str) -> Result<()> {
        let node = n.to_string();
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < WAIT {
            last = self.call(&["mirror_status", &node, &image.repository, reference])?;
            if last.trim() == "200" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "node {n}'s mirror still answers {} for {}:{reference} after {WAIT:?}",
            last.trim(),
            image.repository
        )
    }

    pub fn set_env(&self, key: &str, value: &str) {
        let mut env = self.extra_env.borrow_mut();
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }

    /// Requests with `method` matching `pattern` in the upstream access log, from node `n`.
    pub fn upstream_requests(&self, method: &str, pattern: &str, n: u32) -> Result<u64> {
        let out = self.call(&["upstream_requests", method, pattern, &node_ip(n)])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_requests printed {out:?}"))
    }

    /// Like [`Rig::upstream_requests`], only requests whose user agent starts with `agent`
    /// (`containerd/`, or `speculum/` for the daemons' own tag HEADs).
    pub fn upstream_requests_by(
        &self,
        method: &str,
        pattern: &str,
        n: u32,
        agent: &str,
    ) -> Result<u64> {
        let out = self.call(&["upstream_requests", method, pattern, &node_ip(n), agent])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_requests printed {out:?}"))
    }

    /// Copies `src` to `dest` (`repo:tag`, both in the upstream registry) with skopeo and
    /// `extra` arguments; returns `dest`'s manifest digest.
    pub fn upstream_copy(&self, src: &str, dest: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["upstream_copy", src, dest];
        args.extend_from_slice(extra);
        Ok(self.call(&args)?.trim().to_owned())
    }

    /// Node `n`'s audit records (`nN/audit.jsonl`), polled until `done` holds for them (bounded:
    /// lines are written by the daemon's audit thread shortly after each body ends).
    pub fn audit(&self, n: u32, done: impl Fn(&[AuditLine]) -> bool) -> Result<Vec<AuditLine>> {
        let path = self.dir.join(format!("n{n}/audit.jsonl"));
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<AuditLine> = text
                .lines()
                .map(|l| serde_json::from_str(l).with_context(|| format!("audit line {l:?}")))
                .collect::<Result<_>>()?;
            if done(&lines) || t0.elapsed() > Duration::from_secs(10) {
                return Ok(lines);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The sum of the series matching `series` in node `n`'s `/metrics` (0 when absent).
    pub fn metric(&self, n: u32, series: &Series) -> Result<f64> {
        let text = self.call(&["speculum_metrics", &n.to_string()])?;
        Ok(sum_series(&text, series))
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.step("rig down");
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script).arg("down");
        if let Err(e) = self.run(&mut cmd) {
            eprintln!("rig.sh down failed: {e:#}");
        }
    }
}

/// The machine-wide rig lock (`flock(2)` on `$RIG_DIR.lock`, by default
/// `/tmp/speculum-rig.lock`, the same lock the shell's `flock /tmp/speculum-rig.lock …` and
/// `rig.sh up|down` take): the namespace names are fixed per `RIG_NS_PREFIX`, so only one rig
/// per `RIG_DIR` may exist at a time, whichever test binary or script brings it up. The
/// in-process `SERIAL` mutex alone only orders this binary's own tests.
pub fn machine_lock() -> Result<std::fs::File> {
    let dir = std::env::var("RIG_DIR").unwrap_or_else(|_| "/tmp/speculum-rig".to_string());
    let path = format!("{dir}.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {path}"))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {path}"));
        }
    }
    // `flock /tmp/speculum-rig.lock cargo test --test rig cluster::` already holds it for us: locking
    // again through our own open file would wait for our own ancestor forever.
    if held_by_ancestor(&file)? {
        return Ok(file);
    }
    // Blocks while another rig user holds it; the kernel releases it if that user dies.
    file.lock().with_context(|| format!("locking {path}"))?;
    Ok(file)
}

/// Whether a `flock` on `file` is held by this process's parent, grandparent, … (read from
/// `/proc/locks`, which names the holder's pid and the file's inode).
pub fn held_by_ancestor(file: &std::fs::File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let inode = file.metadata().context("stat of the rig lock")?.ino();
    let locks = std::fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
    let holders: Vec<u32> = locks
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; blocked waiters carry "->".
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let dev_inode = fields.get(5)?;
            (dev_inode.rsplit(':').next()? == inode.to_string())
                .then(|| fields.get(4)?.parse().ok())
                .flatten()
        })
        .collect();
    let mut pid = std::process::id();
    for _ in 0..64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            break;
        };
        // "pid (comm) state ppid …"; comm may hold spaces and parentheses, so cut at the last ')'.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            break;
        };
        if ppid <= 1 {
            break;
        }
        if holders.contains(&ppid) {
            return Ok(true);
        }
        pid = ppid;
    }
    Ok(false)
}

pub fn skip(test: &str, why: &str) {
    // Straight to the process's stderr: cargo's capture hides eprintln! of passing tests, and a
    // skip must never look like a silent pass.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

pub fn is_root() -> Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

pub fn node_ip(n: u32) -> String {
    format!("{}.{}", subnet(), 10 + n)
}

pub fn upstream_host() -> String {
    format!("{}.2:5000", subnet())
}

pub fn subnet() -> String {
    std::env::var("RIG_SUBNET").unwrap_or_else(|_| "10.250.77".to_string())
}

/// Waits for a child with a bound; kills it when the bound passes.
pub fn wait_child(mut child: Child, limit: Duration) -> Result<Output> {
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(child.wait_with_output()?)
}

/// cri-pull's JSON must list the image's by-digest reference among containerd's repo digests.
pub fn check_cri_result(out: &str, want: &Image) -> Result<()> {
    let got: CriResult =
        serde_json::from_str(out.trim()).with_context(|| format!("cri-pull printed {out:?}"))?;
    ensure!(
        got.repo_digests.iter().any(|d| d == &want.by_digest),
        "containerd recorded {:?}, want {}",
        got.repo_digests,
        want.by_digest
    );
    Ok(())
}

pub fn image_named<'a>(images: &'a BTreeMap<String, Image>, name: &str) -> Result<&'a Image> {
    images
        .get(name)
        .with_context(|| format!("images.json has no image {name:?}"))
}

// ------------------------------------------------------------------------------------------------
// What push-images.sh and cri-pull write.

#[derive(Deserialize)]
pub struct ImagesFile {
    pub images: Vec<Image>,
}

#[derive(Deserialize, Clone)]
pub struct Image {
    pub name: String,
    pub repository: String,
    /// Of the top-level manifest or index.
    pub digest: String,
    /// `registry/repository@digest`.
    pub by_digest: String,
    /// Tag → `registry/repository:tag`.
    pub refs: BTreeMap<String, String>,
    /// The amd64 closure: index (if any), manifest, config, layers.
    pub blobs: Vec<Blob>,
}

#[derive(Deserialize, Clone)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl Image {
    pub fn tag(&self, tag: &str) -> Result<&str> {
        self.refs
            .get(tag)
            .map(String::as_str)
            .with_context(|| format!("image {} has no tag {tag}", self.name))
    }

    pub fn layers(&self) -> impl Iterator<Item = &Blob> {
        self.blobs
            .iter()
            .filter(|b| b.media_type.contains("layer") || b.media_type.contains("rootfs"))
    }

    pub fn layer_bytes(&self) -> u64 {
        self.layers().map(|b| b.size).sum()
    }
}

/// The audit fields these tests look at (docs/audit.md has them all).
#[derive(Deserialize, Debug, Clone)]
pub struct AuditLine {
    pub source: String,
    pub repository: String,
    pub reference: String,
    pub kind: String,
    pub decision: String,
    pub reason: String,
    pub served_from: String,
    pub status: u16,
    pub bytes: u64,
    /// Peer endpoint: the node the requesting daemon proved (tenancy).
    #[serde(default)]
    pub requester: Option<String>,
    /// The grant (`namespace/pod`) a private object was served under.
    #[serde(default)]
    pub grant: Option<String>,
    /// Tag requests: who named the digest (`upstream`, `cluster`, `stale`).
    #[serde(default)]
    pub tag_source: Option<String>,
    #[serde(default)]
    pub tag_upstream: Option<String>,
    #[serde(default)]
    pub digest: Option<String>,
}

#[derive(Deserialize)]
pub struct CriResult {
    pub repo_digests: Vec<String>,
}

// ------------------------------------------------------------------------------------------------
// Reading the Prometheus text format, just enough to sum counters.

/// Sums every sample of `series.name` whose labels include `series.labels`.
pub fn sum_series(text: &str, series: &Series) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|(name, labels, _)| {
            name == series.name
                && series.labels.iter().all(|(k, v)| {
                    labels
                        .iter()
                        .any(|(lk, lv)| lk == k && lv.eq_ignore_ascii_case(v))
                })
        })
        .map(|(_, _, value)| value)
        .sum()
}

/// One line of the text format: `name{labels} value`.
type Sample = (String, Vec<(String, String)>, f64);

/// `name{k="v",…} value [timestamp]` → (name, labels, value); `None` for anything else.
pub fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (head, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            let labels = parse_labels(line.get(open + 1..close)?)?;
            (
                (line.get(..open)?.to_string(), labels),
                line.get(close + 1..)?,
            )
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            ((name.to_string(), Vec::new()), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((head.0, head.1, value))
}

pub fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}
