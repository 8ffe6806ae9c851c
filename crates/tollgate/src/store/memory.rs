use std::fmt;
use std::future::{Ready, ready};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashMap;
use smallvec::SmallVec;

use super::{Store, StoreError};
use crate::algorithm::{self, Eval, State};
use crate::clock::{Clock, MonotonicClock};
use crate::decision::{Decision, QuotaState};
use crate::key::KeyHasher;
use crate::{Key, Quota};

const DEFAULT_MAX_KEYS: usize = 1_000_000;
const DEFAULT_SHARDS: usize = 64;
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Rate-limit state kept in this process: the default store.
///
/// - **Concurrent**: keys are spread over independently locked shards, so threads deciding
///   different keys rarely wait on each other.
/// - **Bounded**: each tracked quota costs one 16-byte hash and a 16-byte state (a timestamp
///   and two counters; the key itself is not kept): a 33-byte map bucket. Keys whose state has expired are swept by the shards themselves as
///   requests pass (every 5 seconds per shard by default); no background task and no call from
///   the user is needed. A maximum number of keys (1 000 000 by default: at most 64 shards of
///   32 768 buckets, 69 MB) holds even
///   under a flood of new keys: when a shard is full it drops expired keys and, if that is not
///   enough, the eighth of its keys closest to expiry, which are the ones whose loss loosens the
///   limit least. Evictions are counted in `ratelimit_store_evictions_total`.
/// - **Exact**: GCRA on a monotonic clock in integer nanoseconds. The clock can be replaced for
///   tests with [`ManualClock`](crate::clock::ManualClock).
///
/// Keys are indexed by a 128-bit hash (two randomly seeded 64-bit `ahash` hashes), so clients
/// cannot choose keys that collide.
///
/// A memory store limits each instance separately: behind a load balancer with N instances a
/// client gets up to N times the limit. Use the Redis store when instances must share one limit.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tollgate::clock::ManualClock;
/// use tollgate::{Key, MemoryStore, Quota};
///
/// let clock = ManualClock::new();
/// let store = MemoryStore::builder().clock(clock.clone()).max_keys(10_000).build();
/// let quota = [Quota::per_second(2).unwrap()];
/// let key = Key::new("api", "/hello", None, None::<&str>);
///
/// assert!(store.decide(&key, &quota, 1).unwrap().is_allowed());
/// assert!(store.decide(&key, &quota, 1).unwrap().is_allowed());
/// let third = store.decide(&key, &quota, 1).unwrap();
/// assert_eq!(third.retry_after(), Some(Duration::from_millis(500)));
///
/// clock.advance(Duration::from_millis(500));
/// assert!(store.decide(&key, &quota, 1).unwrap().is_allowed());
/// ```
pub struct MemoryStore<C = MonotonicClock> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    clock: C,
    shards: Box<[Shard]>,
    shard_mask: usize,
    hasher: KeyHasher,
    max_keys_per_shard: usize,
    sweep_interval_ns: u64,
}

/// One shard, on its own cache lines so that two threads on two shards do not share one.
#[repr(align(128))]
struct Shard {
    state: Mutex<ShardState>,
}

struct ShardState {
    /// Hash of (key, quota index) -> the quota's state (see `algorithm::State`).
    map: HashMap<Slot, State, BuildHasherDefault<PrehashedHasher>>,
    next_sweep_ns: u64,
}

impl MemoryStore<MonotonicClock> {
    /// A store with the default settings and the monotonic clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a store.
    pub fn builder() -> MemoryStoreBuilder<MonotonicClock> {
        MemoryStoreBuilder {
            clock: MonotonicClock::new(),
            max_keys: DEFAULT_MAX_KEYS,
            shards: DEFAULT_SHARDS,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }
}

impl<C: Clock> MemoryStore<C> {
    /// A store with the default settings and the given clock.
    pub fn with_clock(clock: C) -> Self {
        MemoryStore::builder().clock(clock).build()
    }

    /// Decides one request now, synchronously. [`Store::check`] is this, ready at once.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::CostExceedsBurst`](super::StoreErrorKind::CostExceedsBurst) when the
    /// cost exceeds a quota's burst; the memory store cannot fail otherwise.
    pub fn decide(
        &self,
        key: &Key<'_>,
        quotas: &[Quota],
        cost: u32,
    ) -> Result<Decision, StoreError> {
        StoreError::check_cost(quotas, cost)?;
        let inner = &*self.inner;
        let hash = key.hash128(&inner.hasher);
        // The high half picks the shard, the low half indexes within it: every quota of one
        // key lives in one shard, so one lock makes the decision atomic.
        let shard = &inner.shards[((hash >> 64) as usize) & inner.shard_mask];
        let mut state = lock(&shard.state);
        let now = inner.clock.now_ns();
        if now >= state.next_sweep_ns {
            state.map.retain(|_, s| s.t > now);
            state.next_sweep_ns = now.saturating_add(inner.sweep_interval_ns);
        }

        let mut evals: SmallVec<[Eval; 2]> = SmallVec::with_capacity(quotas.len());
        let mut new_entries = 0;
        for (i, quota) in quotas.iter().enumerate() {
            let stored = state.map.get(&entry_key(hash, i)).copied();
            new_entries += usize::from(stored.is_none());
            let offset = algorithm::window_offset(key, quota);
            evals.push(algorithm::eval(quota, now, stored, cost, offset));
        }
        let allowed = evals.iter().all(|e| e.allowed);
        if allowed {
            if new_entries > 0 && state.map.len() + new_entries > inner.max_keys_per_shard {
                make_room(&mut state, now, inner.max_keys_per_shard, new_entries);
            }
            for (i, e) in evals.iter().enumerate() {
                if let Some(write) = e.write {
                    let slot = entry_key(hash, i);
                    match state.map.get_mut(&slot) {
                        Some(stored) => *stored = write,
                        None => {
                            state.map.insert(slot, write);
                        }
                    }
                }
            }
        }
        drop(state);

        Ok(Decision::from_states(quotas.iter().zip(&evals).map(
            |(quota, e)| {
                let r = if allowed { e.spent } else { e.unspent };
                QuotaState::new(
                    *quota,
                    e.allowed,
                    r.remaining,
                    Duration::from_nanos(r.reset_after_ns),
                    Duration::from_nanos(r.retry_after_ns),
                )
            },
        )))
    }

    /// The number of quota states held (one per key and quota), expired or not.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(&s.state).map.len())
            .sum()
    }

    /// Whether the store holds no state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every expired state now, in every shard. Shards do this by themselves as requests
    /// pass; call this only to measure or to free memory after traffic stopped.
    pub fn sweep(&self) {
        let now = self.inner.clock.now_ns();
        for shard in self.inner.shards.iter() {
            let mut state = lock(&shard.state);
            state.map.retain(|_, s| s.t > now);
            state.map.shrink_to_fit();
        }
    }
}

/// A 128-bit hash as two `u64`s: a `u128` would be 16-byte aligned and make every map bucket
/// 32 bytes instead of 24.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Slot {
    lo: u64,
    hi: u64,
}

impl std::hash::Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.lo);
    }
}

fn entry_key(hash: u128, quota_index: usize) -> Slot {
    let hash = hash ^ quota_index as u128;
    Slot {
        lo: hash as u64,
        hi: (hash >> 64) as u64,
    }
}

/// A poisoned shard only means a thread panicked while holding it; its map is still a valid
/// map of timestamps, so keep using it rather than failing every later request.
fn lock(m: &Mutex<ShardState>) -> MutexGuard<'_, ShardState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cold]
fn make_room(state: &mut ShardState, now: u64, cap: usize, needed: usize) {
    let before = state.map.len();
    state.map.retain(|_, s| s.t > now);
    if state.map.len() + needed > cap {
        // Still full of live keys (a flood of new clients): drop the eighth closest to expiry.
        let mut expiries: Vec<u64> = state.map.values().map(|s| s.t).collect();
        let evict = (expiries.len() / 8).max(needed).min(expiries.len());
        if evict > 0 {
            let (_, &mut threshold, _) = expiries.select_nth_unstable(evict - 1);
            state.map.retain(|_, s| s.t > threshold);
        }
    }
    let evicted = before - state.map.len();
    crate::metrics::store_evictions(evicted as u64);
}

impl<C: Clock> Store for MemoryStore<C> {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        ready(self.decide(key, quotas, cost))
    }
}

impl Default for MemoryStore<MonotonicClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> Clone for MemoryStore<C> {
    fn clone(&self) -> Self {
        MemoryStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for MemoryStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field(
                "max_keys",
                &(self.inner.max_keys_per_shard * self.inner.shards.len()),
            )
            .finish_non_exhaustive()
    }
}

/// Settings of a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder<C> {
    clock: C,
    max_keys: usize,
    shards: usize,
    sweep_interval: Duration,
}

impl<C: Clock> MemoryStoreBuilder<C> {
    /// The most quota states the store holds (default 1 000 000). Each shard's map has a
    /// power-of-two number of 33-byte buckets, at most 7/8 full: about 38 to 76 bytes per state,
    /// 69 MB at the default. Values below the number of shards are raised to it.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The number of shards, rounded up to a power of two (default 64).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// How often each shard drops its expired states (default 5 s; at least 1 ms).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Replaces the clock, for example with a [`ManualClock`](crate::clock::ManualClock).
    pub fn clock<C2: Clock>(self, clock: C2) -> MemoryStoreBuilder<C2> {
        MemoryStoreBuilder {
            clock,
            max_keys: self.max_keys,
            shards: self.shards,
            sweep_interval: self.sweep_interval,
        }
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore<C> {
        let shards = self.shards.clamp(1, 1 << 16).next_power_of_two();
        let max_keys_per_shard = self.max_keys.div_ceil(shards).max(1);
        let sweep_interval_ns = u64::try_from(self.sweep_interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1_000_000);
        let shards = (0..shards)
            .map(|_| Shard {
                state: Mutex::new(ShardState {
                    map: HashMap::default(),
                    next_sweep_ns: sweep_interval_ns,
                }),
            })
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                clock: self.clock,
                shards,
                shard_mask: (self.shards.clamp(1, 1 << 16).next_power_of_two()) - 1,
                hasher: KeyHasher::new(),
                max_keys_per_shard,
                sweep_interval_ns,
            }),
        }
    }
}

/// The map keys are already randomly seeded hash outputs: hashing them again would only cost
/// time.
#[derive(Default)]
struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(i: u32) -> Key<'static> {
        Key::new("p", "/r", Some(IpAddr::V4(Ipv4Addr::from(i))), None::<&str>)
    }

    fn store(clock: &ManualClock, max_keys: usize) -> MemoryStore<ManualClock> {
        MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(max_keys)
            .shards(4)
            .build()
    }

    #[test]
    fn limits_per_key() {
        let clock = ManualClock::new();
        let s = store(&clock, 100);
        let q = [Quota::new(5, Duration::from_secs(10)).unwrap()];
        let allowed: Vec<bool> = (0..6)
            .map(|_| s.decide(&key(1), &q, 1).unwrap().is_allowed())
            .collect();
        assert_eq!(allowed, [true, true, true, true, true, false]);
        // Another key is untouched.
        assert_eq!(s.decide(&key(2), &q, 1).unwrap().remaining(), 4);
        clock.advance(Duration::from_secs(2));
        assert!(s.decide(&key(1), &q, 1).unwrap().is_allowed());
        assert!(!s.decide(&key(1), &q, 1).unwrap().is_allowed());
    }

    #[test]
    fn several_quotas_are_decided_together() {
        let clock = ManualClock::new();
        let s = store(&clock, 100);
        // 2 per second and 3 per minute.
        let q = [Quota::per_second(2).unwrap(), Quota::per_minute(3).unwrap()];
        let k = key(1);
        assert!(s.decide(&k, &q, 1).unwrap().is_allowed());
        assert!(s.decide(&k, &q, 1).unwrap().is_allowed());
        let third = s.decide(&k, &q, 1).unwrap();
        assert!(third.is_limited());
        assert!(!third.states()[0].is_allowed() && third.states()[1].is_allowed());
        clock.advance(Duration::from_secs(1));
        assert!(s.decide(&k, &q, 1).unwrap().is_allowed());
        // The per-minute quota is now spent; the per-second one refills but must not be spent
        // by refused requests.
        clock.advance(Duration::from_secs(1));
        let refused = s.decide(&k, &q, 1).unwrap();
        assert!(refused.is_limited());
        assert!(refused.states()[0].is_allowed());
        assert_eq!(refused.states()[0].remaining(), 2);
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(18)));
        // Still the full per-second burst once the minute quota allows again.
        clock.advance(Duration::from_secs(18));
        let d = s.decide(&k, &q, 1).unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.states()[0].remaining(), 1);
    }

    #[test]
    fn cost_above_burst_is_an_error_not_a_limit() {
        let s = MemoryStore::new();
        let q = [Quota::per_second(5).unwrap()];
        let err = s.decide(&key(1), &q, 6).unwrap_err();
        assert_eq!(
            err.kind(),
            crate::StoreErrorKind::CostExceedsBurst { cost: 6, burst: 5 }
        );
        assert!(s.is_empty());
        assert!(s.decide(&key(1), &q, 5).unwrap().is_allowed());
    }

    #[test]
    fn expired_keys_are_swept_without_help() {
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .shards(1)
            .sweep_interval(Duration::from_secs(1))
            .build();
        let q = [Quota::per_second(10).unwrap()];
        for i in 0..1000 {
            s.decide(&key(i), &q, 1).unwrap();
        }
        assert_eq!(s.len(), 1000);
        // All those states are worthless after 100 ms; the next request after the sweep
        // interval drops them.
        clock.advance(Duration::from_secs(1));
        s.decide(&key(5000), &q, 1).unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_flood_of_new_keys_cannot_grow_the_store_past_its_maximum() {
        let clock = ManualClock::new();
        let s = store(&clock, 1000);
        // Long-lived state: one per day.
        let q = [Quota::per_day(1).unwrap()];
        for i in 0..100_000 {
            clock.advance(Duration::from_micros(1));
            assert!(s.decide(&key(i), &q, 1).unwrap().is_allowed());
            assert!(s.len() <= 1000, "{} keys after {} inserts", s.len(), i + 1);
        }
        // The most recent clients are still limited: eviction drops the oldest state.
        assert!(s.decide(&key(99_999), &q, 1).unwrap().is_limited());
    }

    #[test]
    fn zero_cost_on_a_new_key_stores_nothing() {
        let s = MemoryStore::new();
        let q = [Quota::per_second(5).unwrap()];
        assert_eq!(s.decide(&key(1), &q, 0).unwrap().remaining(), 5);
        assert!(s.is_empty());
    }

    #[test]
    fn two_threads_share_the_budget_exactly() {
        let s = MemoryStore::new();
        let q = [Quota::per_hour(1000).unwrap()];
        let allowed: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let s = s.clone();
                    scope.spawn(move || {
                        (0..5000)
                            .filter(|_| s.decide(&key(1), &q, 1).unwrap().is_allowed())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 1000);
    }
}
