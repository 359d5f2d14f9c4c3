//! `MemoryRouter`: the in-memory twin of the Kademlia router, for unit tests of logic that sits
//! on the `Router` seam (the mirror, the store→router sync).
//!
//! Several routers share one [`MemoryNetwork`], the stand-in for the DHT: what one advertises
//! the others find, in the order it was first advertised, which makes tests deterministic. A
//! node can be marked dead ([`MemoryNetwork::kill`]); its records then stop being returned, as
//! the real router stops returning a node that no longer answers. Tests that only need "a
//! lookup returns these peers in this order" use [`MemoryRouter::with_static`] or
//! [`MemoryNetwork::advertise_as`] and never run a router for the other nodes at all.
//!
//! It passes the same [`super::conformance`] suite as the real router.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::claim::{self, Claim, ClaimTable};
use super::{Peer, Router, RouterError};

/// The shared "DHT" of a set of [`MemoryRouter`]s. Cheap to clone; clones share state.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    // A std Mutex: it is never held across an `.await`.
    inner: Arc<Mutex<Net>>,
    lookups: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Net {
    nodes: HashMap<String, Node>,
    /// Key → ids of the nodes holding it, in the order they first advertised it.
    providers: HashMap<String, Vec<String>>,
    /// Each node's claim table, for the keys it coordinates.
    claims: HashMap<String, ClaimTable>,
}

struct Node {
    addr: SocketAddr,
    alive: bool,
}

impl MemoryNetwork {
    pub fn new() -> MemoryNetwork {
        MemoryNetwork::default()
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        // Every critical section leaves the maps consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A router for node `me`, joined to this network (alive). Joining again with the same id
    /// revives the node and updates its address; its advertised keys are kept.
    pub fn router(&self, me: Peer) -> MemoryRouter {
        self.join(&me);
        MemoryRouter {
            network: self.clone(),
            me,
            ready: Arc::new(AtomicBool::new(true)),
            delay: Arc::new(Mutex::new(Duration::ZERO)),
        }
    }

    fn join(&self, peer: &Peer) {
        self.lock().nodes.insert(
            peer.id.clone(),
            Node {
                addr: peer.addr,
                alive: true,
            },
        );
    }

    /// Announces `keys` on behalf of `peer` (joining it if needed) without running a router
    /// for it: the quickest way to make lookups return given peers in a given order.
    pub fn advertise_as<I, K>(&self, peer: &Peer, keys: I)
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let mut net = self.lock();
        net.nodes
            .entry(peer.id.clone())
            .or_insert(Node {
                addr: peer.addr,
                alive: true,
            })
            .addr = peer.addr;
        for key in keys {
            let holders = net.providers.entry(key.into()).or_default();
            if !holders.contains(&peer.id) {
                holders.push(peer.id.clone());
            }
        }
    }

    /// Stops announcing `keys` on behalf of node `id`.
    pub fn withdraw_as<I, K>(&self, id: &str, keys: I)
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let mut net = self.lock();
        for key in keys {
            let key = key.into();
            if let Some(holders) = net.providers.get_mut(&key) {
                holders.retain(|h| h != id);
                if holders.is_empty() {
                    net.providers.remove(&key);
                }
            }
        }
    }

    /// Marks node `id` dead: lookups stop returning it, its records are kept (a dead node's
    /// records linger in a real DHT too; the router must hide them).
    pub fn kill(&self, id: &str) {
        if let Some(node) = self.lock().nodes.get_mut(id) {
            node.alive = false;
        }
    }

    /// Brings a killed node back with the records it had.
    pub fn revive(&self, id: &str) {
        if let Some(node) = self.lock().nodes.get_mut(id) {
            node.alive = true;
        }
    }

    /// How many lookups routers on this network have made (lets a test assert that a code
    /// path did, or did not, ask the DHT).
    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Live holders of `key` other than `me`, in advertise order, at most `limit`.
    fn holders(&self, key: &str, me: &str, limit: usize) -> Vec<Peer> {
        let net = self.lock();
        let Some(ids) = net.providers.get(key) else {
            return Vec::new();
        };
        ids.iter()
            .filter(|id| id.as_str() != me)
            .filter_map(|id| {
                let node = net.nodes.get(id)?;
                node.alive.then(|| Peer {
                    id: id.clone(),
                    addr: node.addr,
                    load: None,
                })
            })
            .take(limit)
            .collect()
    }
}

/// One node's view of a [`MemoryNetwork`]. Cheap to clone; clones are the same node.
#[derive(Clone)]
pub struct MemoryRouter {
    network: MemoryNetwork,
    me: Peer,
    ready: Arc<AtomicBool>,
    delay: Arc<Mutex<Duration>>,
}

impl MemoryRouter {
    /// A router on a private network where each key is held by the given peers, returned in
    /// the given order. The router itself is node `self` at `0.0.0.0:0`.
    pub fn with_static<I, K>(entries: I) -> MemoryRouter
    where
        I: IntoIterator<Item = (K, Vec<Peer>)>,
        K: Into<String>,
    {
        let network = MemoryNetwork::new();
        let router = network.router(Peer {
            id: "self".to_owned(),
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            load: None,
        });
        for (key, peers) in entries {
            let key = key.into();
            for peer in &peers {
                network.advertise_as(peer, [key.clone()]);
            }
        }
        router
    }

    /// The network this router is on, to add, kill or revive other nodes.
    pub fn network(&self) -> &MemoryNetwork {
        &self.network
    }

    /// This node.
    pub fn peer(&self) -> &Peer {
        &self.me
    }

    /// Sets what [`Router::ready`] answers (true from the start).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Delays the first peer of every lookup by `delay`, to simulate a slow DHT.
    pub fn set_lookup_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }
}

#[async_trait]
impl Router for MemoryRouter {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn lookup(&self, key: &str, limit: usize) -> Result<mpsc::Receiver<Peer>, RouterError> {
        self.network.lookups.fetch_add(1, Ordering::Relaxed);
        let peers = self.network.holders(key, &self.me.id, limit);
        // Capacity for every peer: sending never waits, the receiver reads at its own pace.
        let (tx, rx) = mpsc::channel(peers.len().max(1));
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if delay.is_zero() {
            for peer in peers {
                // Only fails when the receiver is gone, and then nobody wants the rest.
                let _ = tx.try_send(peer);
            }
        } else {
            tokio::spawn(async move {
                // Simulated DHT latency, not synchronisation.
                tokio::time::sleep(delay).await;
                for peer in peers {
                    if tx.send(peer).await.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(rx)
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.network.advertise_as(&self.me, keys);
        Ok(())
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.network.withdraw_as(&self.me.id, keys);
        Ok(())
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim, RouterError> {
        self.network.claim(&self.me.id, key, ttl)
    }
}

impl MemoryNetwork {
    /// `me` claims `key` at the coordinator among the live nodes, as the real router does.
    fn claim(&self, me: &str, key: &str, ttl: Duration) -> Result<Claim, RouterError> {
        let mut net = self.lock();
        let alive: Vec<String> = net
            .nodes
            .iter()
            .filter(|(_, n)| n.alive)
            .map(|(id, _)| id.clone())
            .collect();
        let coordinator = claim::coordinator(key, alive.iter().map(String::as_str))
            .map(str::to_owned)
            .ok_or_else(|| RouterError::Failed("no live node to coordinate".to_owned()))?;
        let winner = net.claims.entry(coordinator).or_default().decide(
            key,
            me,
            ttl,
            std::time::Instant::now(),
        );
        if winner == me {
            return Ok(Claim::Won);
        }
        let node = net
            .nodes
            .get(&winner)
            .ok_or_else(|| RouterError::Failed(format!("winner {winner} unknown")))?;
        Ok(Claim::Follow(Peer {
            id: winner.clone(),
            addr: node.addr,
            load: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::conformance::{self, Cluster, Node, Timing};

    fn peer(id: &str, port: u16) -> Peer {
        Peer {
            id: id.to_owned(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            load: None,
        }
    }

    async fn collect(router: &MemoryRouter, key: &str, limit: usize) -> Vec<String> {
        let Ok(mut rx) = router.lookup(key, limit).await else {
            panic!("memory lookup failed");
        };
        let mut ids = Vec::new();
        while let Some(p) = rx.recv().await {
            ids.push(p.id);
        }
        ids
    }

    #[tokio::test]
    async fn conformance() {
        conformance::run(Timing::fast(), |n| async move {
            let network = MemoryNetwork::new();
            let nodes = (0..n)
                .map(|i| {
                    let id = format!("node-{i}");
                    let router = network.router(peer(&id, 5081));
                    Node { id, router }
                })
                .collect();
            Cluster::new(nodes, ())
        })
        .await;
    }

    #[tokio::test]
    async fn lookups_follow_advertise_order_and_skip_dead_nodes() {
        let key = "sha256:aa";
        let router =
            MemoryRouter::with_static([(key, vec![peer("b", 1), peer("c", 2), peer("d", 3)])]);
        let cases: &[(&str, &[&str], usize, &[&str])] = &[
            ("all, in order", &[], 10, &["b", "c", "d"]),
            ("limit", &[], 2, &["b", "c"]),
            ("limit zero", &[], 0, &[]),
            ("dead node skipped", &["c"], 10, &["b", "d"]),
            (
                "dead node does not use up the limit",
                &["b"],
                2,
                &["c", "d"],
            ),
        ];
        for (name, dead, limit, want) in cases {
            for id in ["b", "c", "d"] {
                router.network().revive(id);
            }
            for id in *dead {
                router.network().kill(id);
            }
            assert_eq!(collect(&router, key, *limit).await, *want, "{name}");
        }
        assert_eq!(router.network().lookups(), cases.len());
    }

    #[tokio::test]
    async fn lookup_delay_holds_back_the_first_peer() {
        let router = MemoryRouter::with_static([("k", vec![peer("b", 1)])]);
        router.set_lookup_delay(Duration::from_millis(50));
        let start = tokio::time::Instant::now();
        let Ok(mut rx) = router.lookup("k", 1).await else {
            panic!("memory lookup failed");
        };
        assert!(rx.try_recv().is_err(), "peer arrived before the delay");
        assert_eq!(rx.recv().await.map(|p| p.id), Some("b".to_owned()));
        // A lower bound only: the delay is a floor, scheduling may add to it.
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
