//! The cluster scenario, end to end, on the network-namespace rig (`tests/rig/`): three nodes,
//! each with its own real containerd and a speculum daemon, and a real upstream registry.
//!
//! One job: prove from the outside — CRI PullImage and `ctr` pulls, digests recorded by
//! containerd, the upstream registry's access log and the daemons' own metrics — that nodes
//! serve each other's content, that pulls keep working when the upstream is gone, that content
//! nobody has still comes from upstream, and that a peer dying mid-transfer does not leave a node
//! without its image. The rig itself (namespaces, images, plain pulls) is proven by
//! `tests/rig/selftest.sh`; this file only drives `tests/rig/rig.sh` through its functions.
//!
//! Needs root (network namespaces). When not root, or with `SPECULUM_SKIP_RIG=1`, every test
//! prints why it skipped, on stderr past cargo's capture, and returns.
//! Knobs: `RIG_BIG_MB` (size of the big layer, default 200), `RIG_DIR`, `SPECULUM_BIN` (default:
//! the `speculum` binary cargo built for this test), `RIG_KILL_RATE` (node 1's link rate while the
//! mid-transfer kill happens, default 400mbit).
//!
//! The tests share one rig (the namespace names are fixed), so they run one at a time.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

/// One Prometheus series, matched by name and a subset of its labels (values compared without
/// regard to case, since label enums may render as `Peer` or `peer`).
struct Series {
    name: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

// Names from src/metrics.rs (registry prefix `speculum`, counters get `_total`).
/// Bytes a daemon's mirror endpoint sent to its containerd that came from another node.
const PEER_BYTES: Series = Series {
    name: "speculum_served_bytes_total",
    labels: &[("handler", "mirror"), ("source", "peer")],
};
/// Bytes a daemon's peer endpoint sent to other nodes from its own content store.
const SERVED_TO_PEERS: Series = Series {
    name: "speculum_served_bytes_total",
    labels: &[("handler", "peer"), ("source", "local")],
};
/// Mirror requests nobody in the cluster could answer (containerd then went upstream).
const MIRROR_MISSES: Series = Series {
    name: "speculum_mirror_requests_total",
    labels: &[("outcome", "miss")],
};

/// How long any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(120);
/// The longest a single pull of the big image may take (a 200 MiB layer on 2 shared cores).
const PULL_WAIT: Duration = Duration::from_secs(300);

static SERIAL: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------------------------------------
// The scenario from the issue.

/// Node 1 pulls everything through its daemon (from upstream); the upstream registry stops;
/// nodes 2 and 3 pull the same images by tag and by digest, with CRI and ctr, and get them from
/// node 1. Then an image nobody has is pulled with the upstream back: it comes from upstream.
#[test]
fn peers_serve_pulls_once_upstream_is_gone() -> Result<()> {
    let Some(rig) = Rig::start("peers_serve_pulls_once_upstream_is_gone", &[])? else {
        return Ok(());
    };
    let images = rig.images()?;
    for n in 1..=3 {
        rig.start_speculum(n)?;
    }

    rig.step("node 1 pulls every image except `late` through its daemon, from upstream");
    let shared: Vec<&Image> = images.values().filter(|i| i.name != "late").collect();
    for image in &shared {
        if image.name == "docker" {
            rig.ctr_pull(1, image.tag("v1")?, image)?;
        } else {
            rig.cri_pull(1, image.tag("v1")?, image)?;
        }
    }
    let tags = image_named(&images, "tags")?;
    rig.ctr_pull(1, tags.tag("latest")?, tags)?;
    for image in &shared {
        for blob in image.layers() {
            let gets = rig.upstream_gets(&blob.digest, Some(1))?;
            ensure!(
                gets >= 1,
                "node 1 never fetched layer {} of {} from upstream",
                blob.digest,
                image.name
            );
        }
    }

    rig.step("waiting until nodes 2 and 3 can find node 1's content");
    for n in [2, 3] {
        for image in &shared {
            rig.wait_mirror_finds(n, image, &image.digest)?;
            rig.wait_mirror_finds(n, image, "v1")?;
        }
    }

    rig.step("stopping the upstream registry");
    rig.call(&["stop_upstream"])?;

    rig.step("node 2 pulls by tag (CRI, and ctr for `docker`), node 3 by digest (CRI, and ctr for `small`)");
    for image in &shared {
        if image.name == "docker" {
            rig.ctr_pull(2, image.tag("v1")?, image)?;
        } else {
            rig.cri_pull(2, image.tag("v1")?, image)?;
        }
        if image.name == "small" {
            rig.ctr_pull(3, &image.by_digest, image)?;
        } else {
            rig.cri_pull(3, &image.by_digest, image)?;
        }
    }
    rig.cri_pull(2, tags.tag("latest")?, tags)?;
    for n in [2, 3] {
        for image in &shared {
            rig.verify_blobs(n, image)?;
        }
    }

    rig.step("checking where the bytes came from");
    let layer_bytes: u64 = shared.iter().map(|i| i.layer_bytes()).sum();
    for n in [2, 3] {
        let gets = rig.upstream_gets("/v2/", Some(n))?;
        ensure!(
            gets == 0,
            "node {n} sent {gets} GETs to the upstream registry"
        );
        let from_peers = rig.metric(n, &PEER_BYTES)?;
        ensure!(
            from_peers >= layer_bytes as f64,
            "node {n}'s daemon reports {from_peers} bytes from peers, want at least the {layer_bytes} \
             bytes of layers it pulled"
        );
    }
    // Node 2 pulled while node 1 alone held the images; node 3 may have been served by either.
    let served_by_1 = rig.metric(1, &SERVED_TO_PEERS)?;
    let served_by_2 = rig.metric(2, &SERVED_TO_PEERS)?;
    ensure!(
        served_by_1 >= layer_bytes as f64,
        "node 1's daemon reports {served_by_1} bytes served to peers, want at least node 2's \
         {layer_bytes} bytes of layers"
    );
    ensure!(
        served_by_1 + served_by_2 >= 2.0 * layer_bytes as f64,
        "nodes 1 and 2 report {} bytes served to peers, want at least {} (nodes 2 and 3's layers)",
        served_by_1 + served_by_2,
        2 * layer_bytes
    );

    rig.step("nobody has `late`: with the upstream back, node 2 pulls it from there");
    rig.call(&["start_upstream"])?;
    let misses_before = rig.metric(2, &MIRROR_MISSES)?;
    let late = image_named(&images, "late")?;
    rig.cri_pull(2, late.tag("v1")?, late)?;
    rig.verify_blobs(2, late)?;
    for blob in late.layers() {
        ensure!(
            rig.upstream_gets(&blob.digest, Some(2))? >= 1,
            "node 2 got layer {} of `late` without asking upstream: from where?",
            blob.digest
        );
    }
    let misses = rig.metric(2, &MIRROR_MISSES)?;
    ensure!(
        misses > misses_before,
        "node 2's daemon recorded no mirror miss for `late` ({misses_before} → {misses})"
    );
    rig.step("done");
    Ok(())
}

/// Node 2 pulls the big image while node 1 (the only node holding it) streams it; node 1's daemon
/// is SIGKILLed mid-transfer. Node 2 must still end with the complete, digest-verified image
/// (from upstream, resuming where the peer stopped), retrying PullImage as the kubelet would.
#[test]
fn pull_completes_when_the_serving_peer_dies_mid_transfer() -> Result<()> {
    let Some(rig) = Rig::start(
        "pull_completes_when_the_serving_peer_dies_mid_transfer",
        &["big"],
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
    for n in 1..=2 {
        rig.start_speculum(n)?;
    }

    rig.step("node 1 pulls the big image (through its daemon, from upstream)");
    rig.cri_pull(1, big.tag("v1")?, big)?;
    rig.wait_mirror_finds(2, big, &big.digest)?;

    // Slow node 1's link so the transfer lasts long enough to be interrupted half way.
    let rate = std::env::var("RIG_KILL_RATE").unwrap_or_else(|_| "400mbit".to_string());
    rig.call(&["shape_node", "1", &rate])?;

    rig.step("node 2 starts pulling; node 1's daemon is killed mid-transfer");
    let mut pull = rig.spawn(&["cri_pull", "2", big.tag("v1")?])?;
    let started = Instant::now();
    let threshold = layer.size / 4;
    loop {
        let ingest = rig
            .call(&["ingest_bytes", "2"])?
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        if ingest >= threshold {
            break;
        }
        if pull.try_wait()?.is_some() {
            bail!(
                "node 2's pull ended before a quarter of the layer arrived: lower RIG_KILL_RATE \
                 (now {rate}) so the kill lands mid-transfer"
            );
        }
        ensure!(
            started.elapsed() < WAIT,
            "node 2 received only {ingest} of {} bytes in {WAIT:?}",
            layer.size
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let upstream_before_kill = rig.upstream_gets(&layer.digest, Some(2))?;
    ensure!(
        upstream_before_kill == 0,
        "node 2 was fetching the big layer from upstream, not from node 1"
    );
    rig.call(&["stop_speculum", "1", "KILL"])?;
    rig.call(&["unshape_node", "1"])?;
    rig.step("node 1's daemon killed");

    // containerd 1.6 fails a PullImage whose body breaks; the kubelet retries, and containerd
    // resumes from its partial download with a Range request. Allow what the kubelet would.
    let mut attempts = 1;
    let mut outcome = wait_child(pull, PULL_WAIT)?;
    while !outcome.status.success() && attempts < 3 {
        rig.step(&format!(
            "attempt {attempts} failed ({}), retrying like the kubelet",
            String::from_utf8_lossy(&outcome.stderr).trim()
        ));
        attempts += 1;
        outcome = wait_child(rig.spawn(&["cri_pull", "2", big.tag("v1")?])?, PULL_WAIT)?;
    }
    ensure!(
        outcome.status.success(),
        "node 2's pull failed {attempts} times: {}",
        String::from_utf8_lossy(&outcome.stderr)
    );
    check_cri_result(&String::from_utf8_lossy(&outcome.stdout), big)?;
    rig.verify_blobs(2, big)?;
    // Node 1 was the only other holder, so the rest can only have come from upstream: a GET
    // there proves the kill really cut the transfer short.
    let upstream_after_kill = rig.upstream_gets(&layer.digest, Some(2))?;
    ensure!(
        upstream_after_kill >= 1,
        "node 2 completed without asking upstream: the kill did not interrupt the transfer \
         (lower RIG_KILL_RATE, now {rate})"
    );
    rig.step(&format!(
        "node 2 has the complete image after {attempts} PullImage attempt(s); the rest came from \
         upstream ({upstream_after_kill} GET(s) of the layer)"
    ));
    Ok(())
}

/// The tag switches, end to end. Nodes 1 and 2 run with `resolveLatestTag=false`, node 3 with
/// `resolveTags=false`. Node 1 pulls `tags:v1` (from upstream). Node 2 pulls `tags:latest`:
/// containerd really resolves `latest` upstream (a HEAD from node 2 in the registry's log) while
/// every blob comes from node 1; then `tags:v1` resolves through the cluster (no upstream
/// request for it). Node 3's hosts.toml only has `capabilities = ["pull"]`, so its `v1`
/// resolves upstream and its content comes from peers. The audit files say so, and account for
/// every byte the daemons' metrics counted as served from peers.
#[test]
fn tag_switches_latest_and_tags_resolve_upstream_content_from_peers() -> Result<()> {
    let Some(rig) = Rig::start(
        "tag_switches_latest_and_tags_resolve_upstream_content_from_peers",
        &["tags"],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let tags = image_named(&images, "tags")?;
    rig.set_env("RIG_RESOLVE_LATEST_TAG", "false");
    rig.start_speculum(1)?;
    rig.start_speculum(2)?;
    rig.set_env("RIG_RESOLVE_LATEST_TAG", "true");
    rig.set_env("RIG_RESOLVE_TAGS", "false");
    rig.start_speculum(3)?;
    let hosts3 = std::fs::read_to_string(
        rig.dir
            .join(format!("n3/certs.d/{}/hosts.toml", upstream_host())),
    )?;
    ensure!(
        hosts3.contains(r#"capabilities = ["pull"]"#),
        "resolveTags=false must configure pull only:\n{hosts3}"
    );

    rig.step("node 1 pulls tags:v1 (from upstream)");
    rig.ctr_pull(1, tags.tag("v1")?, tags)?;
    rig.wait_mirror_finds(2, tags, &tags.digest)?;
    rig.wait_mirror_finds(2, tags, "v1")?;
    let status = rig.call(&["mirror_status", "2", &tags.repository, "latest"])?;
    ensure!(
        status.trim() == "404",
        "node 2 must not resolve latest, answered {status}"
    );

    rig.step("node 2 pulls tags:latest: resolved upstream, content from node 1");
    rig.ctr_pull(2, tags.tag("latest")?, tags)?;
    ensure!(
        rig.upstream_requests("HEAD", "/manifests/latest", 2)?
            + rig.upstream_requests("GET", "/manifests/latest", 2)?
            >= 1,
        "node 2's containerd never asked upstream for latest"
    );
    for blob in tags.layers() {
        ensure!(
            rig.upstream_gets(&blob.digest, Some(2))? == 0,
            "node 2 fetched layer {} from upstream",
            blob.digest
        );
    }
    rig.step("node 2 pulls tags:v1: resolved by the cluster");
    rig.ctr_pull(2, tags.tag("v1")?, tags)?;
    ensure!(
        rig.upstream_requests("HEAD", "/manifests/v1", 2)?
            + rig.upstream_requests("GET", "/manifests/v1", 2)?
            == 0,
        "node 2 asked upstream for v1 although the cluster resolves it"
    );

    rig.step("node 3 (resolveTags=false) pulls tags:v1: tag upstream, content from peers");
    rig.ctr_pull(3, tags.tag("v1")?, tags)?;
    ensure!(
        rig.upstream_requests("HEAD", "/manifests/v1", 3)?
            + rig.upstream_requests("GET", "/manifests/v1", 3)?
            >= 1,
        "node 3's containerd never resolved v1 upstream"
    );
    for blob in tags.layers() {
        ensure!(
            rig.upstream_gets(&blob.digest, Some(3))? == 0,
            "node 3 fetched layer {} from upstream",
            blob.digest
        );
    }

    rig.step("reading the audit files");
    let peer_bytes_2 = rig.metric(2, &PEER_BYTES)?;
    let audit2 = rig.audit(2, |lines| {
        let bytes: u64 = lines
            .iter()
            .filter(|l| l.source == "containerd" && l.served_from == "peer")
            .map(|l| l.bytes)
            .sum();
        bytes as f64 >= peer_bytes_2
    })?;
    let latest: Vec<&AuditLine> = audit2
        .iter()
        .filter(|l| l.kind == "manifest" && l.reference == "latest")
        .collect();
    ensure!(
        !latest.is_empty(),
        "no audit line for node 2's latest request: {audit2:#?}"
    );
    for l in &latest {
        ensure!(
            l.decision == "deny"
                && l.reason == "resolveLatestTag=false"
                && l.served_from == "upstream"
                && l.status == 404,
            "latest on node 2: {l:?}"
        );
    }
    ensure!(
        audit2.iter().any(|l| l.reference == "v1"
            && l.decision == "allow"
            && l.served_from == "peer"
            && l.status == 200),
        "node 2's v1 was not resolved by a peer: {audit2:#?}"
    );
    for blob in tags.layers() {
        ensure!(
            audit2.iter().any(|l| l.kind == "blob"
                && l.reference == blob.digest
                && l.served_from == "peer"
                && l.bytes == blob.size),
            "no audit line for layer {} served from a peer on node 2",
            blob.digest
        );
    }
    let audited: u64 = audit2
        .iter()
        .filter(|l| l.source == "containerd" && l.served_from == "peer")
        .map(|l| l.bytes)
        .sum();
    ensure!(
        audited as f64 == peer_bytes_2,
        "node 2: audit lines account for {audited} bytes from peers, the metric for {peer_bytes_2}"
    );
    // Node 1 served those bytes to its peers; its audit says so from its side.
    let served_1 = rig.metric(1, &SERVED_TO_PEERS)?;
    let audit1 = rig.audit(1, |lines| {
        lines
            .iter()
            .filter(|l| l.source == "peer")
            .map(|l| l.bytes)
            .sum::<u64>() as f64
            >= served_1
    })?;
    let to_peers: u64 = audit1
        .iter()
        .filter(|l| l.source == "peer")
        .map(|l| l.bytes)
        .sum();
    ensure!(
        to_peers as f64 == served_1,
        "node 1: audit lines account for {to_peers} bytes sent to peers, the metric for {served_1}"
    );
    ensure!(
        audit1.iter().all(|l| l.repository == tags.repository),
        "node 1 audited requests for other repositories"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Driving the rig.

/// A running rig; `rig.sh down` when dropped. Holds the lock that keeps rig tests serial.
struct Rig {
    script: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    started: Instant,
    // Field order matters: `Drop for Rig` runs `rig.sh down` first, then the fields drop, so the
    // machine-wide lock is released only after the rig is gone.
    _serial: MutexGuard<'static, ()>,
    _machine: std::fs::File,
    /// Extra environment for every rig call from now on (e.g. `RIG_RESOLVE_TAGS=false` before
    /// starting a node's daemon).
    extra_env: std::cell::RefCell<Vec<(String, String)>>,
}

impl Rig {
    /// Brings the rig up and pushes `images` (all when empty), or returns `None` after printing
    /// why the test is skipped.
    fn start(test: &str, images: &[&str]) -> Result<Option<Rig>> {
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
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let rig = Rig {
            script: here.join("tests/rig/rig.sh"),
            dir: PathBuf::from(
                std::env::var("RIG_DIR").unwrap_or_else(|_| "/tmp/speculum-rig".to_string()),
            ),
            bin: std::env::var_os("SPECULUM_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_speculum"))),
            started: Instant::now(),
            _serial: serial,
            _machine: machine,
            extra_env: std::cell::RefCell::new(Vec::new()),
        };
        rig.step(&format!("{test}: rig up"));
        rig.run(Command::new("bash").arg(&rig.script).arg("up"))?;
        rig.step("pushing images");
        let push = here.join("tests/rig/push-images.sh");
        rig.run(Command::new("bash").arg(push).args(images))?;
        Ok(Some(rig))
    }

    fn step(&self, what: &str) {
        eprintln!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// A command with the rig's environment.
    fn env(&self, cmd: &mut Command) {
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
    fn run(&self, cmd: &mut Command) -> Result<String> {
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
        self.env(&mut cmd);
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

    /// `speculum configure` (the node's hosts.toml now names the daemon), then `speculum registry`.
    fn start_speculum(&self, n: u32) -> Result<()> {
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
    fn cri_pull(&self, n: u32, reference: &str, want: &Image) -> Result<()> {
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
    fn ctr_pull(&self, n: u32, reference: &str, want: &Image) -> Result<()> {
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
    fn verify_blobs(&self, n: u32, image: &Image) -> Result<()> {
        for blob in &image.blobs {
            self.call(&["content_verify", &n.to_string(), &blob.digest])
                .with_context(|| format!("node {n}: blob {} of {}", blob.digest, image.name))?;
        }
        Ok(())
    }

    /// GET requests in the upstream access log containing `pattern`, from node `n` or anyone.
    fn upstream_gets(&self, pattern: &str, node: Option<u32>) -> Result<u64> {
        let ip = node.map(node_ip).unwrap_or_default();
        let out = self.call(&["upstream_gets", pattern, &ip])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_gets printed {out:?}"))
    }

    /// Polls node `n`'s mirror endpoint until it answers 200 for the image's manifest `reference`.
    fn wait_mirror_finds(&self, n: u32, image: &Image, reference: &str) -> Result<()> {
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

    fn set_env(&self, key: &str, value: &str) {
        let mut env = self.extra_env.borrow_mut();
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }

    /// Requests with `method` matching `pattern` in the upstream access log, from node `n`.
    fn upstream_requests(&self, method: &str, pattern: &str, n: u32) -> Result<u64> {
        let out = self.call(&["upstream_requests", method, pattern, &node_ip(n)])?;
        out.trim()
            .parse()
            .with_context(|| format!("upstream_requests printed {out:?}"))
    }

    /// Node `n`'s audit records (`nN/audit.jsonl`), polled until `done` holds for them (bounded:
    /// lines are written by the daemon's audit thread shortly after each body ends).
    fn audit(&self, n: u32, done: impl Fn(&[AuditLine]) -> bool) -> Result<Vec<AuditLine>> {
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
    fn metric(&self, n: u32, series: &Series) -> Result<f64> {
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

fn upstream_host() -> String {
    format!("{}.2:5000", subnet())
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

/// The audit fields these tests look at (docs/audit.md has them all).
#[derive(Deserialize, Debug, Clone)]
struct AuditLine {
    source: String,
    repository: String,
    reference: String,
    kind: String,
    decision: String,
    reason: String,
    served_from: String,
    status: u16,
    bytes: u64,
}

#[derive(Deserialize)]
struct CriResult {
    repo_digests: Vec<String>,
}

// ------------------------------------------------------------------------------------------------
// Reading the Prometheus text format, just enough to sum counters.

/// Sums every sample of `series.name` whose labels include `series.labels`.
fn sum_series(text: &str, series: &Series) -> f64 {
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
fn parse_sample(line: &str) -> Option<Sample> {
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

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
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

#[test]
fn metric_samples_are_summed_by_label_subset() {
    let text = "# HELP speculum_served_bytes Bytes\n\
        # TYPE speculum_served_bytes counter\n\
        speculum_served_bytes_total{handler=\"Mirror\",source=\"Peer\"} 100\n\
        speculum_served_bytes_total{handler=\"mirror\",source=\"local\"} 7\n\
        speculum_served_bytes_total{handler=\"peer\",source=\"local\"} 5e2\n\
        speculum_mirror_requests_total{kind=\"blob\",outcome=\"miss\"} 2\n\
        speculum_mirror_requests_total{kind=\"manifest\",outcome=\"miss\"} 3 1700000000\n\
        speculum_ready 1\n\
        garbage{ 12\n";
    let cases: [(&str, &Series, f64); 4] = [
        ("peer bytes, enum-cased labels", &PEER_BYTES, 100.0),
        ("served to peers, exponent", &SERVED_TO_PEERS, 500.0),
        (
            "misses over every kind, with timestamp",
            &MIRROR_MISSES,
            5.0,
        ),
        (
            "absent series",
            &Series {
                name: "speculum_nothing_total",
                labels: &[],
            },
            0.0,
        ),
    ];
    for (name, series, want) in cases {
        assert_eq!(sum_series(text, series), want, "{name}");
    }
    assert_eq!(
        parse_sample(r#"m{a="x\"y",b="z"} 1"#),
        Some((
            "m".to_string(),
            vec![
                ("a".to_string(), "x\"y".to_string()),
                ("b".to_string(), "z".to_string())
            ],
            1.0
        ))
    );
}
