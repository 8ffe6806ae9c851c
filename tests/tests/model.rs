//! The memory store against the independent reference model (`tollgate::conformance::model`), every
//! decision and every wait, for every algorithm, costs and several quotas at once. The Redis
//! store is checked against the same model in `redis_store.rs`.

use std::time::Duration;

use proptest::prelude::*;
use tollgate::clock::{Clock, ManualClock};
use tollgate::conformance::model::Model;
use tollgate::conformance::{random_gap_us, random_policy};
use tollgate::{Key, MemoryStore};

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_memory_store_decides_what_the_model_says(seed in any::<u64>(), steps in 1usize..80) {
        let mut rng = seed | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let quotas = random_policy(&mut next);
        let min_burst = quotas.iter().map(|q| q.burst()).min().unwrap_or(1);
        let clock = ManualClock::new();
        let store = MemoryStore::with_clock(clock.clone());
        let mut model = Model::new();
        for i in 0..steps {
            // The memory store counts in nanoseconds: so does this test (Redis counts in µs,
            // and its check in redis_store.rs uses whole µs).
            clock.advance(Duration::from_nanos(random_gap_us(&mut next) * 1_000 + next(1_000)));
            let client = ["a", "b"][usize::try_from(next(2)).unwrap_or(0)];
            let cost = u32::try_from(next(u64::from(min_burst) + 1)).unwrap_or(1);
            let key = Key::new("model", "/m", None, Some(client));
            let got = store.decide(&key, &quotas, cost).unwrap();
            let want = model.decide(&key, &quotas, cost, clock.now_ns());
            want.assert_matches(&got, &format!("{quotas:?} request {i}: client {client} cost {cost}"));
        }
    }
}

#[tokio::test]
async fn the_memory_store_passes_the_model_check_the_redis_store_runs() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    tollgate::conformance::against_model(&store, &clock, 40, "memory").await;
}
