//! The Redis store against real `redis-server` processes: the conformance suite, expiry,
//! restarts, lost script caches, garbage in the store, and a 3-master cluster.

use std::time::{Duration, Instant};

use tollgate::clock::ManualClock;
use tollgate::{Key, MemoryStore, Quota, Store};
use tollgate_redis::RedisStore;
use tollgate_tests::conformance;
use tollgate_tests::redis::{RedisCluster, RedisServer};

async fn connected(builder: tollgate_redis::RedisStoreBuilder) -> RedisStore {
    let store = builder.build().expect("build store");
    store
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("connect to the test server");
    store
}

#[tokio::test]
async fn memory_store_passes_the_conformance_suite() {
    let clock = ManualClock::new();
    conformance::run(&MemoryStore::with_clock(clock.clone()), &clock).await;
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let store = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .clock(clock.clone()),
    )
    .await;
    conformance::run(&store, &clock).await;
}

#[tokio::test]
async fn redis_and_memory_stores_decide_alike() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let redis = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .clock(clock.clone()),
    )
    .await;
    let memory = MemoryStore::with_clock(clock.clone());
    conformance::compare(&memory, &redis, &clock, 20).await;
}

#[tokio::test]
async fn cluster_passes_the_conformance_suite_with_multi_quota_keys_in_one_slot() {
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    let store = connected(
        RedisStore::builder(&cluster.url())
            .unwrap()
            .clock(clock.clone()),
    )
    .await;
    // The suite has a two-quota case: both keys must hash to one slot, or the cluster answers
    // CROSSSLOT.
    conformance::run(&store, &clock).await;
    let key = Key::new("p", "/x", None, Some("{evil}"));
    let slots: Vec<String> = (0..2)
        .map(|i| cluster.nodes[0].cli(&["cluster", "keyslot", &store.redis_key(&key, i)]))
        .collect();
    assert_eq!(slots[0], slots[1]);
}

#[tokio::test]
async fn state_expires_when_it_stops_mattering() {
    let server = RedisServer::start();
    let store = connected(RedisStore::builder(&server.url()).unwrap().prefix("exp:")).await;
    let quotas: Vec<Quota> = vec!["5/10s".parse().unwrap(), "100/h".parse().unwrap()];
    let key = Key::new("ttl", "/t", None, Some("u"));
    for _ in 0..3 {
        assert!(store.check(&key, &quotas, 1).await.unwrap().is_allowed());
    }
    // Three units of 2 s: the first quota's state is worthless in 6 s, the second's
    // (36 s per unit) in 108 s.
    let pttl = |i| -> i64 {
        server
            .cli(&["pttl", &store.redis_key(&key, i)])
            .parse()
            .expect("pttl")
    };
    let (short, long) = (pttl(0), pttl(1));
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
    let store = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .clock(clock.clone()),
    )
    .await;
    let quotas: Vec<Quota> = vec!["1/10s".parse().unwrap(), "50/h".parse().unwrap()];
    let key = Key::new("nw", "/t", None, Some("u"));
    assert!(store.check(&key, &quotas, 1).await.unwrap().is_allowed());
    let before = (
        server.cli(&["get", &store.redis_key(&key, 0)]),
        server.cli(&["get", &store.redis_key(&key, 1)]),
    );
    assert!(store.check(&key, &quotas, 1).await.unwrap().is_limited());
    let after = (
        server.cli(&["get", &store.redis_key(&key, 0)]),
        server.cli(&["get", &store.redis_key(&key, 1)]),
    );
    assert_eq!(before, after);
}

/// Polls until the store answers again after a fault, for at most 20 s. The store reconnects
/// by itself; the test only waits for that to have happened.
async fn until_answered(store: &RedisStore, key: &Key<'_>, quotas: &[Quota]) -> tollgate::Decision {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.check(key, quotas, 1).await {
            Ok(d) => return d,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_restarted_server_loses_its_script_cache_and_decisions_stay_right() {
    let mut server = RedisServer::start();
    // Without the deny cache, which would keep refusing the client until the wait Redis gave
    // runs out, even though the restarted Redis forgot it.
    let store = connected(RedisStore::builder(&server.url()).unwrap().deny_cache(0)).await;
    let quotas: Vec<Quota> = vec!["5/m".parse().unwrap()];
    let key = Key::new("restart", "/r", None, Some("u"));
    let allowed: Vec<bool> = futures_lite(&store, &key, &quotas, 6).await;
    assert_eq!(allowed, [true, true, true, true, true, false]);

    server.restart();
    assert_eq!(server.cli(&["script", "exists", &sha1_of(&store)]), "0");
    // The data is gone with the old process: the key starts fresh, and the script is loaded
    // again on NOSCRIPT.
    let first = until_answered(&store, &key, &quotas).await;
    assert!(first.is_allowed());
    assert_eq!(first.remaining(), 4);
    let rest: Vec<bool> = futures_lite(&store, &key, &quotas, 5).await;
    assert_eq!(rest, [true, true, true, true, false]);
    assert_eq!(server.cli(&["script", "exists", &sha1_of(&store)]), "1");
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_without_an_error() {
    let server = RedisServer::start();
    let store = connected(RedisStore::builder(&server.url()).unwrap()).await;
    let quotas: Vec<Quota> = vec!["3/m".parse().unwrap()];
    let key = Key::new("flush", "/f", None, Some("u"));
    assert!(store.check(&key, &quotas, 1).await.unwrap().is_allowed());
    assert_eq!(server.cli(&["script", "flush"]), "OK");
    // The very next call succeeds (NOSCRIPT, load, retry) and still counts once.
    let d = store
        .check(&key, &quotas, 1)
        .await
        .expect("reloaded transparently");
    assert_eq!(d.remaining(), 1);
}

#[tokio::test]
async fn garbage_in_the_store_never_locks_a_client_out() {
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let store = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .clock(clock.clone()),
    )
    .await;
    let quotas: Vec<Quota> = vec!["5/10s".parse().unwrap()];
    let key = Key::new("garbage", "/g", None, Some("u"));
    let redis_key = store.redis_key(&key, 0);

    // Not a number: treated as a fresh key.
    server.cli(&["set", &redis_key, "not a number"]);
    assert_eq!(store.check(&key, &quotas, 1).await.unwrap().remaining(), 4);

    // A timestamp far in the future (another writer, a clock that jumped back): capped at one
    // spent burst, so the client waits one interval, not centuries.
    server.cli(&["set", &redis_key, "9000000000000000"]);
    let d = store.check(&key, &quotas, 1).await.unwrap();
    assert_eq!(d.retry_after(), Some(Duration::from_secs(2)));
    clock.advance(Duration::from_secs(2));
    assert!(store.check(&key, &quotas, 1).await.unwrap().is_allowed());
}

#[tokio::test]
async fn servers_clock_decides_for_every_instance() {
    // Two stores with no test clock: they share the server's TIME, so together they allow
    // exactly the burst.
    let server = RedisServer::start();
    let a = connected(RedisStore::builder(&server.url()).unwrap()).await;
    let b = connected(RedisStore::builder(&server.url()).unwrap()).await;
    let quotas: Vec<Quota> = vec!["4/h".parse().unwrap()];
    let key = Key::new("shared", "/s", None, Some("u"));
    let mut allowed = 0;
    for i in 0..10 {
        let store = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(store.check(&key, &quotas, 1).await.unwrap().is_allowed());
    }
    assert_eq!(allowed, 4);
}

async fn futures_lite(store: &RedisStore, key: &Key<'_>, quotas: &[Quota], n: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            store
                .check(key, quotas, 1)
                .await
                .expect("decision")
                .is_allowed(),
        );
    }
    out
}

fn sha1_of(_store: &RedisStore) -> String {
    tollgate_redis::fred::types::scripts::Script::from_lua(tollgate_redis::GCRA_SCRIPT)
        .sha1()
        .to_string()
}

#[tokio::test]
async fn concurrency_leases_are_taken_atomically_and_given_back_on_drop() {
    use tollgate::concurrency::Acquire;
    let server = RedisServer::start();
    let store = connected(RedisStore::builder(&server.url()).unwrap()).await;
    let slots = store.concurrency(Duration::from_secs(30));
    let key = Key::new("conc", "/c", None, Some("u"));
    let redis_key = slots.redis_key(&key);
    // Many acquires at once for 3 slots: exactly 3 succeed.
    let results = futures_join(&slots, &key, 20).await;
    let held: Vec<_> = results
        .into_iter()
        .filter_map(|r| match r.unwrap() {
            Acquire::Acquired { permit, .. } => Some(permit),
            Acquire::Full { in_flight } => {
                assert_eq!(in_flight, 3);
                None
            }
        })
        .collect();
    assert_eq!(held.len(), 3);
    assert_eq!(server.cli(&["zcard", &redis_key]), "3");
    let ttl: i64 = server.cli(&["pttl", &redis_key]).parse().unwrap();
    assert!((1..=30_000).contains(&ttl), "{ttl}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cli(&["exists", &redis_key]) != "0" {
        assert!(Instant::now() < deadline, "leases not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn futures_join(
    slots: &tollgate_redis::RedisConcurrencyStore,
    key: &Key<'_>,
    n: usize,
) -> Vec<Result<tollgate::concurrency::Acquire<tollgate_redis::RedisPermit>, tollgate::StoreError>>
{
    use tollgate::concurrency::ConcurrencyStore;
    let futures: Vec<_> = (0..n).map(|_| slots.acquire(key, 3)).collect();
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn evalsha_calls(server: &RedisServer) -> u64 {
    server
        .cli(&["info", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// 1000 requests, 90% from three clients far past their limit, 10% from a hundred others.
async fn abusive_traffic(store: &RedisStore) -> (usize, usize) {
    let quotas: Vec<Quota> = vec!["5/m".parse().unwrap()];
    let (mut allowed, mut limited) = (0, 0);
    for i in 0..1000u32 {
        let user = if i % 10 == 9 {
            format!("visitor-{}", i / 10)
        } else {
            format!("abuser-{}", i % 3)
        };
        let key = Key::new("abuse", "/a", None, Some(user.as_str()));
        if store.check(&key, &quotas, 1).await.unwrap().is_allowed() {
            allowed += 1;
        } else {
            limited += 1;
        }
    }
    (allowed, limited)
}

#[tokio::test]
async fn the_deny_cache_spares_redis_the_clients_it_already_refused() {
    let server = RedisServer::start();
    let without = connected(
        RedisStore::builder(&server.url())
            .unwrap()
            .prefix("a:")
            .deny_cache(0),
    )
    .await;
    let with = connected(RedisStore::builder(&server.url()).unwrap().prefix("b:")).await;

    let before = evalsha_calls(&server);
    let plain = abusive_traffic(&without).await;
    let uncached = evalsha_calls(&server) - before;
    let before = evalsha_calls(&server);
    let cached = abusive_traffic(&with).await;
    let with_cache = evalsha_calls(&server) - before;

    // The same decisions...
    assert_eq!(plain, cached);
    assert_eq!(plain, (15 + 100, 1000 - 115));
    // ...for far fewer round trips: one per request without the cache (plus the first call that
    // found no script loaded); with it, the abusers cost one refusal each and the visitors one
    // call each.
    assert!((1000..=1001).contains(&uncached), "{uncached}");
    assert!(with_cache <= 200, "{with_cache} EVALSHA for 1000 requests");
    assert!(
        with_cache * 5 <= uncached,
        "commands fell by less than 80%: {with_cache} vs {uncached}"
    );
}
