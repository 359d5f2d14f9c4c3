//! A [`Report`] as text for people and as JSON for scripts. Pure.
//!
//! Text: one line per finding (`STATUS  id [subject]  summary`), the fix indented under it,
//! a count line last. JSON: one object, `{"node", "status", "counts", "findings"}`; the
//! findings carry `id`, `subject` (when set), `status`, `summary` and `fix` (when set).

use std::fmt::Write;

use super::{Report, Status};

const ALL: [Status; 4] = [Status::Ok, Status::Warn, Status::Fail, Status::Skip];

/// The report for a terminal.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "speculum doctor: node {}", report.node);
    let width = report
        .findings
        .iter()
        .map(|f| label(f.id, f.subject.as_deref()).len())
        .max()
        .unwrap_or(0);
    for f in &report.findings {
        let name = label(f.id, f.subject.as_deref());
        let status = match f.status {
            // Problems in capitals, so they stand out in a long list.
            Status::Fail => "FAIL",
            Status::Warn => "WARN",
            s => s.as_str(),
        };
        let _ = writeln!(out, "{status:<4}  {name:<width$}  {}", f.summary);
        for (i, line) in f.fix.lines().enumerate() {
            let head = if i == 0 { "fix: " } else { "     " };
            let _ = writeln!(out, "      {:<width$}  {head}{line}", "");
        }
    }
    let counts: Vec<String> = ALL
        .iter()
        .map(|s| format!("{} {}", report.count(*s), s.as_str()))
        .collect();
    let _ = writeln!(out, "{}", counts.join(", "));
    out
}

/// The report as one JSON object and a newline.
pub fn json(report: &Report) -> String {
    let counts: serde_json::Map<String, serde_json::Value> = ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), report.count(*s).into()))
        .collect();
    let doc = serde_json::json!({
        "node": report.node,
        "status": report.worst(),
        "counts": counts,
        "findings": report.findings,
    });
    format!("{doc}\n")
}

fn label(id: &str, subject: Option<&str>) -> String {
    match subject {
        Some(s) => format!("{id} [{s}]"),
        None => id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Finding;
    use super::*;

    fn report(findings: Vec<Finding>) -> Report {
        Report {
            node: "n1".into(),
            findings,
        }
    }

    #[test]
    fn exit_code_and_worst_table() {
        let ok = Finding::ok("a", "fine");
        let skip = Finding::skip("b", "not here");
        let warn = Finding::warn("c", "meh", "do x");
        let fail = Finding::fail("d", "broken", "do y");
        let cases: Vec<(&str, Vec<Finding>, Status, u8)> = vec![
            ("nothing", vec![], Status::Ok, 0),
            ("all ok", vec![ok.clone(), ok.clone()], Status::Ok, 0),
            (
                "skips only",
                vec![ok.clone(), skip.clone()],
                Status::Skip,
                0,
            ),
            (
                "a warning",
                vec![ok.clone(), warn.clone(), skip.clone()],
                Status::Warn,
                0,
            ),
            (
                "a failure",
                vec![fail.clone(), warn.clone(), ok.clone()],
                Status::Fail,
                1,
            ),
        ];
        for (name, findings, worst, code) in cases {
            let r = report(findings);
            assert_eq!(r.worst(), worst, "{name}");
            assert_eq!(r.exit_code(), code, "{name}");
        }
    }

    #[test]
    fn text_puts_the_fix_under_its_finding() {
        let r = report(vec![
            Finding::ok("containerd.reachable", "containerd v2.3.7 answers"),
            Finding::fail(
                "hosts.toml",
                "missing",
                "run speculum configure\nthen restart",
            )
            .about("ghcr.io"),
            Finding::skip("clock.skew", "not in a pod"),
        ]);
        let got = text(&r);
        let want = "\
speculum doctor: node n1
ok    containerd.reachable  containerd v2.3.7 answers
FAIL  hosts.toml [ghcr.io]  missing
                            fix: run speculum configure
                                 then restart
skip  clock.skew            not in a pod
1 ok, 0 warn, 1 fail, 1 skip
";
        assert_eq!(got, want);
    }

    #[test]
    fn json_has_counts_status_and_findings() {
        let r = report(vec![
            Finding::warn("dht.peers", "no peers", "check bootstrap"),
            Finding::ok("daemon.ready", "ready"),
        ]);
        let v: serde_json::Value = serde_json::from_str(&json(&r)).expect("json");
        assert_eq!(v["node"], "n1");
        assert_eq!(v["status"], "warn");
        assert_eq!(v["counts"]["warn"], 1);
        assert_eq!(v["counts"]["ok"], 1);
        assert_eq!(v["counts"]["fail"], 0);
        assert_eq!(v["findings"][0]["id"], "dht.peers");
        assert_eq!(v["findings"][0]["fix"], "check bootstrap");
        // Empty fields are left out rather than sent as "" or null.
        assert!(v["findings"][1].get("fix").is_none());
        assert!(v["findings"][1].get("subject").is_none());
        assert!(json(&r).ends_with("}\n"));
    }
}
