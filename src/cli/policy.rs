//! `speculum policy test|eval`: run a Rego bundle's own tests, or print its decision for one
//! input document, with regorus as the daemon evaluates it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use speculum::policy::rego::{Bundle, run_tests};
use speculum::policy::{Policy, RegoPolicy};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
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

/// `speculum policy …`.
pub fn run(cmd: &PolicyCommand) -> ExitCode {
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
