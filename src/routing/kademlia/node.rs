//! The swarm task: [`Node`] owns the swarm and `select!`s over commands, swarm events and
//! timers. This file holds its state, the loop, the dispatch of commands and swarm events,
//! housekeeping and shutdown; the handlers live beside it (`publish`, `lookup`, `claims`,
//! `peers`), each an `impl Node` block.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::{ConnectionId, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::routing::RouterError;
use crate::routing::bootstrap::{Schedule, Target};
use crate::routing::claim::{Claim, ClaimTable};
use crate::routing::load::ServingLoad;

use super::behaviour::{Behaviour, BehaviourEvent};
use super::config::{KademliaConfig, record_key};
use super::lookup::{Heard, Lookup, Verify};
use super::peers::{Conn, UNREACHABLE_FOR};
use super::{Command, Shared};

/// The first republish comes this soon after start (then every `republish_interval`). What a
/// node announces right after start-up lands on the closest nodes its routing table knew
/// *then*; while a whole DaemonSet starts at once those are often not the cluster's closest,
/// and lookups converging on the true closest find nothing until the next republish
/// (BENCHMARKS.md §3, the `SIM_REPUBLISH` runs: 140 → 200 of 200 lookups found). One early
/// republish, once the tables have settled, costs one more announcement of each key per start.
const EARLY_REPUBLISH: Duration = Duration::from_secs(120);

/// How often lookups past their deadline are ended.
pub(super) const HOUSEKEEPING: Duration = Duration::from_millis(200);
/// How long graceful shutdown waits for connections to close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The swarm task's state. Only `run` and the small `on_*` functions touch it.
pub(super) struct Node {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) config: KademliaConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) listener: libp2p::core::transport::ListenerId,
    pub(super) shutting_down: bool,

    /// Keys we announce, each with whether it is urgent (a tag or manifest).
    pub(super) advertised: HashMap<String, bool>,
    pub(super) publish_queue: VecDeque<String>,
    pub(super) queued: HashSet<String>,
    pub(super) publishing: HashSet<kad::QueryId>,

    pub(super) lookups: HashMap<kad::QueryId, Lookup>,
    pub(super) verifying: HashMap<OutboundRequestId, Verify>,
    /// What each connected peer last told us (liveness, load, keys it no longer holds).
    pub(super) heard: HashMap<PeerId, Heard>,
    /// This node's own peer-serving load, reported in our `has` answers.
    pub(super) serving: ServingLoad,
    /// Announcements of tags and manifests, sent before `publish_queue`, never paced.
    pub(super) urgent_queue: VecDeque<String>,
    /// Pacing of `publish_queue`: announcements allowed now (`publish_rate` per second).
    pub(super) publish_tokens: f64,
    pub(super) tokens_at: Instant,

    pub(super) conns: HashMap<ConnectionId, Conn>,
    /// Listen addresses peers told us through identify.
    pub(super) peer_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Keys of the provider records each peer gave us, to drop them when it goes.
    pub(super) given: HashMap<PeerId, HashSet<kad::RecordKey>>,
    pub(super) unreachable: HashMap<PeerId, Instant>,
    pub(super) routing_table_empty: bool,

    /// Claims on keys this node coordinates.
    pub(super) claims: ClaimTable,
    /// Our claims sent to a coordinator, awaiting its answer.
    pub(super) claiming:
        HashMap<OutboundRequestId, tokio::sync::oneshot::Sender<Result<Claim, RouterError>>>,

    pub(super) schedule: Schedule,
    pub(super) resolving: bool,
    pub(super) lost_all_peers: bool,
    pub(super) resolved_tx: mpsc::Sender<Vec<Target>>,
    pub(super) resolved_rx: mpsc::Receiver<Vec<Target>>,

    /// When a failed inbound handshake was last logged, and how many failed since.
    pub(super) handshake_warned: Option<Instant>,
    pub(super) handshake_unlogged: u64,
}

impl Node {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        config: KademliaConfig,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        listener: libp2p::core::transport::ListenerId,
        serving: ServingLoad,
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
            advertised: HashMap::new(),
            publish_queue: VecDeque::new(),
            queued: HashSet::new(),
            publishing: HashSet::new(),
            lookups: HashMap::new(),
            verifying: HashMap::new(),
            heard: HashMap::new(),
            serving,
            urgent_queue: VecDeque::new(),
            publish_tokens: 0.0,
            tokens_at: Instant::now(),
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

    pub(super) async fn run<S>(mut self, shutdown: S) -> Result<(), RouterError>
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
            Command::Advertise { keys, urgent } => {
                for key in keys {
                    let was = self.advertised.get(&key).copied();
                    // Once urgent, republished as urgent.
                    self.advertised
                        .insert(key.clone(), urgent || was == Some(true));
                    // New, or now urgent while it waits in the backlog.
                    if was.is_none() || (urgent && was == Some(false)) {
                        self.enqueue(key, urgent);
                    }
                }
            }
            Command::Withdraw(keys) => {
                for key in keys {
                    if self.advertised.remove(&key).is_some() {
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
        self.prune_heard();
        self.close_silent_connections();
        // A publish whose query kad no longer knows will never report back.
        let kad = &self.swarm.behaviour().kad;
        self.publishing.retain(|id| kad.query(id).is_some());
    }

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

    /// Stops answering `has` with yes, drops our records, closes every connection (so peers
    /// drop the records we gave them) and waits, bounded, for the closes to go out.
    async fn shutdown(mut self) {
        self.shutting_down = true;
        self.shared.ready.store(false, Ordering::Relaxed);
        for (key, _) in self.advertised.drain() {
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
