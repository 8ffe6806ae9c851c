//! A store that fails on demand, for testing what a layer (or a store wrapping another) does
//! when its store fails.

use std::future::{Ready, ready};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::clock::ManualClock;
use crate::{Decision, Key, MemoryStore, Quota, Store, StoreError, StoreErrorKind};

/// Answers as a [`MemoryStore`] on a [`ManualClock`] until told to fail, then fails every call
/// with the chosen [`StoreErrorKind`] (or answers from its memory store marked as a fallback
/// decision, as a store with a local fallback would). Clones share everything.
///
/// ```
/// use tollgate::clock::ManualClock;
/// use tollgate::conformance::FailingStore;
/// use tollgate::{Key, Quota, Store, StoreErrorKind};
///
/// # futures_lite_block_on(async {
/// let store = FailingStore::new(&ManualClock::new());
/// let key = Key::new("p", "/x", None, Some("u"));
/// let quotas = [Quota::per_minute(3).unwrap()];
/// assert!(store.check(&key, &quotas, 1).await.unwrap().is_allowed());
/// store.fail_with(Some(StoreErrorKind::Timeout));
/// assert_eq!(store.check(&key, &quotas, 1).await.unwrap_err().kind(), StoreErrorKind::Timeout);
/// assert_eq!(store.calls(), 2);
/// # });
/// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FailingStore {
    memory: MemoryStore<ManualClock>,
    failure: Arc<Mutex<Option<StoreErrorKind>>>,
    fallback: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl FailingStore {
    /// A store that answers (until told otherwise) on `clock`.
    pub fn new(clock: &ManualClock) -> Self {
        FailingStore {
            memory: MemoryStore::with_clock(clock.clone()),
            failure: Arc::default(),
            fallback: Arc::default(),
            calls: Arc::default(),
        }
    }

    /// From now on every call fails with `kind`; `None` makes it answer again.
    pub fn fail_with(&self, kind: Option<StoreErrorKind>) {
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = kind;
    }

    /// While failing, answer from the memory store with a decision marked as a fallback
    /// ([`Decision::into_fallback`]) instead of an error.
    pub fn fallback(&self, on: bool) {
        self.fallback.store(on, Ordering::Relaxed);
    }

    /// How many times the store was asked.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Store for FailingStore {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let failure = *self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        match failure {
            Some(kind) if self.fallback.load(Ordering::Relaxed) => ready(
                self.memory
                    .decide(key, quotas, cost)
                    .map(|d| d.into_fallback(kind)),
            ),
            Some(kind) => ready(Err(StoreError::with_source(
                kind,
                std::io::Error::other("injected failure"),
            ))),
            None => self.memory.check(key, quotas, cost),
        }
    }
}
