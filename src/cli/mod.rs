//! The command line: [`Cli`] and its subcommands, and [`run`], which dispatches to them.
//!
//! - `speculum registry`: run the daemon (`daemon`, then `speculum::app`).
//! - `speculum configure` / `speculum cleanup`: write or restore containerd's hosts.toml, or
//!   with `--runtime cri-o` the registries.conf.d drop-in (`hosts`).
//! - `speculum config`: print the effective configuration after every layer.
//! - `speculum policy test DIR` / `speculum policy eval DIR --input FILE`: run a bundle's Rego
//!   tests, or print its decision for one input (regorus, as the daemon evaluates it)
//!   (`policy`).
//! - `speculum audit FILE…`: filter and summarise audit logs (`audit`).
//! - `speculum psk generate`: print a new private-network key file (`routing.psk_file`)
//!   (`psk`).
//! - `speculum doctor`: check this node end to end, each finding with its fix
//!   (`speculum::doctor`, docs/doctor.md).
//!
//! The commands that read the configuration take [`ConfigArgs`] (`--config`, `--set` and the
//! shortcut flags of `flags`). A new subcommand is a variant here, one arm in [`run`] and a
//! module with its `run`.
//!
//! Exit codes: 0 done; 1 the command failed; 2 the command line, the configuration or an
//! input file is unusable.

mod audit;
mod daemon;
mod flags;
mod hosts;
mod policy;
mod psk;
mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use speculum::config::Config;

pub use flags::ConfigArgs;

#[derive(Debug, Parser)]
#[command(
    name = "speculum",
    version,
    about = "Peer-to-peer OCI registry mirror for containerd and CRI-O nodes"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: mirror endpoint for containerd, peer endpoint, DHT, metrics.
    Registry(ConfigArgs),
    /// Point containerd at this node's mirror: write certs.d/<registry>/hosts.toml (with a
    /// byte-for-byte backup of what was there); with `--runtime cri-o`, the
    /// registries.conf.d drop-in for CRI-O, podman and skopeo, then SIGHUP to CRI-O.
    Configure(ConfigArgs),
    /// Undo `configure`: restore every backed-up hosts.toml (or, with `--runtime cri-o`, the
    /// drop-in) byte for byte.
    Cleanup(ConfigArgs),
    /// Print the effective configuration (defaults, file, environment, flags) as YAML.
    Config(ConfigArgs),
    /// Work with Rego policy bundles.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Read audit files (rotated `FILE.N` siblings included): filter, list or summarise.
    Audit(audit::AuditArgs),
    /// The DHT's private-network pre-shared key (routing.psk_file).
    #[command(subcommand)]
    Psk(psk::PskCommand),
    /// Check this node: containerd, hosts.toml, the daemon, DHT, peers, policy, keys, clock
    /// (docs/doctor.md). Exit 1 when a check fails.
    Doctor {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        doctor: speculum::doctor::Flags,
    },
}

/// Runs the parsed command and says how the process exits.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Registry(args) => with_config(&args, daemon::run),
        Command::Configure(args) => with_config(&args, |c| hosts::configure(&c)),
        Command::Cleanup(args) => with_config(&args, |c| hosts::cleanup(&c)),
        Command::Config(args) => with_config(&args, print_config),
        Command::Policy(cmd) => policy::run(&cmd),
        Command::Audit(args) => audit::run(&args),
        Command::Psk(cmd) => psk::run(&cmd),
        Command::Doctor { config, doctor } => {
            with_config(&config, |c| speculum::doctor::main(&c, &doctor))
        }
    }
}

/// Loads the configuration `args` name and hands it to `command`; an unusable configuration
/// ends the process with 2 before the command starts.
fn with_config(args: &ConfigArgs, command: impl FnOnce(Config) -> ExitCode) -> ExitCode {
    match args.load() {
        Ok(config) => command(config),
        Err(e) => {
            eprintln!("speculum: {e}");
            ExitCode::from(2)
        }
    }
}

/// `speculum config`.
fn print_config(config: Config) -> ExitCode {
    match yaml_serde::to_string(&config) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("speculum: {e}");
            ExitCode::FAILURE
        }
    }
}
