//! `KademliaRouter`: the real router, a libp2p Kademlia DHT of provider records.
//!
//! One task owns the [`Swarm`](libp2p::Swarm) and `select!`s over commands from the router handles, swarm
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
//! within `verify_timeout` — or, when the peer is connected and was heard from within
//! `liveness_window` (a pong, a `has` answer), hands it out at once and sends the check
//! alongside, whose "no" keeps it off the fast path for that key. So a dead, frozen or
//! partitioned node is not returned once `liveness_window` has passed since it was last heard
//! from, nor a node that said it withdrew the key, however long its records linger in other
//! nodes' stores. The `has` answer carries the holder's load (`Peer::load`), counted by the
//! [`ServingLoad`] handle given to [`start_with`] ([`Wiring`]). The peer's
//! IP comes from that connection ([`choose_ip`]); the port is the cluster-wide
//! `registry_port`. Records a peer gave us are dropped from our store when its last
//! connection closes, so stale records also stop being handed out; connections stay open
//! while the peer lives (idle timeout above the republish interval, ping every few seconds).
//!
//! Layout, one job per file: `config` (the `routing` section, `KademliaError`, `record_key`),
//! `identity` (the node's key), `behaviour` (protocols and the libp2p stack), `node` (the
//! swarm task: loop, dispatch, shutdown), and the task's handlers `publish` (advertising),
//! `lookup` (kad walk + `has` verification), `claims` (who fetches from upstream) and
//! `peers` (connections, liveness, bootstrap dials). This file is the handle.

mod behaviour;
mod claims;
mod config;
mod identity;
mod lookup;
mod node;
mod peers;
mod publish;

pub use behaviour::{CLAIM_PROTOCOL, HAS_PROTOCOL, KAD_PROTOCOL};
pub use config::{KademliaConfig, KademliaError, record_key};
pub use identity::{IDENTITY_FILE, load_or_create_identity};
pub use lookup::LookupCost;
pub use peers::choose_ip;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::claim::Claim;
use super::load::ServingLoad;
use super::metrics::RoutingMetrics;
use super::{Peer, Router, RouterError};

use self::behaviour::{await_listening, build_swarm};
use self::config::listen_addr;
use self::lookup::LookupCosts;
use self::node::Node;

/// Most peers one lookup returns, whatever `limit` asks: the channel has room for all of them.
const MAX_LOOKUP_LIMIT: usize = 256;

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
    /// Recorded into beside the atomics above (which the handle's getters read).
    metrics: RoutingMetrics,
}

enum Command {
    Lookup {
        key: String,
        limit: usize,
        tx: mpsc::Sender<Peer>,
    },
    Advertise {
        keys: Vec<String>,
        /// Tags and manifests: announced before the backlog, never paced.
        urgent: bool,
    },
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

/// What the router shares with the rest of the daemon: the load its `has` answers report and
/// the metrics it records into (peers, failed handshakes, unreachable marks). The default is
/// no serving cap and metrics registered nowhere (tests, benches).
#[derive(Clone, Default)]
pub struct Wiring {
    /// The daemon's peer-serving count and cap, the handle its peer endpoint takes slots from.
    pub load: ServingLoad,
    /// `speculum_routing_peers`, `…_handshake_failures_total`, `…_peers_unreachable_total`.
    pub metrics: RoutingMetrics,
}

/// Starts the router: loads the identity, binds the listener and spawns the task that owns
/// the swarm. Returns once the listener is bound (a lone node is ready then). The task runs
/// until `shutdown` completes, then stops providing, closes its connections and ends.
/// Nothing is wired in ([`Wiring::default`]); see [`start_with`].
pub async fn start<S>(
    config: KademliaConfig,
    shutdown: S,
) -> Result<(KademliaRouter, JoinHandle<Result<(), RouterError>>), KademliaError>
where
    S: Future<Output = ()> + Send + 'static,
{
    start_with(config, Wiring::default(), shutdown).await
}

/// [`start`], with `has` answers reporting `wiring.load` and the routing metrics recorded
/// into `wiring.metrics` as things happen.
pub async fn start_with<S>(
    config: KademliaConfig,
    wiring: Wiring,
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
        metrics: wiring.metrics,
    });
    let (tx, rx) = mpsc::channel(1024);
    let node = Node::new(swarm, config, shared.clone(), rx, listener, wiring.load);
    let task = tokio::spawn(node.run(shutdown));
    Ok((
        KademliaRouter {
            commands: tx,
            shared,
        },
        task,
    ))
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
        // Keys that are not digests are tags: they gate a pull.
        let (urgent, backlog): (Vec<String>, Vec<String>) = keys
            .into_iter()
            .partition(|k| k.parse::<crate::oci::Digest>().is_err());
        if !urgent.is_empty() {
            self.advertise_first(urgent).await?;
        }
        if backlog.is_empty() {
            return Ok(());
        }
        self.send(Command::Advertise {
            keys: backlog,
            urgent: false,
        })
        .await
    }

    async fn advertise_first(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.send(Command::Advertise { keys, urgent: true }).await
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
