//! Concurrency limits across instances, with real processes and a real Redis: never more than
//! N in flight at the upstream, and a killed instance's slots come back after the lease.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use tollgate_tests::Demo;
use tollgate_tests::redis::RedisServer;

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

/// A slow upstream that counts requests in flight exactly (and the most at once). wiremock's
/// delay runs after its responder, so it cannot see when a request ends; this can.
struct Upstream {
    url: String,
    max_in_flight: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn upstream(delay: Duration) -> Upstream {
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (n, m, s) = (Arc::clone(&now), Arc::clone(&max), Arc::clone(&served));
    let app = Router::new().route(
        "/report",
        get(move || {
            let (n, m, s) = (Arc::clone(&n), Arc::clone(&m), Arc::clone(&s));
            async move {
                let in_flight = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(in_flight, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                n.fetch_sub(1, Ordering::SeqCst);
                s.fetch_add(1, Ordering::SeqCst);
                "report\n"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Upstream {
        url: format!("http://{addr}"),
        max_in_flight: max,
        served,
        task,
    }
}

#[tokio::test]
async fn many_clients_on_three_instances_never_exceed_n_in_flight_upstream() {
    let server = RedisServer::start();
    let up = upstream(Duration::from_millis(250)).await;
    // A deadline no slow moment reaches: a timeout would fail open and run a report without a
    // slot, which is not what this test is about.
    let args = [
        "--redis",
        &server.url(),
        "--redis-timeout",
        "5000",
        "--upstream",
        &up.url,
        "--report-concurrency",
        "2",
    ];
    let instances: Vec<Demo> = (0..3).map(|_| Demo::start(DEMO, &args)).collect();
    let urls: Vec<String> = instances.iter().map(|d| d.url("/report")).collect();

    // Twelve concurrent clients (one client IP, so one key), four requests each, spread over
    // the instances.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut tasks = Vec::new();
    for c in 0..12 {
        let client = client.clone();
        let urls = urls.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..4 {
                let url = &urls[(c + i) % urls.len()];
                statuses.push(client.get(url).send().await.unwrap().status().as_u16());
            }
            statuses
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.extend(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert!(ok >= 2 && statuses.contains(&429), "{statuses:?}");
    assert!(
        up.max_in_flight.load(Ordering::SeqCst) <= 2,
        "{} in flight at once",
        up.max_in_flight.load(Ordering::SeqCst)
    );
    assert_eq!(up.served.load(Ordering::SeqCst), ok);
    // Every slot was given back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.cli(&["eval", "return #redis.call('keys', '*inflight')", "0"]) != "0" {
        assert!(
            Instant::now() < deadline,
            "slots still held: {}",
            server.cli(&["keys", "*"])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    up.task.abort();
}

#[tokio::test]
async fn a_killed_instance_slots_come_back_after_the_lease() {
    let server = RedisServer::start();
    // Reports that take longer than the test: only the lease can free their slots.
    let up = upstream(Duration::from_secs(20)).await;
    let args = [
        "--redis",
        &server.url(),
        "--redis-timeout",
        "5000",
        "--upstream",
        &up.url,
        "--report-concurrency",
        "2",
        "--lease-ms",
        "1500",
    ];
    let doomed = Demo::start(DEMO, &args);
    let survivor = Demo::start(DEMO, &args);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    // Two requests take both slots on the doomed instance.
    for _ in 0..2 {
        let c = client.clone();
        let url = doomed.url("/report");
        tokio::spawn(async move { c.get(url).send().await });
    }
    let leases = || {
        server.cli(&["eval", "local k = redis.call('keys', '*inflight') if #k == 0 then return 0 end return redis.call('zcard', k[1])", "0"])
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leases() != "2" {
        assert!(Instant::now() < deadline, "slots never taken: {}", leases());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The leases are renewed while the requests run: their expiry moves forward.
    let expiries = || {
        server.cli(&["eval", "local k = redis.call('keys', '*inflight') return redis.call('zrange', k[1], 0, -1, 'WITHSCORES')", "0"])
    };
    let before = expiries();
    let deadline = Instant::now() + Duration::from_secs(10);
    while expiries() == before {
        assert!(Instant::now() < deadline, "leases never renewed: {before}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leases(), "2");

    // The instance dies holding them; nothing releases them.
    drop(doomed);
    let refused = client.get(survivor.url("/report")).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");

    // After at most one lease time they expire and the survivor can take a slot.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // An acquired request waits on the slow upstream: the client gives up, which also
        // gives the slot back.
        match client
            .get(survivor.url("/report"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            Ok(res) if res.status() == 429 => {}
            Err(e) if e.is_timeout() => break,
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the dead instance's slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    up.task.abort();
}
