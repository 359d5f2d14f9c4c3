//! `speculum audit`: reads audit files (rotated siblings included), filters the records and
//! prints them or a summary, as a table or JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::AuditRecord;
use super::jsonl::rotated;

/// Which records to keep. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Substring of `registry/repository` (or of the reference / digest).
    pub image: Option<String>,
    pub namespace: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

impl Filter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        if let Some(image) = &self.image
            && !(r.image().contains(image.as_str())
                || r.reference.contains(image.as_str())
                || r.digest
                    .as_deref()
                    .is_some_and(|d| d.contains(image.as_str())))
        {
            return false;
        }
        if let Some(ns) = &self.namespace
            && !r.namespaces.iter().any(|n| n == ns)
        {
            return false;
        }
        if let Some(d) = &self.decision
            && &r.decision != d
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(t) = humantime::parse_rfc3339_weak(r.time.trim_end_matches('Z')) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t > u) {
                return false;
            }
        }
        true
    }
}

/// The files to read for `path`: its rotated siblings, oldest first, then the file itself.
pub fn with_rotated(path: &Path) -> Vec<PathBuf> {
    let mut older: Vec<PathBuf> = (1..=100)
        .map(|n| rotated(path, n))
        .take_while(|p| p.exists())
        .collect();
    older.reverse();
    older.push(path.to_owned());
    older
}

/// Records of `paths` (in order) that pass `filter`, and how many lines could not be parsed.
pub fn read(paths: &[PathBuf], filter: &Filter) -> std::io::Result<(Vec<AuditRecord>, usize)> {
    let mut out = Vec::new();
    let mut bad = 0;
    for path in paths {
        let text = std::fs::read_to_string(path)?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<AuditRecord>(line) {
                Ok(r) if filter.matches(&r) => out.push(r),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
    }
    Ok((out, bad))
}

/// One summary row: an image and where its requests were answered from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SummaryRow {
    pub image: String,
    pub decision: String,
    pub served_from: String,
    pub requests: u64,
    pub bytes: u64,
}

/// Requests and bytes by image, decision and where they were served from.
pub fn summarise(records: &[AuditRecord]) -> Vec<SummaryRow> {
    let mut rows: BTreeMap<(String, String, String), SummaryRow> = BTreeMap::new();
    for r in records {
        let key = (r.image(), r.decision.clone(), r.served_from.clone());
        let row = rows.entry(key).or_insert_with(|| SummaryRow {
            image: r.image(),
            decision: r.decision.clone(),
            served_from: r.served_from.clone(),
            ..SummaryRow::default()
        });
        row.requests += 1;
        row.bytes += r.bytes;
    }
    rows.into_values().collect()
}

/// A fixed-width text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Records as table rows.
pub fn record_rows(records: &[AuditRecord]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let header = vec![
        "TIME",
        "NODE",
        "SOURCE",
        "KIND",
        "IMAGE",
        "REFERENCE",
        "DECISION",
        "REASON",
        "FROM",
        "STATUS",
        "BYTES",
    ];
    let rows = records
        .iter()
        .map(|r| {
            vec![
                r.time.clone(),
                r.node.clone(),
                r.source.clone(),
                r.kind.clone(),
                r.image(),
                r.reference.clone(),
                r.decision.clone(),
                r.reason.clone(),
                r.served_from.clone(),
                r.status.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    (header, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(repo: &str, decision: &str, from: &str, bytes: u64, time: &str) -> AuditRecord {
        AuditRecord {
            time: time.to_owned(),
            registry: "127.0.0.1:5000".to_owned(),
            repository: repo.to_owned(),
            decision: decision.to_owned(),
            served_from: from.to_owned(),
            bytes,
            ..AuditRecord::default()
        }
    }

    #[test]
    fn filter_table() {
        let r = rec("rig/small", "allow", "peer", 10, "2026-11-23T17:00:00.000Z");
        let t = |s: &str| humantime::parse_rfc3339_weak(s).expect("time");
        let cases: Vec<(&str, Filter, bool)> = vec![
            ("empty", Filter::default(), true),
            (
                "image hit",
                Filter {
                    image: Some("rig/small".into()),
                    ..Filter::default()
                },
                true,
            ),
            (
                "image miss",
                Filter {
                    image: Some("rig/big".into()),
                    ..Filter::default()
                },
                false,
            ),
            (
                "decision",
                Filter {
                    decision: Some("deny".into()),
                    ..Filter::default()
                },
                false,
            ),
            (
                "namespace",
                Filter {
                    namespace: Some("team-a".into()),
                    ..Filter::default()
                },
                false,
            ),
            (
                "since before",
                Filter {
                    since: Some(t("2026-11-23T16:00:00")),
                    ..Filter::default()
                },
                true,
            ),
            (
                "since after",
                Filter {
                    since: Some(t("2026-11-23T18:00:00")),
                    ..Filter::default()
                },
                false,
            ),
            (
                "until before",
                Filter {
                    until: Some(t("2026-11-23T16:00:00")),
                    ..Filter::default()
                },
                false,
            ),
        ];
        for (name, f, want) in cases {
            assert_eq!(f.matches(&r), want, "{name}");
        }
    }

    #[test]
    fn summary_sums_bytes_by_image_and_source() {
        let t = "2026-11-23T17:00:00.000Z";
        let rows = summarise(&[
            rec("a", "allow", "peer", 10, t),
            rec("a", "allow", "peer", 5, t),
            rec("a", "deny", "upstream", 0, t),
            rec("b", "allow", "local", 7, t),
        ]);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].requests, rows[0].bytes), (2, 15));
        assert_eq!(rows[1].served_from, "upstream");
        assert_eq!(rows[2].image, "127.0.0.1:5000/b");
    }
}
