//! The benchmark scripts, run small, so they cannot rot between benchmark runs.
//!
//! One job: run `bench/cluster.sh` (2 rig nodes, one 1 MiB image, every scenario and mode),
//! `bench/serving.sh` (an 8 MiB blob, a handful of requests) and `bench/scale.sh` (4 nodes, one
//! 1 MiB image, every scenario with the blob cache off and on) with the debug daemon cargo built
//! for this test, and check that each produced every figure it promises. The numbers are not
//! judged here (a smoke run on a busy machine says nothing); BENCHMARKS.md holds the real runs.
//!
//! Needs root (network namespaces, containerd). When not root, or with `SPECULUM_SKIP_RIG=1` or
//! `SPECULUM_SKIP_BENCH=1`, it says why on stderr and passes. `bench/cluster.sh` holds the
//! machine-wide rig lock (/tmp/speculum-rig.lock) for its whole run, so it never overlaps
//! another rig user. Adds about a minute to `make test`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

fn skip_reason() -> Option<String> {
    for var in ["SPECULUM_SKIP_RIG", "SPECULUM_SKIP_BENCH"] {
        if std::env::var(var).is_ok_and(|v| v == "1") {
            return Some(format!("{var}=1"));
        }
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    (String::from_utf8_lossy(&uid.stdout).trim() != "0").then(|| "not root".to_owned())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a bench script with the given environment, bounded by `limit`; fails on a non-zero
/// exit, with the script's output in the error.
fn run_script(script: &str, env: &[(&str, String)], limit: Duration) -> Result<()> {
    let t = Instant::now();
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=10")
        .arg(limit.as_secs().to_string())
        .arg(repo().join(script))
        .env("SPECULUM_BIN", env!("CARGO_BIN_EXE_speculum"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("running {script}"))?;
    eprintln!("{script}: {:?}", t.elapsed());
    ensure!(
        out.status.success(),
        "{script} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn read_json_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line {l:?}")))
        .collect()
}

#[test]
fn cluster_and_serving_benchmarks_run_small() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("bench_smoke: skipped ({why})");
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let dir = out.path().to_string_lossy().into_owned();

    run_script(
        "bench/cluster.sh",
        &[
            ("BENCH_IMAGES", "1:1".to_owned()),
            ("BENCH_NODES", "2".to_owned()),
            ("BENCH_OUT", dir.clone()),
            // Wait for other rig users, but not forever.
            ("BENCH_LOCK_WAIT", "900".to_owned()),
        ],
        Duration::from_secs(1200),
    )?;
    let rows = read_json_lines(&out.path().join("cluster.jsonl"))?;
    for (scenario, mode) in [
        ("single", "direct"),
        ("update", "direct"),
        ("create", "direct"),
        ("update", "cache"),
        ("create", "cache"),
        ("update", "speculum"),
        ("create", "speculum"),
        ("create", "coalesce"),
    ] {
        let row = rows
            .iter()
            .find(|r| r["scenario"] == scenario && r["mode"] == mode)
            .with_context(|| format!("no {scenario}/{mode} row in {rows:?}"))?;
        ensure!(
            row["max_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{scenario}/{mode}: no pull time in {row}"
        );
    }
    // Where the bytes came from is the point of the benchmark: with one node holding the image,
    // the others' speculum pulls must not have fetched a layer from upstream.
    let update = rows
        .iter()
        .find(|r| r["scenario"] == "update" && r["mode"] == "speculum")
        .context("no update/speculum row")?;
    ensure!(
        update["upstream_layer_gets"] == 0,
        "update through speculum fetched layers from upstream: {update}"
    );
    // With the blob cache on, the cold pulls of both nodes cost one upstream GET of the layer.
    let coalesced = rows
        .iter()
        .find(|r| r["scenario"] == "create" && r["mode"] == "coalesce")
        .context("no create/coalesce row")?;
    ensure!(
        coalesced["upstream_layer_gets"] == 1,
        "coalesced create fetched the layer more than once from upstream: {coalesced}"
    );

    run_script(
        "bench/serving.sh",
        &[
            ("BENCH_BLOB_MB", "8".to_owned()),
            ("BENCH_ROUNDS", "1".to_owned()),
            ("BENCH_GETS", "3".to_owned()),
            ("BENCH_STREAMS", "4".to_owned()),
            ("BENCH_HEADS", "100".to_owned()),
            ("BENCH_OUT", dir.clone()),
            ("BENCH_IMAGES_DIR", format!("{dir}/images")),
        ],
        Duration::from_secs(300),
    )?;
    let serving: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("serving.json"))?)?;
    for field in ["speculum_1", "speculum_4", "nginx_1", "nginx_4"] {
        ensure!(
            serving["rss_kib"][field]
                .as_f64()
                .is_some_and(|k| k > 1000.0),
            "serving.json: no plausible rss_kib.{field} in {serving}"
        );
    }
    for server in ["speculum", "registry"] {
        ensure!(
            serving["head_latency"][server]["p50_us"]
                .as_f64()
                .is_some_and(|us| us > 0.0),
            "serving.json: no HEAD latency for {server} in {serving}"
        );
    }
    Ok(())
}

#[test]
fn scale_benchmark_runs_small() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("bench_smoke: skipped ({why})");
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let dir = out.path().to_string_lossy().into_owned();
    run_script(
        "bench/scale.sh",
        &[
            ("BENCH_SCALE_NODES", "4".to_owned()),
            ("BENCH_IMAGE", "1:1".to_owned()),
            ("BENCH_OUT", dir.clone()),
            ("BENCH_LOCK_WAIT", "900".to_owned()),
        ],
        Duration::from_secs(1200),
    )?;
    let rows = read_json_lines(&out.path().join("scale.jsonl"))?;
    let row = |scenario: &str, mode: &str| {
        rows.iter()
            .find(|r| r["scenario"] == scenario && r["mode"] == mode && r["nodes"] == 4)
            .with_context(|| format!("no {scenario}/{mode} row for N=4 in {rows:?}"))
    };
    for (scenario, mode) in [
        ("single", "direct"),
        ("update", "direct"),
        ("create", "direct"),
        ("update", "off"),
        ("create", "off"),
        ("update", "on"),
        ("create", "on"),
    ] {
        let r = row(scenario, mode)?;
        ensure!(
            r["max_ms"].as_f64().is_some_and(|ms| ms > 0.0)
                && r["bound_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{scenario}/{mode}: no pull time or bound in {r}"
        );
    }
    // One holder, three pullers: every layer came from the holder, none from upstream.
    for mode in ["off", "on"] {
        let r = row("update", mode)?;
        ensure!(
            r["upstream_layer_gets"] == 0,
            "update with the cache {mode} fetched from upstream: {r}"
        );
    }
    // Cold everywhere with the cache on: the cluster fetched the one layer once.
    let r = row("create", "on")?;
    ensure!(
        r["upstream_layer_gets"] == 1,
        "create with the cache on fetched the layer more than once: {r}"
    );
    let daemons = read_json_lines(&out.path().join("daemons.jsonl"))?;
    ensure!(
        daemons.len() == 16,
        "want 4 daemon lines per speculum scenario: {daemons:?}"
    );
    for d in &daemons {
        ensure!(
            d["cpu_s"].as_f64().is_some_and(|s| s > 0.0)
                && d["rss_hwm_kib"].as_f64().is_some_and(|k| k > 1000.0),
            "implausible daemon figures: {d}"
        );
    }
    ensure!(
        std::fs::read_to_string(out.path().join("scale.md"))?.contains("| 4 |"),
        "scale.md has no N=4 row"
    );
    Ok(())
}
