//! The generic cell rate algorithm, as a pure function of integer nanoseconds.
//!
//! Every store runs this same arithmetic (the Redis store runs it in Lua, in microseconds,
//! which is exact because emission intervals are whole microseconds). See `docs/algorithms.md`
//! for a worked example.

use crate::algorithm::{Eval, State};
use crate::{Quota, QuotaState};

/// Decides one request of `cost` units at `now` against the stored theoretical arrival time:
/// the quota's state if the request is allowed and spent, its state if nothing is spent, and
/// the new arrival time to store.
///
/// `cost` must not exceed the quota's burst (callers check this first: such a request can
/// never pass and is reported as an error, not as a limit).
#[inline]
pub(crate) fn decide(now: u64, stored_tat: Option<u64>, quota: &Quota, cost: u32) -> Eval {
    let t = quota.emission_ns();
    let span = quota.burst_span_ns();
    let tat = stored_tat.map_or(now, |tat| tat.max(now));
    // cost <= burst, so cost * t <= span, which was checked to fit at construction.
    let new_tat = tat.saturating_add(t * u64::from(cost));
    let ahead = new_tat - now;
    // The part of the burst in use before this request: what a refusal reports.
    let used = tat - now;
    if ahead <= span {
        Eval::new(
            (new_tat > now).then_some(State {
                t: new_tat,
                a: 0,
                b: 0,
            }),
            &state(quota, true, units((span - ahead) / t), ahead, 0),
            &state(quota, true, units((span - used) / t), used, 0),
        )
    } else {
        let left = units(span.saturating_sub(used) / t);
        Eval::refused(&state(quota, false, left, used, ahead - span))
    }
}

/// A GCRA state: units come back one emission interval apart, so the next one is due a
/// whole number of intervals before the reset.
fn state(quota: &Quota, allowed: bool, left: u32, reset_ns: u64, retry_ns: u64) -> QuotaState {
    let next = crate::decision::next_unit_ns(quota, left, reset_ns);
    QuotaState::from_ns(*quota, allowed, left, reset_ns, retry_ns, next)
}

fn units(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    /// What one quota deciding alone reports: its state spent when it allows, else unspent.
    fn alone(e: &Eval) -> QuotaState {
        e.state(e.allowed())
    }

    /// Runs a sequence of (time, cost) requests through one key and returns what each reports.
    fn run(quota: &Quota, requests: &[(u64, u32)]) -> Vec<QuotaState> {
        let mut tat = None;
        requests
            .iter()
            .map(|&(now, cost)| {
                let e = decide(now, tat, quota, cost);
                if let Some(w) = e.write {
                    tat = Some(w.t);
                }
                alone(&e)
            })
            .collect()
    }

    #[test]
    fn worked_example_from_the_docs() {
        // 5 per 10 seconds, burst 5: T = 2s.
        let q = Quota::new(5, Duration::from_secs(10)).unwrap();
        let v = run(&q, &[(0, 1), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1)]);
        let remaining: Vec<_> = v.iter().map(|v| v.remaining).collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0, 0]);
        assert!(v[..5].iter().all(|v| v.allowed));
        assert!(!v[5].allowed);
        // The sixth may retry when one unit has been replenished: 2 s.
        assert_eq!(v[5].retry_after_ns, 2 * S);
        // The bucket is full again after 10 s.
        assert_eq!(v[4].reset_after_ns, 10 * S);
        assert_eq!(v[5].reset_after_ns, 10 * S);
    }

    #[test]
    fn replenishes_one_unit_per_emission_interval() {
        let q = Quota::new(5, Duration::from_secs(10)).unwrap();
        let mut reqs: Vec<_> = (0..5).map(|_| (0, 1)).collect();
        reqs.extend([
            (2 * S - 1, 1),
            (2 * S, 1),
            (2 * S, 1),
            (3 * S, 1),
            (4 * S, 1),
        ]);
        let allowed: Vec<_> = run(&q, &reqs).iter().map(|v| v.allowed).collect();
        assert_eq!(
            allowed,
            [
                true, true, true, true, true, false, true, false, false, true
            ]
        );
    }

    #[test]
    fn burst_differs_from_limit() {
        // 1 per second with bursts of 3.
        let q = Quota::per_second(1).unwrap().with_burst(3).unwrap();
        let v = run(&q, &[(0, 1), (0, 1), (0, 1), (0, 1)]);
        assert_eq!(
            v.iter().map(|v| v.allowed).collect::<Vec<_>>(),
            [true, true, true, false]
        );
        assert_eq!(v[3].retry_after_ns, S);
        assert_eq!(v[2].reset_after_ns, 3 * S);
    }

    #[test]
    fn cost_spends_several_units() {
        let q = Quota::per_second(10).unwrap();
        let v = run(&q, &[(0, 4), (0, 4), (0, 4), (0, 2)]);
        assert_eq!(
            v.iter()
                .map(|v| (v.allowed, v.remaining))
                .collect::<Vec<_>>(),
            [(true, 6), (true, 2), (false, 2), (true, 0)]
        );
        // Two units short: 200 ms.
        assert_eq!(v[2].retry_after_ns, 200_000_000);
        // A cost equal to the burst passes on a fresh key.
        assert!(run(&q, &[(0, 10)])[0].allowed);
    }

    #[test]
    fn a_refusal_reports_what_is_used_now() {
        // 5 per 10 s (T = 2 s): five at 0 fill the burst (TAT 10 s). At 1 s a sixth is
        // refused: 9 s of the burst are in use, no unit is free, one frees at 2 s.
        let q = Quota::new(5, Duration::from_secs(10)).unwrap();
        let mut tat = None;
        for _ in 0..5 {
            let e = decide(0, tat, &q, 1);
            assert!(e.allowed());
            tat = e.write.map(|w| w.t);
        }
        let e = decide(S, tat, &q, 1);
        let v = alone(&e);
        assert!(!v.allowed);
        assert_eq!(v.reset_after_ns, 9 * S);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.retry_after_ns, S);
        assert_eq!((e.unspent.remaining, e.unspent.reset_after_ns), (0, 9 * S));
    }

    #[test]
    fn an_allowed_quota_reports_its_units_unspent_when_another_refuses() {
        // 3 per second (T = 333 334 us): two spent at 0. A third at 0 would fit, but another
        // quota refuses it: one unit is left, 2 T are in use.
        let q = Quota::per_second(3).unwrap();
        let t = q.emission_ns();
        let tat = |e: &Eval| e.write.map(|w| w.t);
        let first = decide(0, None, &q, 1);
        let second = decide(0, tat(&first), &q, 1);
        let third = decide(0, tat(&second), &q, 1);
        assert!(third.allowed());
        assert_eq!(third.spent.remaining, 0);
        assert_eq!(
            (third.unspent.remaining, third.unspent.reset_after_ns),
            (1, 2 * t)
        );
        // And for a cost of two, nothing more is in use than before it.
        let two = decide(0, tat(&first), &q, 2);
        assert!(two.allowed());
        assert_eq!((two.unspent.remaining, two.unspent.reset_after_ns), (2, t));
    }

    #[test]
    fn zero_cost_peeks_without_spending() {
        let q = Quota::per_second(2).unwrap();
        let v = run(&q, &[(0, 1), (0, 0), (0, 1), (0, 0)]);
        assert_eq!(
            v.iter()
                .map(|v| (v.allowed, v.remaining))
                .collect::<Vec<_>>(),
            [(true, 1), (true, 1), (true, 0), (true, 0)]
        );
    }

    #[test]
    fn idle_key_is_indistinguishable_from_a_new_one() {
        let q = Quota::per_second(2).unwrap();
        let first = decide(0, None, &q, 1).write.unwrap().t;
        // Once now reaches the stored TAT, the stored state no longer matters.
        let later = first + 5;
        assert_eq!(
            decide(later, Some(first), &q, 1),
            decide(later, None, &q, 1)
        );
    }

    proptest! {
        /// GCRA's guarantee: in any window of length d, at most burst + d/T units pass.
        #[test]
        fn never_more_than_burst_plus_window_over_interval(
            limit in 1u32..50,
            period_ms in 1u64..5_000,
            burst in 1u32..50,
            gaps in proptest::collection::vec((0u64..400_000_000, 1u32..5), 1..200),
        ) {
            let Ok(q) = Quota::new(limit, Duration::from_millis(period_ms)) else { return Ok(()) };
            let q = q.with_burst(burst).unwrap();
            let mut now = 0;
            let mut passed: Vec<(u64, u32)> = Vec::new();
            let mut tat = None;
            for (gap, cost) in gaps {
                now += gap;
                let cost = cost.min(burst);
                let e = decide(now, tat, &q, cost);
                if e.allowed() {
                    if let Some(w) = e.write {
                        tat = Some(w.t);
                    }
                    passed.push((now, cost));
                } else {
                    // A refused request is told the truth: waiting retry_after lets it pass.
                    let wait = e.unspent.retry_after_ns;
                    let retry = decide(now + wait, tat, &q, cost);
                    prop_assert!(retry.allowed());
                    if wait > 0 {
                        prop_assert!(!decide(now + wait - 1, tat, &q, cost).allowed());
                    }
                }
            }
            // The bound from the quota's definition, not from the implementation's interval:
            // in any window of d ns at most burst + d × limit / period units, in exact integers
            // (units × period <= burst × period + d × limit).
            let period = u128::from(period_ms) * 1_000_000;
            for (i, &(start, _)) in passed.iter().enumerate() {
                let mut units = 0u128;
                for &(at, cost) in &passed[i..] {
                    units += u128::from(cost);
                    let window = u128::from(at - start);
                    prop_assert!(
                        units * period <= u128::from(burst) * period + window * u128::from(limit),
                        "{} units in {} ns at {}/{}ms burst {}", units, window, limit, period_ms, burst
                    );
                }
            }
        }

        /// Remaining never exceeds the burst, and a fresh key starts with burst - cost.
        #[test]
        fn remaining_is_exact_on_a_fresh_key(limit in 1u32..1000, burst in 1u32..1000, cost in 1u32..1000) {
            let q = Quota::per_minute(limit).unwrap().with_burst(burst).unwrap();
            let cost = cost.min(burst);
            let e = decide(7, None, &q, cost);
            prop_assert!(e.allowed());
            prop_assert_eq!(e.spent.remaining, burst - cost);
        }
    }
}
