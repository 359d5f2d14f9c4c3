//! `speculum doctor`: "is this node working?" in one command, on the node or with
//! `kubectl exec` in the daemon pod. Its one job is asking and judging: each check looks at one
//! thing and returns a [`Finding`] — ok, warn, fail or skip — that says what was found, what it
//! means for pulls, and the exact fix. Nothing is changed.
//!
//! Judgements that exist elsewhere are reused, not redone: containerd's answers about its own
//! configuration and what stops a node from serving come from [`crate::store::introspect`];
//! what `hosts.toml` should say from [`crate::hosts::inspect`] (the same plan `configure`
//! writes); bundle tests from [`crate::policy::rego::run_tests`].
//!
//! Layout: [`checks`] (one function per check; files, sockets and HTTP),
//! [`containerd_config`] (pure: the CRI settings of a containerd config file, versions 1–3),
//! [`render`] (pure: text and JSON). Every check and its fix is listed for operators in
//! `docs/doctor.md`; the `id`s there are stable.

pub mod checks;
pub mod containerd_config;
pub mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;

/// How a check came out. Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// The check does not apply here (the summary says why).
    Skip,
    /// Works, but worse than it could (slower, less safe, or not verifiable).
    Warn,
    /// Pulls bypass the mirror, content cannot be served, or the daemon refuses something.
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skip",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable name of the check (`docs/doctor.md`), e.g. `containerd.config_path`.
    pub id: &'static str,
    /// What the check looked at when it runs once per thing (the registry of a `hosts.toml`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Status,
    /// What was found and what it means.
    pub summary: String,
    /// The exact change that makes it ok; empty when there is nothing to do.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Finding {
    pub fn ok(id: &'static str, summary: impl Into<String>) -> Finding {
        Finding::new(id, Status::Ok, summary.into(), String::new())
    }

    pub fn skip(id: &'static str, reason: impl Into<String>) -> Finding {
        Finding::new(id, Status::Skip, reason.into(), String::new())
    }

    pub fn warn(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding::new(id, Status::Warn, summary.into(), fix.into())
    }

    pub fn fail(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding::new(id, Status::Fail, summary.into(), fix.into())
    }

    fn new(id: &'static str, status: Status, summary: String, fix: String) -> Finding {
        Finding {
            id,
            subject: None,
            status,
            summary,
            fix,
        }
    }

    pub fn about(mut self, subject: impl Into<String>) -> Finding {
        self.subject = Some(subject.into());
        self
    }
}

/// Every finding of one run, in check order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `node.name`.
    pub node: String,
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst status of any finding (`Ok` when there are none).
    pub fn worst(&self) -> Status {
        self.findings
            .iter()
            .map(|f| f.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    pub fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }

    /// 1 when anything failed, else 0. Warnings do not fail the command.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.worst() == Status::Fail)
    }
}

/// The doctor's own flags (the configuration comes from the same flags, file and environment as
/// `speculum registry`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// `text` or `json`.
    #[arg(long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// containerd's config file, read when containerd does not say itself where it reads
    /// hosts.toml (2.0-2.3).
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
    /// Another node's peer endpoint (HOST:PORT) for the peer authentication check. Default: the
    /// first bootstrap peer that is not this node, at routing.registry_port.
    #[arg(long)]
    pub peer: Option<String>,
    /// Bound for each question asked over the network or a socket.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            output: "text".to_owned(),
            containerd_config: PathBuf::from("/etc/containerd/config.toml"),
            peer: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Runs every check, in the order of `docs/doctor.md`.
pub async fn run(config: &Config, flags: &Flags) -> Report {
    let mut findings = checks::containerd(config, flags).await;
    findings.extend(checks::hosts_files(&config.hosts));
    findings.extend(checks::daemon(config, flags).await);
    findings.push(checks::private_network(&config.routing));
    findings.push(checks::peer_auth(config, flags).await);
    findings.push(checks::policy_bundle(&config.policy));
    findings.push(checks::grant_keys(&config.tenancy.grants));
    findings.push(checks::clock_skew(flags).await);
    Report {
        node: config.node.name.clone(),
        findings,
    }
}

/// `speculum doctor`: runs the checks, prints the report, exits 1 when anything failed.
pub fn main(config: &Config, flags: &Flags) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("speculum: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(run(config, flags));
    let out = if flags.output == "json" {
        render::json(&report)
    } else {
        render::text(&report)
    };
    print!("{out}");
    ExitCode::from(report.exit_code())
}
