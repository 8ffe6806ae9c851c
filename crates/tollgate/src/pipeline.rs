//! The one path both layers take. On the way in, [`Classifier`] finds what a store is asked
//! about: the policy (route table, `HEAD` under `GET`), the client address, the key, the
//! allowlist, a missing key and the cost. On the way out, [`Common::store_failed`] turns a store
//! that could not answer into a pass or a 503, with its metrics and throttled log. The
//! rate-limit and concurrency layers differ only in what they ask the store and what they do
//! with its answer.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use crate::grpc;
use crate::key::{
    Identity, Key, KeyExtractor, MissingKey, MissingKeyWarning, Unkeyed, prefix_hash,
};
use crate::metrics::{Outcome, PolicyCounters};
use crate::response::{set_retry_after, status_line, text_response};
use crate::routes::RouteTable;
use crate::{
    Allowlist, ClientIpSource, FailureMode, KeyScope, PolicyError, RequestParts, StoreError,
};

/// What both layers know of a compiled policy.
pub(crate) struct Common {
    pub(crate) name: String,
    pub(crate) scope: KeyScope,
    pub(crate) failure: FailureMode,
    /// Decide and count, never change a response.
    pub(crate) shadow: bool,
    /// The layer's allowlist merged with the policy's.
    pub(crate) allowlist: Allowlist,
    pub(crate) counters: PolicyCounters,
    pub(crate) degraded_log: LogThrottle,
    /// The `Retry-After` of the 503 a fail-closed policy answers.
    pub(crate) unavailable_retry_after: Duration,
    /// What the store decides, for logs and gRPC messages: "rate-limit" or "concurrency".
    pub(crate) store_kind: &'static str,
}

impl Common {
    pub(crate) fn fails_open(&self) -> bool {
        self.failure == FailureMode::Open
    }

    /// The store could not decide. `None`: let the request through undecided (a fail-open
    /// policy, or a shadow one, counted as the refusal it would have been); `Some`: the 503 of
    /// a fail-closed policy. Counted in `ratelimit_requests_total` and the fail-open or
    /// fail-closed counter, and logged at most once per interval. `grpc`: the request is a
    /// gRPC call, which gets the gRPC form of the 503.
    pub(crate) fn store_failed(&self, err: &StoreError, grpc: bool) -> Option<Response<Bytes>> {
        let open = self.fails_open() || self.shadow;
        self.counters.outcome(if self.fails_open() {
            Outcome::FailOpen
        } else if self.shadow {
            Outcome::ShadowFailClosed
        } else {
            Outcome::FailClosed
        });
        self.counters.failure(open, err.kind());
        if let Some(_held_back) = self.degraded_log.permit() {
            #[cfg(feature = "tracing")]
            tracing::warn!(
                policy = %self.name,
                reason = err.kind().reason(),
                error = %err,
                suppressed = _held_back,
                "rate-limit-degraded: the {} store failed; {}",
                self.store_kind,
                if open {
                    "letting the request through (fail open)"
                } else {
                    "refusing the request with 503 (fail closed)"
                }
            );
        }
        let what = if self.store_kind == "concurrency" {
            "concurrency limiter unavailable: its store failed"
        } else {
            "rate limiter unavailable: its store failed"
        };
        (!open).then(|| self.refusal(StatusCode::SERVICE_UNAVAILABLE, grpc, what))
    }

    /// The layer's own 503 or 500, with `Retry-After` on a 503 (in the gRPC form for a gRPC
    /// call, `what` its message).
    fn refusal(&self, status: StatusCode, grpc: bool, what: &str) -> Response<Bytes> {
        let mut res = text_response(status, status_line(status));
        let retry =
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(self.unavailable_retry_after);
        if let Some(wait) = retry {
            set_retry_after(res.headers_mut(), wait);
        }
        grpc::own_answer(grpc, res, what, retry)
    }
}

/// A compiled policy of either layer.
pub(crate) trait Compiled {
    fn common(&self) -> &Common;
    /// The units this request spends.
    fn cost(&self, parts: &RequestParts<'_>) -> u32;
}

/// What a layer does with a request.
/// The policy is borrowed from the layer (`'p`), the key from the request too (`'r`), so that
/// a layer can let go of the request once the store was asked, and still read the policy.
pub(crate) enum Classified<'p, 'r, P> {
    /// Call the inner service, undecided: no policy applies, the allowlist exempts it, or its
    /// key is missing and the layer lets such requests through.
    Pass,
    /// Answer this instead (a missing key the layer refuses).
    Respond(Response<Bytes>),
    /// Ask the store about `key`, spending `cost`.
    Decide {
        policy: &'p Arc<P>,
        key: Key<'r>,
        cost: u32,
    },
}

/// From a request to what the store is asked: shared by both layers, built once per layer.
pub(crate) struct Classifier<P, K> {
    /// "rate limiter" or "concurrency limiter", for logs.
    layer: &'static str,
    routes: RouteTable<P>,
    client_ip: ClientIpSource,
    key: K,
    missing_key: MissingKey,
    missing_key_warning: MissingKeyWarning,
}

impl<P: Compiled, K: KeyExtractor> Classifier<P, K> {
    pub(crate) fn new(
        layer: &'static str,
        routes: RouteTable<P>,
        client_ip: ClientIpSource,
        key: K,
        missing_key: MissingKey,
    ) -> Self {
        crate::metrics::describe();
        client_ip.log_warnings(layer);
        Classifier {
            layer,
            routes,
            client_ip,
            key,
            missing_key,
            missing_key_warning: MissingKeyWarning::default(),
        }
    }

    pub(crate) fn classify<'p: 'r, 'r, B>(&'p self, req: &'r Request<B>) -> Classified<'p, 'r, P> {
        let Some((bound, matched)) = self.routes.lookup(req) else {
            return Classified::Pass;
        };
        let policy = &bound.policy;
        let common = policy.common();
        // The key's policy and route are hashed once, when the table was built, unless this is
        // the default policy under a template the table does not know.
        let (route, prefix) = match (common.scope, matched) {
            (KeyScope::Route, Some(matched)) => (matched, bound.route_prefix),
            _ => (common.name.as_str(), Some(bound.name_prefix)),
        };
        let addr = self.client_ip.client_addr(req);
        let parts = RequestParts::new(req)
            .with_client_ip(addr)
            .with_route(matched);
        let identity = self.key.extract(&parts);
        if !common.allowlist.is_empty()
            && common
                .allowlist
                .matches(addr, identity.as_ref().and_then(Identity::user), &parts)
        {
            common.counters.outcome(Outcome::Allowlisted);
            return Classified::Pass;
        }
        if addr.is_none() {
            self.missing_key_warning
                .warn(self.layer, &common.name, self.missing_key);
        }
        let identity = match identity {
            Some(identity) => identity,
            None => match self.missing_key.action(common.fails_open()) {
                Unkeyed::Decide => Identity::global(),
                // A shadow policy never changes a response.
                Unkeyed::Refuse(status) if !common.shadow => {
                    common.counters.outcome(Outcome::Unkeyed);
                    let what = "the request has no client address to limit it by";
                    return Classified::Respond(common.refusal(status, grpc::is_grpc(req), what));
                }
                Unkeyed::Refuse(_) | Unkeyed::Pass => {
                    common.counters.outcome(Outcome::Unkeyed);
                    return Classified::Pass;
                }
            },
        };
        let (ip, user) = identity.into_parts();
        let ip = ip.map(|ip| self.client_ip.mask(ip));
        let prefix = prefix.unwrap_or_else(|| prefix_hash(&common.name, route));
        let key = Key::prefixed(&common.name, route, prefix, ip, user);
        Classified::Decide {
            policy,
            key,
            cost: policy.cost(&parts),
        }
    }
}

/// A policy a layer can bind to routes.
pub(crate) trait Bindable: PartialEq + Clone {
    fn name(&self) -> &str;
    /// Checks the policy on its own (name, cost).
    fn validate(&self) -> Result<(), PolicyError>;
}

/// The policies a layer binds: by route template (and method), and a default.
pub(crate) struct Bindings<P> {
    pub(crate) routes: Vec<(Option<Method>, String, P)>,
    pub(crate) default: Option<P>,
}

impl<P> Default for Bindings<P> {
    fn default() -> Self {
        Bindings {
            routes: Vec::new(),
            default: None,
        }
    }
}

impl<P: Clone> Clone for Bindings<P> {
    fn clone(&self) -> Self {
        Bindings {
            routes: self.routes.clone(),
            default: self.default.clone(),
        }
    }
}

impl<P: Bindable> Bindings<P> {
    /// Binds `policy` to `route` (and `method`), or as the default when `route` is `None`.
    ///
    /// # Panics
    ///
    /// When the policy is invalid or the binding conflicts (see [`PolicyError`]): found at
    /// start-up, like axum's conflicting routes.
    #[track_caller]
    pub(crate) fn bind(&mut self, method: Option<Method>, route: Option<String>, policy: P) {
        if route.is_none() {
            // A new default replaces the old one.
            self.default = None;
        }
        let checked = policy.validate().and_then(|()| {
            crate::policy::check_binding(
                &self.routes,
                self.default.as_ref(),
                P::name,
                method.as_ref(),
                route.as_deref(),
                &policy,
            )
        });
        if let Err(e) = checked {
            panic!("tollgate: {e}");
        }
        match route {
            Some(route) => self.routes.push((method, route, policy)),
            None => self.default = Some(policy),
        }
    }

    /// Builds the route table, compiling each policy once (entries with the same name and
    /// content are one policy, with one set of counters).
    pub(crate) fn compile<C: Compiled>(&self, mut compile: impl FnMut(&P) -> C) -> RouteTable<C> {
        let mut compiled: Vec<(P, Arc<C>)> = Vec::new();
        RouteTable::build(
            &self.routes,
            self.default.as_ref(),
            |p: &P| {
                if let Some((_, c)) = compiled.iter().find(|(q, _)| q == p) {
                    return Arc::clone(c);
                }
                let c = Arc::new(compile(p));
                compiled.push((p.clone(), Arc::clone(&c)));
                c
            },
            |c: &C| c.common().name.as_str(),
        )
    }
}

/// Lets one log line through per interval and counts the ones it held back, so a store outage
/// under load writes a handful of lines, not one per request.
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    /// Milliseconds since [`epoch`] of the last line written, plus one (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

const LOG_INTERVAL_MS: u64 = 10_000;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogThrottle {
    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` when this one is held back.
    pub(crate) fn permit(&self) -> Option<u64> {
        self.permit_at(u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn permit_at(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms.saturating_add(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(LOG_INTERVAL_MS) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle_writes_one_line_per_interval_and_counts_the_rest() {
        let t = LogThrottle::default();
        assert_eq!(t.permit_at(0), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(t.permit_at(ms), None);
        }
        assert_eq!(t.permit_at(10_000), Some(3));
        assert_eq!(t.permit_at(10_001), None);
        assert_eq!(t.permit_at(60_000), Some(1));
    }
}
