//! Who fetches a blob from upstream: the pure parts of the claim protocol, shared by both
//! routers.
//!
//! Every key has a *coordinator*: the node whose id is XOR-closest to the key (sha256 of both,
//! as Kademlia measures distance) among the nodes a router knows, itself included. Every node
//! that misses the key asks the coordinator; the first claim wins and holds for its TTL, and
//! every later claimant is told to follow the winner. In a small cluster every node knows every
//! other, so they all pick the same coordinator and exactly one node fetches; where views
//! differ (a node joining, a partition) two coordinators may each pick a winner: the blob is
//! then fetched twice, never zero times. `docs/cache.md` has the argument and its limits.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::Peer;

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node fetches the key (and advertises itself as an in-flight provider).
    Won,
    /// Another node fetches it: stream from there.
    Follow(Peer),
}

/// Longest TTL a coordinator grants, whatever a claimant asks for.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Most claims a coordinator keeps; the oldest expire first beyond it.
pub(crate) const MAX_CLAIMS: usize = 100_000;

/// The id in `ids` XOR-closest to `key` (sha256 of each); ties cannot happen for distinct ids.
pub fn coordinator<'a>(key: &str, ids: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let k = Sha256::digest(key.as_bytes());
    ids.into_iter().min_by_key(|id| {
        let h = Sha256::digest(id.as_bytes());
        let mut d = [0u8; 32];
        for (i, b) in d.iter_mut().enumerate() {
            *b = h[i] ^ k[i];
        }
        d
    })
}

/// A coordinator's claims: key → (winner id, expiry).
#[derive(Debug, Default)]
pub struct ClaimTable {
    claims: HashMap<String, (String, Instant)>,
}

impl ClaimTable {
    pub fn new() -> ClaimTable {
        ClaimTable::default()
    }

    /// Claims `key` for `claimant`: the current winner if its claim holds, else `claimant`
    /// (who then holds it for `ttl`, capped at [`MAX_TTL`]).
    pub fn decide(&mut self, key: &str, claimant: &str, ttl: Duration, now: Instant) -> String {
        if let Some((winner, until)) = self.claims.get(key)
            && *until > now
        {
            return winner.clone();
        }
        if self.claims.len() >= MAX_CLAIMS {
            self.claims.retain(|_, (_, until)| *until > now);
            if self.claims.len() >= MAX_CLAIMS {
                // Still full of live claims: forget the one closest to expiry.
                if let Some(k) = self
                    .claims
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone())
                {
                    self.claims.remove(&k);
                }
            }
        }
        self.claims.insert(
            key.to_owned(),
            (claimant.to_owned(), now + ttl.min(MAX_TTL)),
        );
        claimant.to_owned()
    }

    /// Ends `claimant`'s claim on `key` early (it finished or failed).
    pub fn release(&mut self, key: &str, claimant: &str) {
        if self.claims.get(key).is_some_and(|(w, _)| w == claimant) {
            self.claims.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_claim_wins_until_it_expires_or_is_released() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut table = ClaimTable::new();
        let cases: &[(&str, &str, u64, &str)] = &[
            ("first claimant wins", "b", 0, "b"),
            ("second follows", "c", 1, "b"),
            ("winner asking again still wins", "b", 2, "b"),
            ("after the ttl a new claimant wins", "c", 61, "c"),
            ("and holds it", "d", 62, "c"),
        ];
        for (name, who, at, want) in cases {
            let got = table.decide("k", who, ttl, t0 + Duration::from_secs(*at));
            assert_eq!(got, *want, "{name}");
        }
        table.release("k", "d");
        assert_eq!(
            table.decide("k", "d", ttl, t0 + Duration::from_secs(63)),
            "c",
            "only the winner releases"
        );
        table.release("k", "c");
        assert_eq!(
            table.decide("k", "d", ttl, t0 + Duration::from_secs(63)),
            "d"
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn everyone_agrees_on_the_coordinator_whatever_the_order() {
        let ids = ["node-a", "node-b", "node-c", "node-d"];
        for key in ["sha256:aa", "sha256:bb", "x", ""] {
            let one = coordinator(key, ids);
            let mut reversed = ids;
            reversed.reverse();
            assert_eq!(one, coordinator(key, reversed), "{key}");
            assert!(one.is_some());
        }
        assert_eq!(coordinator("k", []), None);
        // Keys spread over nodes (not all on one).
        let picked: std::collections::HashSet<_> = (0..64)
            .filter_map(|i| coordinator(&format!("sha256:{i:064x}"), ids))
            .collect();
        assert!(picked.len() > 1, "{picked:?}");
    }

    #[test]
    fn ttl_is_capped() {
        let t0 = Instant::now();
        let mut table = ClaimTable::new();
        table.decide("k", "a", Duration::from_secs(1_000_000), t0);
        assert_eq!(
            table.decide(
                "k",
                "b",
                Duration::ZERO,
                t0 + MAX_TTL + Duration::from_secs(1)
            ),
            "b"
        );
    }
}
