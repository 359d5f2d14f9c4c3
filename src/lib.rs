//! speculum: a cluster-local, peer-to-peer OCI registry mirror for containerd nodes.
//!
//! Every node runs one daemon. containerd's `hosts.toml` sends image pulls to it; it serves
//! what the node already holds, streams what another node holds, and answers 404 otherwise so
//! containerd falls back to the upstream registry. **A pull never fails because of us.**
//!
//! # Layout
//! - [`oci`]: pure types (digests, references, `/v2/` paths, ranges, media types, error codes).
//! - [`store`]: the `Store` seam, read-only access to the node's content (containerd, memory).
//! - [`routing`]: the `Router` seam, who holds what (libp2p Kademlia, memory).
//! - [`advertise`]: keeps the advertised keys in step with the store (and the blob cache),
//!   filtered by the policy (config section `sync:`).
//! - [`wire`]: bytes between daemons: hop and digest headers, body streams, resumable
//!   streams, the one daemon→daemon HTTP client.
//! - [`server`]: the HTTP/1.1 transport that serves an axum app (accept, header limits, drain,
//!   the `GET`/`HEAD` writer with `sendfile(2)`); knows nothing of the registry.
//! - [`registry`]: the HTTP side: the containerd-facing mirror endpoint, the peer endpoint, and
//!   the one place where errors become OCI error responses.
//! - [`policy`]: the `Policy` seam, Rego bundles (regorus) deciding what may be served peer
//!   to peer and which tags the cluster resolves; fail closed for P2P, never for the pull.
//! - [`audit`]: the `AuditSink` seam, one JSON line per request and decision, never blocking.
//! - [`cache`]: the daemon's own bounded blob cache, anonymous upstream fetches of public
//!   blobs, and coalescing: one upstream fetch per blob across the cluster (off by default).
//! - [`hosts`]: rendering and atomic install/restore of containerd's `certs.d/*/hosts.toml`.
//! - [`config`]: defaults → YAML file → `SPECULUM_*` environment → flags, validated at once.
//! - [`metrics`]: the aggregator of every subsystem's metrics into the daemon's own Prometheus
//!   registry (no globals); imported by [`app`] only.
//! - [`tenancy`]: multi-tenant protection: node pod index, peer authentication (grants: the
//!   `speculum-grant` crate).
//! - [`app`]: the composition root: builds the seams, runs the tasks, readiness and shutdown.
//!
//! # Layers
//! A module imports only from its own layer or lower (`tests/layers.rs` checks every
//! `crate::…` path): L0 pure ([`oci`], [`readiness`], [`shutdown`]) → L1 bytes on the wire
//! ([`wire`], [`server`]) → L2 seams ([`store`] below [`routing`], [`policy`], [`audit`],
//! [`tenancy`], [`hosts`]) → L3 services ([`cache`] < [`advertise`] < [`registry`]) → the top
//! ([`metrics`], [`config`], [`app`]), which nothing below imports.

pub mod advertise;
pub mod app;
pub mod audit;
pub mod cache;
pub mod config;
pub mod hosts;
pub mod metrics;
pub mod oci;
pub mod policy;
pub mod readiness;
pub mod registry;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod tenancy;
pub mod wire;
