//! `KademliaRouter`: the real router, a libp2p Kademlia DHT of provider records.
//!
//! One task owns the [`Swarm`] and `select!`s over commands from the router handles, swarm
//! events and timers; [`KademliaRouter`] is a cheap, cloneable channel handle to it. Bootstrap
//! sources and their retry schedule live in [`super::bootstrap`]; what to advertise is
//! decided by [`super::sync`]. `docs/routing.md` explains the design with its numbers.
//!
//! The wire: TCP + noise + yamux, with libp2p's private-network handshake between TCP and
//! noise when `psk_file` names a pre-shared key ([`super::psk`]); kad under our own protocol id `/speculum/kad/1.0.0`, forced
//! into server mode; identify (whose listen addresses we feed to kad: it does not do that by
//! itself); ping, whose failures close the connection; and `/speculum/has/1.0.0`, a tiny
//! request-response protocol that asks a provider "do you still hold this key?".
//!
//! A provider record only says a node held a key at some point. Before a lookup hands a peer
//! to the mirror, it asks that peer over `has`, on a live connection or one dialled for it,
//! within `verify_timeout`. So a dead, frozen or partitioned node, or a node that withdrew the
//! key, is never returned, however long its records linger in other nodes' stores. The peer's
//! IP comes from that connection ([`choose_ip`]); the port is the cluster-wide
//! `registry_port`. Records a peer gave us are dropped from our store when its last
//! connection closes, so stale records also stop being handed out; connections stay open
//! while the peer lives (idle timeout above the republish interval, ping every few seconds).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::RecordStore as _};
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PnetConfig;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, identify, noise, ping, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use super::bootstrap::{self, BootstrapConfig, Schedule, Target};
use super::claim::{self, Claim, ClaimTable};
use super::psk::{self, PreSharedKey, PskError};
use super::{Peer, Router, RouterError};

/// Kademlia protocol id: our own, so speculum never joins another libp2p DHT by accident.
pub const KAD_PROTOCOL: &str = "/speculum/kad/1.0.0";
/// The "do you still hold this key?" protocol.
pub const HAS_PROTOCOL: &str = "/speculum/has/1.0.0";
/// The "who fetches this key from upstream?" protocol (see [`super::claim`]).
pub const CLAIM_PROTOCOL: &str = "/speculum/claim/1.0.0";
const IDENTIFY_PROTOCOL: &str = "/speculum/id/1.0.0";
/// File name of the node's ed25519 key inside `data_dir`.
pub const IDENTITY_FILE: &str = "identity.key";

/// How many provider announcements run at once; the rest wait in a queue, so advertising
/// tens of thousands of blobs at start-up does not open tens of thousands of queries.
const MAX_PUBLISHING: usize = 32;
/// The first republish comes this soon after start (then every `republish_interval`). What a
/// node announces right after start-up lands on the closest nodes its routing table knew
/// *then*; while a whole DaemonSet starts at once those are often not the cluster's closest,
/// and lookups converging on the true closest find nothing until the next republish
/// (BENCHMARKS.md §3, the `SIM_REPUBLISH` runs: 140 → 200 of 200 lookups found). One early
/// republish, once the tables have settled, costs one more announcement of each key per start.
const EARLY_REPUBLISH: Duration = Duration::from_secs(120);
/// A peer whose `has` request failed is not asked again for this long (unless it reconnects).
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);
/// How often lookups past their deadline are ended.
const HOUSEKEEPING: Duration = Duration::from_millis(200);
/// How long graceful shutdown waits for connections to close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most peers one lookup returns, whatever `limit` asks: the channel has room for all of them.
const MAX_LOOKUP_LIMIT: usize = 256;
/// How long `start` waits for the listener to report its bound address.
const LISTEN_WAIT: Duration = Duration::from_secs(10);
/// Failed inbound handshakes (an outsider without the key, a port scanner) are logged at most
/// this often, with the count since the last line; the counter metric has every one.
const HANDSHAKE_WARN_EVERY: Duration = Duration::from_secs(60);

/// The `routing` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KademliaConfig {
    /// Multiaddr the DHT listens on (`/ip4|ip6/<ip>/tcp/<port>`; port 0 picks one).
    pub listen: String,
    /// Cluster-wide port of the peer registry endpoint: a found peer is `<its IP>:registry_port`.
    pub registry_port: u16,
    /// Where `identity.key` lives.
    pub data_dir: PathBuf,
    pub bootstrap: BootstrapConfig,
    /// How long other nodes keep a provider record of ours without a republish.
    #[serde(with = "humantime_serde")]
    pub provider_ttl: Duration,
    /// How often every advertised key is announced again.
    #[serde(with = "humantime_serde")]
    pub republish_interval: Duration,
    /// Time between pings on every connection.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A ping unanswered this long closes the connection.
    #[serde(with = "humantime_serde")]
    pub ping_timeout: Duration,
    /// Bound for establishing a connection (TCP + noise + yamux).
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Bound for a provider to answer "do you still hold this key?".
    #[serde(with = "humantime_serde")]
    pub verify_timeout: Duration,
    /// Bound for a whole lookup; its channel closes by then.
    #[serde(with = "humantime_serde")]
    pub lookup_timeout: Duration,
    /// Most distinct keys the local record store holds (ours and other nodes').
    pub max_keys: usize,
    /// The private network's pre-shared key (go-libp2p `swarm.key` format, or one line of 64
    /// hex digits). Empty: a public DHT that anyone who reaches `listen` can join.
    pub psk_file: PathBuf,
}

impl Default for KademliaConfig {
    fn default() -> Self {
        KademliaConfig {
            listen: "/ip4/0.0.0.0/tcp/5082".to_owned(),
            registry_port: 5081,
            data_dir: PathBuf::from("/var/lib/speculum"),
            bootstrap: BootstrapConfig::default(),
            provider_ttl: Duration::from_secs(2 * 3600),
            republish_interval: Duration::from_secs(30 * 60),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(5),
            verify_timeout: Duration::from_secs(2),
            lookup_timeout: Duration::from_secs(10),
            max_keys: 1_000_000,
            psk_file: PathBuf::new(),
        }
    }
}

impl KademliaConfig {
    /// Every problem with this section, each naming its field.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = listen_addr(&self.listen) {
            errors.push(format!("routing.listen: {e}"));
        }
        if self.registry_port == 0 {
            errors.push("routing.registry_port: must not be 0".to_owned());
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("routing.data_dir: must not be empty".to_owned());
        }
        errors.extend(self.bootstrap.validate());
        for (name, d) in [
            ("provider_ttl", self.provider_ttl),
            ("republish_interval", self.republish_interval),
            ("ping_interval", self.ping_interval),
            ("ping_timeout", self.ping_timeout),
            ("dial_timeout", self.dial_timeout),
            ("verify_timeout", self.verify_timeout),
            ("lookup_timeout", self.lookup_timeout),
        ] {
            if d.is_zero() {
                errors.push(format!("routing.{name}: must be greater than zero"));
            }
        }
        if self.republish_interval >= self.provider_ttl {
            errors.push(
                "routing.republish_interval: must be shorter than provider_ttl, or records \
                 expire before they are renewed"
                    .to_owned(),
            );
        }
        // A connection to a dead peer must close well inside the 60 s promise of the seam.
        if self.ping_interval + self.ping_timeout > Duration::from_secs(30) {
            errors.push("routing.ping_interval + ping_timeout: must not exceed 30s".to_owned());
        }
        if self.verify_timeout >= self.lookup_timeout {
            errors.push("routing.verify_timeout: must be shorter than lookup_timeout".to_owned());
        }
        if self.max_keys == 0 {
            errors.push("routing.max_keys: must be greater than zero".to_owned());
        }
        // The key file itself is read when the router starts (`start` refuses a bad one before
        // the node joins anything): `configure`, `cleanup` and `config` run where the Secret
        // may not be mounted, and must not fail on it.
        errors
    }

    /// The pre-shared key `psk_file` names, if any.
    pub fn psk(&self) -> Result<Option<PreSharedKey>, PskError> {
        if self.psk_file.as_os_str().is_empty() {
            return Ok(None);
        }
        psk::load(&self.psk_file).map(Some)
    }

    /// Connections close after this long without traffic. Longer than the republish interval,
    /// so a provider's connections to the nodes storing its records never idle out while it
    /// lives (republishing is traffic), and a closed connection means a gone peer.
    fn idle_timeout(&self) -> Duration {
        self.republish_interval * 2 + Duration::from_secs(60)
    }
}

fn listen_addr(s: &str) -> Result<Multiaddr, &'static str> {
    let addr: Multiaddr = s.parse().map_err(|_| "not a multiaddr")?;
    let mut parts = addr.iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Protocol::Ip4(_) | Protocol::Ip6(_)), Some(Protocol::Tcp(_)), None) => Ok(addr),
        _ => Err("want /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port>"),
    }
}

/// Why the Kademlia router could not start.
#[derive(Debug, thiserror::Error)]
pub enum KademliaError {
    #[error("invalid routing configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("reading or writing identity key {path} failed")]
    IdentityIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity key {path} is corrupt ({reason}); remove it to start with a new peer id")]
    IdentityCorrupt { path: PathBuf, reason: String },
    #[error("building the libp2p stack failed: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error(transparent)]
    Psk(#[from] PskError),
}

/// The DHT key of a routing key: sha256 of the string, so keys are uniform and 32 bytes long
/// whatever the tag or digest looks like.
pub fn record_key(key: &str) -> kad::RecordKey {
    kad::RecordKey::new(&Sha256::digest(key.as_bytes()))
}

/// Loads the node's ed25519 key from `<data_dir>/identity.key`, creating it (mode 0600) on
/// first start. A file that does not decode is an error, never silently replaced: a new key
/// is a new peer id, and other nodes would hold records for a node that no longer exists.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, KademliaError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| KademliaError::IdentityIo {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => return decode_identity(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| KademliaError::Build(format!("encoding identity key: {e}")))?;
    let tmp = data_dir.join(format!(".{IDENTITY_FILE}.{}.tmp", std::process::id()));
    // Left over by a crash of a process that had our pid: it was never linked, so drop it.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        // A link, unlike a rename, never replaces: if another process created the key in the
        // meantime, its key wins and we read it below.
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            // Make the new directory entry durable before the peer id is announced.
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            info!(path = %path.display(), "created a new identity key");
            Ok(keypair)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(&path).map_err(io)?;
            decode_identity(&path, &bytes)
        }
        Err(e) => Err(io(e)),
    }
}

fn decode_identity(path: &Path, bytes: &[u8]) -> Result<Keypair, KademliaError> {
    Keypair::from_protobuf_encoding(bytes).map_err(|e| KademliaError::IdentityCorrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Picks the IP a peer's registry endpoint is reached at, from what we know of it:
/// - an address we dialled and reached is certainly theirs;
/// - otherwise the source IP of their connection to us, if they list it as a listen address
///   (the usual case: one node, one IP);
/// - otherwise one of their listen IPs of the same family and scope as that source (a node
///   with several addresses, or several nodes sharing a loopback source as in tests);
/// - otherwise the source IP itself.
pub fn choose_ip(
    dialled: Option<IpAddr>,
    source: Option<IpAddr>,
    listen: &[IpAddr],
) -> Option<IpAddr> {
    if dialled.is_some() {
        return dialled;
    }
    let Some(source) = source else {
        return listen.first().copied();
    };
    if listen.is_empty() || listen.contains(&source) {
        return Some(source);
    }
    listen
        .iter()
        .find(|ip| ip.is_ipv4() == source.is_ipv4() && ip.is_loopback() == source.is_loopback())
        .copied()
        .or(Some(source))
}

#[derive(Debug, Serialize, Deserialize)]
struct HasRequest {
    key: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct HasResponse {
    has: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClaimRequest {
    key: String,
    ttl_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClaimResponse {
    /// Peer id of the node that fetches the key.
    winner: String,
    /// The coordinator's view of the winner's IP, for a claimant that does not know it.
    #[serde(default)]
    ip: Option<IpAddr>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    has: request_response::json::Behaviour<HasRequest, HasResponse>,
    claim: request_response::json::Behaviour<ClaimRequest, ClaimResponse>,
}

impl Behaviour {
    fn new(key: &Keypair, config: &KademliaConfig) -> Behaviour {
        let peer_id = key.public().to_peer_id();
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config
            .set_query_timeout(config.lookup_timeout)
            .set_provider_record_ttl(Some(config.provider_ttl))
            // We republish ourselves, from a queue with bounded concurrency (see
            // `Node::pump_publish`), instead of kad's job that starts every query at once.
            .set_provider_publication_interval(None)
            // We use provider records only; value records are neither kept nor replicated.
            .set_record_ttl(None)
            .set_replication_interval(None)
            .set_publication_interval(None)
            // Inbound provider records come to us first, so we know who gave which record and
            // can drop them when that peer goes away.
            .set_record_filtering(kad::StoreInserts::FilterBoth);
        let store_config = kad::store::MemoryStoreConfig {
            max_records: 1,
            max_value_bytes: 0,
            // Counts every distinct key in the store, other nodes' included.
            max_provided_keys: config.max_keys,
            max_providers_per_key: kad::K_VALUE.get(),
        };
        let store = kad::store::MemoryStore::with_config(peer_id, store_config);
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Every node answers queries; kad would otherwise wait for a confirmed external
        // address, which nothing in a cluster ever confirms.
        kad.set_mode(Some(kad::Mode::Server));

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                .with_agent_version(format!("speculum/{}", env!("CARGO_PKG_VERSION"))),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.ping_interval)
                .with_timeout(config.ping_timeout),
        );
        let codec = request_response::json::codec::Codec::default()
            .set_request_size_maximum(8 * 1024)
            .set_response_size_maximum(1024);
        let has = request_response::json::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(HAS_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(config.verify_timeout),
        );
        let claim = request_response::json::Behaviour::with_codec(
            request_response::json::codec::Codec::default()
                .set_request_size_maximum(8 * 1024)
                .set_response_size_maximum(1024),
            [(StreamProtocol::new(CLAIM_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(config.verify_timeout),
        );
        Behaviour {
            kad,
            identify,
            ping,
            has,
            claim,
        }
    }
}

/// State shared between the swarm task and the handles, read without a round trip.
struct Shared {
    peer_id: PeerId,
    ready: AtomicBool,
    peers: AtomicUsize,
    advertised: AtomicUsize,
    handshake_failures: AtomicU64,
    /// Peers given up on while connected: silent on ping, or failing a `has` request.
    declared_unreachable: AtomicU64,
    // A std Mutex: it is never held across an `.await`.
    listen_addrs: Mutex<Vec<Multiaddr>>,
    lookup_costs: Mutex<LookupCosts>,
}

/// What one lookup's kad walk cost, from kad's `QueryStats` (benches/dht_sim.rs reads these
/// through [`KademliaRouter::take_lookup_costs`] to measure hops as a cluster grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupCost {
    /// Requests (peers contacted) until the walk first returned a provider; `None` if it never did.
    pub requests_to_first_provider: Option<u32>,
    /// Requests over the whole walk (it stops early once the lookup has its peers).
    pub requests: u32,
    /// Of those, requests that were answered.
    pub successes: u32,
}

/// Finished lookups' costs, newest last; bounded so an unread log cannot grow.
#[derive(Default)]
struct LookupCosts {
    first: HashMap<kad::QueryId, u32>,
    done: VecDeque<LookupCost>,
}

impl LookupCosts {
    const KEEP: usize = 10_000;

    fn progressed(&mut self, id: kad::QueryId, found: bool, stats: &kad::QueryStats, last: bool) {
        if found {
            self.first.entry(id).or_insert(stats.num_requests());
        }
        if last {
            if self.done.len() == Self::KEEP {
                self.done.pop_front();
            }
            self.done.push_back(LookupCost {
                requests_to_first_provider: self.first.remove(&id),
                requests: stats.num_requests(),
                successes: stats.num_successes(),
            });
        }
    }
}

enum Command {
    Lookup {
        key: String,
        limit: usize,
        tx: mpsc::Sender<Peer>,
    },
    Advertise(Vec<String>),
    Withdraw(Vec<String>),
    Claim {
        key: String,
        ttl: Duration,
        tx: tokio::sync::oneshot::Sender<Result<Claim, RouterError>>,
    },
}

/// Handle to the Kademlia swarm task. Cheap to clone.
#[derive(Clone)]
pub struct KademliaRouter {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// Starts the router: loads the identity, binds the listener and spawns the task that owns
/// the swarm. Returns once the listener is bound (a lone node is ready then). The task runs
/// until `shutdown` completes, then stops providing, closes its connections and ends.
pub async fn start<S>(
    config: KademliaConfig,
    shutdown: S,
) -> Result<(KademliaRouter, JoinHandle<Result<(), RouterError>>), KademliaError>
where
    S: Future<Output = ()> + Send + 'static,
{
    let errors = config.validate();
    if !errors.is_empty() {
        return Err(KademliaError::Config(errors));
    }
    let keypair = load_or_create_identity(&config.data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let psk = config.psk()?;
    match &psk {
        // The fingerprint tells operators two nodes hold the same key; the key never leaves.
        Some(key) => info!(psk.fingerprint = %key.fingerprint(), "routing is a private network"),
        None => warn!(
            "routing.psk_file is empty: anyone who reaches the DHT port can join the routing \
             mesh and learn which node holds which content"
        ),
    }
    let mut swarm = build_swarm(keypair, psk, &config)?;
    let listen = listen_addr(&config.listen).map_err(|reason| KademliaError::Listen {
        addr: config.listen.clone(),
        reason: reason.to_owned(),
    })?;
    let listener = swarm.listen_on(listen).map_err(|e| KademliaError::Listen {
        addr: config.listen.clone(),
        reason: e.to_string(),
    })?;
    let first = await_listening(&mut swarm, &config.listen).await?;
    info!(peer.id = %peer_id, address = %first, "routing listening");

    let shared = Arc::new(Shared {
        peer_id,
        ready: AtomicBool::new(true),
        peers: AtomicUsize::new(0),
        advertised: AtomicUsize::new(0),
        handshake_failures: AtomicU64::new(0),
        declared_unreachable: AtomicU64::new(0),
        listen_addrs: Mutex::new(vec![first]),
        lookup_costs: Mutex::default(),
    });
    let (tx, rx) = mpsc::channel(1024);
    let node = Node::new(swarm, config, shared.clone(), rx, listener);
    let task = tokio::spawn(node.run(shutdown));
    Ok((
        KademliaRouter {
            commands: tx,
            shared,
        },
        task,
    ))
}

/// TCP → (private-network handshake, with a key) → noise → yamux.
fn build_swarm(
    keypair: Keypair,
    psk: Option<PreSharedKey>,
    config: &KademliaConfig,
) -> Result<Swarm<Behaviour>, KademliaError> {
    let build = |e: &dyn std::fmt::Display| KademliaError::Build(e.to_string());
    Ok(SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            // The pnet handshake only exchanges nonces; with a different key (or none) the
            // next bytes are garbage to the other side, so multistream-select or noise fails
            // and the connection never reaches kad.
            let base = match psk {
                Some(psk) => either::Either::Left(
                    tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)),
                ),
                None => either::Either::Right(tcp),
            };
            let noise = noise::Config::new(key)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
            Ok(base
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| build(&e))?
        .with_behaviour(|key| Behaviour::new(key, config))
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout()))
        .with_connection_timeout(config.dial_timeout)
        .build())
}

/// Waits for the listener's first bound address: with port 0 the port is only known then.
async fn await_listening(
    swarm: &mut Swarm<Behaviour>,
    addr: &str,
) -> Result<Multiaddr, KademliaError> {
    let failed = |reason: String| KademliaError::Listen {
        addr: addr.to_owned(),
        reason,
    };
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => return Ok(address),
                SwarmEvent::ListenerError { error, .. } => return Err(failed(error.to_string())),
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(failed(format!("listener closed: {reason:?}")));
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(LISTEN_WAIT, wait)
        .await
        .map_err(|_| failed(format!("no bound address within {LISTEN_WAIT:?}")))?
}

impl KademliaRouter {
    /// This node's libp2p peer id (the `Peer::id` other nodes see).
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// The addresses the DHT listener is bound to (actual ports, also when configured as 0).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.shared
            .listen_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Number of peers with an open connection (metric `speculum_routing_peers`).
    pub fn peer_count(&self) -> usize {
        self.shared.peers.load(Ordering::Relaxed)
    }

    /// Inbound connections that failed before the peer was authenticated: without the
    /// pre-shared key, an outsider's attempts end here (metric
    /// `speculum_routing_handshake_failures_total`).
    pub fn handshake_failures(&self) -> u64 {
        self.shared.handshake_failures.load(Ordering::Relaxed)
    }

    /// How often a peer was marked unreachable — its connection went silent (ping) or it did
    /// not answer a `has` request — and so left out of lookups for a while (metric
    /// `speculum_routing_peers_unreachable_total`). A busy or flapping network shows here
    /// before it shows as mirror misses.
    pub fn declared_unreachable(&self) -> u64 {
        self.shared.declared_unreachable.load(Ordering::Relaxed)
    }

    /// Number of keys this node advertises (metric `speculum_routing_advertised_keys`).
    pub fn advertised_count(&self) -> usize {
        self.shared.advertised.load(Ordering::Relaxed)
    }

    /// The kad cost of every lookup finished since the last call (at most the last 10,000).
    pub fn take_lookup_costs(&self) -> Vec<LookupCost> {
        let mut costs = self
            .shared
            .lookup_costs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        costs.done.drain(..).collect()
    }

    async fn send(&self, command: Command) -> Result<(), RouterError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| RouterError::Closed)
    }
}

#[async_trait]
impl Router for KademliaRouter {
    fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed) && !self.commands.is_closed()
    }

    async fn lookup(&self, key: &str, limit: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        // Room for every peer the lookup may send: the task never waits on a slow reader.
        let limit = limit.min(MAX_LOOKUP_LIMIT);
        let (tx, rx) = mpsc::channel(limit.max(1));
        self.send(Command::Lookup {
            key: key.to_owned(),
            limit,
            tx,
        })
        .await?;
        Ok(rx)
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.send(Command::Advertise(keys)).await
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.send(Command::Withdraw(keys)).await
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim, RouterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Claim {
            key: key.to_owned(),
            ttl,
            tx,
        })
        .await?;
        rx.await.map_err(|_| RouterError::Closed)?
    }
}

/// One open connection.
struct Conn {
    peer: PeerId,
    /// When the peer last answered a ping on this connection (or when it opened).
    last_pong: Instant,
    /// The remote address: where we dialled, or the peer's source address.
    addr: Multiaddr,
    ip: Option<IpAddr>,
    /// We dialled it, so `addr` is an address the peer listens on.
    dialled: bool,
}

/// A lookup in progress: kad finds candidate providers, `has` verifies them one by one.
struct Lookup {
    key: String,
    tx: mpsc::Sender<Peer>,
    limit: usize,
    sent: usize,
    seen: HashSet<PeerId>,
    candidates: VecDeque<PeerId>,
    verifying: usize,
    query_done: bool,
    deadline: Instant,
}

impl Lookup {
    fn finished(&self) -> bool {
        self.sent >= self.limit
            || self.tx.is_closed()
            || (self.query_done && self.candidates.is_empty() && self.verifying == 0)
    }
}

/// The swarm task's state. Only `run` and the small `on_*` functions touch it.
struct Node {
    swarm: Swarm<Behaviour>,
    config: KademliaConfig,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    listener: libp2p::core::transport::ListenerId,
    shutting_down: bool,

    advertised: HashSet<String>,
    publish_queue: VecDeque<String>,
    queued: HashSet<String>,
    publishing: HashSet<kad::QueryId>,

    lookups: HashMap<kad::QueryId, Lookup>,
    verifying: HashMap<OutboundRequestId, (kad::QueryId, PeerId)>,

    conns: HashMap<ConnectionId, Conn>,
    /// Listen addresses peers told us through identify.
    peer_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Keys of the provider records each peer gave us, to drop them when it goes.
    given: HashMap<PeerId, HashSet<kad::RecordKey>>,
    unreachable: HashMap<PeerId, Instant>,
    routing_table_empty: bool,

    /// Claims on keys this node coordinates.
    claims: ClaimTable,
    /// Our claims sent to a coordinator, awaiting its answer.
    claiming: HashMap<OutboundRequestId, tokio::sync::oneshot::Sender<Result<Claim, RouterError>>>,

    schedule: Schedule,
    resolving: bool,
    lost_all_peers: bool,
    resolved_tx: mpsc::Sender<Vec<Target>>,
    resolved_rx: mpsc::Receiver<Vec<Target>>,

    /// When a failed inbound handshake was last logged, and how many failed since.
    handshake_warned: Option<Instant>,
    handshake_unlogged: u64,
}

impl Node {
    fn new(
        swarm: Swarm<Behaviour>,
        config: KademliaConfig,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        listener: libp2p::core::transport::ListenerId,
    ) -> Node {
        let (resolved_tx, resolved_rx) = mpsc::channel(1);
        Node {
            swarm,
            schedule: Schedule::new(&config.bootstrap),
            config,
            shared,
            commands,
            listener,
            shutting_down: false,
            advertised: HashSet::new(),
            publish_queue: VecDeque::new(),
            queued: HashSet::new(),
            publishing: HashSet::new(),
            lookups: HashMap::new(),
            verifying: HashMap::new(),
            conns: HashMap::new(),
            peer_addrs: HashMap::new(),
            given: HashMap::new(),
            unreachable: HashMap::new(),
            routing_table_empty: true,
            claims: ClaimTable::new(),
            claiming: HashMap::new(),
            resolving: false,
            lost_all_peers: false,
            resolved_tx,
            resolved_rx,
            handshake_warned: None,
            handshake_unlogged: 0,
        }
    }

    async fn run<S>(mut self, shutdown: S) -> Result<(), RouterError>
    where
        S: Future<Output = ()> + Send + 'static,
    {
        tokio::pin!(shutdown);
        // The first bootstrap round starts right away.
        let bootstrap_timer: Sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(bootstrap_timer);
        let republish_every = self.config.republish_interval;
        let mut republish = tokio::time::interval_at(
            Instant::now() + EARLY_REPUBLISH.min(republish_every),
            republish_every,
        );
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;

        loop {
            tokio::select! {
                () = &mut shutdown => break,
                command = self.commands.recv(), if commands_open => match command {
                    Some(command) => self.on_command(command),
                    // Every handle is gone; the node keeps serving the DHT until shutdown.
                    None => commands_open = false,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                // Re-armed when the round's addresses arrive.
                () = &mut bootstrap_timer, if !self.resolving => self.start_bootstrap_round(),
                Some(targets) = self.resolved_rx.recv() => {
                    self.resolving = false;
                    self.dial(targets);
                    let delay = self.schedule.next(self.swarm.connected_peers().next().is_some());
                    bootstrap_timer.as_mut().reset(Instant::now() + delay);
                }
                _ = republish.tick() => self.republish(),
                _ = housekeeping.tick() => self.housekeeping(),
            }
            if std::mem::take(&mut self.lost_all_peers) && !self.resolving {
                // Alone again: look for peers on the backoff schedule, not a full interval later.
                let delay = self.schedule.next(false);
                bootstrap_timer.as_mut().reset(Instant::now() + delay);
            }
            self.pump_publish();
        }
        self.shutdown().await;
        Ok(())
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Lookup { key, limit, tx } => self.start_lookup(key, limit, tx),
            Command::Claim { key, ttl, tx } => self.start_claim(key, ttl, tx),
            Command::Advertise(keys) => {
                for key in keys {
                    if self.advertised.insert(key.clone()) {
                        self.enqueue(key);
                    }
                }
            }
            Command::Withdraw(keys) => {
                for key in keys {
                    if self.advertised.remove(&key) {
                        // Local only in kad; other nodes learn it from our `has` answer.
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .stop_providing(&record_key(&key));
                    }
                }
            }
        }
        self.shared
            .advertised
            .store(self.advertised.len(), Ordering::Relaxed);
    }

    fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.publish_queue.push_back(key);
        }
    }

    /// Announces queued keys, at most `MAX_PUBLISHING` at a time.
    fn pump_publish(&mut self) {
        while self.publishing.len() < MAX_PUBLISHING {
            let Some(key) = self.publish_queue.pop_front() else {
                return;
            };
            self.queued.remove(&key);
            if !self.advertised.contains(&key) {
                continue; // withdrawn while queued
            }
            match self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(record_key(&key))
            {
                Ok(id) => {
                    self.publishing.insert(id);
                }
                Err(e) => warn!(key = %key, error = %e, "cannot advertise key"),
            }
        }
    }

    fn republish(&mut self) {
        let keys: Vec<String> = self.advertised.iter().cloned().collect();
        for key in keys {
            self.enqueue(key);
        }
        self.prune_given();
    }

    /// Forgets index entries whose record expired or was replaced, so the index does not grow
    /// with keys a long-lived peer advertised once.
    fn prune_given(&mut self) {
        let now = std::time::Instant::now();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        for (peer, keys) in self.given.iter_mut() {
            keys.retain(|k| {
                store
                    .providers(k)
                    .iter()
                    .any(|r| r.provider == *peer && !r.is_expired(now))
            });
        }
        self.given.retain(|_, keys| !keys.is_empty());
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let expired: Vec<kad::QueryId> = self
            .lookups
            .iter()
            .filter(|(_, l)| l.deadline <= now || l.tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.end_lookup(id);
        }
        self.unreachable
            .retain(|_, at| now.duration_since(*at) < UNREACHABLE_FOR);
        self.close_silent_connections();
        // A publish whose query kad no longer knows will never report back.
        let kad = &self.swarm.behaviour().kad;
        self.publishing.retain(|id| kad.query(id).is_some());
    }

    // ----- lookups -----

    fn start_lookup(&mut self, key: String, limit: usize, tx: mpsc::Sender<Peer>) {
        if limit == 0 || self.shutting_down {
            return; // dropping `tx` ends the lookup empty
        }
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(record_key(&key));
        self.lookups.insert(
            id,
            Lookup {
                key,
                tx,
                limit,
                sent: 0,
                seen: HashSet::new(),
                candidates: VecDeque::new(),
                verifying: 0,
                query_done: false,
                deadline: Instant::now() + self.config.lookup_timeout,
            },
        );
    }

    fn on_providers(&mut self, id: kad::QueryId, providers: HashSet<PeerId>) {
        let local = self.shared.peer_id;
        let connected: HashSet<PeerId> = self.conns.values().map(|c| c.peer).collect();
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return;
        };
        for p in providers {
            if p == local || !lookup.seen.insert(p) {
                continue;
            }
            // Connected providers first: they answer in one round trip, without a dial.
            if connected.contains(&p) {
                lookup.candidates.push_front(p);
            } else {
                lookup.candidates.push_back(p);
            }
        }
        self.pump_lookup(id);
    }

    /// Sends `has` requests to candidates, no more at once than peers still wanted, and ends
    /// the lookup when it is complete.
    fn pump_lookup(&mut self, id: kad::QueryId) {
        let Some(mut lookup) = self.lookups.remove(&id) else {
            return;
        };
        while lookup.sent + lookup.verifying < lookup.limit {
            let Some(peer) = lookup.candidates.pop_front() else {
                break;
            };
            if self.unreachable.contains_key(&peer) {
                continue;
            }
            let addrs = self.dial_addrs(&peer, &lookup.key);
            let request = HasRequest {
                key: lookup.key.clone(),
            };
            let req = self
                .swarm
                .behaviour_mut()
                .has
                .send_request_with_addresses(&peer, request, addrs);
            self.verifying.insert(req, (id, peer));
            lookup.verifying += 1;
        }
        self.lookups.insert(id, lookup);
        if self.lookups.get(&id).is_some_and(Lookup::finished) {
            self.end_lookup(id);
        }
    }

    /// Drops the lookup (closing its channel) and stops its kad query if still running.
    fn end_lookup(&mut self, id: kad::QueryId) {
        if self.lookups.remove(&id).is_some()
            && let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id)
        {
            query.finish();
        }
    }

    /// Addresses to dial `peer` at if it is not connected: what it told us through identify
    /// and what its provider record carries (kad adds its routing-table entries itself).
    fn dial_addrs(&mut self, peer: &PeerId, key: &str) -> Vec<Multiaddr> {
        let mut addrs = self.peer_addrs.get(peer).cloned().unwrap_or_default();
        let records = self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .providers(&record_key(key));
        for r in records.into_iter().filter(|r| r.provider == *peer) {
            for a in r.addresses {
                if ip_tcp(&a).is_some() && !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        addrs
    }

    fn on_has_event(&mut self, event: request_response::Event<HasRequest, HasResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let has = !self.shutting_down && self.advertised.contains(&request.key);
                // Fails only when the asker is gone already.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .has
                    .send_response(channel, HasResponse { has });
            }
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
            } => self.on_verified(request_id, peer, connection_id, response.has),
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(peer.id = %peer, error = %error, "provider did not answer has");
                self.mark_unreachable(peer);
                if let Some((id, _)) = self.verifying.remove(&request_id) {
                    if let Some(lookup) = self.lookups.get_mut(&id) {
                        lookup.verifying -= 1;
                    }
                    self.pump_lookup(id);
                }
            }
            Event::InboundFailure { .. } | Event::ResponseSent { .. } => {}
        }
    }

    fn on_verified(
        &mut self,
        request: OutboundRequestId,
        peer: PeerId,
        via: ConnectionId,
        has: bool,
    ) {
        let Some((id, _)) = self.verifying.remove(&request) else {
            return;
        };
        let ip = self.peer_ip(&peer, via);
        let port = self.config.registry_port;
        let Some(lookup) = self.lookups.get_mut(&id) else {
            return; // the lookup ended meanwhile
        };
        lookup.verifying -= 1;
        match (has, ip) {
            (true, Some(ip)) if lookup.sent < lookup.limit => {
                let found = Peer {
                    id: peer.to_string(),
                    addr: SocketAddr::new(ip, port),
                };
                if lookup.tx.try_send(found).is_ok() {
                    lookup.sent += 1;
                }
            }
            (true, None) => debug!(peer.id = %peer, "provider has no known IP"),
            _ => {}
        }
        self.pump_lookup(id);
    }

    /// See [`choose_ip`].
    fn peer_ip(&self, peer: &PeerId, via: ConnectionId) -> Option<IpAddr> {
        let of_peer = || self.conns.values().filter(|c| c.peer == *peer);
        let dialled = of_peer().filter(|c| c.dialled).find_map(|c| c.ip);
        let source = self
            .conns
            .get(&via)
            .and_then(|c| c.ip)
            .or_else(|| of_peer().find_map(|c| c.ip));
        let listen: Vec<IpAddr> = self
            .peer_addrs
            .get(peer)
            .map(|addrs| {
                addrs
                    .iter()
                    .filter_map(|a| ip_tcp(a).map(|(ip, _)| ip))
                    .collect()
            })
            .unwrap_or_default();
        choose_ip(dialled, source, &listen)
    }

    // ----- claims (who fetches a key from upstream) -----

    /// Every speculum node we know of, ourselves included: the routing table plus the peers
    /// identify told us about.
    fn known_nodes(&mut self) -> Vec<PeerId> {
        let mut ids: HashSet<PeerId> = self.peer_addrs.keys().copied().collect();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                ids.insert(*entry.node.key.preimage());
            }
        }
        ids.insert(self.shared.peer_id);
        ids.into_iter().collect()
    }

    fn start_claim(
        &mut self,
        key: String,
        ttl: Duration,
        tx: tokio::sync::oneshot::Sender<Result<Claim, RouterError>>,
    ) {
        let me = self.shared.peer_id;
        let nodes: Vec<String> = self.known_nodes().iter().map(|p| p.to_string()).collect();
        let coordinator = claim::coordinator(&key, nodes.iter().map(String::as_str))
            .and_then(|c| c.parse::<PeerId>().ok())
            .unwrap_or(me);
        if coordinator == me {
            let winner = self
                .claims
                .decide(&key, &me.to_string(), ttl, std::time::Instant::now());
            let answer = self.claim_answer(&winner, None);
            let _ = tx.send(answer);
            return;
        }
        debug!(peer.id = %coordinator, key = %key, "asking the coordinator who fetches");
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let req = self
            .swarm
            .behaviour_mut()
            .claim
            .send_request(&coordinator, ClaimRequest { key, ttl_ms });
        self.claiming.insert(req, tx);
    }

    /// Turns a winner's id into the answer for this node.
    fn claim_answer(&mut self, winner: &str, hint: Option<IpAddr>) -> Result<Claim, RouterError> {
        let me = self.shared.peer_id;
        let peer: PeerId = winner.parse().map_err(|_| {
            RouterError::Failed(format!("coordinator named a bad peer id {winner:?}"))
        })?;
        if peer == me {
            return Ok(Claim::Won);
        }
        let ip = self
            .known_ip(&peer)
            .or(hint)
            .ok_or_else(|| RouterError::Failed(format!("no address known for winner {peer}")))?;
        Ok(Claim::Follow(Peer {
            id: peer.to_string(),
            addr: SocketAddr::new(ip, self.config.registry_port),
        }))
    }

    /// The IP we reach `peer`'s registry endpoint at, from its connections, what identify
    /// told us or, failing those, the routing table.
    fn known_ip(&mut self, peer: &PeerId) -> Option<IpAddr> {
        let of_peer = || self.conns.values().filter(|c| c.peer == *peer);
        let dialled = of_peer().filter(|c| c.dialled).find_map(|c| c.ip);
        let source = of_peer().find_map(|c| c.ip);
        let listen: Vec<IpAddr> = self
            .peer_addrs
            .get(peer)
            .map(|a| {
                a.iter()
                    .filter_map(|a| ip_tcp(a).map(|(ip, _)| ip))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(ip) = choose_ip(dialled, source, &listen) {
            return Some(ip);
        }
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                if entry.node.key.preimage() == peer {
                    return entry
                        .node
                        .value
                        .iter()
                        .find_map(|a| ip_tcp(a).map(|(ip, _)| ip));
                }
            }
        }
        None
    }

    fn on_claim_event(&mut self, event: request_response::Event<ClaimRequest, ClaimResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let ttl = Duration::from_millis(request.ttl_ms);
                let winner = self.claims.decide(
                    &request.key,
                    &peer.to_string(),
                    ttl,
                    std::time::Instant::now(),
                );
                let ip = winner
                    .parse::<PeerId>()
                    .ok()
                    .filter(|w| *w != self.shared.peer_id)
                    .and_then(|w| self.known_ip(&w));
                debug!(peer.id = %peer, key = %request.key, winner = %winner, "claim decided");
                // Fails only when the asker is gone already.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .claim
                    .send_response(channel, ClaimResponse { winner, ip });
            }
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(tx) = self.claiming.remove(&request_id) {
                    let answer = self.claim_answer(&response.winner, response.ip);
                    let _ = tx.send(answer);
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(peer.id = %peer, error = %error, "coordinator did not answer claim");
                if let Some(tx) = self.claiming.remove(&request_id) {
                    let _ = tx.send(Err(RouterError::Failed(format!(
                        "coordinator {peer} did not answer: {error}"
                    ))));
                }
            }
            Event::InboundFailure { .. } | Event::ResponseSent { .. } => {}
        }
    }

    // ----- swarm events -----

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.on_identify_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.on_ping_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Has(e)) => self.on_has_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Claim(e)) => self.on_claim_event(e),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                debug!(peer.id = %peer_id, cause = ?cause, "connection closed");
                self.conns.remove(&connection_id);
                if num_established == 0 {
                    self.on_peer_gone(peer_id);
                }
                self.lost_all_peers = self.conns.is_empty() && !self.shutting_down;
                self.update_peer_count();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer.id = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error: ListenError::Transport(error),
                ..
            } => self.on_handshake_failed(&send_back_addr, &error),
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = self.lock_listen_addrs();
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.lock_listen_addrs().retain(|a| *a != address);
            }
            SwarmEvent::ListenerClosed { reason, .. } if !self.shutting_down => {
                warn!(reason = ?reason, "routing listener closed");
            }
            SwarmEvent::ListenerError { error, .. } => {
                warn!(error = %error, "routing listener error");
            }
            _ => {}
        }
    }

    /// An inbound connection failed in the transport upgrade (pnet, multistream-select,
    /// noise, yamux): typically a node without our key. Counted always, logged rate-limited
    /// so a scanner cannot flood the log.
    fn on_handshake_failed(&mut self, from: &Multiaddr, error: &dyn std::fmt::Display) {
        self.shared
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        self.handshake_unlogged += 1;
        let now = Instant::now();
        if self
            .handshake_warned
            .is_some_and(|at| now.duration_since(at) < HANDSHAKE_WARN_EVERY)
        {
            debug!(client.addr = %from, error = %error, "inbound handshake failed");
            return;
        }
        warn!(
            client.addr = %from,
            error = %error,
            failures = self.handshake_unlogged,
            "inbound DHT handshake failed (a node without our pre-shared key?); \
             further failures are logged at most once a minute"
        );
        self.handshake_warned = Some(now);
        self.handshake_unlogged = 0;
    }

    fn lock_listen_addrs(&self) -> std::sync::MutexGuard<'_, Vec<Multiaddr>> {
        self.shared
            .listen_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn on_connected(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let (addr, dialled) = match endpoint {
            ConnectedPoint::Dialer { address, .. } => (address, true),
            ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr, false),
        };
        let ip = ip_tcp(addr).map(|(ip, _)| ip);
        self.conns.insert(
            id,
            Conn {
                peer,
                last_pong: Instant::now(),
                addr: addr.clone(),
                ip,
                dialled,
            },
        );
        // It is back: its earlier failure no longer counts.
        self.unreachable.remove(&peer);
        self.update_peer_count();
        if dialled && self.shutting_down {
            let _ = self.swarm.close_connection(id);
        }
    }

    /// The last connection to `peer` closed: it is gone, or we are shutting down. Its records
    /// are dropped from our store, so we stop handing them to other nodes.
    fn on_peer_gone(&mut self, peer: PeerId) {
        self.peer_addrs.remove(&peer);
        if let Some(keys) = self.given.remove(&peer) {
            debug!(peer.id = %peer, records = keys.len(), "dropping provider records of a gone peer");
            let store = self.swarm.behaviour_mut().kad.store_mut();
            for key in keys {
                store.remove_provider(&key, &peer);
            }
        }
    }

    fn update_peer_count(&self) {
        self.shared
            .peers
            .store(self.swarm.connected_peers().count(), Ordering::Relaxed);
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    self.lookup_progressed(id, !providers.is_empty(), &stats, step.last);
                    self.on_providers(id, providers);
                    if step.last {
                        self.on_query_done(id);
                    }
                }
                kad::QueryResult::GetProviders(_) => {
                    self.lookup_progressed(id, false, &stats, step.last);
                    self.on_query_done(id);
                }
                kad::QueryResult::StartProviding(r) => {
                    if let Err(e) = r {
                        debug!(error = %e, "announcing a key did not reach every node");
                    }
                    self.publishing.remove(&id);
                }
                _ => {}
            },
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => self.on_provider_record(record),
            kad::Event::RoutingUpdated {
                is_new_peer: true, ..
            } if self.routing_table_empty => {
                // Whatever we announced while alone reached nobody: announce it again now.
                self.routing_table_empty = false;
                self.republish();
            }
            _ => {}
        }
    }

    fn lookup_progressed(
        &self,
        id: kad::QueryId,
        found: bool,
        stats: &kad::QueryStats,
        last: bool,
    ) {
        self.shared
            .lookup_costs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .progressed(id, found, stats, last);
    }

    fn on_query_done(&mut self, id: kad::QueryId) {
        if let Some(lookup) = self.lookups.get_mut(&id) {
            lookup.query_done = true;
            self.pump_lookup(id);
        }
    }

    fn on_provider_record(&mut self, record: kad::ProviderRecord) {
        let peer = record.provider;
        // A record from a peer that is already gone would never be dropped: refuse it.
        if !self.conns.values().any(|c| c.peer == peer) {
            return;
        }
        let key = record.key.clone();
        match self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .add_provider(record)
        {
            Ok(()) => {
                self.given.entry(peer).or_default().insert(key);
            }
            Err(e) => warn!(peer.id = %peer, error = %e, "provider record not stored"),
        }
    }

    fn on_identify_event(&mut self, event: identify::Event) {
        let identify::Event::Received {
            peer_id,
            connection_id,
            info,
        } = event
        else {
            return;
        };
        if !info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) {
            return; // not a speculum node
        }
        let remote_loopback = self
            .conns
            .get(&connection_id)
            .and_then(|c| c.ip)
            .is_some_and(|ip| ip.is_loopback());
        // A remote node's loopback address is our own loopback: never dial it.
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .filter(|a| {
                ip_tcp(a).is_some_and(|(ip, port)| {
                    !ip.is_unspecified() && port != 0 && ip.is_loopback() == remote_loopback
                })
            })
            .collect();
        for a in &addrs {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer_id, a.clone());
        }
        self.peer_addrs.insert(peer_id, addrs);
    }

    fn on_ping_event(&mut self, event: ping::Event) {
        match event.result {
            Ok(_) => {
                if let Some(c) = self.conns.get_mut(&event.connection) {
                    c.last_pong = Instant::now();
                }
            }
            Err(e) => {
                // libp2p only reports the failure; a connection that cannot carry a ping is
                // dead for our purposes, and closing it tells everyone the peer is gone.
                debug!(peer.id = %event.peer, error = %e, "ping failed, closing connection");
                self.declare_dead(event.peer, event.connection);
            }
        }
    }

    /// Closes connections whose peer stopped answering pings. libp2p's ping stays silent on
    /// the first failure and then waits for a substream negotiation timeout, about 25 s with
    /// our defaults; counting from the last pong instead bounds detection by
    /// `ping_interval + ping_timeout` plus one housekeeping tick.
    fn close_silent_connections(&mut self) {
        let stale_after = self.config.ping_interval + self.config.ping_timeout + HOUSEKEEPING;
        let now = Instant::now();
        let silent: Vec<(ConnectionId, PeerId)> = self
            .conns
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_pong) > stale_after)
            .map(|(id, c)| (*id, c.peer))
            .collect();
        for (id, peer) in silent {
            debug!(peer.id = %peer, "no pong within {stale_after:?}, closing connection");
            // Reset the clock so a connection that is slow to close is not closed again on
            // every tick.
            if let Some(c) = self.conns.get_mut(&id) {
                c.last_pong = now;
            }
            self.declare_dead(peer, id);
        }
    }

    /// Closes a connection that stopped answering and forgets the peer's routing-table entry:
    /// otherwise every query would dial it again and wait `dial_timeout` on a hung node whose
    /// kernel still accepts TCP. A peer that comes back is re-added when it connects (through
    /// identify) or found again by bootstrap.
    fn declare_dead(&mut self, peer: PeerId, connection: ConnectionId) {
        let _ = self.swarm.close_connection(connection);
        self.swarm.behaviour_mut().kad.remove_peer(&peer);
        self.mark_unreachable(peer);
    }

    /// Leaves `peer` out of lookups for `UNREACHABLE_FOR` (until it connects again), counted.
    fn mark_unreachable(&mut self, peer: PeerId) {
        self.unreachable.insert(peer, Instant::now());
        self.shared
            .declared_unreachable
            .fetch_add(1, Ordering::Relaxed);
    }

    // ----- bootstrap -----

    fn start_bootstrap_round(&mut self) {
        self.resolving = true;
        let config = self.config.bootstrap.clone();
        let tx = self.resolved_tx.clone();
        // DNS may be slow: resolve off the swarm task and hand the result back.
        tokio::spawn(async move {
            let (targets, errors) = bootstrap::resolve(&config).await;
            for e in errors {
                warn!(error = %e, "bootstrap source unusable");
            }
            let _ = tx.send(targets).await;
        });
    }

    /// Dials every target that is neither us nor already connected, then refreshes kad's
    /// routing table.
    fn dial(&mut self, targets: Vec<Target>) {
        let own = self.lock_listen_addrs().clone();
        let connected: HashSet<&Multiaddr> = self
            .conns
            .values()
            .filter(|c| c.dialled)
            .map(|c| &c.addr)
            .chain(self.peer_addrs.values().flatten())
            .collect();
        let mut dials = Vec::new();
        for t in targets {
            if own.contains(&t.addr) || connected.contains(&t.addr) {
                continue;
            }
            dials.push(match t.peer {
                Some(peer) => DialOpts::peer_id(peer)
                    .addresses(vec![t.addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                // The peer id is learnt from the noise handshake.
                None => DialOpts::unknown_peer_id().address(t.addr).build(),
            });
        }
        for opts in dials {
            if let Err(e) = self.swarm.dial(opts) {
                debug!(error = %e, "bootstrap dial not started");
            }
        }
        if self.swarm.connected_peers().next().is_some() {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    // ----- shutdown -----

    /// Stops answering `has` with yes, drops our records, closes every connection (so peers
    /// drop the records we gave them) and waits, bounded, for the closes to go out.
    async fn shutdown(mut self) {
        self.shutting_down = true;
        self.shared.ready.store(false, Ordering::Relaxed);
        for key in self.advertised.drain() {
            self.swarm
                .behaviour_mut()
                .kad
                .stop_providing(&record_key(&key));
        }
        self.shared.advertised.store(0, Ordering::Relaxed);
        self.lookups.clear();
        self.swarm.remove_listener(self.listener);
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        while !self.conns.is_empty() {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                () = tokio::time::sleep_until(deadline) => {
                    warn!(open = self.conns.len(), "connections still open at the end of shutdown");
                    break;
                }
            }
        }
        self.shared.peers.store(0, Ordering::Relaxed);
        info!("routing stopped");
    }
}

/// The IP and TCP port of an `/ip4|ip6/…/tcp/…` address.
fn ip_tcp(addr: &Multiaddr) -> Option<(IpAddr, u16)> {
    let mut parts = addr.iter();
    let ip: IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    match parts.next()? {
        Protocol::Tcp(port) => Some((ip, port)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn config_defaults_are_valid_and_yaml_overrides_them() {
        assert_eq!(KademliaConfig::default().validate(), Vec::<String>::new());
        let yaml = "
listen: /ip4/10.0.0.5/tcp/6000
registry_port: 6001
data_dir: /data
bootstrap:
  dns: speculum-bootstrap.speculum.svc.cluster.local:6000
  peers: [/ip4/10.0.0.6/tcp/6000]
  interval: 2m
provider_ttl: 3h
ping_interval: 2s
";
        let c: KademliaConfig = match yaml_serde::from_str(yaml) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.listen, "/ip4/10.0.0.5/tcp/6000");
        assert_eq!(c.registry_port, 6001);
        assert_eq!(c.bootstrap.interval, Duration::from_secs(120));
        assert_eq!(
            c.bootstrap.initial_backoff,
            Duration::from_secs(1),
            "default kept"
        );
        assert_eq!(c.provider_ttl, Duration::from_secs(3 * 3600));
        assert_eq!(c.ping_interval, Duration::from_secs(2));
        assert_eq!(c.verify_timeout, Duration::from_secs(2), "default kept");
        assert!(c.validate().is_empty(), "{:?}", c.validate());

        // What is printed as the effective configuration reads back the same.
        let printed = match yaml_serde::to_string(&c) {
            Ok(y) => y,
            Err(e) => panic!("{e}"),
        };
        let reread: Result<KademliaConfig, _> = yaml_serde::from_str(&printed);
        assert_eq!(reread.ok(), Some(c.clone()), "{printed}");

        let unknown: Result<KademliaConfig, _> = yaml_serde::from_str("listne: /ip4/1.2.3.4/tcp/1");
        assert!(unknown.is_err(), "a misspelt key must be refused");
    }

    #[test]
    fn config_validation_reports_every_problem() {
        type Case = (&'static str, fn(&mut KademliaConfig), &'static str);
        let cases: &[Case] = &[
            (
                "listen not a multiaddr",
                |c| c.listen = "0.0.0.0:5082".into(),
                "routing.listen",
            ),
            (
                "listen on udp",
                |c| c.listen = "/ip4/0.0.0.0/udp/5082".into(),
                "routing.listen",
            ),
            (
                "registry port 0",
                |c| c.registry_port = 0,
                "routing.registry_port",
            ),
            (
                "empty data dir",
                |c| c.data_dir = PathBuf::new(),
                "routing.data_dir",
            ),
            (
                "bad bootstrap dns",
                |c| c.bootstrap.dns = Some("x".into()),
                "routing.bootstrap.dns",
            ),
            (
                "zero dial timeout",
                |c| c.dial_timeout = Duration::ZERO,
                "routing.dial_timeout",
            ),
            (
                "republish not below ttl",
                |c| c.republish_interval = c.provider_ttl,
                "routing.republish_interval",
            ),
            (
                "slow ping",
                |c| c.ping_timeout = Duration::from_secs(40),
                "routing.ping_interval + ping_timeout",
            ),
            (
                "verify as long as lookup",
                |c| c.verify_timeout = c.lookup_timeout,
                "routing.verify_timeout",
            ),
            ("no keys", |c| c.max_keys = 0, "routing.max_keys"),
        ];
        for (name, break_it, field) in cases {
            let mut c = KademliaConfig::default();
            break_it(&mut c);
            let errors = c.validate();
            assert_eq!(errors.len(), 1, "{name}: {errors:?}");
            assert!(errors[0].starts_with(field), "{name}: {errors:?}");
        }
    }

    #[test]
    fn record_keys_are_sha256_of_the_string() {
        let cases = [
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "registry.example:5000/a/very/long/repository/name:tag",
            "",
        ];
        for key in cases {
            let k = record_key(key);
            assert_eq!(k.as_ref().len(), 32, "{key:?}");
            assert_eq!(k, record_key(key), "{key:?}: not stable");
        }
        assert_ne!(record_key("a"), record_key("b"));
    }

    #[test]
    fn ip_choice_prefers_what_we_know_is_theirs() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
        type Case = (
            &'static str,
            Option<IpAddr>,
            Option<IpAddr>,
            Vec<IpAddr>,
            Option<IpAddr>,
        );
        let cases: Vec<Case> = vec![
            (
                "dialled wins",
                Some(ip("10.0.0.5")),
                Some(ip("10.0.0.9")),
                vec![ip("10.0.0.7")],
                Some(ip("10.0.0.5")),
            ),
            (
                "source listed as listen",
                None,
                Some(ip("10.0.0.9")),
                vec![ip("172.17.0.1"), ip("10.0.0.9")],
                Some(ip("10.0.0.9")),
            ),
            (
                "source without identify",
                None,
                Some(ip("10.0.0.9")),
                vec![],
                Some(ip("10.0.0.9")),
            ),
            (
                "shared loopback source",
                None,
                Some(ip("127.0.0.1")),
                vec![ip("127.0.0.3")],
                Some(ip("127.0.0.3")),
            ),
            (
                "no listen of the same kind",
                None,
                Some(ip("10.0.0.9")),
                vec![ip("127.0.0.1"), ip("fd00::1")],
                Some(ip("10.0.0.9")),
            ),
            (
                "no connection",
                None,
                None,
                vec![ip("10.0.0.7")],
                Some(ip("10.0.0.7")),
            ),
            ("nothing known", None, None, vec![], None),
        ];
        for (name, dialled, source, listen, want) in cases {
            assert_eq!(choose_ip(dialled, source, &listen), want, "{name}");
        }
    }

    #[test]
    fn identity_is_created_private_reused_and_never_silently_replaced() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        // A data dir that does not exist yet is created.
        let data = dir.path().join("nested");
        let first = match load_or_create_identity(&data) {
            Ok(k) => k.public().to_peer_id(),
            Err(e) => panic!("{e}"),
        };
        let path = data.join(IDENTITY_FILE);
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        let again = load_or_create_identity(&data).map(|k| k.public().to_peer_id());
        assert_eq!(again.ok(), Some(first));
        let leftovers: Vec<_> = std::fs::read_dir(&data)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(leftovers, [IDENTITY_FILE], "temporary files left behind");

        for (name, bytes) in [("garbage", &b"garbage"[..]), ("empty", &b""[..])] {
            if let Err(e) = std::fs::write(&path, bytes) {
                panic!("{e}");
            }
            match load_or_create_identity(&data) {
                Err(KademliaError::IdentityCorrupt { .. }) => {}
                other => panic!("{name}: want IdentityCorrupt, got {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn only_ip_tcp_addresses_are_dialable() {
        let cases = [
            ("/ip4/10.0.0.5/tcp/5082", Some(5082)),
            ("/ip6/::1/tcp/1", Some(1)),
            ("/ip4/10.0.0.5/udp/5082/quic-v1", None),
            ("/dns4/node/tcp/5082", None),
        ];
        for (addr, want) in cases {
            let parsed: Multiaddr = match addr.parse() {
                Ok(a) => a,
                Err(e) => panic!("{addr}: {e}"),
            };
            assert_eq!(ip_tcp(&parsed).map(|(_, p)| p), want, "{addr}");
        }
    }
}
