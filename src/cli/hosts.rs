//! `speculum configure` and `speculum cleanup`: the shell around `speculum::hosts`, which
//! writes containerd's hosts.toml files (with byte-for-byte backups) and restores them.

use std::process::ExitCode;

use speculum::config::Config;
use speculum::hosts::{self, HostsError, Report};

/// `speculum configure`.
pub fn configure(config: &Config) -> ExitCode {
    report(hosts::configure(&config.hosts))
}

/// `speculum cleanup`.
pub fn cleanup(config: &Config) -> ExitCode {
    report(hosts::cleanup(&config.hosts))
}

/// Prints what was done, or the error.
fn report(result: Result<Report, HostsError>) -> ExitCode {
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
