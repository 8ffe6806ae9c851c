//! The attack suite: each cheap way around a limit found by the hardening review, tried against
//! the demo as a real process over real HTTP on loopback, and the limit holding.
//!
//! Every attack runs through a trusted proxy where it needs one: the tests connect from
//! 127.0.0.1, which the demo is told to trust, and write the forwarding headers a proxy would
//! have written after the client's own text. Quotas are long (per minute, per day) so that the
//! outcome does not depend on how fast the machine sends the requests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tollgate_tests::{Demo, config_file, http_client, metric_sum};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");

/// Starts the demo with `config` (TOML) and any extra flags.
fn demo(config: &str, extra: &[&str]) -> (Demo, tempfile::NamedTempFile) {
    let file = config_file(config);
    let mut args = vec!["--config", file.path().to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    (Demo::start(DEMO, &args), file)
}

/// Sends `GET path` with one raw header line (any bytes) on a fresh connection; the status.
fn raw_get(addr: SocketAddr, path: &str, header: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n").into_bytes();
    req.extend_from_slice(header);
    req.extend_from_slice(b"\r\n\r\n");
    stream.write_all(&req).expect("send");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let status_line = response.split(|&b| b == b'\r').next().unwrap_or_default();
    std::str::from_utf8(status_line)
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {:?}", String::from_utf8_lossy(&response)))
}

#[tokio::test]
async fn head_cannot_step_around_a_get_limit() {
    let (demo, _file) = demo(
        "[[policy]]\nname = \"export\"\nroute = \"/export\"\nmethod = \"GET\"\nquota = \"2/m\"\n",
        &[],
    );
    let client = http_client();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(
            client
                .head(demo.url("/export"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(got, [200, 200, 429, 429, 429, 429]);
    // HEAD and GET spend one budget.
    let get = client.get(demo.url("/export")).send().await.unwrap();
    assert_eq!(get.status(), 429);
}

#[tokio::test]
async fn an_unclosed_quote_in_forwarded_cannot_hide_the_proxys_element() {
    let (demo, _file) = demo(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\nheader = \"forwarded\"\n\
         [[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"3/m\"\n",
        &[],
    );
    let client = http_client();
    let mut got = Vec::new();
    for i in 0..6 {
        // The client wrote `for=9.9.9.<i>;x="`; its proxy appended its element on the same line.
        let line = format!("for=9.9.9.{i};x=\", for=198.51.100.1");
        let res = client
            .get(demo.url("/hello"))
            .header("forwarded", line)
            .send()
            .await
            .unwrap();
        got.push(res.status().as_u16());
    }
    // One client, however it dresses its part of the header.
    assert_eq!(got, [200, 200, 200, 429, 429, 429]);
}

#[tokio::test]
async fn a_byte_outside_ascii_cannot_move_a_client_onto_the_proxys_key() {
    let (demo, _file) = demo(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"3/m\"\n",
        &[],
    );
    let addr = demo.addr;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        for i in 0..6u8 {
            // nginx's $proxy_add_x_forwarded_for: the client's bytes, then the address it saw.
            let mut header = b"X-Forwarded-For: \xff".to_vec();
            header.extend_from_slice(format!("{i}, 198.51.100.1").as_bytes());
            got.push(raw_get(addr, "/hello", &header));
        }
        // The proxy's own budget (health checks, direct calls) is untouched.
        let direct = raw_get(addr, "/hello", b"X-Probe: 1");
        (got, direct)
    })
    .await
    .unwrap();
    assert_eq!(statuses.0, [200, 200, 200, 429, 429, 429]);
    assert_eq!(statuses.1, 200);
}

#[tokio::test]
async fn a_flood_of_new_addresses_cannot_free_a_limited_login() {
    // A small store (10 states per shard) and a daily route whose every request spends more
    // than the whole login budget: only "never evict a limited client" keeps the login state.
    let (demo, _file) = demo(
        "[store]\ntype = \"memory\"\nmax_keys = 640\n\
         [client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[policy]]\nname = \"login\"\nroute = \"/login\"\nmethod = \"POST\"\nquota = \"3/1h\"\n\
         [[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"100/1d\"\ncost = 5\n",
        &[],
    );
    let client = http_client();
    let login = || {
        client
            .post(demo.url("/login"))
            .header("x-forwarded-for", "198.51.100.1")
            .send()
    };
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(login().await.unwrap().status().as_u16());
    }
    assert_eq!(got, [200, 200, 200, 429]);
    // Four thousand new addresses: six times what the store holds.
    for i in 0..4_000u32 {
        let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let res = client
            .get(demo.url("/hello"))
            .header("x-forwarded-for", addr.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let metrics = demo.metrics(&client).await;
    let evicted = metric_sum(
        &metrics,
        "ratelimit_store_evictions_total",
        &[("policy", "hello")],
    );
    assert!(
        evicted > 1_000.0,
        "the flood evicted only {evicted} states:\n{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "ratelimit_store_evictions_total",
            &[("policy", "login")]
        ),
        0.0
    );
    assert_eq!(login().await.unwrap().status(), 429);
}

#[tokio::test]
async fn a_huge_forwarding_header_is_answered_in_bounded_time_and_memory() {
    let (demo, _file) = demo(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         [[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"5/m\"\n",
        &[],
    );
    let client = http_client();
    // Warm up (allocator, connection pool), then measure.
    client.get(demo.url("/metrics")).send().await.unwrap();
    let before = demo.rss_bytes();
    // 390 KB of `1,1,1,...` to the left of what the proxy appended (hyper's limit is 400 KB).
    let spoofed = "1,".repeat(195_000);
    let mut got = Vec::new();
    for i in 0..40 {
        let res = client
            .get(demo.url("/hello"))
            .header("x-forwarded-for", format!("{spoofed}{i}, 198.51.100.1"))
            .send()
            .await
            .unwrap();
        got.push(res.status().as_u16());
    }
    // All answered (within the client's 30 s timeout; the per-request parsing cost is measured
    // by the criterion bench key/x_forwarded_for_400kb_spoofed), and keyed on the client the
    // proxy appended.
    assert_eq!(&got[..5], [200; 5]);
    assert!(got[5..].iter().all(|&s| s == 429), "{got:?}");
    // 40 requests of 390 KB each: 15 MB went through; what stays is bounded by a request's
    // buffers, not by what the headers said.
    let grew = demo.rss_bytes().saturating_sub(before);
    assert!(grew < 32 << 20, "resident memory grew by {grew} bytes");
}
