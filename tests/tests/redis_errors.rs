//! Connection errors that name their cause, against real servers: a refused password, a
//! missing one, an unknown user, nothing listening, a name that does not resolve, an untrusted
//! certificate, a certificate for another name, TLS spoken to a plaintext port. Each says what
//! to fix, counts under its own reason, is logged once rather than per retry, and never shows
//! the password.

use std::time::{Duration, Instant};

use tollgate::{Key, Quota, Store};
use tollgate_redis::{RedisStore, RedisStoreBuilder, RedisTls};
use tollgate_tests::redis::RedisServer;
use tollgate_tests::tls::{Ca, TlsRedis};
use tollgate_tests::{Demo, metric_sum};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

/// What a store on `builder` says when it cannot connect: `wait_connected`'s error, and the
/// reason a request fails under.
async fn what_it_says(builder: RedisStoreBuilder) -> (String, &'static str) {
    let store = builder
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_millis(300))
        .build()
        .expect("build");
    let err = store
        .wait_connected(Duration::from_secs(3))
        .await
        .expect_err("cannot connect");
    let key = Key::new("p", "/r", None, Some("u"));
    let quota = ["5/s".parse::<Quota>().unwrap()];
    let failed = store.check(&key, &quota, 1).await.expect_err("no decision");
    (err.to_string(), failed.kind().reason())
}

fn builder(url: &str) -> RedisStoreBuilder {
    RedisStore::builder(url).expect("url")
}

#[tokio::test]
async fn credentials_refused_or_missing_are_named() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "requirepass", "right"]);
    let url = |auth: &str| format!("redis://{auth}127.0.0.1:{}", server.port);

    let (says, reason) = what_it_says(builder(&url(":wrong@"))).await;
    assert!(
        says.contains("WRONGPASS") && says.contains("check the credentials"),
        "{says}"
    );
    assert_eq!(reason, "auth");
    let (says, reason) = what_it_says(builder(&url("nobody:right@"))).await;
    assert!(says.contains("WRONGPASS"), "{says}");
    assert_eq!(reason, "auth");
    let (says, reason) = what_it_says(builder(&url(""))).await;
    assert!(
        says.contains("NOAUTH") && says.contains("put it in the URL"),
        "{says}"
    );
    assert_eq!(reason, "auth");
}

#[tokio::test]
async fn nothing_listening_and_an_unknown_name_are_named() {
    // A port nothing listens on: a server started and stopped.
    let mut gone = RedisServer::start();
    let port = gone.port;
    gone.stop();
    let (says, reason) = what_it_says(builder(&format!("redis://127.0.0.1:{port}"))).await;
    assert!(says.contains("connection refused"), "{says}");
    assert_eq!(reason, "connection_refused");

    let (says, reason) = what_it_says(builder("redis://no-such-host.invalid:6380")).await;
    assert!(says.contains("does not resolve"), "{says}");
    assert_eq!(reason, "dns");
}

#[tokio::test]
async fn failed_tls_handshakes_are_named() {
    let ca = Ca::new("tollgate test CA");
    let server = ca.issue("server", &["127.0.0.1"]);
    let tls = TlsRedis::start(&ca.pem_file(), &server, false, None, &[]);
    let tls_url = format!("rediss://127.0.0.1:{}", tls.port);

    // The system's roots do not know the private CA.
    let (says, reason) = what_it_says(builder(&tls_url)).await;
    assert!(
        says.contains("not signed by a trusted CA") && says.contains("tls_ca_file"),
        "{says}"
    );
    assert_eq!(reason, "tls");

    // A certificate for another name.
    let other = ca.issue("other", &["redis.other.example"]);
    let misnamed = TlsRedis::start(&ca.pem_file(), &other, false, None, &[]);
    let url = format!("rediss://127.0.0.1:{}", misnamed.port);
    let (says, reason) =
        what_it_says(builder(&url).tls(RedisTls::new().with_ca_pem(&ca.pem))).await;
    assert!(says.contains("not valid for the URL's host"), "{says}");
    assert_eq!(reason, "tls");

    // TLS spoken to a plaintext port.
    let plain = RedisServer::start();
    let url = format!("rediss://127.0.0.1:{}", plain.port);
    let (says, reason) =
        what_it_says(builder(&url).tls(RedisTls::new().with_ca_pem(&ca.pem))).await;
    assert!(says.contains("plaintext"), "{says}");
    assert_eq!(reason, "tls");
}

/// The demo on a server that refuses its password: one log line naming the cause and the fix
/// however many retries there are, requests counted under `auth`, and the password nowhere.
#[tokio::test]
async fn the_demo_says_once_that_its_password_is_refused_and_never_shows_it() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "requirepass", "right"]);
    // A password with '/' and '+', percent-encoded as a URL needs.
    let url = format!("redis://tollgate:s3cr%2Ft%2Bpw@127.0.0.1:{}", server.port);
    let demo = Demo::start(
        DEMO,
        &[
            "--redis",
            &url,
            "--redis-timeout",
            "300",
            "--redis-connect-wait",
            "500",
        ],
    );
    let http = tollgate_tests::http_client();
    // Fewer requests than the breaker's threshold, so each reaches the store.
    for _ in 0..3 {
        let res = http.get(demo.url("/hello")).send().await.unwrap();
        assert_eq!(res.status(), 200, "fail open");
    }
    // Let fred retry several times (it reconnects within 2 s).
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = demo.metrics(&http).await;
    let log = demo.log();
    let named: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("rate-limit-store-connection") && l.contains("WRONGPASS"))
        .collect();
    assert_eq!(
        named.len(),
        1,
        "one line, not one per retry:\n{}",
        log.join("\n")
    );
    assert!(named[0].contains("check the credentials"), "{}", named[0]);
    assert!(
        metric_sum(
            &metrics,
            "ratelimit_store_errors_total",
            &[("reason", "auth")]
        ) >= 2.0,
        "every failed attempt counts under auth"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "ratelimit_fail_open_total",
            &[("policy", "hello"), ("reason", "auth")]
        ),
        3.0
    );
    for secret in ["s3cr", "%2Bpw", "+pw"] {
        for line in &log {
            assert!(!line.contains(secret), "the password is in the log: {line}");
        }
        assert!(!metrics.contains(secret), "the password is in the metrics");
    }
}
