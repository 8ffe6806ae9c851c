//! The demo as a real process over real HTTP on loopback: what a new user sees.

use std::io::Write;
use std::process::{Command, Stdio};

use tollgate_tests::{Demo, config_file, refused_config, require_program};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

#[tokio::test]
async fn six_hellos_from_one_client_get_five_200s_and_a_429() {
    let demo = Demo::start(DEMO, &[]);
    let client = client();
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..6 {
        let res = client.get(demo.url("/hello")).send().await.unwrap();
        statuses.push(res.status().as_u16());
        // Allowed responses carry the headers too.
        assert!(
            res.headers().contains_key("ratelimit"),
            "{:?}",
            res.headers()
        );
        assert_eq!(res.headers()["ratelimit-policy"], "\"hello\";q=5;w=10");
        last = Some(res);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let limited = last.unwrap();
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds");
    // One unit comes back every 2 seconds.
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    let ratelimit = limited.headers()["ratelimit"].to_str().unwrap();
    assert_eq!(ratelimit, format!("\"hello\";r=0;t={retry_after}"));
    assert_eq!(limited.text().await.unwrap(), "Too Many Requests\n");
}

#[tokio::test]
async fn login_is_limited_per_minute_and_metrics_are_never_limited() {
    let demo = Demo::start(DEMO, &[]);
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            client
                .post(demo.url("/login"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    for _ in 0..30 {
        let res = client.get(demo.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(!res.headers().contains_key("ratelimit"));
    }
}

#[tokio::test]
async fn metrics_count_decisions_and_pass_promtool() {
    let promtool = require_program("promtool", "prometheus");
    let demo = Demo::start(DEMO, &[]);
    let client = client();

    // Before any failure, the fail-open counter already exists at zero for every policy.
    let body = demo.metrics(&client).await;
    for policy in ["hello", "login"] {
        let line = format!("ratelimit_fail_open_total{{policy=\"{policy}\",reason=\"timeout\"}} 0");
        assert!(body.lines().any(|l| l == line), "missing {line} in\n{body}");
    }

    for _ in 0..7 {
        client.get(demo.url("/hello")).send().await.unwrap();
    }
    let body = demo.metrics(&client).await;
    let value = |labels: &str| {
        let prefix = format!("ratelimit_requests_total{{{labels}}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no series {labels} in\n{body}"))
            .to_owned()
    };
    assert_eq!(value("policy=\"hello\",decision=\"allowed\""), "5");
    assert_eq!(value("policy=\"hello\",decision=\"limited\""), "2");
    assert!(body.contains("# TYPE ratelimit_requests_total counter"));
    assert!(!body.contains("127.0.0.1"), "an IP leaked into a label");

    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_config_file_sets_the_policies() {
    let file = config_file(
        "headers = \"legacy\"\n[[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"2/1m\"\n",
    );
    let demo = Demo::start(DEMO, &["--config", file.path().to_str().unwrap()]);
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let res = client.get(demo.url("/hello")).send().await.unwrap();
        assert!(res.headers().contains_key("x-ratelimit-remaining"));
        assert!(!res.headers().contains_key("ratelimit"));
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    // The file has no policy for /login: it passes untouched.
    for _ in 0..5 {
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
}

#[test]
fn an_invalid_config_file_stops_start_up_naming_the_field() {
    let out = refused_config(
        DEMO,
        "[[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"0/s\"\n",
    );
    assert!(
        out.contains("policy[0] (hello).quota = \"0/s\": quota limit must be at least 1"),
        "{out}"
    );
}
