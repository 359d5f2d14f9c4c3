//! A mixed cluster on the namespace rig: containerd nodes and a containers/image client (the
//! code CRI-O pulls with: `skopeo copy docker://… containers-storage:[vfs@…]`, configured by a
//! registries.conf of its own whose mirror is the node's daemon, `127.0.0.1:5080/<upstream
//! ip>_5000`) share one DHT and serve each other, with the upstream registry stopped.
//!
//! One job: prove from the outside (skopeo's and containerd's exit, the digests containerd
//! recorded, the daemons' audit lines) that
//! 1. a containerd node's image is pulled by a containers/image client on another node through
//!    that node's mirror with upstream stopped (complete-or-nothing answered from the peer);
//! 2. an image a containers/image client pulled through its node's mirror (upstream up: the
//!    manifest and the blobs go into that node's cache) is pulled by a containerd node with
//!    upstream stopped, from that cache (the cache as the node's content source);
//! 3. a containerd node with `discard_unpacked_layers = true` serves the layers it no longer
//!    holds in containerd from its cache.
//!
//! The containers/image client runs inside node 2's namespace; node 2's containerd is never
//! asked for the image, so for it node 2 is a node without a containerd store.
//!
//! Needs root (network namespaces) and skopeo; skips (saying so) otherwise or with
//! `SPECULUM_SKIP_RIG=1`. Shares the machine-wide rig lock with the other rig files.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use testkit::rig::*;

/// Runs `$3…` with `$1` over /var/lib and `$2` over /etc/containers (private mounts).
const PRIVATE_MOUNTS: &str = r#"mount --make-rprivate / && mount --bind "$1" /var/lib && mount --bind "$2" /etc/containers && shift 2 && exec "$@""#;

/// skopeo's bound for one copy.
const COPY_WAIT: Duration = Duration::from_secs(300);

/// `skopeo copy` of `reference` inside node `n` through the node's mirror; skopeo's stderr on
/// failure.
fn skopeo_copy(rig: &Rig, n: u32, reference: &str) -> Result<()> {
    let dir = rig.dir.join(format!("n{n}/cimage"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).context("client dir")?;
    let upstream = upstream_host();
    std::fs::write(
        dir.join("registries.conf"),
        format!(
            "[[registry]]\nprefix = \"{upstream}\"\nlocation = \"{upstream}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"127.0.0.1:5080/{}\"\ninsecure = true\n",
            upstream.replace(':', "_")
        ),
    )?;
    std::fs::write(
        dir.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let d = dir.display().to_string();
    let storage = format!("containers-storage:[vfs@{d}/root+{d}/run]{reference}");
    let conf = format!("{d}/registries.conf");
    let policy = format!("{d}/policy.json");
    let node = n.to_string();
    let source = format!("docker://{reference}");
    // containers/image as root writes /var/lib/containers/cache whatever the storage says and
    // reads /etc/containers: a private mount namespace gives it the client's own directories.
    for sub in ["var-lib", "etc-containers"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let var_lib = format!("{d}/var-lib");
    let etc = format!("{d}/etc-containers");
    let child = rig.spawn(&[
        "node_exec",
        &node,
        "unshare",
        "-m",
        "--",
        "sh",
        "-c",
        PRIVATE_MOUNTS,
        "sh",
        &var_lib,
        &etc,
        "skopeo",
        "--registries-conf",
        &conf,
        "--policy",
        &policy,
        "--tmpdir",
        &d,
        "copy",
        "--quiet",
        &source,
        &storage,
    ])?;
    let t0 = Instant::now();
    let out = wait_child(child, COPY_WAIT)?;
    ensure!(
        out.status.success(),
        "node {n}: skopeo copy {reference} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.step(&format!(
        "node {n}: skopeo copied {reference} through its mirror in {:?}",
        t0.elapsed()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn containerd_and_containers_image_nodes_serve_each_other_with_upstream_stopped() -> Result<()> {
    let Some(rig) = Rig::start_with(
        "containerd_and_containers_image_nodes_serve_each_other_with_upstream_stopped",
        &["small", "multi"],
        &[("RIG_NODES", "3"), ("RIG_CACHE", "1")],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let small = image_named(&images, "small")?;
    let multi = image_named(&images, "multi")?;
    for n in 1..=3 {
        rig.start_speculum(n)?;
    }

    // 1. containerd (node 1) → containers/image (node 2).
    let small_ref = small.tag("v1")?;
    rig.cri_pull(1, small_ref, small)?;
    rig.wait_mirror_finds(2, small, "v1")?;
    // 2. containers/image (node 2, upstream up: into its cache) → containerd (node 3).
    let multi_ref = multi.tag("v1")?;
    skopeo_copy(&rig, 2, multi_ref)?;
    rig.wait_mirror_finds(3, multi, "v1")?;

    rig.call(&["stop_upstream"])?;
    rig.step("upstream stopped");
    skopeo_copy(&rig, 2, small_ref)?;
    let lines = rig.audit(2, |l| {
        l.iter()
            .any(|a| a.repository == small.repository && a.kind == "manifest" && a.status == 200)
    })?;
    let small_manifests: Vec<_> = lines
        .iter()
        .filter(|a| {
            a.repository == small.repository && a.kind == "manifest" && a.source == "containerd"
        })
        .collect();
    ensure!(
        small_manifests
            .iter()
            .any(|a| a.status == 200 && a.served_from == "peer"),
        "node 2 answered {}'s manifest from node 1: {small_manifests:?}",
        small.repository
    );
    rig.cri_pull(3, multi_ref, multi)?;
    rig.verify_blobs(3, multi)?;
    rig.step("node 3's containerd pulled what node 2's cache holds, upstream stopped");
    Ok(())
}

/// A containerd node with `discard_unpacked_layers = true` (the EKS AL2023 default) and the
/// blob cache on: its layers are gone from containerd's store after the pull, and it still
/// serves them to another node from the cache, upstream stopped.
#[test]
fn discarding_containerd_node_serves_layers_from_its_cache() -> Result<()> {
    let Some(rig) = Rig::start_with(
        "discarding_containerd_node_serves_layers_from_its_cache",
        &["small"],
        &[
            ("RIG_NODES", "3"),
            ("RIG_CACHE", "1"),
            ("RIG_CONTAINERD_OPTS", "discard_unpacked_layers=true"),
        ],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let small = image_named(&images, "small")?;
    for n in 1..=2 {
        rig.start_speculum(n)?;
    }
    let reference = small.tag("v1")?;
    rig.cri_pull(1, reference, small)?;
    // containerd deletes the unpacked layers through its garbage collector: poll, bounded.
    let t0 = Instant::now();
    loop {
        let held = rig.call(&["ctr_node", "1", "content", "ls", "-q"])?;
        let kept: Vec<&str> = small
            .layers()
            .map(|l| l.digest.as_str())
            .filter(|d| held.contains(d))
            .collect();
        if kept.is_empty() {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "node 1's containerd still holds layers {kept:?} after 60 s (discard_unpacked_layers did not apply)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    rig.step("node 1's containerd discarded the layers");
    rig.wait_mirror_finds(2, small, "v1")?;
    rig.call(&["stop_upstream"])?;
    rig.step("upstream stopped; node 1's layers are only in its cache");
    // Node 2 discards its layers too: its CRI pull (the digest containerd recorded) and node
    // 1's audit lines are the proof, not node 2's content store.
    rig.cri_pull(2, reference, small)?;
    let lines = rig.audit(1, |l| {
        l.iter()
            .any(|a| a.source == "peer" && a.kind == "blob" && a.status == 200)
    })?;
    ensure!(
        small
            .layers()
            .all(|layer| lines.iter().any(|a| a.source == "peer"
                && a.reference == layer.digest
                && a.status == 200
                && a.served_from == "cache")),
        "node 1 served every layer to node 2 from its cache: {lines:?}"
    );
    Ok(())
}
