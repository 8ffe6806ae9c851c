//! Why tollgate exists: four instances of the demo behind a (round-robin) client share one
//! Redis, and together allow exactly what one instance alone allows: 5 of 30, not 20.

use tollgate_tests::Demo;
use tollgate_tests::redis::{RedisCluster, RedisServer};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

async fn thirty_round_robin(instances: &[Demo]) -> Vec<u16> {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut statuses = Vec::new();
    for i in 0..30 {
        let demo = &instances[i % instances.len()];
        let res = client.get(demo.url("/hello")).send().await.unwrap();
        // A response without RateLimit headers was let through undecided (fail open), which
        // would make the count meaningless.
        assert!(
            res.headers().contains_key("ratelimit"),
            "request {i} was not decided by the store: {:?}\n{}",
            res.headers(),
            demo.log().join("\n")
        );
        statuses.push(res.status().as_u16());
    }
    statuses
}

fn assert_exactly_five(statuses: &[u16]) {
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((allowed, limited), (5, 25), "{statuses:?}");
    // The first five pass, whichever instance they hit.
    assert_eq!(&statuses[..5], &[200; 5]);
}

#[tokio::test]
async fn four_instances_on_one_redis_allow_what_one_instance_allows() {
    let server = RedisServer::start();
    let url = server.url();
    let instances: Vec<Demo> = (0..4)
        // A deadline no slow moment reaches: an undecided request would spoil the count.
        .map(|_| Demo::start(DEMO, &["--redis", &url, "--redis-timeout", "5000"]))
        .collect();
    assert_exactly_five(&thirty_round_robin(&instances).await);
}

#[tokio::test]
async fn four_instances_on_a_three_master_cluster_allow_what_one_instance_allows() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let instances: Vec<Demo> = (0..4)
        // A deadline no slow moment reaches: an undecided request would spoil the count.
        .map(|_| Demo::start(DEMO, &["--redis", &url, "--redis-timeout", "5000"]))
        .collect();
    assert_exactly_five(&thirty_round_robin(&instances).await);
}

#[tokio::test]
async fn four_instances_with_memory_stores_let_four_times_through() {
    // The problem being solved, measured: per-process state multiplies the limit.
    let instances: Vec<Demo> = (0..4).map(|_| Demo::start(DEMO, &[])).collect();
    let statuses = thirty_round_robin(&instances).await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        20,
        "{statuses:?}"
    );
}

/// The demo's policies for the load runs: long periods, so the counts cannot depend on how
/// fast the machine is, and no fixed window (whose turnover could fall inside the run; the
/// store-level concurrency tests cover it with a test clock).
const LOAD_CONFIG: &str = "\
[[policy]]
name = \"hello\"
route = \"/hello\"
quota = \"60/h sliding-window\"

[[policy]]
name = \"export\"
route = \"/export\"
method = \"GET\"
quota = [\"70/h\", \"50/h sliding-window\"]
";

/// Runs `wrk` against every instance at once, on `path`, for 2 s each; returns the number of
/// responses wrk counted.
fn wrk_all(instances: &[Demo], path: &str) -> u64 {
    let wrk = tollgate_tests::require_program("wrk", "wrk");
    let runs: Vec<_> = instances
        .iter()
        .map(|demo| {
            std::process::Command::new(&wrk)
                .args(["-t1", "-c8", "-d2s", "--timeout", "10s", &demo.url(path)])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start wrk")
        })
        .collect();
    let mut total = 0;
    for run in runs {
        let out = run.wait_with_output().expect("wrk");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "wrk failed: {text}");
        total += text
            .lines()
            .find_map(|l| l.trim().split_once(" requests in "))
            .and_then(|(n, _)| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    }
    total
}

/// The sum over every instance of a counter's samples with these labels.
async fn sum_over(instances: &[Demo], name: &str, labels: &[(&str, &str)]) -> f64 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut sum = 0.0;
    for demo in instances {
        let body = demo.metrics(&client).await;
        sum += tollgate_tests::metric_sum(&body, name, labels);
    }
    sum
}

/// `ratelimit_requests_total{policy, decision}` summed over every instance.
async fn decided(instances: &[Demo], policy: &str, decision: &str) -> f64 {
    sum_over(
        instances,
        "ratelimit_requests_total",
        &[("policy", policy), ("decision", decision)],
    )
    .await
}

/// Three demo processes on `url` under wrk: exactly the allowed count passes, for a sliding
/// window and a two-quota policy, and every request was decided.
async fn exact_under_load(url: &str) {
    let config = tollgate_tests::config_file(LOAD_CONFIG);
    let path = config.path().to_str().unwrap();
    // A deadline no slow moment of a loaded 2-core machine reaches: this test is about
    // exactness, not about the deadline.
    let instances: Vec<Demo> = (0..3)
        .map(|_| {
            Demo::start(
                DEMO,
                &["--redis", url, "--redis-timeout", "5000", "--config", path],
            )
        })
        .collect();
    for (route, policy, allowed) in [("/hello", "hello", 60.0), ("/export", "export", 50.0)] {
        let sent = wrk_all(&instances, route) as f64;
        assert_eq!(
            decided(&instances, policy, "allowed").await,
            allowed,
            "{route}: {sent} requests"
        );
        assert_eq!(
            decided(&instances, policy, "fail_open").await,
            0.0,
            "{route}"
        );
        // wrk may leave its last requests unanswered when its time is up; every request the
        // instances answered was decided.
        let limited = decided(&instances, policy, "limited").await;
        assert!(
            allowed + limited >= sent,
            "{route}: {allowed} + {limited} < {sent}"
        );
        assert!(
            sent > allowed * 3.0,
            "{route}: only {sent} requests: not a load"
        );
    }
}

#[tokio::test]
async fn three_instances_under_load_on_one_redis_allow_exactly_the_limit() {
    let server = RedisServer::start();
    exact_under_load(&server.url()).await;
}

#[tokio::test]
async fn three_instances_under_load_on_a_cluster_allow_exactly_the_limit() {
    let cluster = RedisCluster::start();
    exact_under_load(&cluster.url()).await;
}
