//! The metrics tollgate emits, through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! tollgate installs no recorder: the application does (for example with
//! `metrics-exporter-prometheus`), **before** it builds its router, because the layer registers
//! its series when it is applied. Every series is labelled by policy name (and a small, fixed set
//! of reasons or decisions), never by IP, user or key.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `ratelimit_requests_total` | counter | `policy`, `decision` | every request a policy applied to, by outcome: `allowed`, `limited`, `fail_open`, `fail_closed`, `over_capacity`, `unkeyed`, `shadow_limited`, `allowlisted`, `shadow_over_capacity`, `shadow_fail_closed` (a shadow policy's would-be refusals, let through) |
//! | `ratelimit_fail_open_total` | counter | `policy`, `reason` | requests let through without a decision because the store failed (shadow policies' included, whatever their failure mode); registered at zero for every policy and reason at start-up |
//! | `ratelimit_fail_closed_total` | counter | `policy`, `reason` | requests refused with 503 because the store failed on a fail-closed policy |
//! | `ratelimit_fallback_total` | counter | `policy`, `reason` | requests decided by a local fallback store because the shared store failed; registered at zero |
//! | `ratelimit_concurrency_requests_total` | counter | `policy`, `decision` | the same as `ratelimit_requests_total`, for the concurrency layer's policies (`allowed`: a slot was held; `limited`: none was free), so that a concurrency policy never merges with a rate policy of the same name |
//! | `ratelimit_concurrency_fail_open_total` | counter | `policy`, `reason` | requests a concurrency policy let through without a slot because its store failed; registered at zero |
//! | `ratelimit_concurrency_fail_closed_total` | counter | `policy`, `reason` | requests a fail-closed concurrency policy refused because its store failed |
//! | `ratelimit_concurrency_in_flight` | gauge | `policy` | requests of this instance holding a slot of a concurrency policy now, from the moment the slot is taken until the response body ends or is dropped; registered at zero (sum over instances for the whole service) |
//! | `ratelimit_store_evictions_total` | counter | `policy`, `limited` | live memory-store states of this policy dropped because the store was full; `limited="true"` only when the shard held nothing but limited clients |
//! | `ratelimit_store_errors_total` | counter | `store`, `reason` | failed store calls (shared stores) |
//! | `ratelimit_store_degraded` | gauge | `store` | 1 while the store is known to be down (circuit open), else 0 |
//! | `ratelimit_store_duration_seconds` | histogram | `store` | time of each store round trip, failed ones included |
//! | `ratelimit_store_calls_total` | counter | `store` | calls sent to the store: a Redis store's script calls (one may carry several checks; with the histogram's count, checks per call); registered at zero |
//! | `ratelimit_deny_cache_hits_total` | counter | `store` | requests refused from the store's local deny cache, without a round trip |
//!
//! Reasons: `timeout`, `unavailable`, `auth`, `tls`, `connection_refused`, `dns`,
//! `circuit_open`, `script_error`, `invalid_response`, `other` (see [`StoreErrorKind::reason`](crate::StoreErrorKind::reason)).

/// Requests by policy and decision.
pub const REQUESTS_TOTAL: &str = "ratelimit_requests_total";
/// Requests let through because the store failed.
pub const FAIL_OPEN_TOTAL: &str = "ratelimit_fail_open_total";
/// Requests refused because the store failed on a fail-closed policy.
pub const FAIL_CLOSED_TOTAL: &str = "ratelimit_fail_closed_total";
/// Requests decided by a local fallback store because the shared store failed.
pub const FALLBACK_TOTAL: &str = "ratelimit_fallback_total";
/// Requests a concurrency policy applied to, by policy and decision (its own series, so that
/// a concurrency policy and a rate policy of the same name never merge).
pub const CONCURRENCY_REQUESTS_TOTAL: &str = "ratelimit_concurrency_requests_total";
/// Requests a concurrency policy let through without a slot because its store failed.
pub const CONCURRENCY_FAIL_OPEN_TOTAL: &str = "ratelimit_concurrency_fail_open_total";
/// Requests a fail-closed concurrency policy refused because its store failed.
pub const CONCURRENCY_FAIL_CLOSED_TOTAL: &str = "ratelimit_concurrency_fail_closed_total";
/// Requests holding a concurrency slot now, in this instance.
pub const CONCURRENCY_IN_FLIGHT: &str = "ratelimit_concurrency_in_flight";
/// Live memory-store states evicted because the store was full.
pub const STORE_EVICTIONS_TOTAL: &str = "ratelimit_store_evictions_total";
/// Failed store calls, by store and reason.
pub const STORE_ERRORS_TOTAL: &str = "ratelimit_store_errors_total";
/// 1 while a store is known to be down.
pub const STORE_DEGRADED: &str = "ratelimit_store_degraded";
/// Duration of store round trips.
pub const STORE_DURATION_SECONDS: &str = "ratelimit_store_duration_seconds";
/// Requests refused from a store's local deny cache, without a round trip.
pub const DENY_CACHE_HITS_TOTAL: &str = "ratelimit_deny_cache_hits_total";
/// Calls sent to a store (a Redis store's script calls, each of which may carry several
/// checks).
pub const STORE_CALLS_TOTAL: &str = "ratelimit_store_calls_total";

/// Every series name above, for tools that check dashboards and alert rules against what is
/// exported.
pub const NAMES: [&str; 14] = [
    REQUESTS_TOTAL,
    FAIL_OPEN_TOTAL,
    FAIL_CLOSED_TOTAL,
    FALLBACK_TOTAL,
    CONCURRENCY_REQUESTS_TOTAL,
    CONCURRENCY_FAIL_OPEN_TOTAL,
    CONCURRENCY_FAIL_CLOSED_TOTAL,
    CONCURRENCY_IN_FLIGHT,
    STORE_EVICTIONS_TOTAL,
    STORE_ERRORS_TOTAL,
    STORE_DEGRADED,
    STORE_DURATION_SECONDS,
    DENY_CACHE_HITS_TOTAL,
    STORE_CALLS_TOTAL,
];

/// The `decision` label values of [`REQUESTS_TOTAL`].
pub const DECISIONS: [&str; 10] = [
    "allowed",
    "limited",
    "fail_open",
    "fail_closed",
    "over_capacity",
    "unkeyed",
    "shadow_limited",
    "allowlisted",
    "shadow_over_capacity",
    "shadow_fail_closed",
];

/// Describes every metric to the installed recorder (help text and unit).
///
/// The layer calls this when it is applied; call it yourself only if you want the descriptions
/// before any layer exists.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{Unit, describe_counter};
        describe_counter!(
            REQUESTS_TOTAL,
            Unit::Count,
            "Requests a rate-limit policy applied to, by decision."
        );
        describe_counter!(
            FAIL_OPEN_TOTAL,
            Unit::Count,
            "Requests let through without a rate-limit decision because the store failed."
        );
        describe_counter!(
            FAIL_CLOSED_TOTAL,
            Unit::Count,
            "Requests refused with 503 because the rate-limit store failed on a fail-closed policy."
        );
        describe_counter!(
            FALLBACK_TOTAL,
            Unit::Count,
            "Requests decided by a local fallback store (a per-instance limit) because the shared store failed."
        );
        describe_counter!(
            CONCURRENCY_REQUESTS_TOTAL,
            Unit::Count,
            "Requests a concurrency policy applied to, by decision."
        );
        describe_counter!(
            CONCURRENCY_FAIL_OPEN_TOTAL,
            Unit::Count,
            "Requests a concurrency policy let through without a slot because its store failed."
        );
        describe_counter!(
            CONCURRENCY_FAIL_CLOSED_TOTAL,
            Unit::Count,
            "Requests refused because the concurrency store failed on a fail-closed policy."
        );
        metrics::describe_gauge!(
            CONCURRENCY_IN_FLIGHT,
            Unit::Count,
            "Requests of this instance holding a concurrency slot now, until their response body ends."
        );
        metrics::describe_gauge!(
            STORE_DEGRADED,
            "1 while the rate-limit store is known to be down (circuit breaker open), else 0."
        );
        metrics::describe_histogram!(
            STORE_DURATION_SECONDS,
            Unit::Seconds,
            "Duration of rate-limit store round trips, failed ones included."
        );
        describe_counter!(
            STORE_CALLS_TOTAL,
            Unit::Count,
            "Calls sent to a rate-limit store; a Redis script call may carry several checks."
        );
        describe_counter!(
            DENY_CACHE_HITS_TOTAL,
            Unit::Count,
            "Requests refused from a rate-limit store's local deny cache, without a round trip."
        );
        describe_counter!(
            STORE_ERRORS_TOTAL,
            Unit::Count,
            "Failed rate-limit store calls, by reason."
        );
        describe_counter!(
            STORE_EVICTIONS_TOTAL,
            Unit::Count,
            "Live rate-limit states dropped because the memory store reached its maximum size, by policy and whether their client was limited."
        );
    }
}

/// Counts `n` live states of `policy` dropped from a full memory store, whose client was
/// limited at the time or not.
pub(crate) fn store_evictions(policy: &str, limited: bool, n: u64) {
    #[cfg(feature = "metrics")]
    if n > 0 {
        let limited = if limited { "true" } else { "false" };
        metrics::counter!(
            STORE_EVICTIONS_TOTAL,
            "policy" => policy.to_owned(),
            "limited" => limited
        )
        .increment(n);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (policy, limited, n);
}

/// The counters of one policy, registered once when the layer is applied.
#[derive(Debug)]
pub(crate) struct PolicyCounters {
    #[cfg(feature = "metrics")]
    decisions: [metrics::Counter; 10],
    #[cfg(feature = "metrics")]
    fail_open: [metrics::Counter; crate::StoreErrorKind::FAILURE_REASONS.len()],
    #[cfg(feature = "metrics")]
    fail_closed: [metrics::Counter; crate::StoreErrorKind::FAILURE_REASONS.len()],
    #[cfg(feature = "metrics")]
    fallback: [metrics::Counter; crate::StoreErrorKind::FAILURE_REASONS.len()],
    /// Concurrency policies only (a no-op handle for rate policies).
    #[cfg(feature = "metrics")]
    in_flight: metrics::Gauge,
}

/// One request counted in `ratelimit_concurrency_in_flight` while this lives.
#[derive(Debug)]
pub(crate) struct InFlight {
    #[cfg(feature = "metrics")]
    gauge: metrics::Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        self.gauge.decrement(1.0);
    }
}

/// Indexes into [`DECISIONS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Allowed = 0,
    Limited = 1,
    FailOpen = 2,
    FailClosed = 3,
    OverCapacity = 4,
    Unkeyed = 5,
    ShadowLimited = 6,
    Allowlisted = 7,
    ShadowOverCapacity = 8,
    ShadowFailClosed = 9,
}

/// Which layer a policy belongs to: each has its own series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limiter {
    /// `ratelimit_requests_total`, `ratelimit_fail_open_total`, ...
    Rate,
    /// `ratelimit_concurrency_requests_total`, `ratelimit_concurrency_fail_open_total`, ...
    Concurrency,
}

impl PolicyCounters {
    /// Registers this policy's series; the fail-open ones start at zero so that dashboards and
    /// alerts work before the first failure.
    pub(crate) fn register(policy: &str, limiter: Limiter) -> Self {
        #[cfg(feature = "metrics")]
        {
            let (requests, open, closed) = match limiter {
                Limiter::Rate => (REQUESTS_TOTAL, FAIL_OPEN_TOTAL, FAIL_CLOSED_TOTAL),
                Limiter::Concurrency => (
                    CONCURRENCY_REQUESTS_TOTAL,
                    CONCURRENCY_FAIL_OPEN_TOTAL,
                    CONCURRENCY_FAIL_CLOSED_TOTAL,
                ),
            };
            let policy: metrics::SharedString = policy.to_owned().into();
            let decisions = DECISIONS
                .map(|d| metrics::counter!(requests, "policy" => policy.clone(), "decision" => d));
            let reason_counters = |name: &'static str| {
                crate::StoreErrorKind::FAILURE_REASONS
                    .map(|r| metrics::counter!(name, "policy" => policy.clone(), "reason" => r))
            };
            let fail_open = reason_counters(open);
            // Only the rate limiter has a fallback store.
            let fallback = match limiter {
                Limiter::Rate => reason_counters(FALLBACK_TOTAL),
                Limiter::Concurrency => {
                    crate::StoreErrorKind::FAILURE_REASONS.map(|_| metrics::Counter::noop())
                }
            };
            for c in fail_open.iter().chain(&fallback) {
                c.increment(0);
            }
            let in_flight = match limiter {
                Limiter::Rate => metrics::Gauge::noop(),
                Limiter::Concurrency => {
                    let gauge = metrics::gauge!(CONCURRENCY_IN_FLIGHT, "policy" => policy.clone());
                    gauge.increment(0.0);
                    gauge
                }
            };
            PolicyCounters {
                decisions,
                fail_open,
                fail_closed: reason_counters(closed),
                fallback,
                in_flight,
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (policy, limiter);
            PolicyCounters {}
        }
    }

    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn outcome(&self, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        self.decisions[outcome as usize].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }

    /// Counts one more request in flight until the returned guard is dropped.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn in_flight(&self) -> InFlight {
        #[cfg(feature = "metrics")]
        {
            self.in_flight.increment(1.0);
            InFlight {
                gauge: self.in_flight.clone(),
            }
        }
        #[cfg(not(feature = "metrics"))]
        InFlight {}
    }

    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn failure(&self, open: bool, kind: crate::StoreErrorKind) {
        #[cfg(feature = "metrics")]
        {
            let i = reason_index(kind);
            if open {
                self.fail_open[i].increment(1);
            } else {
                self.fail_closed[i].increment(1);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (open, kind);
    }

    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn fallback(&self, reason: crate::StoreErrorKind) {
        #[cfg(feature = "metrics")]
        self.fallback[reason_index(reason)].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = reason;
    }
}

#[cfg(feature = "metrics")]
fn reason_index(kind: crate::StoreErrorKind) -> usize {
    crate::StoreErrorKind::FAILURE_REASONS
        .iter()
        .position(|r| *r == kind.reason())
        .unwrap_or(crate::StoreErrorKind::FAILURE_REASONS.len() - 1)
}

/// The health metrics of one shared store (`store` label): failed calls by reason, a degraded
/// gauge, round-trip durations. For store implementations; the handles are registered when
/// this is built, so build it after the recorder is installed.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    #[cfg(feature = "metrics")]
    errors: [metrics::Counter; crate::StoreErrorKind::FAILURE_REASONS.len()],
    #[cfg(feature = "metrics")]
    degraded: metrics::Gauge,
    #[cfg(feature = "metrics")]
    duration: metrics::Histogram,
    #[cfg(feature = "metrics")]
    deny_cache_hits: metrics::Counter,
    #[cfg(feature = "metrics")]
    calls: metrics::Counter,
}

impl StoreMetrics {
    /// Registers the metrics of the store named `store` (errors at zero, degraded at 0).
    pub fn new(store: &str) -> Self {
        describe();
        #[cfg(feature = "metrics")]
        {
            let store: metrics::SharedString = store.to_owned().into();
            let errors = crate::StoreErrorKind::FAILURE_REASONS.map(
                |r| metrics::counter!(STORE_ERRORS_TOTAL, "store" => store.clone(), "reason" => r),
            );
            for c in &errors {
                c.increment(0);
            }
            let degraded = metrics::gauge!(STORE_DEGRADED, "store" => store.clone());
            degraded.set(0.0);
            let deny_cache_hits =
                metrics::counter!(DENY_CACHE_HITS_TOTAL, "store" => store.clone());
            deny_cache_hits.increment(0);
            let calls = metrics::counter!(STORE_CALLS_TOTAL, "store" => store.clone());
            calls.increment(0);
            StoreMetrics {
                errors,
                degraded,
                duration: metrics::histogram!(STORE_DURATION_SECONDS, "store" => store),
                deny_cache_hits,
                calls,
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = store;
            StoreMetrics {}
        }
    }

    /// Counts one failed call.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub fn error(&self, kind: crate::StoreErrorKind) {
        #[cfg(feature = "metrics")]
        self.errors[reason_index(kind)].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = kind;
    }

    /// Sets the degraded gauge.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub fn degraded(&self, degraded: bool) {
        #[cfg(feature = "metrics")]
        self.degraded.set(if degraded { 1.0 } else { 0.0 });
        #[cfg(not(feature = "metrics"))]
        let _ = degraded;
    }

    /// Counts one request refused from a local deny cache.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub fn deny_cache_hit(&self) {
        #[cfg(feature = "metrics")]
        self.deny_cache_hits.increment(1);
    }

    /// Counts one call sent to the store (which may carry several operations).
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub fn call(&self) {
        #[cfg(feature = "metrics")]
        self.calls.increment(1);
    }

    /// Records one round trip.
    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub fn duration(&self, took: std::time::Duration) {
        #[cfg(feature = "metrics")]
        self.duration.record(took.as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }
}
