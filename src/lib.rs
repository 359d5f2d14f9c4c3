//! speculum: a cluster-local, peer-to-peer OCI registry mirror for containerd and CRI-O nodes.
//!
//! Every node runs one daemon. containerd's `hosts.toml` sends image pulls to it; it serves
//! what the node already holds, streams what another node holds, and answers 404 otherwise so
//! containerd falls back to the upstream registry. **A pull never fails because of us.**
//!
//! # Layers
//!
//! A file imports only from its own layer or a lower one (`tests/loopback/layers.rs` reads
//! every `crate::` path and fails on an upward edge; its table is this one). Within L2,
//! `store` sits below the other seams; within L3 the order is `cache` < `advertise` <
//! `registry`. `metrics`, `config`, `app` and the binary's `cli/` are imported by nobody but
//! each other.
//!
//! | layer | modules | job |
//! |---|---|---|
//! | L0 pure | [`oci`] | digests, references, `/v2/` paths, ranges, media types, OCI error codes |
//! | | [`readiness`] | the latch `/readyz` reports; one `Part` per subsystem |
//! | | [`shutdown`] | a trigger that remembers it fired |
//! | L1 bytes on the wire | [`wire`] | hop header, digest header, byte streams, resumable peer bodies, the one daemon→daemon HTTP client |
//! | | [`server`] | accept and drain (`listen`), the GET/HEAD writer with sendfile (`http1`), header limits (`options`), file bodies (`file_body`); knows no store, policy or router |
//! | L2 seams | [`store`] | `Store`: read-only access to the node's content (containerd, memory twin) |
//! | | [`routing`] | `Router`: who holds what (libp2p Kademlia in `routing::kademlia`, memory twin), claims, bootstrap, pre-shared key |
//! | | [`policy`] | `Policy`: Rego bundles (regorus) deciding what may be served peer to peer and which tags the cluster resolves; fail closed for P2P, never for the pull |
//! | | [`audit`] | `AuditSink`: one JSON line per request and decision, never blocking; the reader behind `speculum audit` |
//! | | [`tenancy`] | multi-tenant protection: the node's pod index, peer authentication, grants (the `speculum-grant` crate) |
//! | | [`hosts`] | rendering and atomic install/restore of containerd's `certs.d/*/hosts.toml`, and of CRI-O's registries.conf.d drop-in (`hosts::registries_conf`, with the SIGHUP reload) |
//! | L3 services | [`cache`] | the daemon's bounded blob cache (and the manifests and tags it fetched), anonymous upstream fetches of public blobs, one upstream fetch per blob across the cluster (off by default) |
//! | | [`advertise`] | store and cache → router: the advertised keys kept in step with what the node holds, filtered by `policy::Advert` |
//! | | [`registry`] | the OCI distribution API: the containerd-facing mirror endpoint and the peer endpoint |
//! | root | [`config`] | defaults → YAML file → `SPECULUM_*` environment → flags, every error reported at once |
//! | | [`metrics`] | the Prometheus registry (no globals), one struct per subsystem |
//! | | [`app`] | the composition root: builds the seams, runs the tasks, readiness and shutdown |
//! | | [`doctor`] | `speculum doctor`: checks a node end to end (containerd, hosts.toml, daemon, DHT, peers, policy, keys, clock), each finding with its fix |
//! | | [`status`] | the node status page (off by default, on the metrics listener): peers, advertised keys, cache, policy in force, the last requests |
//! | binary | `src/cli/` | subcommands, the shortcut flags (`cli/flags.rs`), logging (`cli/telemetry.rs`), signals (`cli/daemon.rs`) |
//!
//! # The path of one pull
//!
//! containerd asks the mirror endpoint for `GET /v2/<name>/blobs/<digest>?ns=<registry>`:
//!
//! 1. `server/listen.rs`: accepts the connection (and drains it on shutdown).
//! 2. `server/http1.rs`: parses the request head within the header limits (a refusal is
//!    answered through `registry/error.rs`).
//! 3. `registry/request.rs`: `PullRequest::parse`: registry, repository, reference or digest.
//! 4. `registry/guard.rs`: the policy and tenancy decision (`admit` → `Admitted`): authenticate
//!    the client, build the policy input, decide, exchange grants with the peer, decide again.
//! 5. `registry/answer.rs`: the responders in order, local → cache → peers → cold → 404
//!    (`registry/local.rs`, `registry/from_cache.rs`, `registry/peers.rs`); the first that
//!    serves wins, a 404 sends containerd to the upstream registry.
//! 6. `registry/error.rs`: the only place an error becomes an HTTP response (OCI error body).
//! 7. `registry/access_log.rs`: one log line and one audit record per request, with the
//!    source that served it and the bytes sent (`audit` writes the line).
//!
//! # Where is …
//!
//! | question | file | item |
//! |---|---|---|
//! | why an allowed image got 404 | `registry/answer.rs` | the responder chain, in order |
//! | why CRI-O/podman/skopeo got 404 on a manifest | `registry/complete.rs` | complete-or-nothing; the path-encoded registry rule is `oci::path::split_registry` |
//! | where the serving node checks a presented grant | `registry/guard.rs` | grant exchange; the token check is `tenancy/grants.rs` (`verify`) |
//! | what can hold `/readyz` back | `readiness.rs` | [`readiness::Part`]: each variant says who blocks and who releases it |
//! | which metrics exist | `metrics.rs` | the aggregator; families in each subsystem's `metrics.rs`; names pinned by `tests/loopback/metrics_names.rs` and README "Metrics" |
//! | where a config error ("mirror.attempts must …") comes from | the section's `validate()` | `registry/config.rs`, `routing/kademlia/config.rs`, …; cross-section checks in `config.rs` (`Config::validate`) |
//! | which flag sets which key | `src/cli/flags.rs` | the `shortcuts!` table |
//! | where the hosts.toml backup is made and restored | `hosts.rs` | `configure`, `cleanup` (`backup_path`) |
//! | what CRI-O's drop-in says, and how CRI-O is told | `hosts/registries_conf.rs` | `render`, `path_segment`, `reload` |
//! | where the cold-pull decision is | `cache/coalesce.rs` | who fetches from upstream (a claim through `routing`); called from `registry/from_cache.rs` |
//! | how a broken peer blob resumes | `wire/resume.rs` | where it reopens: `registry/peers.rs` |
//! | where sendfile happens | `server/http1.rs` | with `server/file_body.rs` |
//! | how a node chooses a peer's IP | `routing/kademlia/peers.rs` | [`routing::kademlia::choose_ip`] |
//! | what the DHT task does with a swarm event | `routing/kademlia/node.rs` | `Node::on_swarm_event`, handlers in `publish`, `lookup`, `claims`, `peers` |
//! | where a local blob's Range is applied | `oci/range.rs` | parsed there, served by `registry/local.rs` |
//! | which component stops first on SIGTERM | `app.rs` | `run`: readiness fails → DHT records withdrawn → stop accepting → drain |
//! | what is advertised to the DHT | `advertise.rs` | filtered by `policy::Advert` |
//! | how doctor and the status page read the daemon's numbers | `metrics/text.rs` | `sum`, `samples`: by metric name, as Prometheus sees them |

pub mod advertise;
pub mod app;
pub mod audit;
pub mod cache;
pub mod config;
pub mod doctor;
pub mod hosts;
pub mod metrics;
pub mod oci;
pub mod policy;
pub mod readiness;
pub mod registry;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod tenancy;
pub mod wire;
