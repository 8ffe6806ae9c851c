use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::{Store, StoreError};
use crate::algorithm::{self, Eval, State};
use crate::clock::{Clock, MonotonicClock};
use crate::decision::Decision;
use crate::key::KeyHasher;
use crate::{Key, Quota};

const DEFAULT_MAX_KEYS: usize = 1_000_000;
const DEFAULT_SHARDS: usize = 64;
const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Rate-limit state kept in this process: the default store.
///
/// - **Concurrent**: keys are spread over independently locked shards, so threads deciding
///   different keys rarely wait on each other.
/// - **Bounded**: each tracked quota costs one 25-byte map bucket (an 8-byte key identity, a
///   16-byte state with what eviction needs packed in, a control byte; the key itself is not
///   kept). Keys whose state has expired are swept by the shards themselves as requests pass
///   (every 5 seconds per shard by default); no background task and no call from the user is
///   needed. A maximum number of states (1 000 000 by default: 75 shards of 16 384 buckets,
///   31 MB, when full) holds even under a flood of new keys.
/// - **Floods do not free limited clients**: when a shard is full it drops expired states,
///   then an eighth of the rest, choosing the states whose loss hands back the fewest units
///   (a key that spent 1 of 100 goes before one that spent all of 3), and the states of
///   clients that are limited now only when nothing else is left (then, again, those that
///   spent the fewest units first). New keys are always tracked. Evictions are counted in
///   `ratelimit_store_evictions_total{policy, limited}`.
/// - **Exact**: GCRA on a monotonic clock in integer nanoseconds. The clock can be replaced for
///   tests with [`ManualClock`](crate::clock::ManualClock).
///
/// Keys are identified by one randomly seeded 64-bit `ahash` hash (some of its bits pick the
/// shard, the rest tell states apart within it), so clients cannot choose keys that collide.
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
    hasher: KeyHasher,
    max_keys_per_shard: usize,
    sweep_interval_ns: u64,
    policies: PolicyNames,
}

/// The names behind the policy tags of stored states, to label eviction counts. A tag is
/// registered the first time a state of its policy is inserted: one atomic load per insert
/// after that.
struct PolicyNames {
    seen: Box<[AtomicU64]>,
    names: Mutex<hashbrown::HashMap<u16, Arc<str>>>,
}

impl<C> Inner<C> {
    /// The shard of a key whose hash is `h`: its bits from 47 down, scaled to the number of
    /// shards (one multiplication; the count need not be a power of two). A shard's tables
    /// read other bits of the same hash: the low ones place a state, the top seven fill its
    /// control byte. So the shard is picked by bits those never see (below 2^31 buckets).
    #[inline]
    fn shard_of(&self, h: u64) -> usize {
        ((u128::from(h.rotate_left(16)) * self.shards.len() as u128) >> 64) as usize
    }

    /// Stores a new state of `key` under `quota` in `slot`, room for it already made.
    #[inline]
    fn insert(
        &self,
        state: &mut ShardState,
        key: &Key<'_>,
        quota: &Quota,
        slot: u64,
        write: State,
    ) {
        let tag = policy_tag(key.policy());
        self.policies.note(tag, key.policy());
        let entry = Entry::new(slot, write, quota, tag);
        state.map.insert_unique(slot, entry, |e| e.slot);
    }
}

impl PolicyNames {
    fn new() -> Self {
        PolicyNames {
            seen: (0..(1 << 16) / 64).map(|_| AtomicU64::new(0)).collect(),
            names: Mutex::new(hashbrown::HashMap::new()),
        }
    }

    fn note(&self, tag: u16, name: &str) {
        let (word, bit) = (usize::from(tag) / 64, 1u64 << (tag % 64));
        if self.seen[word].load(Ordering::Relaxed) & bit != 0 {
            return;
        }
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(tag)
            .or_insert_with(|| Arc::from(name));
        self.seen[word].fetch_or(bit, Ordering::Relaxed);
    }

    fn name(&self, tag: u16) -> Arc<str> {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&tag)
            .cloned()
            .unwrap_or_else(|| Arc::from("unknown"))
    }
}

/// FNV-1a of a policy name, folded to 16 bits. Two policies whose tags collide (1 in 65 536
/// for a pair) have their evictions counted under the first one's name.
fn policy_tag(name: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in name.as_bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    ((h >> 16) ^ h) as u16
}

/// One shard, on its own cache lines so that two threads on two shards do not share one.
#[repr(align(128))]
struct Shard {
    state: Mutex<ShardState>,
}

struct ShardState {
    /// The states, found by their slot (see [`entry_key`]). A slot is already a randomly
    /// seeded hash, so it is the table's hash as it is: hashing it again would only cost time.
    map: HashTable<Entry>,
    /// The states whose loss would hand budget back to a client that is limited now, with the
    /// moment that stops being so (ns). Eviction never drops them. Only limited keys have an
    /// entry here, and it never outlives its state. `(slot, until)`.
    protected: HashTable<(u64, u64)>,
    next_sweep_ns: u64,
    /// How many times [`regrow`] rebuilt the table, and how many states it moved: what the
    /// tests bound.
    #[cfg(test)]
    rebuilds: u64,
    #[cfg(test)]
    moved: u64,
}

impl ShardState {
    #[inline]
    fn get(&self, slot: u64) -> Option<&Entry> {
        self.map.find(slot, |e| e.slot == slot)
    }

    /// Drops the states that hold nothing at `now` (a state whose time has come decides as a
    /// fresh one) and the protections that have ended.
    fn drop_expired(&mut self, now: u64) {
        self.map.retain(|e| e.expiry() > now);
        self.protected.retain(|&mut (_, until)| until > now);
    }

    /// Forgets the state in `slot`, and its protection.
    fn remove(&mut self, slot: u64) -> Option<Entry> {
        if let Ok(p) = self.protected.find_entry(slot, |p| p.0 == slot) {
            p.remove();
        }
        let found = self.map.find_entry(slot, |e| e.slot == slot).ok()?;
        Some(found.remove().0)
    }
}

/// One quota's state and what eviction needs to know about it, packed into 24 bytes (a
/// bucket of 25 with hashbrown's control byte). The two kinds of algorithm leave different
/// room: GCRA keeps only a time, the windows keep whole milliseconds and counts.
///
/// | field | GCRA | fixed and sliding windows |
/// |---|---|---|
/// | `slot` | [`entry_key`], bit [`WINDOW`] clear | [`entry_key`], bit [`WINDOW`] set |
/// | `t` | the state's `t` (ns) | the state's `t` in ms (low 48 bits), the policy tag (high 16) |
/// | `a` | the policy tag | the state's `a` |
/// | `b` | the emission interval in ns, an `f32` rounded down | the state's `b` |
#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: u64,
    t: u64,
    a: u32,
    b: u32,
}

/// The bit of a slot that says its state is a window algorithm's. It lies above every bit
/// hashbrown takes for a bucket's position (the low ones) and for its control byte (the top
/// seven), so fixing it costs the key identity one of its 64 bits and the table nothing.
const WINDOW: u64 = 1 << 48;
/// The part of a window entry's `t` that holds the time (ms): 2^48 ms is 8 900 years, and any
/// `u64` of nanoseconds is less than 2^45 ms.
const MS_BITS: u64 = (1 << 48) - 1;
const NS_PER_MS: u64 = 1_000_000;

impl Entry {
    fn new(slot: u64, state: State, quota: &Quota, policy: u16) -> Entry {
        let mut entry = if slot & WINDOW != 0 {
            Entry {
                slot,
                t: u64::from(policy) << 48,
                a: 0,
                b: 0,
            }
        } else {
            Entry {
                slot,
                t: 0,
                a: u32::from(policy),
                b: interval_ns(quota).to_bits(),
            }
        };
        entry.set(state);
        entry
    }

    #[inline]
    fn is_window(&self) -> bool {
        self.slot & WINDOW != 0
    }

    /// Stores `state`, keeping what eviction needs.
    #[inline]
    fn set(&mut self, state: State) {
        if self.is_window() {
            // A window's times are whole milliseconds, so this is exact.
            self.t = (self.t & !MS_BITS) | state.t.div_ceil(NS_PER_MS);
            self.a = state.a;
            self.b = state.b;
        } else {
            self.t = state.t;
        }
    }

    /// The state as the algorithms read it.
    #[inline]
    fn state(&self) -> State {
        if self.is_window() {
            State {
                t: self.expiry(),
                a: self.a,
                b: self.b,
            }
        } else {
            State {
                t: self.t,
                a: 0,
                b: 0,
            }
        }
    }

    /// The moment (ns) from which this state holds nothing: its `t`.
    #[inline]
    fn expiry(&self) -> u64 {
        if self.is_window() {
            (self.t & MS_BITS).saturating_mul(NS_PER_MS)
        } else {
            self.t
        }
    }

    /// The 16-bit tag of the policy's name, to count evictions per policy.
    fn policy(&self) -> u16 {
        if self.is_window() {
            (self.t >> 48) as u16
        } else {
            self.a as u16
        }
    }

    /// About how many units this state holds spent at `now`: what dropping it would hand back.
    /// Never less than the truth.
    fn units_at(&self, now: u64) -> u64 {
        if self.is_window() {
            // A fixed window's count; a sliding window's current and (at most) previous count.
            u64::from(self.a) + u64::from(self.b)
        } else {
            let left = self.t.saturating_sub(now) as f64;
            // Exact enough for an order: a u64 of nanoseconds in an f64 loses nothing below
            // 2^53 ns (104 days), and rounding up never understates. Quotas' intervals are
            // whole microseconds, so this never divides by zero.
            (left / f64::from(f32::from_bits(self.b))).ceil() as u64
        }
    }
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
        Ok(match quotas {
            [quota] => self.decide_one(key, quota, cost),
            _ => self.decide_many(key, quotas, cost),
        })
    }

    /// The shard of the key whose hash is `base`, locked, and the time now; the shard drops
    /// its expired states first when its sweep is due.
    #[inline(always)]
    fn shard_at_now(&self, base: u64) -> (MutexGuard<'_, ShardState>, u64) {
        let inner = &*self.inner;
        let mut state = lock(&inner.shards[inner.shard_of(base)].state);
        let now = inner.clock.now_ns();
        if now >= state.next_sweep_ns {
            state.drop_expired(now);
            state.next_sweep_ns = now.saturating_add(inner.sweep_interval_ns);
        }
        (state, now)
    }

    /// A policy of one quota, as most are: its state is read, decided and written back with
    /// one probe of the table. Decides exactly as [`decide_many`](Self::decide_many) does with
    /// that one quota (a test holds the two to the same decisions, states and evictions).
    #[inline(always)]
    fn decide_one(&self, key: &Key<'_>, quota: &Quota, cost: u32) -> Decision {
        let inner = &*self.inner;
        let base = key.hash64(&inner.hasher);
        let slot = entry_key(base, quota);
        let offset = algorithm::window_offset(key, quota);
        let (mut state, now) = self.shard_at_now(base);
        let mut evicted = Evicted::default();
        let e = match state.map.find_mut(slot, |e| e.slot == slot) {
            Some(stored) => {
                let e = algorithm::eval(quota, now, Some(stored.state()), cost, offset);
                if e.allowed()
                    && let Some(write) = e.write
                {
                    stored.set(write);
                }
                e
            }
            None => {
                let e = algorithm::eval(quota, now, None, cost, offset);
                if e.allowed()
                    && let Some(write) = e.write
                {
                    let max = inner.max_keys_per_shard;
                    if state.map.len() + 1 > max {
                        evicted = make_room(&mut state, now, max, 1);
                    }
                    if state.map.capacity() == state.map.len() {
                        regrow(&mut state, 1, max);
                    }
                    inner.insert(&mut state, key, quota, slot, write);
                }
                e
            }
        };
        if e.allowed() {
            if e.write.is_some() && e.spent.remaining == 0 {
                // Spent: see `decide_many`.
                protect(&mut state, slot, now.saturating_add(e.spent.next_unit_ns));
            }
        } else if cost > 1 {
            protect(
                &mut state,
                slot,
                now.saturating_add(e.unspent.retry_after_ns),
            );
        }
        drop(state);
        if !evicted.by_policy.is_empty() {
            evicted.count(&inner.policies);
        }
        Decision::one(e.state(e.allowed()))
    }

    /// Any number of quotas, decided together under the shard's lock: every quota's state is
    /// read and evaluated first, and written only when all of them allow the request.
    fn decide_many(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Decision {
        let inner = &*self.inner;
        // One hash picks the shard and identifies the key within it: every quota of one key
        // lives in one shard, so one lock makes the decision atomic.
        let base = key.hash64(&inner.hasher);
        let (mut state, now) = self.shard_at_now(base);

        // Not `with_capacity`: its result, 248 bytes, would be copied into place.
        let mut evals: SmallVec<[Eval; 2]> = SmallVec::new();
        // States this request would add (an allowed request writes; a zero-cost peek at a
        // key with no state writes nothing, and must not make room by evicting others).
        let mut new_entries = 0;
        for quota in quotas {
            let stored = state.get(entry_key(base, quota)).map(Entry::state);
            let offset = algorithm::window_offset(key, quota);
            let e = algorithm::eval(quota, now, stored, cost, offset);
            new_entries += usize::from(stored.is_none() && e.write.is_some());
            evals.push(e);
        }
        let allowed = evals.iter().all(Eval::allowed);
        let mut evicted = Evicted::default();
        if allowed {
            // A shard never holds more than its maximum, so this is false when nothing is new.
            if state.map.len() + new_entries > inner.max_keys_per_shard {
                evicted = make_room(&mut state, now, inner.max_keys_per_shard, new_entries);
            }
            // The table would grow on its own here: it is full, or its free buckets are used
            // up by the marks its removals left. The store grows it instead, never past what
            // its maximum needs.
            if state.map.capacity() - state.map.len() < new_entries {
                regrow(&mut state, new_entries, inner.max_keys_per_shard);
            }
            for (quota, e) in quotas.iter().zip(&evals) {
                let Some(write) = e.write else { continue };
                let slot = entry_key(base, quota);
                match state.map.find_mut(slot, |e| e.slot == slot) {
                    Some(stored) => stored.set(write),
                    None => inner.insert(&mut state, key, quota, slot, write),
                }
                if e.spent.remaining == 0 {
                    // Spent: the next request of this key is refused until one unit is back
                    // (what the spent state's next unit says). Dropping the state before then
                    // would hand that client a fresh budget.
                    protect(&mut state, slot, now.saturating_add(e.spent.next_unit_ns));
                }
            }
        } else if cost > 1 {
            // A request refused for its cost, though cheaper ones may pass: its client is
            // limited for that cost until the wait runs out.
            for (quota, e) in quotas.iter().zip(&evals).filter(|(_, e)| !e.allowed()) {
                let until = now.saturating_add(e.unspent.retry_after_ns);
                protect(&mut state, entry_key(base, quota), until);
            }
        }
        drop(state);
        if !evicted.by_policy.is_empty() {
            evicted.count(&inner.policies);
        }

        super::kit::decision(&evals, allowed)
    }

    /// Forgets `key`'s state under `quotas`: its next request starts with a full budget. For
    /// operators unblocking a client (see docs/operations.md).
    pub fn reset(&self, key: &Key<'_>, quotas: &[Quota]) {
        let inner = &*self.inner;
        let base = key.hash64(&inner.hasher);
        let shard = &inner.shards[inner.shard_of(base)];
        let mut state = lock(&shard.state);
        for quota in quotas {
            state.remove(entry_key(base, quota));
        }
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
            state.drop_expired(now);
            state.map.shrink_to_fit(|e| e.slot);
            state.protected.shrink_to_fit(|p| p.0);
        }
    }
}

/// The map key of `quota`'s state for the key whose hash is `base`: a 64-bit keyed hash mixed
/// with the quota's fingerprint, so a state belongs to the quota itself, not to its place in
/// the policy. Bit [`WINDOW`] says whether the quota is a window's, and the states of one shard
/// share the bits that picked it ([`Inner::shard_of`]): within its shard a state is told apart
/// by the other 56 or so. Two states of a full store of a million share one with a chance of
/// about one in 20 million; for one new key among them, about one in 10^13. Deliberate
/// collisions need the random seeds.
#[inline]
fn entry_key(base: u64, quota: &Quota) -> u64 {
    let kind = match quota.algorithm() {
        crate::Algorithm::Gcra => 0,
        crate::Algorithm::FixedWindow | crate::Algorithm::SlidingWindow => WINDOW,
    };
    ((base ^ quota.fingerprint()) & !WINDOW) | kind
}

/// The emission interval of a GCRA quota in nanoseconds, rounded down to an `f32` (24 bits of
/// precision at any size, so it only ever overstates the units a state holds, by less than one
/// in ten million). Quotas' intervals are whole microseconds, so it is never 0.
fn interval_ns(quota: &Quota) -> f32 {
    let exact = quota.emission_ns() as f64;
    let rounded = exact as f32;
    if f64::from(rounded) > exact {
        // The next f32 below: never above the true interval.
        f32::from_bits(rounded.to_bits() - 1)
    } else {
        rounded
    }
}

/// Moves a shard's states into a table with room for `needed` more: twice as many as it holds,
/// but never more than the shard's maximum needs. The store calls this rather than let
/// hashbrown grow the table itself, which doubles a table whose free buckets were used up by
/// the marks that removals leave (tombstones) even when it holds no more states than before:
/// a full shard under churn would double again and again. Rebuilt at its own size, a table
/// loses its marks. Each shard's tables are sized so that at its maximum a sixteenth of a
/// table stays free ([`layout`]), so a rebuild costs at most about sixteen moves per state
/// inserted since the last one.
#[cold]
fn regrow(state: &mut ShardState, needed: usize, max: usize) {
    let len = state.map.len();
    let room = (len * 2).min(max).max(len + needed);
    let mut fresh = HashTable::with_capacity(room);
    for entry in state.map.drain() {
        fresh.insert_unique(entry.slot, entry, |e| e.slot);
    }
    state.map = fresh;
    #[cfg(test)]
    {
        state.rebuilds += 1;
        state.moved += len as u64;
    }
}

/// The most states a table of `buckets` buckets (at least 8) is given: hashbrown's limit,
/// seven eighths, less a sixteenth, kept free so that the marks removals leave do not force a
/// rebuild too often ([`regrow`]).
fn dense_capacity(buckets: usize) -> usize {
    let full = buckets / 8 * 7;
    full - full / 16
}

/// The largest number of shards a store uses.
const MAX_SHARDS: usize = 1 << 17;

/// How `max_keys` states are spread over at least `min_shards` shards: `(shards, the most
/// states per shard)`. Hash tables have a power-of-two number of buckets, so `min_shards`
/// shards of `max_keys / min_shards` states may need tables of twice the buckets they would
/// fill (1 000 000 over 64 shards is just past what 16 384 buckets hold: 32 768 each, 48% full
/// at the maximum). When it takes fewer buckets in all, the store uses more shards, up to
/// twice as many, of the next smaller table, each as full as [`dense_capacity`] allows: 75
/// shards of 16 384 buckets for 1 000 000.
fn layout(max_keys: usize, min_shards: usize) -> (usize, usize) {
    let min_shards = min_shards.clamp(1, MAX_SHARDS / 2);
    let max_keys = max_keys.max(min_shards);
    let per_shard = max_keys.div_ceil(min_shards);
    let mut buckets: usize = 8;
    while dense_capacity(buckets) < per_shard {
        match buckets.checked_mul(2) {
            Some(more) => buckets = more,
            None => return (min_shards, per_shard),
        }
    }
    if buckets > 8 {
        let half = buckets / 2;
        let shards = max_keys.div_ceil(dense_capacity(half));
        if shards <= MAX_SHARDS && shards.saturating_mul(half) < min_shards.saturating_mul(buckets)
        {
            return (shards, max_keys.div_ceil(shards));
        }
    }
    (min_shards, per_shard)
}

/// Marks a state as one whose client is limited until `until`.
fn protect(state: &mut ShardState, slot: u64, until: u64) {
    match state.protected.find_mut(slot, |p| p.0 == slot) {
        Some(p) => p.1 = p.1.max(until),
        None => {
            state.protected.insert_unique(slot, (slot, until), |p| p.0);
        }
    }
}

/// A poisoned shard only means a thread panicked while holding it; its map is still a valid
/// map of timestamps, so keep using it rather than failing every later request.
#[inline]
fn lock(m: &Mutex<ShardState>) -> MutexGuard<'_, ShardState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What one `make_room` dropped: how many states, by policy tag and by whether their client
/// was limited.
#[derive(Default)]
struct Evicted {
    by_policy: SmallVec<[(u16, bool, u64); 4]>,
}

impl Evicted {
    /// Counts the evictions in `ratelimit_store_evictions_total{policy, limited}` (outside the
    /// lock).
    fn count(&self, names: &PolicyNames) {
        for &(tag, limited, n) in &self.by_policy {
            crate::metrics::store_evictions(&names.name(tag), limited, n);
        }
    }
}

/// Makes room for `needed` new states in a full shard.
///
/// First every expired state goes. If that is not enough (a flood of new keys), an eighth of
/// the shard goes, in this order:
///
/// 1. states whose client is not limited now, those whose loss hands back the fewest units
///    first (a key that spent 1 of 100 before one that spent all of 3), then the one that would
///    expire first;
/// 2. only when nothing else is left, states of clients limited now, again those that spent the
///    fewest units first, then the one whose limit ends soonest.
///
/// So a flood never frees a limited client while the shard holds anything else, and when it
/// holds nothing but limited clients, freeing one costs a flood that spent as much as that
/// client did on every key of the shard. New keys are always tracked (and limited).
#[cold]
fn make_room(state: &mut ShardState, now: u64, cap: usize, needed: usize) -> Evicted {
    let mut evicted = Evicted::default();
    state.drop_expired(now);
    if state.map.len() + needed <= cap {
        return evicted;
    }
    let protected = &state.protected;
    let mut candidates: Vec<(bool, u64, u64, u64)> = state
        .map
        .iter()
        .map(|e| {
            let limited_until = protected.find(e.slot, |p| p.0 == e.slot).map(|p| p.1);
            (
                limited_until.is_some(),
                e.units_at(now),
                limited_until.unwrap_or(e.expiry()),
                e.slot,
            )
        })
        .collect();
    let evict = (state.map.len() / 8).max(needed).min(candidates.len());
    if evict < candidates.len() {
        // The first `evict` candidates become the `evict` smallest.
        candidates.select_nth_unstable(evict);
    }
    for &(limited, _, _, slot) in &candidates[..evict] {
        if let Some(e) = state.remove(slot) {
            match evicted
                .by_policy
                .iter_mut()
                .find(|(tag, l, _)| *tag == e.policy() && *l == limited)
            {
                Some((_, _, n)) => *n += 1,
                None => evicted.by_policy.push((e.policy(), limited, 1)),
            }
        }
    }
    evicted
}

impl<C: Clock> Store for MemoryStore<C> {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        ready(self.decide(key, quotas, cost))
    }

    fn check_now(
        &self,
        key: &Key<'_>,
        quotas: &[Quota],
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        Some(self.decide(key, quotas, cost))
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
    /// power-of-two number of 25-byte buckets, and the store picks its number of shards so
    /// that at the maximum they are about 82% full (below hashbrown's 7/8, so that removals
    /// never make a full table grow): about 31 bytes per state when full, 30.7 MB at the
    /// default; up to twice that per state while a table has just doubled on the way (plus 17
    /// bytes for each state of a client that is limited now). Values below the number of
    /// shards are raised to it.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The fewest shards (default 64, at most 65 536). The store uses up to about twice as
    /// many when that fits `max_keys` in fewer buckets (75 for the default 1 000 000); its
    /// `Debug` form shows the count it uses.
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
        let (shards, max_keys_per_shard) = layout(self.max_keys, self.shards);
        let sweep_interval_ns = u64::try_from(self.sweep_interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1_000_000);
        let shards = (0..shards)
            .map(|_| Shard {
                state: Mutex::new(ShardState {
                    map: HashTable::new(),
                    protected: HashTable::new(),
                    next_sweep_ns: sweep_interval_ns,
                    #[cfg(test)]
                    rebuilds: 0,
                    #[cfg(test)]
                    moved: 0,
                }),
            })
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                clock: self.clock,
                shards,
                hasher: KeyHasher::new(),
                max_keys_per_shard,
                sweep_interval_ns,
                policies: PolicyNames::new(),
            }),
        }
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

    /// A store of one shard holding at most `max_keys` states, on a clock that never moves.
    fn one_shard(max_keys: usize) -> MemoryStore<ManualClock> {
        MemoryStore::builder()
            .clock(ManualClock::new())
            .max_keys(max_keys)
            .shards(1)
            .build()
    }

    /// Evictions counted so far, by (policy, limited) label values.
    fn evictions(
        snapshotter: &metrics_util::debugging::Snapshotter,
    ) -> std::collections::HashMap<(String, String), u64> {
        let mut counted = std::collections::HashMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if let metrics_util::debugging::DebugValue::Counter(n) = value
                && key.key().name() == crate::metrics::STORE_EVICTIONS_TOTAL
            {
                let label = |name| {
                    key.key()
                        .labels()
                        .find(|l| l.key() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap()
                };
                *counted
                    .entry((label("policy"), label("limited")))
                    .or_insert(0) += n;
            }
        }
        counted
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
        // Long-lived state that is not limited: 5 per day, one spent each.
        let q = [Quota::per_day(5).unwrap()];
        for i in 0..100_000 {
            clock.advance(Duration::from_micros(1));
            assert!(s.decide(&key(i), &q, 1).unwrap().is_allowed());
            assert!(s.len() <= 1000, "{} keys after {} inserts", s.len(), i + 1);
        }
        // Among equals the oldest go first: the most recent clients are still tracked.
        assert_eq!(s.decide(&key(99_999), &q, 1).unwrap().remaining(), 3);
    }

    #[test]
    fn a_flood_never_hands_a_limited_client_its_budget_back() {
        // The reproduced attack: login 3/1m spent by one client, then a flood of new addresses
        // on a 100/1d route. The login states expire first, but they are the ones whose loss
        // would free a limited client.
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(200)
            .shards(1)
            .build();
        let login = [Quota::per_minute(3).unwrap()];
        let daily = [Quota::per_day(100).unwrap()];
        let victim = Key::new(
            "login",
            "/login",
            Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
            None::<&str>,
        );
        for _ in 0..3 {
            assert!(s.decide(&victim, &login, 1).unwrap().is_allowed());
        }
        assert!(s.decide(&victim, &login, 1).unwrap().is_limited());
        // A key that spent 90 of 100 (not limited) is worth more than keys that spent 1.
        let heavy = Key::new(
            "daily",
            "/export",
            Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))),
            None::<&str>,
        );
        for _ in 0..90 {
            assert!(s.decide(&heavy, &daily, 1).unwrap().is_allowed());
        }
        // Each flood key spends 5 units: more than the login state holds (3), so only the
        // rule "never a limited client" keeps the login state, not the order by units.
        for i in 0..10_000u32 {
            let k = Key::new(
                "daily",
                "/export",
                Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
                None::<&str>,
            );
            assert!(s.decide(&k, &daily, 5).unwrap().is_allowed());
            assert!(s.len() <= 200);
        }
        assert!(s.decide(&victim, &login, 1).unwrap().is_limited());
        assert_eq!(s.decide(&heavy, &daily, 1).unwrap().remaining(), 9);
        // Once its wait is over the login state is an ordinary one again: one unit back.
        clock.advance(Duration::from_secs(20));
        assert_eq!(s.decide(&victim, &login, 1).unwrap().remaining(), 0);
    }

    #[test]
    fn a_refusal_for_cost_protects_the_state_too() {
        let s = one_shard(8);
        let q = [Quota::per_hour(10).unwrap()];
        // 8 of 10 spent: a request of cost 5 is refused, though cost 1 would pass.
        let k = key(1);
        assert!(s.decide(&k, &q, 8).unwrap().is_allowed());
        assert!(s.decide(&k, &q, 5).unwrap().is_limited());
        for i in 2..100 {
            // Each new key spends 9 of 10, more than k's 8: k would be the first to go if its
            // refusal did not protect it.
            let _ = s.decide(&key(i), &q, 9);
        }
        assert!(s.decide(&k, &q, 5).unwrap().is_limited());
    }

    #[test]
    fn when_only_limited_clients_are_left_those_that_spent_least_go_first() {
        let s = one_shard(10);
        // A client that spent all of 3 per hour, and nine that spent all of 1 per hour: the
        // shard holds nothing but limited clients.
        let three = [Quota::per_hour(3).unwrap()];
        let one = [Quota::per_hour(1).unwrap()];
        let victim = key(1_000);
        for _ in 0..3 {
            assert!(s.decide(&victim, &three, 1).unwrap().is_allowed());
        }
        for i in 0..9 {
            assert!(s.decide(&key(i), &one, 1).unwrap().is_allowed());
        }
        // A flood of new keys that each spend 1 of 1: every one is tracked (and limited), and
        // makes room by dropping a client that spent 1, never the one that spent 3.
        for i in 100..1_100 {
            let k = key(i);
            assert!(s.decide(&k, &one, 1).unwrap().is_allowed());
            assert!(
                s.decide(&k, &one, 1).unwrap().is_limited(),
                "key {i} not tracked"
            );
            assert!(s.len() <= 10);
        }
        assert!(s.decide(&victim, &three, 1).unwrap().is_limited());
    }

    #[test]
    fn a_full_shard_holds_exactly_its_maximum_before_it_evicts() {
        // One shard of 50: the 50th key fits without evicting; only the 51st makes room.
        let s = one_shard(50);
        let q = [Quota::per_hour(10).unwrap()];
        for i in 0..50 {
            assert!(s.decide(&key(i), &q, 1).unwrap().is_allowed());
        }
        assert_eq!(s.len(), 50, "nothing evicted at the maximum");
        // Every one of them still holds what it spent.
        for i in 0..50 {
            assert_eq!(s.decide(&key(i), &q, 0).unwrap().remaining(), 9, "key {i}");
        }
        assert!(s.decide(&key(50), &q, 1).unwrap().is_allowed());
        assert!(s.len() <= 50);
        assert!(
            s.len() < 50,
            "making room drops more than the one key it needs"
        );
    }

    #[test]
    fn a_sweep_keeps_what_protects_a_limited_client() {
        // A client limited for a long while (3 per hour, spent), then a sweep (the sweep
        // interval passes), then a flood: the sweep must drop only what has expired, so the
        // client is still protected from eviction and still limited.
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(100)
            .shards(1)
            .sweep_interval(Duration::from_secs(1))
            .build();
        let login = [Quota::per_hour(3).unwrap()];
        let victim = key(1_000_000);
        for _ in 0..3 {
            assert!(s.decide(&victim, &login, 1).unwrap().is_allowed());
        }
        assert!(s.decide(&victim, &login, 1).unwrap().is_limited());
        clock.advance(Duration::from_secs(2));
        // This request runs the shard's sweep; an operator's sweep of every shard follows.
        assert!(s.decide(&victim, &login, 1).unwrap().is_limited());
        s.sweep();
        let daily = [Quota::per_day(100).unwrap()];
        for i in 0..5_000 {
            // Each spends 5: more than the victim's state holds.
            assert!(s.decide(&key(i), &daily, 5).unwrap().is_allowed());
        }
        assert!(s.decide(&victim, &login, 1).unwrap().is_limited());
    }

    #[test]
    fn one_batch_of_evictions_counts_limited_and_not_apart() {
        // 60 limited clients and 4 that are not, all of one policy: making room drops an eighth
        // (8), the 4 unlimited first and then 4 limited ones, in one batch. Each is counted
        // under its own `limited` label.
        use metrics_util::debugging::DebuggingRecorder;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let s = one_shard(64);
        let one = [Quota::per_hour(1).unwrap()];
        let two = [Quota::per_hour(2).unwrap()];
        for i in 0..60 {
            assert!(s.decide(&key(i), &one, 1).unwrap().is_allowed());
        }
        for i in 60..64 {
            assert!(s.decide(&key(i), &two, 1).unwrap().is_allowed());
        }
        s.decide(&key(1_000), &two, 1).unwrap();
        let counted = evictions(&snapshotter);
        let of = |limited: &str| counted.get(&("p".to_owned(), limited.to_owned())).copied();
        assert_eq!(of("false"), Some(4), "{counted:?}");
        assert_eq!(of("true"), Some(4), "{counted:?}");
    }

    #[test]
    fn evictions_of_many_policies_are_counted_under_their_own_names() {
        use metrics_util::debugging::DebuggingRecorder;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let s = one_shard(64);
        let q = [Quota::per_hour(10).unwrap()];
        // 300 policies, each with a few keys: far more than fit, so every policy's states are
        // evicted at some point. Every eviction must name its policy, never "unknown".
        let names: Vec<String> = (0..300).map(|i| format!("policy-{i}")).collect();
        for round in 0..4u32 {
            for (i, name) in names.iter().enumerate() {
                let ip = IpAddr::V4(Ipv4Addr::from(round * 1_000 + u32::try_from(i).unwrap()));
                s.decide(&Key::new(name, "/r", Some(ip), None::<&str>), &q, 1)
                    .unwrap();
            }
        }
        let policies: std::collections::HashSet<String> = evictions(&snapshotter)
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|((policy, _), _)| policy)
            .collect();
        assert!(!policies.contains("unknown"), "{policies:?}");
        assert!(policies.len() > 250, "{} policies counted", policies.len());
    }

    #[test]
    fn policy_tags_spread_over_their_16_bits() {
        // What the eviction labels rely on: distinct policies get distinct tags but for the
        // birthday rate of 16 bits (1000 names: about 8 collisions expected).
        let tags: std::collections::HashSet<u16> = (0..1000)
            .map(|i| policy_tag(&format!("policy-{i}")))
            .collect();
        assert!(tags.len() >= 980, "{} distinct tags of 1000", tags.len());
        let short: std::collections::HashSet<u16> = ["a", "b", "api", "login", "search", "export"]
            .iter()
            .map(|n| policy_tag(n))
            .collect();
        assert_eq!(short.len(), 6);
    }

    #[test]
    fn evictions_are_counted_per_policy() {
        use metrics_util::debugging::DebuggingRecorder;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(96)
            .shards(1)
            .build();
        let q = [Quota::per_hour(10).unwrap()];
        // 48 states of "alpha" and 48 of "beta" that spent 1 unit each, then a flood of
        // "flood" states that spend 2: the 1-unit states go, as many of each policy as the
        // flood needed; none of "flood".
        for i in 0..96 {
            let policy = if i % 2 == 0 { "alpha" } else { "beta" };
            let k = Key::new(
                policy,
                "/a",
                Some(IpAddr::V4(Ipv4Addr::from(i))),
                None::<&str>,
            );
            s.decide(&k, &q, 1).unwrap();
        }
        for i in 0..40 {
            clock.advance(Duration::from_micros(1));
            let k = Key::new(
                "flood",
                "/b",
                Some(IpAddr::V4(Ipv4Addr::from(i))),
                None::<&str>,
            );
            s.decide(&k, &q, 2).unwrap();
        }
        let counted = evictions(&snapshotter);
        let of = |p: &str| {
            counted
                .get(&(p.to_owned(), "false".to_owned()))
                .copied()
                .unwrap_or(0)
        };
        assert!(of("alpha") > 0 && of("beta") > 0, "{counted:?}");
        assert_eq!(of("flood"), 0, "{counted:?}");
        assert!(
            counted.keys().all(|(_, limited)| limited == "false"),
            "{counted:?}"
        );
        // Every eviction is counted, under the right policy: the store's size says how many.
        let evicted = of("alpha") + of("beta");
        assert_eq!(s.len() as u64, 96 + 40 - evicted);
        let alpha_left = (0..96u32)
            .filter(|i| i % 2 == 0)
            .filter(|&i| {
                let k = Key::new(
                    "alpha",
                    "/a",
                    Some(IpAddr::V4(Ipv4Addr::from(i))),
                    None::<&str>,
                );
                s.decide(&k, &q, 0).unwrap().remaining() < 10
            })
            .count() as u64;
        assert_eq!(alpha_left, 48 - of("alpha"));
    }

    #[test]
    fn reset_forgets_a_key_under_its_quotas_and_nothing_else() {
        let clock = ManualClock::new();
        let s = store(&clock, 100);
        let q = [Quota::per_hour(2).unwrap(), Quota::per_day(5).unwrap()];
        for k in [key(1), key(2)] {
            for _ in 0..2 {
                assert!(s.decide(&k, &q, 1).unwrap().is_allowed());
            }
            assert!(s.decide(&k, &q, 1).unwrap().is_limited());
        }
        s.reset(&key(1), &q);
        let d = s.decide(&key(1), &q, 1).unwrap();
        assert_eq!(d.states()[0].remaining(), 1);
        assert_eq!(d.states()[1].remaining(), 4);
        assert!(s.decide(&key(2), &q, 1).unwrap().is_limited());
        // Reset under one quota only: the other keeps its count.
        s.reset(&key(2), &q[..1]);
        let d = s.decide(&key(2), &q, 1).unwrap();
        assert_eq!(
            (d.states()[0].remaining(), d.states()[1].remaining()),
            (1, 2)
        );
    }

    #[test]
    fn sweep_drops_what_has_expired_and_nothing_else() {
        let clock = ManualClock::new();
        let s = store(&clock, 100);
        assert!(s.is_empty());
        let short = [Quota::per_second(1).unwrap()];
        let long = [Quota::per_hour(1).unwrap()];
        for i in 0..10 {
            s.decide(&key(i), if i < 7 { &short } else { &long }, 1)
                .unwrap();
        }
        assert_eq!(s.len(), 10);
        assert!(!s.is_empty());
        // The short states are worthless one second on, to the nanosecond.
        clock.advance(Duration::from_nanos(999_999_999));
        s.sweep();
        assert_eq!(s.len(), 10);
        clock.advance(Duration::from_nanos(1));
        s.sweep();
        assert_eq!(s.len(), 3);
        clock.advance(Duration::from_secs(3600));
        s.sweep();
        assert!(s.is_empty());
    }

    #[test]
    fn the_debug_form_names_the_shape() {
        let s = MemoryStore::builder().shards(4).max_keys(100).build();
        assert_eq!(
            format!("{s:?}"),
            "MemoryStore { shards: 4, max_keys: 100, .. }"
        );
    }

    #[test]
    fn a_full_shard_drops_an_eighth_of_its_states() {
        let s = one_shard(96);
        let q = [Quota::per_day(10).unwrap()];
        for i in 0..96 {
            s.decide(&key(i), &q, 1).unwrap();
        }
        assert_eq!(s.len(), 96);
        s.decide(&key(1_000), &q, 1).unwrap();
        // 96 / 8 = 12 dropped, one added.
        assert_eq!(s.len(), 96 - 12 + 1);
    }

    #[test]
    fn a_policy_with_more_quotas_than_a_shard_holds_still_decides() {
        // One state per shard, a policy of two quotas: nothing to evict, and no panic; the
        // request is decided (and its states stored beyond the bound rather than not at all).
        let s = one_shard(1);
        let q = [Quota::per_minute(3).unwrap(), Quota::per_hour(10).unwrap()];
        let d = s.decide(&key(1), &q, 1).unwrap();
        assert!(d.is_allowed());
        assert_eq!(d.states()[0].remaining(), 2);
    }

    #[test]
    fn making_room_drops_exactly_the_states_that_hold_least() {
        // 64 states holding 1, 2, ... 64 units (spent at once, 100 per day). One more key needs
        // room: an eighth of the shard goes, and exactly the 8 that hold least.
        let s = one_shard(64);
        let q = [Quota::per_day(100).unwrap()];
        // Inserted in a scrambled order, so no order of the map's iteration can pass by luck.
        for i in 0..64u32 {
            let units = (i * 37) % 64 + 1;
            s.decide(&key(units), &q, units).unwrap();
        }
        assert_eq!(s.len(), 64);
        s.decide(&key(1_000), &q, 1).unwrap();
        let kept: Vec<bool> = (1..=64u32)
            .map(|units| s.decide(&key(units), &q, 0).unwrap().remaining() == 100 - units)
            .collect();
        let dropped: Vec<u32> = (1..=64u32).filter(|u| !kept[*u as usize - 1]).collect();
        assert_eq!(dropped, (1..=8).collect::<Vec<u32>>());
    }

    #[test]
    fn a_sliding_window_counts_both_its_windows_when_evicting() {
        // 100/m sliding: 5 spent in one window and 1 in the next leave a state holding 1 now
        // and 5 from the window before: 6 units. A fixed-window key that spent 4 holds fewer,
        // so it is the one a newcomer's room comes from.
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(2)
            .shards(1)
            .build();
        let sliding = [q("100/m sliding-window")];
        let fixed = [q("100/h fixed-window")];
        let (ks, kf) = (key(1), key(2));
        s.decide(&ks, &sliding, 5).unwrap();
        clock.advance(Duration::from_secs(60));
        s.decide(&ks, &sliding, 1).unwrap();
        s.decide(&kf, &fixed, 4).unwrap();
        s.decide(&key(3), &[Quota::per_hour(100).unwrap()], 1)
            .unwrap();
        assert_eq!(
            s.decide(&kf, &fixed, 0).unwrap().remaining(),
            100,
            "fixed dropped"
        );
        assert!(
            s.decide(&ks, &sliding, 0).unwrap().remaining() < 99,
            "sliding kept"
        );
    }

    #[test]
    fn eviction_hands_back_the_fewest_units_whatever_the_algorithm() {
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(8)
            .shards(1)
            .build();
        let gcra = [Quota::per_day(100).unwrap()];
        let fixed = [q("100/d fixed-window")];
        let sliding = [q("100/d sliding-window")];
        // A GCRA key spends all 8 units of 8/day (T = 3 h) seven hours before the flood: by
        // then it holds ceil(17 h / 3 h) = 6. The units each key holds at the flood:
        let spent_early = [Quota::per_day(8).unwrap()];
        s.decide(&key(100), &spent_early, 8).unwrap();
        clock.advance(Duration::from_secs(7 * 3600));
        let keys: [(u32, &[Quota], u32); 7] = [
            (101, &gcra, 7),
            (102, &fixed, 2),
            (103, &sliding, 5),
            (104, &gcra, 1),
            (105, &fixed, 8),
            (106, &sliding, 3),
            (107, &gcra, 4),
        ];
        for (k, q, cost) in keys {
            s.decide(&key(k), q, cost).unwrap();
        }
        assert_eq!(s.len(), 8);
        // Each new key (spending 9 units) makes room by dropping the state that holds fewest.
        let order: Vec<u32> = (0..8)
            .map(|i| {
                let before: Vec<u32> = (100..108)
                    .filter(|k| held(&s, *k, &keys, &spent_early))
                    .collect();
                s.decide(&key(1_000 + i), &gcra, 9).unwrap();
                let after: Vec<u32> = (100..108)
                    .filter(|k| held(&s, *k, &keys, &spent_early))
                    .collect();
                assert_eq!(
                    before.len(),
                    after.len() + 1,
                    "step {i}: {before:?} -> {after:?}"
                );
                *before.iter().find(|k| !after.contains(k)).unwrap()
            })
            .collect();
        // 1, 2, 3, 4, 5, 6 (the decayed 8), 7, 8 units.
        assert_eq!(order, [104, 102, 106, 107, 103, 100, 101, 105]);
    }

    /// Whether the store still holds state for `k` (a zero-cost peek says what it holds).
    fn held(
        s: &MemoryStore<ManualClock>,
        k: u32,
        keys: &[(u32, &[Quota], u32)],
        early: &[Quota],
    ) -> bool {
        let quotas = keys
            .iter()
            .find(|(id, _, _)| *id == k)
            .map_or(early, |(_, q, _)| q);
        let d = s.decide(&key(k), quotas, 0).unwrap();
        d.remaining() < quotas[0].burst()
    }

    fn q(s: &str) -> Quota {
        s.parse().unwrap()
    }

    #[test]
    fn distinct_keys_never_share_a_budget_at_scale() {
        // 300 000 keys under one quota each get their own budget. A key identity much weaker
        // than 64 bits would make two of them share one here.
        let s = MemoryStore::builder().max_keys(400_000).build();
        let q = [Quota::per_hour(1).unwrap()];
        for i in 0..300_000u32 {
            assert!(
                s.decide(&key(i), &q, 1).unwrap().is_allowed(),
                "key {i} shared a budget"
            );
        }
        assert_eq!(s.len(), 300_000);
    }

    #[test]
    fn an_entry_never_understates_the_interval_it_rounds() {
        // 3/s (333 334 000 ns) lies halfway between two f32s and rounds up to the even one, as
        // does (2^24 + 3) us in ns: the cases where the next f32 below must be taken.
        let halfway = Quota::new(1, Duration::from_micros(16_777_219)).unwrap();
        assert!(
            f64::from(333_334_000_f32) > 333_334_000.0
                && f64::from(16_777_219_000_f32) > 16_777_219_000.0,
            "the f32s round up"
        );
        let texts = ["1/s", "3/s", "7/m", "8/d", "1/366d", "999999/s", "13/7s"];
        let quotas = texts.iter().map(|t| t.parse::<Quota>().unwrap());
        for (text, quota) in texts
            .iter()
            .chain(["2^24 + 3 us"].iter())
            .zip(quotas.chain([halfway]))
        {
            let stored = f64::from(interval_ns(&quota));
            let exact = quota.emission_ns() as f64;
            assert!(
                stored <= exact && stored > exact * (1.0 - 1e-7),
                "{text}: {stored} vs {exact}"
            );
        }
    }

    #[test]
    fn a_state_takes_24_bytes_and_a_control_byte() {
        // What docs/operations.md and the builder's docs promise per state.
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn an_entry_gives_back_the_state_and_policy_it_was_given() {
        let gcra = q("7/s");
        let fixed = q("100/h fixed-window");
        let sliding = q("100/m sliding-window");
        let ms = |n: u64| n * NS_PER_MS;
        let cases = [
            (
                gcra,
                State { t: 1, a: 0, b: 0 },
                State {
                    t: 123_456_789_123,
                    a: 0,
                    b: 0,
                },
            ),
            (
                gcra,
                State {
                    t: u64::MAX,
                    a: 0,
                    b: 0,
                },
                State { t: 5, a: 0, b: 0 },
            ),
            (
                fixed,
                State {
                    t: ms(3_600_000),
                    a: 1,
                    b: 0,
                },
                State {
                    t: ms(7),
                    a: 99,
                    b: 0,
                },
            ),
            (
                sliding,
                State {
                    t: ms(60_001),
                    a: u32::MAX,
                    b: u32::MAX - 1,
                },
                State {
                    t: ms(u64::MAX / NS_PER_MS),
                    a: 0,
                    b: 17,
                },
            ),
        ];
        for (quota, first, second) in cases {
            for tag in [0, 1, 0x8001, u16::MAX] {
                let slot = entry_key(0xfedc_ba98_7654_3210, &quota);
                let mut e = Entry::new(slot, first, &quota, tag);
                assert_eq!((e.state(), e.expiry(), e.policy()), (first, first.t, tag));
                e.set(second);
                assert_eq!((e.state(), e.expiry(), e.policy()), (second, second.t, tag));
                assert_eq!(e.slot, slot);
            }
        }
        // A GCRA entry keeps its interval: 7/s spent 3 units ahead holds 3.
        let now = 1_000_000_000;
        let e = Entry::new(
            entry_key(1, &gcra),
            State {
                t: now + 3 * gcra.emission_ns(),
                a: 0,
                b: 0,
            },
            &gcra,
            9,
        );
        assert_eq!(e.units_at(now), 3);
        assert_eq!(e.units_at(now + 1), 3, "rounded up, never under");
    }

    #[test]
    fn a_slot_says_its_algorithm_and_keeps_the_rest_of_its_identity() {
        for base in [0, u64::MAX, 0x0123_4567_89ab_cdef] {
            for quota in [q("7/s"), q("7/s fixed-window"), q("7/s sliding-window")] {
                let slot = entry_key(base, &quota);
                let window = quota.algorithm() != crate::Algorithm::Gcra;
                assert_eq!(slot & WINDOW != 0, window, "{quota:?}");
                assert_eq!(slot & !WINDOW, (base ^ quota.fingerprint()) & !WINDOW);
            }
        }
    }

    #[test]
    fn a_million_states_take_75_dense_shards() {
        // What the builder's docs and docs/operations.md promise for the default.
        assert_eq!(layout(1_000_000, 64), (75, 13_334));
        let table = HashTable::<Entry>::with_capacity(13_334).allocation_size();
        assert!(
            table > 8_192 * 25 && table <= 16_384 * 25 + 64,
            "16 384 buckets: {table}"
        );
        assert_eq!(layout(1_125_000, 64), (84, 13_393));
        // Where more shards would not save buckets, the count asked for stays.
        assert_eq!(layout(100, 4), (4, 25));
        assert_eq!(layout(96, 1), (1, 96));
    }

    #[test]
    fn every_layout_holds_its_maximum_in_dense_tables() {
        // 49 over 8 and 385 over 64 fill exactly the smallest table's dense capacity.
        let sizes = [
            1,
            2,
            7,
            8,
            9,
            49,
            63,
            64,
            65,
            385,
            1_000,
            10_000,
            99_999,
            1 << 20,
            10_000_000,
        ];
        for max_keys in sizes {
            for min_shards in [1, 2, 3, 4, 7, 8, 64, 100, 1 << 16, 1 << 20] {
                let (shards, per_shard) = layout(max_keys, min_shards);
                let min = min_shards.min(MAX_SHARDS / 2);
                let case = format!("{max_keys} over {min_shards}: {shards} x {per_shard}");
                assert!(shards >= min && shards <= 2 * min + 1, "{case}");
                assert!(shards * per_shard >= max_keys.max(min), "{case}");
                assert!(per_shard >= 1, "{case}");
                // Never more buckets than the count asked for would take.
                let buckets = |per: usize| {
                    let mut b = 8;
                    while dense_capacity(b) < per {
                        b *= 2;
                    }
                    b
                };
                let asked = max_keys.max(min).div_ceil(min);
                assert!(
                    shards * buckets(per_shard) <= min * buckets(asked),
                    "{case}"
                );
            }
        }
        // Absurd maxima neither overflow nor panic.
        assert_eq!(layout(usize::MAX, 64).0, 64);
    }

    #[test]
    fn every_shard_is_reached_and_none_beyond() {
        let s = MemoryStore::builder().max_keys(1_000_000).build();
        let n = s.inner.shards.len();
        assert_eq!(n, 75);
        assert_eq!(s.inner.shard_of(0), 0);
        assert_eq!(s.inner.shard_of(u64::MAX), n - 1);
        let mut hit = vec![0u32; n];
        for i in 0..(n as u64 * 100) {
            hit[s.inner.shard_of(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))] += 1;
        }
        assert!(hit.iter().all(|&h| h > 50), "{hit:?}");
    }

    #[test]
    fn a_shards_states_spread_over_the_bits_its_table_reads() {
        // The shard is picked by bits the table does not read: within one shard, the top
        // seven bits (the control byte) and the low ones (the bucket) take every value.
        // Picking the shard by the top bits would leave its states two or three control
        // bytes, and every search would compare many more of them.
        let s = MemoryStore::builder().max_keys(1_000_000).build();
        let q = Quota::per_second(1).unwrap();
        let mut top = std::collections::HashSet::new();
        let mut low = std::collections::HashSet::new();
        for i in 0..200_000u32 {
            let h = key(i).hash64(&s.inner.hasher);
            if s.inner.shard_of(h) == 0 {
                let slot = entry_key(h, &q);
                top.insert(slot >> 57);
                low.insert(slot & 127);
            }
        }
        assert_eq!((top.len(), low.len()), (128, 128));
    }

    /// `f` of every shard's state, summed.
    fn over_shards<C>(s: &MemoryStore<C>, f: impl Fn(&ShardState) -> u64) -> u64 {
        s.inner
            .shards
            .iter()
            .map(|shard| f(&lock(&shard.state)))
            .sum()
    }

    /// The bytes of every shard's state table.
    fn table_bytes<C>(s: &MemoryStore<C>) -> u64 {
        over_shards(s, |state| state.map.allocation_size() as u64)
    }

    #[test]
    fn a_full_shard_under_a_flood_keeps_its_table() {
        // Every new key makes room by evicting an eighth: the removals leave marks in the
        // table, which hashbrown would answer by doubling it.
        let max = dense_capacity(4_096);
        let s = one_shard(max);
        let q = [Quota::per_day(10).unwrap()];
        for i in 0..max as u32 {
            s.decide(&key(i), &q, 1).unwrap();
        }
        let full = table_bytes(&s);
        assert!(full <= 4_096 * 25 + 64, "{full}");
        let before = over_shards(&s, |state| state.moved);
        for i in 0..100_000 {
            s.decide(&key(1_000_000 + i), &q, 1).unwrap();
            assert_eq!(table_bytes(&s), full, "after {i} new keys");
        }
        assert!(s.len() <= max);
        // What the docs promise: a rebuild moves at most about sixteen states per state
        // inserted since the last one.
        let moved = over_shards(&s, |state| state.moved) - before;
        assert!(moved <= 16 * 100_000, "{moved} moves");
    }

    /// How many times every shard's table was rebuilt.
    fn rebuilds<C>(s: &MemoryStore<C>) -> u64 {
        over_shards(s, |state| state.rebuilds)
    }

    #[test]
    fn a_growing_shard_doubles_its_table_and_stops_at_what_its_maximum_needs() {
        // 10 000 states from nothing: each rebuild doubles the table (4, 8, ... 16 384
        // buckets), 13 in all, and the last table is the one the maximum needs; alike for a
        // policy of one quota (one state per key) and of two (two per key, both new at once).
        let day = Quota::per_day(10).unwrap();
        for (quotas, keys) in [
            (&[day][..], 10_000),
            (&[day, Quota::per_hour(5).unwrap()], 5_000),
        ] {
            let s = one_shard(dense_capacity(16_384));
            for i in 0..keys {
                s.decide(&key(i), quotas, 1).unwrap();
            }
            assert_eq!(s.len(), 10_000);
            assert_eq!(rebuilds(&s), 13, "{} quotas", quotas.len());
            assert_eq!(lock(&s.inner.shards[0].state).map.num_buckets(), 16_384);
        }
    }

    #[test]
    fn the_memory_store_decides_at_once() {
        // What `Store::check_now`'s docs and the layer rely on: the memory store answers
        // there, and what it answers is what `decide` (and so `check`) answers.
        let clock = ManualClock::new();
        let (a, b) = (store(&clock, 100), store(&clock, 100));
        let q = [Quota::per_second(2).unwrap()];
        for _ in 0..3 {
            let now = a
                .check_now(&key(1), &q, 1)
                .expect("decided at once")
                .unwrap();
            assert_eq!(now, b.decide(&key(1), &q, 1).unwrap());
        }
        assert!(a.check_now(&key(1), &q, 1).unwrap().unwrap().is_limited());
    }

    #[test]
    fn below_its_maximum_a_shard_under_churn_moves_fewer_states_than_it_inserts() {
        // About 3 000 states at any time in a shard that may hold a million: each sweep's
        // removals leave marks, and every rebuild they force must leave room for as many
        // inserts as it moved states (a rebuild into a table just big enough would come
        // again a few inserts later).
        let clock = ManualClock::new();
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(1_000_000)
            .shards(1)
            .sweep_interval(Duration::from_millis(10))
            .build();
        let q = [Quota::per_second(1).unwrap()];
        let mut inserted = 0u64;
        for _ in (0..30_000).step_by(10) {
            clock.advance(Duration::from_millis(10));
            for _ in 0..30 {
                inserted += 1;
                s.decide(&key(inserted as u32), &q, 1).unwrap();
            }
        }
        let moved = lock(&s.inner.shards[0].state).moved;
        // The table grew from nothing, so it was rebuilt with states in it.
        assert!(moved > 0, "no state was ever moved");
        assert!(
            moved <= inserted,
            "{moved} states moved for {inserted} inserted"
        );
    }

    #[test]
    fn updating_a_state_already_held_moves_nothing() {
        // A table with no free bucket left: a request of a key it holds adds nothing, so it
        // neither rebuilds the table nor moves the state; alike for one quota and for two.
        let day = Quota::per_day(10).unwrap();
        // The second request of key 0: 8 of 10 left, or 3 of the hour's 5.
        for (quotas, left) in [(&[day][..], 8), (&[day, Quota::per_hour(5).unwrap()], 3)] {
            let s = one_shard(10_000);
            let full = (0..10_000).find(|&i| {
                s.decide(&key(i), quotas, 1).unwrap();
                let state = lock(&s.inner.shards[0].state);
                state.map.capacity() == state.map.len()
            });
            assert!(full.is_some(), "the table always kept a free bucket");
            let at = |s: &MemoryStore<ManualClock>| {
                let state = lock(&s.inner.shards[0].state);
                let slot = entry_key(key(0).hash64(&s.inner.hasher), &quotas[0]);
                std::ptr::from_ref(state.map.find(slot, |e| e.slot == slot).unwrap()) as usize
            };
            let (before, rebuilt) = (at(&s), rebuilds(&s));
            assert_eq!(s.decide(&key(0), quotas, 1).unwrap().remaining(), left);
            assert_eq!(
                (at(&s), rebuilds(&s)),
                (before, rebuilt),
                "{} quotas",
                quotas.len()
            );
        }
    }

    #[test]
    fn a_shard_near_its_maximum_under_churn_keeps_its_table() {
        // States expire and new keys come at the same rate, the shard just under its maximum:
        // each sweep's removals leave marks, and without the store's rebuild the table would
        // double once they used up its free buckets.
        let clock = ManualClock::new();
        let max = dense_capacity(4_096);
        let s = MemoryStore::builder()
            .clock(clock.clone())
            .max_keys(max)
            .shards(1)
            .sweep_interval(Duration::from_millis(10))
            .build();
        let q = [Quota::per_second(1).unwrap()];
        let mut next = 0u32;
        let mut largest = 0;
        for ms in (0..30_000).step_by(10) {
            clock.advance(Duration::from_millis(10));
            for _ in 0..30 {
                next += 1;
                assert!(s.decide(&key(next), &q, 1).unwrap().is_allowed());
            }
            if ms == 2_000 {
                largest = table_bytes(&s);
            }
            if ms > 2_000 {
                assert_eq!(table_bytes(&s), largest, "at {ms} ms");
            }
        }
        assert!(largest <= 4_096 * 25 + 64, "{largest}");
        assert!((2_900..=3_030).contains(&s.len()), "{}", s.len());
    }

    #[test]
    fn a_zero_cost_peek_at_an_unknown_key_evicts_nothing() {
        let s = one_shard(8);
        let q = [Quota::per_day(10).unwrap()];
        for i in 0..8 {
            s.decide(&key(i), &q, 1).unwrap();
        }
        for i in 100..200 {
            assert_eq!(s.decide(&key(i), &q, 0).unwrap().remaining(), 10);
        }
        assert_eq!(s.len(), 8);
        assert!((0..8).all(|i| s.decide(&key(i), &q, 0).unwrap().remaining() == 9));
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

    /// A store like `s` (same hash seeds, so the same shards and eviction order) on `clock`.
    fn twin(
        s: &MemoryStore<ManualClock>,
        clock: &ManualClock,
        max_keys: usize,
    ) -> MemoryStore<ManualClock> {
        let mut t = store(clock, max_keys);
        Arc::get_mut(&mut t.inner).unwrap().hasher = s.inner.hasher.clone();
        t
    }

    proptest::proptest! {
        /// The one-quota path decides as the general one: the same decisions, states held,
        /// protections and evictions, whatever the algorithm, the costs, the time and a
        /// store small enough to evict.
        #[test]
        fn one_quota_decides_as_many_quotas_do(
            algorithm in 0usize..3,
            limit in 1u32..6,
            burst in 1u32..8,
            max_keys in 4usize..12,
            steps in proptest::collection::vec((0u32..10, 0u32..4, 0u64..1_500), 1..200),
        ) {
            let algorithm = [crate::Algorithm::Gcra, crate::Algorithm::FixedWindow, crate::Algorithm::SlidingWindow][algorithm];
            let quota = Quota::new(limit, Duration::from_secs(2)).unwrap();
            let quota = if algorithm == crate::Algorithm::Gcra {
                quota.with_burst(burst).unwrap()
            } else {
                quota.with_algorithm(algorithm).unwrap()
            };
            let q = [quota];
            let clock = ManualClock::new();
            let one = store(&clock, max_keys);
            let many = twin(&one, &clock, max_keys);
            let (one_recorder, many_recorder) = (
                metrics_util::debugging::DebuggingRecorder::new(),
                metrics_util::debugging::DebuggingRecorder::new(),
            );
            let (one_evictions, many_evictions) =
                (one_recorder.snapshotter(), many_recorder.snapshotter());
            let protected =
                |s: &MemoryStore<ManualClock>| over_shards(s, |st| st.protected.len() as u64);
            for (k, cost, gap_ms) in steps {
                clock.advance(Duration::from_millis(gap_ms));
                let fast = metrics::with_local_recorder(&one_recorder, || one.decide(&key(k), &q, cost));
                let general = metrics::with_local_recorder(&many_recorder, || {
                    StoreError::check_cost(&q, cost).map(|()| many.decide_many(&key(k), &q, cost))
                });
                proptest::prop_assert_eq!(fast.map_err(|e| e.kind()), general.map_err(|e| e.kind()));
                proptest::prop_assert_eq!(one.len(), many.len());
                proptest::prop_assert_eq!(protected(&one), protected(&many));
            }
            proptest::prop_assert_eq!(evictions(&one_evictions), evictions(&many_evictions));
        }
    }
}
