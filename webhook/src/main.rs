//! `speculum-webhook`: flags → config → telemetry → serve (or the offline `pin` command,
//! `config` to validate a config file, `configuration` to print the webhook configuration).
//!
//! The composition root: it builds the seams (resolver, policy, credentials, audit, metrics,
//! certificates), binds the ports only after the config validated, and `select!`s over the
//! server tasks with labelled errors. SIGTERM clears readiness, stops accepting and lets
//! in-flight reviews finish within the grace period.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use speculum_webhook::admit::Admitter;
use speculum_webhook::audit::{JsonLinesAudit, NoAudit};
use speculum_webhook::certs::{self, FileCerts, KubeCertManager, TlsState};
use speculum_webhook::config::{Config, TlsMode};
use speculum_webhook::credentials::{DOCKER_CONFIG_JSON, Keychain, KubeCredentials, SecretData};
use speculum_webhook::metrics::Metrics;
use speculum_webhook::resolve::Resolver;
use speculum_webhook::server::{self, Readiness};
use speculum_webhook::{pin, policy};

#[derive(Debug, Parser)]
#[command(name = "speculum-webhook", version, about)]
struct Flags {
    /// YAML configuration file.
    #[arg(long, short, env = "SPECULUM_WEBHOOK_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the admission webhook (the default).
    Serve,
    /// Pin the images of Kubernetes YAML (a file, or `-` for stdin) and print the result.
    Pin {
        input: String,
        /// Docker config with registry credentials (default: $DOCKER_CONFIG/config.json or
        /// ~/.docker/config.json when present).
        #[arg(long)]
        docker_config: Option<PathBuf>,
        /// Fail when an image cannot be pinned (policy denials always fail).
        #[arg(long)]
        strict: bool,
    },
    /// Write a new pull-grant key pair: DIR/grant.key (0600) and DIR/grant.pub.pem.
    GrantKeygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Load and validate the configuration (every problem at once, exit status 1), then print
    /// the effective settings. For CI and the chart's tests: a renamed key fails here.
    Config,
    /// Print the MutatingWebhookConfiguration (JSON) for a CA bundle file.
    Configuration {
        #[arg(long)]
        ca_file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // rustls finds both ring and aws-lc-rs in the build; pick one before anything uses TLS.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPECULUM_WEBHOOK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = Config::load(flags.config.as_deref())?;
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    match flags.command.unwrap_or(Command::Serve) {
        Command::Serve => rt.block_on(serve(cfg)),
        Command::Pin {
            input,
            docker_config,
            strict,
        } => {
            let code = rt.block_on(pin_command(cfg, &input, docker_config, strict))?;
            std::process::exit(code)
        }
        Command::GrantKeygen { out } => {
            let (key, public, kid) = speculum_webhook::grants::keygen(&out)?;
            println!(
                "kid {kid}\nprivate key {}\npublic key {}",
                key.display(),
                public.display()
            );
            Ok(())
        }
        // `Config::load` above already failed with every problem; here it is known good.
        // Debug, not YAML: the sections need not be serialisable, and none holds a secret
        // (key material is only ever referenced by path).
        Command::Config => {
            println!("{cfg:#?}");
            Ok(())
        }
        Command::Configuration { ca_file } => {
            let ca = std::fs::read_to_string(&ca_file)
                .with_context(|| format!("reading {}", ca_file.display()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&certs::webhook_configuration(&cfg.webhook, &ca))?
            );
            Ok(())
        }
    }
}

async fn pin_command(
    cfg: Config,
    input: &str,
    docker_config: Option<PathBuf>,
    strict: bool,
) -> anyhow::Result<i32> {
    let text = if input == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(input).with_context(|| format!("reading {input}"))?
    };
    let mut keychain = Keychain::default();
    let path = docker_config.or_else(|| {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
        Some(dir.join("config.json")).filter(|p| p.exists())
    });
    if let Some(p) = path {
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        keychain.add_secret(
            &p.display().to_string(),
            &SecretData {
                type_: DOCKER_CONFIG_JSON.into(),
                data: [(".dockerconfigjson".to_owned(), bytes)].into(),
            },
        );
        for problem in &keychain.problems {
            eprintln!("warning: {problem}");
        }
    }
    let metrics = Arc::new(Metrics::new());
    let admitter = Admitter {
        resolver: Arc::new(Resolver::new(cfg.resolver.clone(), metrics.clone())),
        policy: Arc::from(policy::from_config(&cfg.policy)?),
        credentials: None,
        offline_keychain: keychain,
        audit: Arc::new(NoAudit),
        metrics,
        grants: None,
        failure_policy: cfg.webhook.failure_policy,
        deadline: Duration::from_secs(3600),
    };
    let report = pin::pin_text(&admitter, &text).await;
    print!("{}", report.output);
    for p in &report.problems {
        eprintln!("warning: {p}");
    }
    for u in &report.unresolved {
        eprintln!("{}: {u}", if strict { "error" } else { "warning" });
    }
    for d in &report.denied {
        eprintln!("denied: {d}");
    }
    eprintln!("pinned {} image reference(s)", report.pinned);
    Ok(
        if !report.denied.is_empty() || (strict && !report.unresolved.is_empty()) {
            1
        } else {
            0
        },
    )
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let policy: Arc<dyn policy::Policy> = Arc::from(policy::from_config(&cfg.policy)?);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shutdown = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let tls = match cfg.tls.mode {
        TlsMode::Files => {
            let files = FileCerts {
                cert: cfg.tls.cert_file.clone(),
                key: cfg.tls.key_file.clone(),
            };
            let state = TlsState::new(files.load().context("loading certificate files")?);
            tokio::spawn(files.run(state.clone(), cfg.tls.check_interval, shutdown()));
            state
        }
        TlsMode::SelfManaged => {
            let mgr = KubeCertManager {
                client: client.clone(),
                cfg: cfg.webhook.clone(),
            };
            let state = TlsState::new(
                mgr.ensure()
                    .await
                    .context("setting up the serving certificate")?,
            );
            tokio::spawn(mgr.run(state.clone(), cfg.tls.check_interval, shutdown()));
            state
        }
    };

    let granter = speculum_webhook::grants::Granter::from_config(&cfg.grants, metrics.clone())
        .context("loading the grant signing key")?
        .map(Arc::new);
    if let Some(g) = &granter {
        tracing::info!(kid = g.signer().kid(), ttl = ?cfg.grants.ttl, "pull grants on");
        // Publishes the public key at once (the interval's first tick), then re-reads the key file.
        tokio::spawn(speculum_webhook::grants::run(
            g.clone(),
            Some(client.clone()),
            cfg.grants.publish_config_map.clone(),
            cfg.grants.check_interval,
            shutdown(),
        ));
    }
    let admitter = Arc::new(Admitter {
        resolver: Arc::new(Resolver::new(cfg.resolver.clone(), metrics.clone())),
        policy,
        credentials: Some(Arc::new(KubeCredentials::new(client))),
        offline_keychain: Keychain::default(),
        audit: Arc::new(JsonLinesAudit::spawn(std::io::stdout(), 4096)),
        metrics: metrics.clone(),
        grants: granter.clone(),
        failure_policy: cfg.webhook.failure_policy,
        deadline: cfg.admission_deadline,
    });
    let ready = Readiness::default();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("binding {}", cfg.metrics_listen))?;
    let app = server::router(admitter, ready.clone(), cfg.body_limit);
    ready.set(true);
    tracing::info!(listen = %cfg.listen, metrics = %cfg.metrics_listen, "serving");

    let mut webhook = tokio::spawn(server::serve_tls(
        listener,
        tls,
        app,
        shutdown(),
        cfg.shutdown_grace,
    ));
    let mut metrics_task =
        tokio::spawn(server::serve_metrics(metrics_listener, metrics, shutdown()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let result = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        r = &mut webhook => Err(anyhow::anyhow!("webhook server stopped: {r:?}")),
        r = &mut metrics_task => Err(anyhow::anyhow!("metrics server stopped: {r:?}")),
    };
    ready.set(false);
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(cfg.shutdown_grace + Duration::from_secs(1), webhook).await;
    result
}
