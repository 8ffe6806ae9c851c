//! How the memory store's check grows with the number of keys it holds and the number of quotas
//! per policy, beside governor keyed by `IpAddr` at the same key counts (one quota).
//!
//! `cargo run --release -p tollgate-tests --no-default-features --example cost-growth -- [ROUNDS] [KEYS...]`
//!
//! For each key count, every key is decided once (so the store holds them all), then checks go
//! to the keys in a scattered order, as many clients' requests do: `CHECKS` checks per round,
//! timed as a whole. Prints one line per figure, the median of `ROUNDS` rounds (default 3):
//! `store=memory keys=K quotas=Q ns_per_check=X`. Started by scripts/growth.
//!
//! Keys are made from a `KeyPrefix`, the policy and the route hashed once, as the layer does
//! for each of its routes.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};
use tollgate::key::KeyPrefix;
use tollgate::{MemoryStore, Quota};

/// Checks per round: enough that the smallest figures are not a timer's resolution, and that
/// every key of 1M is visited about twice.
const CHECKS: u32 = 2_000_000;

/// A burst no round of checks on one key comes near: every check is allowed, in both limiters.
const BURST: u32 = 100_000_000;

/// What filling spends per key: at 1 000 units per second a state then holds for over 15
/// minutes, so none expires (and is swept) while the rounds run.
const FILL_COST: u32 = 1_000_000;

/// The `i`th client's address: consecutive indices land far apart.
fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))
}

/// The index of the `i`th check's client among `keys`: a scattered order, no two consecutive
/// checks on neighbouring keys.
fn client(i: u32, keys: u32) -> u32 {
    (u64::from(i).wrapping_mul(0x9E37_79B9) % u64::from(keys)) as u32
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn memory(keys: u32, quotas: usize, rounds: usize) -> f64 {
    let policy: Vec<Quota> = (0..quotas)
        .map(|q| {
            Quota::per_second(1_000 - q as u32)
                .and_then(|q| q.with_burst(BURST))
                .expect("quota")
        })
        .collect();
    let states = keys as usize * quotas;
    // Shards fill unevenly: room enough that none evicts (max_keys counts states).
    let store = MemoryStore::builder()
        .max_keys(states + states / 2 + 4096)
        .build();
    let prefix = KeyPrefix::new("hello", "/hello");
    for i in 0..keys {
        let key = prefix.key(Some(ip(i)), None::<&str>);
        let _ = store.decide(&key, &policy, FILL_COST);
    }
    assert_eq!(store.len(), states, "the store evicted while filling");
    let mut figures = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut allowed = 0u32;
        for i in 0..CHECKS {
            let key = prefix.key(Some(ip(client(i, keys))), None::<&str>);
            if store
                .decide(black_box(&key), &policy, 1)
                .is_ok_and(|d| d.is_allowed())
            {
                allowed += 1;
            }
        }
        assert_eq!(allowed, CHECKS, "a check was refused");
        figures.push(started.elapsed().as_nanos() as f64 / f64::from(CHECKS));
    }
    median(figures)
}

fn governor(keys: u32, rounds: usize) -> f64 {
    let quota = GovernorQuota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
        .allow_burst(NonZeroU32::new(BURST).expect("non-zero"));
    let limiter: DefaultKeyedRateLimiter<IpAddr> = RateLimiter::keyed(quota);
    for i in 0..keys {
        let _ = limiter.check_key(&ip(i));
    }
    let mut figures = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut allowed = 0u32;
        for i in 0..CHECKS {
            if limiter.check_key(black_box(&ip(client(i, keys)))).is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, CHECKS, "a check was refused");
        figures.push(started.elapsed().as_nanos() as f64 / f64::from(CHECKS));
    }
    median(figures)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(3);
    let mut key_counts: Vec<u32> = args.iter().skip(1).filter_map(|s| s.parse().ok()).collect();
    if key_counts.is_empty() {
        key_counts = vec![1, 10_000, 100_000, 1_000_000, 10_000_000];
    }
    for &keys in &key_counts {
        for quotas in 1..=4 {
            println!(
                "store=memory keys={keys} quotas={quotas} ns_per_check={:.1}",
                memory(keys, quotas, rounds)
            );
        }
        println!(
            "store=governor keys={keys} quotas=1 ns_per_check={:.1}",
            governor(keys, rounds)
        );
    }
}
