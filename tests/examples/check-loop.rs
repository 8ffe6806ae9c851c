//! A tight loop of memory-store checks, for profilers (`perf record`, `valgrind --tool=callgrind`),
//! or of governor's keyed check on the same addresses, to count both alike.
//!
//! `cargo run --release -p tollgate-tests --no-default-features --example check-loop -- [KEYS] [ITERATIONS] [tollgate|prefix|governor]`
//!
//! `tollgate` builds each key with `Key::new` from its strings, as a direct caller of the store
//! may; `prefix` from a `KeyPrefix` made once, as the layer does for each of its routes (the
//! policy and the route hashed once, like governor's one limiter per route).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota as GovernorQuota, RateLimiter};
use tollgate::key::KeyPrefix;
use tollgate::{Key, MemoryStore, Quota};

fn main() {
    let keys: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let iterations: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let ip = |i: u32| IpAddr::V4(Ipv4Addr::from((i % keys).wrapping_mul(2_654_435_761)));
    let mut allowed = 0u32;
    if std::env::args().nth(3).as_deref() == Some("governor") {
        // Keyed by the address, as tower_governor's peer-IP extractor does.
        let quota = GovernorQuota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
            .allow_burst(NonZeroU32::MAX);
        let limiter: DefaultKeyedRateLimiter<IpAddr> = RateLimiter::keyed(quota);
        for i in 0..iterations {
            if limiter.check_key(black_box(&ip(i))).is_ok() {
                allowed += 1;
            }
        }
    } else if std::env::args().nth(3).as_deref() == Some("prefix") {
        let quotas = [Quota::per_second(1_000_000)
            .and_then(|q| q.with_burst(u32::MAX))
            .expect("quota")];
        let store = MemoryStore::new();
        let prefix = KeyPrefix::new("hello", "/hello");
        for i in 0..iterations {
            let key = prefix.key(Some(ip(i)), None::<&str>);
            if store
                .decide(black_box(&key), &quotas, 1)
                .is_ok_and(|d| d.is_allowed())
            {
                allowed += 1;
            }
        }
    } else {
        let quotas = [Quota::per_second(1_000_000)
            .and_then(|q| q.with_burst(u32::MAX))
            .expect("quota")];
        let store = MemoryStore::new();
        for i in 0..iterations {
            let key = Key::new("hello", "/hello", Some(ip(i)), None::<&str>);
            if store
                .decide(black_box(&key), &quotas, 1)
                .is_ok_and(|d| d.is_allowed())
            {
                allowed += 1;
            }
        }
    }
    println!("{allowed} allowed of {iterations}");
}
