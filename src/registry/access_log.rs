//! The access log, one job: the one audit record each request produces, written once —
//! when an error or a `HEAD` is answered, or when a body has been fully sent or dropped by the
//! client (a client that disconnects mid-blob still gets its record, with the bytes really
//! sent). What the request learns on its way (decision, digest, peer, grant, tag source) is
//! collected here first; where the bytes came from is a [`Source`], never a string.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::StatusCode;

use super::PullRequest;
use super::metrics::{Handler, Source};
use crate::audit::{AuditRecord, AuditSink};
use crate::oci::Kind;

/// One audit record per request, written once: when an error is answered, when a HEAD is
/// answered, or when a body has been fully sent or dropped by the client (a client that
/// disconnects mid-blob still gets its record, with the short byte count).
#[derive(Clone)]
pub struct AccessLog(Arc<AccessInner>);

struct AccessInner {
    done: AtomicBool,
    started: Instant,
    method: &'static str,
    handler: Handler,
    kind: Kind,
    registry: String,
    repository: String,
    reference: String,
    client: std::net::SocketAddr,
    hop: bool,
    node: String,
    audit: Arc<dyn AuditSink>,
    // A std Mutex: set once or twice per request, never held across an `.await`.
    learned: Mutex<Learned>,
}

/// What the request learns on its way: the decision, the digest, the peer that served it.
#[derive(Default)]
struct Learned {
    allowed: Option<bool>,
    reason: String,
    digest: Option<String>,
    peer: Option<String>,
    namespaces: Vec<String>,
    requester: Option<String>,
    grant: Option<String>,
    tag_source: Option<&'static str>,
    tag_upstream: Option<String>,
}

impl AccessLog {
    /// The record of `req` on `handler`, started at `started`, for `node`, to be written to
    /// `audit`.
    pub fn new(
        req: &PullRequest,
        handler: Handler,
        started: Instant,
        node: &str,
        audit: Arc<dyn AuditSink>,
    ) -> AccessLog {
        AccessLog(Arc::new(AccessInner {
            done: AtomicBool::new(false),
            started,
            method: if req.head { "HEAD" } else { "GET" },
            handler,
            kind: req.path.kind,
            registry: req.ns.clone().unwrap_or_default(),
            repository: req.path.name.clone(),
            reference: req.path.target.to_string(),
            client: req.client,
            hop: req.hop,
            node: node.to_owned(),
            audit,
            learned: Mutex::new(Learned {
                digest: match &req.path.target {
                    crate::oci::Target::Digest(d) => Some(d.to_string()),
                    crate::oci::Target::Tag(_) => None,
                },
                ..Learned::default()
            }),
        }))
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.0.learned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the policy decision.
    pub fn decided(&self, allowed: bool, reason: &str) {
        let mut l = self.learned();
        l.allowed = Some(allowed);
        l.reason = reason.to_owned();
    }

    /// Records the digest being served (what a tag resolved to).
    pub fn set_digest(&self, digest: String) {
        self.learned().digest = Some(digest);
    }

    /// Records the namespaces the decision was made for.
    pub fn set_namespaces(&self, namespaces: Vec<String>) {
        self.learned().namespaces = namespaces;
    }

    /// Records the node a peer request proved it came from.
    pub fn set_requester(&self, node: String) {
        self.learned().requester = Some(node);
    }

    /// Records the grant (`namespace/pod`) a private object is served under.
    pub fn set_grant(&self, grant: String) {
        self.learned().grant = Some(grant);
    }

    /// Records who named a tag's digest (`upstream`, `cluster`, `stale`) and what upstream
    /// answered, when it was asked.
    pub fn set_tag(&self, source: &'static str, upstream: Option<String>) {
        let mut l = self.learned();
        l.tag_source = Some(source);
        l.tag_upstream = upstream;
    }

    /// Records the peer the bytes come from.
    pub fn set_peer(&self, peer: String) {
        self.learned().peer = Some(peer);
    }

    /// Writes the record (only the first call writes). `source` is where the bytes came from;
    /// `None` when nobody served them (an error or a miss: containerd goes upstream).
    pub fn finish(&self, status: StatusCode, bytes: u64, source: Option<Source>) {
        let a = &self.0;
        if a.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let learned = std::mem::take(&mut *self.learned());
        let from_peer = a.handler == Handler::Peer || a.hop;
        let record = AuditRecord {
            time: crate::audit::now(),
            event: "request".to_owned(),
            node: a.node.clone(),
            client: a.client.to_string(),
            source: if from_peer { "peer" } else { "containerd" }.to_owned(),
            registry: a.registry.clone(),
            repository: a.repository.clone(),
            reference: a.reference.clone(),
            digest: learned.digest,
            kind: a.kind.as_str().to_owned(),
            method: a.method.to_owned(),
            namespaces: learned.namespaces,
            requester: learned.requester,
            grant: learned.grant,
            tag_source: learned.tag_source.map(str::to_owned),
            tag_upstream: learned.tag_upstream,
            decision: match learned.allowed {
                Some(true) | None => "allow",
                Some(false) => "deny",
            }
            .to_owned(),
            reason: learned.reason,
            // `upstream` also for a miss: containerd then goes there itself (status 404).
            served_from: source.map_or("upstream", Source::as_str).to_owned(),
            peer: learned.peer,
            status: status.as_u16(),
            bytes,
            duration_ms: a.started.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::debug!(
            handler = ?a.handler,
            registry = %record.registry,
            reference = %record.reference,
            client.addr = %a.client,
            http.status = record.status,
            bytes,
            source = source.map_or("none", Source::as_str),
            decision = %record.decision,
            tag.source = record.tag_source.as_deref().unwrap_or(""),
            "request"
        );
        a.audit.record(record);
    }
}
