//! The JSON the status page polls (`/status/api`): one [`Snapshot`] of this node, taken from
//! the metrics registry, the readiness latch, the policy description and the recent-requests
//! ring. Strings are passed through as they are (serde escapes them for JSON; the page renders
//! them as text): hostile repository names stay visible, which is what an operator wants to
//! see.

use std::collections::BTreeSet;

use serde::Serialize;

use super::StatusSources;
use crate::audit::AuditRecord;

/// Everything the page shows, at one instant.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub node: String,
    pub ready: bool,
    /// The `/readyz` text (what keeps the node from being ready, notes).
    pub readiness: String,
    pub peers: Peers,
    pub advertised_keys: u64,
    pub cache: CacheUse,
    /// The policy in force: `bundle NAME@REVISION (FINGERPRINT)`, or the built-in one.
    pub policy: String,
    pub served: Served,
    pub audit_dropped: u64,
    pub recent: RecentView,
}

#[derive(Debug, Serialize)]
pub struct Peers {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    /// DHT peers with an open connection (`speculum_routing_peers`).
    pub connected: u64,
    pub handshake_failures: u64,
    pub unreachable: u64,
    /// Peers named in the recent requests: served us (`peer`) or were served (`requester`).
    pub seen_recently: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CacheUse {
    pub enabled: bool,
    pub bytes: u64,
    pub max_bytes: u64,
}

/// Bytes sent, by who asked and where they came from (`speculum_served_bytes_total`), and
/// mirror outcomes (`speculum_mirror_requests_total`).
#[derive(Debug, Serialize)]
pub struct Served {
    pub mirror_local_bytes: u64,
    pub mirror_peer_bytes: u64,
    pub peer_endpoint_bytes: u64,
    pub mirror_hits_local: u64,
    pub mirror_hits_peer: u64,
    pub mirror_misses: u64,
}

#[derive(Debug, Serialize)]
pub struct RecentView {
    pub capacity: usize,
    /// Requests recorded since start.
    pub seen: u64,
    /// Requests left out of the ring (it was being read at that instant).
    pub skipped: u64,
    /// Newest first.
    pub requests: Vec<Request>,
}

/// One served request, the audit record's fields the page shows.
#[derive(Debug, Serialize, PartialEq)]
pub struct Request {
    pub time: String,
    /// `containerd` (this node's mirror endpoint) or `peer` (another daemon).
    pub source: String,
    pub client: String,
    pub registry: String,
    pub repository: String,
    pub reference: String,
    pub kind: String,
    pub method: String,
    pub decision: String,
    pub reason: String,
    /// `local`, `peer`, `cache`, `upstream`, …
    pub served_from: String,
    pub peer: Option<String>,
    pub requester: Option<String>,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
}

impl From<&AuditRecord> for Request {
    fn from(r: &AuditRecord) -> Request {
        Request {
            time: r.time.clone(),
            source: r.source.clone(),
            client: r.client.clone(),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            reference: r.reference.clone(),
            kind: r.kind.clone(),
            method: r.method.clone(),
            decision: r.decision.clone(),
            reason: r.reason.clone(),
            served_from: r.served_from.clone(),
            peer: r.peer.clone(),
            requester: r.requester.clone(),
            status: r.status,
            bytes: r.bytes,
            duration_ms: r.duration_ms,
        }
    }
}

impl Snapshot {
    pub fn take(sources: &StatusSources) -> Snapshot {
        let g = Gauges((sources.metrics)());
        let recent = sources.recent.snapshot();
        let requests: Vec<Request> = recent
            .records
            .iter()
            .rev()
            .map(|r| Request::from(r.as_ref()))
            .collect();
        let seen_recently: BTreeSet<String> = requests
            .iter()
            .flat_map(|r| [r.peer.clone(), r.requester.clone()])
            .flatten()
            .filter(|p| !p.is_empty())
            .collect();
        Snapshot {
            time: crate::audit::now(),
            node: sources.node.clone(),
            ready: sources.readiness.is_ready(),
            readiness: sources.readiness.detail(),
            peers: Peers {
                peer_id: sources.peer_id.clone(),
                listen_addrs: sources.listen_addrs.clone(),
                connected: g.sum("speculum_routing_peers", &[]),
                handshake_failures: g.sum("speculum_routing_handshake_failures_total", &[]),
                unreachable: g.sum("speculum_routing_peers_unreachable_total", &[]),
                seen_recently: seen_recently.into_iter().collect(),
            },
            advertised_keys: g.sum("speculum_routing_advertised_keys", &[]),
            cache: CacheUse {
                enabled: sources.cache_enabled,
                bytes: g.sum("speculum_cache_bytes", &[]),
                max_bytes: sources.cache_max_bytes,
            },
            policy: (sources.policy)(),
            served: Served {
                mirror_local_bytes: g.sum(
                    "speculum_served_bytes_total",
                    &[("handler", "mirror"), ("source", "local")],
                ),
                mirror_peer_bytes: g.sum(
                    "speculum_served_bytes_total",
                    &[("handler", "mirror"), ("source", "peer")],
                ),
                peer_endpoint_bytes: g.sum("speculum_served_bytes_total", &[("handler", "peer")]),
                mirror_hits_local: g.sum("speculum_mirror_requests_total", &[("outcome", "local")]),
                mirror_hits_peer: g.sum("speculum_mirror_requests_total", &[("outcome", "peer")]),
                mirror_misses: g.sum("speculum_mirror_requests_total", &[("outcome", "miss")]),
            },
            audit_dropped: g.sum("speculum_audit_dropped_lines_total", &[]),
            recent: RecentView {
                capacity: recent.capacity,
                seen: recent.seen,
                skipped: recent.skipped,
                requests,
            },
        }
    }
}

/// A Prometheus text exposition, read by metric name (names are the stable contract; the
/// `Metrics` struct's fields are not).
pub(crate) struct Gauges(pub String);

impl Gauges {
    /// The sum of every sample of `name` carrying all of `labels` (0 when none), rounded down
    /// to an integer (every number the page shows is a count of something).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let total: f64 = crate::metrics::text::samples(&self.0)
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.has_label(k, v)))
            .map(|s| s.value)
            .filter(|v| v.is_finite() && *v > 0.0)
            .sum();
        total as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_sum_by_name_and_labels() {
        let text = "\
# HELP speculum_served_bytes Bytes
# TYPE speculum_served_bytes counter
speculum_served_bytes_total{handler=\"mirror\",source=\"local\"} 100
speculum_served_bytes_total{handler=\"mirror\",source=\"peer\"} 250
speculum_served_bytes_total{handler=\"peer\",source=\"local\"} 7
speculum_routing_peers 2
speculum_routing_peers_unreachable_total 3
speculum_bogus NaN
";
        let g = Gauges(text.to_owned());
        // (name, labels, want)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u64);
        let cases: [Case; 6] = [
            ("speculum_served_bytes_total", &[], 357),
            (
                "speculum_served_bytes_total",
                &[("handler", "mirror"), ("source", "peer")],
                250,
            ),
            ("speculum_served_bytes_total", &[("handler", "peer")], 7),
            ("speculum_routing_peers", &[], 2),
            ("speculum_routing_absent", &[], 0),
            ("speculum_bogus", &[], 0),
        ];
        for (name, labels, want) in cases {
            assert_eq!(g.sum(name, labels), want, "{name} {labels:?}");
        }
    }

    #[test]
    fn hostile_strings_survive_as_data() {
        let hostile = "<img src=x onerror=alert(1)>\"'</script>";
        let record = AuditRecord {
            repository: hostile.to_owned(),
            reference: hostile.to_owned(),
            ..AuditRecord::default()
        };
        let request = Request::from(&record);
        let json = serde_json::to_string(&request).expect("json");
        let back: serde_json::Value = serde_json::from_str(&json).expect("parse");
        assert_eq!(
            back["repository"], hostile,
            "unchanged, for the page to show"
        );
    }
}
