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

use crate::error::classify;
use crate::store::{Inner, RedisStore};

/// A [`ConcurrencyStore`] in Redis: at most N requests of a key in flight across every instance.
///
/// Each slot is a lease in a sorted set (`<prefix>{<key>}:inflight`, member = a unique lease id,
/// score = its expiry on the server's clock), taken and given back by one script
/// (`concurrency.lua`) that first drops expired leases. A request's lease is renewed every
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
    /// A concurrency store on the same connection, with leases of `lease` (100 ms to one day;
    /// 30 s is a sensible default: long enough to ride out a slow renewal, short enough that a
    /// dead instance's slots come back soon).
    pub fn concurrency(&self, lease: Duration) -> RedisConcurrencyStore {
        RedisConcurrencyStore {
            inner: Arc::clone(&self.inner),
            lease: lease.clamp(Duration::from_millis(100), Duration::from_secs(86_400)),
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
        crate::keys::inflight_key(&self.inner.prefix, key)
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

/// What the lease script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Done (acquired, renewed, released); this many leases are held now.
    Done(u32),
    /// Not done (every slot taken; or, for a renewal, the lease had expired).
    Refused(u32),
    /// An acquire that ran after its deadline: nothing was taken.
    Late,
}

/// Runs one operation of the lease script within the store's deadline. An acquire carries a
/// deadline on the server's clock, past which the script takes nothing.
async fn lease_op(
    inner: &Arc<Inner>,
    key: String,
    op: &'static str,
    id: String,
    lease_ms: i64,
    limit: i64,
) -> Result<Lease, StoreError> {
    let sent = inner.local_us();
    let deadline_ms = match inner.server_clock.deadline(sent, inner.timeout_us()) {
        d if d < 0 || op != "acquire" => -1,
        d => d / 1_000,
    };
    let args: Vec<Value> = vec![
        op.into(),
        id.into(),
        lease_ms.into(),
        limit.into(),
        deadline_ms.into(),
    ];
    let call = inner.concurrency.eval(vec![key], args);
    let reply = match tokio::time::timeout(inner.timeout, call).await {
        Err(_) => return Err(inner.explain(StoreError::new(StoreErrorKind::Timeout))),
        Ok(Err(e)) => return Err(inner.explain(classify(e))),
        Ok(Ok(reply)) => reply,
    };
    let invalid = || {
        StoreError::with_source(
            StoreErrorKind::InvalidResponse,
            format!("concurrency script reply: {reply:?}"),
        )
    };
    let Value::Array(v) = &reply else {
        return Err(invalid());
    };
    let [
        Value::Integer(status),
        Value::Integer(held),
        Value::Integer(now_ms),
    ] = v.as_slice()
    else {
        return Err(invalid());
    };
    if *held < 0 || *now_ms < 0 {
        return Err(invalid());
    }
    // The server's clock in whole ms: the truth lies within the millisecond.
    inner.server_clock.sample(
        sent.saturating_sub(500),
        inner.local_us().saturating_add(500),
        now_ms.saturating_mul(1_000).saturating_add(500),
    );
    let held = u32::try_from(*held).unwrap_or(u32::MAX);
    match status {
        1 => Ok(Lease::Done(held)),
        0 => Ok(Lease::Refused(held)),
        -1 => Ok(Lease::Late),
        _ => Err(invalid()),
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
            // From here until the answer is in hand, a lease may be taken with nobody to hold
            // it (the call timed out, or this future was dropped after the command was sent):
            // the guard then gives it back, best effort. The deadline sent with the call keeps
            // a late acquire from taking anything at all.
            let pending = PendingLease {
                inner: Some(Arc::clone(&inner)),
                key: redis_key.clone(),
                id: id.clone(),
            };
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
                Ok(Lease::Done(in_flight)) => {
                    pending.disarm();
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
                Ok(Lease::Refused(in_flight)) => {
                    pending.disarm();
                    inner.succeeded();
                    Ok(Acquire::Full { in_flight })
                }
                Ok(Lease::Late) => {
                    pending.disarm();
                    inner.failed(StoreErrorKind::Timeout);
                    Err(StoreError::with_source(
                        StoreErrorKind::Timeout,
                        "the acquire ran after its deadline and took nothing",
                    ))
                }
                Err(e) => {
                    // The guard releases whatever the call may still take.
                    inner.failed(e.kind());
                    Err(e)
                }
            }
        })
    }
}

/// A lease whose acquire has not been answered yet; released when dropped armed.
struct PendingLease {
    inner: Option<Arc<Inner>>,
    key: String,
    id: String,
}

impl PendingLease {
    fn disarm(mut self) {
        self.inner = None;
    }
}

impl Drop for PendingLease {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        release_in_background(
            inner,
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.id),
        );
    }
}

/// Releases a lease from a background task, if there is a runtime to run one; otherwise the
/// lease expires by itself.
fn release_in_background(inner: Arc<Inner>, key: String, id: String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        if let Err(e) = lease_op(&inner, key, "release", id, 0, 0).await {
            #[cfg(feature = "tracing")]
            tracing::debug!(error = %e, "concurrency lease not released; it will expire");
            #[cfg(not(feature = "tracing"))]
            let _ = e;
        }
    });
}

/// Renews a lease every third of its length until aborted (when the permit is dropped).
async fn renew(inner: Arc<Inner>, key: String, id: String, lease: Duration) {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(lease / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        match lease_op(&inner, key.clone(), "renew", id.clone(), lease_ms, 0).await {
            Ok(Lease::Done(_) | Lease::Late) => {}
            Ok(Lease::Refused(_)) => {
                #[cfg(feature = "tracing")]
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
        release_in_background(
            Arc::clone(&self.inner),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.id),
        );
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
