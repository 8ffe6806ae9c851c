//! Scraped for real: a real Prometheus server scrapes the Redis-backed demo every second. Redis
//! is killed under load, and Prometheus's own HTTP API must report `ratelimit_fail_open_total`
//! equal to the number of responses let through without a decision, and answer every query of
//! the shipped dashboard.

use std::time::{Duration, Instant};

use tollgate_tests::prometheus::Prometheus;
use tollgate_tests::redis::RedisServer;
use tollgate_tests::{Demo, as_prometheus_sees_it, dashboard_queries, http_client};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

/// Polls `expr` until it equals `want` (at most 30 s, several scrapes); returns the last value.
async fn settle(prom: &Prometheus, client: &reqwest::Client, expr: &str, want: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = prom.scalar(client, expr).await;
        if got == Some(want) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn prometheus_counts_every_request_let_through_undecided() {
    let mut redis = RedisServer::start();
    let demo = Demo::start(
        DEMO,
        &[
            "--redis",
            &redis.url(),
            "--redis-timeout",
            "5000",
            "--trusted-proxy",
            "127.0.0.1/32",
        ],
    );
    let prom = Prometheus::start("demo", &[demo.addr.to_string()]);
    let client = http_client();
    let fail_open = r#"sum(ratelimit_fail_open_total{job="demo", policy="hello"})"#;

    // Registered at zero before the first failure, so an alert on it works from the start.
    assert_eq!(
        settle(&prom, &client, r#"up{job="demo"}"#, 1.0).await,
        Some(1.0),
        "Prometheus cannot scrape the demo"
    );
    assert_eq!(settle(&prom, &client, fail_open, 0.0).await, Some(0.0));

    // 100 requests decided by Redis, then Redis dies, then 100 more. Each request comes from
    // its own client (through the trusted proxy), so none is refused and none can be answered
    // from the deny cache.
    let mut undecided = 0usize;
    let mut decided = 0usize;
    for i in 0..200u32 {
        if i == 100 {
            redis.stop();
        }
        let res = client
            .get(demo.url("/hello"))
            .header("x-forwarded-for", format!("198.51.{}.{}", i / 250, i % 250))
            .send()
            .await
            .expect("response");
        assert_eq!(res.status(), 200, "request {i}");
        if res.headers().contains_key("ratelimit") {
            decided += 1;
        } else {
            undecided += 1;
        }
    }
    assert_eq!(decided, 100, "every request before the kill was decided");
    assert_eq!(undecided, 100, "no request after the kill was decided");

    // What Prometheus scraped says the same, to the request.
    let scraped = settle(&prom, &client, fail_open, undecided as f64).await;
    assert_eq!(scraped, Some(undecided as f64), "{}", demo.log().join("\n"));
    let by_decision =
        r#"sum(ratelimit_requests_total{job="demo", policy="hello", decision="fail_open"})"#;
    assert_eq!(
        settle(&prom, &client, by_decision, undecided as f64).await,
        Some(undecided as f64)
    );
    let allowed =
        r#"sum(ratelimit_requests_total{job="demo", policy="hello", decision="allowed"})"#;
    assert_eq!(
        settle(&prom, &client, allowed, decided as f64).await,
        Some(decided as f64)
    );

    // Every query of the dashboard runs on the real series; those that read what this run
    // produced (decisions, fail-open, store latency, errors and calls, the degraded gauge) have
    // data.
    for q in dashboard_queries() {
        let expr = as_prometheus_sees_it(&q);
        let answer = prom.query(&client, &expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        let reads_this_run = [
            "ratelimit_requests_total",
            "ratelimit_fail_open_total",
            "ratelimit_store_duration_seconds",
            "ratelimit_store_errors_total",
            "ratelimit_store_degraded",
            "ratelimit_store_calls_total",
        ]
        .iter()
        .any(|name| expr.contains(name));
        if reads_this_run {
            let result = answer["data"]["result"].as_array().expect("a result list");
            assert!(!result.is_empty(), "{expr} has no data: {answer}");
        }
    }
}
