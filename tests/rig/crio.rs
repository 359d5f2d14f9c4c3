//! Real CRI-O (`tests/crio/crio.sh`: v1.34.0 built from the Go module proxy on first use, about
//! five minutes, then cached) as a rig node's runtime, configured by `speculum configure
//! --runtime cri-o`:
//! - the drop-in lands in the node's registries.conf.d and `configure` reloads CRI-O with
//!   SIGHUP through `hosts.crio_pid_file` (CRI-O logs the reload);
//! - the daemon runs with `containerd.enabled: false` and becomes ready without containerd;
//! - a CRI PullImage (tests/rig/cri-pull, what the kubelet sends) through CRI-O asks the mirror
//!   for `127.0.0.1:5080/<upstream ip>_5000/<repo>:<tag>` (the path-encoded upstream) and the
//!   pull completes with the pushed digest, whatever the mirror answers;
//! - `cleanup` removes the drop-in and reloads CRI-O again, which then pulls without the mirror.
//!
//! `SPECULUM_SKIP_CRIO=1` skips (the first build costs minutes of CI time).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use testkit::rig::{Rig, check_cri_result, image_named, node_ip};

fn crio_sh() -> String {
    testkit::repo_root()
        .join("tests/crio/crio.sh")
        .display()
        .to_string()
}

/// Polls `path` (bounded) until `count` lines contain `needle`; the lines that do.
fn wait_log(path: &PathBuf, needle: &str, count: usize) -> Result<Vec<String>> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let hits: Vec<String> = text
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect();
        if hits.len() >= count {
            return Ok(hits);
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "{}: {} of {count} lines with {needle:?} after 30 s",
            path.display(),
            hits.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn crio_pulls_through_the_drop_in_speculum_configures() -> Result<()> {
    const TEST: &str = "crio::crio_pulls_through_the_drop_in_speculum_configures";
    if std::env::var("SPECULUM_SKIP_CRIO").as_deref() == Ok("1") {
        testkit::rig::skip(TEST, "SPECULUM_SKIP_CRIO=1");
        return Ok(());
    }
    let Some(rig) = Rig::start(TEST, &["small"])? else {
        return Ok(());
    };
    let images = rig.images()?;
    let small = image_named(&images, "small")?;
    let reference = small.tag("v1")?.to_owned();

    let t0 = Instant::now();
    let crio = crio_sh();
    rig.call(&[&crio, "bin"])?;
    rig.step(&format!(
        "CRI-O ready to run ({:?}, built or cached)",
        t0.elapsed()
    ));
    rig.call(&[&crio, "start", "1"])?;
    let dir = PathBuf::from(rig.call(&[&crio, "dir", "1"])?.trim());
    let log = dir.join("crio.log");
    rig.step("CRI-O runs on node 1");

    // Node 1 is a CRI-O node: the drop-in, CRI-O signalled through its pid file, no containerd.
    let conf_d = dir.join("etc/registries.conf.d");
    for (key, value) in [
        ("SPECULUM_HOSTS_RUNTIME", "cri-o".to_owned()),
        (
            "SPECULUM_HOSTS_REGISTRIES_CONF_DIR",
            conf_d.display().to_string(),
        ),
        (
            "SPECULUM_HOSTS_CRIO_PID_FILE",
            dir.join("crio.pid").display().to_string(),
        ),
        ("SPECULUM_CONTAINERD_ENABLED", "false".to_owned()),
    ] {
        rig.set_env(key, &value);
    }
    rig.call(&["write_speculum_config", "1"])?;
    let said = rig.call(&["configure_node", "1"])?;
    let pid = std::fs::read_to_string(dir.join("crio.pid"))?;
    ensure!(
        said.contains(&format!("reloaded       crio pid {}", pid.trim())),
        "configure reloads CRI-O through the pid file:\n{said}"
    );
    let drop_in = std::fs::read_to_string(conf_d.join("99-speculum.conf"))
        .context("the drop-in in the node's registries.conf.d")?;
    let upstream = testkit::rig::upstream_host();
    let location = format!("127.0.0.1:5080/{}", upstream.replace(':', "_"));
    ensure!(drop_in.contains(&location), "{drop_in}");
    wait_log(&log, "Configuration reload completed", 1)?;
    rig.step("configure wrote the drop-in and CRI-O reloaded on SIGHUP");

    rig.call(&["start_speculum", "1"])?;
    rig.step("the daemon is ready with containerd.enabled=false");

    let out = rig
        .call(&[&crio, "pull", "1", &reference])
        .context("CRI pull through CRI-O")?;
    check_cri_result(&out, small)?;
    let want = format!(
        "Trying to access \\\"{location}/{}:v1\\\"",
        small.repository
    );
    let asked = wait_log(&log, &want, 1)
        .with_context(|| format!("CRI-O should have asked the mirror ({want})"))?;
    rig.step(&format!(
        "CRI-O pulled {reference} (mirror asked: {} time(s))",
        asked.len()
    ));
    ensure!(
        node_ip(1).starts_with(&testkit::rig::subnet()),
        "node addresses come from RIG_SUBNET"
    );

    // Cleanup: the drop-in goes, CRI-O reloads, the next pull does not ask the mirror. The
    // upstream is plain http, which only the drop-in allowed, so a plain registries.conf entry
    // keeps it reachable (as an operator's own file would).
    std::fs::write(
        dir.join("etc/registries.conf.d/50-upstream.conf"),
        format!(
            "[[registry]]\nprefix = \"{upstream}\"\nlocation = \"{upstream}\"\ninsecure = true\n"
        ),
    )?;
    let cleaned = rig.call(&[
        "node_exec",
        "1",
        &rig.bin.display().to_string(),
        "cleanup",
        "--config",
        &rig.dir.join("n1/speculum.yaml").display().to_string(),
    ])?;
    ensure!(
        cleaned.contains("reloaded       crio pid"),
        "cleanup reloads CRI-O too:\n{cleaned}"
    );
    ensure!(!conf_d.join("99-speculum.conf").exists(), "drop-in removed");
    wait_log(&log, "Configuration reload completed", 2)?;
    let naming_mirror = || -> Result<usize> {
        Ok(std::fs::read_to_string(&log)?
            .lines()
            .filter(|l| l.contains(&location))
            .count())
    };
    let before = naming_mirror()?;
    let out = rig.call(&[&crio, "pull", "1", &small.by_digest])?;
    check_cri_result(&out, small)?;
    let after = naming_mirror()?;
    ensure!(
        after == before,
        "after cleanup CRI-O no longer asks the mirror ({before} → {after} lines naming {location})"
    );
    rig.call(&[&crio, "stop", "1"])?;
    rig.step("cleanup removed the drop-in; CRI-O pulls straight from upstream");
    Ok(())
}
