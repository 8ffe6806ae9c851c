//! Real faults under real load: Redis killed, frozen, restarted, absent at start-up, and the
//! local fallback. The demo runs as a process with `--redis`; clients are real HTTP clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tollgate_tests::redis::{RedisServer, free_port};
use tollgate_tests::{Demo, http_client, metric_sum};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");
/// The demo's Redis deadline in the tests about the deadline (a frozen server).
const DEADLINE_MS: u64 = 300;
/// The deadline in the others: long enough that a slow moment of a busy machine is never
/// mistaken for the fault under test (a dead or absent server fails at once anyway).
const LONG_DEADLINE_MS: u64 = 5_000;

fn demo_on(url: &str, extra: &[&str]) -> Demo {
    demo_with_deadline(url, LONG_DEADLINE_MS, extra)
}

fn demo_with_deadline(url: &str, deadline_ms: u64, extra: &[&str]) -> Demo {
    let deadline = deadline_ms.to_string();
    let mut args = vec!["--redis", url, "--redis-timeout", &deadline];
    args.extend_from_slice(extra);
    Demo::start(DEMO, &args)
}

/// What the client saw of one response.
#[derive(Debug, Clone, Copy)]
struct Seen {
    status: u16,
    /// The response carried RateLimit headers: a store (shared or fallback) decided it.
    decided: bool,
}

async fn get(client: &reqwest::Client, demo: &Demo, path: &str) -> Seen {
    let res = client.get(demo.url(path)).send().await.expect("response");
    Seen {
        status: res.status().as_u16(),
        decided: res.headers().contains_key("ratelimit"),
    }
}

/// Sum of every sample of `name` whose labels include all of `labels`.
async fn metric(client: &reqwest::Client, demo: &Demo, name: &str, labels: &[(&str, &str)]) -> f64 {
    let body = demo.metrics(client).await;
    metric_sum(&body, name, labels)
}

/// Sends requests until one is decided by the store again (at most 20 s), and returns every
/// response from that one on, `n` in all.
async fn until_decided(client: &reqwest::Client, demo: &Demo, n: usize) -> Vec<Seen> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = get(client, demo, "/hello").await;
        if seen.decided {
            let mut out = vec![seen];
            for _ in 1..n {
                out.push(get(client, demo, "/hello").await);
            }
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "limiting did not resume: {seen:?}\n{}",
            demo.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn statuses(seen: &[Seen]) -> Vec<u16> {
    seen.iter().map(|s| s.status).collect()
}

#[tokio::test]
async fn redis_killed_mid_load_fails_open_and_counts_every_undecided_request() {
    let mut server = RedisServer::start();
    // Each request comes from its own client (through a trusted proxy), so none is refused
    // before the kill and none can be answered from the deny cache after it.
    let demo = demo_on(&server.url(), &["--trusted-proxy", "127.0.0.1/32"]);
    let client = http_client();
    let fail_open_before = metric(
        &client,
        &demo,
        "ratelimit_fail_open_total",
        &[("policy", "hello")],
    )
    .await;
    assert_eq!(fail_open_before, 0.0);

    // Six concurrent clients, 100 requests each; Redis dies after the 150th response.
    let done = Arc::new(AtomicUsize::new(0));
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let kill_tx = Arc::new(std::sync::Mutex::new(Some(kill_tx)));
    let mut tasks = Vec::new();
    for t in 0..6u8 {
        let client = client.clone();
        let url = demo.url("/hello");
        let done = Arc::clone(&done);
        let kill_tx = Arc::clone(&kill_tx);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..100u8 {
                let res = client
                    .get(&url)
                    .header("x-forwarded-for", format!("198.51.{t}.{i}"))
                    .send()
                    .await
                    .expect("response");
                seen.push((
                    res.status().as_u16(),
                    res.headers().contains_key("ratelimit"),
                ));
                if done.fetch_add(1, Ordering::SeqCst) + 1 == 150
                    && let Some(tx) = kill_tx.lock().unwrap().take()
                {
                    let _ = tx.send(());
                }
            }
            seen
        }));
    }
    kill_rx.await.unwrap();
    server.stop();
    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.unwrap());
    }
    assert_eq!(seen.len(), 600);
    // Every request was answered: 200 or 429, never a 5xx.
    assert!(seen.iter().all(|&(s, _)| s == 200 || s == 429), "{seen:?}");
    // Undecided requests are exactly the 200s without RateLimit headers...
    let undecided = seen.iter().filter(|&&(_, decided)| !decided).count();
    assert!(seen.iter().filter(|&&(_, d)| !d).all(|&(s, _)| s == 200));
    assert!(
        undecided > 0,
        "Redis was killed but every request was decided"
    );
    // ...and the counter says the same, to the request.
    let fail_open = metric(
        &client,
        &demo,
        "ratelimit_fail_open_total",
        &[("policy", "hello")],
    )
    .await;
    assert_eq!(fail_open, undecided as f64);
    let by_decision = metric(
        &client,
        &demo,
        "ratelimit_requests_total",
        &[("policy", "hello"), ("decision", "fail_open")],
    )
    .await;
    assert_eq!(by_decision, undecided as f64);

    // The fail-closed route refuses while Redis is down.
    let res = client.post(demo.url("/login")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    // The store says it is degraded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&client, &demo, "ratelimit_store_degraded", &[]).await != 1.0 {
        assert!(Instant::now() < deadline, "degraded gauge never rose");
        get(&client, &demo, "/hello").await;
    }
    // The log says so once, not once per request.
    let degraded_lines = demo
        .log()
        .iter()
        .filter(|l| l.contains("rate-limit-degraded"))
        .count();
    assert!(
        (1..=6).contains(&degraded_lines),
        "{degraded_lines} degraded lines for {undecided} undecided requests"
    );
}

#[tokio::test]
async fn a_frozen_redis_costs_at_most_the_deadline_then_nothing() {
    let server = RedisServer::start();
    let demo = demo_with_deadline(&server.url(), DEADLINE_MS, &[]);
    let client = http_client();
    assert!(get(&client, &demo, "/hello").await.decided);

    server.pause();
    let frozen_at = Instant::now();
    // Sent while Redis is frozen: without a deadline these would hang until it thawed, which is
    // FREEZE from now.
    let mut seen = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let started = Instant::now();
        seen.push(get(&client, &demo, "/hello").await);
        slowest = slowest.max(started.elapsed());
    }
    let timeouts = metric(
        &client,
        &demo,
        "ratelimit_fail_open_total",
        &[("policy", "hello"), ("reason", "timeout")],
    )
    .await;
    let circuit_open = metric(
        &client,
        &demo,
        "ratelimit_fail_open_total",
        &[("policy", "hello"), ("reason", "circuit_open")],
    )
    .await;
    let degraded_while_frozen = metric(&client, &demo, "ratelimit_store_degraded", &[]).await;
    // Keep it frozen long enough that a request waiting for the thaw could not pass for one
    // that waited the deadline.
    const FREEZE: Duration = Duration::from_secs(6);
    tokio::time::sleep(FREEZE.saturating_sub(frozen_at.elapsed())).await;
    server.resume();
    // No request waited for the thaw: the slowest took about the deadline (with two seconds of
    // slack for a busy machine), far from the six seconds of the freeze.
    assert!(
        slowest < Duration::from_millis(DEADLINE_MS) + Duration::from_secs(2),
        "a request took {slowest:?} while Redis was frozen"
    );

    assert!(
        seen.iter().all(|s| s.status == 200 && !s.decided),
        "{seen:?}"
    );
    // Each request waited for Redis at most its deadline: 5 of them timed out (the breaker's
    // threshold), and every later one was answered at once, without asking Redis (circuit
    // open). None waited for the thaw: they were all answered while Redis was frozen.
    assert_eq!(timeouts, 5.0);
    assert_eq!(circuit_open, 25.0);
    // While frozen the store said it was degraded.
    assert_eq!(degraded_while_frozen, 1.0);

    // Thawed: limiting comes back by itself, the breaker closes (the gauge falls back to 0),
    // and the recovery is logged once.
    let after = until_decided(&client, &demo, 1).await;
    assert!(after[0].decided);
    assert_eq!(
        metric(&client, &demo, "ratelimit_store_degraded", &[]).await,
        0.0
    );
    let recovered = demo
        .log()
        .iter()
        .filter(|l| l.contains("rate-limit-recovered"))
        .count();
    assert_eq!(recovered, 1, "{:#?}", demo.log());
}

#[tokio::test]
async fn a_restarted_redis_resumes_limiting_without_restarting_the_service() {
    let mut server = RedisServer::start();
    let demo = demo_on(&server.url(), &[]);
    let client = http_client();
    let mut before = Vec::new();
    for _ in 0..6 {
        before.push(get(&client, &demo, "/hello").await);
    }
    assert_eq!(statuses(&before), [200, 200, 200, 200, 200, 429]);

    server.restart();
    // Empty data and an empty script cache. Until the wait Redis gave runs out, the deny cache
    // still refuses this client (it never allows what Redis refused); then the fresh Redis
    // decides, and the client has a whole new budget: 5, then a refusal.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let seen = get(&client, &demo, "/hello").await;
        if seen.decided && seen.status == 200 {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "limiting did not resume: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut after = vec![first];
    for _ in 0..5 {
        after.push(get(&client, &demo, "/hello").await);
    }
    assert!(after.iter().all(|s| s.decided), "{after:?}");
    assert_eq!(statuses(&after), [200, 200, 200, 200, 200, 429]);
}

#[tokio::test]
async fn redis_absent_at_start_up_and_appearing_later() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let demo = demo_on(&url, &["--redis-connect-wait", "200"]);
    let client = http_client();
    // The service is up and answering without Redis: fail open on /hello, closed on /login.
    for _ in 0..8 {
        let seen = get(&client, &demo, "/hello").await;
        assert_eq!((seen.status, seen.decided), (200, false));
    }
    // Each failed at once for want of a connection, without waiting out the (5 s) deadline:
    // none is counted as a timeout.
    let exposition = demo.metrics(&client).await;
    let by_reason = |reason| {
        metric_sum(
            &exposition,
            "ratelimit_fail_open_total",
            &[("policy", "hello"), ("reason", reason)],
        )
    };
    assert_eq!(by_reason("timeout"), 0.0);
    // Counted as refused connections once the store has seen why it cannot connect (as
    // unavailable before that), then as circuit_open once the breaker opens.
    assert_eq!(
        by_reason("connection_refused") + by_reason("unavailable") + by_reason("circuit_open"),
        8.0
    );
    assert_eq!(
        client
            .post(demo.url("/login"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );

    let _server = RedisServer::start_on(port);
    let after = until_decided(&client, &demo, 6).await;
    assert_eq!(statuses(&after), [200, 200, 200, 200, 200, 429]);
    assert_eq!(
        client
            .post(demo.url("/login"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn with_the_local_fallback_one_instance_still_refuses_past_its_limit() {
    let mut server = RedisServer::start();
    // The short deadline: while the client reconnects to the dead server, calls wait for it
    // before the fallback decides, and requests 5 s apart would each find a refilled budget.
    let demo = demo_with_deadline(&server.url(), DEADLINE_MS, &["--redis-fallback"]);
    let client = http_client();
    assert!(get(&client, &demo, "/hello").await.decided);
    server.stop();

    let mut seen = Vec::new();
    for _ in 0..8 {
        seen.push(get(&client, &demo, "/hello").await);
    }
    // Decided locally: the fallback store starts fresh, 5 pass, then 429s.
    assert!(seen.iter().all(|s| s.decided), "{seen:?}");
    assert_eq!(statuses(&seen), [200, 200, 200, 200, 200, 429, 429, 429]);
    let fallback = metric(
        &client,
        &demo,
        "ratelimit_fallback_total",
        &[("policy", "hello")],
    )
    .await;
    assert_eq!(fallback, 8.0);
    let fail_open = metric(
        &client,
        &demo,
        "ratelimit_fail_open_total",
        &[("policy", "hello")],
    )
    .await;
    assert_eq!(fail_open, 0.0);
    // Login is decided by the fallback too, not refused.
    assert_eq!(
        client
            .post(demo.url("/login"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

async fn login(client: &reqwest::Client, demo: &Demo) -> u16 {
    client
        .post(demo.url("/login"))
        .send()
        .await
        .expect("response")
        .status()
        .as_u16()
}

/// Waits until the demo's store answers again (a decided `/hello`), at most 20 s.
async fn until_redis_decides(client: &reqwest::Client, demo: &Demo) {
    let _ = until_decided(client, demo, 1).await;
}

#[tokio::test]
async fn a_login_refused_while_redis_was_frozen_costs_the_client_nothing() {
    // The reproduction: Redis frozen, two logins answered 503 (fail closed), and after the
    // thaw the client's second real login got 429 under 3/min, because the queued scripts ran
    // late and spent the budget.
    let server = RedisServer::start();
    let demo = demo_with_deadline(&server.url(), DEADLINE_MS, &[]);
    let client = http_client();
    until_redis_decides(&client, &demo).await;

    server.pause();
    assert_eq!(login(&client, &demo).await, 503);
    assert_eq!(login(&client, &demo).await, 503);
    tokio::time::sleep(Duration::from_millis(DEADLINE_MS)).await;
    server.resume();
    until_redis_decides(&client, &demo).await;
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(login(&client, &demo).await);
    }
    assert_eq!(after, [200, 200, 200, 429]);
}

#[tokio::test]
async fn a_fallback_decision_is_not_spent_again_in_redis() {
    let server = RedisServer::start();
    let demo = demo_with_deadline(&server.url(), DEADLINE_MS, &["--redis-fallback"]);
    let client = http_client();
    until_redis_decides(&client, &demo).await;

    server.pause();
    // Decided locally while Redis is frozen; the scripts sent first still sit in its socket.
    assert_eq!(login(&client, &demo).await, 200);
    assert_eq!(login(&client, &demo).await, 200);
    tokio::time::sleep(Duration::from_millis(DEADLINE_MS)).await;
    server.resume();
    until_redis_decides(&client, &demo).await;
    let fallback = metric(
        &client,
        &demo,
        "ratelimit_fallback_total",
        &[("policy", "login")],
    )
    .await;
    assert_eq!(fallback, 2.0);
    // Redis never counted those two: its whole budget is there.
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(login(&client, &demo).await);
    }
    assert_eq!(after, [200, 200, 200, 429]);
}
