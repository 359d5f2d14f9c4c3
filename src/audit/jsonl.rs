//! `JsonlSink`: audit records as JSON lines on the `speculum::audit` tracing target and,
//! optionally, in a file rotated by size.
//!
//! Serving threads only `try_send` into a bounded channel; a dedicated thread serialises,
//! logs and writes. A full queue (a stalled disk, a flood) drops the line and counts it in
//! `speculum_audit_dropped_lines_total`: the audit trail may lose lines, a pull never waits.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use super::{AuditConfig, AuditMetrics, AuditRecord, AuditSink, TARGET};

pub struct JsonlSink {
    tx: SyncSender<AuditRecord>,
    metrics: AuditMetrics,
}

impl JsonlSink {
    /// Starts the writer thread. The file (when configured) is opened now, so a bad path fails
    /// the start instead of silently losing the trail.
    pub fn start(config: &AuditConfig, metrics: AuditMetrics) -> std::io::Result<JsonlSink> {
        let file = match &config.file {
            Some(path) => Some(Rotating::open(
                path.clone(),
                config.max_bytes,
                config.max_files,
            )?),
            None => None,
        };
        let (tx, rx) = sync_channel(config.queue);
        let log = config.log;
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("speculum-audit".to_owned())
            .spawn(move || writer(rx, file, log, m))?;
        Ok(JsonlSink { tx, metrics })
    }
}

impl AuditSink for JsonlSink {
    fn record(&self, record: AuditRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.dropped.inc();
            }
        }
    }
}

/// Runs until every sender is gone (the sink dropped at shutdown), writing what is queued.
fn writer(rx: Receiver<AuditRecord>, mut file: Option<Rotating>, log: bool, metrics: AuditMetrics) {
    while let Ok(record) = rx.recv() {
        let Ok(line) = serde_json::to_string(&record) else {
            metrics.dropped.inc();
            continue;
        };
        if log {
            tracing::info!(target: TARGET, "{line}");
        }
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write_line(&line)
        {
            metrics.dropped.inc();
            tracing::warn!(error = %e, "writing the audit file failed");
            continue;
        }
        metrics.written.inc();
    }
    if let Some(f) = file.as_mut() {
        let _ = f.file.flush();
    }
}

/// An append-only file that is renamed to `FILE.1` (and older ones shifted up to `FILE.N`)
/// before a line would take it past `max_bytes`.
struct Rotating {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    max_files: u32,
}

impl Rotating {
    fn open(path: PathBuf, max_bytes: u64, max_files: u32) -> std::io::Result<Rotating> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Rotating {
            path,
            file,
            size,
            max_bytes,
            max_files,
        })
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let n = line.len() as u64 + 1;
        if self.size > 0 && self.size + n > self.max_bytes {
            self.rotate()?;
        }
        // One write per line: a reader never sees half a line followed by another line.
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.size += n;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        for i in (1..self.max_files).rev() {
            let from = rotated(&self.path, i);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, i + 1))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// `FILE.n`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_at_most_max_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let mut r = Rotating::open(path.clone(), 100, 2).expect("open");
        let line = "x".repeat(40);
        for _ in 0..10 {
            r.write_line(&line).expect("write");
        }
        assert!(path.exists());
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(
            !rotated(&path, 3).exists(),
            "only max_files rotated files are kept"
        );
        for p in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            let text = std::fs::read_to_string(&p).expect("read");
            assert!(
                text.len() as u64 <= 100,
                "{} holds {} bytes",
                p.display(),
                text.len()
            );
            assert!(text.lines().all(|l| l == line), "whole lines only");
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = AuditMetrics::default();
        // A sink whose writer never drains: queue of 2, receiver held here.
        let (tx, _rx) = sync_channel(2);
        let sink = JsonlSink {
            tx,
            metrics: metrics.clone(),
        };
        for _ in 0..5 {
            sink.record(AuditRecord::default());
        }
        assert_eq!(metrics.dropped.get(), 3);
    }
}
