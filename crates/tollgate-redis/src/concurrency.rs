//! Concurrency slots in Redis: leases that expire unless renewed.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::Value;
use tokio::task::JoinHandle;
use tollgate::concurrency::{Acquire, ConcurrencyStore};
use tollgate::{Key, StoreError, StoreErrorKind};

use crate::{CONCURRENCY_SCRIPT, Inner, RedisStore, classify};

/// A [`ConcurrencyStore`] in Redis: at most N requests of a key in flight across every instance.
///
/// Each slot is a lease in a sorted set (`<prefix>{<key>}:inflight`, member = a unique lease id,
/// score = its expiry on the server's clock), taken and given back by one script
/// ([`CONCURRENCY_SCRIPT`]) that first drops expired leases. A request's lease is renewed every
/// third of the lease time while the request runs, and released when its
/// [`RedisPermit`] is dropped: when the response body ends or is dropped, the client
/// disconnects, or the handler panics. An instance that dies holding slots stops renewing them,
/// and they come back after at most one lease time.
///
/// Built from a [`RedisStore`], whose connection, deadline and circuit breaker it shares:
///
/// ```no_run
/// use std::time::Duration;
/// use tollgate::concurrency::{ConcurrencyLimitLayer, ConcurrencyPolicy};
/// use tollgate_redis::RedisStore;
///
/// # fn f() -> Result<(), tollgate_redis::Error> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379")?.build()?;
/// let exports = ConcurrencyLimitLayer::new(store.concurrency(Duration::from_secs(30)))
///     .route("/export", ConcurrencyPolicy::new("export", 2));
/// # let _ = exports; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConcurrencyStore {
    inner: Arc<Inner>,
    lease: Duration,
    ids: Arc<LeaseIds>,
}

struct LeaseIds {
    instance: u64,
    next: AtomicU64,
}

impl RedisStore {
    /// A concurrency store on the same connection, with leases of `lease` (at least 100 ms;
    /// 30 s is a sensible default: long enough to ride out a slow renewal, short enough that a
    /// dead instance's slots come back soon).
    pub fn concurrency(&self, lease: Duration) -> RedisConcurrencyStore {
        RedisConcurrencyStore {
            inner: Arc::clone(&self.inner),
            lease: lease.max(Duration::from_millis(100)),
            ids: Arc::new(LeaseIds {
                instance: RandomState::new().hash_one(std::process::id()),
                next: AtomicU64::new(0),
            }),
        }
    }
}

impl RedisConcurrencyStore {
    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The Redis key of `key`'s leases.
    pub fn redis_key(&self, key: &Key<'_>) -> String {
        format!("{}{{{}}}:inflight", self.inner.prefix, key.qualified())
    }
}

impl fmt::Debug for RedisConcurrencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConcurrencyStore")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

type AcquireFuture = Pin<Box<dyn Future<Output = Result<Acquire<RedisPermit>, StoreError>> + Send>>;

/// Runs one operation of the lease script within the store's deadline.
async fn lease_op(
    inner: &Arc<Inner>,
    key: String,
    op: &'static str,
    id: String,
    lease_ms: i64,
    limit: i64,
) -> Result<(bool, u32), StoreError> {
    let args: Vec<Value> = vec![op.into(), id.into(), lease_ms.into(), limit.into()];
    let call = inner.eval_script(
        &inner.concurrency_script,
        CONCURRENCY_SCRIPT,
        vec![key],
        args,
    );
    let reply = match tokio::time::timeout(inner.timeout, call).await {
        Err(_) => return Err(StoreError::new(StoreErrorKind::Timeout)),
        Ok(Err(e)) => return Err(classify(e)),
        Ok(Ok(reply)) => reply,
    };
    match reply {
        Value::Array(v) => match v.as_slice() {
            [Value::Integer(ok @ (0 | 1)), Value::Integer(held)] if *held >= 0 => {
                Ok((*ok == 1, u32::try_from(*held).unwrap_or(u32::MAX)))
            }
            _ => Err(StoreError::with_source(
                StoreErrorKind::InvalidResponse,
                format!("concurrency script reply: {v:?}"),
            )),
        },
        other => Err(StoreError::with_source(
            StoreErrorKind::InvalidResponse,
            format!("concurrency script reply: {other:?}"),
        )),
    }
}

impl ConcurrencyStore for RedisConcurrencyStore {
    type Permit = RedisPermit;
    type Future = AcquireFuture;

    fn acquire(&self, key: &Key<'_>, limit: u32) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        if inner.breaker.open.load(Ordering::Acquire) {
            inner.metrics.error(StoreErrorKind::CircuitOpen);
            return Box::pin(std::future::ready(Err(StoreError::new(
                StoreErrorKind::CircuitOpen,
            ))));
        }
        let redis_key = self.redis_key(key);
        let id = format!(
            "{:016x}-{:x}",
            self.ids.instance,
            self.ids.next.fetch_add(1, Ordering::Relaxed)
        );
        let lease = self.lease;
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        Box::pin(async move {
            let started = Instant::now();
            let result = lease_op(
                &inner,
                redis_key.clone(),
                "acquire",
                id.clone(),
                lease_ms,
                i64::from(limit),
            )
            .await;
            inner.metrics.duration(started.elapsed());
            match result {
                Ok((true, in_flight)) => {
                    inner.succeeded();
                    let renew = tokio::spawn(renew(
                        Arc::clone(&inner),
                        redis_key.clone(),
                        id.clone(),
                        lease,
                    ));
                    Ok(Acquire::Acquired {
                        permit: RedisPermit {
                            inner,
                            key: redis_key,
                            id,
                            renew: Some(renew),
                        },
                        in_flight,
                    })
                }
                Ok((false, in_flight)) => {
                    inner.succeeded();
                    Ok(Acquire::Full { in_flight })
                }
                Err(e) => {
                    inner.failed(e.kind());
                    Err(e)
                }
            }
        })
    }
}

/// Renews a lease every third of its length until aborted (when the permit is dropped).
async fn renew(inner: Arc<Inner>, key: String, id: String, lease: Duration) {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(lease / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        match lease_op(&inner, key.clone(), "renew", id.clone(), lease_ms, 0).await {
            Ok((true, _)) => {}
            Ok((false, _)) => {
                tracing::warn!(
                    lease = %id,
                    "rate-limit-degraded: a concurrency lease expired before it could be renewed; \
                     its slot may be in use by another request"
                );
                return;
            }
            // Redis is away: keep trying; if it stays away the lease expires by itself.
            Err(_) => {}
        }
    }
}

/// A slot held in Redis. Dropping it stops its renewal and releases it (in the background);
/// if the release cannot reach Redis, the lease expires by itself.
pub struct RedisPermit {
    inner: Arc<Inner>,
    key: String,
    id: String,
    renew: Option<JoinHandle<()>>,
}

impl Drop for RedisPermit {
    fn drop(&mut self) {
        if let Some(renew) = self.renew.take() {
            renew.abort();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to release from (the process is ending): the lease expires.
            return;
        };
        let inner = Arc::clone(&self.inner);
        let key = std::mem::take(&mut self.key);
        let id = std::mem::take(&mut self.id);
        runtime.spawn(async move {
            if let Err(e) = lease_op(&inner, key, "release", id, 0, 0).await {
                tracing::debug!(error = %e, "concurrency lease not released; it will expire");
            }
        });
    }
}

impl fmt::Debug for RedisPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPermit")
            .field("key", &self.key)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
