use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
#[cfg(feature = "axum")]
use http::Method;
use http::Response;
use tower_layer::Layer;

use super::RateLimit;
#[cfg(feature = "axum")]
use crate::KeyScope;
use crate::key::{ClientAddress, ClientAndUser, KeyExtractor, MissingKey};
use crate::metrics::{Limiter, PolicyCounters};
use crate::pipeline::{Bindable, Bindings, Classifier, Common, Compiled, LogThrottle};
use crate::response::{LimitedResponseFn, PolicyHeaders, RateLimitHeaders, default_limited};
use crate::{Allowlist, ClientIpSource, Decision, Policy, PolicyError, Quota, RequestParts};

/// Applies [`RateLimit`] to a service: a tower [`Layer`] for axum's `.layer()` and
/// `.route_layer()`, or a [`tower::ServiceBuilder`](https://docs.rs/tower).
///
/// A layer holds a table of policies keyed by route template, and optionally a default policy
/// for every other request. Requests that no policy applies to pass untouched. See the
/// [crate docs](crate) for examples.
#[must_use]
pub struct RateLimitLayer<St, K = ClientAddress> {
    store: St,
    key: K,
    client_ip: ClientIpSource,
    bindings: Bindings<Policy>,
    headers: RateLimitHeaders,
    missing_key: MissingKey,
    limited_response: LimitedResponseFn,
    unavailable_retry_after: Duration,
    shadow: bool,
    allowlist: Allowlist,
    decision_extension: bool,
    compiled: OnceLock<Arc<Shared<St, K>>>,
}

impl<St> RateLimitLayer<St, ClientAddress> {
    /// A layer deciding with `store`, with no policies yet (so it limits nothing until
    /// [`route`](Self::route) or [`policy`](Self::policy) adds one).
    pub fn new(store: St) -> Self {
        RateLimitLayer {
            store,
            key: ClientAddress,
            client_ip: ClientIpSource::peer(),
            bindings: Bindings::default(),
            headers: RateLimitHeaders::default(),
            missing_key: MissingKey::default(),
            limited_response: Arc::new(default_limited),
            unavailable_retry_after: Duration::from_secs(5),
            shadow: false,
            allowlist: Allowlist::new(),
            decision_extension: false,
            compiled: OnceLock::new(),
        }
    }
}

impl<St, K> RateLimitLayer<St, K> {
    /// Applies `policy` to requests whose matched route template is `template` (as written in
    /// the router: `"/users/{id}"`), whatever their method. Needs an axum router, which records
    /// the matched path (the `axum` feature).
    ///
    /// # Panics
    ///
    /// When the policy is invalid (see [`PolicyError`](crate::PolicyError)): its name is not 1 to 64 letters,
    /// digits, `-` or `_`; its fixed cost is 0 or above its smallest burst; the template does
    /// not start with `/`; another policy is already bound to the route; or a different policy
    /// already has its name. Found at start-up, like axum's conflicting routes.
    #[cfg(feature = "axum")]
    #[track_caller]
    pub fn route(mut self, template: impl Into<String>, policy: Policy) -> Self {
        self.bindings.bind(None, Some(template.into()), policy);
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to every route in `templates`, with one budget per client for all of
    /// them together (the policy's [`KeyScope`] becomes [`KeyScope::Policy`]): a request to any
    /// of them spends from the same budget.
    ///
    /// ```
    /// use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::new(MemoryStore::new()).routes(
    ///     ["/api/reports", "/api/exports"],
    ///     Policy::new("reporting", Quota::per_minute(60).unwrap()),
    /// );
    /// # let _ = layer;
    /// ```
    ///
    /// # Panics
    ///
    /// As [`route`](Self::route).
    #[cfg(feature = "axum")]
    #[track_caller]
    pub fn routes<T: Into<String>>(
        mut self,
        templates: impl IntoIterator<Item = T>,
        policy: Policy,
    ) -> Self {
        let policy = policy.with_scope(KeyScope::Policy);
        for template in templates {
            self.bindings
                .bind(None, Some(template.into()), policy.clone());
        }
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
    #[cfg(feature = "axum")]
    #[track_caller]
    pub fn route_method(
        mut self,
        method: Method,
        template: impl Into<String>,
        policy: Policy,
    ) -> Self {
        self.bindings
            .bind(Some(method), Some(template.into()), policy);
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
        self.bindings.bind(None, None, policy);
        self.compiled = OnceLock::new();
        self
    }

    /// Sets who a request spends budget as (default [`ClientAddress`]); see
    /// [`tollgate::key`](crate::key) for the built-ins, or pass a closure.
    pub fn key<K2: KeyExtractor>(self, key: K2) -> RateLimitLayer<St, K2> {
        RateLimitLayer {
            store: self.store,
            key,
            client_ip: self.client_ip,
            bindings: self.bindings,
            headers: self.headers,
            missing_key: self.missing_key,
            limited_response: self.limited_response,
            unavailable_retry_after: self.unavailable_retry_after,
            shadow: self.shadow,
            allowlist: self.allowlist,
            decision_extension: self.decision_extension,
            compiled: OnceLock::new(),
        }
    }

    /// Keys on the client address and a user part `user` finds: a shortcut for
    /// `.key(ClientAndUser::new(user))`.
    pub fn user_key<U: crate::key::UserKey>(self, user: U) -> RateLimitLayer<St, ClientAndUser<U>> {
        self.key(ClientAndUser::new(user))
    }

    /// Shadow mode for every policy of the layer (see [`Policy::with_shadow`]): decide and count, but
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
    pub fn client_ip_source(mut self, source: ClientIpSource) -> Self {
        self.client_ip = source;
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

    /// Puts each request's [`Decision`] in its extensions before the inner service is called,
    /// for handlers that read it (`Extension<Decision>` in axum). Off by default: inserting and
    /// dropping an extension is about a fifth of the layer's own work on an allowed request, and
    /// most services never read it.
    ///
    /// ```
    /// use axum::{routing::get, Extension, Router};
    /// use tollgate::{Decision, MemoryStore, Policy, Quota, RateLimitLayer};
    ///
    /// # fn app() -> Result<Router, tollgate::QuotaError> {
    /// let app = Router::new()
    ///     .route("/quota", get(|Extension(d): Extension<Decision>| async move {
    ///         format!("{} of {} left", d.remaining(), d.limit())
    ///     }))
    ///     .layer(
    ///         RateLimitLayer::new(MemoryStore::new())
    ///             .route("/quota", Policy::new("quota", Quota::per_minute(10)?))
    ///             .decision_extension(true),
    ///     );
    /// # Ok(app) }
    /// ```
    pub fn decision_extension(mut self, on: bool) -> Self {
        self.decision_extension = on;
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

impl<St: Clone, K: Clone> Clone for RateLimitLayer<St, K> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            store: self.store.clone(),
            key: self.key.clone(),
            client_ip: self.client_ip.clone(),
            bindings: self.bindings.clone(),
            headers: self.headers,
            missing_key: self.missing_key,
            limited_response: Arc::clone(&self.limited_response),
            unavailable_retry_after: self.unavailable_retry_after,
            shadow: self.shadow,
            allowlist: self.allowlist.clone(),
            decision_extension: self.decision_extension,
            compiled: self.compiled.clone(),
        }
    }
}

impl<St: fmt::Debug, K: fmt::Debug> fmt::Debug for RateLimitLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("store", &self.store)
            .field("key", &self.key)
            .field("client_ip", &self.client_ip)
            .field("routes", &self.bindings.routes)
            .field("default", &self.bindings.default)
            .field("headers", &self.headers)
            .field("missing_key", &self.missing_key)
            .finish_non_exhaustive()
    }
}

impl<S, St: Clone, K: KeyExtractor + Clone> Layer<S> for RateLimitLayer<St, K> {
    type Service = RateLimit<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = self.compiled.get_or_init(|| {
            let routes = self
                .bindings
                .compile(|p| CompiledPolicy::new(p.clone(), self));
            Arc::new(Shared {
                store: self.store.clone(),
                classifier: Classifier::new(
                    "rate limiter",
                    routes,
                    self.client_ip.clone(),
                    self.key.clone(),
                    self.missing_key,
                ),
            })
        });
        RateLimit::from_shared(inner, Arc::clone(shared))
    }
}

/// What every clone of the service shares.
pub(crate) struct Shared<St, K> {
    pub(crate) store: St,
    pub(crate) classifier: Classifier<CompiledPolicy, K>,
}

/// A policy with everything the request path needs precomputed.
pub(crate) struct CompiledPolicy {
    pub(crate) common: Common,
    pub(crate) source: Policy,
    pub(crate) quotas: Box<[Quota]>,
    pub(crate) min_burst: u32,
    pub(crate) headers: PolicyHeaders,
    pub(crate) respond: ResponseConfig,
    pub(crate) shadow_log: LogThrottle,
}

/// The layer-wide response settings, copied into each policy so the request future needs only
/// one pointer.
pub(crate) struct ResponseConfig {
    pub(crate) headers: RateLimitHeaders,
    pub(crate) limited: LimitedResponseFn,
    /// Whether the decision goes into the request's extensions.
    pub(crate) decision_extension: bool,
}

impl CompiledPolicy {
    fn new<St, K>(source: Policy, layer: &RateLimitLayer<St, K>) -> Self {
        let min_burst = source
            .quotas
            .iter()
            .map(Quota::burst)
            .min()
            .unwrap_or(u32::MAX);
        CompiledPolicy {
            common: Common {
                name: source.name.clone(),
                scope: source.scope,
                failure: source.failure,
                shadow: source.shadow || layer.shadow,
                allowlist: layer.allowlist.clone().merge(&source.allowlist),
                counters: PolicyCounters::register(&source.name, Limiter::Rate),
                degraded_log: LogThrottle::default(),
                unavailable_retry_after: layer.unavailable_retry_after,
                store_kind: "rate-limit",
            },
            quotas: source.quotas.clone().into_boxed_slice(),
            min_burst,
            headers: PolicyHeaders::new(&source.name, &source.quotas),
            respond: ResponseConfig {
                headers: layer.headers,
                limited: Arc::clone(&layer.limited_response),
                decision_extension: layer.decision_extension,
            },
            shadow_log: LogThrottle::default(),
            source,
        }
    }

    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) fn name(&self) -> &str {
        &self.common.name
    }
}

impl Compiled for CompiledPolicy {
    fn common(&self) -> &Common {
        &self.common
    }

    fn cost(&self, parts: &RequestParts<'_>) -> u32 {
        self.source.cost.of(parts)
    }
}

impl Bindable for Policy {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), PolicyError> {
        Policy::validate(self)
    }
}
