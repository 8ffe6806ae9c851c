//! Concurrency limits: at most N requests of a key in flight at once, across every instance
//! that shares the store.
//!
//! Some endpoints are limited not by rate but by how many run at once: heavy exports, BI
//! queries, calls to an AI agent. [`ConcurrencyLimitLayer`] keys requests like the rate limiter
//! (through the same pipeline: `<route>:<ip>:<user>` in a policy's namespace by default, or any
//! [`KeyExtractor`](crate::KeyExtractor); the same allowlists), asks a [`ConcurrencyStore`] for a slot, and
//! answers 429 (or 503) with `Retry-After` when the key has none free; the inner service is then
//! never called.
//!
//! A slot is a [`ConcurrencyStore::Permit`] that frees itself when dropped. The layer holds it
//! until the response is finished: until the response body has been streamed to its end or
//! dropped, and so also when the client disconnects or the handler panics (the future and
//! body holding the permit are dropped either way). Stores shared between instances make each
//! slot a lease that expires unless renewed, so slots held by an instance that died free
//! themselves. See `docs/concurrency.md`.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tollgate::concurrency::{ConcurrencyLimitLayer, ConcurrencyPolicy, MemoryConcurrencyStore};
//!
//! let exports = ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
//!     .route("/export", ConcurrencyPolicy::new("export", 2));
//! let app: Router = Router::new()
//!     .route("/export", get(|| async { "rows" }))
//!     .layer(exports);
//! ```

mod body;
mod future;
mod layer;
mod memory;
mod service;

use std::future::Future;
use std::num::NonZeroU32;
use std::time::Duration;

use http::StatusCode;

pub use body::ConcurrencyBody;
pub use future::ResponseFuture;
pub use layer::ConcurrencyLimitLayer;
pub use memory::{MemoryConcurrencyStore, MemoryPermit};
pub use service::ConcurrencyLimit;

use crate::key::Key;
use crate::pipeline::Bindable;
use crate::{FailureMode, KeyScope, PolicyError, StoreError};

/// What a store answers to a request for a slot.
#[derive(Debug)]
pub enum Acquire<P> {
    /// A slot is held until `permit` is dropped.
    Acquired {
        /// The slot.
        permit: P,
        /// Requests of the key in flight, this one included.
        in_flight: u32,
    },
    /// Every slot of the key is taken.
    Full {
        /// Requests of the key in flight.
        in_flight: u32,
    },
}

/// Counts requests in flight per key, against a limit.
///
/// A store must check and take a slot atomically: two concurrent acquires for the last slot
/// must not both succeed.
pub trait ConcurrencyStore {
    /// A held slot; dropping it frees the slot.
    type Permit: Send + 'static;
    /// The future of one acquire.
    type Future: Future<Output = Result<Acquire<Self::Permit>, StoreError>>;

    /// Takes a slot for `key` if fewer than `limit` are taken.
    fn acquire(&self, key: &Key<'_>, limit: u32) -> Self::Future;
}

/// A named concurrency limit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct ConcurrencyPolicy {
    name: String,
    limit: NonZeroU32,
    failure: FailureMode,
    scope: KeyScope,
    status: StatusCode,
    retry_after: Duration,
}

impl ConcurrencyPolicy {
    /// At most `limit` requests per key in flight (a `limit` of 0 is raised to 1: a limit that
    /// refuses everything is not a limit).
    pub fn new(name: impl Into<String>, limit: u32) -> Self {
        ConcurrencyPolicy {
            name: name.into(),
            limit: NonZeroU32::new(limit).unwrap_or(NonZeroU32::MIN),
            failure: FailureMode::Open,
            scope: KeyScope::Route,
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Duration::from_secs(1),
        }
    }

    /// What to do when the store fails (default open).
    pub fn with_failure_mode(mut self, failure: FailureMode) -> Self {
        self.failure = failure;
        self
    }

    /// What the route part of the key is (default: the route template).
    pub fn with_scope(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// The status of a refusal (default 429; 503 says "the service is busy" rather than "you
    /// sent too many").
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The `Retry-After` of a refusal (default 1 s): nobody knows when a request in flight will
    /// end, so this is a hint, rounded up to whole seconds.
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = wait;
        self
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The most requests per key in flight.
    pub fn limit(&self) -> u32 {
        self.limit.get()
    }

    /// What happens when the store fails.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }
}

impl Bindable for ConcurrencyPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), PolicyError> {
        crate::policy::check_name(&self.name)
    }
}
