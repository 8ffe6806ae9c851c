//! Policies from the demo's configuration file, end to end: two limits on one route, shadow
//! mode, and start-up refusing a configuration that names a route the demo does not have.

use tollgate_tests::{Demo, config_file, metric_sum, refused_config};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn metric(demo: &Demo, labels: &[(&str, &str)]) -> f64 {
    let body = demo.metrics(&client()).await;
    metric_sum(&body, "ratelimit_requests_total", labels)
}

#[tokio::test]
async fn export_has_a_burst_limit_and_a_sustained_one() {
    let demo = Demo::start(DEMO, &[]);
    let client = client();
    let first = client.get(demo.url("/export")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(
        first.headers()["ratelimit-policy"],
        "\"export-1\";q=2;w=1, \"export-2\";q=20;w=60"
    );
    assert_eq!(
        first.headers()["ratelimit"],
        "\"export-1\";r=1;t=1, \"export-2\";r=19;t=3"
    );
    let second = client.get(demo.url("/export")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    // The burst limit refuses the third at once; Retry-After follows the refusing limit.
    let third = client.get(demo.url("/export")).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
}

#[tokio::test]
async fn a_shadow_policy_lets_everything_through_and_counts_what_it_would_refuse() {
    let file = config_file(
        "[[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"3/m\"\nshadow = true\n",
    );
    let demo = Demo::start(DEMO, &["--config", file.path().to_str().unwrap()]);
    let client = client();
    for _ in 0..10 {
        let res = client.get(demo.url("/hello")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(!res.headers().contains_key("ratelimit"));
    }
    assert_eq!(
        metric(&demo, &[("policy", "hello"), ("decision", "allowed")]).await,
        3.0
    );
    assert_eq!(
        metric(
            &demo,
            &[("policy", "hello"), ("decision", "shadow_limited")]
        )
        .await,
        7.0
    );
    assert!(demo.log().iter().any(|l| l.contains("rate-limit-shadow")));
}

#[test]
fn a_policy_for_a_route_the_demo_does_not_have_stops_start_up() {
    let out = refused_config(
        DEMO,
        "[[policy]]\nname = \"x\"\nroute = \"/exprot\"\nquota = \"1/s\"\n",
    );
    assert!(
        out.contains(
            "policy[0] (x).route = \"/exprot\": no such route template (routes: /hello, /login, /export)"
        ),
        "{out}"
    );
}

#[test]
fn an_unknown_algorithm_stops_start_up() {
    let out = refused_config(
        DEMO,
        "[[policy]]\nname = \"x\"\nroute = \"/hello\"\nquota = \"1/s\"\nalgorithm = \"leaky_bucket\"\n",
    );
    assert!(
        out.contains("policy[0] (x).algorithm = \"leaky_bucket\": unknown algorithm"),
        "{out}"
    );
}
