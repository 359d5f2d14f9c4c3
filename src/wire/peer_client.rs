//! The one daemon→daemon HTTP client: every request this daemon sends to another daemon's
//! peer endpoint (the mirror's fetches and resumes, the coalescer's follow and resumes) goes
//! through it, with the same timeouts (`mirror.connect_timeout`, `mirror.read_timeout`),
//! never through an HTTP(S) proxy, and always with the [`HOP_HEADER`](super::HOP_HEADER).
//!
//! It takes a socket address, not a `routing::Peer`, so that `wire` stays below the seams.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, StatusCode, header};

use super::{HOP_HEADER, header_str};
use crate::oci::range::parse_content_range;

/// How long an idle pooled connection to a peer is kept. Below the peer endpoint's own idle
/// timeout (`registry.idle_timeout`, 120 s), so this side closes first and never sends a
/// request into a connection the peer is closing.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// A reqwest client for peer endpoints. Cheap to clone (one connection pool).
#[derive(Clone, Debug)]
pub struct PeerClient {
    client: reqwest::Client,
}

impl PeerClient {
    /// `connect`: TCP connect timeout towards a peer. `read`: a peer that sends nothing for
    /// this long is treated as broken (a stream then resumes elsewhere).
    pub fn new(connect: Duration, read: Duration) -> Result<PeerClient, reqwest::Error> {
        let client = reqwest::Client::builder()
            // Peer traffic stays inside the cluster: never through an HTTP(S)_PROXY.
            .no_proxy()
            .connect_timeout(connect)
            .read_timeout(read)
            .pool_idle_timeout(POOL_IDLE)
            .build()?;
        Ok(PeerClient { client })
    }

    /// A request for `path` (path and query) at the peer endpoint `addr`, carrying the hop
    /// header and `headers` (the peer token, grants).
    pub fn request(
        &self,
        method: reqwest::Method,
        addr: SocketAddr,
        path: &str,
        headers: &HeaderMap,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("http://{addr}{path}"))
            .header(HOP_HEADER, "1")
            .headers(headers.clone())
    }

    /// A `GET` of `path` at `addr`, see [`PeerClient::request`].
    pub fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &HeaderMap,
    ) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, addr, path, headers)
    }

    /// Asks `addr` for the bytes `next..=end` of `path`: the response when it is a 206 that
    /// starts exactly at `next` (what a resumed stream needs), else `None`.
    pub async fn reopen_at(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &HeaderMap,
        next: u64,
        end: u64,
    ) -> Option<reqwest::Response> {
        let resp = self
            .get(addr, path, headers)
            .header(header::RANGE, format!("bytes={next}-{end}"))
            .send()
            .await
            .ok()?;
        starts_at(resp.status(), resp.headers(), next).then_some(resp)
    }
}

/// Is this a 206 whose `Content-Range` starts at byte `next`?
fn starts_at(status: StatusCode, headers: &HeaderMap, next: u64) -> bool {
    status == StatusCode::PARTIAL_CONTENT
        && header_str(headers, header::CONTENT_RANGE)
            .and_then(parse_content_range)
            .is_some_and(|(start, _, _)| start == next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_starts_at_table() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            if let Ok(v) = v.parse() {
                h.insert(header::CONTENT_RANGE, v);
            }
            h
        };
        let cases = [
            (
                "206 at next",
                StatusCode::PARTIAL_CONTENT,
                with("bytes 5-9/10"),
                5,
                true,
            ),
            (
                "206 elsewhere",
                StatusCode::PARTIAL_CONTENT,
                with("bytes 0-9/10"),
                5,
                false,
            ),
            ("200 whole", StatusCode::OK, with("bytes 5-9/10"), 5, false),
            (
                "206 without range",
                StatusCode::PARTIAL_CONTENT,
                HeaderMap::new(),
                5,
                false,
            ),
            (
                "206 unknown total",
                StatusCode::PARTIAL_CONTENT,
                with("bytes 5-9/*"),
                5,
                true,
            ),
        ];
        for (name, status, headers, next, want) in cases {
            assert_eq!(starts_at(status, &headers, next), want, "{name}");
        }
    }
}
