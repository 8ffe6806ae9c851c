//! Stores: where the state of every key lives, and the one question the layer asks them.
//!
//! [`MemoryStore`] keeps state in this process. The `tollgate-redis` crate keeps it in Redis, so
//! that every instance of a service shares one limit. Both run the same algorithm with the same
//! semantics.
//!
//! # Writing a store
//!
//! A store implements [`Store`]. The kit for one written outside this crate:
//!
//! | piece | what for |
//! |---|---|
//! | [`decide`], [`StoredState`], [`Decided`] | the algorithms as one pure function over the states the store keeps: read, `decide`, write back atomically |
//! | [`OwnedKey`], [`Key::qualified`] | a key the store can keep, and its injective text form (to name rows or keys) |
//! | [`window_offset`] | where a key's windows start (what `decide` uses; for stores that run their own arithmetic, as the Redis script does) |
//! | [`StoreError::check_cost`] | the error every store returns for a cost above a burst |
//! | [`Decision::into_fallback`], [`Decision::later`] | marking a decision made by a fallback store; replaying a cached refusal later |
//! | `tollgate::conformance` (feature `conformance`) | one call, `verify`, proves the store decides exactly as the built-in ones; a store that fails on demand |
//!
//! docs/stores.md in the repository gives the contract and a worked example.

mod kit;
mod memory;

use std::error::Error;
use std::fmt;
use std::future::Future;

pub use crate::key::OwnedKey;
pub use kit::{Decided, StoredState, decide};
pub use memory::{MemoryStore, MemoryStoreBuilder};

/// A key's window offset in milliseconds for a window quota (0 for GCRA): where its windows
/// start, so that keys do not all reset at the same instant. Every store must use this so that
/// all stores and instances agree. Computed from the key's [`qualified`](Key::qualified) form.
pub fn window_offset(key: &Key<'_>, quota: &Quota) -> u64 {
    crate::algorithm::window_offset(key, quota)
}

use crate::{Decision, Key, Quota};

/// Decides whether a key may spend `cost` units under every quota of a policy.
///
/// A store must decide all quotas of one call atomically: the request passes only when every
/// quota allows it, and a refused request spends from none of them.
///
/// The future is an associated type so that stores that answer at once (like [`MemoryStore`],
/// which returns [`std::future::Ready`]) cost no boxing and no allocation; network stores box.
/// The future must not borrow the key or the quotas.
pub trait Store {
    /// The future of one decision.
    type Future: Future<Output = Result<Decision, StoreError>>;

    /// Decides one request.
    ///
    /// `cost` is at least 0; a cost above a quota's burst can never pass and is reported as
    /// [`StoreErrorKind::CostExceedsBurst`], not as a limit.
    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future;

    /// Decides one request at once, if this store can without waiting; `None` (the default)
    /// when it must be asked through [`check`](Self::check).
    ///
    /// The layer asks this first: a decision made here lets it call the inner service at
    /// once, without holding the request in its future until the store answers (the memory
    /// store's allowed path through the layer costs about 6% fewer instructions). A store
    /// that answers `Some` must answer exactly what `check` would have; one that answers
    /// `None` must not have decided anything.
    #[inline]
    fn check_now(
        &self,
        key: &Key<'_>,
        quotas: &[Quota],
        cost: u32,
    ) -> Option<Result<Decision, StoreError>> {
        let _ = (key, quotas, cost);
        None
    }
}

/// Why a store could not decide.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    source: Option<Box<dyn Error + Send + Sync>>,
}

/// The kinds of [`StoreError`]. Each has a short, stable [`reason`](StoreErrorKind::reason) used
/// as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store did not answer before its deadline.
    Timeout,
    /// The store could not be reached (connection closed, not yet connected, the server
    /// loading or read-only), for a reason none of the kinds below names.
    Unavailable,
    /// The store refused the credentials (Redis: `WRONGPASS`, `NOAUTH`).
    Auth,
    /// The TLS handshake with the store failed (an untrusted certificate, one for another
    /// name, TLS spoken to a plaintext port).
    Tls,
    /// Nothing listens at the store's address (connection refused).
    ConnectionRefused,
    /// The store's host name does not resolve.
    Dns,
    /// The store is known to be down and was not asked (circuit breaker open).
    CircuitOpen,
    /// The store's script failed.
    Script,
    /// The store answered something that is not a valid decision.
    InvalidResponse,
    /// The request costs more than a quota's burst: it can never pass.
    CostExceedsBurst {
        /// The cost of the request.
        cost: u32,
        /// The smallest burst among the quotas.
        burst: u32,
    },
    /// Anything else.
    Other,
}

impl StoreErrorKind {
    /// Whether the store could not be reached or connected to at all (as opposed to a store
    /// that answered something wrong): what a circuit breaker counts.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            StoreErrorKind::Timeout
                | StoreErrorKind::Unavailable
                | StoreErrorKind::Auth
                | StoreErrorKind::Tls
                | StoreErrorKind::ConnectionRefused
                | StoreErrorKind::Dns
        )
    }

    /// The metric label for this kind: `timeout`, `unavailable`, `auth`, `tls`,
    /// `connection_refused`, `dns`, `circuit_open`, `script_error`, `invalid_response`,
    /// `cost_exceeds_burst` or `other`.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreErrorKind::Timeout => "timeout",
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Auth => "auth",
            StoreErrorKind::Tls => "tls",
            StoreErrorKind::ConnectionRefused => "connection_refused",
            StoreErrorKind::Dns => "dns",
            StoreErrorKind::CircuitOpen => "circuit_open",
            StoreErrorKind::Script => "script_error",
            StoreErrorKind::InvalidResponse => "invalid_response",
            StoreErrorKind::CostExceedsBurst { .. } => "cost_exceeds_burst",
            StoreErrorKind::Other => "other",
        }
    }

    /// Every reason a store failure can be counted under (everything but
    /// [`CostExceedsBurst`](StoreErrorKind::CostExceedsBurst), which is not a failure of the
    /// store).
    pub const FAILURE_REASONS: [&'static str; 10] = [
        "timeout",
        "unavailable",
        "auth",
        "tls",
        "connection_refused",
        "dns",
        "circuit_open",
        "script_error",
        "invalid_response",
        "other",
    ];
}

impl StoreError {
    /// An error of this kind.
    pub fn new(kind: StoreErrorKind) -> Self {
        StoreError { kind, source: None }
    }

    /// An error of this kind, caused by `source`.
    pub fn with_source(
        kind: StoreErrorKind,
        source: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            kind,
            source: Some(source.into()),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Checks `cost` against the quotas: the error every store returns for a request that
    /// could never pass.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::CostExceedsBurst`] when `cost` is above the smallest burst.
    #[inline]
    pub fn check_cost(quotas: &[Quota], cost: u32) -> Result<(), StoreError> {
        match quotas.iter().map(Quota::burst).min() {
            Some(burst) if cost > burst => Err(StoreError::new(StoreErrorKind::CostExceedsBurst {
                cost,
                burst,
            })),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            StoreErrorKind::Timeout => f.write_str("rate-limit store timed out"),
            StoreErrorKind::Unavailable => f.write_str("rate-limit store unavailable"),
            StoreErrorKind::Auth => f.write_str("rate-limit store refused the credentials"),
            StoreErrorKind::Tls => f.write_str("TLS handshake with the rate-limit store failed"),
            StoreErrorKind::ConnectionRefused => {
                f.write_str("rate-limit store refused the connection")
            }
            StoreErrorKind::Dns => f.write_str("rate-limit store's host name does not resolve"),
            StoreErrorKind::CircuitOpen => {
                f.write_str("rate-limit store not asked: circuit breaker open")
            }
            StoreErrorKind::Script => f.write_str("rate-limit store script failed"),
            StoreErrorKind::InvalidResponse => {
                f.write_str("rate-limit store answered an invalid decision")
            }
            StoreErrorKind::CostExceedsBurst { cost, burst } => write!(
                f,
                "request cost {cost} exceeds the burst of {burst}: it can never pass"
            ),
            StoreErrorKind::Other => f.write_str("rate-limit store failed"),
        }?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

impl From<StoreErrorKind> for StoreError {
    fn from(kind: StoreErrorKind) -> Self {
        StoreError::new(kind)
    }
}
