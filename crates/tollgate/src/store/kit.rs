//! What a store written outside this crate needs to decide exactly as the built-in ones: the
//! algorithms as one pure function over the states the store keeps.
//!
//! A store that can read a key's states and write them back atomically (a transaction with
//! `SELECT ... FOR UPDATE`, a conditional write, a compare-and-set loop) implements
//! [`Store::check`](super::Store::check) as: read the states of every quota, call [`decide`],
//! and if the decision is allowed write back each [`Decided::writes`] entry with an expiry at
//! [`StoredState::expires_at_ns`]. docs/stores.md walks through one.

use smallvec::SmallVec;

use crate::algorithm::{self, Eval, State};
use crate::{Algorithm, Decision, Key, Quota};

use super::StoreError;

/// The state of one quota of one key, as a store keeps it between requests: three integers
/// whose meaning depends on the algorithm (docs/stores.md). Store them as they are; only
/// [`decide`] interprets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredState(State);

impl StoredState {
    /// Rebuilds a state from what the store kept. Values [`decide`] could not have written
    /// (a store that answers garbage) are not trusted: see [`decide`].
    pub fn from_parts(t: u64, a: u32, b: u32) -> Self {
        StoredState(State { t, a, b })
    }

    /// The three integers to keep.
    pub fn into_parts(self) -> (u64, u32, u32) {
        (self.0.t, self.0.a, self.0.b)
    }

    /// The clock reading (nanoseconds, the store's clock) from which this state no longer
    /// matters: a key without it decides the same. Expire it then.
    pub fn expires_at_ns(&self) -> u64 {
        self.0.t
    }
}

/// What [`decide`] answers: the decision, and what to write if it is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The decision to return.
    pub decision: Decision,
    /// For each quota, in order: the state to write, or `None` (leave what is there). An
    /// allowed decision writes what it spent; a refusal writes nothing, except to repair a
    /// stored state [`decide`] could not have written (see there).
    pub writes: SmallVec<[Option<StoredState>; 2]>,
}

/// Decides a request of `cost` at `now_ns` (nanoseconds on the store's monotonic or shared
/// clock) for `key` under `quotas`, given the state the store holds for each quota (`None`
/// where it holds none), in the order of `quotas`. Every quota must allow the request for it
/// to pass; a refusal writes nothing.
///
/// A state that [`decide`] could not have written counts as absent (a window count above the
/// limit, a window that ends after the next one), except a GCRA state too far ahead,
/// which counts as a full burst used and is written back so repaired (even by a refusal; the
/// only write a refusal makes): garbage never grants more than a fresh key, never fails the
/// request, and never locks a client out past the wait it was told.
///
/// # Errors
///
/// [`StoreErrorKind::CostExceedsBurst`](super::StoreErrorKind::CostExceedsBurst) when `cost` is
/// above a quota's burst.
///
/// # Panics
///
/// When `stored` and `quotas` differ in length: a bug in the calling store.
pub fn decide(
    key: &Key<'_>,
    quotas: &[Quota],
    stored: &[Option<StoredState>],
    now_ns: u64,
    cost: u32,
) -> Result<Decided, StoreError> {
    assert_eq!(
        quotas.len(),
        stored.len(),
        "tollgate::store::decide: one stored state (or None) per quota"
    );
    StoreError::check_cost(quotas, cost)?;
    let mut repaired: SmallVec<[Option<State>; 2]> = SmallVec::new();
    let evals: SmallVec<[Eval; 2]> = quotas
        .iter()
        .zip(stored)
        .map(|(quota, s)| {
            let fixed = s.and_then(|s| plausible(quota, now_ns, s.0));
            // A GCRA state capped to a full burst must be written back even on a refusal:
            // left as it was, it would be capped again on every retry, forever.
            repaired.push(fixed.filter(|f| s.is_some_and(|s| s.0 != *f)));
            algorithm::eval(
                quota,
                now_ns,
                fixed,
                cost,
                algorithm::window_offset(key, quota),
            )
        })
        .collect();
    let allowed = evals.iter().all(Eval::allowed);
    let writes = evals
        .iter()
        .zip(&repaired)
        .map(|(e, r)| {
            if allowed {
                e.write.map(StoredState)
            } else {
                r.map(StoredState)
            }
        })
        .collect();
    Ok(Decided {
        decision: decision(&evals, allowed),
        writes,
    })
}

/// The decision the evaluations of a request's quotas make together: each quota's outcome
/// spent when all of them allow it, unspent otherwise.
#[inline]
pub(crate) fn decision(evals: &[Eval], allowed: bool) -> Decision {
    Decision::from_evals(evals, allowed)
}

/// `s` if the algorithms could have written it by `now`, a repaired GCRA state if it is too
/// far ahead, otherwise `None`.
fn plausible(quota: &Quota, now: u64, s: State) -> Option<State> {
    if s.t <= now {
        return None;
    }
    let limit = quota.limit();
    // How far ahead a window may end is the algorithms' own rule (a window past the next one
    // counts as absent), so that every store, and the Redis script, decides alike.
    match quota.algorithm() {
        Algorithm::FixedWindow => (s.a <= limit).then_some(s),
        Algorithm::SlidingWindow => (s.a <= limit && s.b <= limit).then_some(s),
        _ => Some(State {
            t: s.t.min(now.saturating_add(quota.burst_span_ns())),
            a: 0,
            b: 0,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;
    use crate::clock::ManualClock;
    use std::time::Duration;

    const NS_PER_MS: u64 = 1_000_000;

    fn q(s: &str) -> Quota {
        s.parse().unwrap()
    }

    #[test]
    fn decides_as_the_memory_store_does() {
        let clock = ManualClock::new();
        let memory = MemoryStore::with_clock(clock.clone());
        let quotas = [q("3/10s"), q("5/m fixed-window"), q("4/30s sliding-window")];
        let key = Key::new("kit", "/k", None, Some("u"));
        let mut states: Vec<Option<StoredState>> = vec![None; quotas.len()];
        let mut allowed = 0;
        for i in 0..40u64 {
            clock.advance(Duration::from_millis(700 * (i % 5)));
            let now = crate::clock::Clock::now_ns(&clock);
            let got = decide(&key, &quotas, &states, now, 1).unwrap();
            let want = memory.decide(&key, &quotas, 1).unwrap();
            assert_eq!(got.decision, want, "request {i}");
            if got.decision.is_allowed() {
                allowed += 1;
                for (s, w) in states.iter_mut().zip(&got.writes) {
                    if w.is_some() {
                        *s = *w;
                    }
                }
            } else {
                assert!(got.writes.iter().all(Option::is_none), "a refusal wrote");
            }
            // Expired states are gone, as a store with expiry would have them.
            for s in &mut states {
                if s.is_some_and(|s| s.expires_at_ns() <= now) {
                    *s = None;
                }
            }
        }
        assert!(allowed > 3 && allowed < 40, "{allowed} allowed");
    }

    #[test]
    fn garbage_never_grants_more_than_a_fresh_key_and_never_fails() {
        let key = Key::new("kit", "/g", None, Some("u"));
        let now = 1_000 * NS_PER_MS * 1_000;
        for quota in [
            q("3/10s"),
            q("3/10s fixed-window"),
            q("3/10s sliding-window"),
        ] {
            for (t, a, b) in [
                (u64::MAX, u32::MAX, u32::MAX),
                (now + 1, u32::MAX, 0),
                (u64::MAX, 1, 1),
                (0, 7, 7),
            ] {
                let stored = [Some(StoredState::from_parts(t, a, b))];
                let d = decide(&key, &[quota], &stored, now, 1).unwrap().decision;
                assert!(d.remaining() <= 2, "{quota:?} {t} {a} {b}: {d:?}");
            }
        }
        // A GCRA state far in the future is a full burst used, not a wait of centuries; the
        // refusal writes the repaired state, and the client passes at the wait it was told.
        let quotas = [q("3/10s")];
        let stored = [Some(StoredState::from_parts(u64::MAX, 0, 0))];
        let got = decide(&key, &quotas, &stored, now, 1).unwrap();
        assert!(got.decision.is_limited());
        let wait = got.decision.retry_after().unwrap();
        assert!(wait <= Duration::from_secs(10), "{got:?}");
        let repaired = got.writes[0].expect("the repaired state is written back");
        let later = now + u64::try_from(wait.as_nanos()).unwrap();
        let retry = decide(&key, &quotas, &[Some(repaired)], later, 1).unwrap();
        assert!(retry.decision.is_allowed(), "{retry:?}");
        // A state decide wrote itself is never rewritten by a refusal.
        let mut states = [None];
        for _ in 0..3 {
            let d = decide(&key, &quotas, &states, now, 1).unwrap();
            states[0] = d.writes[0].or(states[0]);
        }
        let refused = decide(&key, &quotas, &states, now, 1).unwrap();
        assert!(refused.decision.is_limited());
        assert!(refused.writes.iter().all(Option::is_none), "{refused:?}");
    }

    #[test]
    fn a_window_count_above_the_limit_counts_as_absent() {
        // A count `decide` could never have written, in either field of a sliding window (or
        // the one of a fixed window), is garbage: the key decides as a fresh one would, rather
        // than refusing a client on a number nothing spent.
        let key = Key::new("kit", "/w", None, Some("u"));
        let now = 1_000 * NS_PER_MS * 1_000;
        for quota in [q("3/10s sliding-window"), q("3/10s fixed-window")] {
            let fresh = decide(&key, &[quota], &[None], now, 1).unwrap();
            let (t, a, b) = fresh.writes[0]
                .expect("an allowed request writes")
                .into_parts();
            let garbage: &[(u32, u32)] = if quota.algorithm() == Algorithm::SlidingWindow {
                &[(a, 4), (4, b), (u32::MAX, u32::MAX)]
            } else {
                &[(4, b), (u32::MAX, b)]
            };
            for &(a, b) in garbage {
                let stored = [Some(StoredState::from_parts(t, a, b))];
                let got = decide(&key, &[quota], &stored, now, 1).unwrap();
                assert_eq!(got.decision, fresh.decision, "{quota:?} ({t}, {a}, {b})");
            }
            // And a count within the limit does count.
            let stored = [Some(StoredState::from_parts(t, 3, 0))];
            let full = decide(&key, &[quota], &stored, now, 1).unwrap();
            assert!(full.decision.is_limited(), "{quota:?}: {full:?}");
        }
    }

    #[test]
    fn a_cost_above_the_burst_is_an_error() {
        let key = Key::new("kit", "/c", None, Some("u"));
        let e = decide(&key, &[q("3/10s")], &[None], 0, 4).unwrap_err();
        assert_eq!(e.kind().reason(), "cost_exceeds_burst");
    }
}
