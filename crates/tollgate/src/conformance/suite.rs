//! One specification of the stores' decisions, run against every store.
//!
//! Each case is a sequence of requests at given times with the exact decision expected for
//! each. Time comes from a [`ManualClock`] shared by the test and the store (the Redis store
//! takes it in place of the server's `TIME`, which is its test seam), so the cases are exact.
//!
//! Quotas here have periods of five seconds or more: Redis expires keys on its own real clock,
//! and a case must finish long before any key it wrote could expire for real. Every algorithm
//! (GCRA, fixed window, sliding window) has cases here.

use std::time::Duration;

use crate::clock::ManualClock;
use crate::store::window_offset;
use crate::{Decision, Key, Quota, Store, StoreError, StoreErrorKind};

/// What one request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Allowed, with these units left in each quota.
    Allowed(&'static [u32]),
    /// Refused, retry after exactly this many milliseconds.
    Limited(u64),
    /// The cost exceeds a burst: an error, never a limit.
    CostExceedsBurst,
}

/// One request of a case.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Milliseconds to move the clock before this request: forward, or back when negative
    /// (a shared clock that stepped back).
    pub advance_ms: i64,
    /// Which client (user part of the key).
    pub client: &'static str,
    /// The request's cost.
    pub cost: u32,
    /// The decision it must get.
    pub expect: Expect,
}

const fn step(advance_ms: i64, client: &'static str, cost: u32, expect: Expect) -> Step {
    Step {
        advance_ms,
        client,
        cost,
        expect,
    }
}

/// A named sequence of requests under one policy.
#[derive(Debug, Clone)]
pub struct Case {
    /// Unique name; also the policy name, so cases never share state.
    pub name: &'static str,
    /// The policy's quotas, as text.
    pub quotas: &'static [&'static str],
    /// The requests.
    pub steps: Vec<Step>,
    /// Start at the beginning of a window of the first quota (for client "a"), so that window
    /// cases can state exact expectations whatever the key's window offset.
    pub align: bool,
}

use Expect::{Allowed, CostExceedsBurst, Limited};

/// The cases every store must pass.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            // docs/algorithms.md: 5 per 10 s, six at once.
            name: "worked-example",
            quotas: &["5/10s"],
            steps: vec![
                step(0, "a", 1, Allowed(&[4])),
                step(0, "a", 1, Allowed(&[3])),
                step(0, "a", 1, Allowed(&[2])),
                step(0, "a", 1, Allowed(&[1])),
                step(0, "a", 1, Allowed(&[0])),
                step(0, "a", 1, Limited(2_000)),
                // Another client is unaffected.
                step(0, "b", 1, Allowed(&[4])),
                step(1_999, "a", 1, Limited(1)),
                step(1, "a", 1, Allowed(&[0])),
                step(0, "a", 1, Limited(2_000)),
                // After a full period the burst is back.
                step(10_000, "a", 1, Allowed(&[4])),
            ],
            align: false,
        },
        Case {
            name: "burst-below-limit",
            quotas: &["60/m burst 3"],
            steps: vec![
                step(0, "a", 1, Allowed(&[2])),
                step(0, "a", 1, Allowed(&[1])),
                step(0, "a", 1, Allowed(&[0])),
                step(0, "a", 1, Limited(1_000)),
                step(500, "a", 1, Limited(500)),
                step(500, "a", 1, Allowed(&[0])),
                step(3_000, "a", 1, Allowed(&[2])),
            ],
            align: false,
        },
        Case {
            name: "costs",
            quotas: &["10/10s"],
            steps: vec![
                step(0, "a", 4, Allowed(&[6])),
                step(0, "a", 4, Allowed(&[2])),
                step(0, "a", 4, Limited(2_000)),
                // Nothing was spent by the refusal.
                step(0, "a", 2, Allowed(&[0])),
                step(0, "a", 0, Allowed(&[0])),
                step(0, "a", 11, CostExceedsBurst),
                step(10_000, "a", 10, Allowed(&[0])),
            ],
            align: false,
        },
        Case {
            name: "two-quotas",
            quotas: &["2/10s", "3/m"],
            steps: vec![
                step(0, "a", 1, Allowed(&[1, 2])),
                step(0, "a", 1, Allowed(&[0, 1])),
                step(0, "a", 1, Limited(5_000)),
                step(5_000, "a", 1, Allowed(&[0, 0])),
                // The short quota refills; the long one refuses. A refused request spends
                // nothing from the quota that would have allowed it.
                step(5_000, "a", 1, Limited(10_000)),
                step(10_000, "a", 1, Allowed(&[1, 0])),
                step(0, "a", 1, Limited(20_000)),
            ],
            align: false,
        },
        Case {
            name: "idle-keys-start-fresh",
            quotas: &["3/30s"],
            steps: vec![
                step(0, "a", 3, Allowed(&[0])),
                step(0, "a", 1, Limited(10_000)),
                step(30_000, "a", 1, Allowed(&[2])),
                step(3_600_000, "a", 1, Allowed(&[2])),
            ],
            align: false,
        },
        Case {
            name: "fixed-window",
            quotas: &["3/10s fixed-window"],
            steps: vec![
                step(0, "a", 1, Allowed(&[2])),
                step(1_000, "a", 1, Allowed(&[1])),
                step(1_000, "a", 1, Allowed(&[0])),
                step(1_000, "a", 1, Limited(7_000)),
                step(6_999, "a", 1, Limited(1)),
                // The next window: a full limit again.
                step(1, "a", 1, Allowed(&[2])),
                step(0, "a", 3, Limited(10_000)),
                step(0, "a", 4, CostExceedsBurst),
            ],
            align: true,
        },
        Case {
            name: "sliding-window",
            quotas: &["10/m sliding-window"],
            steps: vec![
                step(30_000, "a", 8, Allowed(&[2])),
                // 15 s into the next window the previous one weighs 8 x 45/60 = 6.
                step(45_000, "a", 4, Allowed(&[0])),
                step(0, "a", 1, Limited(7_500)),
                step(7_499, "a", 1, Limited(1)),
                step(1, "a", 1, Allowed(&[0])),
            ],
            align: true,
        },
        Case {
            name: "sliding-and-gcra",
            quotas: &["4/m sliding-window", "2/10s"],
            steps: vec![
                step(0, "a", 1, Allowed(&[3, 1])),
                step(0, "a", 1, Allowed(&[2, 0])),
                step(0, "a", 1, Limited(5_000)),
                step(5_000, "a", 1, Allowed(&[1, 0])),
                step(5_000, "a", 1, Allowed(&[0, 0])),
                // The window is full: wait into the next one until enough of this one slid out.
                step(5_000, "a", 1, Limited(60_000)),
            ],
            align: true,
        },
        Case {
            // docs/algorithms.md, "When the clock steps back": a fixed window written before
            // the clock stepped back still counts, in its own window, and the wait told is
            // true; a state more than one window ahead is forgotten.
            name: "clock-steps-back-fixed-window",
            quotas: &["3/10s fixed-window"],
            steps: vec![
                // In the window [10 s, 20 s), all three spent.
                step(12_000, "a", 1, Allowed(&[2])),
                step(0, "a", 1, Allowed(&[1])),
                step(0, "a", 1, Allowed(&[0])),
                // Back to 7 s: the spent window still stands; it ends at 20 s, 13 s from now.
                step(-5_000, "a", 1, Limited(13_000)),
                step(12_999, "a", 1, Limited(1)),
                step(1, "a", 1, Allowed(&[2])),
                // At 20 s, in [20 s, 30 s): all three spent again. Back to 5 s: that window is
                // more than one window ahead, and counts as absent.
                step(0, "a", 1, Allowed(&[1])),
                step(0, "a", 1, Allowed(&[0])),
                step(-15_000, "a", 1, Allowed(&[2])),
            ],
            align: true,
        },
        Case {
            name: "clock-steps-back-sliding-window",
            quotas: &["4/10s sliding-window"],
            steps: vec![
                // At 12 s, in [10 s, 20 s), all four spent.
                step(12_000, "a", 4, Allowed(&[0])),
                // Back to 7 s: decided as at 10 s, the start of the spent window. One unit
                // comes back when 4 x (10 - e)/10 <= 3 in the window after it: at 22.5 s.
                step(-5_000, "a", 1, Limited(15_500)),
                step(15_499, "a", 1, Limited(1)),
                step(1, "a", 1, Allowed(&[0])),
                // Back to 2.5 s: the state (its window ends at 30 s) is further ahead than
                // the next window, and counts as absent.
                step(-20_000, "a", 1, Allowed(&[3])),
            ],
            align: true,
        },
    ]
}

/// Asks `store` about one request as the layer does, [`Store::check_now`] first, on even
/// steps, and through [`Store::check`] alone on odd ones: a store that answers both ways is
/// verified both ways, against the same expectations.
async fn ask<S: Store>(
    store: &S,
    key: &Key<'_>,
    quotas: &[Quota],
    cost: u32,
    step: usize,
) -> Result<Decision, StoreError> {
    if step.is_multiple_of(2)
        && let Some(decided) = store.check_now(key, quotas, cost)
    {
        return decided;
    }
    store.check(key, quotas, cost).await
}

/// Runs every case of [`cases`] against `store`, which must read time from `clock`; `name`
/// namespaces the keys (policy `<name>-<case>`), so a store shared with other data or runs
/// starts afresh.
///
/// # Panics
///
/// On the first decision that differs from the specification, naming the case and step.
pub async fn run_cases<S: Store>(store: &S, clock: &ManualClock, name: &str) {
    for case in cases() {
        let policy = format!("{name}-{}", case.name);
        let quotas: Vec<Quota> = case
            .quotas
            .iter()
            .map(|q| q.parse().expect("quota"))
            .collect();
        if case.align {
            // Every advance is whole milliseconds, so the clock is on one.
            let key = Key::new(&policy, "/conformance", None, Some("a"));
            let w = u64::try_from(quotas[0].period().as_millis()).expect("window");
            let offset = window_offset(&key, &quotas[0]);
            let now_ms = u64::try_from(clock.elapsed().as_millis()).expect("time");
            clock.advance(Duration::from_millis((w - (now_ms + offset) % w) % w));
        }
        for (i, step) in case.steps.iter().enumerate() {
            let by = Duration::from_millis(step.advance_ms.unsigned_abs());
            if step.advance_ms < 0 {
                clock.rewind(by);
            } else {
                clock.advance(by);
            }
            let key = Key::new(&policy, "/conformance", None, Some(step.client));
            let got = ask(store, &key, &quotas, step.cost, i).await;
            let at = format!("case {} step {i} ({step:?})", case.name);
            match (step.expect, got) {
                (Allowed(remaining), Ok(d)) => {
                    assert!(d.is_allowed(), "{at}: refused: {d:?}");
                    let got: Vec<u32> = d.states().iter().map(|s| s.remaining()).collect();
                    assert_eq!(got, remaining, "{at}: remaining");
                }
                (Limited(ms), Ok(d)) => {
                    assert!(d.is_limited(), "{at}: allowed: {d:?}");
                    assert_eq!(d.retry_after(), Some(Duration::from_millis(ms)), "{at}");
                }
                (CostExceedsBurst, Err(e)) => {
                    assert!(
                        matches!(e.kind(), StoreErrorKind::CostExceedsBurst { .. }),
                        "{at}: {e}"
                    );
                }
                (want, got) => panic!("{at}: want {want:?}, got {got:?}"),
            }
        }
    }
}

/// Pseudo-random request sequences (a fixed seed, so every run is the same), for comparing two
/// stores decision by decision: every field of every decision must be equal.
pub async fn compare<A: Store, B: Store>(a: &A, b: &B, clock: &ManualClock, sequences: usize) {
    const QUOTAS: [&[&str]; 8] = [
        &["5/10s"],
        &["10/m burst 3"],
        &["7/30s", "20/h"],
        &["3/10s burst 5"],
        &["100/h burst 10", "4/10s"],
        &["6/10s fixed-window"],
        &["8/20s sliding-window"],
        &["5/10s sliding-window", "3/5s", "12/m fixed-window"],
    ];
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for seq in 0..sequences {
        let spec = QUOTAS[seq % QUOTAS.len()];
        let quotas: Vec<Quota> = spec.iter().map(|q| q.parse().expect("quota")).collect();
        let policy = format!("compare-{seq}");
        let mut decisions: Vec<Decision> = Vec::new();
        for i in 0..60 {
            clock.advance(Duration::from_millis(next(800)));
            let client = ["a", "b", "c"][usize::try_from(next(3)).unwrap_or(0)];
            let cost = u32::try_from(next(3)).unwrap_or(1);
            let key = Key::new(&policy, "/compare", None, Some(client));
            let x = ask(a, &key, &quotas, cost, i).await.expect("store a");
            let y = ask(b, &key, &quotas, cost, i).await.expect("store b");
            assert_eq!(
                x, y,
                "sequence {seq} ({spec:?}) request {i}: client {client} cost {cost}"
            );
            decisions.push(x);
        }
        assert!(
            decisions.iter().any(Decision::is_limited)
                && decisions.iter().any(Decision::is_allowed),
            "sequence {seq} never exercised both outcomes"
        );
    }
}

/// The policies every store must decide exactly under concurrent load: each algorithm alone,
/// and a policy of two algorithms. The number is what one key may spend.
pub const CONCURRENT_POLICIES: [(&[&str], u32); 4] = [
    (&["50/h"], 50),
    (&["50/h fixed-window"], 50),
    (&["50/h sliding-window"], 50),
    (&["60/h", "50/h fixed-window"], 50),
];

/// Sends `per_store` checks of one key through every store in `stores` at once (all spawned
/// before any is awaited) for each of [`CONCURRENT_POLICIES`], and checks that exactly the
/// allowed count passes, and that the allowed ones saw every `remaining` from the limit down
/// to 0 exactly once: a store that read, then wrote, would let two requests spend one unit.
///
/// The stores must share `clock` (so a window cannot turn over during the run); `name`
/// namespaces the keys.
///
/// # Panics
///
/// On any other outcome, naming the policy.
pub async fn exact_under_concurrency<S>(stores: &[S], per_store: usize, name: &str)
where
    S: Store,
    S::Future: Send + 'static,
{
    for (i, (spec, allowed)) in CONCURRENT_POLICIES.iter().enumerate() {
        let quotas: Vec<Quota> = spec.iter().map(|q| q.parse().expect("quota")).collect();
        let policy = format!("{name}-{i}");
        let key = Key::new(&policy, "/concurrent", None, Some("one-client"));
        let mut tasks = Vec::new();
        for _ in 0..per_store {
            for store in stores {
                tasks.push(tokio::spawn(store.check(&key, &quotas, 1)));
            }
        }
        let mut remaining = Vec::new();
        let mut refused = 0;
        for task in tasks {
            let decision = task.await.expect("task").expect("decision");
            if decision.is_allowed() {
                // The binding quota's units left after this request.
                remaining.push(decision.remaining());
            } else {
                refused += 1;
            }
        }
        let total = per_store * stores.len();
        assert_eq!(
            remaining.len(),
            *allowed as usize,
            "{spec:?}: {} of {total} allowed ({refused} refused)",
            remaining.len()
        );
        remaining.sort_unstable();
        let want: Vec<u32> = (0..*allowed).collect();
        assert_eq!(
            remaining, want,
            "{spec:?}: two allowed requests saw the same budget"
        );
    }
}

/// Pseudo-random policies (every algorithm, bursts, several quotas at once) and request
/// sequences (gaps, costs, two clients), each decision checked against the independent model
/// in [`model`](super::model): every field of every decision, every wait. `store` must read time from
/// `clock`; `name` namespaces the keys.
///
/// # Panics
///
/// On the first decision the model disagrees with, naming the sequence and request.
pub async fn against_model<S: Store>(store: &S, clock: &ManualClock, sequences: usize, name: &str) {
    against_model_within(store, clock, sequences, name, Duration::ZERO).await;
}

/// As [`against_model`], but waits may differ from the model's by less than `slack`: for a
/// store with a local cache of refusals, which replays a window's wait from the time it was
/// given, without the server's millisecond boundaries.
pub async fn against_model_within<S: Store>(
    store: &S,
    clock: &ManualClock,
    sequences: usize,
    name: &str,
    slack: Duration,
) {
    use crate::clock::Clock;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ sequences as u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for seq in 0..sequences {
        let quotas = random_policy(&mut next);
        let min_burst = quotas.iter().map(Quota::burst).min().unwrap_or(1);
        let policy = format!("{name}-model-{seq}");
        let mut model = super::model::Model::new();
        for i in 0..40 {
            clock.advance(Duration::from_micros(random_gap_us(&mut next)));
            let client = ["a", "b"][usize::try_from(next(2)).unwrap_or(0)];
            let cost = u32::try_from(next(u64::from(min_burst) + 1)).unwrap_or(1);
            let key = Key::new(&policy, "/model", None, Some(client));
            let got = ask(store, &key, &quotas, cost, i).await.expect("decision");
            let want = model.decide(&key, &quotas, cost, clock.now_ns());
            want.assert_matches_within(
                &got,
                slack,
                &format!("sequence {seq} {quotas:?} request {i}: client {client} cost {cost}"),
            );
        }
    }
}

/// A gap between two requests, in µs: mostly short, sometimes most of a window, now and then
/// long enough for everything to expire.
pub fn random_gap_us(next: &mut impl FnMut(u64) -> u64) -> u64 {
    match next(10) {
        0..=5 => next(400_000),
        6..=8 => next(5_000_000),
        _ => next(120_000_000),
    }
}

/// One to three distinct quotas of any algorithm, from small limits and a few periods.
pub fn random_policy(next: &mut impl FnMut(u64) -> u64) -> Vec<Quota> {
    const PERIODS: [&str; 6] = ["750ms", "s", "3s", "10s", "m", "h"];
    let mut quotas: Vec<Quota> = Vec::new();
    for _ in 0..=next(3) {
        let limit = 1 + next(12);
        let period = PERIODS[usize::try_from(next(6)).unwrap_or(0)];
        let mut text = format!("{limit}/{period}");
        match next(3) {
            0 => text.push_str(" fixed-window"),
            1 => text.push_str(" sliding-window"),
            _ => {
                if next(2) == 0 {
                    text.push_str(&format!(" burst {}", 1 + next(15)));
                }
            }
        }
        let q: Quota = text.parse().expect("quota");
        if !quotas
            .iter()
            .any(|o| o.id().to_string() == q.id().to_string())
        {
            quotas.push(q);
        }
    }
    quotas
}
