//! Settings of a store, and connecting it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::time::{Duration, Instant};

use fred::prelude::{Builder, ClientLike, Config, Options, ReconnectPolicy};
use fred::types::config::UnresponsiveConfig;
use fred::types::scripts::Script;
use tollgate::MemoryStore;
use tollgate::clock::Clock;
use tollgate::metrics::StoreMetrics;

use crate::batch::{Coalescer, Runner};
use crate::breaker::Breaker;
use crate::deny;
use crate::error::*;
use crate::server_clock::ServerClock;
use crate::store::*;

pub(crate) const DEFAULT_PREFIX: &str = "tollgate:";
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_MAX_QUEUED: usize = 10_000;
pub(crate) const MAX_PREFIX_LEN: usize = 64;
pub(crate) const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
pub(crate) const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(500);
pub(crate) const DEFAULT_DENY_CACHE: usize = 10_000;
pub(crate) const DEFAULT_DENY_CACHE_TTL: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_MAX_BATCH: usize = 64;
pub(crate) const MAX_BATCH: usize = 1_024;
/// The oldest Redis this store runs on: `redis.replicate_commands()`, which lets the script
/// write after reading `TIME`, came with 3.2 (and is the only behaviour from 5 on).
pub(crate) const MIN_REDIS_VERSION: (u32, u32) = (3, 2);
pub(crate) const SCHEMES: [&str; 8] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
    "valkey",
    "valkeys",
];

/// Whether a URL scheme asks for TLS: `rediss` and `valkeys`, alone or with `-cluster` or
/// `-sentinel`.
pub(crate) fn is_tls_scheme(scheme: &str) -> bool {
    let base = scheme.split('-').next().unwrap_or(scheme);
    base == "rediss" || base == "valkeys"
}

/// Settings of a [`RedisStore`].
#[must_use]
pub struct RedisStoreBuilder {
    pub(crate) config: Config,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_queued: usize,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) fallback: Option<MemoryStore>,
    pub(crate) breaker_threshold: u32,
    pub(crate) probe_interval: Duration,
    pub(crate) name: String,
    pub(crate) deny_cache: usize,
    pub(crate) deny_cache_ttl: Duration,
    pub(crate) max_batch: usize,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::RedisTls>,
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

    /// The most checks sent in one script call (default 64; 1 to 1024). The checks that are in
    /// flight at the same moment go to Redis together, as one `EVALSHA` that decides them one
    /// after the other: the same decisions as one call each, for less work on both sides
    /// (docs/redis.md, "Coalescing"). A check never waits for others that are not already on
    /// their way: it goes once the tasks that were ready with it (the other requests read in the
    /// same pass over the sockets) have queued theirs (at most 16 passes of the scheduler, no
    /// timer), and queues longer only while four calls of its hash slot are out. 1 sends every
    /// check in a call of its own.
    pub fn max_batch(mut self, checks: usize) -> Self {
        self.max_batch = checks.clamp(1, MAX_BATCH);
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

    /// TLS settings for a `rediss://` URL: the CA certificates to trust (a private CA) and a
    /// client certificate for mutual TLS; see [`RedisTls`](crate::RedisTls). Without them a
    /// `rediss://` store trusts the system's roots. Refused when the URL does not ask for TLS.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::RedisTls) -> Self {
        self.tls = Some(tls);
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

    /// The most commands queued in the client, and the most checks waiting to be sent
    /// (default 10 000 each). Past it, calls fail at once instead of piling up behind a slow
    /// server.
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
        let clustered = config.server.is_clustered();
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let Some(current) = &config.tls else {
                return Err(Error::Tls(
                    "TLS settings were given for a URL without TLS: use rediss:// (or \
                     rediss-cluster://, rediss-sentinel://)"
                        .into(),
                ));
            };
            config.tls = Some(fred::types::config::TlsConfig {
                connector: tls.client_config()?.into(),
                hostnames: current.hostnames.clone(),
            });
        }
        // Keep trying when the server is not there at start-up; the layer fails open (or
        // closed) meanwhile.
        config.fail_fast = false;
        let timeout = self.timeout;
        let connect_timeout = self.connect_timeout;
        let max_queued = self.max_queued;
        #[cfg(feature = "tls")]
        let tls = config.tls.is_some();
        #[cfg(not(feature = "tls"))]
        let tls = false;
        let servers = config
            .server
            .hosts()
            .iter()
            .map(|s| format!("{}:{}", s.host, s.port))
            .collect::<Vec<_>>()
            .join(",");
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
        let metrics = StoreMetrics::new(&self.name);
        let link = Arc::new(crate::link::Link::new(
            metrics.clone(),
            self.name.clone(),
            servers,
            tls,
        ));
        watch_connection(&client, &link);
        let _connection = client.connect();
        let options = Options {
            max_attempts: Some(1),
            timeout: Some(timeout),
            fail_fast: true,
            ..Options::default()
        };
        Ok(RedisStore {
            inner: Arc::new(Inner {
                checks: Coalescer::start(
                    Runner {
                        client: client.clone(),
                        options: options.clone(),
                        script: Script::from_lua(crate::script::RATE_LIMIT_SCRIPT),
                        source: crate::script::RATE_LIMIT_SCRIPT,
                        metrics: metrics.clone(),
                    },
                    self.max_batch,
                    max_queued,
                    clustered,
                    // A test clock replaces the server's: then each check sends its own time.
                    if self.clock.is_some() {
                        crate::script::Times::Given
                    } else {
                        crate::script::Times::Deadlines
                    },
                ),
                concurrency: Runner {
                    client: client.clone(),
                    options: options.clone(),
                    script: Script::from_lua(crate::script::CONCURRENCY_SCRIPT),
                    source: crate::script::CONCURRENCY_SCRIPT,
                    metrics: metrics.clone(),
                },
                client,
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
                metrics,
                name: self.name,
                deny: (self.deny_cache > 0)
                    .then(|| deny::DenyCache::new(self.deny_cache, self.deny_cache_ttl)),
                origin: Instant::now(),
                server_clock: ServerClock::new(),
                link,
            }),
        })
    }
}

/// Follows fred's reports of failed connection attempts and reconnections into `link`. The
/// tasks end when the client is dropped (its channels close).
fn watch_connection(client: &fred::clients::Client, link: &Arc<crate::link::Link>) {
    use fred::interfaces::EventInterface;
    let failed = Arc::clone(link);
    // Detached: the tasks run on their own until the client's channels close.
    drop(client.on_error(move |(e, _server)| {
        failed.failed(&e);
        async { Ok(()) }
    }));
    let connected = Arc::clone(link);
    drop(client.on_reconnect(move |_server| {
        connected.connected();
        async { Ok(()) }
    }));
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
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}
