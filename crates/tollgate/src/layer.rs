use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use tower_layer::Layer;

use crate::ClientIp;
use crate::key::{Key, MissingKey, MissingKeyWarning, NoUser, UserKey};
use crate::metrics::PolicyCounters;
use crate::response::{LimitedResponseFn, PolicyHeaders, RateLimitHeaders, default_limited};
use crate::routes::RouteTable;
use crate::{Allowlist, Decision, FailureMode, KeyScope, Policy, Quota, RateLimit, RequestParts};

/// Applies [`RateLimit`] to a service: a tower [`Layer`] for axum's `.layer()` and
/// `.route_layer()`, or a [`tower::ServiceBuilder`](https://docs.rs/tower).
///
/// A layer holds a table of policies keyed by route template, and optionally a default policy
/// for every other request. Requests that no policy applies to pass untouched. See the
/// [crate docs](crate) for examples.
#[must_use]
pub struct RateLimitLayer<St, U = NoUser> {
    store: St,
    user: U,
    client_ip: ClientIp,
    routes: Vec<(Option<Method>, String, Policy)>,
    default: Option<Policy>,
    headers: RateLimitHeaders,
    missing_key: MissingKey,
    limited_response: LimitedResponseFn,
    unavailable_retry_after: Duration,
    shadow: bool,
    allowlist: Allowlist,
    compiled: OnceLock<Arc<Shared<St, U>>>,
}

impl<St> RateLimitLayer<St, NoUser> {
    /// A layer deciding with `store`, with no policies yet (so it limits nothing until
    /// [`route`](Self::route) or [`policy`](Self::policy) adds one).
    pub fn new(store: St) -> Self {
        RateLimitLayer {
            store,
            user: NoUser,
            client_ip: ClientIp::peer(),
            routes: Vec::new(),
            default: None,
            headers: RateLimitHeaders::default(),
            missing_key: MissingKey::default(),
            limited_response: Arc::new(default_limited),
            unavailable_retry_after: Duration::from_secs(5),
            shadow: false,
            allowlist: Allowlist::new(),
            compiled: OnceLock::new(),
        }
    }
}

impl<St, U> RateLimitLayer<St, U> {
    /// Applies `policy` to requests whose matched route template is `template` (as written in
    /// the router: `"/users/{id}"`), whatever their method. Needs the `axum` feature and an axum
    /// router, which records the matched path.
    ///
    /// # Panics
    ///
    /// When the policy is invalid (see [`PolicyError`](crate::PolicyError)): its name is not 1 to 64 letters,
    /// digits, `-` or `_`; its fixed cost is 0 or above its smallest burst; the template does
    /// not start with `/`; another policy is already bound to the route; or a different policy
    /// already has its name. Found at start-up, like axum's conflicting routes.
    #[track_caller]
    pub fn route(mut self, template: impl Into<String>, policy: Policy) -> Self {
        let template = template.into();
        self.check(None, Some(&template), &policy);
        self.routes.push((None, template, policy));
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to requests with this method on this route template. A method-specific
    /// entry wins over one for any method; a `GET` entry also covers `HEAD` (axum answers
    /// `HEAD` with the `GET` handler) unless a `HEAD` entry is given.
    ///
    /// # Panics
    ///
    /// As [`route`](Self::route).
    #[track_caller]
    pub fn route_method(
        mut self,
        method: Method,
        template: impl Into<String>,
        policy: Policy,
    ) -> Self {
        let template = template.into();
        self.check(Some(&method), Some(&template), &policy);
        self.routes.push((Some(method), template, policy));
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to every request that no [`route`](Self::route) entry matches. This is
    /// the policy of a layer used with `.route_layer()` on a single route, or with plain tower.
    ///
    /// # Panics
    ///
    /// As [`route`](Self::route).
    #[track_caller]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.default = None;
        self.check(None, None, &policy);
        self.default = Some(policy);
        self.compiled = OnceLock::new();
        self
    }

    #[track_caller]
    fn check(&self, method: Option<&Method>, route: Option<&str>, policy: &Policy) {
        let checked = policy.validate().and_then(|()| {
            crate::policy::check_binding(
                &self.routes,
                self.default.as_ref(),
                Policy::name,
                method,
                route,
                policy,
            )
        });
        if let Err(e) = checked {
            panic!("tollgate: {e}");
        }
    }

    /// Sets where the user part of the key comes from (default: none).
    pub fn user_key<U2>(self, user: U2) -> RateLimitLayer<St, U2> {
        RateLimitLayer {
            store: self.store,
            user,
            client_ip: self.client_ip,
            routes: self.routes,
            default: self.default,
            headers: self.headers,
            missing_key: self.missing_key,
            limited_response: self.limited_response,
            unavailable_retry_after: self.unavailable_retry_after,
            shadow: self.shadow,
            allowlist: self.allowlist,
            compiled: OnceLock::new(),
        }
    }

    /// Shadow mode for every policy of the layer (see [`Policy::shadow`]): decide and count, but
    /// never refuse.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self.compiled = OnceLock::new();
        self
    }

    /// Requests no policy of the layer limits (merged with each policy's own allowlist).
    pub fn allowlist(mut self, allowlist: Allowlist) -> Self {
        self.allowlist = allowlist;
        self.compiled = OnceLock::new();
        self
    }

    /// Sets where the client IP comes from (default: the socket peer).
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = client_ip;
        self.compiled = OnceLock::new();
        self
    }

    /// Sets which rate-limit header fields responses carry (default: the IETF draft's).
    pub fn headers(mut self, headers: RateLimitHeaders) -> Self {
        self.headers = headers;
        self.compiled = OnceLock::new();
        self
    }

    /// Sets what happens to requests without a peer address (default
    /// [`MissingKey::Shared`]: limited together under one key, and said loudly once).
    pub fn missing_key(mut self, missing_key: MissingKey) -> Self {
        self.missing_key = missing_key;
        self.compiled = OnceLock::new();
        self
    }

    /// Replaces the 429 response. The closure gets the decision and returns the status, headers
    /// and body; the layer then adds `Retry-After` and the rate-limit headers.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Response, StatusCode};
    /// use tollgate::{MemoryStore, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::new(MemoryStore::new()).limited_response(|decision| {
    ///     let body = format!(r#"{{"error":"rate_limited","limit":{}}}"#, decision.limit());
    ///     Response::builder()
    ///         .status(StatusCode::TOO_MANY_REQUESTS)
    ///         .header("content-type", "application/json")
    ///         .body(Bytes::from(body))
    ///         .unwrap()
    /// });
    /// # let _ = layer;
    /// ```
    pub fn limited_response<F>(mut self, f: F) -> Self
    where
        F: Fn(&Decision) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.limited_response = Arc::new(f);
        self.compiled = OnceLock::new();
        self
    }

    /// Sets the `Retry-After` of the 503 a fail-closed policy answers when the store fails
    /// (default 5 seconds).
    pub fn unavailable_retry_after(mut self, wait: Duration) -> Self {
        self.unavailable_retry_after = wait;
        self.compiled = OnceLock::new();
        self
    }
}

impl<St: Clone, U: Clone> Clone for RateLimitLayer<St, U> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            store: self.store.clone(),
            user: self.user.clone(),
            client_ip: self.client_ip.clone(),
            routes: self.routes.clone(),
            default: self.default.clone(),
            headers: self.headers,
            missing_key: self.missing_key,
            limited_response: Arc::clone(&self.limited_response),
            unavailable_retry_after: self.unavailable_retry_after,
            shadow: self.shadow,
            allowlist: self.allowlist.clone(),
            compiled: self.compiled.clone(),
        }
    }
}

impl<St: fmt::Debug, U: fmt::Debug> fmt::Debug for RateLimitLayer<St, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("store", &self.store)
            .field("user", &self.user)
            .field("client_ip", &self.client_ip)
            .field("routes", &self.routes)
            .field("default", &self.default)
            .field("headers", &self.headers)
            .field("missing_key", &self.missing_key)
            .finish_non_exhaustive()
    }
}

impl<S, St: Clone, U: Clone> Layer<S> for RateLimitLayer<St, U> {
    type Service = RateLimit<S, St, U>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = self.compiled.get_or_init(|| Arc::new(self.compile()));
        RateLimit::from_shared(inner, Arc::clone(shared))
    }
}

impl<St: Clone, U: Clone> RateLimitLayer<St, U> {
    fn compile(&self) -> Shared<St, U> {
        crate::metrics::describe();
        self.client_ip.log_warnings("rate limiter");
        let mut by_name: HashMap<String, Arc<CompiledPolicy>> = HashMap::new();
        let mut compile = |p: &Policy| -> Arc<CompiledPolicy> {
            // Policies with the same name and content are one policy (one set of counters).
            if let Some(c) = by_name.get(&p.name)
                && c.source == *p
            {
                return Arc::clone(c);
            }
            let c = Arc::new(CompiledPolicy::new(p.clone(), self));
            by_name
                .entry(p.name.clone())
                .or_insert_with(|| Arc::clone(&c));
            c
        };
        let routes = RouteTable::build(&self.routes, self.default.as_ref(), &mut compile);
        Shared {
            store: self.store.clone(),
            user: self.user.clone(),
            client_ip: self.client_ip.clone(),
            routes,
            missing_key: self.missing_key,
            missing_key_warning: MissingKeyWarning::default(),
        }
    }
}

/// What every clone of the service shares.
pub(crate) struct Shared<St, U> {
    pub(crate) store: St,
    user: U,
    client_ip: ClientIp,
    routes: RouteTable<CompiledPolicy>,
    pub(crate) missing_key: MissingKey,
    missing_key_warning: MissingKeyWarning,
}

/// The outcome of keying a request.
pub(crate) enum Keyed<'a> {
    /// No policy applies.
    Pass,
    /// A policy applies and the key was built; the request costs this much.
    Key(&'a Arc<CompiledPolicy>, Key<'a>, u32),
    /// A policy applies but the request has no peer address.
    Missing(&'a Arc<CompiledPolicy>),
    /// A policy applies but its allowlist exempts the request.
    Allowlisted(&'a Arc<CompiledPolicy>),
}

impl<St, U: UserKey> Shared<St, U> {
    pub(crate) fn key<'a, B>(&'a self, req: &'a Request<B>) -> Keyed<'a> {
        let Some((policy, matched)) = self.routes.lookup(req) else {
            return Keyed::Pass;
        };
        let route = match (policy.source.scope, matched) {
            (KeyScope::Route, Some(matched)) => matched,
            _ => policy.source.name.as_str(),
        };
        let addr = self.client_ip.client_addr(req);
        let user = self.user.user_key(req.headers(), req.extensions());
        let parts = RequestParts::new(req);
        if !policy.allowlist.is_empty() && policy.allowlist.matches(addr, user.as_deref(), &parts) {
            return Keyed::Allowlisted(policy);
        }
        if addr.is_none() && self.missing_key != MissingKey::Shared {
            return Keyed::Missing(policy);
        }
        let ip = addr.map(|a| self.client_ip.mask(a));
        let cost = policy.source.cost.of(&parts);
        Keyed::Key(policy, Key::new(policy.name(), route, ip, user), cost)
    }

    /// Logs once, for the whole layer, that requests arrive without a peer address.
    pub(crate) fn warn_missing_key(&self, policy: &CompiledPolicy) {
        self.missing_key_warning
            .warn("rate limiter", policy.name(), self.missing_key);
    }
}

/// A policy with everything the request path needs precomputed.
pub(crate) struct CompiledPolicy {
    pub(crate) source: Policy,
    pub(crate) shadow: bool,
    pub(crate) allowlist: Allowlist,
    pub(crate) quotas: Box<[Quota]>,
    pub(crate) min_burst: u32,
    pub(crate) counters: PolicyCounters,
    pub(crate) headers: PolicyHeaders,
    pub(crate) respond: ResponseConfig,
    pub(crate) degraded_log: LogThrottle,
    pub(crate) shadow_log: LogThrottle,
}

/// The layer-wide response settings, copied into each policy so the request future needs only
/// one pointer.
pub(crate) struct ResponseConfig {
    pub(crate) headers: RateLimitHeaders,
    pub(crate) limited: LimitedResponseFn,
    pub(crate) unavailable_retry_after: Duration,
}

impl CompiledPolicy {
    fn new<St, U>(source: Policy, layer: &RateLimitLayer<St, U>) -> Self {
        let min_burst = source
            .quotas
            .iter()
            .map(Quota::burst_size)
            .min()
            .unwrap_or(u32::MAX);
        CompiledPolicy {
            shadow: source.shadow || layer.shadow,
            allowlist: layer.allowlist.clone().merge(&source.allowlist),
            quotas: source.quotas.clone().into_boxed_slice(),
            min_burst,
            counters: PolicyCounters::register(&source.name),
            headers: PolicyHeaders::new(&source.name, &source.quotas),
            respond: ResponseConfig {
                headers: layer.headers,
                limited: Arc::clone(&layer.limited_response),
                unavailable_retry_after: layer.unavailable_retry_after,
            },
            degraded_log: LogThrottle::default(),
            shadow_log: LogThrottle::default(),
            source,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.source.name
    }

    pub(crate) fn fails_open(&self) -> bool {
        self.source.failure == FailureMode::Open
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
        self.permit_at(u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1))
    }

    fn permit_at(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now < last + LOG_INTERVAL_MS {
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
