//! The claim protocol's swarm side: finding a key's coordinator among the known nodes,
//! asking it who fetches from upstream, and answering as coordinator. The pure decision
//! table is [`crate::routing::claim`].

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::request_response;
use tracing::debug;

use crate::routing::claim::{self, Claim};
use crate::routing::{Peer, RouterError};

use super::behaviour::{ClaimRequest, ClaimResponse};
use super::node::Node;
use super::peers::{choose_ip, ip_tcp};

impl Node {
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

    pub(super) fn start_claim(
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
            load: None,
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

    pub(super) fn on_claim_event(
        &mut self,
        event: request_response::Event<ClaimRequest, ClaimResponse>,
    ) {
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
}
