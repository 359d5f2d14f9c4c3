//! `speculum registry`: logging, the runtime, and SIGTERM/SIGINT turned into the shutdown
//! trigger that `speculum::app::run` drains on.

use std::process::ExitCode;

use speculum::config::Config;

use super::telemetry::init_logging;

/// Runs the daemon until a signal, then waits for its orderly shutdown.
pub fn run(config: Config) -> ExitCode {
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
