//! What a store answers for one request.

use std::time::Duration;

use smallvec::SmallVec;

use crate::{Quota, StoreErrorKind};

/// The outcome of one quota for one request: the one type that carries it from the algorithm
/// (the memory store, the store kit, the Redis store's reply) to the response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaState {
    pub(crate) quota: Quota,
    pub(crate) allowed: bool,
    pub(crate) remaining: u32,
    // Nanoseconds: `Duration`s would make every decision larger to copy.
    pub(crate) reset_after_ns: u64,
    pub(crate) retry_after_ns: u64,
    pub(crate) next_unit_ns: u64,
}

impl QuotaState {
    /// Builds a state from what a store answered. Stores outside this crate call this; the
    /// layer only reads states. What no quota could report is corrected, so a store that
    /// answers garbage cannot make the headers lie: `remaining` is at most the burst, and an
    /// allowed state has no wait.
    ///
    /// The time until one more unit is available ([`next_unit_after`](Self::next_unit_after))
    /// follows from these numbers for GCRA and fixed windows; for a sliding window it depends
    /// on the window's counts, so this takes the reset time (never too early, possibly too
    /// late) unless the store gives it with [`with_next_unit_after`](Self::with_next_unit_after).
    pub fn new(
        quota: Quota,
        allowed: bool,
        remaining: u32,
        reset_after: Duration,
        retry_after: Duration,
    ) -> Self {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let remaining = remaining.min(quota.burst());
        let reset_after_ns = ns(reset_after);
        QuotaState::from_ns(
            quota,
            allowed,
            remaining,
            reset_after_ns,
            if allowed { 0 } else { ns(retry_after) },
            next_unit_ns(&quota, remaining, reset_after_ns),
        )
    }

    /// This state with the time until one more unit is available, as the store computed it
    /// (at most the reset time: a full budget has no more to give).
    #[must_use]
    pub fn with_next_unit_after(mut self, next: Duration) -> Self {
        let next = u64::try_from(next.as_nanos()).unwrap_or(u64::MAX);
        self.next_unit_ns = next.min(self.reset_after_ns);
        self
    }

    /// A state as the algorithms compute it, in nanoseconds; they never report more than the
    /// burst, nor a wait for an allowed request.
    pub(crate) const fn from_ns(
        quota: Quota,
        allowed: bool,
        remaining: u32,
        reset_after_ns: u64,
        retry_after_ns: u64,
        next_unit_ns: u64,
    ) -> Self {
        QuotaState {
            quota,
            allowed,
            remaining,
            reset_after_ns,
            retry_after_ns,
            next_unit_ns,
        }
    }

    /// The quota this state is about.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Whether this quota alone would have allowed the request.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// Units left: after this request when the request was allowed, or available now when it
    /// was refused (nothing is spent by a refused request).
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Time until this quota is back to a full burst.
    pub fn reset_after(&self) -> Duration {
        Duration::from_nanos(self.reset_after_ns)
    }

    /// Time until a request of the same cost would pass this quota; zero when it passed.
    pub fn retry_after(&self) -> Duration {
        Duration::from_nanos(self.retry_after_ns)
    }

    /// Time until one more unit than [`remaining`](Self::remaining) is available; zero when
    /// the quota is full. What the `t` of an allowed quota's `RateLimit` item says
    /// (draft-ietf-httpapi-ratelimit-headers-10: "until additional quota is made available").
    pub fn next_unit_after(&self) -> Duration {
        Duration::from_nanos(self.next_unit_ns)
    }
}

/// The time until one more unit is available, from a state's units left and reset time: for
/// GCRA, units come back one emission interval apart, the last one at the reset; a fixed
/// window gives everything back at its end; a sliding window is bounded by its reset.
pub(crate) fn next_unit_ns(quota: &Quota, remaining: u32, reset_after_ns: u64) -> u64 {
    let burst = quota.burst();
    if remaining >= burst {
        return 0;
    }
    match quota.algorithm() {
        crate::Algorithm::Gcra => {
            let later_units = u64::from(burst - remaining - 1);
            reset_after_ns.saturating_sub(later_units.saturating_mul(quota.emission_ns()))
        }
        _ => reset_after_ns,
    }
}

/// A store's answer for one request: allowed or limited, with the state of every quota of the
/// policy.
///
/// With [`RateLimitLayer::decision_extension`](crate::RateLimitLayer::decision_extension), the
/// layer puts the decision in the request's extensions before calling the inner service, so
/// handlers can read it:
///
/// ```
/// use axum::Extension;
/// use tollgate::Decision;
///
/// async fn handler(Extension(decision): Extension<Decision>) -> String {
///     format!("{} requests left", decision.remaining())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    allowed: bool,
    fallback: Option<StoreErrorKind>,
    states: SmallVec<[QuotaState; 2]>,
}

impl Decision {
    /// Builds a decision from the states of every quota: the request is allowed only when every
    /// quota allowed it.
    pub fn from_states(states: impl IntoIterator<Item = QuotaState>) -> Self {
        let states: SmallVec<[QuotaState; 2]> = states.into_iter().collect();
        let allowed = states.iter().all(QuotaState::is_allowed);
        Decision {
            allowed,
            fallback: None,
            states,
        }
    }

    /// The decision of evaluations the policy decided as `allowed` (every quota allowed it),
    /// built in place: no intermediate collection to copy.
    #[inline]
    pub(crate) fn from_evals(evals: &[crate::algorithm::Eval], allowed: bool) -> Self {
        let mut decision = Decision {
            allowed,
            fallback: None,
            states: SmallVec::new(),
        };
        for e in evals {
            decision.states.push(e.state(allowed));
        }
        decision
    }

    /// The decision of a policy of one quota: the request is allowed when that quota allows
    /// it.
    #[inline(always)]
    pub(crate) fn one(state: QuotaState) -> Self {
        let mut states = SmallVec::new();
        states.push(state);
        Decision {
            allowed: state.allowed,
            fallback: None,
            states,
        }
    }

    /// Marks the decision as made by a local fallback store because the shared store failed
    /// for `reason`. The layer counts such decisions in `ratelimit_fallback_total{reason}`.
    #[must_use]
    pub fn into_fallback(mut self, reason: StoreErrorKind) -> Self {
        self.fallback = Some(reason);
        self
    }

    /// Whether a local fallback store made this decision (the limit was then per instance).
    pub fn is_fallback(&self) -> bool {
        self.fallback.is_some()
    }

    /// Why the shared store could not decide, when a fallback store did.
    pub fn fallback_reason(&self) -> Option<StoreErrorKind> {
        self.fallback
    }

    /// Whether the request may go through.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// Whether the request was refused.
    pub fn is_limited(&self) -> bool {
        !self.allowed
    }

    /// How long the client must wait before the same request can pass: the longest wait of the
    /// quotas that refused it. `None` when the request was allowed.
    pub fn retry_after(&self) -> Option<Duration> {
        if self.allowed {
            return None;
        }
        self.states.iter().map(QuotaState::retry_after).max()
    }

    /// The quota that binds: for a refused request, the one whose wait is the longest (what
    /// `Retry-After` says; the longest reset among ties); otherwise the one with the fewest
    /// units left (the longest reset among ties).
    pub fn binding(&self) -> Option<&QuotaState> {
        if !self.allowed {
            return self.states.iter().filter(|s| !s.allowed).max_by(|a, b| {
                a.retry_after_ns
                    .cmp(&b.retry_after_ns)
                    .then(a.reset_after_ns.cmp(&b.reset_after_ns))
            });
        }
        self.states.iter().min_by(|a, b| {
            a.remaining
                .cmp(&b.remaining)
                .then(b.reset_after_ns.cmp(&a.reset_after_ns))
        })
    }

    /// The limit of the binding quota (units per period); 0 for a decision without quotas.
    pub fn limit(&self) -> u32 {
        self.binding().map_or(0, |s| s.quota.limit())
    }

    /// Units left in the binding quota.
    pub fn remaining(&self) -> u32 {
        self.binding().map_or(0, QuotaState::remaining)
    }

    /// Time until the binding quota is back to a full burst.
    pub fn reset_after(&self) -> Duration {
        self.binding()
            .map_or(Duration::ZERO, QuotaState::reset_after)
    }

    /// This refusal as it stands `elapsed` later, without new information: every wait is
    /// shorter by `elapsed`; `None` once the wait is over (the request may pass now) or for an
    /// allowed decision. Used by deny caches that answer for a store until the wait is over.
    pub fn later(&self, elapsed: Duration) -> Option<Decision> {
        let wait = self.retry_after()?;
        if elapsed >= wait {
            return None;
        }
        let states = self.states.iter().map(|s| {
            // A quota whose own wait is over would now allow (nothing else changed).
            let allowed = s.allowed || s.retry_after() <= elapsed;
            let reset_after = s.reset_after().saturating_sub(elapsed);
            let (remaining, reset_after) = match s.quota.algorithm() {
                // GCRA replenishes continuously: what is left follows from the time used.
                crate::Algorithm::Gcra => {
                    let used = u64::try_from(reset_after.as_nanos()).unwrap_or(u64::MAX);
                    let free = s.quota.burst_span_ns().saturating_sub(used);
                    let left = u32::try_from(free / s.quota.emission_ns()).unwrap_or(u32::MAX);
                    (left, reset_after)
                }
                // A fixed window keeps its count until it ends, then starts empty.
                crate::Algorithm::FixedWindow if s.reset_after() <= elapsed => {
                    (s.quota.limit(), Duration::ZERO)
                }
                _ => (s.remaining, reset_after),
            };
            let later = QuotaState::new(
                s.quota,
                allowed,
                remaining,
                reset_after,
                s.retry_after().saturating_sub(elapsed),
            );
            if s.quota.algorithm() == crate::Algorithm::SlidingWindow {
                later.with_next_unit_after(s.next_unit_after().saturating_sub(elapsed))
            } else {
                later
            }
        });
        Some(Decision {
            allowed: false,
            fallback: self.fallback,
            states: states.collect(),
        })
    }

    /// The state of every quota, in the policy's order.
    pub fn states(&self) -> &[QuotaState] {
        &self.states
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(limit: u32, allowed: bool, remaining: u32, reset: u64, retry: u64) -> QuotaState {
        QuotaState::new(
            Quota::per_minute(limit).unwrap(),
            allowed,
            remaining,
            Duration::from_secs(reset),
            Duration::from_secs(retry),
        )
    }

    #[test]
    fn limited_when_any_quota_refuses_and_waits_for_the_longest() {
        let d = Decision::from_states([state(10, true, 3, 20, 0), state(100, false, 0, 50, 7)]);
        assert!(d.is_limited());
        assert_eq!(d.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(d.limit(), 100);
        assert_eq!(d.remaining(), 0);

        let d = Decision::from_states([state(10, false, 0, 20, 3), state(100, false, 0, 50, 7)]);
        assert_eq!(d.retry_after(), Some(Duration::from_secs(7)));
        // Same remaining: the longer reset binds.
        assert_eq!(d.reset_after(), Duration::from_secs(50));
    }

    #[test]
    fn allowed_reports_the_tightest_quota() {
        let d = Decision::from_states([state(10, true, 3, 20, 0), state(100, true, 90, 50, 0)]);
        assert!(d.is_allowed());
        assert_eq!(d.retry_after(), None);
        assert_eq!((d.limit(), d.remaining()), (10, 3));
    }

    #[test]
    fn allowed_state_never_carries_a_retry_after() {
        assert_eq!(state(10, true, 3, 20, 9).retry_after(), Duration::ZERO);
        // A store cannot report more than the burst.
        assert_eq!(state(10, true, 300, 20, 0).remaining(), 10);
    }
}
