//! Every algorithm as a pure function of (stored state, now, cost). The memory store runs these;
//! the Redis store runs the same arithmetic in Lua. See `docs/algorithms.md`.

use std::fmt::{self, Write as _};

use crate::gcra;
use crate::{Algorithm, Key, Quota, QuotaState};

const NS_PER_MS: u64 = 1_000_000;

/// What a store keeps per (key, quota).
///
/// - GCRA: `t` is the theoretical arrival time (ns).
/// - Fixed window: `t` is the end of the counted window (ns, whole ms), `a` its count.
/// - Sliding window: `t` is the end of the current window plus one window (ns, whole ms): the
///   moment the state stops mattering; `a` is the current window's count, `b` the previous one's.
///
/// In every case the state is worthless once `t <= now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct State {
    pub(crate) t: u64,
    pub(crate) a: u32,
    pub(crate) b: u32,
}

/// The evaluation of one quota for one request: its two possible outcomes, because whether
/// the request is spent depends on the policy's other quotas too. The quota is kept once and
/// the two outcomes without it, so that an evaluation stays within 128 bytes and moves as a
/// few vector copies rather than a `memcpy` call; [`state`](Eval::state) gives the chosen
/// outcome as the one [`QuotaState`] that goes on to the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Eval {
    /// The state to store if the whole request is allowed (`None`: nothing worth storing).
    pub(crate) write: Option<State>,
    quota: Quota,
    /// The outcome when the whole request is allowed and this quota spent (when this quota
    /// refuses, the same as `unspent`).
    pub(crate) spent: Outcome,
    /// The outcome when nothing is spent: this quota refused, or another one did. Its
    /// `allowed` says whether this quota alone allows the request.
    pub(crate) unspent: Outcome,
}

/// A [`QuotaState`] without its quota: what one outcome of an [`Eval`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) allowed: bool,
    pub(crate) remaining: u32,
    pub(crate) reset_after_ns: u64,
    pub(crate) retry_after_ns: u64,
    pub(crate) next_unit_ns: u64,
}

impl Outcome {
    fn of(s: &QuotaState) -> Outcome {
        Outcome {
            allowed: s.allowed,
            remaining: s.remaining,
            reset_after_ns: s.reset_after_ns,
            retry_after_ns: s.retry_after_ns,
            next_unit_ns: s.next_unit_ns,
        }
    }
}

impl Eval {
    /// An evaluation whose outcomes are `spent` and `unspent` (states of the same quota).
    pub(crate) fn new(write: Option<State>, spent: &QuotaState, unspent: &QuotaState) -> Eval {
        Eval {
            write,
            quota: unspent.quota,
            spent: Outcome::of(spent),
            unspent: Outcome::of(unspent),
        }
    }

    /// A quota that refuses: nothing to write, and spent or not, it reports `state`.
    pub(crate) fn refused(state: &QuotaState) -> Eval {
        Eval::new(None, state, state)
    }

    /// Whether this quota alone allows the request.
    pub(crate) fn allowed(&self) -> bool {
        self.unspent.allowed
    }

    /// This quota's outcome once the policy decided `request_allowed`.
    #[inline]
    pub(crate) fn state(&self, request_allowed: bool) -> QuotaState {
        let o = if request_allowed {
            &self.spent
        } else {
            &self.unspent
        };
        QuotaState::from_ns(
            self.quota,
            o.allowed,
            o.remaining,
            o.reset_after_ns,
            o.retry_after_ns,
            o.next_unit_ns,
        )
    }
}

/// Evaluates `quota` for a request of `cost` at `now_ns`, given the stored state. `offset_ms`
/// is the key's window offset ([`window_offset`]), below the window; GCRA ignores it.
#[inline]
pub(crate) fn eval(
    quota: &Quota,
    now_ns: u64,
    stored: Option<State>,
    cost: u32,
    offset_ms: u64,
) -> Eval {
    match quota.algorithm() {
        Algorithm::FixedWindow => fixed(quota, now_ns, stored, cost, offset_ms),
        Algorithm::SlidingWindow => sliding(quota, now_ns, stored, cost, offset_ms),
        // Gcra, and any future algorithm defaults to the reference one.
        _ => gcra::decide(now_ns, stored.map(|s| s.t), quota, cost),
    }
}

/// The start (ms, may be negative) of the window containing `now_ms` for a key with this offset.
fn window_start(now_ms: i64, w: i64, offset: i64) -> i64 {
    (now_ms + offset).div_euclid(w) * w - offset
}

fn ms_to_ns(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).saturating_mul(NS_PER_MS)
}

fn sat_u32(n: u128) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn fixed(quota: &Quota, now_ns: u64, stored: Option<State>, cost: u32, offset_ms: u64) -> Eval {
    let w = i64::try_from(quota.window_ms()).unwrap_or(i64::MAX);
    let limit = quota.limit();
    let now = i64::try_from(now_ns / NS_PER_MS).unwrap_or(i64::MAX);
    // The offset is below the window by construction (`window_offset`).
    let start = window_start(now, w, i64::try_from(offset_ms).unwrap_or(0));
    // A stored window that has not ended is the current one. After a shared clock stepped
    // back it may be the next one: its count still stands, and the request is decided in that
    // window, which ends when the count is gone. A window further ahead than the next one
    // counts as absent (docs/algorithms.md, "When the clock steps back").
    let (count, end) = match stored {
        Some(s) if s.t > ms_to_ns(now) && s.t <= ms_to_ns(start + 2 * w) => {
            let later = s.t > ms_to_ns(start + w);
            (s.a, start + w + if later { w } else { 0 })
        }
        _ => (0, start + w),
    };
    let until_end = ms_to_ns(end - now);
    let allowed = u64::from(count) + u64::from(cost) <= u64::from(limit);
    let after = count.saturating_add(cost);
    // A fixed window gives every unit back when it ends.
    let unspent = QuotaState::from_ns(
        *quota,
        allowed,
        limit.saturating_sub(count),
        if count > 0 { until_end } else { 0 },
        if allowed { 0 } else { until_end },
        if count > 0 { until_end } else { 0 },
    );
    if !allowed {
        return Eval::refused(&unspent);
    }
    let reset = if after > 0 { until_end } else { 0 };
    Eval::new(
        (after > 0).then_some(State {
            t: ms_to_ns(end),
            a: after,
            b: 0,
        }),
        &QuotaState::from_ns(*quota, true, limit - after, reset, 0, reset),
        &unspent,
    )
}

fn sliding(quota: &Quota, now_ns: u64, stored: Option<State>, cost: u32, offset_ms: u64) -> Eval {
    let w = i64::try_from(quota.window_ms()).unwrap_or(i64::MAX);
    let limit = u128::from(quota.limit());
    let now = i64::try_from(now_ns / NS_PER_MS).unwrap_or(i64::MAX);
    // The offset is below the window by construction (`window_offset`).
    let mut start = window_start(now, w, i64::try_from(offset_ms).unwrap_or(0));
    let (curr, prev) = match stored {
        Some(s) => {
            let stored_end = i64::try_from(s.t / NS_PER_MS).unwrap_or(i64::MAX) - w;
            let end = start + w;
            if stored_end > end + w {
                // Further ahead than the next window: not a state the clock can explain.
                (0, 0)
            } else if stored_end >= end {
                // The current window, or (after a shared clock stepped back) the next one:
                // then the request is decided at the start of that window.
                if stored_end > end {
                    start = end;
                }
                (s.a, s.b)
            } else if stored_end == end - w {
                (0, s.a)
            } else {
                (0, 0)
            }
        }
        None => (0, 0),
    };
    let end = start + w;
    // Into the window the request is decided in (0 for a later window not yet begun).
    let elapsed = now.max(start) - start;
    let (wu, cu, pu, cost_u) = (
        u128::try_from(w).unwrap_or(0),
        u128::from(curr),
        u128::from(prev),
        u128::from(cost),
    );
    let lw = limit * wu;
    // The estimate, scaled by the window length to stay in integers.
    let est = pu * u128::try_from(w - elapsed).unwrap_or(0) + cu * wu;
    let allowed = est + cost_u * wu <= lw;
    let reset = |curr: u128| {
        if curr > 0 {
            ms_to_ns(end + w - now)
        } else if prev > 0 {
            ms_to_ns(end - now)
        } else {
            0
        }
    };
    // How long until `need` more units fit, for `c` counted in this window, when they do not
    // fit now.
    let wait = |c: u128, need: u128| {
        if c + need <= limit {
            // Within this window, once enough of the previous window has slid out.
            let room = (limit - c - need) * wu;
            let d = i128::from(end - now) - i128::try_from(room / pu.max(1)).unwrap_or(i128::MAX);
            ms_to_ns(i64::try_from(d.max(1)).unwrap_or(i64::MAX))
        } else {
            // In the next window, once enough of this one has slid out.
            let room = limit.saturating_sub(need) * wu;
            let t = wu.saturating_sub(room / c.max(1));
            ms_to_ns((end - now).saturating_add(i64::try_from(t).unwrap_or(i64::MAX)))
        }
    };
    let retry = if allowed { 0 } else { wait(cu, cost_u) };
    // Units left for `c` counted and estimate `e`, and the wait for one more.
    let left = |c: u128, e: u128| {
        let r = lw.saturating_sub(e) / wu.max(1);
        let next = if r >= limit { 0 } else { wait(c, r + 1) };
        (sat_u32(r), next)
    };
    let (unspent_left, unspent_next) = left(cu, est);
    let unspent = QuotaState::from_ns(
        *quota,
        allowed,
        unspent_left,
        reset(cu),
        retry,
        unspent_next,
    );
    if !allowed {
        return Eval::refused(&unspent);
    }
    let (spent_left, spent_next) = left(cu + cost_u, est + cost_u * wu);
    Eval::new(
        (cu + cost_u > 0).then_some(State {
            t: ms_to_ns(end + w),
            a: sat_u32(cu + cost_u),
            b: prev,
        }),
        &QuotaState::from_ns(*quota, true, spent_left, reset(cu + cost_u), 0, spent_next),
        &unspent,
    )
}

/// A key's window offset in `[0, window)` milliseconds: FNV-1a of its qualified form, so each
/// key's windows start at their own moment (no thundering herd at the top of the minute) and
/// every store and instance computes the same one.
pub(crate) fn window_offset(key: &Key<'_>, quota: &Quota) -> u64 {
    if quota.algorithm() == Algorithm::Gcra {
        return 0;
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    // Writing to the hasher cannot fail.
    let _ = write!(h, "{}", key.qualified());
    h.0 % quota.window_ms().max(1)
}

struct Fnv(u64);

impl fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_moves_without_a_memcpy_call() {
        // Within 128 bytes a copy is a few vector moves; above it, a call to memcpy on every
        // move of every quota's evaluation (measured: 1147 -> 1071 instructions per check).
        assert!(
            std::mem::size_of::<Eval>() <= 128,
            "{}",
            std::mem::size_of::<Eval>()
        );
    }
    use proptest::prelude::*;

    const MS: u64 = NS_PER_MS;

    fn q(s: &str) -> Quota {
        s.parse().unwrap()
    }

    /// Runs requests (time in ms, cost) through one key; returns (allowed, remaining, retry ms).
    fn run(quota: &Quota, offset: u64, reqs: &[(u64, u32)]) -> Vec<(bool, u32, u64)> {
        let mut state = None;
        reqs.iter()
            .map(|&(at, cost)| {
                let e = eval(quota, at * MS, state, cost, offset);
                if let Some(w) = e.write {
                    state = Some(w);
                }
                let r = e.state(e.allowed());
                (r.allowed, r.remaining, r.retry_after_ns / MS)
            })
            .collect()
    }

    #[test]
    fn fixed_window_counts_per_window_and_resets_at_its_end() {
        let quota = q("3/10s fixed-window");
        // Offset 0: windows [0,10s), [10s,20s).
        let got = run(
            &quota,
            0,
            &[
                (0, 1),
                (1_000, 1),
                (2_000, 1),
                (3_000, 1),
                (9_999, 1),
                (10_000, 1),
            ],
        );
        assert_eq!(
            got,
            [
                (true, 2, 0),
                (true, 1, 0),
                (true, 0, 0),
                (false, 0, 7_000),
                (false, 0, 1),
                (true, 2, 0)
            ]
        );
        // With an offset of 4 s, the window containing t=0 is [-4s, 6s).
        let got = run(&quota, 4_000, &[(0, 3), (5_999, 1), (6_000, 1)]);
        assert_eq!(got, [(true, 0, 0), (false, 0, 1), (true, 2, 0)]);
    }

    /// (allowed, remaining, retry, reset) of one request on `state`, in ms.
    fn one(quota: &Quota, state: Option<State>, at: u64, cost: u32) -> (bool, u32, u64, u64) {
        let e = eval(quota, at * MS, state, cost, 0);
        let r = e.state(e.allowed());
        (
            r.allowed,
            r.remaining,
            r.retry_after_ns / MS,
            r.reset_after_ns / MS,
        )
    }

    #[test]
    fn fixed_window_reports_its_reset_and_what_it_would_leave_unspent() {
        let quota = q("3/10s fixed-window");
        // Nothing counted: nothing to reset, before or after a request of cost 0.
        assert_eq!(one(&quota, None, 2_000, 0), (true, 3, 0, 0));
        let e = eval(&quota, 2_000 * MS, None, 0, 0);
        assert_eq!((e.unspent.remaining, e.unspent.reset_after_ns), (3, 0));
        // One counted: the window's end is 8 s away.
        assert_eq!(one(&quota, None, 2_000, 1), (true, 2, 0, 8_000));
        let counted = eval(&quota, 2_000 * MS, None, 2, 0).write;
        assert_eq!(one(&quota, counted, 4_000, 1), (true, 0, 0, 6_000));
        // Unspent (another quota refused): the count so far, and its reset.
        let e = eval(&quota, 4_000 * MS, counted, 1, 0);
        assert_eq!(
            (e.unspent.remaining, e.unspent.reset_after_ns / MS),
            (1, 6_000)
        );
        // Refused: told when the window ends.
        let full = eval(&quota, 4_000 * MS, counted, 1, 0).write;
        assert_eq!(one(&quota, full, 5_000, 1), (false, 0, 5_000, 5_000));
        // A stored window that has ended counts nothing.
        assert_eq!(one(&quota, full, 10_000, 1), (true, 2, 0, 10_000));
    }

    #[test]
    fn sliding_window_reports_its_reset_and_what_it_would_leave_unspent() {
        let quota = q("10/10s sliding-window");
        // Empty: no reset.
        assert_eq!(one(&quota, None, 2_000, 0), (true, 10, 0, 0));
        // Spent in this window: the state matters until the end of the next window.
        assert_eq!(one(&quota, None, 2_000, 4), (true, 6, 0, 18_000));
        let four = eval(&quota, 2_000 * MS, None, 4, 0).write;
        let e = eval(&quota, 3_000 * MS, four, 1, 0);
        assert_eq!(
            (e.spent.remaining, e.spent.reset_after_ns / MS),
            (5, 17_000)
        );
        assert_eq!(
            (e.unspent.remaining, e.unspent.reset_after_ns / MS),
            (6, 17_000)
        );
        // In the next window, with nothing spent in it: only the previous window is left, and
        // it stops counting at the end of this one. 25 % into it, 4 x 75 % = 3 still count.
        let e = eval(&quota, 12_500 * MS, four, 0, 0);
        assert_eq!(
            (e.unspent.remaining, e.unspent.reset_after_ns / MS),
            (7, 7_500)
        );
        let e = eval(&quota, 12_500 * MS, four, 2, 0);
        assert_eq!(
            (e.spent.remaining, e.spent.reset_after_ns / MS),
            (5, 17_500)
        );
        // Two windows on, nothing counts.
        assert_eq!(one(&quota, four, 20_000, 0), (true, 10, 0, 0));
    }

    #[test]
    fn a_zero_cost_peek_stores_nothing_for_any_algorithm() {
        for text in ["3/10s fixed-window", "3/10s sliding-window", "3/10s"] {
            let quota = q(text);
            assert_eq!(eval(&quota, 2_000 * MS, None, 0, 0).write, None, "{text}");
            // A refused request stores nothing either (the state it would write is the
            // caller's to drop, but there is nothing to write).
            let full = eval(&quota, 2_000 * MS, None, 3, 0).write;
            let refused = eval(&quota, 2_000 * MS, full, 1, 0);
            assert!(!refused.allowed(), "{text}");
            assert_eq!(refused.write, None, "{text}");
        }
    }

    #[test]
    fn fixed_window_boundary_allows_up_to_twice_the_limit() {
        // The known weakness, stated as a test so nobody mistakes it for a bug.
        let quota = q("3/10s fixed-window");
        let got = run(&quota, 0, &[(9_999, 3), (10_000, 3)]);
        assert!(got.iter().all(|g| g.0));
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        // Cloudflare's example shape: 10 per minute; 8 in the previous window, 15 s into this one
        // the previous counts for 8 * 45/60 = 6, leaving 4.
        let quota = q("10/m sliding-window");
        let got = run(&quota, 0, &[(30_000, 8), (75_000, 4), (75_000, 1)]);
        assert_eq!(got[0], (true, 2, 0));
        assert_eq!(got[1], (true, 0, 0));
        // Refused: one unit frees when 8 * (60 - e) / 60 <= 10 - 4 - 1 = 5, i.e. e >= 22.5 s, so
        // at 82.5 s: 7.5 s from now.
        assert_eq!(got[2], (false, 0, 7_500));
        let got = run(
            &quota,
            0,
            &[(30_000, 8), (75_000, 4), (82_499, 1), (82_500, 1)],
        );
        assert_eq!((got[2].0, got[3].0), (false, true));
    }

    #[test]
    fn sliding_window_waits_into_the_next_window_when_this_one_is_full() {
        let quota = q("4/10s sliding-window");
        // 4 at t=2s fill window [0,10s). A fifth must wait until 4 * (10 - t)/10 <= 3 in the
        // next window: t >= 2.5 s, so at 12.5 s: 10.5 s from now.
        let got = run(
            &quota,
            0,
            &[(2_000, 4), (2_000, 1), (12_499, 1), (12_500, 1)],
        );
        assert_eq!(got[1], (false, 0, 10_500));
        assert_eq!((got[2].0, got[3].0), (false, true));
    }

    #[test]
    fn offsets_spread_keys_across_the_window() {
        let quota = q("10/m fixed-window");
        let offsets: std::collections::HashSet<u64> = (0..200u32)
            .map(|i| {
                let user = i.to_string();
                window_offset(&Key::new("p", "/r", None, Some(user.as_str())), &quota)
            })
            .collect();
        assert!(
            offsets.len() > 150,
            "{} distinct offsets of 200",
            offsets.len()
        );
        assert!(offsets.iter().all(|o| *o < 60_000));
        assert_eq!(
            window_offset(&Key::new("p", "/r", None, None::<&str>), &q("10/m")),
            0
        );
    }

    proptest! {
        /// Fixed window: never more than the limit in one window.
        #[test]
        fn fixed_never_exceeds_the_limit_per_window(
            limit in 1u32..20,
            secs in 1u64..60,
            offset in 0u64..60_000,
            reqs in proptest::collection::vec((0u64..3_000, 1u32..4), 1..120),
        ) {
            let quota = Quota::new(limit, std::time::Duration::from_secs(secs)).unwrap()
                .with_algorithm(Algorithm::FixedWindow).unwrap();
            let w = secs * 1_000;
            let offset = offset % w;
            let mut now = 0;
            let mut state = None;
            let mut per_window = std::collections::HashMap::new();
            for (gap, cost) in reqs {
                now += gap;
                let cost = cost.min(limit);
                let e = eval(&quota, now * MS, state, cost, offset);
                if e.allowed() {
                    if let Some(s) = e.write { state = Some(s); }
                    *per_window.entry((now + offset) / w).or_insert(0u32) += cost;
                } else {
                    // Told the truth: at retry_after it passes.
                    let later = eval(&quota, now * MS + e.unspent.retry_after_ns, state, cost, offset);
                    prop_assert!(later.allowed());
                }
            }
            prop_assert!(per_window.values().all(|&n| n <= limit));
        }

        /// Sliding window: after every allowed request the weighted estimate, computed here
        /// from the allowed requests' own timestamps, is within the limit; a refused request
        /// would have pushed it over, and passes exactly at its retry time.
        #[test]
        fn sliding_is_truthful(
            limit in 1u32..20,
            secs in 1u64..60,
            offset in 0u64..60_000,
            reqs in proptest::collection::vec((0u64..3_000, 1u32..4), 1..120),
        ) {
            let quota = Quota::new(limit, std::time::Duration::from_secs(secs)).unwrap()
                .with_algorithm(Algorithm::SlidingWindow).unwrap();
            let w = secs * 1_000;
            let offset = offset % w;
            // The estimate at `now` (ms), times w, from the allowed requests (ms, cost).
            let estimate = |allowed: &[(u64, u32)], now: u64| -> u128 {
                let start = (now + offset) / w * w;
                let (curr, prev) = allowed.iter().fold((0u128, 0u128), |(c, p), &(at, cost)| {
                    let window = (at + offset) / w * w;
                    if window == start {
                        (c + u128::from(cost), p)
                    } else if window + w == start {
                        (c, p + u128::from(cost))
                    } else {
                        (c, p)
                    }
                });
                let elapsed = u128::from(now + offset - start);
                prev * (u128::from(w) - elapsed) + curr * u128::from(w)
            };
            let lw = u128::from(limit) * u128::from(w);
            let mut now = 0;
            let mut state = None;
            let mut allowed: Vec<(u64, u32)> = Vec::new();
            for (gap, cost) in reqs {
                now += gap;
                let cost = cost.min(limit);
                let e = eval(&quota, now * MS, state, cost, offset);
                let with = estimate(&allowed, now) + u128::from(cost) * u128::from(w);
                if e.allowed() {
                    if let Some(s) = e.write { state = Some(s); }
                    allowed.push((now, cost));
                    prop_assert!(estimate(&allowed, now) <= lw, "allowed over the limit at {}", now);
                } else {
                    prop_assert!(with > lw, "refused within the limit at {}", now);
                    let retry = e.unspent.retry_after_ns;
                    prop_assert!(retry >= MS);
                    prop_assert!(eval(&quota, now * MS + retry, state, cost, offset).allowed());
                    prop_assert!(!eval(&quota, now * MS + retry - MS, state, cost, offset).allowed());
                }
            }
        }
    }
}
