//! One function per check of `speculum doctor` (the order and the ids are `docs/doctor.md`'s).
//! Each looks, never changes anything, and turns what it saw into [`Finding`]s; a check that
//! does not apply says `skip` and why. Pure judgements are split out where a table test can
//! reach them (`judge_*`, `peer_addr_of`, `metric`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::containerd_config::{self, FileSettings};
use super::{Finding, Flags};
use crate::config::Config;
use crate::hosts::{self, FileState, HostsConfig, MirroredRegistry};
use crate::policy::PolicyConfig;
use crate::policy::rego::{Bundle, RegoPolicy, run_tests};
use crate::routing::kademlia::KademliaConfig;
use crate::store::containerd::ContainerdStore;
use crate::store::introspect::{self, CriKeys, CriSource, NodeFacts};
use crate::tenancy::GrantsConfig;
use crate::tenancy::PeerAuthMode;
use crate::tenancy::peer_auth::{PeerTokens, SharedKey, TokenFile};

/// How `configure` is rerun; the fix of every hosts.toml finding.
const RERUN_CONFIGURE: &str = "run `speculum configure` with the daemon's configuration (the same \
     --config/--set/SPECULUM_* as `speculum registry`); in Kubernetes the daemon pod's init \
     container runs it: delete the daemon pod on this node and the DaemonSet recreates it";

/// A digest no registry holds: the peer authentication probe asks for it.
const PROBE_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

// ------------------------------------------------------------------------------------------------
// containerd

/// `containerd.reachable`, `containerd.config_path`, `containerd.discard_layers`,
/// `containerd.content_store`.
pub async fn containerd(config: &Config, flags: &Flags) -> Vec<Finding> {
    let cfg = &config.containerd;
    let socket = cfg.socket.display().to_string();
    let asked = match ContainerdStore::new(cfg.clone()) {
        Ok(store) => {
            // Each call inside is bounded already; this bounds the sum.
            match tokio::time::timeout(flags.timeout * 4, store.introspect()).await {
                Ok(Ok(facts)) => Ok((facts, store)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", flags.timeout * 4)),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    let (facts, store) = match asked {
        Ok(x) => x,
        Err(e) => {
            let why = "containerd is unreachable (containerd.reachable)";
            return vec![
                Finding::fail(
                    "containerd.reachable",
                    format!(
                        "containerd does not answer on {socket}: {e}. The daemon cannot serve \
                         anything from this node"
                    ),
                    format!(
                        "start containerd (`systemctl status containerd`), or set \
                         containerd.socket to its socket (chart: containerd.socket) and make \
                         sure it is mounted at {socket}"
                    ),
                ),
                Finding::skip("containerd.config_path", why),
                Finding::skip("containerd.discard_layers", why),
                match &cfg.content_dir {
                    Some(dir) => content_store(Some(dir), None, true),
                    None => Finding::skip(
                        "containerd.content_store",
                        "containerd is unreachable and containerd.content_dir is not set: the \
                         content root is unknown",
                    ),
                },
            ];
        }
    };
    let mut out = vec![Finding::ok(
        "containerd.reachable",
        format!(
            "containerd {} answers on {socket} (config version {})",
            facts.version,
            facts.config_version()
        ),
    )];
    let (facts, source, file) = effective_facts(facts, &flags.containerd_config);
    out.push(judge_config_path(
        &facts,
        &source,
        file.as_ref(),
        &config.hosts.certs_dir,
    ));
    out.push(judge_discard(&facts, &source, file.as_ref()));
    out.push(content_store(
        cfg.content_dir.as_deref(),
        store.content_dir().map(Path::to_path_buf).as_deref(),
        cfg.content_dir.is_some(),
    ));
    out
}

/// Where the CRI settings came from, for the summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// containerd said (plugin exports on 2.4+, CRI status on 1.x).
    Containerd,
    /// Read from this config file (containerd 2.0-2.3 say nothing).
    File(PathBuf),
    /// Neither: why the file could not be used.
    Unknown(String),
}

/// The facts, with the CRI settings filled in from the config file when containerd did not say.
fn effective_facts(
    mut facts: NodeFacts,
    config_file: &Path,
) -> (NodeFacts, Source, Option<FileSettings>) {
    if facts.cri_source != CriSource::Unknown {
        return (facts, Source::Containerd, None);
    }
    let text = match std::fs::read_to_string(config_file) {
        Ok(t) => t,
        Err(e) => {
            let why = format!(
                "containerd {} does not say, and its config file {} is not readable here ({e})",
                facts.version,
                config_file.display()
            );
            return (facts, Source::Unknown(why), None);
        }
    };
    match containerd_config::parse(&text) {
        Ok(file) => {
            facts.registry_config_path = Some(file.effective_config_path(facts.major()));
            facts.discard_unpacked_layers = Some(file.effective_discard());
            (facts, Source::File(config_file.to_owned()), Some(file))
        }
        Err(e) => {
            let why = format!("{} is not a containerd config: {e}", config_file.display());
            (facts, Source::Unknown(why), None)
        }
    }
}

fn source_text(source: &Source, file: Option<&FileSettings>) -> String {
    match source {
        Source::Containerd => "as containerd reports it".to_owned(),
        Source::File(p) => {
            let imports = match file {
                Some(f) if !f.imports.is_empty() => format!(
                    "; its imports ({}) are not read and may override it",
                    f.imports.join(", ")
                ),
                _ => String::new(),
            };
            format!(
                "from {} (config version {}){imports}",
                p.display(),
                file.map_or(0, |f| f.version)
            )
        }
        Source::Unknown(why) => why.clone(),
    }
}

/// The TOML an operator adds to containerd's config, for the file's version when it was read,
/// else for the running containerd's.
fn snippet(table: &str, key: &str, value: &str) -> String {
    format!("[{table}]\n  {key} = {value}\nthen restart containerd")
}

fn keys_for(facts: &NodeFacts, file: Option<&FileSettings>) -> CriKeys {
    file.map_or_else(|| CriKeys::of(facts.config_version()), FileSettings::keys)
}

/// `containerd.config_path`: does containerd read the `hosts.toml` files we write? Pure.
pub(crate) fn judge_config_path(
    facts: &NodeFacts,
    source: &Source,
    file: Option<&FileSettings>,
    certs_dir: &Path,
) -> Finding {
    const ID: &str = "containerd.config_path";
    let keys = keys_for(facts, file);
    let certs = certs_dir.display().to_string();
    let fix = snippet(keys.registry_table, "config_path", &format!("{certs:?}"));
    let version = file.map_or(facts.config_version(), |f| f.version.max(2));
    let from = source_text(source, file);
    for finding in introspect::findings(facts, certs_dir, true) {
        match finding {
            introspect::Finding::HostsDirNotSet | introspect::Finding::HostsDirDiffers { .. } => {
                return Finding::fail(
                    ID,
                    format!("{} ({from})", finding.message(version, certs_dir)),
                    fix,
                );
            }
            introspect::Finding::HostsDirUnknown => {
                return Finding::warn(
                    ID,
                    format!("cannot tell whether containerd reads {certs}: {from}"),
                    format!(
                        "pass --containerd-config with containerd's config file (mount it \
                         read-only into the pod), or check by hand that it has\n{fix}"
                    ),
                );
            }
            _ => {}
        }
    }
    let path = facts.registry_config_path.clone().unwrap_or_default();
    // 2.1+ pulls through the transfer service, which takes `config_path` as one directory
    // (containerd#12415, docs/containerd.md): a list only works for the local pull path.
    if facts.major().unwrap_or(2) >= 2 && path.contains(':') {
        return Finding::warn(
            ID,
            format!(
                "containerd's config_path is the list {path:?} ({from}); containerd 2.1+ pulls \
                 through its transfer service, which reads a single directory \
                 (containerd#12415), so {certs} may be ignored"
            ),
            fix,
        );
    }
    Finding::ok(
        ID,
        format!("containerd reads hosts.toml from {path:?} ({from})"),
    )
}

/// `containerd.discard_layers`: does containerd keep the layers this node should serve? Pure.
pub(crate) fn judge_discard(
    facts: &NodeFacts,
    source: &Source,
    file: Option<&FileSettings>,
) -> Finding {
    const ID: &str = "containerd.discard_layers";
    let keys = keys_for(facts, file);
    let version = file.map_or(facts.config_version(), |f| f.version.max(2));
    let from = source_text(source, file);
    let fix = snippet(keys.discard_table, "discard_unpacked_layers", "false");
    match facts.discard_unpacked_layers {
        Some(true) => Finding::fail(
            ID,
            format!(
                "{} ({from}). Images pulled from now on keep their layers; layers already \
                 discarded come back with the next pull of their image",
                introspect::Finding::LayersDiscarded.message(version, Path::new(""))
            ),
            fix,
        ),
        Some(false) => Finding::ok(
            ID,
            format!("containerd keeps layers after unpacking them ({from})"),
        ),
        None => Finding::warn(
            ID,
            format!("cannot tell whether containerd discards layers: {from}"),
            format!("check by hand that containerd's config has\n{fix}"),
        ),
    }
}

/// `containerd.content_store`: can this process read containerd's blob files? `configured`
/// is `containerd.content_dir`; `in_use` the directory the store uses (configured, else the one
/// containerd reported). `explicit`: the operator set it, so a wrong one is a failure.
pub fn content_store(configured: Option<&Path>, in_use: Option<&Path>, explicit: bool) -> Finding {
    const ID: &str = "containerd.content_store";
    let Some(dir) = in_use.or(configured) else {
        return Finding::warn(
            ID,
            "the content store's directory is unknown (containerd.content_dir is not set and \
             containerd did not report its content root): blobs stream through containerd's \
             gRPC API, slower, and sendfile is off",
            "set containerd.content_dir to <containerd root>/io.containerd.content.v1.content and \
             mount it read-only at that path",
        );
    };
    let shown = dir.display();
    let mount_fix = format!(
        "mount {shown} read-only at the same path in the daemon's pod (chart: \
         containerd.contentDir), or set containerd.content_dir to where it is mounted"
    );
    match std::fs::metadata(dir) {
        // 1.7 creates the directory with the first blob: containerd's root being there is
        // enough to tell "mounted" from "not mounted" (as the daemon's health loop does).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.parent().is_some_and(Path::is_dir) {
                return Finding::ok(ID, format!("{shown} holds no blobs yet"));
            }
            let summary = match explicit {
                true => format!(
                    "containerd.content_dir {shown} does not exist here: blobs stream through \
                     gRPC instead (slower, no sendfile)"
                ),
                false => introspect::Finding::ContentRootNotVisible {
                    root: dir.to_owned(),
                }
                .message(3, Path::new("")),
            };
            if explicit {
                Finding::fail(ID, summary, mount_fix)
            } else {
                Finding::warn(ID, summary, mount_fix)
            }
        }
        Err(e) => Finding::fail(
            ID,
            format!("cannot look at {shown}: {e}"),
            readable_fix(dir),
        ),
        Ok(m) if !m.is_dir() => Finding::fail(ID, format!("{shown} is not a directory"), mount_fix),
        Ok(_) => read_blobs(dir),
    }
}

fn readable_fix(dir: &Path) -> String {
    format!(
        "containerd's files belong to root: run the daemon as uid 0 (the chart does, without \
         capabilities: owner permissions suffice) and keep {} and the directories under it \
         readable by their owner; or unset containerd.content_dir to stream through gRPC",
        dir.display()
    )
}

/// Lists `blobs/sha256` and reads one byte of one blob.
fn read_blobs(dir: &Path) -> Finding {
    const ID: &str = "containerd.content_store";
    let blobs = dir.join("blobs").join("sha256");
    let entries = match std::fs::read_dir(&blobs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.read_dir().is_ok() => {
            return Finding::ok(ID, format!("{} holds no blobs yet", dir.display()));
        }
        Err(e) => {
            return Finding::fail(
                ID,
                format!(
                    "{} is not readable by this process: {e}. Blobs stream through gRPC \
                     instead (slower, no sendfile)",
                    blobs.display()
                ),
                readable_fix(dir),
            );
        }
    };
    let mut count = 0usize;
    let mut first: Option<PathBuf> = None;
    for entry in entries.flatten() {
        count += 1;
        if first.is_none() {
            first = Some(entry.path());
        }
    }
    if let Some(path) = &first {
        let mut byte = [0u8; 1];
        let read =
            std::fs::File::open(path).and_then(|mut f| std::io::Read::read(&mut f, &mut byte));
        if let Err(e) = read {
            return Finding::fail(
                ID,
                format!(
                    "blob {} is not readable by this process: {e}",
                    path.display()
                ),
                readable_fix(dir),
            );
        }
    }
    Finding::ok(ID, format!("{} is readable ({count} blobs)", dir.display()))
}

// ------------------------------------------------------------------------------------------------
// hosts.toml

/// `hosts.toml`, once per mirrored registry: present, ours, and what `configure` writes now.
pub fn hosts_files(cfg: &HostsConfig) -> Vec<Finding> {
    const ID: &str = "hosts.toml";
    if cfg.mirrored_registries.is_empty() {
        return vec![Finding::warn(
            ID,
            "hosts.mirrored_registries is empty: containerd sends no pull to the mirror",
            "list the registries to mirror in hosts.mirrored_registries (chart: \
             daemon.mirroredRegistries), then rerun `speculum configure`",
        )];
    }
    let mut out = Vec::new();
    for entry in &cfg.mirrored_registries {
        let registry = match MirroredRegistry::parse(entry) {
            Ok(r) => r,
            Err(e) => {
                out.push(
                    Finding::fail(ID, e.to_string(), "fix hosts.mirrored_registries").about(entry),
                );
                continue;
            }
        };
        let path = registry.hosts_path(cfg);
        let shown = path.display();
        let endpoint = &cfg.mirror_endpoint;
        let finding = match hosts::inspect(&registry, cfg) {
            Ok(FileState::Current) => Finding::ok(
                ID,
                format!("{shown} is speculum's and current: containerd tries {endpoint} first"),
            ),
            Ok(FileState::Missing) => Finding::fail(
                ID,
                format!(
                    "{shown} does not exist: containerd pulls {} straight from upstream, \
                     bypassing the mirror",
                    registry.dir()
                ),
                RERUN_CONFIGURE,
            ),
            Ok(FileState::Theirs) => Finding::fail(
                ID,
                format!(
                    "{shown} is not speculum's (its first line is not `{}`): containerd follows \
                     it, and it does not name the mirror {endpoint} first",
                    hosts::MARKER
                ),
                RERUN_CONFIGURE,
            ),
            Ok(FileState::Stale) => Finding::fail(
                ID,
                format!(
                    "{shown} is speculum's but not what `configure` writes now (edited by hand, \
                     or hosts.* / policy.resolve_tags changed since): containerd may not reach \
                     the mirror at {endpoint} as configured"
                ),
                RERUN_CONFIGURE,
            ),
            Err(e) => Finding::fail(
                ID,
                format!("{e}"),
                "see docs/hosts.md (\"when configure refuses\"), then rerun `speculum configure`",
            ),
        };
        out.push(finding.about(registry.dir()));
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The running daemon

/// Where a listener bound to `addr` is reached from this host: the unspecified address
/// becomes loopback of its family.
pub fn local_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

/// `daemon.ready`, `daemon.metrics`, `dht.peers`: asked of the daemon's metrics listener.
pub async fn daemon(config: &Config, flags: &Flags) -> Vec<Finding> {
    let base = format!("http://{}", local_addr(config.metrics.listen));
    let client = match client(flags.timeout) {
        Ok(c) => c,
        Err(e) => {
            return vec![
                Finding::fail("daemon.ready", e, "report this as a bug"),
                Finding::skip("daemon.metrics", "no HTTP client"),
                Finding::skip("dht.peers", "no HTTP client"),
            ];
        }
    };
    let ready = match client.get(format!("{base}/readyz")).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            Ok((status, r.text().await.unwrap_or_default()))
        }
        Err(e) => Err(e),
    };
    let mut out = Vec::new();
    match ready {
        Err(e) => {
            let why = "the daemon does not answer (daemon.ready)";
            return vec![
                Finding::fail(
                    "daemon.ready",
                    format!(
                        "no daemon answers on {base}/readyz ({}): containerd falls back to \
                         upstream for every pull from this node",
                        error_chain(&e)
                    ),
                    format!(
                        "start the daemon (`speculum registry`, or check the daemon pod on this \
                         node: `kubectl -n <namespace> get pods -o wide`, `kubectl logs`); \
                         metrics.listen ({}) must be the running daemon's",
                        config.metrics.listen
                    ),
                ),
                Finding::skip("daemon.metrics", why),
                Finding::skip("dht.peers", why),
            ];
        }
        Ok((status, body)) => out.push(judge_readyz(status, &body)),
    }
    let metrics = match client.get(format!("{base}/metrics")).send().await {
        Ok(r) if r.status().is_success() => r.text().await.map_err(|e| error_chain(&e)),
        Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
        Err(e) => Err(error_chain(&e)),
    };
    match metrics {
        Ok(text) => {
            let series = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .count();
            out.push(Finding::ok(
                "daemon.metrics",
                format!("{base}/metrics serves {series} samples"),
            ));
            out.push(judge_peers(
                metric(&text, "speculum_routing_peers"),
                metric(&text, "speculum_routing_handshake_failures_total"),
                &config.routing,
            ));
        }
        Err(e) => {
            out.push(Finding::fail(
                "daemon.metrics",
                format!("{base}/metrics does not answer: {e}"),
                "check the daemon's log; the metrics listener serves /metrics and /readyz together",
            ));
            out.push(Finding::skip("dht.peers", "no metrics (daemon.metrics)"));
        }
    }
    out
}

/// reqwest's message alone is "error sending request"; the cause says "connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// `daemon.ready` from `/readyz`'s status and body (`part: ok` or `part: reason` lines). Pure.
pub(crate) fn judge_readyz(status: u16, body: &str) -> Finding {
    const ID: &str = "daemon.ready";
    let not_ok: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with(": ok"))
        .collect();
    match status {
        200 if not_ok.is_empty() => Finding::ok(ID, "the daemon is ready"),
        200 => Finding::ok(
            ID,
            format!("the daemon is ready; it notes: {}", not_ok.join("; ")),
        ),
        503 => Finding::fail(
            ID,
            format!(
                "the daemon is not ready, so the kubelet keeps it out of service: {}",
                not_ok.join("; ")
            ),
            "fix the part named (containerd: see containerd.reachable; routing: the DHT \
             listener, routing.listen; listeners: a port in use) and look at the daemon's log",
        ),
        other => Finding::fail(
            ID,
            format!(
                "/readyz answered HTTP {other}, not 200 or 503: is this speculum's metrics port?"
            ),
            "set metrics.listen to the running daemon's metrics address",
        ),
    }
}

/// The value of `name` in Prometheus text (summed over its series; an unlabelled gauge is one),
/// `None` when absent. Pure.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    crate::metrics::text::sum(text, name, &[])
}

/// `dht.peers` from the daemon's gauges. Pure.
pub(crate) fn judge_peers(
    peers: Option<f64>,
    handshake_failures: Option<f64>,
    routing: &KademliaConfig,
) -> Finding {
    const ID: &str = "dht.peers";
    let Some(peers) = peers else {
        return Finding::warn(
            ID,
            "the daemon's metrics have no speculum_routing_peers",
            "run a daemon of the same version as this command",
        );
    };
    let failures = handshake_failures.unwrap_or(0.0);
    let hint = if failures > 0.0 {
        format!(
            "; {failures} inbound DHT handshakes failed: a node with another (or no) pre-shared \
             key, or a scanner, is connecting"
        )
    } else {
        String::new()
    };
    if peers >= 1.0 {
        return Finding::ok(ID, format!("DHT peers connected: {peers}{hint}"));
    }
    let bootstrap = match (&routing.bootstrap.dns, routing.bootstrap.peers.is_empty()) {
        (Some(dns), _) => format!("routing.bootstrap.dns {dns}"),
        (None, false) => format!(
            "routing.bootstrap.peers {}",
            routing.bootstrap.peers.join(", ")
        ),
        (None, true) => "no bootstrap (routing.bootstrap is empty)".to_owned(),
    };
    Finding::warn(
        ID,
        format!(
            "no DHT peer is connected: this node serves only itself and finds nothing other \
             nodes hold (bootstrap: {bootstrap}){hint}"
        ),
        format!(
            "check that the bootstrap names other nodes, that TCP {} is open between nodes, and \
             that every daemon has the same routing.psk_file key (or none); a one-node cluster \
             has no peers by design",
            routing.listen
        ),
    )
}

// ------------------------------------------------------------------------------------------------
// The private network, peer authentication

/// `dht.private_network`: is the DHT closed to nodes without the pre-shared key?
pub fn private_network(routing: &KademliaConfig) -> Finding {
    const ID: &str = "dht.private_network";
    match routing.psk() {
        Ok(None) => Finding::warn(
            ID,
            format!(
                "routing.psk_file is empty: anyone who reaches {} can join the routing DHT and \
                 announce content",
                routing.listen
            ),
            "`speculum psk generate > swarm.key`, store it in a Secret, and set \
             routing.psk_file on every node (chart: routing.psk.enabled; docs/routing.md)",
        ),
        Ok(Some(key)) => Finding::ok(
            ID,
            format!(
                "private network: {} holds a key with fingerprint {}; nodes without it cannot connect",
                routing.psk_file.display(),
                key.fingerprint()
            ),
        ),
        Err(e) => Finding::fail(
            ID,
            format!("{e}: the daemon refuses to start with it"),
            "write the key `speculum psk generate` prints into that file (the same key on every node)",
        ),
    }
}

/// The first peer endpoint, among bootstrap addresses, that is not this host. Pure apart from
/// `is_local`, which the caller supplies.
pub(crate) fn peer_addr_of(
    bootstrap: &[String],
    registry_port: u16,
    is_local: impl Fn(IpAddr) -> bool,
) -> Option<SocketAddr> {
    bootstrap.iter().find_map(|m| {
        let mut parts = m.split('/').skip(1);
        let ip: IpAddr = match (parts.next(), parts.next()) {
            (Some("ip4" | "ip6"), Some(ip)) => ip.parse().ok()?,
            _ => return None,
        };
        (!is_local(ip)).then_some(SocketAddr::new(ip, registry_port))
    })
}

/// An address is this host's when a socket can bind to it.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

async fn choose_peer(routing: &KademliaConfig) -> Option<SocketAddr> {
    if let Some(addr) = peer_addr_of(&routing.bootstrap.peers, routing.registry_port, is_local) {
        return Some(addr);
    }
    let dns = routing.bootstrap.dns.as_deref()?;
    let addrs = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(dns))
        .await
        .ok()?
        .ok()?;
    addrs
        .map(|a| a.ip())
        .find(|ip| !is_local(*ip))
        .map(|ip| SocketAddr::new(ip, routing.registry_port))
}

/// `peer.auth`: does a real peer accept this node's token, and refuse a request without one?
pub async fn peer_auth(config: &Config, flags: &Flags) -> Finding {
    const ID: &str = "peer.auth";
    let auth = &config.tenancy.peer_auth;
    let same_everywhere = "every daemon needs the same tenancy.peer_auth: shared_key mode the \
         same secret in shared_key_file and the same audience; kubernetes mode the daemons' \
         ServiceAccount in service_accounts and a projected token with the audience";
    let tokens: Box<dyn PeerTokens> = match auth.mode {
        PeerAuthMode::None => {
            return Finding::skip(
                ID,
                "tenancy.peer_auth.mode is none: peers do not authenticate each other, and \
                 anyone who reaches the peer port is served public content (docs/tenancy.md)",
            );
        }
        PeerAuthMode::SharedKey => {
            let Some(path) = &auth.shared_key_file else {
                return Finding::fail(
                    ID,
                    "shared_key mode without shared_key_file",
                    same_everywhere,
                );
            };
            match SharedKey::from_file(path, &config.node.name, auth.token_ttl) {
                Ok(k) => Box::new(k.with_audience(auth.audience.clone())),
                Err(e) => {
                    return Finding::fail(
                        ID,
                        format!("{e}: this daemon can neither sign nor check peer tokens"),
                        same_everywhere,
                    );
                }
            }
        }
        PeerAuthMode::Kubernetes => Box::new(TokenFile::new(auth.token_file.clone())),
    };
    let token = match tokens.token().await {
        Ok(t) => t,
        Err(e) => {
            return Finding::fail(
                ID,
                format!("this node has no peer token: {e}; peers refuse every request from it"),
                "kubernetes mode: the pod needs the projected ServiceAccount token volume at \
                 tenancy.peer_auth.token_file (the chart mounts it when tenancy is enabled)",
            );
        }
    };
    let peer = match &flags.peer {
        Some(p) => match tokio::net::lookup_host(p.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(a) => a,
            None => {
                return Finding::fail(
                    ID,
                    format!("--peer {p}: not HOST:PORT"),
                    "pass --peer HOST:PORT",
                );
            }
        },
        None => match choose_peer(&config.routing).await {
            Some(a) => a,
            None => {
                return Finding::skip(
                    ID,
                    "no other node to ask (no bootstrap address other than this node's): pass \
                     --peer HOST:PORT, another node's peer endpoint",
                );
            }
        },
    };
    let client = match client(flags.timeout) {
        Ok(c) => c,
        Err(e) => return Finding::fail(ID, e, "report this as a bug"),
    };
    let url = format!("http://{peer}/v2/speculum-doctor/probe/blobs/{PROBE_DIGEST}");
    let with = client.get(&url).bearer_auth(&token).send().await;
    let without = client.get(&url).send().await;
    let status = |r: &Result<reqwest::Response, reqwest::Error>| match r {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(error_chain(e)),
    };
    judge_peer_auth(
        &peer.to_string(),
        status(&with),
        status(&without),
        same_everywhere,
    )
}

/// `peer.auth` from the statuses of the probe with and without this node's token. Pure.
pub(crate) fn judge_peer_auth(
    peer: &str,
    with_token: Result<u16, String>,
    without_token: Result<u16, String>,
    fix: &str,
) -> Finding {
    const ID: &str = "peer.auth";
    match (with_token, without_token) {
        (Err(e), _) => Finding::warn(
            ID,
            format!("could not reach the peer endpoint {peer}: {e}"),
            "check that the peer port (registry.peer_listen, routing.registry_port) is open \
             between nodes, or pass --peer HOST:PORT of a running daemon",
        ),
        (Ok(401), _) => Finding::fail(
            ID,
            format!(
                "{peer} refuses this node's token (401): peers will serve nothing to this node"
            ),
            fix,
        ),
        (Ok(with), Ok(401)) => Finding::ok(
            ID,
            format!(
                "{peer} accepts this node's token (HTTP {with} for a blob nobody has) and \
                 refuses a request without one (401)"
            ),
        ),
        (Ok(with), without) => Finding::warn(
            ID,
            format!(
                "{peer} accepts this node's token (HTTP {with}) but also answers a request \
                 without one ({}): its tenancy.peer_auth.mode is none",
                without.map_or_else(|e| e, |s| format!("HTTP {s}"))
            ),
            fix,
        ),
    }
}

// ------------------------------------------------------------------------------------------------
// Policy, grants, clock

/// `policy.bundle`: the bundle loads, compiles and its tests pass (what the daemon requires).
pub fn policy_bundle(cfg: &PolicyConfig) -> Finding {
    const ID: &str = "policy.bundle";
    if cfg.bundle.is_empty() {
        return Finding::skip(
            ID,
            "policy.bundle is not set: the built-in policy serves every image peer to peer",
        );
    }
    let dir = Path::new(&cfg.bundle);
    let test_fix = format!(
        "`speculum policy test {}` shows each test; fix the bundle (its ConfigMap in Kubernetes) \
         and the daemons reload it",
        dir.display()
    );
    let bundle = match Bundle::read(dir) {
        Ok(b) => b,
        Err(e) => {
            return Finding::fail(
                ID,
                format!(
                    "{e}: the daemon rejects it and serves nothing from peers until it is fixed"
                ),
                test_fix,
            );
        }
    };
    let results = match run_tests(&bundle, cfg.eval_timeout.max(Duration::from_secs(2))) {
        Ok(r) => r,
        Err(e) => {
            return Finding::fail(ID, format!("the bundle's tests do not run: {e}"), test_fix);
        }
    };
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{} ({})", r.name, r.detail))
        .collect();
    if !failed.is_empty() {
        return Finding::fail(
            ID,
            format!(
                "{} of {} tests of {} fail: {}. The daemon rejects a bundle whose tests fail",
                failed.len(),
                results.len(),
                dir.display(),
                failed.join(", ")
            ),
            test_fix,
        );
    }
    if let Err(e) = RegoPolicy::compile(&bundle, cfg.eval_timeout) {
        return Finding::fail(ID, format!("the bundle does not compile: {e}"), test_fix);
    }
    if results.is_empty() {
        return Finding::warn(
            ID,
            format!("{} loads but has no tests", dir.display()),
            "add *_test.rego tests (`speculum policy test` runs them; policies/ has examples)",
        );
    }
    Finding::ok(
        ID,
        format!(
            "{} loads and its {} tests pass (fingerprint {})",
            dir.display(),
            results.len(),
            bundle.fingerprint()
        ),
    )
}

/// `grants.keys`: the grant verification keys are there and parse.
pub(crate) fn grant_keys(cfg: &GrantsConfig) -> Finding {
    const ID: &str = "grants.keys";
    let Some(dir) = &cfg.keys_dir else {
        return Finding::skip(
            ID,
            "tenancy.grants.keys_dir is not set: no grant verifies, so images the policy marks \
             require_grant are never served peer to peer",
        );
    };
    let fix = format!(
        "mount the webhook's public keys (*.pem, the grant-keys ConfigMap) at {}",
        dir.display()
    );
    match speculum_grant::KeySet::load_dir(dir) {
        Ok(keys) if keys.is_empty() => Finding::fail(
            ID,
            format!("{} holds no *.pem key: no grant verifies", dir.display()),
            fix,
        ),
        Ok(keys) => Finding::ok(
            ID,
            format!(
                "{} keys in {} (kid {})",
                keys.len(),
                dir.display(),
                keys.kids().join(", ")
            ),
        ),
        Err(e) => Finding::fail(
            ID,
            format!(
                "grant keys in {} do not load: {e}; no grant verifies",
                dir.display()
            ),
            fix,
        ),
    }
}

/// `clock.skew` from the API server's `Date` and the local clock around the request. Pure.
/// Tokens and grants are checked against the clock: past 30 s, peer tokens and grants signed
/// elsewhere start to look expired or not yet valid here.
pub(crate) fn judge_skew(server: SystemTime, sent: SystemTime, received: SystemTime) -> Finding {
    const ID: &str = "clock.skew";
    let half = received.duration_since(sent).unwrap_or_default() / 2;
    let local = sent + half;
    let (skew, ahead) = match server.duration_since(local) {
        Ok(d) => (d, "behind"),
        Err(e) => (e.duration(), "ahead of"),
    };
    let secs = skew.as_secs_f64();
    let fix = "synchronise this node's clock (chrony/systemd-timesyncd against the same NTP \
               servers as the control plane)";
    // `Date` has one-second resolution: up to 2 s is noise.
    if secs <= 2.0 {
        Finding::ok(
            ID,
            format!("the clock is within {secs:.1}s of the API server's"),
        )
    } else if secs <= 30.0 {
        Finding::warn(
            ID,
            format!("this node's clock is {secs:.0}s {ahead} the API server's"),
            fix,
        )
    } else {
        Finding::fail(
            ID,
            format!(
                "this node's clock is {secs:.0}s {ahead} the API server's: peer tokens and \
                 grants look expired or not yet valid"
            ),
            fix,
        )
    }
}

/// `clock.skew`: the `Date` of a request to the API server: in a pod through the in-cluster
/// config, elsewhere through `$KUBECONFIG` when it is set.
pub(crate) async fn clock_skew(flags: &Flags) -> Finding {
    const ID: &str = "clock.skew";
    let config = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        match kube::Config::incluster() {
            Ok(c) => c,
            Err(e) => {
                return Finding::skip(
                    ID,
                    format!(
                        "no in-cluster config ({e}): the daemon pod mounts a ServiceAccount \
                         token only when tenancy is enabled"
                    ),
                );
            }
        }
    } else if std::env::var_os("KUBECONFIG").is_some() {
        match kube::Config::infer().await {
            Ok(c) => c,
            Err(e) => return Finding::skip(ID, format!("$KUBECONFIG does not load: {e}")),
        }
    } else {
        return Finding::skip(
            ID,
            "not running in a pod (no KUBERNETES_SERVICE_HOST) and no KUBECONFIG: compare \
             `date -u` with a trusted clock by hand",
        );
    };
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => return Finding::skip(ID, format!("no Kubernetes client: {e}")),
    };
    let request = match http::Request::get("/version").body(kube::client::Body::from(Vec::new())) {
        Ok(r) => r,
        Err(e) => return Finding::skip(ID, format!("building the request: {e}")),
    };
    let sent = SystemTime::now();
    let response = match tokio::time::timeout(flags.timeout, client.send(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Finding::warn(
                ID,
                format!("the API server did not answer: {e}"),
                "check the node's connection to the API server",
            );
        }
        Err(_) => {
            return Finding::warn(
                ID,
                format!("the API server did not answer within {:?}", flags.timeout),
                "check the node's connection to the API server",
            );
        }
    };
    let received = SystemTime::now();
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    match date {
        Some(server) => judge_skew(server, sent, received),
        None => Finding::skip(ID, "the API server's answer has no Date header"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;
    use crate::store::introspect::CriSource;

    fn facts(version: &str, path: Option<&str>, discard: Option<bool>) -> NodeFacts {
        NodeFacts {
            version: version.into(),
            content_root: None,
            registry_config_path: path.map(str::to_owned),
            discard_unpacked_layers: discard,
            cri_source: CriSource::PluginExports,
        }
    }

    #[test]
    fn config_path_table() {
        let certs = Path::new("/etc/containerd/certs.d");
        let file_v2 = FileSettings {
            version: 2,
            ..FileSettings::default()
        };
        let cases: Vec<(&str, NodeFacts, Option<FileSettings>, Status, &str)> = vec![
            (
                "set",
                facts("v2.4.2", Some("/etc/containerd/certs.d"), Some(false)),
                None,
                Status::Ok,
                "",
            ),
            (
                "unset",
                facts("v2.4.2", Some(""), Some(false)),
                None,
                Status::Fail,
                r#"[plugins."io.containerd.cri.v1.images".registry]"#,
            ),
            (
                "other",
                facts("1.6.20", Some("/etc/other"), Some(false)),
                None,
                Status::Fail,
                r#"[plugins."io.containerd.grpc.v1.cri".registry]"#,
            ),
            // A version 2 file on containerd 2.x: the fix names the table of the file.
            (
                "v2 file on 2.x",
                facts("v2.3.7", Some("/etc/other"), Some(false)),
                Some(file_v2),
                Status::Fail,
                r#"[plugins."io.containerd.grpc.v1.cri".registry]"#,
            ),
            (
                "unknown",
                facts("v2.3.7", None, None),
                None,
                Status::Warn,
                "--containerd-config",
            ),
            (
                "list on 2.x",
                facts(
                    "v2.4.2",
                    Some("/etc/containerd/certs.d:/etc/docker/certs.d"),
                    Some(false),
                ),
                None,
                Status::Warn,
                "config_path = \"/etc/containerd/certs.d\"",
            ),
            (
                "list on 1.x",
                facts(
                    "1.7.35",
                    Some("/etc/containerd/certs.d:/etc/docker/certs.d"),
                    Some(false),
                ),
                None,
                Status::Ok,
                "",
            ),
        ];
        for (name, f, file, status, fix) in cases {
            let got = judge_config_path(&f, &Source::Containerd, file.as_ref(), certs);
            assert_eq!(got.status, status, "{name}: {got:?}");
            assert!(got.fix.contains(fix), "{name}: {}", got.fix);
            if status != Status::Ok {
                assert!(
                    got.fix.contains("/etc/containerd/certs.d"),
                    "{name}: {}",
                    got.fix
                );
            }
        }
    }

    #[test]
    fn config_file_fills_in_what_containerd_does_not_say() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("config.toml");
        std::fs::write(
            &file,
            "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  discard_unpacked_layers = true\n",
        )
        .expect("write");
        let silent = NodeFacts {
            version: "v2.3.7".into(),
            ..NodeFacts::default()
        };
        let (got, source, settings) = effective_facts(silent.clone(), &file);
        assert_eq!(source, Source::File(file.clone()));
        // Unset on 2.x: the default list, which names the default certs.d.
        assert_eq!(
            got.registry_config_path.as_deref(),
            Some(containerd_config::DEFAULT_CONFIG_PATH_2X)
        );
        assert_eq!(got.discard_unpacked_layers, Some(true));
        assert_eq!(
            judge_discard(&got, &source, settings.as_ref()).status,
            Status::Fail
        );
        let (got, source, _) = effective_facts(silent.clone(), &tmp.path().join("missing"));
        assert!(
            matches!(source, Source::Unknown(ref why) if why.contains("not readable")),
            "{source:?}"
        );
        assert_eq!(got, silent);
        // What containerd says wins over the file.
        let said = facts("v2.4.2", Some("/x"), Some(false));
        let (got, source, _) = effective_facts(said.clone(), &file);
        assert_eq!((got, source), (said, Source::Containerd));
    }

    #[test]
    fn discard_table() {
        let cases = [
            (Some(true), Status::Fail),
            (Some(false), Status::Ok),
            (None, Status::Warn),
        ];
        for (discard, want) in cases {
            let got = judge_discard(
                &facts("v2.4.2", Some("/x"), discard),
                &Source::Containerd,
                None,
            );
            assert_eq!(got.status, want, "{discard:?}");
            if want != Status::Ok {
                assert!(
                    got.fix
                        .contains(r#"[plugins."io.containerd.cri.v1.images"]"#)
                        && got.fix.contains("discard_unpacked_layers = false"),
                    "{}",
                    got.fix
                );
            }
        }
    }

    #[test]
    fn readyz_table() {
        let cases = [
            (200, "containerd: ok\nlisteners: ok\n", Status::Ok, ""),
            (
                200,
                "containerd: ok\npolicy: bundle x@1\n",
                Status::Ok,
                "policy: bundle x@1",
            ),
            (
                503,
                "containerd: unreachable: refused\nrouting: ok\n",
                Status::Fail,
                "containerd: unreachable",
            ),
            (404, "", Status::Fail, "HTTP 404"),
        ];
        for (status, body, want, says) in cases {
            let got = judge_readyz(status, body);
            assert_eq!(got.status, want, "{status} {body:?}");
            assert!(got.summary.contains(says), "{}", got.summary);
            assert!(!got.summary.contains("routing: ok"), "{}", got.summary);
        }
    }

    #[test]
    fn metric_reads_unlabelled_samples_only_by_exact_name() {
        let text = "# HELP speculum_routing_peers x\n# TYPE speculum_routing_peers gauge\n\
                    speculum_routing_peers 2\nspeculum_routing_peers_unreachable_total 7\n\
                    speculum_ready 1\n";
        assert_eq!(metric(text, "speculum_routing_peers"), Some(2.0));
        assert_eq!(metric(text, "speculum_ready"), Some(1.0));
        assert_eq!(
            metric(text, "speculum_routing_handshake_failures_total"),
            None
        );
    }

    #[test]
    fn peers_table() {
        let routing = KademliaConfig::default();
        let cases = [
            (Some(2.0), None, Status::Ok, "DHT peers connected: 2"),
            (Some(0.0), None, Status::Warn, "no DHT peer"),
            (
                Some(0.0),
                Some(3.0),
                Status::Warn,
                "3 inbound DHT handshakes failed",
            ),
            (None, None, Status::Warn, "no speculum_routing_peers"),
        ];
        for (peers, failures, want, says) in cases {
            let got = judge_peers(peers, failures, &routing);
            assert_eq!(got.status, want, "{peers:?}");
            assert!(got.summary.contains(says), "{}", got.summary);
        }
    }

    #[test]
    fn peer_addr_skips_this_host_and_non_ip_addresses() {
        let local: IpAddr = "10.0.0.1".parse().expect("ip");
        let is_local = |ip: IpAddr| ip == local;
        let boot = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: Vec<(Vec<String>, Option<&str>)> = vec![
            (
                boot(&["/ip4/10.0.0.1/tcp/5082", "/ip4/10.0.0.2/tcp/5082"]),
                Some("10.0.0.2:5081"),
            ),
            (
                boot(&["/dns4/node-a/tcp/5082", "/ip6/fd00::2/tcp/5082"]),
                Some("[fd00::2]:5081"),
            ),
            (boot(&["/ip4/10.0.0.1/tcp/5082"]), None),
            (boot(&["/ip4/not-an-ip/tcp/5082", "garbage"]), None),
            (vec![], None),
        ];
        for (bootstrap, want) in cases {
            let got = peer_addr_of(&bootstrap, 5081, is_local).map(|a| a.to_string());
            assert_eq!(got.as_deref(), want, "{bootstrap:?}");
        }
    }

    #[test]
    fn peer_auth_table() {
        // (answer with our token, answer without one, want)
        type Case = (Result<u16, String>, Result<u16, String>, Status);
        let cases: Vec<Case> = vec![
            (Ok(404), Ok(401), Status::Ok),
            (Ok(401), Ok(401), Status::Fail),
            (Ok(404), Ok(404), Status::Warn),
            (Err("refused".into()), Err("refused".into()), Status::Warn),
        ];
        for (with, without, want) in cases {
            let got = judge_peer_auth("10.0.0.2:5081", with.clone(), without.clone(), "same key");
            assert_eq!(got.status, want, "{with:?} {without:?}");
        }
    }

    #[test]
    fn skew_table() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let rtt = Duration::from_millis(200);
        let cases = [
            (0i64, Status::Ok),
            (2, Status::Ok),
            (-10, Status::Warn),
            (20, Status::Warn),
            (90, Status::Fail),
            (-90, Status::Fail),
        ];
        for (offset, want) in cases {
            let server = if offset >= 0 {
                t0 + rtt / 2 + Duration::from_secs(offset as u64)
            } else {
                t0 + rtt / 2 - Duration::from_secs((-offset) as u64)
            };
            let got = judge_skew(server, t0, t0 + rtt);
            assert_eq!(got.status, want, "{offset}: {}", got.summary);
        }
    }

    #[test]
    fn local_addr_maps_unspecified_to_loopback() {
        let cases = [
            ("0.0.0.0:9402", "127.0.0.1:9402"),
            ("[::]:9402", "[::1]:9402"),
            ("10.1.2.3:9402", "10.1.2.3:9402"),
        ];
        for (addr, want) in cases {
            let got = local_addr(addr.parse().expect("addr"));
            assert_eq!(got.to_string(), want);
        }
    }

    #[test]
    fn content_store_table() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("io.containerd.content.v1.content");
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        std::fs::write(blobs.join("abc"), b"x").expect("blob");
        let missing = tmp.path().join("nope/io.containerd.content.v1.content");
        let not_yet = tmp.path().join("fresh");
        type Case<'a> = (&'a str, Option<&'a Path>, Option<&'a Path>, bool, Status);
        let cases: Vec<Case> = vec![
            ("readable", None, Some(&root), false, Status::Ok),
            ("no blobs yet", None, Some(&not_yet), false, Status::Ok),
            (
                "reported, not mounted",
                None,
                Some(&missing),
                false,
                Status::Warn,
            ),
            (
                "configured, missing",
                Some(&missing),
                Some(&missing),
                true,
                Status::Fail,
            ),
            ("unknown", None, None, false, Status::Warn),
        ];
        for (name, configured, in_use, explicit, want) in cases {
            let got = content_store(configured, in_use, explicit);
            assert_eq!(got.status, want, "{name}: {got:?}");
        }
    }

    #[test]
    fn hosts_files_table() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = HostsConfig {
            certs_dir: tmp.path().to_owned(),
            mirrored_registries: vec!["https://a.example".into(), "https://b.example".into()],
            ..HostsConfig::default()
        };
        let status = |cfg: &HostsConfig| -> Vec<Status> {
            hosts_files(cfg).iter().map(|f| f.status).collect()
        };
        assert_eq!(
            status(&cfg),
            [Status::Fail, Status::Fail],
            "nothing configured yet"
        );
        crate::hosts::configure(&cfg).expect("configure");
        assert_eq!(status(&cfg), [Status::Ok, Status::Ok], "after configure");
        let a = tmp.path().join("a.example/hosts.toml");
        let text = std::fs::read_to_string(&a).expect("read");
        std::fs::write(&a, text.replace("5080", "5999")).expect("edit");
        let got = hosts_files(&cfg);
        assert_eq!(got[0].status, Status::Fail);
        assert!(
            got[0].summary.contains("not what `configure` writes now"),
            "{}",
            got[0].summary
        );
        assert_eq!(got[0].subject.as_deref(), Some("a.example"));
        std::fs::write(&a, "server = \"https://a.example\"\n").expect("theirs");
        let got = hosts_files(&cfg);
        assert!(
            got[0].summary.contains("is not speculum's"),
            "{}",
            got[0].summary
        );
        std::fs::remove_file(tmp.path().join("b.example/hosts.toml")).expect("rm");
        let got = hosts_files(&cfg);
        assert!(
            got[1].summary.contains("does not exist"),
            "{}",
            got[1].summary
        );
        assert!(got[1].fix.contains("speculum configure"), "{}", got[1].fix);
    }

    #[test]
    fn private_network_table() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let good = tmp.path().join("swarm.key");
        std::fs::write(
            &good,
            crate::routing::psk::to_key_file(crate::routing::psk::generate()),
        )
        .expect("key");
        let bad = tmp.path().join("bad.key");
        std::fs::write(&bad, "not a key").expect("key");
        let cases = [
            (PathBuf::new(), Status::Warn),
            (good, Status::Ok),
            (bad, Status::Fail),
            (tmp.path().join("missing"), Status::Fail),
        ];
        for (psk_file, want) in cases {
            let routing = KademliaConfig {
                psk_file: psk_file.clone(),
                ..KademliaConfig::default()
            };
            let got = private_network(&routing);
            assert_eq!(got.status, want, "{psk_file:?}: {got:?}");
        }
    }
}
