//! The webhook's tests that need no Kubernetes: the pure mutation over fixtures, resolution and
//! pinning against a real distribution registry (`testkit::registries`), the TLS server, tokens,
//! the daemon fallback, and the measurements (`measure::`, ignored by default).
//!
//! Run: `cargo test -p speculum-webhook --test offline`, one file: `… --test offline pin::`.
//!
//! Adding a file: put `webhook/tests/offline/<name>.rs` next to this one and list it below.

mod daemon_fallback;
mod fixtures;
mod measure;
mod pin;
mod resolve;
mod server;
mod token;
