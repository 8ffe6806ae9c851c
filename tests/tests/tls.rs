//! TLS against real TLS-only `redis-server` processes, with certificates made by each test:
//! a private CA, mutual TLS, a certificate for another host name, and settings that cannot
//! work refused when the store is built.

use std::time::Duration;

use tollgate::{Key, Quota, Store};
use tollgate_redis::{Error, RedisStore, RedisTls};
use tollgate_tests::tls::{Ca, TlsRedis, tls_cluster};

/// A store on `url` with `tls`, not yet connected.
fn store(url: &str, tls: RedisTls) -> RedisStore {
    RedisStore::builder(url)
        .expect("url")
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .tls(tls)
        .build()
        .expect("build")
}

/// Two stores on one TLS server share one limit: 3 per minute between them.
async fn shares_a_limit(a: &RedisStore, b: &RedisStore) {
    let key = Key::new("tls", "/r", None, Some("client"));
    let quota = ["3/m".parse::<Quota>().unwrap()];
    let mut allowed = 0;
    for i in 0..6 {
        let store = if i % 2 == 0 { a } else { b };
        if store
            .check(&key, &quota, 1)
            .await
            .expect("decided")
            .is_allowed()
        {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3);
}

#[tokio::test]
async fn a_private_ca_is_trusted_when_given_and_only_then() {
    let ca = Ca::new("tollgate test CA");
    let server = ca.issue("server", &["127.0.0.1", "localhost"]);
    let redis = TlsRedis::start(&ca.pem_file(), &server, false, None, &[]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);

    let from_file = RedisTls::new().with_ca_file(ca.pem_file()).unwrap();
    let a = store(&url, from_file);
    let b = store(&url, RedisTls::new().with_ca_pem(&ca.pem));
    for s in [&a, &b] {
        s.wait_connected(Duration::from_secs(10))
            .await
            .expect("TLS with the private CA");
    }
    shares_a_limit(&a, &b).await;

    // The system's roots do not include the private CA: no connection.
    let untrusted = store(&url, RedisTls::new());
    let err = untrusted
        .wait_connected(Duration::from_secs(3))
        .await
        .expect_err("an unknown CA is not trusted");
    assert!(matches!(err, Error::NotConnected { .. }), "{err}");
    // Nor is another CA's certificate.
    let other = Ca::new("another CA");
    let wrong_ca = store(&url, RedisTls::new().with_ca_pem(&other.pem));
    assert!(
        wrong_ca
            .wait_connected(Duration::from_secs(3))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn mutual_tls_connects_with_the_client_certificate_and_not_without() {
    let ca = Ca::new("tollgate test CA");
    let server = ca.issue("server", &["127.0.0.1"]);
    let client = ca.issue("client", &["tollgate-client"]);
    let redis = TlsRedis::start(&ca.pem_file(), &server, true, Some(client.clone()), &[]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);

    let with_cert = || {
        RedisTls::new()
            .with_ca_file(ca.pem_file())
            .unwrap()
            .with_client_cert_files(&client.cert, &client.key)
            .unwrap()
    };
    let a = store(&url, with_cert());
    let b = store(&url, with_cert());
    for s in [&a, &b] {
        s.wait_connected(Duration::from_secs(10))
            .await
            .expect("mutual TLS");
    }
    shares_a_limit(&a, &b).await;

    let without = store(&url, RedisTls::new().with_ca_pem(&ca.pem));
    assert!(
        without
            .wait_connected(Duration::from_secs(3))
            .await
            .is_err(),
        "a server that requires a client certificate refuses a client without one"
    );
}

#[tokio::test]
async fn a_certificate_for_another_host_name_is_refused() {
    let ca = Ca::new("tollgate test CA");
    let server = ca.issue("server", &["redis.other.example"]);
    let redis = TlsRedis::start(&ca.pem_file(), &server, false, None, &[]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let s = store(&url, RedisTls::new().with_ca_pem(&ca.pem));
    assert!(
        s.wait_connected(Duration::from_secs(3)).await.is_err(),
        "the server's name is checked"
    );
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_at_build() {
    let build = |url: &str, tls: RedisTls| {
        RedisStore::builder(url)
            .expect("url")
            .tls(tls)
            .build()
            .map(|_| ())
    };
    let ca = Ca::new("tollgate test CA");
    // TLS settings for a plaintext URL.
    let err = build("redis://127.0.0.1:1", RedisTls::new().with_ca_pem(&ca.pem)).unwrap_err();
    assert!(
        matches!(err, Error::Tls(_)) && err.to_string().contains("rediss://"),
        "{err}"
    );
    // A CA file that is not there names itself.
    let err = RedisTls::new()
        .with_ca_file("/nonexistent/ca.pem")
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    // A PEM without a certificate, a key that is not a key.
    let err = build(
        "rediss://127.0.0.1:1",
        RedisTls::new().with_ca_pem("not a pem"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no BEGIN CERTIFICATE"), "{err}");
    let err = build(
        "rediss://127.0.0.1:1",
        RedisTls::new().with_client_cert_pem(&ca.pem, "garbage"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("client key"), "{err}");
    // A client certificate with somebody else's key.
    let client = ca.issue("client", &["c"]);
    let other = ca.issue("other", &["o"]);
    let tls = RedisTls::new()
        .with_client_cert_files(&client.cert, &other.key)
        .unwrap();
    let err = build("rediss://127.0.0.1:1", tls).unwrap_err();
    assert!(matches!(err, Error::Tls(_)), "{err}");
}

/// The demo on a TLS Redis with a private CA, as its README shows: one instance configured by
/// flags, the other by the configuration file's `[store]` keys; they share one limit.
#[tokio::test]
async fn two_demos_share_a_limit_through_tls_redis_with_a_private_ca() {
    const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");
    let ca = Ca::new("tollgate test CA");
    let server = ca.issue("server", &["127.0.0.1"]);
    let client = ca.issue("client", &["demo"]);
    let redis = TlsRedis::start(&ca.pem_file(), &server, true, Some(client.clone()), &[]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);

    let ca_file = ca.pem_file().display().to_string();
    let by_flags = tollgate_tests::Demo::start(
        DEMO,
        &[
            "--redis",
            &url,
            "--redis-timeout",
            "5000",
            "--redis-connect-wait",
            "10000",
            "--redis-ca",
            &ca_file,
            "--redis-client-cert",
            &client.cert.display().to_string(),
            "--redis-client-key",
            &client.key.display().to_string(),
        ],
    );
    let demo_config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo/tollgate.toml"),
    )
    .unwrap()
    .replace(
        "[store]\ntype = \"memory\"",
        &format!(
            "[store]\ntype = \"redis\"\nurl = \"{url}\"\ntimeout = \"5s\"\n\
             tls_ca_file = \"{ca_file}\"\ntls_client_cert_file = \"{}\"\n\
             tls_client_key_file = \"{}\"",
            client.cert.display(),
            client.key.display()
        ),
    );
    assert!(
        demo_config.contains("tls_ca_file"),
        "the demo's file changed shape"
    );
    let file = tollgate_tests::config_file(&demo_config);
    let by_file = tollgate_tests::Demo::start(
        DEMO,
        &[
            "--config",
            &file.path().display().to_string(),
            "--redis-connect-wait",
            "10000",
        ],
    );

    // GET /hello: 5 per 10 s per client, shared by both instances.
    let http = tollgate_tests::http_client();
    let mut statuses = Vec::new();
    for i in 0..8 {
        let demo = if i % 2 == 0 { &by_flags } else { &by_file };
        let res = http.get(demo.url("/hello")).send().await.unwrap();
        assert!(
            res.headers().contains_key("ratelimit"),
            "request {i} was not decided by Redis:\n{}\n{}",
            by_flags.log().join("\n"),
            by_file.log().join("\n")
        );
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
}

/// A 3-master cluster whose clients and bus speak only TLS: the store discovers the nodes
/// through the private CA and decides keys in every slot range, exactly.
#[tokio::test]
async fn a_cluster_over_tls_shares_limits() {
    let ca = Ca::new("tollgate test CA");
    let server = ca.issue("server", &["127.0.0.1"]);
    let nodes = tls_cluster(&ca.pem_file(), &server);
    let mut url = format!("rediss-cluster://127.0.0.1:{}", nodes[0].port);
    for (i, n) in nodes[1..].iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(&format!("node=127.0.0.1:{}", n.port));
    }
    let a = store(&url, RedisTls::new().with_ca_pem(&ca.pem));
    let b = store(&url, RedisTls::new().with_ca_pem(&ca.pem));
    for s in [&a, &b] {
        s.wait_connected(Duration::from_secs(10))
            .await
            .expect("TLS cluster");
    }
    // Keys spread over the slots of every master, each 2 per minute between the two stores.
    let quota = ["2/m".parse::<Quota>().unwrap()];
    for user in 0..20 {
        let key = Key::new("tls", "/r", None, Some(format!("user-{user}")));
        let mut allowed = 0;
        for i in 0..4 {
            let s = if i % 2 == 0 { &a } else { &b };
            if s.check(&key, &quota, 1)
                .await
                .expect("decided")
                .is_allowed()
            {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 2, "user-{user}");
    }
    // Every master holds some of the keys.
    for n in &nodes {
        let keys: u64 = n.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 0, "node {} holds no key", n.port);
    }
}
