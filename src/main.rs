//! `speculum`: parse the command line and run the chosen command (`cli`).
//!
//! The global allocator is jemalloc (feature `jemalloc`, on by default) with background
//! purging threads: after a burst (1,000 concurrent 1 MiB bodies) glibc malloc kept ~70 MiB of
//! freed memory in its per-thread arenas for good; jemalloc hands dirty pages back to the kernel
//! within its decay time (10 s) even when the daemon goes idle. Measurements: ROBUSTNESS.md §4.
//! Runtime tuning without a rebuild: `_RJEM_MALLOC_CONF=dirty_decay_ms:…` (jemalloc's options).

// Binary-private: the library stays free of clap.
mod cli;

use std::process::ExitCode;

use clap::Parser;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    cli::run(cli::Cli::parse())
}
