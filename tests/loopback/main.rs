//! The loopback tier: everything that needs no root, no containerd and no tool beyond cargo.
//! Real sockets on 127.0.0.1:0, the memory twins, the real binary where a test says so.
//! `make unit` runs this harness with the unit tests.
//!
//! Run: `cargo test --test loopback`, one file: `cargo test --test loopback registry::`.
//!
//! Adding a file: put `tests/loopback/<name>.rs` next to this one and list it below; helpers
//! shared with other tiers belong in `testkit/`.

mod advertise;
mod audit;
mod cimage_grants;
mod cli_flags;
mod fuzz_smoke;
mod hostile;
mod hosts;
mod layers;
mod metrics_names;
mod peer_etag;
mod policy;
mod policy_cli;
mod registries_conf;
mod registry;
mod routing_kademlia;
mod routing_psk;
mod swarm;
mod tags;
mod tenancy_registry;
