//! The libp2p stack: our protocol ids, the `has` and `claim` messages, the composed
//! [`Behaviour`] (kad, identify, ping, has, claim) and the transport that carries it
//! (TCP → pre-shared-key handshake → noise → yamux). What the node does with the events
//! lives in the sibling files.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::pnet::PnetConfig;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, StreamProtocol, Swarm, SwarmBuilder, identify, noise, ping, tcp, yamux};
use serde::{Deserialize, Serialize};

use crate::routing::load::PeerLoad;
use crate::routing::psk::PreSharedKey;

use super::config::{KademliaConfig, KademliaError};

/// Kademlia protocol id: our own, so speculum never joins another libp2p DHT by accident.
pub const KAD_PROTOCOL: &str = "/speculum/kad/1.0.0";
/// The "do you still hold this key?" protocol.
pub const HAS_PROTOCOL: &str = "/speculum/has/1.0.0";
/// The "who fetches this key from upstream?" protocol (see [`crate::routing::claim`]).
pub const CLAIM_PROTOCOL: &str = "/speculum/claim/1.0.0";
const IDENTIFY_PROTOCOL: &str = "/speculum/id/1.0.0";

/// How long `start` waits for the listener to report its bound address.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HasRequest {
    pub(super) key: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HasResponse {
    pub(super) has: bool,
    /// The holder's peer-serving load when it answered; absent from older daemons' answers,
    /// which still count (`None`: not reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) load: Option<PeerLoad>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ClaimRequest {
    pub(super) key: String,
    pub(super) ttl_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ClaimResponse {
    /// Peer id of the node that fetches the key.
    pub(super) winner: String,
    /// The coordinator's view of the winner's IP, for a claimant that does not know it.
    #[serde(default)]
    pub(super) ip: Option<IpAddr>,
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) has: request_response::json::Behaviour<HasRequest, HasResponse>,
    pub(super) claim: request_response::json::Behaviour<ClaimRequest, ClaimResponse>,
}

impl Behaviour {
    pub(super) fn new(key: &Keypair, config: &KademliaConfig) -> Behaviour {
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

/// TCP → (private-network handshake, with a key) → noise → yamux.
pub(super) fn build_swarm(
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
pub(super) async fn await_listening(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_answers_with_and_without_load_are_read() {
        type Case = (&'static str, &'static str, bool, Option<PeerLoad>);
        let cases: [Case; 3] = [
            ("older daemon, no load field", r#"{"has":true}"#, true, None),
            (
                "load reported",
                r#"{"has":true,"load":{"serving":3,"limit":8}}"#,
                true,
                Some(PeerLoad {
                    serving: 3,
                    limit: 8,
                }),
            ),
            (
                "does not hold it",
                r#"{"has":false,"load":null}"#,
                false,
                None,
            ),
        ];
        for (name, json, has, load) in cases {
            let r: HasResponse = match serde_json::from_str(json) {
                Ok(r) => r,
                Err(e) => panic!("{name}: {e}"),
            };
            assert_eq!((r.has, r.load), (has, load), "{name}");
        }
        // What we send reads back the same, and an older daemon's reader (has only) accepts it.
        let ours = HasResponse {
            has: true,
            load: Some(PeerLoad {
                serving: 1,
                limit: 0,
            }),
        };
        let json = serde_json::to_string(&ours).unwrap_or_default();
        #[derive(Deserialize)]
        struct Older {
            has: bool,
        }
        let older: Result<Older, _> = serde_json::from_str(&json);
        assert!(older.is_ok_and(|o| o.has), "{json}");
    }
}
