//! Lookups: the kad walk for providers, `has` verification of every candidate, the kad events
//! that drive both, and what each walk cost ([`LookupCost`]).
//!
//! A candidate is handed out once it answered `has` with yes, or at once when it is connected
//! and was heard from within `liveness_window` (a pong, any `has` answer): then its `has`
//! check goes out alongside, and a "no" keeps it out of later lookups of that key. Either
//! way a holder that died or was cut off is not handed out once `liveness_window` has passed
//! since it was last heard from. The `has` answer carries the holder's [`PeerLoad`], handed
//! out in `Peer::load`; a fast-path peer carries the load of its last answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use libp2p::kad::{self, store::RecordStore as _};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use crate::routing::Peer;
use crate::routing::load::PeerLoad;

use super::behaviour::{HasRequest, HasResponse};
use super::config::record_key;
use super::node::Node;
use super::peers::ip_tcp;

/// What one lookup's kad walk cost, from kad's `QueryStats` (benches/dht_sim.rs reads these
/// through [`super::KademliaRouter::take_lookup_costs`] to measure hops as a cluster grows).
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
pub(super) struct LookupCosts {
    pub(super) first: HashMap<kad::QueryId, u32>,
    pub(super) done: VecDeque<LookupCost>,
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

/// An outstanding `has` request: for a lookup waiting on it, or sent alongside a peer
/// handed out on the fast path (`lookup: None`).
pub(super) struct Verify {
    pub(super) lookup: Option<kad::QueryId>,
    pub(super) key: String,
}

/// What a peer last told us, for the fast path.
#[derive(Default)]
pub(super) struct Heard {
    /// When it last answered anything (a pong, a `has`).
    pub(super) at: Option<Instant>,
    /// The load in its last `has` answer.
    pub(super) load: Option<PeerLoad>,
    /// Keys it said "no" to (withdrawn), with when; forgotten after `NOT_HELD_FOR`.
    pub(super) not_held: HashMap<String, Instant>,
}

/// A holder's "no" keeps it out of fast-path hand-outs of that key this long.
pub(super) const NOT_HELD_FOR: std::time::Duration = std::time::Duration::from_secs(600);
/// Most "no" answers remembered per peer.
const NOT_HELD_MAX: usize = 4096;

/// A lookup in progress: kad finds candidate providers, `has` verifies them one by one.
pub(super) struct Lookup {
    pub(super) key: String,
    pub(super) tx: mpsc::Sender<Peer>,
    pub(super) limit: usize,
    pub(super) sent: usize,
    pub(super) seen: HashSet<PeerId>,
    pub(super) candidates: VecDeque<PeerId>,
    pub(super) verifying: usize,
    pub(super) query_done: bool,
    pub(super) deadline: Instant,
}

impl Lookup {
    fn finished(&self) -> bool {
        self.sent >= self.limit
            || self.tx.is_closed()
            || (self.query_done && self.candidates.is_empty() && self.verifying == 0)
    }
}

impl Node {
    pub(super) fn start_lookup(&mut self, key: String, limit: usize, tx: mpsc::Sender<Peer>) {
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
            if let Some(found) = self.known_alive(&peer, &lookup.key) {
                if lookup.tx.try_send(found).is_ok() {
                    lookup.sent += 1;
                }
                self.send_has(None, peer, lookup.key.clone());
                continue;
            }
            self.send_has(Some(id), peer, lookup.key.clone());
            lookup.verifying += 1;
        }
        self.lookups.insert(id, lookup);
        if self.lookups.get(&id).is_some_and(Lookup::finished) {
            self.end_lookup(id);
        }
    }

    fn send_has(&mut self, lookup: Option<kad::QueryId>, peer: PeerId, key: String) {
        let addrs = self.dial_addrs(&peer, &key);
        let request = HasRequest { key: key.clone() };
        let req = self
            .swarm
            .behaviour_mut()
            .has
            .send_request_with_addresses(&peer, request, addrs);
        self.verifying.insert(req, Verify { lookup, key });
    }

    /// `peer` as a lookup hands it out without waiting for `has`: connected, heard from
    /// within `liveness_window`, with a known IP and no recent "no" for `key`.
    fn known_alive(&self, peer: &PeerId, key: &str) -> Option<Peer> {
        let window = self.config.liveness_window;
        let heard = self.heard.get(peer)?;
        let at = heard.at?;
        if window.is_zero() || at.elapsed() > window || heard.not_held.contains_key(key) {
            return None;
        }
        let via = self
            .conns
            .iter()
            .find(|(_, c)| c.peer == *peer)
            .map(|(id, _)| *id)?;
        let ip = self.peer_ip(peer, via)?;
        Some(Peer {
            id: peer.to_string(),
            addr: SocketAddr::new(ip, self.config.registry_port),
            load: heard.load,
        })
    }

    /// `peer` answered something just now: it is alive.
    pub(super) fn heard_from(&mut self, peer: PeerId) {
        self.heard.entry(peer).or_default().at = Some(Instant::now());
    }

    /// Forgets "no" answers past `NOT_HELD_FOR` (housekeeping).
    pub(super) fn prune_heard(&mut self) {
        for heard in self.heard.values_mut() {
            heard.not_held.retain(|_, at| at.elapsed() < NOT_HELD_FOR);
        }
    }

    /// Drops the lookup (closing its channel) and stops its kad query if still running.
    pub(super) fn end_lookup(&mut self, id: kad::QueryId) {
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

    pub(super) fn on_has_event(&mut self, event: request_response::Event<HasRequest, HasResponse>) {
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
                self.heard_from(peer);
                let has = !self.shutting_down && self.advertised.contains_key(&request.key);
                let load = Some(self.serving.now());
                // Fails only when the asker is gone already.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .has
                    .send_response(channel, HasResponse { has, load });
            }
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
            } => self.on_verified(request_id, peer, connection_id, response),
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(peer.id = %peer, error = %error, "provider did not answer has");
                self.mark_unreachable(peer);
                if let Some(Verify {
                    lookup: Some(id), ..
                }) = self.verifying.remove(&request_id)
                {
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
        response: HasResponse,
    ) {
        let Some(verify) = self.verifying.remove(&request) else {
            return;
        };
        let HasResponse { has, load } = response;
        let heard = self.heard.entry(peer).or_default();
        heard.at = Some(Instant::now());
        heard.load = load;
        if has {
            heard.not_held.remove(&verify.key);
        } else if heard.not_held.len() < NOT_HELD_MAX {
            heard.not_held.insert(verify.key, Instant::now());
        }
        let Some(id) = verify.lookup else {
            return; // sent alongside a fast-path hand-out
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
                    load,
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

    pub(super) fn on_kad_event(&mut self, event: kad::Event) {
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
}
