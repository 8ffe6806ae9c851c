//! The circuit breaker: stop asking a Redis that does not answer, probe it in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
#[cfg(feature = "tracing")]
use std::time::Instant;

use fred::prelude::{ClientLike, Value};
use fred::types::{ClusterHash, CustomCommand};
use tollgate::StoreErrorKind;

use crate::store::*;

/// The circuit breaker: after `threshold` consecutive calls that timed out or found no
/// connection, stop asking Redis (each call fails at once with `circuit_open`) and probe it in
/// the background until it answers.
pub(crate) struct Breaker {
    pub(crate) threshold: u32,
    pub(crate) probe_interval: Duration,
    pub(crate) failures: AtomicU32,
    pub(crate) open: AtomicBool,
}

impl Inner {
    /// Records a call that reached Redis and got an answer.
    pub(crate) fn succeeded(&self) {
        self.breaker.failures.store(0, Ordering::Relaxed);
        self.link.connected();
    }

    /// Records a failed call; opens the circuit after enough consecutive connection failures.
    pub(crate) fn failed(self: &Arc<Self>, kind: StoreErrorKind) {
        self.metrics.error(kind);
        if !kind.is_connection_failure() {
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
    pub(crate) async fn probe(self: Arc<Self>) {
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
}
