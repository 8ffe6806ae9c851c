//! The metrics tollgate emits, through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! tollgate installs no recorder: the application does (for example with
//! `metrics-exporter-prometheus`), **before** it builds its router, because the layer registers
//! its series when it is applied. Every series is labelled by policy name (and a small, fixed set
//! of reasons or decisions), never by IP, user or key.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `ratelimit_requests_total` | counter | `policy`, `decision` | every request a policy applied to, by outcome: `allowed`, `limited`, `fail_open`, `fail_closed`, `over_capacity`, `unkeyed` |
//! | `ratelimit_fail_open_total` | counter | `policy`, `reason` | requests let through without a decision because the store failed; registered at zero for every policy and reason at start-up |
//! | `ratelimit_fail_closed_total` | counter | `policy`, `reason` | requests refused with 503 because the store failed on a fail-closed policy |
//! | `ratelimit_store_evictions_total` | counter | | live memory-store states dropped because the store was full |
//!
//! Reasons: `timeout`, `unavailable`, `circuit_open`, `script_error`, `invalid_response`,
//! `other` (see [`StoreErrorKind::reason`](crate::StoreErrorKind::reason)).

/// Requests by policy and decision.
pub const REQUESTS_TOTAL: &str = "ratelimit_requests_total";
/// Requests let through because the store failed.
pub const FAIL_OPEN_TOTAL: &str = "ratelimit_fail_open_total";
/// Requests refused because the store failed on a fail-closed policy.
pub const FAIL_CLOSED_TOTAL: &str = "ratelimit_fail_closed_total";
/// Live memory-store states evicted because the store was full.
pub const STORE_EVICTIONS_TOTAL: &str = "ratelimit_store_evictions_total";

/// The `decision` label values of [`REQUESTS_TOTAL`].
pub const DECISIONS: [&str; 6] = [
    "allowed",
    "limited",
    "fail_open",
    "fail_closed",
    "over_capacity",
    "unkeyed",
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
            STORE_EVICTIONS_TOTAL,
            Unit::Count,
            "Live rate-limit states dropped because the memory store reached its maximum size."
        );
    }
}

pub(crate) fn store_evictions(n: u64) {
    #[cfg(feature = "metrics")]
    if n > 0 {
        metrics::counter!(STORE_EVICTIONS_TOTAL).increment(n);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = n;
}

/// The counters of one policy, registered once when the layer is applied.
#[derive(Debug)]
pub(crate) struct PolicyCounters {
    #[cfg(feature = "metrics")]
    decisions: [metrics::Counter; 6],
    #[cfg(feature = "metrics")]
    fail_open: [metrics::Counter; 6],
    #[cfg(feature = "metrics")]
    fail_closed: [metrics::Counter; 6],
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
}

impl PolicyCounters {
    /// Registers this policy's series; the fail-open ones start at zero so that dashboards and
    /// alerts work before the first failure.
    pub(crate) fn register(policy: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let policy: metrics::SharedString = policy.to_owned().into();
            let decisions = DECISIONS.map(
                |d| metrics::counter!(REQUESTS_TOTAL, "policy" => policy.clone(), "decision" => d),
            );
            let reason_counters = |name: &'static str| {
                crate::StoreErrorKind::FAILURE_REASONS
                    .map(|r| metrics::counter!(name, "policy" => policy.clone(), "reason" => r))
            };
            let fail_open = reason_counters(FAIL_OPEN_TOTAL);
            for c in &fail_open {
                c.increment(0);
            }
            PolicyCounters {
                decisions,
                fail_open,
                fail_closed: reason_counters(FAIL_CLOSED_TOTAL),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = policy;
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

    #[cfg_attr(not(feature = "metrics"), allow(clippy::unused_self))]
    pub(crate) fn failure(&self, open: bool, kind: crate::StoreErrorKind) {
        #[cfg(feature = "metrics")]
        {
            let i = crate::StoreErrorKind::FAILURE_REASONS
                .iter()
                .position(|r| *r == kind.reason())
                .unwrap_or(crate::StoreErrorKind::FAILURE_REASONS.len() - 1);
            if open {
                self.fail_open[i].increment(1);
            } else {
                self.fail_closed[i].increment(1);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (open, kind);
    }
}
