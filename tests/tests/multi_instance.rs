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
        .map(|_| Demo::start(DEMO, &["--redis", &url]))
        .collect();
    assert_exactly_five(&thirty_round_robin(&instances).await);
}

#[tokio::test]
async fn four_instances_on_a_three_master_cluster_allow_what_one_instance_allows() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    let instances: Vec<Demo> = (0..4)
        .map(|_| Demo::start(DEMO, &["--redis", &url]))
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
