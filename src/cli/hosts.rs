//! `speculum configure` and `speculum cleanup`: the shell around `speculum::hosts`, which
//! writes containerd's hosts.toml files or, with `--runtime cri-o` (`hosts.runtime`), the
//! registries.conf.d drop-in for CRI-O, podman and skopeo (`hosts::registries_conf`, which
//! also signals CRI-O), each with byte-for-byte backups, and restores them.

use std::process::ExitCode;

use speculum::config::Config;
use speculum::hosts::{self, HostsError, Report, Runtime, registries_conf};

/// `speculum configure`.
pub fn configure(config: &Config) -> ExitCode {
    report(match config.hosts.runtime {
        Runtime::Containerd => hosts::configure(&config.hosts),
        Runtime::CriO => registries_conf::configure(&config.hosts),
    })
}

/// `speculum cleanup`.
pub fn cleanup(config: &Config) -> ExitCode {
    report(match config.hosts.runtime {
        Runtime::Containerd => hosts::cleanup(&config.hosts),
        Runtime::CriO => registries_conf::cleanup(&config.hosts),
    })
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
