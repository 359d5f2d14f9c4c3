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
//! `make containerd-matrix` runs this file once per containerd line (`RIG_CONTAINERD=1.6|1.7|2.3|2.4`,
//! default 2.3; see docs/containerd.md).
//! Knobs: `RIG_BIG_MB` (size of the big layer, default 200), `RIG_DIR`, `SPECULUM_BIN` (default:
//! the `speculum` binary cargo built for this test), `RIG_KILL_RATE` (node 1's link rate while the
//! mid-transfer kill happens, default 400mbit).
//!
//! The tests share one rig (the namespace names are fixed), so they run one at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use testkit::rig::*;

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

/// The longest a single pull of the big image may take (a 200 MiB layer on 2 shared cores).
const PULL_WAIT: Duration = Duration::from_secs(300);

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
    // The switches' own behaviour: tags the cluster resolves, without asking upstream first
    // (upstream-first has its own test below).
    rig.set_env("RIG_TAG_RESOLUTION", "cluster-first");
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

/// Tag resolutions counted by source, on one node.
fn tag_resolutions(source: &'static str) -> Series {
    let labels: &'static [(&'static str, &'static str)] = match source {
        "upstream" => &[("source", "upstream")],
        "cluster" => &[("source", "cluster")],
        _ => &[("source", "stale")],
    };
    Series {
        name: "speculum_mirror_tag_resolutions_total",
        labels,
    }
}

/// `image` as pushed under another repository (`rig/<repo>`), same digest and blobs.
fn renamed(image: &Image, repo: &str) -> Image {
    let host = upstream_host();
    let mut i = image.clone();
    i.name = repo.to_owned();
    i.repository = format!("rig/{repo}");
    i.by_digest = format!("{host}/rig/{repo}@{}", image.digest);
    i.refs = [("v1".to_owned(), format!("{host}/rig/{repo}:v1"))].into();
    i
}

/// `upstream-first` (the default), end to end. Every node holds `rig/moved:v1` at its old
/// digest (a copy of `small`); then the tag moves upstream (to `tags`' manifest, which node 1
/// already holds). Every node pulls `moved:v1` by tag again and must record the **new** digest
/// — each daemon asked upstream with one HEAD (its user agent in the registry's log), none of
/// the containerds went upstream for the manifest, and nodes 2 and 3 got every layer from
/// peers. Then the upstream stops: node 2 pulls `tags:v1`, which only node 1 holds under that
/// name, and gets the cluster's digest (stale-if-error). Audit lines and metrics say which
/// source named each digest. Under `cluster-first` the re-pulls would keep the old digest.
#[test]
fn tag_moved_upstream_reaches_every_node_and_upstream_down_serves_the_cluster() -> Result<()> {
    let Some(rig) = Rig::start(
        "tag_moved_upstream_reaches_every_node_and_upstream_down_serves_the_cluster",
        &["small", "tags"],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let small = image_named(&images, "small")?;
    let tags = image_named(&images, "tags")?;
    ensure!(small.digest != tags.digest, "the two images must differ");
    let old = renamed(small, "moved");
    let new = renamed(tags, "moved");
    let pushed = rig.upstream_copy(
        "rig/small:v1",
        "rig/moved:v1",
        &["--all", "--preserve-digests"],
    )?;
    ensure!(
        pushed == small.digest,
        "moved:v1 pushed as {pushed}, want {}",
        small.digest
    );
    for n in 1..=3 {
        rig.start_speculum(n)?;
    }

    rig.step("node 1 pulls tags:v1; every node pulls moved:v1 at its old digest");
    rig.cri_pull(1, tags.tag("v1")?, tags)?;
    for n in 1..=3 {
        rig.cri_pull(n, old.tag("v1")?, &old)?;
    }

    rig.step("moving moved:v1 upstream to tags' manifest");
    let moved = rig.upstream_copy(
        "rig/tags:v1",
        "rig/moved:v1",
        &["--all", "--preserve-digests"],
    )?;
    ensure!(
        moved == tags.digest,
        "moved:v1 now {moved}, want {}",
        tags.digest
    );
    for n in [2, 3] {
        rig.wait_mirror_finds(n, tags, &tags.digest)?;
    }
    let mut before = Vec::new();
    for n in 1..=3 {
        before.push((
            rig.upstream_requests_by("HEAD", "/v2/rig/moved/manifests/v1", n, "speculum/")?,
            rig.upstream_requests_by("HEAD", "/v2/rig/moved/", n, "containerd/")?
                + rig.upstream_requests_by("GET", "/v2/rig/moved/", n, "containerd/")?,
            rig.metric(n, &tag_resolutions("upstream"))?,
            rig.metric(n, &PEER_BYTES)?,
        ));
    }

    rig.step("every node pulls moved:v1 by tag again: the new digest, layers from peers");
    for n in 1..=3 {
        rig.cri_pull(n, new.tag("v1")?, &new)?;
        rig.verify_blobs(n, &new)?;
    }
    for n in 1..=3 {
        let (heads, containerd, resolved, peer_bytes) = before[n as usize - 1];
        let heads_after =
            rig.upstream_requests_by("HEAD", "/v2/rig/moved/manifests/v1", n, "speculum/")?;
        ensure!(
            heads_after > heads,
            "node {n}'s daemon did not ask upstream for moved:v1 ({heads} → {heads_after} HEADs)"
        );
        let containerd_after =
            rig.upstream_requests_by("HEAD", "/v2/rig/moved/", n, "containerd/")?
                + rig.upstream_requests_by("GET", "/v2/rig/moved/", n, "containerd/")?;
        ensure!(
            containerd_after == containerd,
            "node {n}'s containerd went upstream for moved ({containerd} → {containerd_after} \
             requests): the mirror should have answered"
        );
        let resolved_after = rig.metric(n, &tag_resolutions("upstream"))?;
        ensure!(
            resolved_after > resolved,
            "node {n}: no tag resolution counted under source=upstream ({resolved} → {resolved_after})"
        );
        if n > 1 {
            for blob in tags.layers() {
                ensure!(
                    rig.upstream_gets(&blob.digest, Some(n))? == 0,
                    "node {n} fetched layer {} from upstream",
                    blob.digest
                );
            }
            let from_peers = rig.metric(n, &PEER_BYTES)? - peer_bytes;
            ensure!(
                from_peers >= tags.layer_bytes() as f64,
                "node {n} got {from_peers} bytes from peers, want at least the {} bytes of layers",
                tags.layer_bytes()
            );
        }
        let audit = rig.audit(n, |lines| {
            lines.iter().any(|l| {
                l.repository == "rig/moved"
                    && l.reference == "v1"
                    && l.digest.as_deref() == Some(tags.digest.as_str())
            })
        })?;
        let line = audit
            .iter()
            .rev()
            .find(|l| l.repository == "rig/moved" && l.reference == "v1" && l.status == 200)
            .with_context(|| format!("node {n}: no audit line for moved:v1"))?;
        ensure!(
            line.tag_source.as_deref() == Some("upstream")
                && line.tag_upstream.as_deref() == Some("digest")
                && line.digest.as_deref() == Some(tags.digest.as_str())
                && line.served_from == if n == 1 { "local" } else { "peer" },
            "node {n}: moved:v1 audited as {line:?}"
        );
    }

    // What upstream-first costs on the mirror path: the daemons' own timing of their HEADs.
    let (mut sum, mut count) = (0.0, 0.0);
    for n in 1..=3 {
        sum += rig.metric(
            n,
            &Series {
                name: "speculum_mirror_tag_upstream_duration_seconds_sum",
                labels: &[],
            },
        )?;
        count += rig.metric(
            n,
            &Series {
                name: "speculum_mirror_tag_upstream_duration_seconds_count",
                labels: &[],
            },
        )?;
    }
    ensure!(
        count >= 3.0,
        "the daemons timed {count} upstream HEADs, want at least 3"
    );
    rig.step(&format!(
        "upstream tag HEAD: {count} on 3 nodes, mean {:.2} ms",
        sum / count * 1000.0
    ));

    rig.step("upstream stops: node 2 pulls tags:v1, named by the cluster");
    rig.call(&["stop_upstream"])?;
    let stale_before = rig.metric(2, &tag_resolutions("stale"))?;
    rig.cri_pull(2, tags.tag("v1")?, tags)?;
    ensure!(
        rig.metric(2, &tag_resolutions("stale"))? > stale_before,
        "node 2 counted no stale tag resolution"
    );
    let audit = rig.audit(2, |lines| {
        lines
            .iter()
            .any(|l| l.repository == tags.repository && l.tag_source.as_deref() == Some("stale"))
    })?;
    let line = audit
        .iter()
        .rev()
        .find(|l| l.repository == tags.repository && l.reference == "v1" && l.kind == "manifest")
        .context("node 2: no audit line for tags:v1")?;
    ensure!(
        line.tag_source.as_deref() == Some("stale")
            && line.tag_upstream.as_deref() == Some("unreachable")
            && line.status == 200
            && line.digest.as_deref() == Some(tags.digest.as_str()),
        "node 2: tags:v1 with upstream down audited as {line:?}"
    );
    rig.step("done");
    Ok(())
}

/// Every layer media type travels peer to peer. `zstd` was pushed with skopeo
/// `--dest-compress-format zstd`, `chunked` with `zstd:chunked` (annotated zstd layers with a
/// skippable table-of-contents frame; containerd 1.6 cannot unpack skopeo 1.9's, so it is
/// fetched with `ctr content fetch`, which records the image without unpacking). Node 1 gets
/// both through its daemon; the upstream stops; node 2 gets both, every byte from node 1, and
/// its mirror describes each layer with the media type its manifest declares.
#[test]
fn zstd_and_zstd_chunked_layers_are_served_peer_to_peer() -> Result<()> {
    let Some(rig) = Rig::start(
        "zstd_and_zstd_chunked_layers_are_served_peer_to_peer",
        &["zstd", "chunked"],
    )?
    else {
        return Ok(());
    };
    const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    let images = rig.images()?;
    let zstd = image_named(&images, "zstd")?;
    let chunked = image_named(&images, "chunked")?;
    for image in [zstd, chunked] {
        ensure!(
            image.layers().count() == 2 && image.layers().all(|b| b.media_type == ZSTD),
            "{} was not pushed with zstd layers: {:?}",
            image.name,
            image.layers().map(|b| &b.media_type).collect::<Vec<_>>()
        );
    }
    for n in 1..=2 {
        rig.start_speculum(n)?;
    }

    rig.step("node 1 pulls zstd (CRI) and fetches chunked (ctr) through its daemon");
    rig.cri_pull(1, zstd.tag("v1")?, zstd)?;
    rig.call(&["ctr_fetch", "1", chunked.tag("v1")?])?;
    for image in [zstd, chunked] {
        rig.verify_blobs(1, image)?;
        rig.wait_mirror_finds(2, image, &image.digest)?;
    }

    rig.step("upstream stops; node 2 gets both from node 1");
    rig.call(&["stop_upstream"])?;
    rig.cri_pull(2, zstd.tag("v1")?, zstd)?;
    // A manifest lookup that misses its 20 ms first-peer wait on a loaded machine is a 404,
    // and with upstream gone the fetch fails: retry as the kubelet would, a bounded few times.
    let mut attempt = 1;
    while let Err(e) = rig.call(&["ctr_fetch", "2", chunked.tag("v1")?]) {
        ensure!(
            attempt < 3,
            "node 2 could not fetch chunked:v1 in 3 attempts: {e:#}"
        );
        rig.step(&format!("fetch attempt {attempt} failed, retrying: {e:#}"));
        attempt += 1;
    }
    let recorded = rig.call(&["image_digest", "2", chunked.tag("v1")?])?;
    ensure!(
        recorded.trim() == chunked.digest,
        "node 2 recorded chunked:v1 as {:?}, want {}",
        recorded.trim(),
        chunked.digest
    );
    for image in [zstd, chunked] {
        rig.verify_blobs(2, image)?;
    }
    ensure!(
        rig.upstream_gets("/v2/", Some(2))? == 0,
        "node 2 sent GETs upstream"
    );
    let layer_bytes = zstd.layer_bytes() + chunked.layer_bytes();
    let from_peers = rig.metric(2, &PEER_BYTES)?;
    ensure!(
        from_peers >= layer_bytes as f64,
        "node 2 got {from_peers} bytes from peers, want at least the {layer_bytes} bytes of zstd layers"
    );
    let audit = rig.audit(2, |lines| {
        lines
            .iter()
            .filter(|l| l.kind == "blob" && l.served_from == "peer")
            .count()
            >= 4
    })?;
    for image in [zstd, chunked] {
        for blob in image.layers() {
            ensure!(
                audit.iter().any(|l| l.kind == "blob"
                    && l.reference == blob.digest
                    && l.served_from == "peer"
                    && l.bytes == blob.size),
                "node 2: no audit line for {} layer {} served whole from a peer",
                image.name,
                blob.digest
            );
            // Described from the manifest's descriptor, on node 2 (now local) and node 1.
            for n in ["2", "1"] {
                let got = rig.call(&["mirror_blob_type", n, &image.repository, &blob.digest])?;
                ensure!(
                    got.trim() == ZSTD,
                    "node {n} describes {} layer {} as {:?}, want {ZSTD}",
                    image.name,
                    blob.digest,
                    got.trim()
                );
            }
        }
    }
    rig.step("done");
    Ok(())
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
