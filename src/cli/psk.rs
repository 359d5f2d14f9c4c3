//! `speculum psk generate`: a new private-network key for `routing.psk_file`.

use std::process::ExitCode;

use clap::Subcommand;
use speculum::routing::psk;

#[derive(Debug, Subcommand)]
pub enum PskCommand {
    /// Print a new random key in go-libp2p's swarm.key format to stdout (its fingerprint, which
    /// the daemon logs at start, goes to stderr). Redirect it into a file or a Secret.
    Generate,
}

/// `speculum psk …`.
pub fn run(cmd: &PskCommand) -> ExitCode {
    match cmd {
        PskCommand::Generate => {
            let key = psk::generate();
            print!("{}", psk::to_key_file(key));
            eprintln!("fingerprint: {}", key.fingerprint());
            ExitCode::SUCCESS
        }
    }
}
