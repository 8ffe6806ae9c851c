use std::fmt;
use std::sync::{Arc, OnceLock};

#[cfg(feature = "axum")]
use http::Method;
use http::StatusCode;
use tower_layer::Layer;

use super::{ConcurrencyLimit, ConcurrencyPolicy};
#[cfg(feature = "axum")]
use crate::KeyScope;
use crate::key::{ClientAddress, ClientAndUser, KeyExtractor, MissingKey};
use crate::metrics::{Limiter, PolicyCounters};
use crate::pipeline::{Bindings, Classifier, Common, LogThrottle};
use crate::{Allowlist, ClientIpSource, RequestParts};

/// Applies [`ConcurrencyLimit`] to a service. Requests no policy applies to pass untouched.
///
/// Keys, allowlists and requests without a key behave as in
/// [`RateLimitLayer`](crate::RateLimitLayer): both layers classify requests through the same
/// code.
#[must_use]
pub struct ConcurrencyLimitLayer<St, K = ClientAddress> {
    store: St,
    key: K,
    client_ip: ClientIpSource,
    missing_key: MissingKey,
    allowlist: Allowlist,
    bindings: Bindings<ConcurrencyPolicy>,
    compiled: OnceLock<Arc<Shared<St, K>>>,
}

impl<St> ConcurrencyLimitLayer<St, ClientAddress> {
    /// A layer counting in `store`, with no policies yet.
    pub fn new(store: St) -> Self {
        ConcurrencyLimitLayer {
            store,
            key: ClientAddress,
            client_ip: ClientIpSource::peer(),
            missing_key: MissingKey::default(),
            allowlist: Allowlist::new(),
            bindings: Bindings::default(),
            compiled: OnceLock::new(),
        }
    }
}

impl<St, K> ConcurrencyLimitLayer<St, K> {
    /// Applies `policy` to requests whose matched route template is `template` (the `axum`
    /// feature).
    ///
    /// # Panics
    ///
    /// When the policy's name is not 1 to 64 letters, digits, `-` or `_`, the template does
    /// not start with `/`, another policy is bound to the route, or a different policy has the
    /// same name (see [`PolicyError`](crate::PolicyError)).
    #[cfg(feature = "axum")]
    #[track_caller]
    pub fn route(mut self, template: impl Into<String>, policy: ConcurrencyPolicy) -> Self {
        self.bindings.bind(None, Some(template.into()), policy);
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to every route in `templates`, with one set of slots per client for
    /// all of them together (the policy's scope becomes [`KeyScope::Policy`]).
    ///
    /// # Panics
    ///
    /// As [`route`](Self::route).
    #[cfg(feature = "axum")]
    #[track_caller]
    pub fn routes<T: Into<String>>(
        mut self,
        templates: impl IntoIterator<Item = T>,
        policy: ConcurrencyPolicy,
    ) -> Self {
        let policy = policy.with_scope(KeyScope::Policy);
        for template in templates {
            self.bindings
                .bind(None, Some(template.into()), policy.clone());
        }
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to requests with this method on this route template (`GET` also
    /// covers `HEAD`, unless a `HEAD` entry is given).
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
        policy: ConcurrencyPolicy,
    ) -> Self {
        self.bindings
            .bind(Some(method), Some(template.into()), policy);
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to every request no route entry matches.
    ///
    /// # Panics
    ///
    /// As [`route`](Self::route).
    #[track_caller]
    pub fn policy(mut self, policy: ConcurrencyPolicy) -> Self {
        self.bindings.bind(None, None, policy);
        self.compiled = OnceLock::new();
        self
    }

    /// Where the client IP comes from (default: the socket peer).
    pub fn client_ip_source(mut self, source: ClientIpSource) -> Self {
        self.client_ip = source;
        self.compiled = OnceLock::new();
        self
    }

    /// What happens to requests whose key is missing (default [`MissingKey::Shared`]: they
    /// share one key, and the first one without a peer address logs an error), as for the
    /// rate limiter.
    pub fn missing_key(mut self, missing_key: MissingKey) -> Self {
        self.missing_key = missing_key;
        self.compiled = OnceLock::new();
        self
    }

    /// Requests no policy of the layer limits.
    pub fn allowlist(mut self, allowlist: Allowlist) -> Self {
        self.allowlist = allowlist;
        self.compiled = OnceLock::new();
        self
    }

    /// Sets who a request holds slots as (default [`ClientAddress`]); see
    /// [`tollgate::key`](crate::key).
    pub fn key<K2: KeyExtractor>(self, key: K2) -> ConcurrencyLimitLayer<St, K2> {
        ConcurrencyLimitLayer {
            store: self.store,
            key,
            client_ip: self.client_ip,
            missing_key: self.missing_key,
            allowlist: self.allowlist,
            bindings: self.bindings,
            compiled: OnceLock::new(),
        }
    }

    /// Keys on the client address and a user part `user` finds: a shortcut for
    /// `.key(ClientAndUser::new(user))`.
    pub fn user_key<U: crate::key::UserKey>(
        self,
        user: U,
    ) -> ConcurrencyLimitLayer<St, ClientAndUser<U>> {
        self.key(ClientAndUser::new(user))
    }
}

impl<St: Clone, K: Clone> Clone for ConcurrencyLimitLayer<St, K> {
    fn clone(&self) -> Self {
        ConcurrencyLimitLayer {
            store: self.store.clone(),
            key: self.key.clone(),
            client_ip: self.client_ip.clone(),
            missing_key: self.missing_key,
            allowlist: self.allowlist.clone(),
            bindings: self.bindings.clone(),
            compiled: self.compiled.clone(),
        }
    }
}

impl<St, K> fmt::Debug for ConcurrencyLimitLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("routes", &self.bindings.routes)
            .field("default", &self.bindings.default)
            .finish_non_exhaustive()
    }
}

/// What every clone of the service shares.
pub(crate) struct Shared<St, K> {
    pub(crate) store: St,
    pub(crate) classifier: Classifier<Compiled, K>,
}

/// A concurrency policy with what the request path needs.
pub(crate) struct Compiled {
    pub(crate) common: Common,
    pub(crate) limit: u32,
    pub(crate) status: StatusCode,
}

impl crate::pipeline::Compiled for Compiled {
    fn common(&self) -> &Common {
        &self.common
    }

    /// A request holds one slot.
    fn cost(&self, _: &RequestParts<'_>) -> u32 {
        1
    }
}

impl<S, St: Clone, K: KeyExtractor + Clone> Layer<S> for ConcurrencyLimitLayer<St, K> {
    type Service = ConcurrencyLimit<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = self.compiled.get_or_init(|| {
            let routes = self.bindings.compile(|p: &ConcurrencyPolicy| Compiled {
                common: Common {
                    name: p.name.clone(),
                    scope: p.scope,
                    failure: p.failure,
                    shadow: false,
                    allowlist: self.allowlist.clone(),
                    counters: PolicyCounters::register(&p.name, Limiter::Concurrency),
                    degraded_log: LogThrottle::default(),
                    unavailable_retry_after: p.retry_after,
                    store_kind: "concurrency",
                },
                limit: p.limit(),
                status: p.status,
            });
            Arc::new(Shared {
                store: self.store.clone(),
                classifier: Classifier::new(
                    "concurrency limiter",
                    routes,
                    self.client_ip.clone(),
                    self.key.clone(),
                    self.missing_key,
                ),
            })
        });
        ConcurrencyLimit::from_shared(inner, Arc::clone(shared))
    }
}
