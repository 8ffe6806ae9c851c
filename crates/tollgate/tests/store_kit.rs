//! A store written outside the crate, from the public kit only (`tollgate::store::decide` and
//! friends), proves itself with `tollgate::conformance::verify`: the path docs/stores.md
//! describes. The store keeps rows of three integers under text keys, as a SQL table or a
//! key-value service would, and makes each decision atomic with one lock (a transaction, in a
//! real database).

use std::collections::HashMap;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tollgate::clock::{Clock, ManualClock};
use tollgate::store::{StoredState, decide};
use tollgate::{Decision, Key, Quota, Store, StoreError};

/// `(t, a, b, expires_at_ns)` per row, named `<qualified key>|<quota id>`.
type Rows = HashMap<String, (u64, u32, u32, u64)>;

#[derive(Clone, Default)]
struct TableStore {
    rows: Arc<Mutex<Rows>>,
    clock: ManualClock,
}

impl Store for TableStore {
    type Future = Ready<Result<Decision, StoreError>>;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        // BEGIN; SELECT ... FOR UPDATE: the lock is held from the read to the write.
        let mut rows = self.rows.lock().unwrap();
        let now = self.clock.now_ns();
        let stored = read(&rows, key, quotas, now);
        ready(decide(key, quotas, &stored, now, cost).map(|decided| {
            write(&mut rows, key, quotas, &decided.writes);
            decided.decision
        }))
    }
}

fn read(rows: &Rows, key: &Key<'_>, quotas: &[Quota], now: u64) -> Vec<Option<StoredState>> {
    quotas
        .iter()
        .map(|q| {
            rows.get(&row(key, q))
                .filter(|r| r.3 > now)
                .map(|r| StoredState::from_parts(r.0, r.1, r.2))
        })
        .collect()
}

fn write(rows: &mut Rows, key: &Key<'_>, quotas: &[Quota], writes: &[Option<StoredState>]) {
    for (q, w) in quotas.iter().zip(writes) {
        if let Some(w) = w {
            let (t, a, b) = w.into_parts();
            rows.insert(row(key, q), (t, a, b, w.expires_at_ns()));
        }
    }
}

fn row(key: &Key<'_>, quota: &Quota) -> String {
    format!("{}|{}", key.qualified(), quota.id())
}

/// The same rows, read in one step and written in another, with other requests let in between:
/// what a store without a transaction does.
#[derive(Clone, Default)]
struct RacyTableStore(TableStore);

impl Store for RacyTableStore {
    type Future = Pin<Box<dyn Future<Output = Result<Decision, StoreError>> + Send>>;

    fn check(&self, key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self::Future {
        let now = self.0.clock.now_ns();
        let stored = read(&self.0.rows.lock().unwrap(), key, quotas, now);
        let decided = decide(key, quotas, &stored, now, cost);
        let rows = Arc::clone(&self.0.rows);
        let names: Vec<String> = quotas.iter().map(|q| row(key, q)).collect();
        Box::pin(async move {
            tokio::task::yield_now().await;
            let decided = decided?;
            let mut rows = rows.lock().unwrap();
            for (name, w) in names.into_iter().zip(&decided.writes) {
                if let Some(w) = w {
                    let (t, a, b) = w.into_parts();
                    rows.insert(name, (t, a, b, w.expires_at_ns()));
                }
            }
            Ok(decided.decision)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_built_from_the_kit_passes_the_whole_conformance_suite() {
    let clock = ManualClock::new();
    let store = TableStore {
        clock: clock.clone(),
        ..TableStore::default()
    };
    tollgate::conformance::verify(&store, &clock, "table").await;
    // It really kept state in its own rows.
    assert!(!store.rows.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_suite_fails_a_kit_store_that_reads_then_writes_apart() {
    let clock = ManualClock::new();
    let racy = RacyTableStore(TableStore {
        clock: clock.clone(),
        ..TableStore::default()
    });
    // Decisions one at a time are right: the cases pass.
    tollgate::conformance::run_cases(&racy, &clock, "racy").await;
    // Under concurrency two requests spend one unit, and the suite says so.
    let store = racy.clone();
    let outcome = tokio::spawn(async move {
        tollgate::conformance::exact_under_concurrency(&[store.clone(), store], 100, "racy").await;
    })
    .await;
    assert!(
        outcome.is_err_and(|e| e.is_panic()),
        "a store that reads, then writes, passed the concurrency check"
    );
}
