//! The `Router` seam: which nodes hold a piece of content, and telling others what we hold.
//!
//! Keys are strings: a digest (`sha256:…`) for content, `registry/repository:tag` for a tag.
//! Two implementations: [`kademlia::KademliaRouter`] (libp2p Kademlia DHT, the real one) and
//! [`memory::MemoryRouter`] (the twin for unit tests), held to one [`conformance`] suite.
//! [`psk`] reads the private network's pre-shared key; [`metrics`] holds the routing metrics;
//! [`load`] counts the node's peer-serving streams and carries a holder's load to askers.
//! What this node advertises is kept in step with its store by `src/advertise.rs`, a service
//! above this seam.

pub mod bootstrap;
pub mod claim;
pub mod conformance;
pub mod kademlia;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod psk;

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use claim::Claim;
pub use load::{PeerLoad, ServingLoad, ServingSlot};

/// Another node that holds a key, and where its registry endpoint listens. Two `Peer`s are
/// the same peer when `id` and `addr` are; `load` is what it said, not who it is.
#[derive(Debug, Clone)]
pub struct Peer {
    /// libp2p peer id (or any stable node id for the twin); used in logs and metrics.
    pub id: String,
    /// The peer's registry endpoint (its IP and the cluster-wide registry port).
    pub addr: SocketAddr,
    /// Its load when it confirmed it holds the key; `None`: not reported (the twin, an older
    /// daemon).
    pub load: Option<PeerLoad>,
}

impl Peer {
    /// A peer that reported no load.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Peer {
        Peer {
            id: id.into(),
            addr,
            load: None,
        }
    }
}

impl PartialEq for Peer {
    fn eq(&self, other: &Peer) -> bool {
        self.id == other.id && self.addr == other.addr
    }
}

impl Eq for Peer {}

impl std::hash::Hash for Peer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.addr.hash(state);
    }
}

/// Errors of the routing seam.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("router is shut down")]
    Closed,
    #[error("routing failed: {0}")]
    Failed(String),
}

/// Finds and announces content holders. See the module docs.
#[async_trait]
pub trait Router: Send + Sync + 'static {
    /// True once the router can answer lookups. A lone node is ready: it can still serve its
    /// own content, and lookups then simply find nobody.
    fn ready(&self) -> bool;

    /// Finds up to `limit` peers holding `key`, excluding this node. Peers are sent as they
    /// are found; the channel closes when the lookup is over. Only peers believed alive are
    /// returned: a node that died must stop appearing within 60 seconds.
    async fn lookup(&self, key: &str, limit: usize) -> Result<mpsc::Receiver<Peer>, RouterError>;

    /// Announces that this node holds `keys`. Idempotent. A router may announce a large batch
    /// over time (paced); tag keys go first.
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// [`Router::advertise`] for keys that gate a pull (tags, manifests): announced before
    /// any backlog, never paced. Idempotent; a key advertised earlier moves ahead.
    async fn advertise_first(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.advertise(keys).await
    }

    /// Stops announcing `keys`. Idempotent.
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// Asks `key`'s coordinator (see [`claim`]) who fetches it from upstream: the first
    /// claimant wins for `ttl`, later ones are told to follow it. An error (coordinator
    /// unreachable) means "fetch it yourself": coalescing never fails a pull.
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim, RouterError>;
}
