//! Who the client is, end to end: the demo behind a trusted proxy keys on the forwarded client;
//! a spoofed header from an untrusted peer changes nothing.

use tollgate_tests::Demo;

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

async fn hello(demo: &Demo, xff: Option<&str>) -> u16 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = client.get(demo.url("/hello"));
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn statuses(demo: &Demo, xffs: &[&str]) -> Vec<u16> {
    let mut out = Vec::new();
    for xff in xffs {
        out.push(hello(demo, Some(xff)).await);
    }
    out
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    // The tests connect from 127.0.0.1: here that is the trusted proxy.
    let demo = Demo::start(DEMO, &["--trusted-proxy", "127.0.0.1/32"]);
    let a = "198.51.100.1";
    assert_eq!(
        statuses(&demo, &[a; 6]).await,
        [200, 200, 200, 200, 200, 429]
    );
    // Another client behind the same proxy is not affected.
    assert_eq!(statuses(&demo, &["198.51.100.2"]).await, [200]);
    // A spoofed leftmost entry does not buy a fresh budget: the proxy appended the real one.
    assert_eq!(
        statuses(&demo, &["6.6.6.6, 198.51.100.1", "7.7.7.7,198.51.100.1"]).await,
        [429, 429]
    );
}

#[tokio::test]
async fn from_an_untrusted_peer_a_spoofed_header_keys_on_the_peer() {
    // Only 10.0.0.0/8 is trusted; 127.0.0.1 is not.
    let demo = Demo::start(DEMO, &["--trusted-proxy", "10.0.0.0/8"]);
    let spoofed = [
        "1.1.1.1", "2.2.2.2", "3.3.3.3", "10.0.0.7", "5.5.5.5", "6.6.6.6",
    ];
    assert_eq!(
        statuses(&demo, &spoofed).await,
        [200, 200, 200, 200, 200, 429]
    );
}

#[tokio::test]
async fn without_trusted_proxies_headers_are_ignored_and_that_is_said_once() {
    let demo = Demo::start(DEMO, &[]);
    let spoofed = [
        "1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4", "5.5.5.5", "6.6.6.6", "7.7.7.7",
    ];
    assert_eq!(
        statuses(&demo, &spoofed).await,
        [200, 200, 200, 200, 200, 429, 429]
    );
    let warnings = demo
        .log()
        .iter()
        .filter(|l| l.contains("rate-limit-misconfigured") && l.contains("X-Forwarded-For"))
        .count();
    assert_eq!(warnings, 1, "{:#?}", demo.log());
}

#[tokio::test]
async fn ipv6_clients_are_keyed_on_their_prefix() {
    let demo = Demo::start(DEMO, &["--trusted-proxy", "127.0.0.1/32"]);
    // Five addresses of one /64 share a budget.
    let same_net = [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2::3",
        "2001:db8:1:2::4",
        "2001:db8:1:2::5",
        "2001:db8:1:2:ffff::6",
    ];
    assert_eq!(
        statuses(&demo, &same_net).await,
        [200, 200, 200, 200, 200, 429]
    );
    assert_eq!(statuses(&demo, &["2001:db8:1:3::1"]).await, [200]);

    let per_address = Demo::start(
        DEMO,
        &["--trusted-proxy", "127.0.0.1/32", "--ipv6-prefix", "128"],
    );
    assert_eq!(statuses(&per_address, &same_net).await, [200; 6]);
}

#[test]
fn an_invalid_prefix_or_range_stops_start_up() {
    let (status, out) =
        tollgate_tests::run_to_exit(DEMO, &["--listen", "127.0.0.1:0", "--ipv6-prefix", "0"]);
    assert!(!status.success());
    assert!(
        out.contains("IPv6 prefix length 0 is out of range"),
        "{out}"
    );
    let (status, out) = tollgate_tests::run_to_exit(
        DEMO,
        &["--listen", "127.0.0.1:0", "--trusted-proxy", "10.0.0.0/33"],
    );
    assert!(!status.success());
    assert!(out.contains("--trusted-proxy"), "{out}");
}

/// Distinct budgets per forwarded client: two clients each get five.
async fn keyed_on_forwarded_clients(demo: &Demo) -> bool {
    statuses(demo, &["198.51.100.21"; 5]).await == [200; 5]
        && statuses(demo, &["198.51.100.22"; 5]).await == [200; 5]
}

#[tokio::test]
async fn a_flag_overrides_only_what_it_names() {
    use tollgate_tests::config_file;
    let policy = "[[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"5/10s\"\n";
    let trusting = config_file(&format!(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n{policy}"
    ));
    let path = trusting.path().to_str().unwrap();
    // --ipv6-prefix alone used to drop the file's trusted proxies.
    let demo = Demo::start(DEMO, &["--config", path, "--ipv6-prefix", "56"]);
    assert!(keyed_on_forwarded_clients(&demo).await);
    // The header name is not case-sensitive, and naming the default keeps the file's trust.
    let demo = Demo::start(
        DEMO,
        &["--config", path, "--client-ip-header", "X-Forwarded-For"],
    );
    assert!(keyed_on_forwarded_clients(&demo).await);
    // --trusted-proxy used to reset the file's IPv6 prefix: /128 keys each address.
    let per_address = config_file(&format!("[client_ip]\nipv6_prefix = 128\n{policy}"));
    let demo = Demo::start(
        DEMO,
        &[
            "--config",
            per_address.path().to_str().unwrap(),
            "--trusted-proxy",
            "127.0.0.1/32",
        ],
    );
    let same_64 = [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2::3",
        "2001:db8:1:2::4",
        "2001:db8:1:2::5",
        "2001:db8:1:2::6",
    ];
    assert_eq!(statuses(&demo, &same_64).await, [200; 6]);
}

#[tokio::test]
async fn permissive_trust_is_warned_about_at_start_up() {
    use tollgate_tests::config_file;
    let warned = |demo: &Demo, what: &str| {
        demo.log()
            .iter()
            .any(|l| l.contains("rate-limit-misconfigured") && l.contains(what))
    };
    let demo = Demo::start(DEMO, &["--trusted-proxy", "0.0.0.0/0"]);
    assert!(warned(&demo, "covers every address"), "{:#?}", demo.log());
    let demo = Demo::start(DEMO, &["--trusted-proxy", "::/0"]);
    assert!(warned(&demo, "covers every address"), "{:#?}", demo.log());
    let demo = Demo::start(DEMO, &["--client-ip-header", "x-real-ip"]);
    assert!(warned(&demo, "never read"), "{:#?}", demo.log());
    let hops = config_file("[client_ip]\ntrusted_hops = 1\nheader = \"x-real-ip\"\n");
    let demo = Demo::start(DEMO, &["--config", hops.path().to_str().unwrap()]);
    assert!(warned(&demo, "does not apply"), "{:#?}", demo.log());
    // A sound setting says nothing of the kind.
    let demo = Demo::start(DEMO, &["--trusted-proxy", "10.0.0.0/8"]);
    assert!(!warned(&demo, ""), "{:#?}", demo.log());
}
