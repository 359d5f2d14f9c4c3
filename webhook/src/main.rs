//! `speculum-webhook`: the mutating admission webhook that pins image tags to digests.
//!
//! This is a skeleton; the webhook is built under its own issue. It exists now so the
//! workspace layout is final and CI builds every member from the start.

use clap::Parser;

/// Command-line flags of the webhook.
#[derive(Debug, Parser)]
#[command(name = "speculum-webhook", version, about)]
struct Flags {}

fn main() -> anyhow::Result<()> {
    let _flags = Flags::parse();
    eprintln!("speculum-webhook: not implemented yet");
    std::process::exit(2)
}
