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
    gauges: Mutex<HashMap<String, f64>>,
}

impl Counters {
    pub fn new(snapshotter: Snapshotter) -> Self {
        Counters {
            snapshotter,
            totals: Mutex::default(),
            gauges: Mutex::default(),
        }
    }

    /// The total of a counter with exactly these labels, or `None` when it was never
    /// registered.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        self.take();
        self.totals.lock().unwrap().get(&id(name, labels)).copied()
    }

    /// The value of a gauge with exactly these labels now, or `None` when it was never
    /// registered. The recorder's snapshots reset gauges too, so this adds up what each one
    /// read: right for gauges the code moves only by increments and decrements.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.take();
        self.gauges.lock().unwrap().get(&id(name, labels)).copied()
    }

    /// Adds what the recorder counted since the last snapshot to the totals.
    fn take(&self) {
        let mut totals = self.totals.lock().unwrap();
        let mut gauges = self.gauges.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
            match value {
                DebugValue::Counter(v) => *totals.entry(id(key.name(), &labels)).or_default() += v,
                DebugValue::Gauge(v) => {
                    *gauges.entry(id(key.name(), &labels)).or_default() += v.into_inner();
                }
                DebugValue::Histogram(_) => {}
            }
        }
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
