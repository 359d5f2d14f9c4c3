//! Helpers for tests that drive real `KademliaRouter`s on loopback.

use std::time::{Duration, Instant};

use speculum::routing::kademlia::KademliaRouter;
use speculum::routing::{Peer, Router};

/// Polls `check` every 50 ms until it holds; panics after `bound`. Returns the time taken.
pub async fn poll<F, Fut>(bound: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < bound, "{what}: not true after {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every peer one lookup of `key` returns, read until the lookup ends; panics if it has not
/// ended within `bound` (a lookup ends by its `lookup_timeout`).
pub async fn lookup_all(router: &KademliaRouter, key: &str, bound: Duration) -> Vec<Peer> {
    let mut rx = match router.lookup(key, 10).await {
        Ok(rx) => rx,
        Err(e) => panic!("lookup of {key} failed: {e}"),
    };
    let mut peers = Vec::new();
    let read = async {
        while let Some(p) = rx.recv().await {
            peers.push(p);
        }
    };
    if tokio::time::timeout(bound, read).await.is_err() {
        panic!("lookup of {key} did not end within {bound:?}");
    }
    peers
}
