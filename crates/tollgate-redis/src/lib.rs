//! A Redis store for [`tollgate`]: every instance of a service shares one limit.
//!
//! [`RedisStore`] decides each request with one `EVALSHA` of a script ([`GCRA_SCRIPT`]: GCRA,
//! fixed and sliding windows) that reads, decides and writes every quota of the request
//! atomically, on the Redis server's clock, so instances with skewed clocks agree. It is built on
//! [`fred`] and connects to a standalone server, a Redis Cluster or Sentinel from a URL.
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
//! `ratelimit_store_degraded` and `ratelimit_store_duration_seconds` (see
//! [`tollgate::metrics`]).
//!
//! See `docs/redis.md` in the repository for topologies, the key layout and tuning.

#![cfg_attr(docsrs, feature(doc_cfg))]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::{
    Builder, ClientLike, Config, Error as FredError, ErrorKind as FredErrorKind, KeysInterface,
    LuaInterface, Options, ReconnectPolicy, Value,
};
use fred::types::config::UnresponsiveConfig;
use fred::types::{ClusterHash, CustomCommand};
use tollgate::clock::Clock;
use tollgate::metrics::StoreMetrics;
use tollgate::store::OwnedKey;
use tollgate::{Decision, Key, MemoryStore, Quota, Store, StoreError, StoreErrorKind};

pub use fred;

/// The Lua source of the script the store runs (every algorithm; named for the default one).
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// The Lua source of the concurrency-lease script.
pub const CONCURRENCY_SCRIPT: &str = include_str!("concurrency.lua");

mod concurrency;
mod deny;
mod script;
mod server_clock;
pub use concurrency::{RedisConcurrencyStore, RedisPermit};

use script::Reply;
use server_clock::ServerClock;

const DEFAULT_PREFIX: &str = "tollgate:";
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_MAX_QUEUED: usize = 10_000;
const MAX_PREFIX_LEN: usize = 64;
const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(500);
const DEFAULT_DENY_CACHE: usize = 10_000;
const DEFAULT_DENY_CACHE_TTL: Duration = Duration::from_secs(10);
/// The oldest Redis this store runs on: `redis.replicate_commands()`, which lets the script
/// write after reading `TIME`, came with 3.2 (and is the only behaviour from 5 on).
const MIN_REDIS_VERSION: (u32, u32) = (3, 2);
const SCHEMES: [&str; 8] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
    "valkey",
    "valkeys",
];

/// Rate-limit state in Redis, shared by every instance that uses the same server and prefix.
///
/// Cheap to clone: clones share one client (one connection per server node, pipelined).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: fred::clients::Client,
    script: fred::types::scripts::Script,
    options: Options,
    prefix: String,
    timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
    fallback: Option<MemoryStore>,
    breaker: Breaker,
    metrics: StoreMetrics,
    /// Names the store in logs (metrics take it from `StoreMetrics`).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    name: String,
    concurrency_script: fred::types::scripts::Script,
    deny: Option<deny::DenyCache>,
    origin: Instant,
    server_clock: ServerClock,
}

impl Inner {
    /// Now, in the store's nanoseconds: the test clock if one is set, else the monotonic clock.
    fn now_ns(&self) -> u64 {
        match &self.clock {
            Some(c) => c.now_ns(),
            None => u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// The monotonic clock in µs, whatever the test clock says: what deadlines are measured in.
    fn local_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn timeout_us(&self) -> u64 {
        u64::try_from(self.timeout.as_micros()).unwrap_or(u64::MAX)
    }

    /// Reads the server's `TIME` (to learn its clock) and version; an error for a server too
    /// old to run the script.
    async fn learn_server(&self) -> Result<(), Error> {
        let client = self.client.with_options(&self.options);
        for _ in 0..3 {
            let sent = self.local_us();
            let time: Result<Vec<i64>, _> = client
                .custom(
                    CustomCommand::new_static("TIME", ClusterHash::Random, false),
                    Vec::<Value>::new(),
                )
                .await;
            if let Ok([secs, micros]) = time.as_deref() {
                self.server_clock.sample(
                    sent,
                    self.local_us(),
                    secs.saturating_mul(1_000_000).saturating_add(*micros),
                );
            }
        }
        let info: Result<String, _> = client
            .custom(
                CustomCommand::new_static("INFO", ClusterHash::Random, false),
                vec!["server"],
            )
            .await;
        if let Some(version) = info.ok().as_deref().and_then(redis_version)
            && !version_at_least(version, MIN_REDIS_VERSION)
        {
            #[cfg(feature = "tracing")]
            tracing::error!(
                store = %self.name,
                version,
                "rate-limit-misconfigured: Redis {version} is too old for tollgate, which \
                 needs {}.{} or newer; every decision will fail",
                MIN_REDIS_VERSION.0,
                MIN_REDIS_VERSION.1
            );
            return Err(Error::ServerTooOld {
                version: version.to_owned(),
            });
        }
        Ok(())
    }
}

/// The `redis_version` of an `INFO server` reply.
fn redis_version(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
}

/// Whether `version` (`major.minor.patch`) is at least `min`.
fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

/// The circuit breaker: after `threshold` consecutive calls that timed out or found no
/// connection, stop asking Redis (each call fails at once with `circuit_open`) and probe it in
/// the background until it answers.
struct Breaker {
    threshold: u32,
    probe_interval: Duration,
    failures: AtomicU32,
    open: AtomicBool,
}

impl RedisStore {
    /// Configures a store for a server given by URL, as fred reads them:
    ///
    /// - `redis://[[user]:password@]host:port[/db]`, `rediss://` for TLS (feature `tls`);
    /// - `redis-cluster://host:port?node=host2:port2&node=...` for a Redis Cluster;
    /// - `redis-sentinel://host:26379/db?sentinelServiceName=name&node=host2:26379` for Sentinel.
    ///
    /// # Errors
    ///
    /// [`Error::Url`] when the URL cannot be read.
    pub fn builder(url: &str) -> Result<RedisStoreBuilder, Error> {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        if !SCHEMES.contains(&scheme) {
            return Err(Error::Scheme { url: redact(url) });
        }
        let config = Config::from_url(url).map_err(|source| Error::Url {
            url: redact(url),
            source,
        })?;
        Ok(Self::builder_from_config(config))
    }

    /// Configures a store from a fred [`Config`].
    pub fn builder_from_config(config: Config) -> RedisStoreBuilder {
        RedisStoreBuilder {
            config,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_queued: DEFAULT_MAX_QUEUED,
            reconnect: ReconnectPolicy::new_exponential(0, 100, 2_000, 2),
            clock: None,
            fallback: None,
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            name: "redis".to_owned(),
            deny_cache: DEFAULT_DENY_CACHE,
            deny_cache_ttl: DEFAULT_DENY_CACHE_TTL,
        }
    }

    /// The fred client, for health checks or other commands.
    pub fn client(&self) -> &fred::clients::Client {
        &self.inner.client
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.inner.client.is_connected()
    }

    /// Whether the store is degraded: its circuit breaker is open, so calls fail at once (or go
    /// to the fallback store) while it probes Redis in the background.
    pub fn is_degraded(&self) -> bool {
        self.inner.breaker.open.load(Ordering::Acquire)
    }

    /// Waits until the client is connected, at most `timeout`. A store works without this (it
    /// fails each call at once until it is connected); call it where start-up should wait.
    ///
    /// # Errors
    ///
    /// [`Error::NotConnected`] when the client did not connect in time.
    ///
    /// Once connected it reads the server's clock (so that every decision can carry a deadline
    /// on it from the first request) and its version.
    ///
    /// [`Error::ServerTooOld`] when the server is older than Redis 3.2, which cannot run the
    /// script.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        match tokio::time::timeout(timeout, self.inner.client.wait_for_connect()).await {
            Ok(Ok(())) => self.inner.learn_server().await,
            Ok(Err(source)) => Err(Error::NotConnected {
                waited: timeout,
                source: Some(source),
            }),
            Err(_) => Err(Error::NotConnected {
                waited: timeout,
                source: None,
            }),
        }
    }

    /// The Redis key of `quota`'s state for `key`:
    /// `<prefix>{<policy>:<route>:<ip>:<user>}:<quota id>`, for example
    /// `tollgate:{login:/login:192.0.2.1:}:3/m`.
    ///
    /// The braces are the Redis Cluster hash tag: all quotas of one request live in one slot.
    /// Every part inside is escaped (see [`Key::qualified`]), so no request content can add a
    /// brace and move the slot, or a separator and reach another client's state. The state is
    /// named by the quota itself ([`Quota::id`]), not by its place in the policy.
    pub fn redis_key(&self, key: &Key<'_>, quota: &Quota) -> String {
        script::state_key(&self.inner.prefix, &key.qualified().to_string(), quota)
    }

    /// Forgets `key`'s state under `quotas` in Redis, and this instance's cached refusals of
    /// it (and its state in the fallback store, if any): the key's next request starts with a
    /// full budget. For operators unblocking a client; see docs/operations.md. Other instances
    /// keep a cached refusal for at most the deny cache's time to live
    /// ([`RedisStoreBuilder::deny_cache_ttl`]).
    ///
    /// # Errors
    ///
    /// When Redis cannot be reached or does not answer within the store's deadline.
    pub async fn reset(&self, key: &Key<'_>, quotas: &[Quota]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let tag = key.qualified().to_string();
        if let Some(deny) = &inner.deny {
            deny.forget(&tag);
        }
        if let Some(fallback) = &inner.fallback {
            fallback.reset(key, quotas);
        }
        if quotas.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = quotas
            .iter()
            .map(|q| script::state_key(&inner.prefix, &tag, q))
            .collect();
        let client = inner.client.with_options(&inner.options);
        match tokio::time::timeout(inner.timeout, client.del::<i64, _>(keys)).await {
            Err(_) => Err(StoreError::new(StoreErrorKind::Timeout)),
            Ok(Err(e)) => Err(classify(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("connected", &self.inner.client.is_connected())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Records a call that reached Redis and got an answer.
    fn succeeded(&self) {
        self.breaker.failures.store(0, Ordering::Relaxed);
    }

    /// Records a failed call; opens the circuit after enough consecutive connection failures.
    fn failed(self: &Arc<Self>, kind: StoreErrorKind) {
        self.metrics.error(kind);
        if !matches!(kind, StoreErrorKind::Timeout | StoreErrorKind::Unavailable) {
            // Redis answered (a script error, garbage): it is reachable.
            return;
        }
        let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= self.breaker.threshold
            && self
                .breaker
                .open
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.metrics.degraded(true);
            #[cfg(feature = "tracing")]
            tracing::warn!(
                store = %self.name,
                consecutive_failures = failures,
                last_reason = kind.reason(),
                fallback = self.fallback.is_some(),
                "rate-limit-degraded: Redis is not answering; circuit open, requests are decided \
                 without it (fallback store, or each policy's failure mode) until it answers again"
            );
            let inner = Arc::clone(self);
            tokio::spawn(async move { inner.probe().await });
        }
    }

    /// Pings Redis every probe interval until it answers, then closes the circuit.
    async fn probe(self: Arc<Self>) {
        #[cfg(feature = "tracing")]
        let started = Instant::now();
        let mut attempts = 0u64;
        loop {
            tokio::time::sleep(self.breaker.probe_interval).await;
            attempts += 1;
            // TIME rather than PING: it also tells the clock of a server that may be a new one
            // (restarted, failed over).
            let client = self.client.with_options(&self.options);
            let sent = self.local_us();
            let time = tokio::time::timeout(
                self.timeout,
                client.custom::<Vec<i64>, Value>(
                    CustomCommand::new_static("TIME", ClusterHash::Random, false),
                    Vec::new(),
                ),
            )
            .await;
            if let Ok(Ok(time)) = time {
                if let [secs, micros] = time.as_slice() {
                    self.server_clock.sample(
                        sent,
                        self.local_us(),
                        secs.saturating_mul(1_000_000).saturating_add(*micros),
                    );
                }
                self.breaker.failures.store(0, Ordering::Relaxed);
                self.breaker.open.store(false, Ordering::Release);
                self.metrics.degraded(false);
                #[cfg(feature = "tracing")]
                tracing::info!(
                    store = %self.name,
                    down_for = ?started.elapsed(),
                    probes = attempts,
                    "rate-limit-recovered: Redis answers again; circuit closed, limits are shared again"
                );
                return;
            }
            // A summary every 30 s while it stays down.
            if attempts.is_multiple_of(
                (30_000 / self.breaker.probe_interval.as_millis().max(1) as u64).max(1),
            ) {
                #[cfg(feature = "tracing")]
                tracing::warn!(
                    store = %self.name,
                    down_for = ?started.elapsed(),
                    "rate-limit-degraded: Redis still not answering"
                );
            }
        }
    }

    /// EVALSHA, and on NOSCRIPT (a restarted or failed-over server lost its script cache)
    /// SCRIPT LOAD on every primary and EVALSHA once more. NOSCRIPT means the script did not
    /// run, so the retry cannot count the request twice; nothing else is retried.
    async fn eval(&self, keys: Vec<String>, args: Vec<i64>) -> Result<Value, FredError> {
        self.eval_script(&self.script, GCRA_SCRIPT, keys, args)
            .await
    }

    async fn eval_script<A>(
        &self,
        script: &fred::types::scripts::Script,
        source: &'static str,
        keys: Vec<String>,
        args: Vec<A>,
    ) -> Result<Value, FredError>
    where
        A: Into<Value> + Clone + Send,
    {
        // fred fails most commands at once while it is not connected (`fail_fast`), but not
        // EVAL/EVALSHA, which wait in its queue for the whole deadline (seen with fred
        // 10.1.0): check the connection here, so that a call while the connection is down
        // fails at once, as documented, instead of costing every request the deadline.
        if !self.client.is_connected() {
            return Err(FredError::new(
                FredErrorKind::Canceled,
                "not connected to Redis",
            ));
        }
        let client = self.client.with_options(&self.options);
        let sha = script.sha1().clone();
        let args: Vec<Value> = args.into_iter().map(Into::into).collect();
        match client
            .evalsha::<Value, _, _, _>(sha.clone(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                #[cfg(feature = "tracing")]
                tracing::info!("rate-limit script not in the Redis script cache; loading it");
                client.script_load_cluster::<(), _>(source).await?;
                client.evalsha(sha, keys, args).await
            }
            other => other,
        }
    }
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

impl Store for RedisStore {
    type Future = CheckFuture;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        if let Err(e) = StoreError::check_cost(quotas, cost) {
            return Box::pin(std::future::ready(Err(e)));
        }
        if quotas.is_empty() {
            return Box::pin(std::future::ready(Ok(Decision::from_states([]))));
        }
        let inner = &self.inner;
        let tag = key.qualified().to_string();
        if let Some(deny) = &inner.deny
            && let Some(refusal) = deny.get(&tag, cost, inner.now_ns())
        {
            inner.metrics.deny_cache_hit();
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        if inner.breaker.open.load(Ordering::Acquire) {
            // Known down: no round trip, no waiting.
            inner.metrics.error(StoreErrorKind::CircuitOpen);
            let result = match &inner.fallback {
                Some(fallback) => fallback
                    .decide(key, quotas, cost)
                    .map(|d| d.into_fallback(StoreErrorKind::CircuitOpen)),
                None => Err(StoreError::new(StoreErrorKind::CircuitOpen)),
            };
            return Box::pin(std::future::ready(result));
        }
        let keys: Vec<String> = quotas
            .iter()
            .map(|q| script::state_key(&inner.prefix, &tag, q))
            .collect();
        // A test clock replaces the server's; then there is no server time to set a deadline
        // on.
        let test_now_us = inner
            .clock
            .as_ref()
            .map(|c| i64::try_from(c.now_ns() / 1_000).unwrap_or(i64::MAX));
        let mut args = script::args(key, quotas, cost, test_now_us.unwrap_or(-1), -1);
        let quotas = quotas.to_vec();
        // The fallback decides after the round trip failed, so it needs its own copy of the key.
        let owned_key = inner.fallback.as_ref().map(|_| OwnedKey::from(key));
        let inner = Arc::clone(inner);
        Box::pin(async move {
            let started = Instant::now();
            let sent = inner.local_us();
            if test_now_us.is_none() {
                // The script must not write once the caller has given up: tell it when, on the
                // server's clock.
                args[2] = inner.server_clock.deadline(sent, inner.timeout_us());
            }
            let result = match tokio::time::timeout(inner.timeout, inner.eval(keys, args)).await {
                Err(_) => Err(StoreError::new(StoreErrorKind::Timeout)),
                Ok(Err(e)) => Err(classify(e)),
                Ok(Ok(reply)) => script::parse_reply(&reply, &quotas),
            };
            inner.metrics.duration(started.elapsed());
            let result = result.and_then(|reply| {
                if test_now_us.is_none() {
                    inner
                        .server_clock
                        .sample(sent, inner.local_us(), reply.now_us());
                }
                match reply {
                    Reply::Decided { decision, .. } => Ok(decision),
                    Reply::Late { .. } => Err(StoreError::with_source(
                        StoreErrorKind::Timeout,
                        "the script ran after its deadline and wrote nothing",
                    )),
                }
            });
            match result {
                Ok(decision) => {
                    inner.succeeded();
                    if let Some(deny) = &inner.deny {
                        if decision.is_limited() {
                            deny.put(&tag, cost, &decision, inner.now_ns());
                        } else {
                            deny.forget(&tag);
                        }
                    }
                    Ok(decision)
                }
                Err(e) => {
                    inner.failed(e.kind());
                    match (&inner.fallback, owned_key) {
                        (Some(fallback), Some(k)) => fallback
                            .decide(&k.key(), &quotas, cost)
                            .map(|d| d.into_fallback(e.kind())),
                        _ => Err(e),
                    }
                }
            }
        })
    }
}

/// Maps a fred error to the reason the layer counts it under.
fn classify(e: FredError) -> StoreError {
    let kind = match e.kind() {
        FredErrorKind::Timeout => StoreErrorKind::Timeout,
        FredErrorKind::IO
        | FredErrorKind::Canceled
        | FredErrorKind::Backpressure
        | FredErrorKind::Routing
        | FredErrorKind::Cluster
        | FredErrorKind::Sentinel
        | FredErrorKind::Auth => StoreErrorKind::Unavailable,
        #[cfg(feature = "tls")]
        FredErrorKind::Tls => StoreErrorKind::Unavailable,
        FredErrorKind::Protocol | FredErrorKind::Parse => StoreErrorKind::InvalidResponse,
        _ if is_script_error(e.details()) => StoreErrorKind::Script,
        _ if is_unavailable(e.details()) => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Other,
    };
    StoreError::with_source(kind, e)
}

fn is_script_error(details: &str) -> bool {
    [
        "NOSCRIPT",
        "ERR Error running script",
        "user_script",
        "ERR Error compiling script",
    ]
    .iter()
    .any(|p| details.contains(p))
}

fn is_unavailable(details: &str) -> bool {
    [
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "READONLY",
    ]
    .iter()
    .any(|p| details.starts_with(p))
}

/// Settings of a [`RedisStore`].
#[must_use]
pub struct RedisStoreBuilder {
    config: Config,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    max_queued: usize,
    reconnect: ReconnectPolicy,
    clock: Option<Arc<dyn Clock>>,
    fallback: Option<MemoryStore>,
    breaker_threshold: u32,
    probe_interval: Duration,
    name: String,
    deny_cache: usize,
    deny_cache_ttl: Duration,
}

impl RedisStoreBuilder {
    /// How many refused keys to remember (default 10 000; 0 turns the cache off). Once Redis
    /// refuses a key until some moment, further requests of that key (of the same cost or more)
    /// are refused locally until then, without a round trip: a client hammering past its limit
    /// costs Redis nothing. The cache only ever refuses what Redis refused, for as long as Redis
    /// said (measured from when the answer arrived, so never shorter). Hits are counted in
    /// `ratelimit_deny_cache_hits_total`.
    pub fn deny_cache(mut self, max_keys: usize) -> Self {
        self.deny_cache = max_keys;
        self
    }

    /// The longest a cached refusal is trusted (default 10 s; at most Redis's own wait). A
    /// refusal Redis gave for a daily window would otherwise be answered locally for up to a
    /// day, so an operator's [`RedisStore::reset`] would not reach the other instances for as
    /// long; with this cap they ask Redis again after at most this long.
    pub fn deny_cache_ttl(mut self, ttl: Duration) -> Self {
        self.deny_cache_ttl = ttl;
        self
    }

    /// Decides with this in-process store whenever Redis cannot (down, slow, circuit open),
    /// instead of leaving each request to its policy's failure mode. The limit is then enforced
    /// per instance (N instances let a client through up to N times the limit), which is looser
    /// than the shared limit but far better than none. Such decisions are counted in
    /// `ratelimit_fallback_total`. Off by default.
    pub fn fallback(mut self, store: MemoryStore) -> Self {
        self.fallback = Some(store);
        self
    }

    /// Opens the circuit after this many consecutive calls that timed out or found no
    /// connection (default 5; at least 1).
    pub fn breaker_threshold(mut self, failures: u32) -> Self {
        self.breaker_threshold = failures.max(1);
        self
    }

    /// How often an open circuit pings Redis to find out whether it is back (default 500 ms).
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The `store` label of this store's metrics and logs (default `redis`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The prefix of every key (default `tollgate:`). Use one per application sharing a server.
    /// At most 64 bytes, without `{` or `}` (they would change the cluster hash tag).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The deadline of each decision, round trips and a script reload included (default
    /// 100 ms). Past it the request is decided by the policy's failure mode.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long one connection attempt may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most commands queued in the client (default 10 000). Past it, calls fail at once
    /// instead of piling up behind a slow server.
    pub fn max_queued(mut self, max: usize) -> Self {
        self.max_queued = max;
        self
    }

    /// How to reconnect (default: forever, exponential backoff from 100 ms to 2 s, with jitter).
    pub fn reconnect_policy(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Decides with this clock instead of the Redis server's `TIME`. **For tests only**: it
    /// makes decisions reproducible, but instances with different clocks would disagree, which
    /// is exactly what the server clock prevents.
    pub fn clock<C: Clock>(mut self, clock: C) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Builds the store and starts connecting in the background. Calls fail (and the layer
    /// applies the failure mode) until the connection is up; see
    /// [`RedisStore::wait_connected`].
    ///
    /// # Errors
    ///
    /// [`Error::Prefix`] for a prefix that cannot work, [`Error::Config`] when fred refuses the
    /// configuration, [`Error::NoRuntime`] outside a Tokio runtime.
    pub fn build(self) -> Result<RedisStore, Error> {
        if self.prefix.len() > MAX_PREFIX_LEN
            || self.prefix.contains(['{', '}'])
            || self
                .prefix
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Error::Prefix(self.prefix));
        }
        if self.timeout.is_zero() {
            return Err(Error::Timeout);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let mut config = self.config;
        // Keep trying when the server is not there at start-up; the layer fails open (or
        // closed) meanwhile.
        config.fail_fast = false;
        let timeout = self.timeout;
        let connect_timeout = self.connect_timeout;
        let max_queued = self.max_queued;
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = connect_timeout;
                // Never write a command twice: a resent script would count the request twice.
                c.max_command_attempts = 1;
                c.max_command_buffer_len = max_queued;
                // Notice a server that stopped answering (frozen, partitioned) and reconnect.
                c.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(connect_timeout),
                    interval: Duration::from_millis(500),
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .set_policy(self.reconnect);
        let client = builder.build().map_err(Error::Config)?;
        let _connection = client.connect();
        let options = Options {
            max_attempts: Some(1),
            timeout: Some(timeout),
            fail_fast: true,
            ..Options::default()
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                script: fred::types::scripts::Script::from_lua(GCRA_SCRIPT),
                options,
                prefix: self.prefix,
                timeout,
                clock: self.clock,
                fallback: self.fallback,
                breaker: Breaker {
                    threshold: self.breaker_threshold,
                    probe_interval: self.probe_interval,
                    failures: AtomicU32::new(0),
                    open: AtomicBool::new(false),
                },
                metrics: StoreMetrics::new(&self.name),
                name: self.name,
                concurrency_script: fred::types::scripts::Script::from_lua(CONCURRENCY_SCRIPT),
                deny: (self.deny_cache > 0)
                    .then(|| deny::DenyCache::new(self.deny_cache, self.deny_cache_ttl)),
                origin: Instant::now(),
                server_clock: ServerClock::new(),
            }),
        })
    }
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_queued", &self.max_queued)
            .field("fallback", &self.fallback.is_some())
            .field("breaker_threshold", &self.breaker_threshold)
            .field("probe_interval", &self.probe_interval)
            .field("deny_cache", &self.deny_cache)
            .field("deny_cache_ttl", &self.deny_cache_ttl)
            .finish_non_exhaustive()
    }
}

/// Why a [`RedisStore`] could not be built or connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL could not be read.
    #[error(
        "invalid Redis URL {url:?}: {source} (a password holding '/', '@', '?', '#' or ':' must \
         be percent-encoded, e.g. '/' as %2F)"
    )]
    Url {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// fred's reason.
        source: FredError,
    },
    /// The URL's scheme is not one of Redis's.
    #[error(
        "invalid Redis URL {url:?}: expected redis://, rediss://, redis-cluster://, \
         redis-sentinel:// (or their rediss-/valkey variants)"
    )]
    Scheme {
        /// The URL, with any password replaced by `***`.
        url: String,
    },
    /// The key prefix cannot work.
    #[error(
        "invalid key prefix {0:?}: use at most 64 bytes without braces, spaces or control characters"
    )]
    Prefix(String),
    /// A zero deadline would fail every call.
    #[error("the store timeout must be longer than zero")]
    Timeout,
    /// fred refused the configuration.
    #[error("invalid Redis client configuration: {0}")]
    Config(#[source] FredError),
    /// `build` was called outside a Tokio runtime.
    #[error("RedisStore::build must be called inside a Tokio runtime")]
    NoRuntime,
    /// The server is older than Redis 3.2 and cannot run the script.
    #[error("Redis {version} is too old: tollgate needs Redis 3.2 or newer")]
    ServerTooOld {
        /// The server's `redis_version`.
        version: String,
    },
    /// The client did not connect in time.
    #[error("not connected to Redis after {waited:?}")]
    NotConnected {
        /// How long it waited.
        waited: Duration,
        /// The connection error, if one was reported.
        #[source]
        source: Option<FredError>,
    },
}

/// The URL with every secret replaced by `***`, for error messages and logs.
///
/// The userinfo is everything up to the **last** `@`, since a password may hold `/`, `?`, `#`,
/// `:` or `@` (written raw by mistake, or percent-encoded); the user name before the first `:`
/// is kept. A userinfo without `:` is hidden whole (some clients read it as a password). Query
/// parameters whose name mentions a password, secret, token or auth (fred's
/// `sentinelPassword`) are hidden too. It only ever hides too much, never too little.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        Some(at) => {
            match rest[..at].split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#', '@']) => {
                    out.push_str(user);
                    out.push_str(":***@");
                }
                _ => out.push_str("***@"),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    match rest.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _)) if is_secret_param(name) => {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(rest),
    }
    out
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token", "auth"]
        .iter()
        .any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

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
