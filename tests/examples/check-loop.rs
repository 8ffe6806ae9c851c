//! A tight loop of memory-store checks, for profilers (`perf record`, `valgrind --tool=callgrind`).
//!
//! `cargo run --release -p tollgate-tests --example check-loop -- [KEYS] [ITERATIONS]`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

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
    let quotas = [Quota::per_second(1_000_000).expect("quota")];
    let store = MemoryStore::new();
    let mut allowed = 0u32;
    for i in 0..iterations {
        let ip = IpAddr::V4(Ipv4Addr::from((i % keys).wrapping_mul(2_654_435_761)));
        let key = Key::new("hello", "/hello", Some(ip), None::<&str>);
        if store
            .decide(black_box(&key), &quotas, 1)
            .is_ok_and(|d| d.is_allowed())
        {
            allowed += 1;
        }
    }
    println!("{allowed} allowed of {iterations}");
}
