//! The daemon's configuration: defaults → YAML file → `SPECULUM_<SECTION>_<KEY>` environment
//! → command-line flags, each layer overriding the one before. Everything is validated before
//! any port is bound, and every problem is reported at once.
//!
//! Each component owns its section type and its `validate()`; this module only layers and
//! collects. A section is handed to its component alone, never the whole config.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::advertise::SyncConfig;
use crate::audit::AuditConfig;
use crate::cache::CacheConfig;
use crate::hosts::HostsConfig;
use crate::policy::PolicyConfig;
use crate::registry::{MirrorConfig, RegistryConfig};
use crate::routing::kademlia::KademliaConfig;
use crate::status::StatusConfig;
use crate::store::containerd::ContainerdConfig;
use crate::tenancy::TenancyConfig;

/// The whole configuration. YAML keys are the field names below.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub registry: RegistryConfig,
    pub mirror: MirrorConfig,
    pub metrics: MetricsConfig,
    pub containerd: ContainerdConfig,
    pub routing: KademliaConfig,
    pub sync: SyncConfig,
    pub hosts: HostsConfig,
    /// The Rego bundle and the `resolve_tags` / `resolve_latest_tag` switches.
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    /// Multi-tenant protection: pod index, grants, peer authentication.
    pub tenancy: TenancyConfig,
    /// The own blob cache, upstream fetches and coalescing (`docs/cache.md`).
    pub cache: CacheConfig,
    /// The node status page on the metrics listener (`docs/status-page.md`; off by default).
    pub status: StatusConfig,
    pub log: LogConfig,
}

/// This node's identity in logs and the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The Kubernetes node name; defaults to `$NODE_NAME`, then the host name.
    pub name: String,
}

/// The metrics and health endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serves `/metrics`, `/readyz` and `/livez`.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: ([0, 0, 0, 0], 9402).into(),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `info,speculum::routing=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "json".to_owned(),
            level: "info".to_owned(),
        }
    }
}

/// Every problem found while loading, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// Loads the configuration from its layers. `env` is the process environment (passed in so
/// tests need not touch it); `overrides` are `section.key=value` settings from flags, applied
/// last in order.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[(String, String)],
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let defaults = serde_json::to_value(Config::default())
        .map_err(|e| ConfigErrors(vec![format!("defaults do not serialize: {e}")]))?;
    let mut tree = defaults.clone();

    if let Some(path) = file {
        match std::fs::read_to_string(path) {
            Err(e) => errors.push(format!("{}: {e}", path.display())),
            Ok(text) => match yaml_serde::from_str::<Value>(&text) {
                Ok(Value::Null) => {}
                Ok(v @ Value::Object(_)) => merge(&mut tree, v),
                Ok(_) => errors.push(format!("{}: top level must be a mapping", path.display())),
                Err(e) => errors.push(format!("{}: {e}", path.display())),
            },
        }
    }

    for (name, value) in env {
        let Some(rest) = name.strip_prefix("SPECULUM_") else {
            continue;
        };
        let tokens: Vec<String> = rest.split('_').map(str::to_ascii_lowercase).collect();
        // Only variables naming a known section are settings; others (SPECULUM_BIN used by
        // scripts, say) are not ours to refuse.
        let Some(Value::Object(sections)) = Some(&defaults) else {
            continue;
        };
        if !sections.contains_key(&tokens[0]) {
            continue;
        }
        match find_path(&defaults, &tokens) {
            Some(path) => set(&mut tree, &defaults, &path, &value, &mut errors, &name),
            None => errors.push(format!("{name}: no such setting")),
        }
    }

    for (key, value) in overrides {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        if lookup(&defaults, &path).is_none() {
            errors.push(format!("{key}: no such setting"));
            continue;
        }
        set(&mut tree, &defaults, &path, value, &mut errors, key);
    }

    // Deserialise section by section so that one bad section does not hide the others.
    let mut config = Config::default();
    if let Value::Object(sections) = tree {
        for (name, value) in sections {
            if let Err(e) = config.set_section(&name, value) {
                errors.push(format!("{name}: {e}"));
            }
        }
    }
    if config.node.name.is_empty() {
        config.node.name = std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|n| n.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
    }
    // The global switch decides what `configure` writes: with tags off, containerd must not
    // even ask us (`capabilities = ["pull"]`).
    config.hosts.resolve_tags &= config.policy.resolve_tags;
    errors.extend(config.validate());
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

impl Config {
    fn set_section(&mut self, name: &str, value: Value) -> Result<(), serde_json::Error> {
        use serde_json::from_value as v;
        match name {
            "node" => self.node = v(value)?,
            "registry" => self.registry = v(value)?,
            "mirror" => self.mirror = v(value)?,
            "metrics" => self.metrics = v(value)?,
            "containerd" => self.containerd = v(value)?,
            "routing" => self.routing = v(value)?,
            "sync" => self.sync = v(value)?,
            "hosts" => self.hosts = v(value)?,
            "policy" => self.policy = v(value)?,
            "audit" => self.audit = v(value)?,
            "tenancy" => self.tenancy = v(value)?,
            "cache" => self.cache = v(value)?,
            "status" => self.status = v(value)?,
            "log" => self.log = v(value)?,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown section {other:?}"
                )));
            }
        }
        Ok(())
    }

    /// Every problem across sections, including the ones that span sections.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        errors.extend(self.registry.validate());
        errors.extend(self.mirror.validate());
        errors.extend(self.containerd.validate());
        errors.extend(self.routing.validate());
        errors.extend(self.sync.validate());
        errors.extend(self.hosts.validate());
        errors.extend(self.policy.validate());
        errors.extend(self.audit.validate());
        errors.extend(self.tenancy.validate());
        errors.extend(self.status.validate());
        if self.cache.enabled {
            errors.extend(self.cache.validate());
        }
        if !matches!(self.log.format.as_str(), "json" | "text") {
            errors.push(format!(
                "log.format must be json or text, got {:?}",
                self.log.format
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            errors.push(format!(
                "log.level {:?} is not a valid filter",
                self.log.level
            ));
        }
        if self.registry.peer_listen.port() != self.routing.registry_port {
            errors.push(format!(
                "registry.peer_listen port {} must equal routing.registry_port {}: peers connect to that port",
                self.registry.peer_listen.port(),
                self.routing.registry_port
            ));
        }
        errors
    }
}

/// Deep-merges `overlay` into `base`: mappings merge, everything else replaces.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn lookup<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(tree, |node, key| node.get(key))
}

/// Maps `[routing, bootstrap, peers]`-style tokens (from `SPECULUM_ROUTING_BOOTSTRAP_PEERS`)
/// to a key path, joining tokens with `_` where a key contains underscores.
fn find_path(tree: &Value, tokens: &[String]) -> Option<Vec<String>> {
    if tokens.is_empty() {
        return Some(Vec::new());
    }
    let Value::Object(map) = tree else {
        return None;
    };
    for take in (1..=tokens.len()).rev() {
        let key = tokens[..take].join("_");
        if let Some(child) = map.get(&key)
            && let Some(mut rest) = find_path(child, &tokens[take..])
        {
            rest.insert(0, key);
            return Some(rest);
        }
    }
    None
}

/// Sets a string value at `path`, typed after the default found there: lists split on
/// commas, booleans and numbers parsed, everything else kept as a string.
fn set(
    tree: &mut Value,
    defaults: &Value,
    path: &[String],
    raw: &str,
    errors: &mut Vec<String>,
    origin: &str,
) {
    let value = match lookup(defaults, path) {
        Some(Value::Array(_)) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        Some(Value::Bool(_)) => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => {
                errors.push(format!("{origin}: expected true or false, got {raw:?}"));
                return;
            }
        },
        Some(Value::Number(_)) => match raw.parse::<serde_json::Number>() {
            Ok(n) => Value::Number(n),
            Err(_) => {
                errors.push(format!("{origin}: expected a number, got {raw:?}"));
                return;
            }
        },
        Some(Value::Object(_)) => {
            errors.push(format!("{origin}: names a section, not a setting"));
            return;
        }
        _ => Value::String(raw.to_owned()),
    };
    let mut node = tree;
    for key in &path[..path.len() - 1] {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let Value::Object(map) = node else { return };
        node = map.entry(key.clone()).or_insert(Value::Object(Map::new()));
    }
    if let (Value::Object(map), Some(last)) = (node, path.last()) {
        map.insert(last.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "registry:\n  mirror_listen: 127.0.0.1:6000\n  peer_listen: 0.0.0.0:6001\nrouting:\n  registry_port: 6001\nmirror:\n  attempts: 5\n",
        )
        .expect("write");
        let cfg = load(
            Some(&file),
            env(&[
                ("SPECULUM_MIRROR_ATTEMPTS", "4"),
                (
                    "SPECULUM_HOSTS_MIRRORED_REGISTRIES",
                    "https://a.io, http://127.0.0.1:5000",
                ),
                ("SPECULUM_BIN", "target/debug/speculum"),
                ("PATH", "/bin"),
            ]),
            &[("mirror.resolve_timeout".into(), "50ms".into())],
        )
        .expect("valid");
        assert_eq!(
            cfg.registry.mirror_listen,
            "127.0.0.1:6000".parse().expect("addr")
        );
        assert_eq!(cfg.mirror.attempts, 4, "env beats file");
        assert_eq!(
            cfg.mirror.resolve_timeout,
            Duration::from_millis(50),
            "flag applied"
        );
        assert_eq!(
            cfg.hosts.mirrored_registries,
            vec![
                "https://a.io".to_owned(),
                "http://127.0.0.1:5000".to_owned()
            ]
        );
        assert_eq!(
            cfg.registry.drain_grace,
            Duration::from_secs(20),
            "default kept"
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "registry:\n  mirror_listen: nope\nlog:\n  format: xml\nbogus: 1\n",
        )
        .expect("write");
        let err = load(
            Some(&file),
            env(&[
                ("SPECULUM_MIRROR_ATTEMPTS", "many"),
                ("SPECULUM_MIRROR_NOPE", "1"),
            ]),
            &[("mirror.unknown".into(), "1".into())],
        )
        .expect_err("invalid");
        let text = err.to_string();
        for want in [
            "SPECULUM_MIRROR_ATTEMPTS",
            "SPECULUM_MIRROR_NOPE",
            "mirror.unknown",
            "registry:",
            "bogus",
            "log.format",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn tag_resolution_table() {
        use crate::policy::TagResolution::{ClusterFirst, UpstreamFirst};
        // (name, environment, overrides, want: Ok((mode, timeout ms, plain http)) or Err(text))
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, &'a str)>,
            Vec<(&'a str, &'a str)>,
            Result<(crate::policy::TagResolution, u64, Vec<&'a str>), &'a str>,
        );
        let cases: Vec<Case> = vec![
            ("default", vec![], vec![], Ok((UpstreamFirst, 1500, vec![]))),
            (
                "env cluster-first",
                vec![("SPECULUM_MIRROR_TAG_RESOLUTION", "cluster-first")],
                vec![],
                Ok((ClusterFirst, 1500, vec![])),
            ),
            (
                "flag timeout, http registry",
                vec![(
                    "SPECULUM_HOSTS_MIRRORED_REGISTRIES",
                    "http://10.0.0.5:5000,https://ghcr.io",
                )],
                vec![("mirror.tag_upstream_timeout", "2s")],
                Ok((UpstreamFirst, 2000, vec!["10.0.0.5:5000"])),
            ),
            (
                "not a mode",
                vec![("SPECULUM_MIRROR_TAG_RESOLUTION", "sometimes")],
                vec![],
                Err("mirror"),
            ),
            (
                "timeout too long",
                vec![],
                vec![("mirror.tag_upstream_timeout", "1m")],
                Err("mirror.tag_upstream_timeout"),
            ),
        ];
        for (name, vars, overrides, want) in cases {
            let overrides: Vec<(String, String)> = overrides
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            match (load(None, env(&vars), &overrides), want) {
                (Ok(cfg), Ok((mode, ms, plain))) => {
                    assert_eq!(cfg.mirror.tag_resolution, mode, "{name}");
                    assert_eq!(
                        cfg.mirror.tag_upstream_timeout,
                        Duration::from_millis(ms),
                        "{name}"
                    );
                    assert_eq!(cfg.hosts.plain_http_registries(), plain, "{name}");
                }
                (Err(e), Err(text)) => {
                    assert!(e.to_string().contains(text), "{name}: {e}");
                }
                (got, want) => panic!("{name}: got {:?}, want {want:?}", got.map(|_| ())),
            }
        }
    }

    #[test]
    fn resolve_tags_switch_reaches_hosts() {
        let cases = [
            ("default", vec![], true, true),
            (
                "env off",
                vec![("SPECULUM_POLICY_RESOLVE_TAGS", "false")],
                false,
                false,
            ),
            (
                "latest off keeps tags",
                vec![("SPECULUM_POLICY_RESOLVE_LATEST_TAG", "false")],
                true,
                true,
            ),
        ];
        for (name, vars, want_policy, want_hosts) in cases {
            let cfg = load(None, env(&vars), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.policy.resolve_tags, want_policy, "{name}");
            assert_eq!(
                cfg.hosts.resolve_tags, want_hosts,
                "{name}: hosts follows the switch"
            );
        }
        let cfg = load(
            None,
            env(&[]),
            &[("policy.resolve_latest_tag".into(), "false".into())],
        )
        .expect("valid");
        assert!(!cfg.policy.resolve_latest_tag);
    }

    #[test]
    fn sendfile_switch_and_connection_timeouts() {
        // (name, environment, want: Ok((sendfile, stall s, idle s)) or Err(text in the error))
        type Case<'a> = (
            &'a str,
            Vec<(&'a str, &'a str)>,
            Result<(bool, u64, u64), &'a str>,
        );
        let cases: Vec<Case> = vec![
            ("default", vec![], Ok((true, 60, 120))),
            (
                "env off",
                vec![("SPECULUM_REGISTRY_SENDFILE", "false")],
                Ok((false, 60, 120)),
            ),
            (
                "stall from env",
                vec![("SPECULUM_REGISTRY_WRITE_STALL_TIMEOUT", "5s")],
                Ok((true, 5, 120)),
            ),
            (
                "idle from env",
                vec![("SPECULUM_REGISTRY_IDLE_TIMEOUT", "5m")],
                Ok((true, 60, 300)),
            ),
            (
                "idle too long",
                vec![("SPECULUM_REGISTRY_IDLE_TIMEOUT", "2h")],
                Err("registry.idle_timeout"),
            ),
            (
                "stall too short",
                vec![("SPECULUM_REGISTRY_WRITE_STALL_TIMEOUT", "10ms")],
                Err("registry.write_stall_timeout"),
            ),
            (
                "not a bool",
                vec![("SPECULUM_REGISTRY_SENDFILE", "maybe")],
                Err("SPECULUM_REGISTRY_SENDFILE"),
            ),
        ];
        for (name, vars, want) in cases {
            match (load(None, env(&vars), &[]), want) {
                (Ok(cfg), Ok((sendfile, stall, idle))) => {
                    let o = cfg.registry.serve_options();
                    assert_eq!(o.sendfile, sendfile, "{name}");
                    assert_eq!(o.write_stall, Duration::from_secs(stall), "{name}");
                    assert_eq!(o.idle, Duration::from_secs(idle), "{name}");
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{name}: {e}");
                }
                (got, _) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn nested_env_keys_resolve_through_underscores() {
        let defaults = serde_json::to_value(Config::default()).expect("defaults");
        let tokens: Vec<String> = ["registry", "mirror", "listen"].map(String::from).to_vec();
        assert_eq!(
            find_path(&defaults, &tokens),
            Some(vec!["registry".to_owned(), "mirror_listen".to_owned()])
        );
    }
}
