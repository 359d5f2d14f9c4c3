//! `speculum`: flags → config → telemetry → the chosen command.
//!
//! - `speculum registry`: run the daemon (see `speculum::app`).
//! - `speculum configure` / `speculum cleanup`: write or restore containerd's hosts.toml.
//! - `speculum config`: print the effective configuration after every layer.
//! - `speculum policy test DIR` / `speculum policy eval DIR --input FILE`: run a bundle's Rego
//!   tests, or print its decision for one input (regorus, as the daemon evaluates it).
//! - `speculum audit FILE…`: filter and summarise audit logs.
//! - `speculum psk generate`: print a new private-network key file (`routing.psk_file`).
//! - `speculum doctor`: check this node end to end, each finding with its fix (`speculum::doctor`).
//!
//! The global allocator is jemalloc (feature `jemalloc`, on by default) with background
//! purging threads: after a burst (1,000 concurrent 1 MiB bodies) glibc malloc kept ~70 MiB of
//! freed memory in its per-thread arenas for good; jemalloc hands dirty pages back to the kernel
//! within its decay time (10 s) even when the daemon goes idle. Measurements: ROBUSTNESS.md §4.
//! Runtime tuning without a rebuild: `_RJEM_MALLOC_CONF=dirty_decay_ms:…` (jemalloc's options).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use speculum::config::{self, Config};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "speculum",
    version,
    about = "Peer-to-peer OCI registry mirror for containerd nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: mirror endpoint for containerd, peer endpoint, DHT, metrics.
    Registry(ConfigArgs),
    /// Point containerd at this node's mirror: write certs.d/<registry>/hosts.toml (with a
    /// byte-for-byte backup of what was there).
    Configure(ConfigArgs),
    /// Undo `configure`: restore every backed-up hosts.toml byte for byte.
    Cleanup(ConfigArgs),
    /// Print the effective configuration (defaults, file, environment, flags) as YAML.
    Config(ConfigArgs),
    /// Work with Rego policy bundles.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read audit files (rotated `FILE.N` siblings included): filter, list or summarise.
    Audit(AuditArgs),
    /// The DHT's private-network pre-shared key (routing.psk_file).
    #[command(subcommand)]
    Psk(PskCommand),
    /// Check this node: containerd, hosts.toml, the daemon, DHT, peers, policy, keys, clock
    /// (docs/doctor.md). Exit 1 when a check fails.
    Doctor {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        doctor: speculum::doctor::Flags,
    },
}

#[derive(Debug, Subcommand)]
enum PskCommand {
    /// Print a new random key in go-libp2p's swarm.key format to stdout (its fingerprint, which
    /// the daemon logs at start, goes to stderr). Redirect it into a file or a Secret.
    Generate,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run the bundle's `*_test.rego` tests with regorus (exit 1 when any fails).
    Test {
        /// The bundle directory.
        dir: PathBuf,
    },
    /// Print the decision of the bundle for one input document (JSON).
    Eval {
        /// The bundle directory.
        dir: PathBuf,
        /// The input document (see docs/policy.md); `-` for stdin.
        #[arg(long)]
        input: PathBuf,
    },
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Audit files (JSON lines).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Only records whose image (registry/repository), reference or digest contains this.
    #[arg(long)]
    image: Option<String>,
    /// Only records for pods of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only `allow` or `deny` decisions.
    #[arg(long)]
    decision: Option<String>,
    /// Only records at or after this time (RFC 3339, e.g. 2026-11-23T17:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only records at or before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Requests and bytes by image, decision and source instead of single records.
    #[arg(long)]
    summary: bool,
    /// `table` or `json`.
    #[arg(long, default_value = "table")]
    output: String,
}

/// Settings shared by every command. Each flag is a shortcut for one `--set section.key=`.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long, env = "SPECULUM_CONFIG")]
    config: Option<PathBuf>,
    /// Any setting as SECTION.KEY=VALUE (lists comma-separated); repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Kubernetes node name (node.name).
    #[arg(long)]
    node_name: Option<String>,
    /// containerd-facing mirror endpoint (registry.mirror_listen).
    #[arg(long)]
    mirror_listen: Option<String>,
    /// Endpoint other daemons fetch from (registry.peer_listen).
    #[arg(long)]
    peer_listen: Option<String>,
    /// Metrics and health endpoint (metrics.listen).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// containerd socket (containerd.socket).
    #[arg(long)]
    containerd_socket: Option<String>,
    /// containerd namespace (containerd.namespace).
    #[arg(long)]
    containerd_namespace: Option<String>,
    /// containerd content store directory for the fast path (containerd.content_dir).
    #[arg(long)]
    content_dir: Option<String>,
    /// libp2p listen multiaddr (routing.listen).
    #[arg(long)]
    p2p_listen: Option<String>,
    /// Directory for the peer identity (routing.data_dir).
    #[arg(long)]
    data_dir: Option<String>,
    /// Bootstrap peer multiaddr; repeatable (routing.bootstrap.peers).
    #[arg(long = "bootstrap-peer")]
    bootstrap_peers: Vec<String>,
    /// Bootstrap DNS name host:port (routing.bootstrap.dns).
    #[arg(long)]
    bootstrap_dns: Option<String>,
    /// Port of every node's peer endpoint (routing.registry_port).
    #[arg(long)]
    registry_port: Option<String>,
    /// Wait for the first peer of a lookup (mirror.resolve_timeout).
    #[arg(long)]
    resolve_timeout: Option<String>,
    /// Peers tried per request (mirror.attempts).
    #[arg(long)]
    mirror_attempts: Option<String>,
    /// Registry to mirror, as a URL; repeatable (hosts.mirrored_registries).
    #[arg(long = "mirrored-registry")]
    mirrored_registries: Vec<String>,
    /// containerd's hosts directory (hosts.certs_dir).
    #[arg(long)]
    certs_dir: Option<String>,
    /// URL containerd uses to reach this daemon (hosts.mirror_endpoint).
    #[arg(long)]
    mirror_endpoint: Option<String>,
    /// Keep existing hosts.toml mirrors after ours (hosts.prepend_existing).
    #[arg(long)]
    prepend_existing: bool,
    /// Log format json|text (log.format).
    #[arg(long)]
    log_format: Option<String>,
    /// Log filter, e.g. info (log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// Rego bundle directory (policy.bundle).
    #[arg(long)]
    policy_bundle: Option<String>,
    /// Let the cluster resolve tags, true|false (policy.resolve_tags).
    #[arg(long)]
    resolve_tags: Option<String>,
    /// Let the cluster resolve `latest`, true|false (policy.resolve_latest_tag).
    #[arg(long)]
    resolve_latest_tag: Option<String>,
    /// Append audit lines to this file (audit.file).
    #[arg(long)]
    audit_file: Option<String>,
}

impl ConfigArgs {
    /// The flags as `section.key=value` overrides, in a fixed order, `--set` last.
    fn overrides(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        let mut one = |key: &str, v: &Option<String>| {
            if let Some(v) = v {
                out.push((key.to_owned(), v.clone()));
            }
        };
        one("node.name", &self.node_name);
        one("registry.mirror_listen", &self.mirror_listen);
        one("registry.peer_listen", &self.peer_listen);
        one("metrics.listen", &self.metrics_listen);
        one("containerd.socket", &self.containerd_socket);
        one("containerd.namespace", &self.containerd_namespace);
        one("containerd.content_dir", &self.content_dir);
        one("routing.listen", &self.p2p_listen);
        one("routing.data_dir", &self.data_dir);
        one("routing.bootstrap.dns", &self.bootstrap_dns);
        one("routing.registry_port", &self.registry_port);
        one("mirror.resolve_timeout", &self.resolve_timeout);
        one("mirror.attempts", &self.mirror_attempts);
        one("hosts.certs_dir", &self.certs_dir);
        one("hosts.mirror_endpoint", &self.mirror_endpoint);
        one("log.format", &self.log_format);
        one("log.level", &self.log_level);
        one("policy.bundle", &self.policy_bundle);
        one("policy.resolve_tags", &self.resolve_tags);
        one("policy.resolve_latest_tag", &self.resolve_latest_tag);
        one("audit.file", &self.audit_file);
        let mut list = |key: &str, v: &[String]| {
            if !v.is_empty() {
                out.push((key.to_owned(), v.join(",")));
            }
        };
        list("routing.bootstrap.peers", &self.bootstrap_peers);
        list("hosts.mirrored_registries", &self.mirrored_registries);
        if self.prepend_existing {
            out.push(("hosts.prepend_existing".to_owned(), "true".to_owned()));
        }
        for s in &self.set {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set {s:?}: expected SECTION.KEY=VALUE"))?;
            out.push((k.to_owned(), v.to_owned()));
        }
        Ok(out)
    }

    fn load(&self) -> Result<Config, String> {
        let overrides = self.overrides()?;
        config::load(self.config.as_deref(), std::env::vars(), &overrides)
            .map_err(|e| e.to_string())
    }
}

fn init_logging(cfg: &config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match &cli.command {
        Command::Registry(a)
        | Command::Configure(a)
        | Command::Cleanup(a)
        | Command::Config(a)
        | Command::Doctor { config: a, .. } => a,
        Command::Policy(cmd) => return policy_command(cmd),
        Command::Audit(a) => return audit_command(a),
        Command::Psk(PskCommand::Generate) => return psk_generate(),
    };
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("speculum: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Config(_) => match yaml_serde::to_string(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("speculum: {e}");
                ExitCode::FAILURE
            }
        },
        // Handled above.
        Command::Policy(_) | Command::Audit(_) | Command::Psk(_) => ExitCode::SUCCESS,
        Command::Doctor { doctor, .. } => speculum::doctor::main(&config, &doctor),
        Command::Configure(_) => report(speculum::hosts::configure(&config.hosts)),
        Command::Cleanup(_) => report(speculum::hosts::cleanup(&config.hosts)),
        Command::Registry(_) => {
            init_logging(&config.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("speculum: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run_daemon(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "speculum failed");
                    eprintln!("speculum: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn psk_generate() -> ExitCode {
    use speculum::routing::psk;
    let key = psk::generate();
    print!("{}", psk::to_key_file(key));
    eprintln!("fingerprint: {}", key.fingerprint());
    ExitCode::SUCCESS
}

async fn run_daemon(config: Config) -> anyhow::Result<()> {
    let (trigger, stop) = speculum::shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received");
        trigger.fire();
    });
    speculum::app::run(config, stop).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the daemon can only be killed; say so and wait forever
            // rather than shutting down at once.
            eprintln!("speculum: cannot install signal handlers");
            std::future::pending::<()>().await
        }
    }
}

fn report(result: Result<speculum::hosts::Report, speculum::hosts::HostsError>) -> ExitCode {
    match result {
        Ok(r) => {
            print!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("speculum: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `speculum policy test|eval`.
fn policy_command(cmd: &PolicyCommand) -> ExitCode {
    use speculum::policy::rego::{Bundle, run_tests};
    use speculum::policy::{Policy, RegoPolicy};
    let timeout = std::time::Duration::from_secs(2);
    match cmd {
        PolicyCommand::Test { dir } => {
            let results = match Bundle::read(dir).and_then(|b| run_tests(&b, timeout)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("speculum: {e}");
                    return ExitCode::from(2);
                }
            };
            let failed = results.iter().filter(|r| !r.passed).count();
            for r in &results {
                if r.passed {
                    println!("PASS {}", r.name);
                } else {
                    println!("FAIL {}: {}", r.name, r.detail);
                }
            }
            println!("{}/{} passed", results.len() - failed, results.len());
            if results.is_empty() {
                eprintln!("speculum: {} has no tests", dir.display());
                return ExitCode::FAILURE;
            }
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        PolicyCommand::Eval { dir, input } => {
            let text = if input.as_os_str() == "-" {
                let mut s = String::new();
                if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                    eprintln!("speculum: reading stdin: {e}");
                    return ExitCode::from(2);
                }
                s
            } else {
                match std::fs::read_to_string(input) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("speculum: {}: {e}", input.display());
                        return ExitCode::from(2);
                    }
                }
            };
            let doc: speculum::policy::Input = match serde_json::from_str(&text) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("speculum: {}: not a decision input: {e}", input.display());
                    return ExitCode::from(2);
                }
            };
            let decision = RegoPolicy::load(dir, timeout).and_then(|p| p.decide(&doc));
            match decision.map(|d| serde_json::to_string_pretty(&d)) {
                Ok(Ok(json)) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Ok(Err(e)) => {
                    eprintln!("speculum: {e}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("speculum: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `speculum audit`.
fn audit_command(a: &AuditArgs) -> ExitCode {
    use speculum::audit::reader;
    let time = |s: &Option<String>, flag: &str| -> Result<Option<std::time::SystemTime>, String> {
        s.as_deref()
            .map(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')))
            .transpose()
            .map_err(|e| format!("--{flag}: {e}"))
    };
    let filter = match (time(&a.since, "since"), time(&a.until, "until")) {
        (Ok(since), Ok(until)) => reader::Filter {
            image: a.image.clone(),
            namespace: a.namespace.clone(),
            decision: a.decision.clone(),
            since,
            until,
        },
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("speculum: {e}");
            return ExitCode::from(2);
        }
    };
    if !matches!(a.output.as_str(), "table" | "json") {
        eprintln!("speculum: --output must be table or json");
        return ExitCode::from(2);
    }
    let paths: Vec<PathBuf> = a
        .files
        .iter()
        .flat_map(|f| reader::with_rotated(f))
        .collect();
    let (records, bad) = match reader::read(&paths, &filter) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("speculum: {e}");
            return ExitCode::from(2);
        }
    };
    if bad > 0 {
        eprintln!("speculum: skipped {bad} lines that are not audit records");
    }
    let json = a.output == "json";
    let out = if a.summary {
        let rows = reader::summarise(&records);
        if json {
            rows.iter()
                .filter_map(|r| serde_json::to_string(r).ok())
                .map(|l| l + "\n")
                .collect()
        } else {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.image.clone(),
                        r.decision.clone(),
                        r.served_from.clone(),
                        r.requests.to_string(),
                        r.bytes.to_string(),
                    ]
                })
                .collect();
            reader::table(&["IMAGE", "DECISION", "FROM", "REQUESTS", "BYTES"], &cells)
        }
    } else if json {
        records
            .iter()
            .filter_map(|r| serde_json::to_string(r).ok())
            .map(|l| l + "\n")
            .collect()
    } else {
        let (header, rows) = reader::record_rows(&records);
        reader::table(&header, &rows)
    };
    print!("{out}");
    ExitCode::SUCCESS
}
