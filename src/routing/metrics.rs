//! The routing metrics, one job: `speculum_routing_*` gauges and counters (advertised keys,
//! connected peers, failed handshakes, unreachable peers), private, with recording methods.
//! The DHT task records peers, handshakes and unreachable marks itself (`kademlia::Wiring`);
//! the advertiser records the advertised keys.
//! The lookup time is the registry's (`registry::metrics`): it measures it as the mirror sees
//! it. Registered into the daemon's registry by the aggregator ([`crate::metrics`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `speculum_routing_*`. Cheap to clone.
#[derive(Clone, Default)]
pub struct RoutingMetrics {
    advertised_keys: Gauge,
    peers: Gauge,
    /// Inbound DHT connections that failed the handshake (no or another pre-shared key).
    handshake_failures: Counter,
    /// Peers marked unreachable (silent on ping, or no answer to `has`).
    peers_unreachable: Counter,
}

impl RoutingMetrics {
    pub fn register(registry: &mut Registry) -> RoutingMetrics {
        let m = RoutingMetrics::default();
        registry.register(
            "routing_advertised_keys",
            "Keys (digests and tags) this node advertises",
            m.advertised_keys.clone(),
        );
        registry.register("routing_peers", "Connected DHT peers", m.peers.clone());
        registry.register(
            "routing_handshake_failures",
            "Inbound DHT connections that failed before authentication (no or another pre-shared key, scanners)",
            m.handshake_failures.clone(),
        );
        registry.register(
            "routing_peers_unreachable",
            "Peers marked unreachable and left out of lookups for a while: silent on ping, or no answer to a has request",
            m.peers_unreachable.clone(),
        );
        m
    }

    /// How many keys this node advertises now.
    pub fn advertised_keys(&self, n: usize) {
        self.advertised_keys
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// How many DHT peers are connected now.
    pub fn peers(&self, n: usize) {
        self.peers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An inbound DHT connection failed the handshake.
    pub fn handshake_failed(&self) {
        self.handshake_failures.inc();
    }

    /// A peer was marked unreachable.
    pub fn peer_unreachable(&self) {
        self.peers_unreachable.inc();
    }
}
