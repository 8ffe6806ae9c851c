//! A Redis store for [`tollgate`]: every instance of a service shares one limit.
//!
//! [`RedisStore`] decides each request with a script (`rate_limit.lua`: GCRA, fixed and sliding
//! windows) that reads, decides and writes every quota of the request atomically, on the Redis
//! server's clock, so instances with skewed clocks agree. The checks in flight at the same
//! moment go in one `EVALSHA` ([`RedisStoreBuilder::max_batch`]), decided one after the other.
//! It is built on [`fred`] and connects to a standalone server, a Redis Cluster or Sentinel
//! from a URL.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use tollgate::{Policy, Quota, RateLimitLayer};
//! use tollgate_redis::RedisStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379")?.build()?;
//! let app: Router = Router::new()
//!     .route("/hello", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::new(store).route("/hello", Policy::new("hello", Quota::per_minute(30)?)));
//! # Ok(()) }
//! ```
//!
//! # Failure
//!
//! Every call has a deadline (100 ms by default; fred alone would wait forever), is never
//! retried once written (a retried script would count the request twice), and fails at once
//! while the connection is down instead of queueing. After 5 consecutive timeouts or connection
//! failures a circuit breaker stops asking Redis (calls fail at once as `circuit_open`) and
//! pings it in the background until it answers. A failed call goes to the local
//! [fallback](RedisStoreBuilder::fallback) store when one is set, and otherwise the layer
//! applies the policy's [`FailureMode`](tollgate::FailureMode). The client reconnects by itself
//! with exponential backoff, and reloads the script when a restarted or failed-over server
//! answers `NOSCRIPT`. Health is reported in `ratelimit_store_errors_total`,
//! `ratelimit_store_degraded`, `ratelimit_store_duration_seconds` and
//! `ratelimit_store_calls_total` (see [`tollgate::metrics`]).
//!
//! See `docs/redis.md` in the repository for topologies, the key layout and tuning.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub use fred;

mod batch;
mod breaker;
mod builder;
mod concurrency;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
mod config;
mod deny;
mod error;
mod keys;
mod link;
mod msgpack;
mod script;
mod server_clock;
mod store;
#[cfg(feature = "tls")]
mod tls;
mod waiters;

pub use builder::RedisStoreBuilder;
pub use concurrency::{RedisConcurrencyStore, RedisPermit};
#[cfg(feature = "config")]
pub use config::RedisConfig;
pub use error::{Error, redact};
pub use store::RedisStore;
#[cfg(feature = "tls")]
pub use tls::RedisTls;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::*;
    use crate::error::*;
    use crate::store::*;
    use fred::prelude::{Error as FredError, ErrorKind as FredErrorKind};
    use std::time::Duration;
    use tollgate::{Key, Quota, StoreErrorKind};

    #[test]
    fn server_versions_are_read_and_compared() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(redis_version(info), Some("7.0.15"));
        assert!(version_at_least("7.0.15", MIN_REDIS_VERSION));
        assert!(version_at_least("3.2.0", MIN_REDIS_VERSION));
        assert!(!version_at_least("3.0.7", MIN_REDIS_VERSION));
        assert!(!version_at_least("2.8.24", MIN_REDIS_VERSION));
        assert!(version_at_least("10.1", MIN_REDIS_VERSION));
    }

    #[test]
    fn errors_are_classified_for_the_metrics() {
        let e = |kind, details: &str| classify(FredError::new(kind, details.to_owned())).kind();
        assert_eq!(e(FredErrorKind::Timeout, "t"), StoreErrorKind::Timeout);
        assert_eq!(e(FredErrorKind::IO, "reset"), StoreErrorKind::Unavailable);
        assert_eq!(e(FredErrorKind::Canceled, "x"), StoreErrorKind::Unavailable);
        assert_eq!(e(FredErrorKind::Auth, "WRONGPASS x"), StoreErrorKind::Auth);
        // An ACL user without a right, for a command or for one the script calls.
        assert_eq!(
            e(
                FredErrorKind::Unknown,
                "NOPERM User tollgate has no permissions to run the 'evalsha' command"
            ),
            StoreErrorKind::Auth
        );
        assert_eq!(
            e(
                FredErrorKind::Unknown,
                "ERR Error running script (call to f_x): NOPERM this user has no permissions"
            ),
            StoreErrorKind::Auth
        );
        assert_eq!(
            e(FredErrorKind::Backpressure, "x"),
            StoreErrorKind::Unavailable
        );
        assert_eq!(
            e(
                FredErrorKind::Unknown,
                "ERR Error running script (call to f_x): user_script:1"
            ),
            StoreErrorKind::Script
        );
        assert_eq!(
            e(
                FredErrorKind::Unknown,
                "LOADING Redis is loading the dataset in memory"
            ),
            StoreErrorKind::Unavailable
        );
        assert_eq!(e(FredErrorKind::Unknown, "WAT"), StoreErrorKind::Other);
    }

    #[test]
    fn tls_urls_need_the_tls_feature() {
        let tls: Vec<&str> = SCHEMES.into_iter().filter(|s| is_tls_scheme(s)).collect();
        assert_eq!(
            tls,
            ["rediss", "rediss-cluster", "rediss-sentinel", "valkeys"]
        );
        let built = RedisStore::builder("rediss://:pw@127.0.0.1:6380");
        if cfg!(feature = "tls") {
            assert!(built.is_ok(), "{built:?}");
            assert!(RedisStore::builder("valkeys://127.0.0.1:6380").is_ok());
        } else {
            let err = built.unwrap_err();
            assert!(matches!(err, Error::TlsDisabled { .. }), "{err:?}");
            let said = err.to_string();
            assert!(said.contains("`tls` feature"), "{said}");
            assert!(!said.contains("pw"), "{said}");
        }
        // Plain URLs never need it.
        assert!(RedisStore::builder("redis://127.0.0.1:6379").is_ok());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://u:secret@h:6379"), "rediss://u:***@h:6379");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact("garbage"), "garbage");
        // A base64 password with '/' (the case that used to come back unchanged).
        assert_eq!(
            redact("redis://:ab/cd+ef@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(redact("redis://u:a@b?c#d/e@h:1"), "redis://u:***@h:1");
        assert_eq!(redact("redis://lonely@h:1"), "redis://***@h:1");
        assert_eq!(
            redact("redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=x/y"),
            "redis-sentinel://h:26379/0?sentinelServiceName=m&sentinelPassword=***"
        );
        assert_eq!(redact("u:pw@h:1"), "u:***@h:1");
    }

    proptest::proptest! {
        /// No URL, however mangled, puts its password in `redact`'s output or in the builder's
        /// error message.
        #[test]
        fn no_url_leaks_its_password(
            secret in "[a-zA-Z0-9/+=@?#:%& .-]{0,12}",
            template in 0usize..7,
            scheme in proptest::sample::select(vec!["redis", "rediss", "redis-cluster", "redis-sentinel", "valkey", "http", ""]),
        ) {
            // A marker no template contains, so any occurrence is the secret leaking.
            let secret = format!("Zq9{secret}xW7");
            let url = match template {
                0 => format!("{scheme}://:{secret}@h:6379/0"),
                1 => format!("{scheme}://user:{secret}@h:6379"),
                2 => format!("{scheme}://{secret}@h:6379"),
                3 => format!("{scheme}://h:26379/0?sentinelServiceName=m&sentinelPassword={secret}"),
                4 => format!("{scheme}://user:{secret}@h:notaport/x?node=h2:1"),
                5 => format!("{scheme}://:{secret}@h:6379/0?sentinelServiceName=m&sentinelPassword={secret}"),
                _ => format!("user:{secret}@h:6379"),
            };
            let redacted = redact(&url);
            proptest::prop_assert!(!redacted.contains(&secret), "{} -> {}", url, redacted);
            if let Err(e) = RedisStore::builder(&url) {
                let shown = format!("{e} {e:?}");
                proptest::prop_assert!(!shown.contains(&secret), "{} -> {}", url, shown);
            }
        }
    }

    #[tokio::test]
    async fn bad_settings_are_refused_at_build() {
        let b = || RedisStore::builder("redis://127.0.0.1:1").unwrap();
        assert!(matches!(b().prefix("a{b}").build(), Err(Error::Prefix(_))));
        assert!(matches!(
            b().prefix("x".repeat(65)).build(),
            Err(Error::Prefix(_))
        ));
        assert!(matches!(b().prefix("a b").build(), Err(Error::Prefix(_))));
        assert!(matches!(
            b().timeout(Duration::ZERO).build(),
            Err(Error::Timeout)
        ));
        assert!(matches!(
            RedisStore::builder("http://nope"),
            Err(Error::Scheme { .. })
        ));
        assert!(matches!(
            RedisStore::builder("redis://:secret@h:notaport"),
            Err(Error::Url { url, .. }) if !url.contains("secret")
        ));
    }

    #[test]
    fn build_outside_a_runtime_is_an_error_not_a_panic() {
        let r = RedisStore::builder("redis://127.0.0.1:1").unwrap().build();
        assert!(matches!(r, Err(Error::NoRuntime)));
    }

    #[tokio::test]
    async fn keys_share_one_hash_tag_and_escape_request_content() {
        let store = RedisStore::builder("redis://127.0.0.1:1")
            .unwrap()
            .prefix("app:")
            .build()
            .unwrap();
        let ip = "192.0.2.1".parse().ok();
        let k = Key::new("login", "/login", ip, Some("ev}il{:x"));
        let (per_minute, per_day): (Quota, Quota) =
            ("3/m".parse().unwrap(), "10/d fixed-window".parse().unwrap());
        assert_eq!(
            store.redis_key(&k, &per_minute),
            "app:{login:/login:192.0.2.1:ev%7Dil%7B%3Ax}:3/m"
        );
        assert_eq!(
            store.redis_key(&k, &per_day),
            "app:{login:/login:192.0.2.1:ev%7Dil%7B%3Ax}:10/d-fw"
        );
        // A megabyte of user id makes a short key.
        let huge = "u".repeat(1 << 20);
        let k = Key::new("login", "/login", ip, Some(huge.as_str()));
        assert!(store.redis_key(&k, &per_minute).len() < 100);
    }
}

// The guides' code blocks compile as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/concurrency.md")]
struct ConcurrencyGuide;
#[cfg(doctest)]
#[doc = include_str!("../../../docs/redis.md")]
struct RedisGuide;
#[cfg(doctest)]
#[doc = include_str!("../../../docs/operations.md")]
struct OperationsGuide;
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct Readme;
