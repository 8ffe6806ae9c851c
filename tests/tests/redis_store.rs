//! The Redis store against real `redis-server` processes: the conformance suite (with and
//! without the deny cache), exactness under concurrent load, expiry, restarts, lost script
//! caches, garbage in the store, quota identity, resets, decisions that come too late, leases,
//! and a 3-master cluster.

use std::time::{Duration, Instant};

use tollgate::clock::ManualClock;
use tollgate::concurrency::{Acquire, ConcurrencyStore};
use tollgate::conformance;
use tollgate::{Key, MemoryStore, Quota, Store, StoreErrorKind};
use tollgate_redis::{RedisStore, RedisStoreBuilder};
use tollgate_tests::redis::{RedisCluster, RedisServer, connected};

/// A store on `url` whose deadline is long enough that a slow moment of a busy test machine is
/// not mistaken for a failure. Tests about the deadline set their own.
fn builder(url: &str) -> RedisStoreBuilder {
    RedisStore::builder(url)
        .expect("url")
        .timeout(Duration::from_secs(5))
}

fn quotas(specs: &[&str]) -> Vec<Quota> {
    specs.iter().map(|q| q.parse().expect("quota")).collect()
}

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    let clock = ManualClock::new();
    conformance::verify(&MemoryStore::with_clock(clock.clone()), &clock, "memory").await;
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite_with_and_without_the_deny_cache() {
    let server = RedisServer::start();
    for (prefix, cache) in [("cached:", 10_000), ("uncached:", 0)] {
        // Without the cache every repeated refusal reaches the script's boundary cases.
        let clock = ManualClock::new();
        let store = connected(
            builder(&server.url())
                .prefix(prefix)
                .deny_cache(cache)
                .clock(clock.clone()),
        )
        .await;
        conformance::run_cases(&store, &clock, "conformance").await;
    }
}

#[tokio::test]
async fn redis_and_memory_stores_decide_alike() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let redis = connected(builder(&server.url()).clock(clock.clone())).await;
    let memory = MemoryStore::with_clock(clock.clone());
    conformance::compare(&memory, &redis, &clock, 20).await;
}

#[tokio::test]
async fn cluster_passes_the_conformance_suite_with_multi_quota_keys_in_one_slot() {
    let cluster = RedisCluster::start();
    for (prefix, cache) in [("cached:", 10_000), ("uncached:", 0)] {
        let clock = ManualClock::new();
        let store = connected(
            builder(&cluster.url())
                .prefix(prefix)
                .deny_cache(cache)
                .clock(clock.clone()),
        )
        .await;
        // The suite has multi-quota cases: their keys must hash to one slot, or the cluster
        // answers CROSSSLOT.
        conformance::run_cases(&store, &clock, "conformance").await;
        let key = Key::new("p", "/x", None, Some("{evil}"));
        let slots: Vec<String> = quotas(&["5/s", "100/h fixed-window"])
            .iter()
            .map(|q| cluster.nodes[0].cli(&["cluster", "keyslot", &store.redis_key(&key, q)]))
            .collect();
        assert_eq!(slots[0], slots[1]);
    }
}

/// Four stores (four connections) on one server, sharing a test clock so that no window
/// turns over mid-run: 200 checks of one key at once.
#[tokio::test]
async fn exactly_the_allowed_count_passes_under_concurrent_load() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(connected(builder(&server.url()).clock(clock.clone())).await);
    }
    conformance::exact_under_concurrency(&stores, 50, "standalone").await;
    // And through the store's own clock (the server's TIME), GCRA only: nothing turns over.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(connected(builder(&server.url()).prefix("time:")).await);
    }
    let q = quotas(&["50/h"]);
    let key = Key::new("server-time", "/c", None, Some("u"));
    let tasks: Vec<_> = (0..200)
        .map(|i| tokio::spawn(stores[i % 4].check(&key, &q, 1)))
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += usize::from(t.await.unwrap().unwrap().is_allowed());
    }
    assert_eq!(allowed, 50);
}

#[tokio::test]
async fn exactly_the_allowed_count_passes_under_concurrent_load_on_a_cluster() {
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(connected(builder(&cluster.url()).clock(clock.clone())).await);
    }
    conformance::exact_under_concurrency(&stores, 50, "cluster").await;
}

#[tokio::test]
async fn state_expires_when_it_stops_mattering() {
    let server = RedisServer::start();
    let store = connected(builder(&server.url()).prefix("exp:")).await;
    let q = quotas(&["5/10s", "100/h"]);
    let key = Key::new("ttl", "/t", None, Some("u"));
    for _ in 0..3 {
        assert!(store.check(&key, &q, 1).await.unwrap().is_allowed());
    }
    // Three units of 2 s: the first quota's state is worthless in 6 s, the second's
    // (36 s per unit) in 108 s.
    let pttl = |quota: &Quota| -> i64 {
        server
            .cli(&["pttl", &store.redis_key(&key, quota)])
            .parse()
            .expect("pttl")
    };
    let (short, long) = (pttl(&q[0]), pttl(&q[1]));
    assert!((5_000..=6_000).contains(&short), "pttl {short}");
    assert!((107_000..=108_000).contains(&long), "pttl {long}");
    // Nothing else was written, and nothing without an expiry.
    let keys = server.cli(&["keys", "*"]);
    assert_eq!(keys.lines().count(), 2, "{keys}");
    assert!(keys.lines().all(|k| k.starts_with("exp:{ttl:")), "{keys}");
}

#[tokio::test]
async fn a_refused_request_writes_nothing() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let store = connected(builder(&server.url()).clock(clock.clone())).await;
    let q = quotas(&["1/10s", "50/h"]);
    let key = Key::new("nw", "/t", None, Some("u"));
    assert!(store.check(&key, &q, 1).await.unwrap().is_allowed());
    // The values, and the server's own count of writes (`rdb_changes_since_last_save`: every
    // command that changed the dataset, a rewritten expiry included), which does not depend on
    // how much real time passes between the reads the way a PTTL does.
    let state = || {
        q.iter()
            .map(|quota| server.cli(&["get", &store.redis_key(&key, quota)]))
            .collect::<Vec<_>>()
    };
    let writes = || {
        let info = server.cli(&["info", "persistence"]);
        info.lines()
            .find_map(|l| l.strip_prefix("rdb_changes_since_last_save:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no write count in INFO persistence: {info}"))
    };
    let before = state();
    assert!(
        before.iter().all(|v| !v.is_empty()),
        "the allowed request wrote nothing: {before:?}"
    );
    let writes_before = writes();
    assert!(
        writes_before > 0,
        "the allowed request was not counted as a write"
    );
    assert!(store.check(&key, &q, 1).await.unwrap().is_limited());
    assert_eq!(state(), before);
    assert_eq!(writes(), writes_before, "the refusal wrote to Redis");
}

/// Polls until the store answers again after a fault, for at most 20 s. The store reconnects
/// by itself; the test only waits for that to have happened.
async fn until_answered(store: &RedisStore, key: &Key<'_>, q: &[Quota]) -> tollgate::Decision {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.check(key, q, 1).await {
            Ok(d) => return d,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn allowed_in_a_row(store: &RedisStore, key: &Key<'_>, q: &[Quota], n: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(store.check(key, q, 1).await.expect("decision").is_allowed());
    }
    out
}

fn sha1_of_script() -> String {
    // The script as the store loads it (its source is not part of the crate's API).
    let source = include_str!("../../crates/tollgate-redis/src/rate_limit.lua");
    tollgate_redis::fred::types::scripts::Script::from_lua(source)
        .sha1()
        .to_string()
}

#[tokio::test]
async fn a_restarted_server_loses_its_script_cache_and_decisions_stay_right() {
    let mut server = RedisServer::start();
    // Without the deny cache, which would keep refusing the client until the wait Redis gave
    // runs out, even though the restarted Redis forgot it.
    let store = connected(builder(&server.url()).deny_cache(0)).await;
    let q = quotas(&["5/m"]);
    let key = Key::new("restart", "/r", None, Some("u"));
    let allowed = allowed_in_a_row(&store, &key, &q, 6).await;
    assert_eq!(allowed, [true, true, true, true, true, false]);

    server.restart();
    assert_eq!(server.cli(&["script", "exists", &sha1_of_script()]), "0");
    // The data is gone with the old process: the key starts fresh, and the script is loaded
    // again on NOSCRIPT.
    let first = until_answered(&store, &key, &q).await;
    assert!(first.is_allowed());
    assert_eq!(first.remaining(), 4);
    let rest = allowed_in_a_row(&store, &key, &q, 5).await;
    assert_eq!(rest, [true, true, true, true, false]);
    assert_eq!(server.cli(&["script", "exists", &sha1_of_script()]), "1");
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_without_an_error() {
    let server = RedisServer::start();
    let store = connected(builder(&server.url())).await;
    let q = quotas(&["3/m"]);
    let key = Key::new("flush", "/f", None, Some("u"));
    assert!(store.check(&key, &q, 1).await.unwrap().is_allowed());
    assert_eq!(server.cli(&["script", "flush"]), "OK");
    // The very next call succeeds (NOSCRIPT, load, retry) and still counts once.
    let d = store
        .check(&key, &q, 1)
        .await
        .expect("reloaded transparently");
    assert_eq!(d.remaining(), 1);
}

#[tokio::test]
async fn garbage_in_the_store_is_treated_as_absent_and_overwritten_with_an_expiry() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let store = connected(builder(&server.url()).clock(clock.clone()).deny_cache(0)).await;
    // The test clock starts at 0: "now" is in the first window of each quota.
    let cases: [(&str, &[&str]); 3] = [
        (
            "5/10s",
            &[
                "nan",
                "inf",
                "-inf",
                "-5",
                "1e300",
                "abc",
                "12abc",
                "",
                "99999999999999999999",
            ],
        ),
        (
            "5/10s fixed-window",
            &[
                "nan 3",
                "inf 5",
                "-5 5",
                "9000 99999999999",
                "99999999999999999999 5",
                "99999999 5",
                "5000 5 extra",
                "abc",
            ],
        ),
        (
            "5/10s sliding-window",
            &[
                "nan 1 1",
                "10000 inf 0",
                "10000 -5 0",
                "10000 0 99999999999",
                "99999999999999999999 5 5",
                "99999999 5 5",
                "10000 5",
                "abc",
            ],
        ),
    ];
    for (i, (quota, values)) in cases.iter().enumerate() {
        let q = quotas(&[quota]);
        for (j, value) in values.iter().enumerate() {
            let user = format!("u{i}-{j}");
            let key = Key::new("garbage", "/g", None, Some(user.as_str()));
            let redis_key = store.redis_key(&key, &q[0]);
            server.cli(&["set", &redis_key, value]);
            // Absent: a fresh key's whole budget, and the value replaced...
            let d = store.check(&key, &q, 1).await.unwrap_or_else(|e| {
                panic!("{quota} with {value:?} stored: {e}");
            });
            assert_eq!(d.remaining(), 4, "{quota} with {value:?} stored");
            assert_ne!(server.cli(&["get", &redis_key]), *value);
            // ...by a state that expires.
            let pttl: i64 = server.cli(&["pttl", &redis_key]).parse().unwrap();
            assert!(pttl > 0, "{quota} with {value:?}: pttl {pttl}");
        }
        // A key of another type is replaced too.
        let key = Key::new("garbage", "/g", None, Some("a-list"));
        let redis_key = store.redis_key(&key, &q[0]);
        server.cli(&["del", &redis_key]);
        server.cli(&["rpush", &redis_key, "x"]);
        assert_eq!(
            store.check(&key, &q, 1).await.unwrap().remaining(),
            4,
            "{quota}"
        );
        assert_eq!(server.cli(&["type", &redis_key]), "string");
    }

    // A timestamp far in the future (another writer, a clock that jumped back): capped at one
    // spent burst, so the client waits one interval, not centuries, and the state expires.
    let q = quotas(&["5/10s"]);
    let key = Key::new("garbage", "/g", None, Some("future"));
    let redis_key = store.redis_key(&key, &q[0]);
    server.cli(&["set", &redis_key, "9000000000000000"]);
    let d = store.check(&key, &q, 1).await.unwrap();
    assert_eq!(d.retry_after(), Some(Duration::from_secs(2)));
    let pttl: i64 = server.cli(&["pttl", &redis_key]).parse().unwrap();
    assert!((1..=10_000).contains(&pttl), "pttl {pttl}");
    clock.advance(Duration::from_secs(2));
    assert!(store.check(&key, &q, 1).await.unwrap().is_allowed());
}

#[tokio::test]
async fn states_belong_to_their_quota_not_to_their_place_in_the_policy() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let redis = connected(builder(&server.url()).clock(clock.clone())).await;
    let memory = MemoryStore::with_clock(clock.clone());
    let key = Key::new("reorder", "/r", None, Some("u"));
    let (per_minute, per_day) = ("3/m", "10/d fixed-window");
    // A deploy spends under [3/m, 10/d]...
    let before = quotas(&[per_minute, per_day]);
    for _ in 0..2 {
        assert!(redis.check(&key, &before, 1).await.unwrap().is_allowed());
        assert!(memory.decide(&key, &before, 1).unwrap().is_allowed());
    }
    // ...the next one reorders them and adds a quota: every state stays with its quota (read
    // by index, a day's count would be read as a minute's timestamp).
    let after = quotas(&["100/h", per_day, per_minute]);
    let r = redis.check(&key, &after, 1).await.unwrap();
    let m = memory.decide(&key, &after, 1).unwrap();
    for d in [&r, &m] {
        let remaining: Vec<u32> = d.states().iter().map(|s| s.remaining()).collect();
        assert_eq!(remaining, [99, 7, 0], "{d:?}");
    }
    assert_eq!(r, m);
}

#[tokio::test]
async fn an_operator_can_reset_a_key_in_both_stores() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let a = connected(builder(&server.url()).clock(clock.clone())).await;
    let b = connected(builder(&server.url()).clock(clock.clone())).await;
    let memory = MemoryStore::with_clock(clock.clone());
    let q = quotas(&["3/d", "20/d fixed-window"]);
    let key = Key::new("login", "/login", None, Some("locked-out"));
    for _ in 0..3 {
        assert!(a.check(&key, &q, 1).await.unwrap().is_allowed());
        assert!(memory.decide(&key, &q, 1).unwrap().is_allowed());
    }
    // Both instances now hold a cached refusal for a day's wait.
    assert!(a.check(&key, &q, 1).await.unwrap().is_limited());
    assert!(b.check(&key, &q, 1).await.unwrap().is_limited());
    assert!(memory.decide(&key, &q, 1).unwrap().is_limited());

    memory.reset(&key, &q);
    assert_eq!(memory.decide(&key, &q, 1).unwrap().remaining(), 2);
    a.reset(&key, &q).await.unwrap();
    for quota in &q {
        assert_eq!(server.cli(&["exists", &a.redis_key(&key, quota)]), "0");
    }
    // The instance that reset it asks Redis at once...
    assert_eq!(a.check(&key, &q, 1).await.unwrap().remaining(), 2);
    // ...another trusts its cached refusal for at most the deny cache's time to live (10 s),
    // not for the day Redis had said.
    assert!(b.check(&key, &q, 1).await.unwrap().is_limited());
    clock.advance(Duration::from_secs(10));
    assert_eq!(b.check(&key, &q, 1).await.unwrap().remaining(), 1);
}

#[tokio::test]
async fn a_decision_that_comes_too_late_writes_nothing() {
    let server = RedisServer::start();
    // The production deadline: this test is about it. No fallback, no deny cache.
    let store = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .timeout(Duration::from_millis(200))
            .deny_cache(0),
    )
    .await;
    let q = quotas(&["3/m"]);
    let key = Key::new("late", "/login", None, Some("u"));
    // One call that answers in time teaches the store the server's clock (wait_connected did
    // too).
    let probe = Key::new("late", "/probe", None, Some("u"));
    assert!(store.check(&probe, &q, 1).await.unwrap().is_allowed());

    server.pause();
    // Sent while Redis is frozen: the store gives up after its deadline, but the commands sit
    // in the frozen server's socket and run when it thaws.
    for _ in 0..2 {
        let err = store.check(&key, &q, 1).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Timeout);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    // Once the server has run what was queued (it answers in order), the key must not exist:
    // the late scripts saw their deadline had passed.
    let _ = until_answered(&store, &probe, &q).await;
    assert_eq!(
        server.cli(&["exists", &store.redis_key(&key, &q[0])]),
        "0",
        "a decision nobody waited for spent the client's budget"
    );
    // The whole budget is there.
    assert_eq!(
        allowed_in_a_row(&store, &key, &q, 4).await,
        [true, true, true, false]
    );
}

#[tokio::test]
async fn concurrency_leases_are_taken_atomically_and_given_back_on_drop() {
    let server = RedisServer::start();
    let store = connected(builder(&server.url())).await;
    let slots = store.concurrency(Duration::from_secs(30));
    let key = Key::new("conc", "/c", None, Some("u"));
    let redis_key = slots.redis_key(&key);
    // Many acquires at once for 3 slots: exactly 3 succeed.
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(slots.acquire(&key, 3)))
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Acquire::Acquired { permit, .. } => held.push(permit),
            Acquire::Full { in_flight } => assert_eq!(in_flight, 3),
        }
    }
    assert_eq!(held.len(), 3);
    assert_eq!(server.cli(&["zcard", &redis_key]), "3");
    let ttl: i64 = server.cli(&["pttl", &redis_key]).parse().unwrap();
    assert!((1..=30_000).contains(&ttl), "{ttl}");
    drop(held);
    wait_until_gone(&server, &redis_key).await;
}

async fn wait_until_gone(server: &RedisServer, redis_key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cli(&["exists", redis_key]) != "0" {
        assert!(
            Instant::now() < deadline,
            "leases not released: {}",
            server.cli(&["zrange", redis_key, "0", "-1", "withscores"])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_lease_whose_acquire_timed_out_is_not_held() {
    let server = RedisServer::start();
    let store = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .timeout(Duration::from_millis(200)),
    )
    .await;
    let slots = store.concurrency(Duration::from_secs(30));
    let key = Key::new("leak", "/c", None, Some("u"));
    let redis_key = slots.redis_key(&key);
    // Learn the server's clock through one lease.
    assert!(matches!(
        slots.acquire(&key, 2).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    wait_until_gone(&server, &redis_key).await;

    let zadds = || server.calls("zadd");
    let zadds_before = zadds();
    server.pause();
    let err = slots.acquire(&key, 2).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Timeout);
    // An acquire whose future is dropped after the command was sent.
    let mut dropped = slots.acquire(&key, 2);
    let _ = tokio::time::timeout(Duration::from_millis(50), &mut dropped).await;
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    // What the thawed server ran took nothing: both acquires saw their deadline had passed
    // (no ZADD ran), and the guards' releases found nothing to release. The client gets both
    // of its slots at once.
    wait_until_gone(&server, &redis_key).await;
    assert_eq!(zadds(), zadds_before, "a late acquire took a slot");
    let a = slots.acquire(&key, 2).await.unwrap();
    let b = slots.acquire(&key, 2).await.unwrap();
    assert!(matches!(a, Acquire::Acquired { .. }), "{a:?}");
    assert!(matches!(b, Acquire::Acquired { in_flight: 2, .. }), "{b:?}");
}

#[tokio::test]
async fn a_shorter_lease_never_cuts_a_longer_one_short() {
    let server = RedisServer::start();
    let store = connected(builder(&server.url())).await;
    // A rolling deploy: the old instances lease for 60 s, the new ones for 1 s.
    let long = store.concurrency(Duration::from_secs(60));
    let short = store.concurrency(Duration::from_secs(1));
    let key = Key::new("deploy", "/c", None, Some("u"));
    let redis_key = long.redis_key(&key);
    let _held_long = long.acquire(&key, 5).await.unwrap();
    let _held_short = short.acquire(&key, 5).await.unwrap();
    let pttl: i64 = server.cli(&["pttl", &redis_key]).parse().unwrap();
    assert!(
        pttl > 55_000,
        "the set would expire in {pttl} ms, before its 60 s lease"
    );
    assert_eq!(server.cli(&["zcard", &redis_key]), "2");
}

#[tokio::test]
async fn a_lease_taken_for_a_dropped_acquire_is_given_back() {
    let server = RedisServer::start();
    let store = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .timeout(Duration::from_millis(400)),
    )
    .await;
    let slots = store.concurrency(Duration::from_secs(30));
    let key = Key::new("dropped", "/c", None, Some("u"));
    let redis_key = slots.redis_key(&key);
    // One acquire first: it loads the lease script (the acquire below must not stop at a
    // NOSCRIPT) and teaches the store the server's clock.
    drop(slots.acquire(&key, 1).await.unwrap());
    wait_until_gone(&server, &redis_key).await;
    // Busy the server for 150 ms from another connection: the acquire below waits behind it,
    // then runs well within its deadline, when its caller has already gone.
    let busy_port = server.port;
    let busy = std::thread::spawn(move || {
        let busy = RedisServer::start_on_existing(busy_port);
        busy.cli(&[
            "eval",
            "local s = redis.call('TIME') repeat local t = redis.call('TIME') \
             until (t[1] - s[1]) * 1000000 + (t[2] - s[2]) > 150000 return 1",
            "0",
        ])
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut acquire = slots.acquire(&key, 1);
    let _ = tokio::time::timeout(Duration::from_millis(50), &mut acquire).await;
    drop(acquire);
    assert_eq!(busy.join().unwrap(), "1");
    // The acquire took the slot; the release its guard sent when the future was dropped ran
    // right after it. The slot is free now, not in 30 s.
    wait_until_gone(&server, &redis_key).await;
    assert!(matches!(
        slots.acquire(&key, 1).await.unwrap(),
        Acquire::Acquired { .. }
    ));
}

/// A store that reads, yields, then writes: what the concurrency check exists to catch.
#[derive(Clone, Default)]
struct ReadThenWrite(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>);

impl Store for ReadThenWrite {
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tollgate::Decision, tollgate::StoreError>>
                + Send,
        >,
    >;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        let map = std::sync::Arc::clone(&self.0);
        let (key, quotas) = (key.to_string(), quotas.to_vec());
        Box::pin(async move {
            let spent = map.lock().unwrap().get(&key).copied().unwrap_or(0);
            tokio::task::yield_now().await;
            let allowed = quotas.iter().all(|q| spent + cost <= q.limit());
            if allowed {
                map.lock().unwrap().insert(key, spent + cost);
            }
            Ok(tollgate::Decision::from_states(quotas.iter().map(|q| {
                tollgate::QuotaState::new(
                    *q,
                    allowed,
                    q.limit().saturating_sub(spent + u32::from(allowed) * cost),
                    Duration::ZERO,
                    Duration::from_secs(1),
                )
            })))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_check_catches_a_store_that_reads_then_writes() {
    let racy = ReadThenWrite::default();
    let outcome = tokio::spawn(async move {
        conformance::exact_under_concurrency(&[racy.clone(), racy], 100, "racy").await;
    })
    .await;
    assert!(
        outcome.is_err_and(|e| e.is_panic()),
        "a read-then-write store passed the concurrency check"
    );
}

#[tokio::test]
async fn the_redis_store_decides_what_the_model_says_with_and_without_the_deny_cache() {
    let server = RedisServer::start();
    for (prefix, cache) in [("cached:", 10_000), ("uncached:", 0)] {
        let clock = ManualClock::new();
        let store = connected(
            builder(&server.url())
                .prefix(prefix)
                .deny_cache(cache)
                .clock(clock.clone()),
        )
        .await;
        // The deny cache replays a refused window's wait from when Redis gave it, without the
        // server's millisecond boundaries: never below the true wait, but up to a millisecond
        // off what Redis, which counts windows from the current whole millisecond, would say
        // now. Everything else is exact, and exact throughout without the cache.
        let slack = if cache > 0 {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        conformance::against_model_within(&store, &clock, 40, prefix, slack).await;
    }
}
