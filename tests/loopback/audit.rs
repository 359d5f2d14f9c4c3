//! The audit trail on disk and `speculum audit`: records go through the real `JsonlSink`
//! (bounded queue, writer thread, size rotation) into files, and the real binary reads them back
//! (rotated siblings included), filters and summarises them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use speculum::audit::{AuditConfig, AuditMetrics, AuditRecord, AuditSink, JsonlSink};

fn record(i: usize) -> AuditRecord {
    let (repo, decision, from) = match i % 3 {
        0 => ("rig/small", "allow", "peer"),
        1 => ("rig/small", "allow", "local"),
        _ => ("rig/private", "deny", "upstream"),
    };
    AuditRecord {
        time: format!("2026-11-23T17:{:02}:00.000Z", i % 60),
        event: "request".to_owned(),
        node: "n1".to_owned(),
        client: "127.0.0.1:40000".to_owned(),
        source: "containerd".to_owned(),
        registry: "127.0.0.1:5000".to_owned(),
        repository: repo.to_owned(),
        reference: format!("sha256:{i:064x}"),
        digest: Some(format!("sha256:{i:064x}")),
        kind: "blob".to_owned(),
        method: "GET".to_owned(),
        namespaces: if i.is_multiple_of(2) {
            vec!["team-a".to_owned()]
        } else {
            Vec::new()
        },
        decision: decision.to_owned(),
        reason: "test".to_owned(),
        served_from: from.to_owned(),
        peer: None,
        requester: None,
        grant: None,
        tag_source: None,
        tag_upstream: None,
        status: if decision == "deny" { 404 } else { 200 },
        bytes: if decision == "deny" { 0 } else { 1000 },
        duration_ms: 1.5,
    }
}

/// Writes `n` records through a real sink and waits (bounded) until they are all on disk.
fn write(path: &Path, n: usize, max_bytes: u64) -> AuditMetrics {
    let metrics = AuditMetrics::default();
    let config = AuditConfig {
        log: false,
        file: Some(path.to_owned()),
        max_bytes,
        max_files: 3,
        queue: 10_000,
    };
    let sink = JsonlSink::start(&config, metrics.clone()).expect("sink");
    for i in 0..n {
        sink.record(record(i));
    }
    let t0 = Instant::now();
    while metrics.written.get() + metrics.dropped.get() < n as u64 {
        assert!(t0.elapsed() < Duration::from_secs(10), "writer stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
    metrics
}

fn speculum(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_speculum"))
        .args(args)
        .output()
        .expect("running speculum");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn lines_rotate_and_the_reader_sees_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    // ~530 bytes per line, 60 lines, 16 KiB per file: rotation happens, nothing is dropped
    // and (3 rotated files + current) hold all 60 lines.
    let metrics = write(&path, 60, 16 * 1024);
    assert_eq!(metrics.dropped.get(), 0);
    assert_eq!(metrics.written.get(), 60);
    assert!(dir.path().join("audit.jsonl.1").exists(), "rotated");
    let p = path.to_str().expect("utf-8 path");

    let (ok, out) = speculum(&["audit", p, "--output", "json"]);
    assert!(ok, "{out}");
    let lines: Vec<AuditRecord> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 60, "every line, across rotated files");
    assert_eq!(lines[0], record(0), "oldest first, written as recorded");
    assert_eq!(lines[59], record(59));
}

#[test]
fn filters_and_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    write(&path, 30, 1 << 20);
    let p = path.to_str().expect("utf-8 path");
    let count = |args: &[&str]| -> usize {
        let mut all = vec!["audit", p, "--output", "json"];
        all.extend_from_slice(args);
        let (ok, out) = speculum(&all);
        assert!(ok, "{args:?}: {out}");
        out.lines().count()
    };
    // (name, args, want lines)
    let cases: [(&str, &[&str], usize); 6] = [
        ("all", &[], 30),
        ("image", &["--image", "rig/private"], 10),
        ("decision", &["--decision", "allow"], 20),
        ("namespace", &["--namespace", "team-a"], 15),
        ("since", &["--since", "2026-11-23T17:20:00Z"], 10),
        ("until", &["--until", "2026-11-23T17:09:00Z"], 10),
    ];
    for (name, args, want) in cases {
        assert_eq!(count(args), want, "{name}");
    }

    let (ok, out) = speculum(&["audit", p, "--summary"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("IMAGE"), "a table: {out}");
    let (ok, out) = speculum(&["audit", p, "--summary", "--output", "json"]);
    assert!(ok, "{out}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    let peer = rows
        .iter()
        .find(|r| r["served_from"] == "peer")
        .expect("peer row");
    assert_eq!(
        (peer["requests"].as_u64(), peer["bytes"].as_u64()),
        (Some(10), Some(10_000))
    );

    let (ok, out) = speculum(&["audit", p, "--since", "yesterday"]);
    assert!(!ok, "a bad time is refused: {out}");
}

#[test]
fn garbage_lines_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let good = serde_json::to_string(&record(0)).expect("json");
    std::fs::write(
        &path,
        format!("{good}\nnot json\n{{\"time\": 5}}\n{good}\n"),
    )
    .expect("write");
    let (ok, out) = speculum(&["audit", path.to_str().expect("utf-8"), "--output", "json"]);
    assert!(ok, "{out}");
    assert!(out.contains("skipped 2 lines"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with('{')).count(), 2);
}
