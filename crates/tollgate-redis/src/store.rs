//! The store: a script on the server's clock decides each check (calls shared by the checks in
//! flight at once, `batch.rs`), with the deny cache, the fallback and the breaker in front.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fred::prelude::{ClientLike, Config, KeysInterface, Options, ReconnectPolicy, Value};
use fred::types::{ClusterHash, CustomCommand};
use smallvec::SmallVec;
use tollgate::clock::Clock;
use tollgate::metrics::StoreMetrics;
use tollgate::store::OwnedKey;
use tollgate::{Decision, Key, MemoryStore, Quota, Store, StoreError, StoreErrorKind};

use crate::batch::{Coalescer, Runner};
use crate::breaker::Breaker;
use crate::builder::*;
use crate::deny;
use crate::error::*;
use crate::script::{self, Reply};
use crate::server_clock::ServerClock;

/// Rate-limit state in Redis, shared by every instance that uses the same server and prefix.
///
/// Cheap to clone: clones share one client (one connection per server node, pipelined).
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: fred::clients::Client,
    /// Sends the rate-limit checks, coalescing those in flight at the same moment.
    pub(crate) checks: Coalescer,
    pub(crate) options: Options,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) fallback: Option<MemoryStore>,
    pub(crate) breaker: Breaker,
    pub(crate) metrics: StoreMetrics,
    /// Names the store in logs (metrics take it from `StoreMetrics`).
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) name: String,
    pub(crate) concurrency: Runner,
    pub(crate) deny: Option<deny::DenyCache>,
    pub(crate) origin: Instant,
    pub(crate) server_clock: ServerClock,
    /// Why the store cannot connect, when it cannot.
    pub(crate) link: Arc<crate::link::Link>,
}

impl Inner {
    /// `err` with the connection's cause as its kind, when the store is not connected for a
    /// known reason (a refused password, a failed TLS handshake, ...).
    pub(crate) fn explain(&self, err: StoreError) -> StoreError {
        if self.client.is_connected() {
            return err;
        }
        let kind = self.link.explain(err.kind());
        if kind == err.kind() {
            err
        } else {
            StoreError::with_source(kind, err)
        }
    }

    /// Now, in the store's nanoseconds: the test clock if one is set, else the monotonic clock.
    pub(crate) fn now_ns(&self) -> u64 {
        match &self.clock {
            Some(c) => c.now_ns(),
            None => u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// The monotonic clock in µs, whatever the test clock says: what deadlines are measured in.
    pub(crate) fn local_us(&self) -> u64 {
        self.local_us_at(Instant::now())
    }

    /// [`local_us`](Self::local_us) at `t`: one reading of the clock serves for the
    /// metrics' duration and the deadline's arithmetic.
    pub(crate) fn local_us_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn timeout_us(&self) -> u64 {
        u64::try_from(self.timeout.as_micros()).unwrap_or(u64::MAX)
    }

    /// Reads the server's `TIME` (to learn its clock) and version; an error for a server too
    /// old to run the script.
    pub(crate) async fn learn_server(&self) -> Result<(), Error> {
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
pub(crate) fn redis_version(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
}

/// Whether `version` (`major.minor.patch`) is at least `min`.
pub(crate) fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
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
        if is_tls_scheme(scheme) && !cfg!(feature = "tls") {
            return Err(Error::TlsDisabled { url: redact(url) });
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
            max_batch: DEFAULT_MAX_BATCH,
            #[cfg(feature = "tls")]
            tls: None,
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
                cause: self.inner.link.cause().map(|c| c.message),
                source: Some(source),
            }),
            Err(_) => Err(Error::NotConnected {
                waited: timeout,
                cause: self.inner.link.cause().map(|c| c.message),
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
        crate::keys::first_state_key(&self.inner.prefix, key, quota).0
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
        if let Some(deny) = &inner.deny {
            deny.forget(deny.key(&crate::keys::tag(key)));
        }
        if let Some(fallback) = &inner.fallback {
            fallback.reset(key, quotas);
        }
        if quotas.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = quotas
            .iter()
            .map(|q| crate::keys::first_state_key(&inner.prefix, key, q).0)
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

pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

impl Store for RedisStore {
    type Future = CheckFuture;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        if let Err(e) = StoreError::check_cost(quotas, cost) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let Some((first_quota, other_quotas)) = quotas.split_first() else {
            return Box::pin(std::future::ready(Ok(Decision::from_states([]))));
        };
        let inner = &self.inner;
        // The first quota's state key, named before the deny cache is asked, which hashes the
        // tag inside it: a refusal found there costs this one allocation, as the tag alone did.
        let (first_key, tag) = crate::keys::first_state_key(&inner.prefix, key, first_quota);
        // Hashed once, for the look-up here and the update when the answer comes.
        let deny_key = inner
            .deny
            .as_ref()
            .map(|deny| deny.key(&first_key[tag.clone()]));
        if let (Some(deny), Some(deny_key)) = (&inner.deny, deny_key)
            && let Some(refusal) = deny.get(deny_key, cost, inner.now_ns())
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
        // One state key per quota; most policies have one, kept inline.
        let keys = crate::keys::state_keys(first_key, tag.end, other_quotas);
        // A test clock replaces the server's; then there is no server time to set a deadline
        // on.
        let test_now_us = inner
            .clock
            .as_ref()
            .map(|c| i64::try_from(c.now_ns() / 1_000).unwrap_or(i64::MAX));
        let mut args = script::CheckArgs::new(key, quotas, cost);
        if let Some(now_us) = test_now_us {
            args.set_time(now_us);
        }
        // Most policies have one or two quotas: kept inline, not in an allocation of their own.
        let quotas: SmallVec<[Quota; 2]> = SmallVec::from_slice(quotas);
        // The fallback decides after the round trip failed, so it needs its own copy of the key.
        let owned_key = inner.fallback.as_ref().map(|_| OwnedKey::from(key));
        let inner = Arc::clone(inner);
        Box::pin(async move {
            // Tokio's clock, which is the system's unless a test pauses it: the deadline is
            // kept by a Tokio timer (the sending task's, one for every check).
            let now = tokio::time::Instant::now();
            let started = now.into_std();
            let sent = inner.local_us_at(started);
            if test_now_us.is_none() {
                // The script must not write once the caller has given up: tell it when, on the
                // server's clock.
                args.set_time(inner.server_clock.deadline(sent, inner.timeout_us()));
            }
            // An absurd deadline (`Duration::MAX`) is as good as none, never an overflow.
            let deadline = now
                .checked_add(inner.timeout)
                .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
            let result = match inner.checks.check(keys, args, deadline).await {
                Err(e) => Err(inner.explain(classify(e))),
                Ok(reply) => script::parse_reply(&reply, &quotas),
            };
            // The same clock as `started` (Tokio's, the system's unless a test pauses it).
            let answered = tokio::time::Instant::now().into_std();
            inner
                .metrics
                .duration(answered.saturating_duration_since(started));
            let result = result.and_then(|reply| {
                if test_now_us.is_none() {
                    inner
                        .server_clock
                        .sample(sent, inner.local_us_at(answered), reply.now_us());
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
                    if let (Some(deny), Some(deny_key)) = (&inner.deny, deny_key) {
                        if decision.is_limited() {
                            deny.put(deny_key, cost, &decision, inner.now_ns());
                        } else {
                            deny.forget(deny_key);
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
