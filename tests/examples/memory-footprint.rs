//! Memory per tracked key of the memory store: the process's resident memory before and after
//! deciding for N distinct keys (default 1 000 000).
//!
//! `cargo run --release -p tollgate-tests --no-default-features --example memory-footprint -- [N]`

use std::net::{IpAddr, Ipv4Addr};

use tollgate::{Key, MemoryStore, Quota};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let quotas = [Quota::per_hour(100).expect("quota")];
    // Shards fill unevenly: leave room so that no shard evicts before all N are in.
    let store = MemoryStore::builder()
        .max_keys(n as usize + n as usize / 8)
        .build();
    let before = rss_bytes();
    for i in 0..n {
        let ip = IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)));
        let key = Key::new("hello", "/hello", Some(ip), None::<&str>);
        let _ = store.decide(&key, &quotas, 1);
    }
    let after = rss_bytes();
    let held = store.len();
    println!(
        "keys={held} rss_before_mb={:.1} rss_after_mb={:.1} growth_mb={:.1} bytes_per_key={:.1}",
        before as f64 / 1e6,
        after as f64 / 1e6,
        (after - before) as f64 / 1e6,
        (after - before) as f64 / f64::from(held.max(1) as u32)
    );
}
