//! An independent reference model of every algorithm, for checking the stores decision by
//! decision.
//!
//! It is deliberately simple and shares no code with the stores: GCRA is the continuous-state
//! leaky bucket (the other of ITU-T I.371's two equivalent definitions; the stores use virtual
//! scheduling), the windows keep the timestamps of every allowed request and count them, and
//! a sliding window's wait is found by searching forward in time, not by a formula. Only the
//! specification is shared: a quota's public numbers, the documented rounding of the emission
//! interval (`period / limit`, rounded up to a whole microsecond), whole milliseconds for
//! windows, and each key's window offset (`tollgate::store::window_offset`).

use std::collections::HashMap;
use std::time::Duration;

use crate::store::window_offset;
use crate::{Algorithm, Decision, Key, Quota};

const NS_PER_MS: u64 = 1_000_000;

/// What the model says one quota reports for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaReport {
    /// This quota alone would allow the request.
    pub allowed: bool,
    /// Units left: after the request when the whole request was allowed, else now.
    pub remaining: u32,
    /// Until a request of the same cost passes this quota (0 when it allows).
    pub retry_after: Duration,
    /// Until the quota is back to its full budget, where the model states it (GCRA and fixed
    /// windows).
    pub reset_after: Option<Duration>,
    /// Until one more unit than `remaining` is available (zero when the quota is full): the
    /// bucket drained by one more unit's worth, a fixed window's end, or for a sliding window
    /// the first moment one more unit fits, found by searching forward in time.
    pub next_unit: Duration,
}

/// What the model decides for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDecision {
    /// Every quota allowed it.
    pub allowed: bool,
    /// The longest wait of the quotas that refused it.
    pub retry_after: Option<Duration>,
    /// Each quota, in the policy's order.
    pub quotas: Vec<QuotaReport>,
}

impl ModelDecision {
    /// Panics, naming `context`, unless `decision` says exactly what the model says.
    pub fn assert_matches(&self, decision: &Decision, context: &str) {
        self.assert_matches_within(decision, Duration::ZERO, context);
    }

    /// As [`assert_matches`](Self::assert_matches), but a wait may differ from the model's by
    /// less than `slack`: for a store's local cache of refusals, which replays a window's wait
    /// from when the server gave it, without the server's millisecond boundaries (it is then
    /// never below the true wait, but up to a millisecond off the server's own rounding).
    pub fn assert_matches_within(&self, decision: &Decision, slack: Duration, context: &str) {
        let wait_ok = |got: Duration, want: Duration| got.abs_diff(want) < slack || got == want;
        let show = || format!("\n  store: {decision:?}\n  model: {self:?}");
        assert_eq!(
            decision.is_allowed(),
            self.allowed,
            "{context}: allowed{}",
            show()
        );
        match (decision.retry_after(), self.retry_after) {
            (Some(got), Some(want)) => {
                assert!(wait_ok(got, want), "{context}: retry_after{}", show());
            }
            (got, want) => assert_eq!(got, want, "{context}: retry_after{}", show()),
        }
        assert_eq!(decision.states().len(), self.quotas.len(), "{context}");
        for (i, (state, want)) in decision.states().iter().zip(&self.quotas).enumerate() {
            assert_eq!(
                state.is_allowed(),
                want.allowed,
                "{context}: quota {i} allowed{}",
                show()
            );
            assert_eq!(
                state.remaining(),
                want.remaining,
                "{context}: quota {i} remaining{}",
                show()
            );
            assert!(
                wait_ok(state.retry_after(), want.retry_after),
                "{context}: quota {i} retry_after{}",
                show()
            );
            assert!(
                wait_ok(state.next_unit_after(), want.next_unit),
                "{context}: quota {i} next_unit_after{}",
                show()
            );
            if let Some(reset) = want.reset_after {
                assert!(
                    wait_ok(state.reset_after(), reset),
                    "{context}: quota {i} reset_after{}",
                    show()
                );
            }
        }
    }
}

/// The state of one key under one quota.
#[derive(Debug, Clone, Default)]
struct History {
    /// Leaky bucket: its content (ns of work) when last touched, and when.
    bucket: u64,
    touched: u64,
    /// Windows: every allowed request, as (time in ms, cost).
    allowed: Vec<(u64, u64)>,
}

/// The model: the history of every (key, quota) it was asked about.
#[derive(Debug, Default)]
pub struct Model {
    histories: HashMap<(String, String), History>,
}

/// The emission interval in ns, as documented: `period / limit`, rounded up to a whole µs.
fn emission_ns(q: &Quota) -> u64 {
    let period = u64::try_from(q.period().as_nanos()).expect("period");
    let per_unit = period.div_ceil(u64::from(q.limit()));
    per_unit.div_ceil(1_000) * 1_000
}

/// One quota's verdict, and what to record if the whole request is allowed.
struct Verdict {
    report_spent: QuotaReport,
    report_unspent: QuotaReport,
    allowed: bool,
    commit: Box<dyn FnOnce(&mut History)>,
}

impl Model {
    /// A model that has seen nothing.
    pub fn new() -> Self {
        Model::default()
    }

    /// Decides a request of `key` costing `cost` at `now_ns` under `quotas` (cost at most the
    /// smallest burst), and records it.
    pub fn decide(
        &mut self,
        key: &Key<'_>,
        quotas: &[Quota],
        cost: u32,
        now_ns: u64,
    ) -> ModelDecision {
        let name = key.qualified().to_string();
        let mut verdicts = Vec::new();
        for q in quotas {
            let history = self
                .histories
                .entry((name.clone(), q.id().to_string()))
                .or_default()
                .clone();
            let offset = window_offset(key, q);
            verdicts.push(match q.algorithm() {
                Algorithm::FixedWindow => fixed(q, &history, u64::from(cost), now_ns, offset),
                Algorithm::SlidingWindow => sliding(q, &history, u64::from(cost), now_ns, offset),
                _ => leaky_bucket(q, &history, u64::from(cost), now_ns),
            });
        }
        let allowed = verdicts.iter().all(|v| v.allowed);
        let retry_after = (!allowed).then(|| {
            verdicts
                .iter()
                .filter(|v| !v.allowed)
                .map(|v| v.report_unspent.retry_after)
                .max()
                .unwrap_or_default()
        });
        let mut reports = Vec::new();
        for (q, v) in quotas.iter().zip(verdicts) {
            if allowed {
                reports.push(v.report_spent);
                let history = self
                    .histories
                    .get_mut(&(name.clone(), q.id().to_string()))
                    .expect("history");
                (v.commit)(history);
            } else {
                reports.push(v.report_unspent);
            }
        }
        ModelDecision {
            allowed,
            retry_after,
            quotas: reports,
        }
    }
}

fn units(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The leaky bucket: the bucket holds `content` ns of work and drains one ns per ns; a unit of
/// the request pours in T; the request conforms if the bucket, after pouring, holds at most a
/// full burst (B·T). Units left are how many more T fit; the wait is how long the bucket needs
/// to drain enough.
fn leaky_bucket(q: &Quota, h: &History, cost: u64, now: u64) -> Verdict {
    let t = emission_ns(q);
    let capacity = t * u64::from(q.burst());
    let drained = h.bucket.saturating_sub(now.saturating_sub(h.touched));
    let poured = drained + cost * t;
    let allowed = poured <= capacity;
    let report = |content: u64, retry: u64| {
        let left = capacity.saturating_sub(content) / t;
        // One more unit when the bucket has drained to where `left + 1` of them fit.
        let next = if left >= u64::from(q.burst()) {
            0
        } else {
            content.saturating_sub(capacity - (left + 1) * t)
        };
        QuotaReport {
            allowed,
            remaining: units(left),
            retry_after: Duration::from_nanos(retry),
            reset_after: Some(Duration::from_nanos(content)),
            next_unit: Duration::from_nanos(next),
        }
    };
    let retry = if allowed { 0 } else { poured - capacity };
    Verdict {
        report_spent: report(poured, 0),
        report_unspent: report(drained, retry),
        allowed,
        commit: Box::new(move |h: &mut History| {
            h.bucket = poured;
            h.touched = now;
        }),
    }
}

/// The start (ms) of the window holding `now_ms` for a key with this offset.
fn window_start(now_ms: u64, w: u64, offset: u64) -> i128 {
    let offset = i128::from(offset % w);
    let w = i128::from(w);
    (i128::from(now_ms) + offset).div_euclid(w) * w - offset
}

/// Costs of the allowed requests whose time falls in `[from, to)` (ms).
fn counted(h: &History, from: i128, to: i128) -> u64 {
    h.allowed
        .iter()
        .filter(|(at, _)| (from..to).contains(&i128::from(*at)))
        .map(|(_, cost)| cost)
        .sum()
}

fn ms_ns(ms: i128) -> Duration {
    Duration::from_nanos(u64::try_from(ms.max(0)).unwrap_or(0) * NS_PER_MS)
}

/// A fixed window: the costs of the requests allowed in the window holding now, against the
/// limit.
fn fixed(q: &Quota, h: &History, cost: u64, now_ns: u64, offset: u64) -> Verdict {
    let w = u64::try_from(q.period().as_millis()).expect("window");
    let limit = u64::from(q.limit());
    let now_ms = now_ns / NS_PER_MS;
    let start = window_start(now_ms, w, offset);
    let end = start + i128::from(w);
    let count = counted(h, start, end);
    let allowed = count + cost <= limit;
    let until_end = ms_ns(end - i128::from(now_ms));
    let reset = |c: u64| if c > 0 { until_end } else { Duration::ZERO };
    Verdict {
        // Everything a fixed window counted comes back at its end.
        report_spent: QuotaReport {
            allowed,
            remaining: units(limit.saturating_sub(count + cost)),
            retry_after: Duration::ZERO,
            reset_after: Some(reset(count + cost)),
            next_unit: reset(count + cost),
        },
        report_unspent: QuotaReport {
            allowed,
            remaining: units(limit.saturating_sub(count)),
            retry_after: if allowed { Duration::ZERO } else { until_end },
            reset_after: Some(reset(count)),
            next_unit: reset(count),
        },
        allowed,
        commit: Box::new(move |h: &mut History| {
            if cost > 0 {
                h.allowed.push((now_ms, cost));
            }
        }),
    }
}

/// The sliding window's estimate at `at_ms`, times the window length (to stay in integers):
/// the previous window's costs weighted by how much of it the sliding window still covers,
/// plus the current window's.
fn estimate_times_w(h: &History, at_ms: u64, w: u64, offset: u64) -> (u128, i128) {
    let start = window_start(at_ms, w, offset);
    let curr = counted(h, start, start + i128::from(w));
    let prev = counted(h, start - i128::from(w), start);
    let elapsed = i128::from(at_ms) - start;
    let weight = u128::try_from(i128::from(w) - elapsed).unwrap_or(0);
    (
        u128::from(prev) * weight + u128::from(curr) * u128::from(w),
        start,
    )
}

fn sliding(q: &Quota, h: &History, cost: u64, now_ns: u64, offset: u64) -> Verdict {
    let w = u64::try_from(q.period().as_millis()).expect("window");
    let limit = u128::from(q.limit());
    let now_ms = now_ns / NS_PER_MS;
    let wu = u128::from(w);
    let fits_in = |h: &History, at_ms: u64, units: u128| {
        let (est, _) = estimate_times_w(h, at_ms, w, offset);
        est + units * wu <= limit * wu
    };
    // The first millisecond after now at which `units` fit in `h`, with nothing else
    // happening: the estimate never grows with time, so a binary search over the next two
    // windows finds it.
    let first_fit = |h: &History, units: u128| {
        let (mut lo, mut hi) = (now_ms + 1, now_ms + 2 * w + 1);
        assert!(
            fits_in(h, hi, units),
            "the sliding model never fits: {q:?} {units} units"
        );
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fits_in(h, mid, units) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        ms_ns(i128::from(lo - now_ms))
    };
    let (est, start) = estimate_times_w(h, now_ms, w, offset);
    let allowed = fits_in(h, now_ms, u128::from(cost));
    let retry = if allowed {
        Duration::ZERO
    } else {
        first_fit(h, u128::from(cost))
    };
    // Until one more unit than `left` fits, in the history as it would be.
    let next = |h: &History, left: u32| {
        if u128::from(left) >= limit {
            Duration::ZERO
        } else {
            first_fit(h, u128::from(left) + 1)
        }
    };
    let mut after = h.clone();
    if cost > 0 {
        after.allowed.push((now_ms, cost));
    }
    let left = |est: u128, spend: u64| {
        units(
            u64::try_from((limit * wu).saturating_sub(est + u128::from(spend) * wu) / wu)
                .unwrap_or(u64::MAX),
        )
    };
    let _ = start;
    Verdict {
        report_spent: QuotaReport {
            allowed,
            remaining: left(est, cost),
            retry_after: Duration::ZERO,
            reset_after: None,
            next_unit: if allowed {
                next(&after, left(est, cost))
            } else {
                Duration::ZERO
            },
        },
        report_unspent: QuotaReport {
            allowed,
            remaining: left(est, 0),
            retry_after: retry,
            reset_after: None,
            next_unit: next(h, left(est, 0)),
        },
        allowed,
        commit: Box::new(move |h: &mut History| {
            if cost > 0 {
                h.allowed.push((now_ms, cost));
            }
        }),
    }
}
