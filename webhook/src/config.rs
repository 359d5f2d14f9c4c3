//! Configuration: serde defaults → YAML file, validated at once before any port is bound;
//! [`Config::validate`] reports every problem, not just the first.
//!
//! Each component receives only its own section ([`ResolverConfig`], [`PolicyConfig`],
//! [`WebhookConfig`], [`TlsConfig`], [`GrantsConfig`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::certs::WebhookConfig;
use crate::grants::GrantsConfig;
use crate::policy::PolicyConfig;
use crate::resolve::ResolverConfig;

/// Where serving certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TlsMode {
    /// Generate a CA and certificate into a Secret and patch `caBundle` ourselves.
    #[default]
    SelfManaged,
    /// Read `certFile`/`keyFile` (cert-manager), reloading on change.
    Files,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often certificates are re-checked (rotation, file changes).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            mode: TlsMode::SelfManaged,
            cert_file: "/tls/tls.crt".into(),
            key_file: "/tls/tls.key".into(),
            check_interval: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Largest AdmissionReview accepted, in bytes (the API server's own limit is 3 MiB of
    /// object, the review wraps it once or twice on UPDATE).
    pub body_limit: usize,
    /// Bound on one admission; must stay below `webhook.timeoutSeconds`.
    #[serde(with = "humantime_serde")]
    pub admission_deadline: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub tls: TlsConfig,
    pub webhook: WebhookConfig,
    pub resolver: ResolverConfig,
    pub policy: PolicyConfig,
    pub grants: GrantsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([0, 0, 0, 0], 8443).into(),
            metrics_listen: ([0, 0, 0, 0], 9090).into(),
            body_limit: 8 * 1024 * 1024,
            admission_deadline: Duration::from_secs(8),
            shutdown_grace: Duration::from_secs(10),
            tls: TlsConfig::default(),
            webhook: WebhookConfig::default(),
            resolver: ResolverConfig::default(),
            policy: PolicyConfig::default(),
            grants: GrantsConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Defaults, overlaid with the YAML file if given; validated and with CA files loaded.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Config::parse(&text).map_err(|message| ConfigError::Parse {
                    path: p.display().to_string(),
                    message,
                })?
            }
        };
        let errors = cfg.validate();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    pub fn parse(yaml: &str) -> Result<Config, String> {
        if yaml.trim().is_empty() {
            return Ok(Config::default());
        }
        yaml_serde::from_str(yaml).map_err(|e| e.to_string())
    }

    /// Checks everything and loads referenced files; returns every problem found.
    pub fn validate(&mut self) -> Vec<String> {
        let mut e = self.webhook.validate();
        e.extend(self.resolver.load());
        e.extend(self.grants.validate());
        if self.body_limit < 4096 {
            e.push("bodyLimit must be at least 4096 bytes".into());
        }
        let hook_timeout = Duration::from_secs(self.webhook.timeout_seconds.into());
        if self.admission_deadline.is_zero() || self.admission_deadline >= hook_timeout {
            e.push(format!(
                "admissionDeadline ({:?}) must be above zero and below webhook.timeoutSeconds ({hook_timeout:?})",
                self.admission_deadline
            ));
        }
        if self.resolver.timeout > self.admission_deadline {
            e.push("resolver.timeout must not exceed admissionDeadline".into());
        }
        if self.listen.port() == self.metrics_listen.port() && self.listen.port() != 0 {
            e.push("listen and metricsListen must use different ports".into());
        }
        if let Some(p) = &self.policy.rego_file
            && let Err(err) =
                crate::policy::RegoPolicy::from_file(self.policy.skip_prefixes.clone(), p)
        {
            e.push(err.to_string());
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate_table() {
        let cases: [(&str, &str, Result<usize, ()>); 6] = [
            ("empty is defaults", "", Ok(0)),
            (
                "full",
                "listen: 127.0.0.1:8443\nresolver:\n  timeout: 2s\n  cacheTtl: 5m\n  registries:\n    127.0.0.1:5000: {insecure: true}\npolicy:\n  skipPrefixes: [docker.io/library/]\nwebhook:\n  failurePolicy: Fail\n  timeoutSeconds: 5\nadmissionDeadline: 4s\n",
                Ok(0),
            ),
            ("unknown field", "lisen: 1", Err(())),
            ("bad duration", "resolver: {timeout: soon}", Err(())),
            (
                "three problems",
                "webhook: {timeoutSeconds: 40}\nbodyLimit: 10\nresolver:\n  registries:\n    r.io: {caFile: /nonexistent/ca.pem}\n",
                Ok(3),
            ),
            (
                "deadline above timeout",
                "webhook: {timeoutSeconds: 5}\nadmissionDeadline: 6s\n",
                Ok(1),
            ),
        ];
        for (name, yaml, want) in cases {
            let got = Config::parse(yaml)
                .map(|mut c| c.validate().len())
                .map_err(|_| ());
            assert_eq!(got, want, "{name}");
        }
    }
}
