//! Helpers shared by the layer tests.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, Snapshotter};
use tollgate::Quota;
use tower::Service;

/// The layer tests' failing store is the one the crate ships for store authors.
pub use tollgate::conformance::FailingStore as FlakyStore;

/// Reads counters from a `DebuggingRecorder`, whose snapshots reset counters to zero: this
/// keeps the running totals.
pub struct Counters {
    snapshotter: Snapshotter,
    totals: Mutex<HashMap<String, u64>>,
}

impl Counters {
    pub fn new(snapshotter: Snapshotter) -> Self {
        Counters {
            snapshotter,
            totals: Mutex::default(),
        }
    }

    /// The total of a counter with exactly these labels, or `None` when it was never
    /// registered.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let mut totals = self.totals.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            if let DebugValue::Counter(v) = value {
                let key = key.key();
                let labels: Vec<(&str, &str)> =
                    key.labels().map(|l| (l.key(), l.value())).collect();
                *totals.entry(id(key.name(), &labels)).or_default() += v;
            }
        }
        totals.get(&id(name, labels)).copied()
    }
}

fn id(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels = labels.to_vec();
    labels.sort_unstable();
    format!("{name}{labels:?}")
}

/// An inner service that counts its calls and answers 200.
pub fn counting() -> (
    Arc<AtomicUsize>,
    impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
    + Clone
    + Send,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let svc = tower::service_fn(move |_req: Request<()>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::from("ok"))) }
    });
    (calls, svc)
}

/// A quota from its text form.
pub fn quota(s: &str) -> Quota {
    s.parse().unwrap()
}
