//! Advertising: the publish queue that bounds concurrent announcements, republishing, and
//! the index of provider records other peers gave us (dropped when they go).

use libp2p::kad::{self, store::RecordStore as _};
use tracing::warn;

use super::config::record_key;
use super::node::Node;

/// How many provider announcements run at once; the rest wait in a queue, so advertising
/// tens of thousands of blobs at start-up does not open tens of thousands of queries.
const MAX_PUBLISHING: usize = 32;

impl Node {
    pub(super) fn enqueue(&mut self, key: String) {
        if self.queued.insert(key.clone()) {
            self.publish_queue.push_back(key);
        }
    }

    /// Announces queued keys, at most `MAX_PUBLISHING` at a time.
    pub(super) fn pump_publish(&mut self) {
        while self.publishing.len() < MAX_PUBLISHING {
            let Some(key) = self.publish_queue.pop_front() else {
                return;
            };
            self.queued.remove(&key);
            if !self.advertised.contains(&key) {
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
        let keys: Vec<String> = self.advertised.iter().cloned().collect();
        for key in keys {
            self.enqueue(key);
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
