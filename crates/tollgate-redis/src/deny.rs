//! The deny cache: once Redis says a key is refused for a while, refuse it locally until then.
//!
//! What it may get wrong, and why that is safe: while a key is cached here, requests of other
//! costs (here) or on other instances may still be allowed by Redis and push the real wait
//! further out; the cached answer then understates `Retry-After`, and the client's retry is
//! refused by Redis with the exact wait. It never lets through a request Redis would refuse. An
//! allowed answer from Redis for the key drops the entry here.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tollgate::{Algorithm, Decision};

const SHARDS: usize = 16;

/// Refusals Redis handed out, by key, until their wait is over.
///
/// It only ever refuses, and only what Redis refused: a request is answered from here only
/// while the wait Redis gave for a request of at least its cost has not run out (measured from
/// when the answer arrived, so a little longer than Redis itself would, never shorter). Bounded:
/// a full shard first drops expired entries and otherwise caches nothing more.
pub(crate) struct DenyCache {
    shards: Box<[Mutex<HashMap<u64, Entry>>]>,
    per_shard: usize,
    hasher: RandomState,
    /// The longest a refusal is trusted, in ns.
    ttl_ns: u64,
}

/// A key's place in a [`DenyCache`]: its shard and its hash there.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DenyKey {
    shard: usize,
    hash: u64,
}

struct Entry {
    decision: Decision,
    /// When the refusal arrived and when its wait ends, in the store's nanoseconds.
    at: u64,
    until: u64,
    cost: u32,
}

impl DenyCache {
    pub(crate) fn new(max_entries: usize, ttl: Duration) -> Self {
        DenyCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_entries.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Where the key whose hash tag is `tag` lives here: hashed once per check, for the look-up
    /// before the round trip and the update after it.
    pub(crate) fn key(&self, tag: &str) -> DenyKey {
        let h = self.hasher.hash_one(tag);
        DenyKey {
            shard: (h >> 59) as usize % SHARDS,
            hash: h,
        }
    }

    /// The refusal still standing for this key and a request of `cost`, if any.
    pub(crate) fn get(&self, key: DenyKey, cost: u32, now: u64) -> Option<Decision> {
        let DenyKey { shard, hash: h } = key;
        let mut map = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = map.get(&h)?;
        if now >= entry.until {
            map.remove(&h);
            return None;
        }
        // A cheaper request may fit earlier, and a dearer one waits longer, than the one Redis
        // refused: only the same cost gets the same answer.
        if cost != entry.cost {
            return None;
        }
        entry
            .decision
            .later(Duration::from_nanos(now.saturating_sub(entry.at)))
    }

    /// Remembers a refusal that arrived at `now`.
    pub(crate) fn put(&self, key: DenyKey, cost: u32, decision: &Decision, now: u64) {
        let Some(wait) = decision.retry_after() else {
            return;
        };
        // A sliding window's count decays continuously in a way the cache cannot replay
        // exactly; such decisions always ask Redis.
        if decision
            .states()
            .iter()
            .any(|s| s.quota().algorithm() == Algorithm::SlidingWindow)
        {
            return;
        }
        let wait = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        let until = now.saturating_add(wait.min(self.ttl_ns));
        let DenyKey { shard, hash: h } = key;
        let mut map = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.per_shard && !map.contains_key(&h) {
            map.retain(|_, e| e.until > now);
            if map.len() >= self.per_shard {
                return;
            }
        }
        map.insert(
            h,
            Entry {
                decision: decision.clone(),
                at: now,
                until,
                cost,
            },
        );
    }

    /// Forgets a key: Redis allowed a request of it (of another cost), so the state moved on.
    pub(crate) fn forget(&self, key: DenyKey) {
        let DenyKey { shard, hash: h } = key;
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&h);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate::{Quota, QuotaState};

    fn refusal(wait_ms: u64) -> Decision {
        let q: Quota = "5/10s".parse().unwrap();
        Decision::from_states([QuotaState::new(
            q,
            false,
            0,
            Duration::from_secs(10),
            Duration::from_millis(wait_ms),
        )])
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn refuses_until_the_wait_is_over_and_never_after() {
        let c = DenyCache::new(100, Duration::from_secs(3600));
        c.put(c.key("k"), 1, &refusal(2_000), 0);
        let d = c.get(c.key("k"), 1, 500 * MS).unwrap();
        assert_eq!(d.retry_after(), Some(Duration::from_millis(1_500)));
        assert!(c.get(c.key("k"), 1, 2_000 * MS).is_none());
        // Another key is not affected.
        c.put(c.key("k"), 1, &refusal(2_000), 0);
        assert!(c.get(c.key("other"), 1, 0).is_none());
    }

    #[test]
    fn a_refusal_is_trusted_for_the_ttl_at_most() {
        let c = DenyCache::new(100, Duration::from_secs(10));
        // Redis said: wait a day.
        c.put(c.key("k"), 1, &refusal(86_400_000), 0);
        assert!(c.get(c.key("k"), 1, 9_999 * MS).is_some());
        assert!(c.get(c.key("k"), 1, 10_000 * MS).is_none());
    }

    #[test]
    fn only_the_same_cost_gets_the_cached_answer() {
        let c = DenyCache::new(100, Duration::from_secs(3600));
        c.put(c.key("k"), 3, &refusal(2_000), 0);
        assert!(c.get(c.key("k"), 2, MS).is_none());
        assert!(c.get(c.key("k"), 3, MS).is_some());
        assert!(c.get(c.key("k"), 4, MS).is_none());
    }

    #[test]
    fn sliding_window_refusals_are_not_cached() {
        let c = DenyCache::new(100, Duration::from_secs(3600));
        let q: Quota = "5/10s sliding-window".parse().unwrap();
        let d = Decision::from_states([QuotaState::new(
            q,
            false,
            0,
            Duration::from_secs(10),
            Duration::from_secs(1),
        )]);
        c.put(c.key("k"), 1, &d, 0);
        assert!(c.get(c.key("k"), 1, 0).is_none());
    }

    #[test]
    fn allowed_decisions_are_not_cached_and_the_size_is_bounded() {
        let c = DenyCache::new(32, Duration::from_secs(3600));
        let q: Quota = "5/10s".parse().unwrap();
        let allowed =
            Decision::from_states([QuotaState::new(q, true, 4, Duration::ZERO, Duration::ZERO)]);
        c.put(c.key("a"), 1, &allowed, 0);
        assert_eq!(c.len(), 0);
        for i in 0..10_000 {
            c.put(c.key(&i.to_string()), 1, &refusal(60_000), 0);
        }
        assert!(c.len() <= 32, "{}", c.len());
        // Expired entries make room.
        c.put(c.key("late"), 1, &refusal(1_000), 120_000 * MS);
        assert!(c.get(c.key("late"), 1, 120_000 * MS).is_some());
    }
}
