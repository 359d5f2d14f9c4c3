//! Peers: connections and the IP a peer is reached at ([`choose_ip`]), identify and ping
//! liveness, unreachable marks, failed inbound handshakes, and bootstrap rounds and dials.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::core::ConnectedPoint;
use libp2p::kad::store::RecordStore as _;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, identify, ping};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::routing::bootstrap::{self, Target};

use super::behaviour::KAD_PROTOCOL;
use super::node::{HOUSEKEEPING, Node};

/// A peer whose `has` request failed is not asked again for this long (unless it reconnects).
pub(super) const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// Failed inbound handshakes (an outsider without the key, a port scanner) are logged at most
/// this often, with the count since the last line; the counter metric has every one.
const HANDSHAKE_WARN_EVERY: Duration = Duration::from_secs(60);

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

/// One open connection.
pub(super) struct Conn {
    pub(super) peer: PeerId,
    /// When the peer last answered a ping on this connection (or when it opened).
    pub(super) last_pong: Instant,
    /// The remote address: where we dialled, or the peer's source address.
    pub(super) addr: Multiaddr,
    pub(super) ip: Option<IpAddr>,
    /// We dialled it, so `addr` is an address the peer listens on.
    pub(super) dialled: bool,
}

impl Node {
    /// See [`choose_ip`].
    pub(super) fn peer_ip(&self, peer: &PeerId, via: ConnectionId) -> Option<IpAddr> {
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

    /// An inbound connection failed in the transport upgrade (pnet, multistream-select,
    /// noise, yamux): typically a node without our key. Counted always, logged rate-limited
    /// so a scanner cannot flood the log.
    pub(super) fn on_handshake_failed(&mut self, from: &Multiaddr, error: &dyn std::fmt::Display) {
        self.shared
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.handshake_failed();
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

    pub(super) fn lock_listen_addrs(&self) -> std::sync::MutexGuard<'_, Vec<Multiaddr>> {
        self.shared
            .listen_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn on_connected(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
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
    pub(super) fn on_peer_gone(&mut self, peer: PeerId) {
        self.peer_addrs.remove(&peer);
        self.heard.remove(&peer);
        if let Some(keys) = self.given.remove(&peer) {
            debug!(peer.id = %peer, records = keys.len(), "dropping provider records of a gone peer");
            let store = self.swarm.behaviour_mut().kad.store_mut();
            for key in keys {
                store.remove_provider(&key, &peer);
            }
        }
    }

    pub(super) fn update_peer_count(&self) {
        let peers = self.swarm.connected_peers().count();
        self.shared.peers.store(peers, Ordering::Relaxed);
        self.shared.metrics.peers(peers);
    }

    pub(super) fn on_identify_event(&mut self, event: identify::Event) {
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

    pub(super) fn on_ping_event(&mut self, event: ping::Event) {
        match event.result {
            Ok(_) => {
                if let Some(c) = self.conns.get_mut(&event.connection) {
                    c.last_pong = Instant::now();
                }
                self.heard_from(event.peer);
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
    pub(super) fn close_silent_connections(&mut self) {
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
    pub(super) fn mark_unreachable(&mut self, peer: PeerId) {
        self.unreachable.insert(peer, Instant::now());
        if let Some(heard) = self.heard.get_mut(&peer) {
            heard.at = None;
        }
        self.shared
            .declared_unreachable
            .fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.peer_unreachable();
    }

    // ----- bootstrap -----

    pub(super) fn start_bootstrap_round(&mut self) {
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
    pub(super) fn dial(&mut self, targets: Vec<Target>) {
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
}

/// The IP and TCP port of an `/ip4|ip6/…/tcp/…` address.
pub(super) fn ip_tcp(addr: &Multiaddr) -> Option<(IpAddr, u16)> {
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
    use super::*;

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
