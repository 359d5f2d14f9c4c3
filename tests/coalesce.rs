//! Cold pulls coalesced, end to end on the namespace rig (`tests/rig/`): four nodes, each with
//! its own real containerd and a speculum daemon with the blob cache on (`RIG_CACHE=1`), and a
//! real upstream registry.
//!
//! One job: prove from the outside — CRI PullImage on every node at the same moment, digests
//! containerd recorded, and the upstream registry's access log — that a cold image is fetched
//! from upstream **once per blob** for the whole cluster, and that killing the fetching node's
//! daemon mid-blob does not fail the other pulls.
//!
//! Needs root (network namespaces); skips (saying so on stderr) otherwise or with
//! `SPECULUM_SKIP_RIG=1`. Knobs: `RIG_BIG_MB` (big layer, default 64 here), `RIG_DIR`,
//! `SPECULUM_BIN`, `RIG_COALESCE_KILL_RATE` (upstream link rate during the kill test, default
//! 100mbit). Shares the machine-wide rig lock with tests/cluster.rs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

const NODES: u32 = 4;
/// The longest one pull may take (a big layer over a 100 Mbit upstream on 2 shared cores).
const PULL_WAIT: Duration = Duration::from_secs(300);
/// Bound of the wait for every node to know every other.
const MESH_WAIT: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

/// Four nodes pull the same cold images at the same moment (CRI PullImage, all at once): every
/// pull succeeds with the pushed digest and every blob re-verifies, and the upstream access
/// log shows exactly one GET per blob (config and layers; manifests are resolved by each
/// containerd itself and are not blobs).
#[test]
fn four_cold_pulls_fetch_each_blob_once() -> Result<()> {
    let Some(rig) = Rig::start(
        "four_cold_pulls_fetch_each_blob_once",
        &["small", "big"],
        &[],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    rig.start_all()?;
    for name in ["small", "big"] {
        let image = image_named(&images, name)?;
        rig.step(&format!("every node pulls {name}:v1 at once"));
        rig.pull_everywhere(image, &[])?;
        for blob in image.blobs.iter().filter(|b| !is_manifest(b)) {
            let gets = rig.upstream_gets(&format!("/blobs/{}", blob.digest))?;
            ensure!(
                gets == 1,
                "blob {} ({} bytes) of {name} was fetched {gets} times from upstream, want exactly once",
                blob.digest,
                blob.size
            );
        }
        rig.step(&format!("{name}: one upstream GET per blob"));
    }
    let followers: f64 = (1..=NODES)
        .map(|n| rig.metric(n, "speculum_cache_coalesced_followers_total"))
        .sum::<Result<f64>>()?;
    let saved: f64 = (1..=NODES)
        .map(|n| rig.metric(n, "speculum_upstream_saved_bytes_total"))
        .sum::<Result<f64>>()?;
    let big = image_named(&images, "big")?;
    ensure!(
        saved >= 3.0 * big.layer_bytes() as f64,
        "the cache saved {saved} upstream bytes, want at least 3 nodes × {} layer bytes of big",
        big.layer_bytes()
    );
    rig.step(&format!(
        "metrics: {followers} coalesced followers, {saved} upstream bytes saved"
    ));
    Ok(())
}

/// Four nodes pull the big image at once over a slow upstream link; the node that fetches the
/// big layer from upstream has its daemon SIGKILLed mid-blob. The other nodes' pulls must still
/// succeed (PullImage retried as the kubelet would, at most 3 attempts) with verified blobs.
#[test]
fn pulls_survive_the_fetching_node_dying_mid_blob() -> Result<()> {
    let rate = std::env::var("RIG_COALESCE_KILL_RATE").unwrap_or_else(|_| "100mbit".to_owned());
    let Some(rig) = Rig::start(
        "pulls_survive_the_fetching_node_dying_mid_blob",
        &["big"],
        &[("RIG_UPSTREAM_RATE", rate.as_str())],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let big = image_named(&images, "big")?;
    let layer = big
        .layers()
        .max_by_key(|b| b.size)
        .context("the big image has no layers")?
        .clone();
    rig.start_all()?;
    rig.step("every node pulls big:v1 at once");
    let pulls: Vec<(u32, Child)> = (1..=NODES)
        .map(|n| Ok((n, rig.spawn(&["cri_pull", &n.to_string(), big.tag("v1")?])?)))
        .collect::<Result<_>>()?;
    // The fetcher is whoever GETs the layer from upstream; wait until a quarter has arrived
    // somewhere (bounded), then kill that node's daemon.
    let t0 = Instant::now();
    let fetcher = loop {
        let mut who = None;
        for n in 1..=NODES {
            if rig.upstream_gets_from(&format!("/blobs/{}", layer.digest), n)? > 0 {
                who = Some(n);
            }
        }
        let ingest: u64 = (1..=NODES)
            .map(|n| {
                rig.call(&["ingest_bytes", &n.to_string()])
                    .map(|s| s.trim().parse::<u64>().unwrap_or(0))
            })
            .sum::<Result<u64>>()?;
        if let Some(n) = who
            && ingest >= layer.size / 4
        {
            break n;
        }
        ensure!(
            t0.elapsed() < PULL_WAIT,
            "no node fetched a quarter of the big layer within {PULL_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    rig.call(&["stop_speculum", &fetcher.to_string(), "KILL"])?;
    rig.step(&format!(
        "node {fetcher}'s daemon (the fetcher) killed mid-blob"
    ));
    for (n, pull) in pulls {
        let mut outcome = wait_child(pull, PULL_WAIT)?;
        let mut attempts = 1;
        while !outcome.status.success() && attempts < 3 {
            rig.step(&format!(
                "node {n}: attempt {attempts} failed ({}), retrying like the kubelet",
                String::from_utf8_lossy(&outcome.stderr).trim()
            ));
            attempts += 1;
            outcome = wait_child(
                rig.spawn(&["cri_pull", &n.to_string(), big.tag("v1")?])?,
                PULL_WAIT,
            )?;
        }
        if n == fetcher {
            rig.step(&format!(
                "node {n} (daemon killed): pull success = {}",
                outcome.status.success()
            ));
            continue;
        }
        ensure!(
            outcome.status.success(),
            "node {n}'s pull failed {attempts} times: {}",
            String::from_utf8_lossy(&outcome.stderr)
        );
        check_cri_result(&String::from_utf8_lossy(&outcome.stdout), big)?;
        rig.verify_blobs(n, big)?;
        rig.step(&format!(
            "node {n}: complete and verified after {attempts} attempt(s)"
        ));
    }
    let gets = rig.upstream_gets(&format!("/blobs/{}", layer.digest))?;
    rig.step(&format!(
        "upstream GETs of the big layer: {gets} (1 before the kill, resumes after)"
    ));
    Ok(())
}

fn is_manifest(b: &Blob) -> bool {
    b.media_type.contains("manifest") || b.media_type.contains("index")
}

// ------------------------------------------------------------------------------------------------
// The rig, driven through tests/rig/rig.sh (a trimmed copy of tests/cluster.rs's helper).

struct Rig {
    script: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    started: Instant,
    env: Vec<(String, String)>,
    // Field order matters: `Drop for Rig` runs `rig.sh down` first, then the locks drop.
    _serial: MutexGuard<'static, ()>,
    _machine: std::fs::File,
}

impl Rig {
    fn start(test: &str, images: &[&str], env: &[(&str, &str)]) -> Result<Option<Rig>> {
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
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let machine = machine_lock()?;
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut vars: Vec<(String, String)> = vec![
            ("RIG_NODES".into(), NODES.to_string()),
            ("RIG_CACHE".into(), "1".into()),
            (
                "RIG_BIG_MB".into(),
                std::env::var("RIG_BIG_MB").unwrap_or_else(|_| "64".into()),
            ),
        ];
        vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let rig = Rig {
            script: here.join("tests/rig/rig.sh"),
            dir: PathBuf::from(
                std::env::var("RIG_DIR").unwrap_or_else(|_| "/tmp/speculum-rig".to_string()),
            ),
            bin: std::env::var_os("SPECULUM_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_speculum"))),
            started: Instant::now(),
            env: vars,
            _serial: serial,
            _machine: machine,
        };
        rig.step(&format!("{test}: rig up"));
        rig.run(Command::new("bash").arg(&rig.script).arg("up"))?;
        rig.step("pushing images");
        rig.run(
            Command::new("bash")
                .arg(here.join("tests/rig/push-images.sh"))
                .args(images),
        )?;
        Ok(Some(rig))
    }

    fn step(&self, what: &str) {
        eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn apply_env(&self, cmd: &mut Command) {
        cmd.env("RIG_DIR", &self.dir)
            .env("SPECULUM_BIN", &self.bin)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }

    fn run(&self, cmd: &mut Command) -> Result<String> {
        self.apply_env(cmd);
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

    fn function(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#"source "$1" && shift && "$@""#)
            .arg("rig")
            .arg(&self.script)
            .args(args);
        cmd
    }

    fn call(&self, args: &[&str]) -> Result<String> {
        self.run(&mut self.function(args))
    }

    fn spawn(&self, args: &[&str]) -> Result<Child> {
        let mut cmd = self.function(args);
        self.apply_env(&mut cmd);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {args:?}"))
    }

    fn images(&self) -> Result<BTreeMap<String, Image>> {
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

    /// Configures and starts every node's daemon, then waits (bounded) until each one is
    /// connected to every other: the claim's coordinator is chosen among known nodes.
    fn start_all(&self) -> Result<()> {
        for n in 1..=NODES {
            let node = n.to_string();
            self.call(&["write_speculum_config", &node])?;
            self.call(&["configure_node", &node])?;
            self.call(&["start_speculum", &node])?;
        }
        let t0 = Instant::now();
        for n in 1..=NODES {
            loop {
                let peers = self.metric(n, "speculum_routing_peers")?;
                if peers >= f64::from(NODES - 1) {
                    break;
                }
                ensure!(
                    t0.elapsed() < MESH_WAIT,
                    "node {n} knows {peers} peers after {MESH_WAIT:?}, want {}",
                    NODES - 1
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        self.step(&format!("{NODES} daemons up, fully connected"));
        Ok(())
    }

    /// CRI PullImage of `image` on every node at once; each must succeed with the pushed digest
    /// and every blob must re-verify in each node's store.
    fn pull_everywhere(&self, image: &Image, _env: &[(&str, &str)]) -> Result<()> {
        let t0 = Instant::now();
        let pulls: Vec<(u32, Child)> = (1..=NODES)
            .map(|n| {
                Ok((
                    n,
                    self.spawn(&["cri_pull", &n.to_string(), image.tag("v1")?])?,
                ))
            })
            .collect::<Result<_>>()?;
        for (n, pull) in pulls {
            let out = wait_child(pull, PULL_WAIT)?;
            ensure!(
                out.status.success(),
                "node {n}: pull of {} failed: {}",
                image.name,
                String::from_utf8_lossy(&out.stderr)
            );
            check_cri_result(&String::from_utf8_lossy(&out.stdout), image)?;
            self.verify_blobs(n, image)?;
        }
        self.step(&format!(
            "{} pulled on {NODES} nodes at once in {:?}, all verified",
            image.name,
            t0.elapsed()
        ));
        Ok(())
    }

    fn verify_blobs(&self, n: u32, image: &Image) -> Result<()> {
        for blob in &image.blobs {
            self.call(&["content_verify", &n.to_string(), &blob.digest])
                .with_context(|| format!("node {n}: blob {} of {}", blob.digest, image.name))?;
        }
        Ok(())
    }

    fn upstream_gets(&self, pattern: &str) -> Result<u64> {
        let out = self.call(&["upstream_gets", pattern])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_gets printed {out:?}"))
    }

    fn upstream_gets_from(&self, pattern: &str, n: u32) -> Result<u64> {
        let out = self.call(&["upstream_gets", pattern, &node_ip(n)])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_gets printed {out:?}"))
    }

    /// The sum of every sample of metric `name` on node `n` (0 when absent).
    fn metric(&self, n: u32, name: &str) -> Result<f64> {
        let text = self.call(&["speculum_metrics", &n.to_string()])?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                (metric == name)
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum())
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

/// The machine-wide rig lock (`flock(2)` on `/tmp/speculum-rig.lock`, the same lock the shell's
/// `flock /tmp/speculum-rig.lock …` takes): the namespace names are fixed, so only one rig may
/// exist on the machine at a time, whichever test binary or script brings it up. The in-process
/// `SERIAL` mutex alone only orders this binary's own tests.
fn machine_lock() -> Result<std::fs::File> {
    const PATH: &str = "/tmp/speculum-rig.lock";
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PATH)
        .with_context(|| format!("opening {PATH}"))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {PATH}"));
        }
    }
    // `flock /tmp/speculum-rig.lock cargo test --test cluster` already holds it for us: locking
    // again through our own open file would wait for our own ancestor forever.
    if held_by_ancestor(&file)? {
        return Ok(file);
    }
    // Blocks while another rig user holds it; the kernel releases it if that user dies.
    file.lock().with_context(|| format!("locking {PATH}"))?;
    Ok(file)
}

/// Whether a `flock` on `file` is held by this process's parent, grandparent, … (read from
/// `/proc/locks`, which names the holder's pid and the file's inode).
fn held_by_ancestor(file: &std::fs::File) -> Result<bool> {
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

fn skip(test: &str, why: &str) {
    // Straight to the process's stderr: cargo's capture hides eprintln! of passing tests, and a
    // skip must never look like a silent pass.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

fn is_root() -> Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn node_ip(n: u32) -> String {
    format!("{}.{}", subnet(), 10 + n)
}

fn subnet() -> String {
    std::env::var("RIG_SUBNET").unwrap_or_else(|_| "10.250.77".to_string())
}

/// Waits for a child with a bound; kills it when the bound passes.
fn wait_child(mut child: Child, limit: Duration) -> Result<Output> {
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
fn check_cri_result(out: &str, want: &Image) -> Result<()> {
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

fn image_named<'a>(images: &'a BTreeMap<String, Image>, name: &str) -> Result<&'a Image> {
    images
        .get(name)
        .with_context(|| format!("images.json has no image {name:?}"))
}

// ------------------------------------------------------------------------------------------------
// What push-images.sh and cri-pull write.

#[derive(Deserialize)]
struct ImagesFile {
    images: Vec<Image>,
}

#[derive(Deserialize, Clone)]
#[allow(dead_code)] // the whole record push-images.sh writes; not every field is read here
struct Image {
    name: String,
    repository: String,
    /// Of the top-level manifest or index.
    digest: String,
    /// `registry/repository@digest`.
    by_digest: String,
    /// Tag → `registry/repository:tag`.
    refs: BTreeMap<String, String>,
    /// The amd64 closure: index (if any), manifest, config, layers.
    blobs: Vec<Blob>,
}

#[derive(Deserialize, Clone)]
struct Blob {
    digest: String,
    size: u64,
    media_type: String,
}

impl Image {
    fn tag(&self, tag: &str) -> Result<&str> {
        self.refs
            .get(tag)
            .map(String::as_str)
            .with_context(|| format!("image {} has no tag {tag}", self.name))
    }

    fn layers(&self) -> impl Iterator<Item = &Blob> {
        self.blobs
            .iter()
            .filter(|b| b.media_type.contains("layer") || b.media_type.contains("rootfs"))
    }

    fn layer_bytes(&self) -> u64 {
        self.layers().map(|b| b.size).sum()
    }
}

#[derive(Deserialize)]
struct CriResult {
    repo_digests: Vec<String>,
}
