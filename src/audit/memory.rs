//! `MemorySink`: keeps every record in memory, for tests.

use std::sync::{Arc, Mutex};

use super::{AuditRecord, AuditSink};

#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    // A std Mutex: held only to push or copy, never across an `.await`.
    records: Arc<Mutex<Vec<AuditRecord>>>,
}

impl MemorySink {
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A copy of everything recorded so far.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, record: AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
    }
}
