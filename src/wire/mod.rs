//! Bytes on the wire between daemons, one job: what both the registry and the cache need to
//! talk to another daemon's peer endpoint, and nothing that knows a store, a policy or a
//! router. The hop header and the digest header, body streams ([`ByteStream`],
//! [`io_stream`]), [`resume`] (a stream that continues elsewhere when it breaks) and
//! [`peer_client`] (the one daemon→daemon HTTP client), [`chunks`] (one blob as parallel
//! `Range` chunks from several holders, in order) and [`verify`] (a whole blob checked
//! against its digest before its last byte goes out).
//!
//! Everything here sits below the seams (`store`, `routing`, `policy`) and the services that
//! combine them (`cache`, `registry`): it imports only `oci` and external crates (the layer
//! rule in `tests/loopback/layers.rs`).

pub mod chunks;
pub(crate) mod peer_client;
pub(crate) mod resume;
pub mod verify;

use bytes::Bytes;
use futures::StreamExt;
use http::header;

pub use peer_client::PeerClient;
pub use resume::{ByteStream, Reopen, resumable};

/// Sent on every request from one daemon to another. A mirror endpoint that receives it
/// serves from its own store only (loop prevention, in addition to the separate peer port).
pub const HOP_HEADER: &str = "x-speculum-hop";

/// The digest of a manifest or blob response (distribution spec, "Pulling manifests").
pub(crate) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// A reqwest body as a response body stream.
pub(crate) fn io_stream(
    s: impl futures::Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
) -> ByteStream {
    s.map(|r| r.map_err(std::io::Error::other)).boxed()
}

/// A header's value as text, when it is there and is text (headers of a peer response).
pub(crate) fn header_str(
    headers: &http::HeaderMap,
    name: impl header::AsHeaderName,
) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
