use std::fmt;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex, PoisonError};

use hashbrown::HashMap;

use super::{Acquire, ConcurrencyStore};
use crate::key::KeyHasher;
use crate::{Key, StoreError};

/// Requests in flight counted in this process: the concurrency store of a single instance.
///
/// Slots are plain counters; a [`MemoryPermit`] gives its slot back when dropped. A key with no
/// request in flight takes no memory. With N instances each counts alone: use the Redis
/// concurrency store when the limit must hold across instances.
#[derive(Clone)]
pub struct MemoryConcurrencyStore {
    inner: Arc<Inner>,
}

struct Inner {
    counts: Mutex<HashMap<(u64, u64), u32>>,
    hasher: KeyHasher,
}

impl MemoryConcurrencyStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryConcurrencyStore {
            inner: Arc::new(Inner {
                counts: Mutex::new(HashMap::new()),
                hasher: KeyHasher::new(),
            }),
        }
    }

    /// Requests in flight for `key`.
    pub fn in_flight(&self, key: &Key<'_>) -> u32 {
        let counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts
            .get(&key.hash128(&self.inner.hasher))
            .copied()
            .unwrap_or(0)
    }

    /// The number of keys with requests in flight.
    pub fn keys(&self) -> usize {
        self.inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Default for MemoryConcurrencyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryConcurrencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConcurrencyStore")
            .field("keys", &self.keys())
            .finish()
    }
}

impl ConcurrencyStore for MemoryConcurrencyStore {
    type Permit = MemoryPermit;
    type Future = Ready<Result<Acquire<MemoryPermit>, StoreError>>;

    fn acquire(&self, key: &Key<'_>, limit: u32) -> Self::Future {
        let slot = key.hash128(&self.inner.hasher);
        let mut counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(slot).or_insert(0);
        if *count >= limit {
            let in_flight = *count;
            if in_flight == 0 {
                counts.remove(&slot);
            }
            return ready(Ok(Acquire::Full { in_flight }));
        }
        *count += 1;
        let in_flight = *count;
        ready(Ok(Acquire::Acquired {
            permit: MemoryPermit {
                inner: Arc::clone(&self.inner),
                slot,
            },
            in_flight,
        }))
    }
}

/// A slot of a [`MemoryConcurrencyStore`], given back when dropped.
pub struct MemoryPermit {
    inner: Arc<Inner>,
    slot: (u64, u64),
}

impl Drop for MemoryPermit {
    fn drop(&mut self) {
        let mut counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.slot) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.slot);
            }
        }
    }
}

impl fmt::Debug for MemoryPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPermit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(s: &MemoryConcurrencyStore, key: &Key<'_>, limit: u32) -> Acquire<MemoryPermit> {
        s.acquire(key, limit).into_inner().unwrap()
    }

    #[test]
    fn at_most_limit_and_slots_come_back_on_drop() {
        let s = MemoryConcurrencyStore::new();
        let key = Key::new("p", "/r", None, Some("u"));
        let a = acquire(&s, &key, 2);
        let b = acquire(&s, &key, 2);
        assert!(matches!(
            acquire(&s, &key, 2),
            Acquire::Full { in_flight: 2 }
        ));
        assert_eq!(s.in_flight(&key), 2);
        drop(a);
        assert!(matches!(
            acquire(&s, &key, 2),
            Acquire::Acquired { in_flight: 2, .. }
        ));
        drop(b);
        // The slot acquired just above was dropped with its Acquire: nothing is held.
        assert_eq!(s.in_flight(&key), 0);
        assert_eq!(s.keys(), 0);
    }

    #[test]
    fn threads_holding_slots_at_once_get_exactly_the_limit_and_keys_are_independent() {
        use std::sync::Barrier;
        use std::sync::atomic::{AtomicU32, Ordering};
        let s = MemoryConcurrencyStore::new();
        // Six threads, two keys, a limit of 2: in each round every thread asks for a slot and
        // holds what it got until all have asked, so the store must refuse the extra ones.
        let (threads, rounds) = (6, 200);
        let asked = Barrier::new(threads);
        let counted = Barrier::new(threads);
        let held = [AtomicU32::new(0), AtomicU32::new(0)];
        let refused = [AtomicU32::new(0), AtomicU32::new(0)];
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (s, asked, counted, held, refused) = (&s, &asked, &counted, &held, &refused);
                scope.spawn(move || {
                    let user = if t % 2 == 0 { "even" } else { "odd" };
                    let key = Key::new("p", "/r", None, Some(user));
                    for _ in 0..rounds {
                        let got = acquire(s, &key, 2);
                        match &got {
                            Acquire::Acquired { .. } => held[t % 2].fetch_add(1, Ordering::SeqCst),
                            Acquire::Full { .. } => refused[t % 2].fetch_add(1, Ordering::SeqCst),
                        };
                        asked.wait();
                        drop(got);
                        counted.wait();
                    }
                });
            }
        });
        // Each key had three threads asking per round: two held, one refused, every round.
        for k in 0..2 {
            assert_eq!(held[k].load(Ordering::SeqCst), 2 * rounds);
            assert_eq!(refused[k].load(Ordering::SeqCst), rounds);
        }
        assert_eq!(s.keys(), 0);
    }
}
