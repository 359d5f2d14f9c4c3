//! Advertising: the publish queues (urgent keys — tags, manifests — first; the backlog paced
//! at `publish_rate`), at most `publish_concurrency` announcements in flight, republishing,
//! and the index of provider records other peers gave us (dropped when they go).

use libp2p::kad::{self, store::RecordStore as _};
use tokio::time::Instant;
use tracing::warn;

use super::config::record_key;
use super::node::Node;

/// Fewest backlog announcements a paced queue may save up while idle (a burst after a pause);
/// at high rates half a second's worth, so the 200 ms housekeeping tick alone keeps the rate.
const MIN_SAVED_TOKENS: f64 = 64.0;

impl Node {
    /// Queues `key` for announcement; `urgent` keys (tags, manifests: they gate a pull) go
    /// before the backlog and are not paced. A key already queued as backlog stays there
    /// unless it comes again as urgent, which moves it ahead.
    pub(super) fn enqueue(&mut self, key: String, urgent: bool) {
        if urgent {
            if !self.urgent_queue.contains(&key) {
                self.queued.insert(key.clone());
                self.urgent_queue.push_back(key);
            }
        } else if self.queued.insert(key.clone()) {
            self.publish_queue.push_back(key);
        }
    }

    /// Whether the backlog may announce one more key now (`publish_rate` tokens per second).
    fn take_token(&mut self) -> bool {
        let rate = self.config.publish_rate;
        if rate == 0 {
            return true;
        }
        let now = Instant::now();
        let earned = now.duration_since(self.tokens_at).as_secs_f64() * f64::from(rate);
        self.tokens_at = now;
        let most = MIN_SAVED_TOKENS.max(f64::from(rate) / 2.0);
        self.publish_tokens = (self.publish_tokens + earned).min(most);
        if self.publish_tokens >= 1.0 {
            self.publish_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Announces queued keys, urgent ones first, at most `publish_concurrency` at a time; the
    /// backlog as its pacing allows (the housekeeping tick calls this again).
    pub(super) fn pump_publish(&mut self) {
        while self.publishing.len() < self.config.publish_concurrency {
            let key = match self.urgent_queue.pop_front() {
                Some(key) => key,
                None => {
                    if self.publish_queue.is_empty() || !self.take_token() {
                        return;
                    }
                    let Some(key) = self.publish_queue.pop_front() else {
                        return;
                    };
                    if !self.queued.contains(&key) {
                        continue; // announced already, as urgent
                    }
                    key
                }
            };
            self.queued.remove(&key);
            if !self.advertised.contains_key(&key) {
                continue; // withdrawn while queued
            }
            match self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(record_key(&key))
            {
                Ok(id) => {
                    self.publishing.insert(id);
                }
                Err(e) => warn!(key = %key, error = %e, "cannot advertise key"),
            }
        }
    }

    pub(super) fn republish(&mut self) {
        let keys: Vec<(String, bool)> = self
            .advertised
            .iter()
            .map(|(k, urgent)| (k.clone(), *urgent))
            .collect();
        for (key, urgent) in keys {
            self.enqueue(key, urgent);
        }
        self.prune_given();
    }

    /// Forgets index entries whose record expired or was replaced, so the index does not grow
    /// with keys a long-lived peer advertised once.
    fn prune_given(&mut self) {
        let now = std::time::Instant::now();
        let store = self.swarm.behaviour_mut().kad.store_mut();
        for (peer, keys) in self.given.iter_mut() {
            keys.retain(|k| {
                store
                    .providers(k)
                    .iter()
                    .any(|r| r.provider == *peer && !r.is_expired(now))
            });
        }
        self.given.retain(|_, keys| !keys.is_empty());
    }

    pub(super) fn on_provider_record(&mut self, record: kad::ProviderRecord) {
        let peer = record.provider;
        // A record from a peer that is already gone would never be dropped: refuse it.
        if !self.conns.values().any(|c| c.peer == peer) {
            return;
        }
        let key = record.key.clone();
        match self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .add_provider(record)
        {
            Ok(()) => {
                self.given.entry(peer).or_default().insert(key);
            }
            Err(e) => warn!(peer.id = %peer, error = %e, "provider record not stored"),
        }
    }
}
