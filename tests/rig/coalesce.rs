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
//! 100mbit). Shares the machine-wide rig lock with tests/rig/cluster.rs.

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use testkit::rig::*;

const NODES: u32 = 4;
/// The longest one pull may take (a big layer over a 100 Mbit upstream on 2 shared cores).
const PULL_WAIT: Duration = Duration::from_secs(300);
/// Bound of the wait for every node to know every other.
const MESH_WAIT: Duration = Duration::from_secs(60);

/// Four nodes pull the same cold images at the same moment (CRI PullImage, all at once): every
/// pull succeeds with the pushed digest and every blob re-verifies, and the upstream access
/// log shows exactly one GET per blob (config and layers; manifests are resolved by each
/// containerd itself and are not blobs).
#[test]
fn four_cold_pulls_fetch_each_blob_once() -> Result<()> {
    let Some(rig) = start_rig(
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
            let gets = rig.upstream_gets(&format!("/blobs/{}", blob.digest), None)?;
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
        .map(|n| {
            rig.metric(
                n,
                &Series {
                    name: "speculum_cache_coalesced_followers_total",
                    labels: &[],
                },
            )
        })
        .sum::<Result<f64>>()?;
    let saved: f64 = (1..=NODES)
        .map(|n| {
            rig.metric(
                n,
                &Series {
                    name: "speculum_upstream_saved_bytes_total",
                    labels: &[],
                },
            )
        })
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
    let Some(rig) = start_rig(
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
    // Shape every node's link too (set explicitly now, not only at `rig up`): the fetch must
    // take seconds, or it ends before anyone can be killed mid-blob.
    for n in 1..=NODES {
        rig.call(&["shape_node", &n.to_string(), &rate])?;
    }
    rig.step("every node pulls big:v1 at once");
    let mut pulls: Vec<(u32, Child)> = (1..=NODES)
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
        let mut finished = 0;
        for (_, pull) in pulls.iter_mut() {
            if pull.try_wait()?.is_some() {
                finished += 1;
            }
        }
        ensure!(
            finished < pulls.len(),
            "every pull ended before a quarter of the big layer was seen: the links were not slow \
             enough to kill the fetcher mid-blob (RIG_COALESCE_KILL_RATE={rate})"
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
    let gets = rig.upstream_gets(&format!("/blobs/{}", layer.digest), None)?;
    rig.step(&format!(
        "upstream GETs of the big layer: {gets} (1 before the kill, resumes after)"
    ));
    Ok(())
}

fn is_manifest(b: &Blob) -> bool {
    b.media_type.contains("manifest") || b.media_type.contains("index")
}

// ------------------------------------------------------------------------------------------------
// The rig: the shared driver, plus what four nodes at once need.

/// Four nodes with the blob cache on (`RIG_CACHE=1`) and a 64 MiB big layer unless `RIG_BIG_MB`
/// says otherwise, plus `env`.
fn start_rig(test: &str, images: &[&str], env: &[(&str, &str)]) -> Result<Option<Rig>> {
    let nodes = NODES.to_string();
    let big = std::env::var("RIG_BIG_MB").unwrap_or_else(|_| "64".into());
    let mut all = vec![
        ("RIG_NODES", nodes.as_str()),
        ("RIG_CACHE", "1"),
        ("RIG_BIG_MB", big.as_str()),
    ];
    all.extend_from_slice(env);
    Rig::start_with(test, images, &all)
}

/// What this file adds to the shared rig driver (`testkit/src/rig.rs`): every node at once.
trait Cluster {
    fn start_all(&self) -> Result<()>;
    fn pull_everywhere(&self, image: &Image, env: &[(&str, &str)]) -> Result<()>;
    fn upstream_gets_from(&self, pattern: &str, n: u32) -> Result<u64>;
}

impl Cluster for Rig {
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
                let peers = self.metric(
                    n,
                    &Series {
                        name: "speculum_routing_peers",
                        labels: &[],
                    },
                )?;
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

    fn upstream_gets_from(&self, pattern: &str, n: u32) -> Result<u64> {
        self.upstream_gets(pattern, Some(n))
    }
}
