//! The registry's config sections, one job: `registry:` (the two listeners, drain, how
//! connections are served) and `mirror:` (fetching from peers, tag resolution), each with a
//! `validate()` whose messages name its own section. Cross-section checks (the peer port
//! equals `routing.registry_port`) stay in `crate::config`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::TagResolution;
use crate::server::ServeOptions;
use crate::server::options::{DEFAULT_IDLE, DEFAULT_WRITE_STALL};

/// The largest `registry.peer_serving_limit` accepted (each stream is a task and a socket).
pub(crate) const MAX_PEER_SERVING_LIMIT: u32 = 4096;

/// The two registry listeners and the shutdown drain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// containerd-facing mirror endpoint (serves local content and mirrors peers).
    pub mirror_listen: SocketAddr,
    /// Endpoint other daemons fetch from (local content only). Its port must equal
    /// `routing.registry_port`, which tells peers where to connect.
    pub peer_listen: SocketAddr,
    /// On SIGTERM, in-flight responses get this long to finish (keep it below the pod's
    /// `terminationGracePeriodSeconds`).
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Serve `GET`/`HEAD` with the daemon's own HTTP/1.1 writer, which sends blob bodies from
    /// containerd's content files with `sendfile(2)` (needs `containerd.content_dir`; without
    /// it bodies stream as before). `false`: hyper writes every response
    /// (`src/server/http1.rs`, BENCHMARKS.md §2).
    pub sendfile: bool,
    /// With `sendfile`: a response whose bytes make no progress for this long is abandoned
    /// and its connection closed, so a client that stops reading cannot hold a task.
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
    /// A connection that has not delivered a complete request head this long after it opened
    /// or after its last response is closed (idle keep-alive connections, trickling clients).
    /// Keep it above the clients' own idle-connection timeouts (90 s for containerd, 30 s for
    /// the daemons' peer client), so they close first.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The most blob streams the peer endpoint serves to other daemons at once; beyond it a
    /// blob request is answered 429 with `Retry-After` and the asker moves on to another
    /// holder (or upstream). The DHT's `has` answers report the count against it, so askers
    /// prefer less loaded holders. `0`: no cap.
    pub peer_serving_limit: u32,
}

impl RegistryConfig {
    /// How the registry listeners serve their connections.
    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            sendfile: self.sendfile,
            write_stall: self.write_stall_timeout,
            idle: self.idle_timeout,
            refuse: super::refusal,
        }
    }

    /// The problems of the `registry:` section (each named `registry.<key>`).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.mirror_listen == self.peer_listen {
            errors.push("registry.mirror_listen and registry.peer_listen must differ".to_owned());
        }
        if self.drain_grace > Duration::from_secs(600) {
            errors.push("registry.drain_grace must be at most 10m".to_owned());
        }
        if self.write_stall_timeout < Duration::from_secs(1)
            || self.write_stall_timeout > Duration::from_secs(3600)
        {
            errors.push("registry.write_stall_timeout must be between 1s and 1h".to_owned());
        }
        if self.idle_timeout < Duration::from_secs(1)
            || self.idle_timeout > Duration::from_secs(3600)
        {
            errors.push("registry.idle_timeout must be between 1s and 1h".to_owned());
        }
        if self.peer_serving_limit > MAX_PEER_SERVING_LIMIT {
            errors.push(format!(
                "registry.peer_serving_limit must be at most {MAX_PEER_SERVING_LIMIT} (0: no cap)"
            ));
        }
        errors
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            mirror_listen: ([127, 0, 0, 1], 5080).into(),
            peer_listen: ([0, 0, 0, 0], 5081).into(),
            drain_grace: Duration::from_secs(20),
            sendfile: true,
            write_stall_timeout: DEFAULT_WRITE_STALL,
            idle_timeout: DEFAULT_IDLE,
            peer_serving_limit: 32,
        }
    }
}

/// Settings of the peer mirror path (the `mirror:` config section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// How long to wait for the lookup to find a first (and each further) peer of a
    /// manifest: every pull starts with one, so a miss must go upstream at once.
    #[serde(with = "humantime_serde")]
    pub resolve_timeout: Duration,
    /// The same wait for a blob. Longer, because the two mistakes cost differently: waiting
    /// costs at most this once per layer, while giving up too early sends a whole layer
    /// through the upstream link. A lookup that ends (nobody has it) answers at once either
    /// way; only a slow walk (a busy node, many lookups at once) waits longer.
    #[serde(with = "humantime_serde")]
    pub blob_resolve_timeout: Duration,
    /// How many peers to try for one request (also the resume budget of a blob stream).
    pub attempts: usize,
    /// Overall time limit for fetching a manifest from peers.
    #[serde(with = "humantime_serde")]
    pub manifest_deadline: Duration,
    /// TCP connect timeout towards a peer.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A peer that sends nothing for this long is treated as broken (the stream resumes
    /// elsewhere). Blobs have no overall deadline: a large layer may take minutes.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Who names a tag's digest: `upstream-first` (one anonymous `HEAD` upstream; the cluster
    /// only when upstream cannot answer) or `cluster-first` (the tags the nodes hold). The
    /// policy's `tag_resolution` overrides it per image ([`super::tags`]).
    pub tag_resolution: TagResolution,
    /// The whole budget of that upstream `HEAD` (token included); past it the cluster answers.
    /// Every tag pull waits at most this long when upstream is silent.
    #[serde(with = "humantime_serde")]
    pub tag_upstream_timeout: Duration,
    /// With the blob cache on (`cache.enabled`): a whole blob streamed from a peer is also
    /// written into this node's cache, and the node advertises itself as an in-flight holder
    /// at once, so later pulls spread over every node that has (part of) it — a tree, not a
    /// star. Only what the policy lets this node advertise, never a blob that needs a grant,
    /// never one larger than the cache.
    pub tee: bool,
    /// A whole blob at least this large is fetched as disjoint `Range` chunks from several
    /// holders at once (when the lookup found more than one), streamed to the client in order
    /// and verified against its digest at the end. `0`: never.
    pub chunk_threshold: u64,
    /// Bytes per chunk; also the window in which an open-ended client range (`bytes=N-`) is
    /// requested from a peer, so bytes the client never reads are never sent.
    pub chunk_size: u64,
    /// Chunks in flight at once for one blob (the memory bound is `chunk_parallel` ×
    /// `chunk_size` per blob).
    pub chunk_parallel: usize,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            resolve_timeout: Duration::from_millis(20),
            blob_resolve_timeout: Duration::from_millis(250),
            attempts: 3,
            manifest_deadline: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_secs(10),
            tag_resolution: TagResolution::UpstreamFirst,
            tag_upstream_timeout: Duration::from_millis(1500),
            tee: true,
            chunk_threshold: 64 << 20,
            chunk_size: 8 << 20,
            chunk_parallel: 4,
        }
    }
}

impl MirrorConfig {
    /// The problems of the `mirror:` section (each named `mirror.<key>`).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.attempts == 0 || self.attempts > 32 {
            errors.push("mirror.attempts must be between 1 and 32".to_owned());
        }
        for (name, d) in [
            ("resolve_timeout", self.resolve_timeout),
            ("blob_resolve_timeout", self.blob_resolve_timeout),
            ("manifest_deadline", self.manifest_deadline),
            ("connect_timeout", self.connect_timeout),
            ("read_timeout", self.read_timeout),
        ] {
            if d.is_zero() {
                errors.push(format!("mirror.{name} must be greater than zero"));
            }
        }
        if self.tag_upstream_timeout < Duration::from_millis(10)
            || self.tag_upstream_timeout > Duration::from_secs(30)
        {
            errors.push("mirror.tag_upstream_timeout must be between 10ms and 30s".to_owned());
        }
        if self.chunk_size < 64 << 10 || self.chunk_size > 256 << 20 {
            errors.push("mirror.chunk_size must be between 64 KiB and 256 MiB".to_owned());
        }
        if self.chunk_parallel == 0 || self.chunk_parallel > 16 {
            errors.push("mirror.chunk_parallel must be between 1 and 16".to_owned());
        }
        if self.chunk_threshold != 0 && self.chunk_threshold < self.chunk_size {
            errors.push(
                "mirror.chunk_threshold must be 0 (off) or at least mirror.chunk_size".to_owned(),
            );
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each message names the section the key is really in (`mirror.*` was reported as
    /// `registry.*` before).
    #[test]
    fn validation_names_the_section() {
        let cases: Vec<(&str, MirrorConfig, RegistryConfig, &str)> = vec![
            (
                "attempts",
                MirrorConfig {
                    attempts: 0,
                    ..MirrorConfig::default()
                },
                RegistryConfig::default(),
                "mirror.attempts must be between 1 and 32",
            ),
            (
                "a zero timeout",
                MirrorConfig {
                    read_timeout: Duration::ZERO,
                    ..MirrorConfig::default()
                },
                RegistryConfig::default(),
                "mirror.read_timeout must be greater than zero",
            ),
            (
                "tag upstream timeout",
                MirrorConfig {
                    tag_upstream_timeout: Duration::from_secs(60),
                    ..MirrorConfig::default()
                },
                RegistryConfig::default(),
                "mirror.tag_upstream_timeout must be between 10ms and 30s",
            ),
            (
                "same listeners",
                MirrorConfig::default(),
                RegistryConfig {
                    peer_listen: RegistryConfig::default().mirror_listen,
                    ..RegistryConfig::default()
                },
                "registry.mirror_listen and registry.peer_listen must differ",
            ),
            (
                "idle timeout",
                MirrorConfig::default(),
                RegistryConfig {
                    idle_timeout: Duration::from_millis(10),
                    ..RegistryConfig::default()
                },
                "registry.idle_timeout must be between 1s and 1h",
            ),
            (
                "serving limit",
                MirrorConfig::default(),
                RegistryConfig {
                    peer_serving_limit: 5000,
                    ..RegistryConfig::default()
                },
                "registry.peer_serving_limit must be at most 4096 (0: no cap)",
            ),
            (
                "chunk size",
                MirrorConfig {
                    chunk_size: 1024,
                    chunk_threshold: 0,
                    ..MirrorConfig::default()
                },
                RegistryConfig::default(),
                "mirror.chunk_size must be between 64 KiB and 256 MiB",
            ),
            (
                "chunk parallel",
                MirrorConfig {
                    chunk_parallel: 0,
                    ..MirrorConfig::default()
                },
                RegistryConfig::default(),
                "mirror.chunk_parallel must be between 1 and 16",
            ),
            (
                "chunk threshold below a chunk",
                MirrorConfig {
                    chunk_threshold: 1 << 20,
                    ..MirrorConfig::default()
                },
                RegistryConfig::default(),
                "mirror.chunk_threshold must be 0 (off) or at least mirror.chunk_size",
            ),
        ];
        assert!(MirrorConfig::default().validate().is_empty());
        assert!(RegistryConfig::default().validate().is_empty());
        for (name, mirror, registry, want) in cases {
            let errors: Vec<String> = mirror
                .validate()
                .into_iter()
                .chain(registry.validate())
                .collect();
            assert_eq!(errors, vec![want.to_owned()], "{name}");
        }
    }
}
