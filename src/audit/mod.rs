//! The audit trail: "who was served what, from where, and why" — one JSON line per manifest or
//! blob request (with its policy decision) and per denied advertisement.
//!
//! The record format is [`AuditRecord`] (documented in `docs/audit.md`). The registry builds one
//! record per request from its access-log bookkeeping (the bytes really sent, counted by the
//! body wrapper) and hands it to an [`AuditSink`]. `record` never blocks serving:
//! [`jsonl::JsonlSink`] queues into a bounded channel drained by its own thread, and counts what
//! it had to drop. [`memory::MemorySink`] is the twin for tests; [`reader`] is `speculum audit`.

pub mod jsonl;
pub mod memory;
pub mod reader;
pub mod recent;

use std::path::PathBuf;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

pub use jsonl::JsonlSink;
pub use memory::MemorySink;

/// The tracing target audit lines are logged on.
pub(crate) const TARGET: &str = "speculum::audit";

/// One audit line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `request` or `advertise`.
    pub event: String,
    pub node: String,
    /// The client's socket address (never a forwarded header).
    pub client: String,
    /// Who asked: `containerd` (this node, mirror endpoint) or `peer` (another daemon).
    pub source: String,
    pub registry: String,
    pub repository: String,
    /// The tag or digest as requested.
    pub reference: String,
    /// The digest served (the requested one, or what a tag resolved to) when known.
    pub digest: Option<String>,
    /// `manifest` or `blob`.
    pub kind: String,
    /// `GET` or `HEAD`.
    pub method: String,
    /// Namespaces of pods waiting for the image: on the mirror endpoint, pods on this node
    /// (the node pod index); on the peer endpoint, the namespaces named by presented grants.
    pub namespaces: Vec<String>,
    /// Peer endpoint: the node the requesting daemon proved it runs on (peer authentication).
    pub requester: Option<String>,
    /// The grant a private object was served under: `namespace/pod`.
    pub grant: Option<String>,
    /// A tag request on the mirror endpoint: who named the digest — `upstream`, `cluster`
    /// (`cluster-first`, or upstream refused anonymous clients) or `stale` (the cluster,
    /// because upstream could not answer).
    pub tag_source: Option<String>,
    /// What upstream answered the tag `HEAD` (`digest`, `not-found`, `refused-401`,
    /// `status-503`, `timeout`, `unreachable`, …), when it was asked.
    pub tag_upstream: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    pub reason: String,
    /// `local` (this node's store), `peer` (another node), or `upstream` (nobody: 404, and
    /// containerd went to the registry).
    pub served_from: String,
    /// The peer the bytes came from, when `served_from` is `peer`.
    pub peer: Option<String>,
    pub status: u16,
    /// Body bytes actually sent to the client.
    pub bytes: u64,
    pub duration_ms: f64,
}

impl AuditRecord {
    /// `registry/repository`, the image name filters match on.
    pub fn image(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// Where audit records go. `record` must return at once, whatever happens to the record.
pub trait AuditSink: Send + Sync {
    fn record(&self, record: AuditRecord);
}

/// A sink that keeps nothing (for tools and tests that do not look at the audit trail).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NullSink;

impl AuditSink for NullSink {
    fn record(&self, _record: AuditRecord) {}
}

/// `speculum_audit_*`.
#[derive(Clone, Default)]
pub struct AuditMetrics {
    pub written: Counter,
    pub dropped: Counter,
}

impl AuditMetrics {
    pub fn register(registry: &mut Registry) -> AuditMetrics {
        let m = AuditMetrics::default();
        registry.register("audit_lines", "Audit lines written", m.written.clone());
        registry.register(
            "audit_dropped_lines",
            "Audit lines dropped because the queue was full or the file unwritable",
            m.dropped.clone(),
        );
        m
    }
}

/// The `audit:` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Log audit lines on the `speculum::audit` tracing target.
    pub log: bool,
    /// Also append them to this file (empty: no file).
    pub file: Option<PathBuf>,
    /// Rotate the file when it would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` … `FILE.N`).
    pub max_files: u32,
    /// Lines queued for the writer; past this, lines are dropped and counted.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            log: true,
            file: None,
            max_bytes: 64 * 1024 * 1024,
            max_files: 5,
            queue: 8192,
        }
    }
}

impl AuditConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_bytes < 4096 {
            errors.push("audit.max_bytes must be at least 4096".to_owned());
        }
        if self.max_files == 0 || self.max_files > 100 {
            errors.push("audit.max_files must be between 1 and 100".to_owned());
        }
        if self.queue == 0 || self.queue > 1_000_000 {
            errors.push("audit.queue must be between 1 and 1000000".to_owned());
        }
        errors
    }
}

/// Now, as an audit timestamp.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
