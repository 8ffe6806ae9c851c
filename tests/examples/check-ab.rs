//! The memory store's check against governor's keyed one, interleaved: round after round, a
//! batch of tollgate's checks and a batch of governor's on the same keys, in alternating order,
//! each timed on its own. On a shared machine whose speed drifts over seconds (criterion's rows
//! run one after the other, so a drift lands on one of them), the ratio of two batches run back
//! to back holds still where each one's time does not: the median of the rounds' ratios is the
//! figure.
//!
//! `cargo run --release -p tollgate-tests --no-default-features --example check-ab -- [KEYS] [THREADS] [ROUNDS] [BATCH]`
//!
//! Defaults: 100 000 keys, 1 thread, 101 rounds, 200 000 checks per batch. Prints one line:
//! `keys=K threads=T rounds=R batch=B tollgate_ns=X governor_ns=Y ratio=Z ratio_p10=P ratio_p90=Q`,
//! the medians of the rounds' ns per check (wall time per check with 2 threads) and of their
//! ratios (tollgate / governor), with the 10th and 90th percentile of the ratios. Started by
//! scripts/check-ab. Both limiters are filled with every key first, keyed as in the criterion
//! bench (tollgate by a `KeyPrefix` and the address, governor by the address), with a burst no
//! run comes near: every check is allowed (asserted).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};
use tollgate::key::KeyPrefix;
use tollgate::{MemoryStore, Quota};

/// The `i`th client's address: consecutive indices land far apart.
fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))
}

/// The index of the `i`th check's client among `keys`: a scattered order.
fn client(i: u64, keys: u32) -> u32 {
    (i.wrapping_mul(0x9E37_79B9) % u64::from(keys)) as u32
}

/// The `q` quantile of `v`, sorted.
fn quantile(v: &[f64], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Runs `batch` checks spread over `threads` threads, check `i` on `client(start + i)`;
/// returns the wall time per check (ns) and how many were allowed.
fn timed(threads: u32, batch: u64, start: u64, check: &(dyn Fn(u64) -> bool + Sync)) -> (f64, u64) {
    let allowed = AtomicU64::new(0);
    let per = batch / u64::from(threads);
    let began = Instant::now();
    std::thread::scope(|s| {
        for t in 0..u64::from(threads) {
            let allowed = &allowed;
            s.spawn(move || {
                let first = start + t * per;
                let n = (first..first + per).filter(|&i| check(i)).count() as u64;
                allowed.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let ns = began.elapsed().as_nanos() as f64 / (per * u64::from(threads)) as f64;
    (ns, allowed.into_inner())
}

fn main() {
    let arg = |n: usize, default: u64| -> u64 {
        std::env::args()
            .nth(n)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let keys = u32::try_from(arg(1, 100_000))
        .expect("KEYS fits in a u32")
        .max(1);
    let threads = u32::try_from(arg(2, 1))
        .expect("THREADS fits in a u32")
        .max(1);
    let rounds = arg(3, 101).max(1);
    let batch = arg(4, 200_000).max(u64::from(threads));

    // A million a second, and a burst no run comes near (a run checks each key a few hundred
    // times; one unit each).
    let quotas = [Quota::per_second(1_000_000)
        .and_then(|q| q.with_burst(u32::MAX))
        .expect("quota")];
    let store = MemoryStore::builder()
        .max_keys(keys as usize * 2 + 4096)
        .build();
    let prefix = KeyPrefix::new("hello", "/hello");
    let governor: DefaultKeyedRateLimiter<IpAddr> = RateLimiter::keyed(
        GovernorQuota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
            .allow_burst(NonZeroU32::MAX),
    );
    for i in 0..keys {
        let _ = store.decide(&prefix.key(Some(ip(i)), None::<&str>), &quotas, 1);
        let _ = governor.check_key(&ip(i));
    }
    assert_eq!(
        store.len(),
        keys as usize,
        "the store evicted while filling"
    );

    let tollgate_check = |i: u64| {
        let key = prefix.key(Some(ip(client(i, keys))), None::<&str>);
        store
            .decide(black_box(&key), &quotas, 1)
            .is_ok_and(|d| d.is_allowed())
    };
    let governor_check = |i: u64| governor.check_key(black_box(&ip(client(i, keys)))).is_ok();

    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Both limiters check the same keys in a round; the next round moves on.
        let start = round * batch;
        let run = |check: &(dyn Fn(u64) -> bool + Sync)| {
            let (ns, allowed) = timed(threads, batch, start, check);
            assert_eq!(
                allowed,
                batch / u64::from(threads) * u64::from(threads),
                "a check was refused"
            );
            ns
        };
        let (t, g) = if round % 2 == 0 {
            let t = run(&tollgate_check);
            (t, run(&governor_check))
        } else {
            let g = run(&governor_check);
            (run(&tollgate_check), g)
        };
        ours.push(t);
        theirs.push(g);
        ratios.push(t / g);
    }
    for v in [&mut ours, &mut theirs, &mut ratios] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "keys={keys} threads={threads} rounds={rounds} batch={batch} tollgate_ns={:.1} \
         governor_ns={:.1} ratio={:.3} ratio_p10={:.3} ratio_p90={:.3}",
        quantile(&ours, 0.5),
        quantile(&theirs, 0.5),
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.1),
        quantile(&ratios, 0.9),
    );
}
