//! Audit lines: one JSON object per image per admission decision (namespace, kind/name,
//! container, image before/after, digest, source, decision).
//!
//! [`JsonLinesAudit`] hands lines to a writer task through a bounded channel, so a slow
//! stdout never delays an admission; lines that do not fit are counted and dropped.
//! [`MemoryAudit`] keeps them for tests.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::mpsc;

/// One audited decision about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditLine {
    pub uid: String,
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub operation: String,
    pub container: String,
    pub role: String,
    pub path: String,
    pub before: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `pinned`, `kept` (already pinned or unchanged), `skipped`, `unresolved`, `denied`.
    pub decision: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub dry_run: bool,
}

/// Where audit lines go.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, line: AuditLine);
}

/// Writes JSON lines from a background task. See the module docs.
pub struct JsonLinesAudit {
    tx: mpsc::Sender<AuditLine>,
    dropped: AtomicU64,
}

impl JsonLinesAudit {
    /// Spawns the writer task; it ends when the sink is dropped.
    pub fn spawn<W: Write + Send + 'static>(mut out: W, capacity: usize) -> JsonLinesAudit {
        let (tx, mut rx) = mpsc::channel::<AuditLine>(capacity.max(1));
        tokio::task::spawn_blocking(move || {
            while let Some(line) = rx.blocking_recv() {
                if let Ok(mut s) = serde_json::to_vec(&line) {
                    s.push(b'\n');
                    if out.write_all(&s).and_then(|_| out.flush()).is_err() {
                        return;
                    }
                }
            }
        });
        JsonLinesAudit {
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl AuditSink for JsonLinesAudit {
    fn record(&self, line: AuditLine) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Keeps lines in memory (tests).
#[derive(Debug, Default)]
pub struct MemoryAudit {
    lines: Mutex<Vec<AuditLine>>,
}

impl MemoryAudit {
    pub fn lines(&self) -> Vec<AuditLine> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl AuditSink for MemoryAudit {
    fn record(&self, line: AuditLine) {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }
}

/// Discards lines (the offline `pin` command prints its own summary).
pub struct NoAudit;

impl AuditSink for NoAudit {
    fn record(&self, _line: AuditLine) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> AuditLine {
        AuditLine {
            uid: format!("u{n}"),
            namespace: "ns".into(),
            kind: "Pod".into(),
            name: "p".into(),
            operation: "CREATE".into(),
            container: "app".into(),
            role: "container".into(),
            path: "/spec/containers/0/image".into(),
            before: "r.io/a:1".into(),
            after: Some("r.io/a:1@sha256:x".into()),
            digest: Some("sha256:x".into()),
            source: Some("registry".into()),
            decision: "pinned".into(),
            reason: String::new(),
            dry_run: false,
        }
    }

    #[tokio::test]
    async fn json_lines_are_written_in_order() {
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let sink = JsonLinesAudit::spawn(file.reopen().expect("reopen"), 16);
        for n in 0..3 {
            sink.record(line(n));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(file.path()).expect("read");
            if text.lines().count() == 3 {
                break text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lines not written: {text:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        let uids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).expect("json")["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(uids, ["u0", "u1", "u2"]);
        assert!(!text.contains("\"reason\""), "empty reason omitted");
        assert_eq!(sink.dropped(), 0);
    }
}
