//! `RecentRequests`: the last N audit records in memory, for the node status page
//! (`src/status/`), and [`Tee`], which feeds it beside the real sink.
//!
//! Only the status page reads it, so it is only built when the page is on. `record` holds a
//! std Mutex for one push (the record is moved into an `Arc` before the lock is taken), and a
//! reader holds it only to clone `Arc`s: a request never waits for a page to be serialised.
//! When the lock is contended the record is not waited for either: it is dropped from the ring
//! (never from the audit trail itself) and counted, so the page can say it is missing lines.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use super::{AuditRecord, AuditSink};

/// A bounded ring of the most recent audit records. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct RecentRequests {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    // A std Mutex: held for one push or one copy of `Arc`s, never across an `.await`.
    ring: Mutex<VecDeque<Arc<AuditRecord>>>,
    /// Records ever offered (kept or not).
    seen: AtomicU64,
    /// Records not kept because a reader held the lock at that instant.
    skipped: AtomicU64,
}

/// What a reader gets: the records, oldest first, and the counters.
#[derive(Debug, Clone)]
pub struct Recent {
    pub records: Vec<Arc<AuditRecord>>,
    pub seen: u64,
    pub skipped: u64,
    pub capacity: usize,
}

impl RecentRequests {
    /// A ring keeping at most `capacity` records (at least one).
    pub fn new(capacity: usize) -> RecentRequests {
        let capacity = capacity.max(1);
        RecentRequests {
            inner: Arc::new(Inner {
                capacity,
                ring: Mutex::new(VecDeque::with_capacity(capacity)),
                seen: AtomicU64::new(0),
                skipped: AtomicU64::new(0),
            }),
        }
    }

    /// The records kept, oldest first.
    pub fn snapshot(&self) -> Recent {
        let records = {
            let ring = self.inner.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.iter().cloned().collect()
        };
        Recent {
            records,
            seen: self.inner.seen.load(Ordering::Relaxed),
            skipped: self.inner.skipped.load(Ordering::Relaxed),
            capacity: self.inner.capacity,
        }
    }
}

impl AuditSink for RecentRequests {
    fn record(&self, record: AuditRecord) {
        self.inner.seen.fetch_add(1, Ordering::Relaxed);
        let record = Arc::new(record);
        let mut ring = match self.inner.ring.try_lock() {
            Ok(ring) => ring,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                self.inner.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if ring.len() == self.inner.capacity {
            ring.pop_front();
        }
        ring.push_back(record);
    }
}

/// Hands every record to two sinks: the audit trail first, then a second reader.
pub(crate) struct Tee {
    pub first: Arc<dyn AuditSink>,
    pub second: Arc<dyn AuditSink>,
}

impl AuditSink for Tee {
    fn record(&self, record: AuditRecord) {
        self.second.record(record.clone());
        self.first.record(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::MemorySink;

    fn rec(i: u64) -> AuditRecord {
        AuditRecord {
            repository: format!("repo-{i}"),
            bytes: i,
            ..AuditRecord::default()
        }
    }

    #[test]
    fn keeps_the_newest_capacity_records_oldest_first() {
        // (name, capacity, records offered, want bytes kept)
        let cases: [(&str, usize, u64, Vec<u64>); 4] = [
            ("empty", 3, 0, vec![]),
            ("under capacity", 3, 2, vec![0, 1]),
            ("exactly full", 3, 3, vec![0, 1, 2]),
            ("wrapped", 3, 7, vec![4, 5, 6]),
        ];
        for (name, capacity, n, want) in cases {
            let ring = RecentRequests::new(capacity);
            for i in 0..n {
                ring.record(rec(i));
            }
            let got = ring.snapshot();
            let bytes: Vec<u64> = got.records.iter().map(|r| r.bytes).collect();
            assert_eq!(bytes, want, "{name}");
            assert_eq!(got.seen, n, "{name}");
            assert_eq!(got.skipped, 0, "{name}");
            assert_eq!(got.capacity, capacity, "{name}");
        }
    }

    #[test]
    fn zero_capacity_still_keeps_one() {
        let ring = RecentRequests::new(0);
        ring.record(rec(1));
        ring.record(rec(2));
        let got = ring.snapshot();
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.records[0].bytes, 2);
    }

    #[test]
    fn a_held_lock_skips_and_counts_instead_of_waiting() {
        let ring = RecentRequests::new(4);
        ring.record(rec(1));
        let guard = ring.inner.ring.lock().expect("lock");
        // Would deadlock here if `record` waited for the lock.
        ring.record(rec(2));
        drop(guard);
        let got = ring.snapshot();
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.seen, 2);
        assert_eq!(got.skipped, 1);
    }

    #[test]
    fn tee_feeds_both_sinks() {
        let trail = MemorySink::new();
        let ring = RecentRequests::new(8);
        let tee = Tee {
            first: Arc::new(trail.clone()),
            second: Arc::new(ring.clone()),
        };
        tee.record(rec(7));
        assert_eq!(trail.records(), vec![rec(7)]);
        assert_eq!(ring.snapshot().records[0].as_ref(), &rec(7));
    }
}
