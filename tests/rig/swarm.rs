//! Swarm distribution on the namespace rig, with real containerd pulls: every receiver becomes
//! a source at once (a peer blob teed into the receiver's cache and advertised while it still
//! arrives), a holder at its serving cap answering 429 while the pull completes elsewhere, and
//! a big layer fetched as chunks from two holders, one of them killed mid-chunk.
//!
//! One job: prove from the outside (CRI PullImage, containerd's digests, the upstream access log,
//! each node's `/metrics`) that later pulls spread over every holder, that back-pressure never
//! fails a pull, and that a broken holder costs a re-fetched chunk, not a corrupt layer.
//!
//! Three nodes with the blob cache on (`RIG_CACHE=1`), a 64 MiB big layer unless `RIG_BIG_MB`
//! says otherwise, chunking above 16 MiB (`SPECULUM_MIRROR_CHUNK_THRESHOLD`). Needs root;
//! skips (saying so) otherwise. Knob: `RIG_SWARM_RATE` (the serving node's link while a pull
//! must last a few seconds, default 100mbit).

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use testkit::rig::*;

const NODES: u32 = 3;
/// The longest one pull may take (a big layer over a shaped link on 2 shared cores).
const PULL_WAIT: Duration = Duration::from_secs(300);

const PEER_SERVED: Series = Series {
    name: "speculum_served_bytes_total",
    labels: &[("handler", "peer")],
};
const TEED: Series = Series {
    name: "speculum_mirror_teed_blobs_total",
    labels: &[("result", "complete")],
};
const CHUNKED: Series = Series {
    name: "speculum_mirror_chunked_blobs_total",
    labels: &[],
};
const REFETCHES: Series = Series {
    name: "speculum_mirror_chunk_refetches_total",
    labels: &[],
};
const PEER_429: Series = Series {
    name: "speculum_http_requests_total",
    labels: &[("handler", "peer"), ("kind", "blob"), ("status", "429")],
};
const BUSY: Series = Series {
    name: "speculum_mirror_peer_failures_total",
    labels: &[("reason", "busy")],
};

/// Node 2 pulls the big image from node 1 over a slow link; while its layer is still
/// arriving, node 3 pulls it too. Node 3's layer comes from both (chunks), so node 2 — still
/// receiving — served bytes; both pulls are complete and verified, no byte of the layer came
/// from upstream, and node 2 ends up holding the layer in its cache.
#[test]
fn a_receiver_serves_the_next_node_while_it_still_receives() -> Result<()> {
    let test = "a_receiver_serves_the_next_node_while_it_still_receives";
    let Some(rig) = start_rig(test, &[])? else {
        return Ok(());
    };
    let big = big_image(&rig)?;
    let layer = biggest_layer(&big)?;
    start_nodes(&rig)?;
    rig.cri_pull(1, big.tag("v1")?, &big)?;
    rig.wait_mirror_finds(2, &big, &big.digest)?;
    rig.call(&["shape_node", "1", &rate()])?;

    rig.step("node 2 pulls from node 1 over the shaped link");
    let pull2 = rig.spawn(&["cri_pull", "2", big.tag("v1")?])?;
    wait_ingest(&rig, 2, layer.size / 4, &pull2_guard(&pull2))?;
    let served_before = rig.metric(2, &PEER_SERVED)?;
    rig.step("a quarter of the layer is on node 2: node 3 pulls now");
    let pull3 = rig.spawn(&["cri_pull", "3", big.tag("v1")?])?;
    finish(&rig, 2, pull2, &big)?;
    finish(&rig, 3, pull3, &big)?;

    let served = rig.metric(2, &PEER_SERVED)? - served_before;
    ensure!(
        served > 0.0,
        "node 2 served no bytes to node 3 while it was receiving the layer"
    );
    for n in [2, 3] {
        let gets = rig.upstream_gets(&format!("/blobs/{}", layer.digest), Some(n))?;
        ensure!(
            gets == 0,
            "node {n} fetched the layer from upstream {gets} times"
        );
    }
    let teed = poll_metric(&rig, 2, &TEED, 1.0)?;
    ensure!(
        teed >= 1.0,
        "node 2 did not keep the layer it received (teed {teed})"
    );
    rig.step(&format!(
        "node 2 served {served} bytes to node 3 while receiving; chunked fetches on node 3: {}",
        rig.metric(3, &CHUNKED)?
    ));
    Ok(())
}

/// Node 1 may serve one blob stream at a time (`registry.peer_serving_limit: 1`); node 2's pull
/// of the big layer from it holds that slot over a slow link. Meanwhile a blob request to node
/// 1's peer endpoint (sent from node 3) is answered 429 with `Retry-After` and the OCI error
/// `TOOMANYREQUESTS`, and node 3's own pull completes, verified (from node 2, which is still
/// receiving, or upstream: never a failed pull).
#[test]
fn a_holder_at_its_cap_answers_429_and_the_pull_completes_elsewhere() -> Result<()> {
    let test = "a_holder_at_its_cap_answers_429_and_the_pull_completes_elsewhere";
    let Some(rig) = start_rig(test, &[])? else {
        return Ok(());
    };
    let big = big_image(&rig)?;
    let layer = biggest_layer(&big)?;
    rig.set_env("SPECULUM_REGISTRY_PEER_SERVING_LIMIT", "1");
    rig.start_speculum(1)?;
    rig.extra_env
        .borrow_mut()
        .retain(|(k, _)| k != "SPECULUM_REGISTRY_PEER_SERVING_LIMIT");
    for n in 2..=NODES {
        rig.start_speculum(n)?;
    }
    rig.cri_pull(1, big.tag("v1")?, &big)?;
    rig.wait_mirror_finds(2, &big, &big.digest)?;
    rig.call(&["shape_node", "1", &rate()])?;

    rig.step("node 2 pulls from node 1 (its one serving slot) over the shaped link");
    let pull2 = rig.spawn(&["cri_pull", "2", big.tag("v1")?])?;
    wait_ingest(&rig, 2, layer.size / 4, &pull2_guard(&pull2))?;
    ensure!(
        rig.upstream_gets(&format!("/blobs/{}", layer.digest), Some(2))? == 0,
        "node 2 took the layer from upstream, not from node 1: nothing holds node 1's slot"
    );
    let url = format!(
        "http://{}:5081/v2/{}/blobs/{}?ns={}",
        node_ip(1),
        big.repository,
        layer.digest,
        upstream_host().replace(':', "%3A")
    );
    let head = rig.call(&[
        "node_exec",
        "3",
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "--max-time",
        "5",
        "-H",
        "x-speculum-hop: 1",
        &url,
    ])?;
    ensure!(
        head.starts_with("HTTP/1.1 429"),
        "node 1 at its cap answered a blob request with:\n{head}"
    );
    ensure!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "the 429 carries no Retry-After:\n{head}"
    );
    rig.step("node 1, at its cap, answered 429 with Retry-After; node 3 pulls now");
    rig.cri_pull(3, big.tag("v1")?, &big)?;
    rig.verify_blobs(3, &big)?;
    finish(&rig, 2, pull2, &big)?;
    let refused = rig.metric(1, &PEER_429)?;
    let busy = rig.metric(3, &BUSY)?;
    rig.step(&format!(
        "node 1 answered {refused} blob requests with 429; node 3's mirror moved past a busy \
         holder {busy} times; both pulls complete"
    ));
    Ok(())
}

/// Nodes 1 and 2 hold the big layer; node 3 fetches it as chunks from both over slow links, and
/// node 2's daemon is killed mid-way. The chunks it owed come from node 1 instead: node 3's
/// layer is complete and verified, none of it from upstream.
#[test]
fn a_big_layer_comes_from_two_holders_and_survives_one_dying() -> Result<()> {
    let test = "a_big_layer_comes_from_two_holders_and_survives_one_dying";
    let Some(rig) = start_rig(test, &[])? else {
        return Ok(());
    };
    let big = big_image(&rig)?;
    let layer = biggest_layer(&big)?;
    start_nodes(&rig)?;
    rig.cri_pull(1, big.tag("v1")?, &big)?;
    rig.wait_mirror_finds(2, &big, &big.digest)?;
    rig.cri_pull(2, big.tag("v1")?, &big)?;
    rig.wait_mirror_finds(3, &big, &big.digest)?;
    for n in [1, 2] {
        rig.call(&["shape_node", &n.to_string(), &rate()])?;
    }
    let before: Vec<f64> = [1, 2]
        .iter()
        .map(|&n| rig.metric(n, &PEER_SERVED))
        .collect::<Result<_>>()?;

    rig.step("node 3 pulls: chunks from nodes 1 and 2");
    let pull3 = rig.spawn(&["cri_pull", "3", big.tag("v1")?])?;
    wait_ingest(&rig, 3, layer.size / 4, &pull2_guard(&pull3))?;
    let from2 = rig.metric(2, &PEER_SERVED)? - before[1];
    rig.call(&["stop_speculum", "2", "KILL"])?;
    rig.step(&format!(
        "node 2's daemon killed mid-layer (it had served {from2} bytes)"
    ));
    finish(&rig, 3, pull3, &big)?;
    let from1 = rig.metric(1, &PEER_SERVED)? - before[0];
    ensure!(
        from2 > 0.0 && from1 > 0.0,
        "the layer did not come from both holders (node 1: {from1}, node 2: {from2} bytes)"
    );
    ensure!(
        rig.metric(3, &CHUNKED)? >= 1.0,
        "node 3 did not fetch the layer in chunks"
    );
    let refetched = rig.metric(3, &REFETCHES)?;
    ensure!(
        refetched >= 1.0,
        "no chunk was re-fetched after node 2 died"
    );
    let gets = rig.upstream_gets(&format!("/blobs/{}", layer.digest), Some(3))?;
    ensure!(
        gets == 0,
        "node 3 fetched the layer from upstream {gets} times"
    );
    rig.step(&format!(
        "layer from node 1: {from1} bytes, node 2: {from2} bytes before it died; {refetched} \
         chunks re-fetched"
    ));
    Ok(())
}

// ------------------------------------------------------------------------------------------------

fn rate() -> String {
    std::env::var("RIG_SWARM_RATE").unwrap_or_else(|_| "100mbit".to_owned())
}

fn start_rig(test: &str, _images: &[&str]) -> Result<Option<Rig>> {
    let nodes = NODES.to_string();
    let big = std::env::var("RIG_BIG_MB").unwrap_or_else(|_| "64".into());
    Rig::start_with(
        test,
        &["big"],
        &[
            ("RIG_NODES", nodes.as_str()),
            ("RIG_CACHE", "1"),
            ("RIG_BIG_MB", big.as_str()),
            ("SPECULUM_MIRROR_CHUNK_THRESHOLD", "16777216"),
        ],
    )
}

fn big_image(rig: &Rig) -> Result<Image> {
    Ok(image_named(&rig.images()?, "big")?.clone())
}

fn biggest_layer(image: &Image) -> Result<Blob> {
    image
        .layers()
        .max_by_key(|b| b.size)
        .cloned()
        .context("the big image has no layers")
}

fn start_nodes(rig: &Rig) -> Result<()> {
    for n in 1..=NODES {
        rig.start_speculum(n)?;
    }
    Ok(())
}

/// A check that the pull being waited for has not already ended (the link was too fast).
fn pull2_guard(pull: &Child) -> u32 {
    pull.id()
}

/// Waits (bounded) until node `n`'s containerd holds `bytes` of unfinished downloads, and fails
/// if the pull process `pid` ended first (then the shaped link was not slow enough).
fn wait_ingest(rig: &Rig, n: u32, bytes: u64, pid: &u32) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let got: u64 = rig
            .call(&["ingest_bytes", &n.to_string()])?
            .trim()
            .parse()
            .unwrap_or(0);
        if got >= bytes {
            return Ok(());
        }
        ensure!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "node {n}'s pull ended before {bytes} bytes were in flight: the link was not slow \
             enough (RIG_SWARM_RATE={})",
            rate()
        );
        ensure!(
            t0.elapsed() < PULL_WAIT,
            "node {n} had {got} bytes in flight after {PULL_WAIT:?}, want {bytes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for node `n`'s pull and checks it (one retry, as the kubelet would).
fn finish(rig: &Rig, n: u32, pull: Child, image: &Image) -> Result<()> {
    let mut out = wait_child(pull, PULL_WAIT)?;
    if !out.status.success() {
        rig.step(&format!(
            "node {n}: pull failed ({}), retrying like the kubelet",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        out = wait_child(
            rig.spawn(&["cri_pull", &n.to_string(), image.tag("v1")?])?,
            PULL_WAIT,
        )?;
    }
    ensure!(
        out.status.success(),
        "node {n}'s pull failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_cri_result(&String::from_utf8_lossy(&out.stdout), image)?;
    rig.verify_blobs(n, image)?;
    rig.step(&format!("node {n}: pull complete and verified"));
    Ok(())
}

/// Polls node `n`'s `series` until it reaches `want` (bounded), and returns its last value.
fn poll_metric(rig: &Rig, n: u32, series: &Series, want: f64) -> Result<f64> {
    let t0 = Instant::now();
    loop {
        let v = rig.metric(n, series)?;
        if v >= want || t0.elapsed() > Duration::from_secs(30) {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
