//! Golden list of the daemon's metric families: name, type and label names, each exactly once.
//! The dashboard (`chart/files/dashboards/speculum.json`), alerts and users' queries depend on
//! these names, so a rename or a new label must fail here first (and be a deliberate edit of
//! the table). It also checks that README.md's "Metrics" section names every family, and pins
//! a few label values (lower case, Prometheus style).
//!
//! Every labelled family gets one sample first (through the recording side of each subsystem),
//! because the text exposition only shows label names on samples.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use std::time::Duration;

use speculum::metrics::Metrics;
use speculum::policy::conformance::input;
use speculum::policy::{Gate, StaticPolicy, Switches};
use speculum::registry::{Handler, Outcome, Source};

/// `(family, type, label names)`: the whole public metric surface of the daemon.
const FAMILIES: &[(&str, &str, &[&str])] = &[
    // registry (src/registry)
    (
        "http_requests",
        "counter",
        &["handler", "kind", "method", "status"],
    ),
    (
        "http_request_duration_seconds",
        "histogram",
        &["handler", "kind", "method", "status"],
    ),
    ("mirror_requests", "counter", &["kind", "outcome"]),
    ("served_bytes", "counter", &["handler", "source"]),
    ("served_sendfile_bytes", "counter", &[]),
    ("mirror_peer_failures", "counter", &["reason"]),
    ("mirror_resumes", "counter", &[]),
    ("mirror_chunked_blobs", "counter", &[]),
    ("mirror_chunk_refetches", "counter", &[]),
    ("mirror_teed_blobs", "counter", &["result"]),
    ("mirror_tag_resolutions", "counter", &["source"]),
    ("mirror_tag_upstream_duration_seconds", "histogram", &[]),
    // routing (src/routing)
    ("routing_lookup_duration_seconds", "histogram", &[]),
    ("routing_advertised_keys", "gauge", &[]),
    ("routing_peers", "gauge", &[]),
    ("routing_handshake_failures", "counter", &[]),
    ("routing_peers_unreachable", "counter", &[]),
    // health (src/app.rs)
    ("ready", "gauge", &[]),
    ("containerd_config_problem", "gauge", &["problem"]),
    // policy (src/policy)
    (
        "policy_decisions",
        "counter",
        &["action", "decision", "reason"],
    ),
    ("policy_errors", "counter", &["kind"]),
    ("policy_evaluation_duration_seconds", "histogram", &[]),
    ("policy_reloads", "counter", &["result"]),
    // audit (src/audit)
    ("audit_lines", "counter", &[]),
    ("audit_dropped_lines", "counter", &[]),
    // blob cache (src/cache)
    ("upstream_bytes", "counter", &[]),
    ("upstream_saved_bytes", "counter", &[]),
    ("cache_coalesced_followers", "counter", &[]),
    ("cache_upstream_fetches", "counter", &[]),
    ("cache_bytes", "gauge", &[]),
];

/// Records one sample in every labelled family, through the daemon's own recording paths
/// where they are public.
fn exercise(m: &Metrics) {
    m.registry.request(
        Handler::Mirror,
        "blob",
        "GET",
        200,
        Duration::from_millis(1),
    );
    m.registry.mirror_outcome("blob", Outcome::Miss);
    m.registry.teed("complete");
    m.registry.bytes(Handler::Peer, Source::PeerInflight).inc();
    m.registry.peer_failed("connect");
    m.registry.tag_resolved("upstream");
    m.containerd_problem("hosts_dir_unknown", true);
    // Policy: one decision, one failed evaluation, one reload.
    let gate = Gate::new(
        Arc::new(StaticPolicy::default()),
        Switches::default(),
        m.policy.clone(),
    );
    gate.decide(&input("127.0.0.1:5000", "rig/x", Some("v1"), None));
    gate.swap(Arc::new(StaticPolicy::failing()));
    gate.decide(&input("127.0.0.1:5000", "rig/x", Some("v1"), None));
    m.policy.reloaded(true);
}

/// The family a sample line belongs to, and the label names on it (`le` is the histogram's).
fn sample(line: &str) -> Option<(String, BTreeSet<String>)> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line.split(' ').next()?, ""),
    };
    let labels = match rest.find('}') {
        Some(end) => rest[..end]
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
            .filter(|k| k != "le")
            .collect(),
        None => BTreeSet::new(),
    };
    Some((name.to_owned(), labels))
}

fn family_of<'a>(sample_name: &str, types: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let mut candidates = vec![sample_name];
    for suffix in ["_total", "_bucket", "_sum", "_count", "_created"] {
        if let Some(base) = sample_name.strip_suffix(suffix) {
            candidates.push(base);
        }
    }
    candidates
        .into_iter()
        .find_map(|c| types.get_key_value(c).map(|(k, _)| k.as_str()))
}

#[test]
fn every_family_is_pinned() {
    let metrics = Metrics::new();
    exercise(&metrics);
    let text = metrics.encode();

    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
            let previous = types.insert(name.to_owned(), kind.to_owned());
            assert!(previous.is_none(), "{name} registered twice");
        }
    }
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, names) = sample(line).expect("sample line");
        let family = family_of(&name, &types)
            .unwrap_or_else(|| panic!("sample {name} belongs to no family"))
            .to_owned();
        let seen = labels
            .entry(family.clone())
            .or_insert_with(|| names.clone());
        assert_eq!(*seen, names, "{family}: label names differ between samples");
    }

    let want: BTreeMap<String, String> = FAMILIES
        .iter()
        .map(|(n, t, _)| (format!("speculum_{n}"), (*t).to_owned()))
        .collect();
    assert_eq!(types, want, "metric families (name → type) changed");
    for (name, _, want_labels) in FAMILIES {
        let family = format!("speculum_{name}");
        let want_labels: BTreeSet<String> = want_labels.iter().map(|s| (*s).to_owned()).collect();
        let got = labels.get(&family).cloned().unwrap_or_default();
        assert_eq!(got, want_labels, "{family}: label names");
    }
}

#[test]
fn label_values_are_lower_case() {
    let metrics = Metrics::new();
    exercise(&metrics);
    let text = metrics.encode();
    for want in [
        r#"speculum_http_requests_total{handler="mirror",kind="blob",method="GET",status="200"} 1"#,
        r#"speculum_mirror_requests_total{kind="blob",outcome="miss"} 1"#,
        r#"speculum_served_bytes_total{handler="peer",source="peer_inflight"} 1"#,
        r#"speculum_policy_reloads_total{result="ok"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want} in:\n{text}"
        );
    }
}

#[test]
fn readme_names_every_family() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README.md has a ## Metrics section");
    let mut missing = Vec::new();
    for (name, kind, _) in FAMILIES {
        let exposed = if *kind == "counter" {
            format!("speculum_{name}_total")
        } else {
            format!("speculum_{name}")
        };
        // The name followed by something that cannot continue it (`{`, a backtick, a space).
        let named = section.match_indices(&exposed).any(|(i, _)| {
            section[i + exposed.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
        });
        if !named {
            missing.push(exposed);
        }
    }
    assert!(
        missing.is_empty(),
        "README.md ## Metrics misses {missing:?}"
    );
}
