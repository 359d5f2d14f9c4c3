//! How busy a node is serving its peers, one job: count the peer-serving streams in flight
//! against a cap, and say so in the `has` answer a lookup checks before handing a holder out.
//!
//! The registry's peer endpoint takes a [`ServingSlot`] per blob stream it serves
//! ([`ServingLoad::try_enter`]; `None` beyond the cap: answer 429 with `Retry-After`); the DHT
//! reports [`ServingLoad::now`] in its `has` answers, so an asker learns a holder's
//! [`PeerLoad`] with the liveness check it already makes (`Peer::load`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// A holder's load when it confirmed it has a key.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct PeerLoad {
    /// Peer-serving streams in flight.
    pub serving: u32,
    /// The holder's cap on them; `0`: no cap.
    pub limit: u32,
}

impl PeerLoad {
    /// Whether another stream would be refused (429) now.
    pub fn full(&self) -> bool {
        self.limit != 0 && self.serving >= self.limit
    }
}

/// The node's own count of peer-serving streams and its cap; cloned handles share one count.
#[derive(Debug, Clone, Default)]
pub struct ServingLoad {
    inner: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    serving: AtomicU32,
    limit: u32,
}

impl ServingLoad {
    /// A counter refusing more than `limit` streams at once (`0`: no cap).
    pub fn new(limit: u32) -> ServingLoad {
        ServingLoad {
            inner: Arc::new(Counts {
                serving: AtomicU32::new(0),
                limit,
            }),
        }
    }

    /// Takes a slot for one stream, or `None` when the cap is reached. The slot is given back
    /// when dropped (keep it in the response body so it lasts as long as the stream).
    pub fn try_enter(&self) -> Option<ServingSlot> {
        let limit = self.inner.limit;
        let taken = self
            .inner
            .serving
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            });
        taken.ok().map(|_| ServingSlot { load: self.clone() })
    }

    /// The load right now, as reported to askers.
    pub fn now(&self) -> PeerLoad {
        PeerLoad {
            serving: self.inner.serving.load(Ordering::Acquire),
            limit: self.inner.limit,
        }
    }
}

/// One peer-serving stream's place under the cap; released on drop.
#[derive(Debug)]
pub struct ServingSlot {
    load: ServingLoad,
}

impl Drop for ServingSlot {
    fn drop(&mut self) {
        self.load.inner.serving.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_refuses_beyond_limit_and_a_dropped_slot_frees_one() {
        let load = ServingLoad::new(2);
        let a = load.try_enter().expect("first");
        let _b = load.try_enter().expect("second");
        assert!(load.try_enter().is_none(), "third is over the cap");
        assert_eq!(
            load.now(),
            PeerLoad {
                serving: 2,
                limit: 2
            }
        );
        assert!(load.now().full());
        drop(a);
        assert_eq!(load.now().serving, 1);
        assert!(load.try_enter().is_some(), "a freed slot is taken again");
    }

    #[test]
    fn no_cap_never_refuses() {
        let load = ServingLoad::new(0);
        let slots: Vec<_> = (0..100)
            .map(|_| load.try_enter().expect("no cap"))
            .collect();
        assert_eq!(load.now().serving, 100);
        assert!(!load.now().full());
        drop(slots);
        assert_eq!(load.now().serving, 0);
    }
}
