//! The dead-node guarantee with the lookup fast path, on the namespace rig: a holder cut off
//! from the network (`ip link set eth0 down` inside its namespace: no reset, no FIN, nothing
//! answers — a partition) is handed out by other nodes' lookups for at most
//! `routing.liveness_window` (2 s) after it was last heard from, never after.
//!
//! One job: node 1 holds `small:v1`; node 2's mirror finds it. Node 1's link goes down. Node 2's
//! mirror keeps being asked for the manifest by digest; once the window and the check's bound
//! have passed, further requests make no peer attempt at all (node 2's
//! `speculum_mirror_peer_failures_total` stays put) and answer 404, so containerd goes
//! upstream at once instead of waiting on a dead peer.
//!
//! Needs root; skips (saying so) otherwise or with `SPECULUM_SKIP_RIG=1`. Shares the
//! machine-wide rig lock.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use testkit::rig::*;

/// `routing.liveness_window` (default) plus `routing.verify_timeout` and slack for a loaded
/// machine: past this, the cut-off holder must not be handed out.
const BOUND: Duration = Duration::from_secs(6);

#[test]
fn a_partitioned_holder_is_not_handed_out_after_the_liveness_window() -> Result<()> {
    let Some(rig) = Rig::start(
        "a_partitioned_holder_is_not_handed_out_after_the_liveness_window",
        &["small"],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let image = images.get("small").context("no small image")?;
    let tag_ref = image.refs.get("v1").context("small has no v1")?;
    for n in 1..=2 {
        rig.start_speculum(n)?;
    }
    rig.step("node 1 pulls small:v1 through its mirror");
    rig.cri_pull(1, tag_ref, image)?;
    rig.wait_mirror_finds(2, image, &image.digest)?;
    let failures = Series {
        name: "speculum_mirror_peer_failures_total",
        labels: &[],
    };
    let head = || -> Result<String> {
        let out = rig.call(&["mirror_status", "2", &image.repository, &image.digest])?;
        Ok(out.trim().to_owned())
    };
    ensure!(head()? == "200", "node 2 does not find node 1's manifest");

    rig.step("node 1's link goes down");
    rig.call(&["node_exec", "1", "ip", "link", "set", "eth0", "down"])?;
    let cut = Instant::now();
    // Keep asking until the bound has passed (the asking is what is tested; bounded in count).
    let mut asked = 0;
    while cut.elapsed() < BOUND && asked < 200 {
        head()?;
        asked += 1;
    }
    let before = rig.metric(2, &failures)?;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(head()?);
    }
    let after = rig.metric(2, &failures)?;
    rig.step(&format!(
        "{asked} requests during the first {BOUND:?}; then statuses {statuses:?}, peer failures {before} → {after}"
    ));
    ensure!(
        after == before,
        "node 2 still tried the cut-off holder {BOUND:?} after the cut ({before} → {after} peer failures)"
    );
    ensure!(
        statuses.iter().all(|s| s == "404"),
        "want 404 (containerd goes upstream) once the holder is cut off: {statuses:?}"
    );
    rig.call(&["node_exec", "1", "ip", "link", "set", "eth0", "up"])?;
    Ok(())
}
