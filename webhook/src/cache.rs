//! The resolution cache: `(reference, credential identity) → digest`, each entry living for a
//! fixed TTL.
//!
//! Keyed by credential identity so that a digest resolved with one pull secret is never handed
//! to a request holding another (or none): a tag can point at different content for different
//! users, and a cached answer must not leak that one user could read a private image. Only
//! successes are stored; the caller never inserts failures. Time is `tokio::time::Instant`, so
//! tests drive expiry with `tokio::time::pause()`/`advance()`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The normalised reference (`registry/repository:tag`).
    pub reference: String,
    /// [`crate::credentials::Credential::identity`] or [`crate::credentials::ANONYMOUS`].
    pub identity: String,
}

/// A bounded TTL map. A std `Mutex` suffices: it is never held across an `.await`.
#[derive(Debug)]
pub struct Cache<V> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Key, (Instant, V)>>,
}

impl<V: Clone> Cache<V> {
    /// `capacity` bounds memory: when full, expired entries go first, then the oldest.
    pub fn new(ttl: Duration, capacity: usize) -> Cache<V> {
        Cache {
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &Key) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((at, v)) if at.elapsed() < self.ttl => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, key: Key, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            if map.len() >= self.capacity
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(key, (Instant::now(), value));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(r: &str, id: &str) -> Key {
        Key {
            reference: r.into(),
            identity: id.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_identity_and_capacity() {
        let c: Cache<&str> = Cache::new(Duration::from_secs(60), 2);
        c.insert(key("r/a:1", "alice"), "d1");
        assert_eq!(c.get(&key("r/a:1", "alice")), Some("d1"));
        assert_eq!(
            c.get(&key("r/a:1", "bob")),
            None,
            "another credential never sees it"
        );
        assert_eq!(c.get(&key("r/a:1", "anonymous")), None);

        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(c.get(&key("r/a:1", "alice")), Some("d1"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get(&key("r/a:1", "alice")), None, "expired");
        assert!(c.is_empty());

        c.insert(key("a", "x"), "1");
        tokio::time::advance(Duration::from_secs(1)).await;
        c.insert(key("b", "x"), "2");
        c.insert(key("c", "x"), "3");
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key("a", "x")), None, "oldest evicted");
        assert_eq!(c.get(&key("c", "x")), Some("3"));
    }

    #[test]
    fn zero_ttl_disables() {
        let c: Cache<u8> = Cache::new(Duration::ZERO, 10);
        c.insert(key("a", "x"), 1);
        assert_eq!(c.get(&key("a", "x")), None);
    }
}
