//! The Redis store sends the checks in flight at the same moment in one script call
//! (`RedisStoreBuilder::max_batch`), against real `redis-server` processes: the same decisions
//! as one call per check, fewer calls, a cluster's calls within one slot, checks nobody waits
//! for never sent, every check answered by its deadline, and a full queue failing at once.
//!
//! Each test first polls every check once, without letting the store's sending task run (a
//! test's runtime has one thread), so that all of them are queued before the first call
//! leaves: how many calls that makes is then exact.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tollgate::{Decision, Key, Quota, Store, StoreError, StoreErrorKind};
use tollgate_redis::{RedisStore, RedisStoreBuilder};
use tollgate_tests::redis::{RedisCluster, RedisServer};

type Check = <RedisStore as Store>::Future;

fn builder(url: &str) -> RedisStoreBuilder {
    RedisStore::builder(url)
        .expect("url")
        .timeout(Duration::from_secs(10))
        .deny_cache(0)
}

/// A connected store whose script is in the server's cache (on every master of a cluster), so
/// that no `EVALSHA` answered `NOSCRIPT` is counted below.
async fn connected(builder: RedisStoreBuilder) -> RedisStore {
    let store = tollgate_tests::redis::connected(builder).await;
    let warm_up = Key::new("warm-up", "/", None, Some("-"));
    store
        .check(&warm_up, &quota("1/s"), 0)
        .await
        .expect("first check");
    store
}

fn quota(spec: &str) -> Vec<Quota> {
    vec![spec.parse().expect("quota")]
}

/// Polls `check` once: far enough to be queued (or refused at once).
fn poll_once(check: &mut Check) -> Poll<Result<Decision, StoreError>> {
    Pin::new(check).poll(&mut Context::from_waker(Waker::noop()))
}

/// Starts every check and polls it once, so that all are queued before any call is sent.
fn queue_all(store: &RedisStore, checks: &[(Key<'_>, Vec<Quota>)]) -> Vec<Check> {
    checks
        .iter()
        .map(|(key, quotas)| {
            let mut check = store.check(key, quotas, 1);
            assert!(poll_once(&mut check).is_pending(), "a check did not queue");
            check
        })
        .collect()
}

async fn all(checks: Vec<Check>) -> Vec<Decision> {
    let mut out = Vec::with_capacity(checks.len());
    for check in checks {
        out.push(check.await.expect("decision"));
    }
    out
}

/// 300 checks, interleaved: 150 of one client under 50 per hour; two clients under 5 per hour
/// whose states hold garbage and a value of another type; one under a policy of a fixed
/// window and a rate, and one under a sliding window (windows of a day, each key at its own
/// offset, so that a boundary almost never falls between the runs compared). A call carries
/// checks of four shapes, windows with their keys' offsets among them.
fn mixed_checks() -> Vec<(Key<'static>, Vec<Quota>)> {
    let windows = || {
        let mut q = quota("3/d fixed-window");
        q.extend(quota("20/h"));
        q
    };
    (0..300)
        .map(|i| match i % 8 {
            4 => (Key::new("c", "/x", None, Some("garbage")), quota("5/h")),
            5 => (Key::new("c", "/x", None, Some("list")), quota("5/h")),
            6 => (Key::new("w", "/x", None, Some("fixed")), windows()),
            7 => (
                Key::new("w", "/x", None, Some("sliding")),
                quota("4/d sliding-window"),
            ),
            _ => (Key::new("c", "/x", None, Some("hot")), quota("50/h")),
        })
        .collect()
}

fn spoil(server: &RedisServer, store: &RedisStore) {
    let q = &quota("5/h")[0];
    let garbage = store.redis_key(&Key::new("c", "/x", None, Some("garbage")), q);
    let list = store.redis_key(&Key::new("c", "/x", None, Some("list")), q);
    server.cli(&["set", &garbage, "not a number"]);
    server.cli(&["rpush", &list, "a", "b"]);
}

/// Decides `checks` one call each, one after the other, then queued all at once into stores
/// of 64, 16 and 1 checks per call, and asserts the same decisions in as few calls as the
/// bound allows. Returns the decisions of one call each.
async fn decided_alike_however_coalesced(
    server: &RedisServer,
    name: &str,
    checks: &[(Key<'static>, Vec<Quota>)],
) -> Vec<Decision> {
    let n = checks.len() as u64;
    // The reference: every check in a call of its own, one after the other.
    let alone = connected(
        builder(&server.url())
            .prefix(format!("{name}-alone:"))
            .max_batch(1),
    )
    .await;
    spoil(server, &alone);
    let before = server.calls("evalsha");
    let mut expected = Vec::new();
    for (key, quotas) in checks {
        expected.push(alone.check(key, quotas, 1).await.expect("decision"));
    }
    assert_eq!(server.calls("evalsha") - before, n);

    for max_batch in [64, 16, 1] {
        let prefix = format!("{name}-batch{max_batch}:");
        let store = connected(builder(&server.url()).prefix(&prefix).max_batch(max_batch)).await;
        spoil(server, &store);
        let before = server.calls("evalsha");
        let got = all(queue_all(&store, checks)).await;
        assert_eq!(
            server.calls("evalsha") - before,
            n.div_ceil(max_batch as u64),
            "{n} queued checks, at most {max_batch} per call"
        );
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                (got.is_allowed(), got.remaining()),
                (want.is_allowed(), want.remaining()),
                "{name}: check {i} with max_batch {max_batch}"
            );
        }
    }
    expected
}

#[tokio::test]
async fn checks_in_flight_together_share_calls_and_get_the_decisions_of_one_call_each() {
    let server = RedisServer::start();
    // Calls of one shape (the script's path for one GCRA quota) ...
    let one_shape: Vec<_> = (0..120)
        .map(|i| {
            (
                Key::new("c", "/x", None, Some(["a", "b"][i % 2])),
                quota("50/h"),
            )
        })
        .collect();
    let expected = decided_alike_however_coalesced(&server, "one", &one_shape).await;
    for client in 0..2 {
        let left: Vec<u32> = expected
            .iter()
            .skip(client)
            .step_by(2)
            .filter(|d| d.is_allowed())
            .map(Decision::remaining)
            .collect();
        assert_eq!(left, (0..50).rev().collect::<Vec<_>>());
    }
    // ... and of several.
    let expected = decided_alike_however_coalesced(&server, "mixed", &mixed_checks()).await;
    // What the reference decided: every unit of each budget exactly once, in order.
    let allowed = |class: usize| -> Vec<u32> {
        expected
            .iter()
            .enumerate()
            .filter(|(i, d)| i % 8 == class && d.is_allowed())
            .map(|(_, d)| d.remaining())
            .collect()
    };
    let hot: Vec<u32> = expected
        .iter()
        .enumerate()
        .filter(|(i, d)| i % 8 < 4 && d.is_allowed())
        .map(|(_, d)| d.remaining())
        .collect();
    assert_eq!(hot, (0..50).rev().collect::<Vec<_>>());
    for spoilt in [4, 5] {
        assert_eq!(allowed(spoilt).len(), 5, "a spoilt state counts as absent");
    }
    assert_eq!(allowed(6), [2, 1, 0], "the fixed window's three");
    assert_eq!(allowed(7), [3, 2, 1, 0], "the sliding window's four");
}

/// Requests that become ready together, as a server's connection tasks do when one pass over
/// the sockets finds them readable, share one call. Tokio runs a task woken by the running one
/// next, so the sending task wakes as soon as the first of them queues its check, before the
/// others have run: unless it lets them run first, the first call carries that one check (a
/// call per check under a moderate load, where each call costs the service more than the
/// check itself). The tasks are spawned on the runtime's one worker, all ready before any
/// runs, as such connection tasks are. The worker's periodic look at its sockets (every
/// `event_interval` tasks) also runs a yielded task early, once in a while and never for long:
/// set beyond this test's reach, so that the count is exact.
#[test]
fn checks_of_tasks_ready_together_share_one_call() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .event_interval(u32::MAX)
        .enable_all()
        .build()
        .expect("runtime");
    let server = RedisServer::start();
    let store = runtime.block_on(connected(builder(&server.url())));
    let before = server.calls("evalsha");
    let decided = runtime
        .block_on(runtime.spawn(async move {
            let tasks: Vec<_> = (0..16)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let user = format!("u{i}");
                        let key = Key::new("ready", "/x", None, Some(user.as_str()));
                        store.check(&key, &quota("10/h"), 1).await
                    })
                })
                .collect();
            let mut decided = Vec::new();
            for task in tasks {
                decided.push(task.await.expect("task").expect("decision"));
            }
            decided
        }))
        .expect("spawner");
    assert_eq!(decided.len(), 16);
    assert!(decided.iter().all(|d| d.is_allowed() && d.remaining() == 9));
    assert_eq!(
        server.calls("evalsha") - before,
        1,
        "sixteen checks ready together, one call"
    );
}

#[tokio::test]
async fn a_check_nobody_waits_for_is_never_sent() {
    let server = RedisServer::start();
    let store = connected(builder(&server.url())).await;
    let key = Key::new("gone", "/x", None, Some("u"));
    let q = quota("1000/h");
    let checks: Vec<_> = (0..500).map(|_| (key.clone(), q.clone())).collect();
    let before = server.calls("evalsha");
    // Queued, then dropped (the requests went away) before the store could send them.
    drop(queue_all(&store, &checks));
    let next = store.check(&key, &q, 1).await.expect("decision");
    assert_eq!(next.remaining(), 999, "a dropped check was counted");
    assert_eq!(server.calls("evalsha") - before, 1);
}

/// The deadline of the paused-clock tests below.
#[cfg(feature = "paused-clock")]
const DEADLINE: Duration = Duration::from_secs(1);

/// A store of two checks per call (so that eight fill a slot's four calls) whose server is
/// frozen, and Tokio's clock paused: from here on it moves only when every task waits, straight
/// to the next timer, so when each check is answered is exact, whatever the machine's load.
/// Returns the server (frozen while it lives), the store and the moment the clock paused.
#[cfg(feature = "paused-clock")]
async fn frozen_on_a_paused_clock() -> (RedisServer, RedisStore, tokio::time::Instant) {
    let server = RedisServer::start();
    let store = connected(
        builder(&server.url())
            .timeout(DEADLINE)
            .max_batch(2)
            .breaker_threshold(1_000),
    )
    .await;
    server.pause();
    tokio::time::pause();
    (server, store, tokio::time::Instant::now())
}

/// `n` checks of one client, each awaited in a task of its own that records when it was
/// answered.
#[cfg(feature = "paused-clock")]
fn answered_when(
    store: &RedisStore,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(Result<Decision, StoreError>, tokio::time::Instant)>> {
    let checks = vec![(Key::new("frozen", "/x", None, Some("u")), quota("1000/h")); n];
    queue_all(store, &checks)
        .into_iter()
        .map(|check| tokio::spawn(async move { (check.await, tokio::time::Instant::now()) }))
        .collect()
}

/// Every one of `tasks` answered `timeout` at `due` after `started` (Tokio's timers round up
/// to the millisecond).
#[cfg(feature = "paused-clock")]
async fn all_timed_out_at(
    tasks: Vec<tokio::task::JoinHandle<(Result<Decision, StoreError>, tokio::time::Instant)>>,
    started: tokio::time::Instant,
    due: Duration,
) {
    for task in tasks {
        let (result, at) = task.await.expect("check task");
        let err = result.expect_err("decided by a frozen server");
        assert_eq!(err.kind(), StoreErrorKind::Timeout, "{err:#}");
        let waited = at - started;
        assert!(
            waited >= due && waited <= due + Duration::from_millis(1),
            "answered after {waited:?}, due at {due:?}"
        );
    }
}

/// Needs Tokio's paused clock: the `paused-clock` feature, on by default.
#[cfg(feature = "paused-clock")]
#[tokio::test]
async fn every_check_is_answered_at_its_deadline_whether_sent_or_still_waiting() {
    let (server, store, started) = frozen_on_a_paused_clock().await;
    // Eight fill the slot's four calls, and twelve wait for a call to come back: all answered
    // at the deadline, not after a call that was still to be sent could itself time out.
    all_timed_out_at(answered_when(&store, 20), started, DEADLINE).await;
    tokio::time::resume();
    server.resume();
}

/// Needs Tokio's paused clock: the `paused-clock` feature, on by default.
#[cfg(feature = "paused-clock")]
#[tokio::test]
async fn checks_queued_at_different_moments_are_each_answered_at_their_own_deadline() {
    const LATER: Duration = Duration::from_millis(400);
    let (server, store, started) = frozen_on_a_paused_clock().await;
    // Eight fill the slot's four calls; six more, 400 ms later, wait for one. The timer, set
    // for the first eight, fires, and must be set again for the six.
    let first = answered_when(&store, 8);
    tokio::time::advance(LATER).await;
    let second = answered_when(&store, 6);
    all_timed_out_at(first, started, DEADLINE).await;
    all_timed_out_at(second, started, LATER + DEADLINE).await;
    tokio::time::resume();
    server.resume();
}

/// Needs Tokio's paused clock: the `paused-clock` feature, on by default.
#[cfg(feature = "paused-clock")]
#[tokio::test]
async fn a_check_whose_deadline_passed_while_it_queued_is_answered_and_never_sent() {
    let server = RedisServer::start();
    let store = connected(
        builder(&server.url())
            .timeout(DEADLINE)
            .breaker_threshold(1_000),
    )
    .await;
    let key = Key::new("stale", "/x", None, Some("u"));
    let q = quota("1000/h");
    let before = server.calls("evalsha");
    tokio::time::pause();
    let checks = queue_all(&store, &vec![(key.clone(), q.clone()); 5]);
    // The sending task has not run yet (the test's runtime has one thread); when it does, the
    // clock has moved past every deadline.
    tokio::time::advance(DEADLINE + Duration::from_millis(1)).await;
    for check in checks {
        let err = check.await.expect_err("a check past its deadline");
        assert_eq!(err.kind(), StoreErrorKind::Timeout, "{err:#}");
    }
    tokio::time::resume();
    assert_eq!(
        server.calls("evalsha") - before,
        0,
        "a stale check was sent"
    );
    let next = store.check(&key, &q, 1).await.expect("decision");
    assert_eq!(next.remaining(), 999, "a stale check was counted");
}

#[tokio::test]
async fn a_full_queue_fails_at_once() {
    let server = RedisServer::start();
    // A breaker that stays closed: the refusals below would open the default one, and then
    // the rest would be refused by the open circuit instead of the full queue.
    let store = connected(
        builder(&server.url())
            .max_queued(10)
            .breaker_threshold(1_000),
    )
    .await;
    let key = Key::new("full", "/x", None, Some("u"));
    let q = quota("1000/h");
    let mut queued = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        let mut check = store.check(&key, &q, 1);
        match poll_once(&mut check) {
            Poll::Pending => queued.push(check),
            Poll::Ready(Err(e)) => {
                assert_eq!(e.kind(), StoreErrorKind::Unavailable, "{e}");
                assert!(format!("{e:#}").contains("max_queued"), "{e:#}");
                refused += 1;
            }
            Poll::Ready(Ok(d)) => panic!("decided without Redis: {d:?}"),
        }
    }
    assert_eq!((queued.len(), refused), (10, 90));
    let decided = all(queued).await;
    assert!(decided.iter().all(Decision::is_allowed));
}

#[tokio::test]
async fn on_a_cluster_each_call_carries_the_checks_of_one_slot() {
    let cluster = RedisCluster::start();
    let store = connected(builder(&cluster.url())).await;
    let q = quota("5/h");
    let users: Vec<String> = (0..30).map(|u| format!("user{u}")).collect();
    // Ten checks of each of 30 clients, interleaved: client after client, ten times.
    let checks: Vec<_> = (0..300)
        .map(|i| {
            (
                Key::new("c", "/x", None, Some(users[i % 30].as_str())),
                q.clone(),
            )
        })
        .collect();
    let slots: BTreeSet<u16> = users
        .iter()
        .map(|u| {
            let key = store.redis_key(&Key::new("c", "/x", None, Some(u.as_str())), &q[0]);
            tollgate_redis::fred::util::redis_keyslot(key.as_bytes())
        })
        .collect();
    let calls = || -> u64 { cluster.nodes.iter().map(|n| n.calls("evalsha")).sum() };
    let before = calls();
    let decided = all(queue_all(&store, &checks)).await;
    // No call mixed slots (the cluster would have refused it with CROSSSLOT) and every slot
    // took one.
    assert_eq!(calls() - before, slots.len() as u64);
    for user in 0..30 {
        let allowed = decided
            .iter()
            .skip(user)
            .step_by(30)
            .filter(|d| d.is_allowed())
            .count();
        assert_eq!(allowed, 5, "client {user}");
    }
}

#[tokio::test]
async fn on_a_cluster_a_stuck_slot_does_not_hold_up_the_others() {
    let cluster = RedisCluster::start();
    // Three checks per call: the twelve below fill the frozen slot's four calls.
    let store = connected(
        builder(&cluster.url())
            .timeout(Duration::from_secs(3))
            .max_batch(3),
    )
    .await;
    let q = quota("100/h");
    let slot_of = |key: &Key<'_>| {
        let name = store.redis_key(key, &q[0]);
        tollgate_redis::fred::util::redis_keyslot(name.as_bytes())
    };
    let stuck = Key::new("c", "/x", None, Some("stuck"));
    let stuck_node = cluster.owner_of(slot_of(&stuck));
    // A client whose state lives on another master.
    let free_user = (0..)
        .map(|u| format!("free{u}"))
        .find(|u| {
            let key = Key::new("c", "/x", None, Some(u.as_str()));
            cluster.owner_of(slot_of(&key)) != stuck_node
        })
        .expect("a key on another master");
    let free = Key::new("c", "/x", None, Some(free_user.as_str()));

    cluster.nodes[stuck_node].pause();
    // More checks of the frozen slot than it may have calls out: some are sent and hang, the
    // rest wait for them.
    let mut waiting = queue_all(&store, &vec![(stuck.clone(), q.clone()); 12]);
    let decided = store
        .check(&free, &q, 1)
        .await
        .expect("the other master answers");
    assert!(decided.is_allowed());
    // Decided while every check of the frozen slot still waits.
    for check in &mut waiting {
        assert!(poll_once(check).is_pending());
    }
    cluster.nodes[stuck_node].resume();
    for check in waiting {
        // Answered after the thaw or timed out meanwhile; never a wrong decision.
        if let Ok(d) = check.await {
            assert!(d.is_allowed());
        }
    }
}

#[tokio::test]
async fn every_call_is_counted_so_checks_per_call_can_be_watched() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The store registers its series when it is built: within this recorder's scope.
    let _guard = metrics::set_default_local_recorder(&recorder);
    let server = RedisServer::start();
    let store = connected(builder(&server.url()).name("counted")).await;
    let checks: Vec<_> = (0..300)
        .map(|_| (Key::new("c", "/x", None, Some("u")), quota("1000/h")))
        .collect();
    let decided = all(queue_all(&store, &checks)).await;
    assert_eq!(decided.len(), 300);
    // One snapshot (reading one drains it): each series of this store, as a number.
    let ours: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key()
                .labels()
                .any(|l| l.key() == "store" && l.value() == "counted")
        })
        .filter_map(|(key, _, _, value)| {
            let n = match value {
                DebugValue::Counter(n) => n,
                DebugValue::Histogram(v) => v.len() as u64,
                DebugValue::Gauge(_) => return None,
            };
            Some((key.key().name().to_owned(), n))
        })
        .collect();
    let counted = |name: &str| ours.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    // What the server ran (the warm-up's NOSCRIPT and its retry included) is what was counted,
    // and each check's round trip (the warm-up's too) is in the latency histogram: the two
    // give the checks per call.
    let calls = server.calls("evalsha");
    assert_eq!(counted("ratelimit_store_calls_total"), Some(calls));
    assert_eq!(counted("ratelimit_store_duration_seconds"), Some(301));
    assert_eq!(
        calls,
        2 + 5,
        "the warm-up twice, then 300 checks in calls of 64"
    );
}

/// Runs the rate-limit script through `redis-cli EVAL` in a wrapper: the script as the function
/// `call`, then `tail`, which turns its packed reply into an array redis-cli prints a number per
/// line of. The numbers go in one argument, a JSON array, as the store sends them.
fn eval_script(server: &RedisServer, tail: &str, keys: &[&str], numbers: &[&str]) -> Vec<i64> {
    let script = format!(
        "local function call()\n{}\nend\n{tail}",
        include_str!("../../crates/tollgate-redis/src/rate_limit.lua")
    );
    let n_keys = keys.len().to_string();
    let numbers = format!("[{}]", numbers.join(","));
    let mut call = vec!["eval", script.as_str(), n_keys.as_str()];
    call.extend_from_slice(keys);
    call.push(&numbers);
    let reply = server.cli(&call);
    reply
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("{reply}")))
        .collect()
}

/// A call of late checks only (one number each after the time) is still packed as an array,
/// which the store reads, not as the map cmsgpack makes of a table with a gap.
#[test]
fn a_call_of_late_checks_only_is_packed_as_an_array() {
    let server = RedisServer::start();
    // The packed reply's first byte (the MessagePack header) and its length.
    let header_and_length = "local s = call()\nreturn { string.byte(s, 1), #s }";
    // One shape (GCRA, as below), then each check: cost 1, a deadline (1 us) long past.
    let shape = ["1", "1", "0", "60000000", "60000000000"];
    for late in [1, 4] {
        let keys: Vec<String> = (0..late).map(|i| format!("late{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut numbers = shape.to_vec();
        for _ in 0..late {
            numbers.extend(["1", "1"]);
        }
        let got = eval_script(&server, header_and_length, &keys, &numbers);
        // A fixarray of the time and a -1 per check: the time is a uint64 (9 bytes), each -1 a
        // negative fixint (1 byte).
        let late = late as i64;
        assert_eq!(got, [0x90 + 1 + late, 1 + 9 + late], "{late} late checks");
    }
}

/// The script itself, called as the store calls it: a check past its deadline between two
/// others writes nothing, answers only its status, and leaves the others' replies in place, on
/// the path for one GCRA shape and on the general one.
#[test]
fn a_late_check_in_a_call_answers_only_its_status_and_writes_nothing() {
    let server = RedisServer::start();
    // The number of keys, the keys, then the numbers; the packed reply unpacked, for Redis to
    // reply it as an array.
    let eval = |args: &[&str]| -> Vec<i64> {
        let keys = args[0].parse::<usize>().expect("key count");
        let unpacked = "return cmsgpack.unpack(call())";
        eval_script(&server, unpacked, &args[1..=keys], &args[1 + keys..])
    };
    // One shape (GCRA, T = 60 s, a burst of 1000: a state lasts a minute); three checks of
    // cost 1, the middle one with a deadline long past.
    let got = eval(&[
        "3",
        "g1",
        "g2",
        "g3",
        "1",
        "1",
        "0",
        "60000000",
        "60000000000",
        "1",
        "-1",
        "1",
        "1",
        "1",
        "-1",
    ]);
    let allowed = [1, 1, 999, 60_000_000, 0, 60_000_000];
    assert!(got[0] > 1_000_000_000_000_000, "the server's time: {got:?}");
    assert_eq!(got[1..7], allowed);
    assert_eq!(got[7], -1);
    assert_eq!(got[8..], allowed);
    // Two shapes (that GCRA quota; a fixed window of 5 a minute): the late check is the
    // window's, and names its shape and offset like the others.
    let got = eval(&[
        "3",
        "w1",
        "w2",
        "w3",
        "2",
        "1",
        "0",
        "60000000",
        "60000000000",
        "1",
        "1",
        "60000",
        "5",
        "1",
        "1",
        "-1",
        "2",
        "1",
        "1",
        "0",
        "2",
        "2",
        "-1",
        "0",
    ]);
    assert_eq!(got[1..7], allowed);
    assert_eq!(got[7], -1);
    assert_eq!(
        got[8..11],
        [1, 1, 3],
        "allowed, with 3 of 5 left after a cost of 2"
    );
    assert_eq!(got.len(), 14);
    assert_eq!(server.cli(&["exists", "g2", "w2"]), "0");
    assert_eq!(server.cli(&["exists", "g1", "g3", "w1", "w3"]), "4");
}
