//! The conformance suite every store passes, for stores written outside this crate (feature
//! `conformance`).
//!
//! One call, [`verify`], proves a store decides exactly as the built-in ones: the same decision,
//! the same remaining units and the same waits, for every algorithm, costs and policies of
//! several quotas; against an independent [model] of the algorithms on generated sequences; and
//! exactly under concurrency (many checks of one key at once through two handles: a store that
//! reads, then writes, lets two requests spend one unit and fails). The store must read time
//! from the [`ManualClock`] it is given, as [`MemoryStore::with_clock`](crate::MemoryStore::with_clock)
//! does, and keep state for at least a few minutes of that clock.
//!
//! ```
//! use tollgate::MemoryStore;
//! use tollgate::clock::ManualClock;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let clock = ManualClock::new();
//! tollgate::conformance::verify(&MemoryStore::with_clock(clock.clone()), &clock, "memory").await;
//! # });
//! ```
//!
//! The parts run alone too: [`run_cases`], [`against_model`], [`compare`] (two stores decision
//! by decision), [`exact_under_concurrency`]. [`FailingStore`] fails on demand, for testing what
//! happens around a failing store. docs/stores.md describes the contract.

mod failing;
pub mod model;
mod suite;

pub use failing::FailingStore;
pub use suite::{
    CONCURRENT_POLICIES, Case, Expect, Step, against_model, against_model_within, cases, compare,
    exact_under_concurrency, random_gap_us, random_policy, run_cases,
};

use crate::Store;
use crate::clock::ManualClock;

/// Runs the whole suite against `store`: [`run_cases`], [`against_model`] on 40 generated
/// sequences, and [`exact_under_concurrency`] through two clones of `store` (100 checks
/// each). `name` namespaces every key it writes. Needs a Tokio runtime (it spawns tasks).
///
/// # Panics
///
/// On the first decision that differs, naming the case, sequence or policy.
pub async fn verify<S>(store: &S, clock: &ManualClock, name: &str)
where
    S: Store + Clone,
    S::Future: Send + 'static,
{
    run_cases(store, clock, name).await;
    against_model(store, clock, 40, name).await;
    exact_under_concurrency(&[store.clone(), store.clone()], 100, name).await;
}
