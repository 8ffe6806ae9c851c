//! Concurrency limits: at most N requests of a key in flight at once, across every instance
//! that shares the store.
//!
//! Some endpoints are limited not by rate but by how many run at once: heavy exports, BI
//! queries, calls to an AI agent. [`ConcurrencyLimitLayer`] keys requests like the rate limiter
//! (`<route>:<ip>:<user?>` in a policy's namespace), asks a [`ConcurrencyStore`] for a slot, and
//! answers 429 (or 503) with `Retry-After` when the key has none free; the inner service is then
//! never called.
//!
//! A slot is a [`ConcurrencyStore::Permit`] that frees itself when dropped. The layer holds it
//! until the response is finished: until the response body has been streamed to its end or
//! dropped, and so also when the client disconnects or the handler panics (the future and
//! body holding the permit are dropped either way). Stores shared between instances make each
//! slot a lease that expires unless renewed, so slots held by an instance that died free
//! themselves. See `docs/concurrency.md`.
//!
//! ```
//! use axum::{routing::get, Router};
//! use tollgate::concurrency::{ConcurrencyLimitLayer, ConcurrencyPolicy, MemoryConcurrencyStore};
//!
//! let exports = ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
//!     .route("/export", ConcurrencyPolicy::new("export", 2));
//! let app: Router = Router::new()
//!     .route("/export", get(|| async { "rows" }))
//!     .layer(exports);
//! ```

mod body;
mod memory;

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use body::ConcurrencyBody;
pub use memory::{MemoryConcurrencyStore, MemoryPermit};

use crate::key::{Key, MissingKey, MissingKeyWarning, NoUser, Unkeyed, UserKey};
use crate::layer::LogThrottle;
use crate::metrics::{Outcome, PolicyCounters};
use crate::response::{set_retry_after, status_line, text_response};
use crate::routes::RouteTable;
use crate::{ClientIp, FailureMode, KeyScope, StoreError};

/// What a store answers to a request for a slot.
#[derive(Debug)]
pub enum Acquire<P> {
    /// A slot is held until `permit` is dropped.
    Acquired {
        /// The slot.
        permit: P,
        /// Requests of the key in flight, this one included.
        in_flight: u32,
    },
    /// Every slot of the key is taken.
    Full {
        /// Requests of the key in flight.
        in_flight: u32,
    },
}

/// Counts requests in flight per key, against a limit.
///
/// A store must check and take a slot atomically: two concurrent acquires for the last slot
/// must not both succeed.
pub trait ConcurrencyStore {
    /// A held slot; dropping it frees the slot.
    type Permit: Send + 'static;
    /// The future of one acquire.
    type Future: Future<Output = Result<Acquire<Self::Permit>, StoreError>>;

    /// Takes a slot for `key` if fewer than `limit` are taken.
    fn acquire(&self, key: &Key<'_>, limit: u32) -> Self::Future;
}

/// A named concurrency limit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct ConcurrencyPolicy {
    name: String,
    limit: NonZeroU32,
    failure: FailureMode,
    scope: KeyScope,
    status: StatusCode,
    retry_after: Duration,
}

impl ConcurrencyPolicy {
    /// At most `limit` requests per key in flight (a `limit` of 0 is raised to 1: a limit that
    /// refuses everything is not a limit).
    pub fn new(name: impl Into<String>, limit: u32) -> Self {
        ConcurrencyPolicy {
            name: name.into(),
            limit: NonZeroU32::new(limit).unwrap_or(NonZeroU32::MIN),
            failure: FailureMode::Open,
            scope: KeyScope::Route,
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Duration::from_secs(1),
        }
    }

    /// What to do when the store fails (default open).
    pub fn failure_mode(mut self, failure: FailureMode) -> Self {
        self.failure = failure;
        self
    }

    /// What the route part of the key is (default: the route template).
    pub fn scope(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// The status of a refusal (default 429; 503 says "the service is busy" rather than "you
    /// sent too many").
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The `Retry-After` of a refusal (default 1 s): nobody knows when a request in flight will
    /// end, so this is a hint, rounded up to whole seconds.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = wait;
        self
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The most requests per key in flight.
    pub fn limit(&self) -> u32 {
        self.limit.get()
    }
}

struct Compiled {
    policy: ConcurrencyPolicy,
    counters: PolicyCounters,
    log: LogThrottle,
}

/// Applies [`ConcurrencyLimit`] to a service. Requests no policy applies to pass untouched.
#[must_use]
pub struct ConcurrencyLimitLayer<St, U = NoUser> {
    store: St,
    user: U,
    client_ip: ClientIp,
    missing_key: MissingKey,
    routes: Vec<(Option<Method>, String, ConcurrencyPolicy)>,
    default: Option<ConcurrencyPolicy>,
    compiled: OnceLock<Arc<Shared<St, U>>>,
}

impl<St> ConcurrencyLimitLayer<St, NoUser> {
    /// A layer counting in `store`, with no policies yet.
    pub fn new(store: St) -> Self {
        ConcurrencyLimitLayer {
            store,
            user: NoUser,
            client_ip: ClientIp::peer(),
            missing_key: MissingKey::default(),
            routes: Vec::new(),
            default: None,
            compiled: OnceLock::new(),
        }
    }
}

impl<St, U> ConcurrencyLimitLayer<St, U> {
    /// Applies `policy` to requests whose matched route template is `template`.
    ///
    /// # Panics
    ///
    /// When the policy's name is not 1 to 64 letters, digits, `-` or `_`, the template does
    /// not start with `/`, another policy is bound to the route, or a different policy has the
    /// same name (see [`PolicyError`](crate::PolicyError)).
    #[track_caller]
    pub fn route(mut self, template: impl Into<String>, policy: ConcurrencyPolicy) -> Self {
        let template = template.into();
        self.check(None, Some(&template), &policy);
        self.routes.push((None, template, policy));
        self.compiled = OnceLock::new();
        self
    }

    /// Applies `policy` to requests with this method on this route template (`GET` also
    /// covers `HEAD`, unless a `HEAD` entry is given).
    ///
    /// # Panics
    ///
    /// As [`route`](Self::route).
    #[track_caller]
    pub fn route_method(
        mut self,
        method: Method,
        template: impl Into<String>,
        policy: ConcurrencyPolicy,
    ) -> Self {
        let template = template.into();
        self.check(Some(&method), Some(&template), &policy);
        self.routes.push((Some(method), template, policy));
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
        self.default = None;
        self.check(None, None, &policy);
        self.default = Some(policy);
        self.compiled = OnceLock::new();
        self
    }

    #[track_caller]
    fn check(&self, method: Option<&Method>, route: Option<&str>, policy: &ConcurrencyPolicy) {
        let checked = crate::policy::check_name(&policy.name).and_then(|()| {
            crate::policy::check_binding(
                &self.routes,
                self.default.as_ref(),
                ConcurrencyPolicy::name,
                method,
                route,
                policy,
            )
        });
        if let Err(e) = checked {
            panic!("tollgate: {e}");
        }
    }

    /// Where the client IP comes from (default: the socket peer).
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = client_ip;
        self.compiled = OnceLock::new();
        self
    }

    /// What happens to requests without a peer address (default [`MissingKey::Shared`]: they
    /// share one key, and the first one logs an error), as for the rate limiter.
    pub fn missing_key(mut self, missing_key: MissingKey) -> Self {
        self.missing_key = missing_key;
        self.compiled = OnceLock::new();
        self
    }

    /// Where the user part of the key comes from (default: none).
    pub fn user_key<U2>(self, user: U2) -> ConcurrencyLimitLayer<St, U2> {
        ConcurrencyLimitLayer {
            store: self.store,
            user,
            client_ip: self.client_ip,
            missing_key: self.missing_key,
            routes: self.routes,
            default: self.default,
            compiled: OnceLock::new(),
        }
    }
}

impl<St: Clone, U: Clone> Clone for ConcurrencyLimitLayer<St, U> {
    fn clone(&self) -> Self {
        ConcurrencyLimitLayer {
            store: self.store.clone(),
            user: self.user.clone(),
            client_ip: self.client_ip.clone(),
            missing_key: self.missing_key,
            routes: self.routes.clone(),
            default: self.default.clone(),
            compiled: self.compiled.clone(),
        }
    }
}

impl<St, U> fmt::Debug for ConcurrencyLimitLayer<St, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("routes", &self.routes)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

struct Shared<St, U> {
    store: St,
    user: U,
    client_ip: ClientIp,
    missing_key: MissingKey,
    missing_key_warning: MissingKeyWarning,
    routes: RouteTable<Compiled>,
}

impl<S, St: Clone, U: Clone> Layer<S> for ConcurrencyLimitLayer<St, U> {
    type Service = ConcurrencyLimit<S, St, U>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = self.compiled.get_or_init(|| {
            crate::metrics::describe();
            self.client_ip.log_warnings("concurrency limiter");
            let compile = |p: &ConcurrencyPolicy| {
                Arc::new(Compiled {
                    counters: PolicyCounters::register(&p.name),
                    policy: p.clone(),
                    log: LogThrottle::default(),
                })
            };
            Arc::new(Shared {
                store: self.store.clone(),
                user: self.user.clone(),
                client_ip: self.client_ip.clone(),
                missing_key: self.missing_key,
                missing_key_warning: MissingKeyWarning::default(),
                routes: RouteTable::build(&self.routes, self.default.as_ref(), compile),
            })
        });
        ConcurrencyLimit {
            inner,
            shared: Arc::clone(shared),
        }
    }
}

/// The concurrency-limiting service. Built by [`ConcurrencyLimitLayer`].
pub struct ConcurrencyLimit<S, St, U = NoUser> {
    inner: S,
    shared: Arc<Shared<St, U>>,
}

impl<S: Clone, St, U> Clone for ConcurrencyLimit<S, St, U> {
    fn clone(&self) -> Self {
        ConcurrencyLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, St, U> fmt::Debug for ConcurrencyLimit<S, St, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, U> ConcurrencyLimit<S, St, U> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St, U, ReqBody, ResBody> Service<Request<ReqBody>> for ConcurrencyLimit<S, St, U>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: ConcurrencyStore,
    U: UserKey,
    ResBody: From<Bytes>,
{
    type Response = Response<ConcurrencyBody<ResBody, St::Permit>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let Some((policy, matched)) = shared.routes.lookup(&req) else {
            return ResponseFuture::calling(self.inner.call(req), None);
        };
        let route = match (policy.policy.scope, matched) {
            (KeyScope::Route, Some(m)) => m,
            _ => policy.policy.name.as_str(),
        };
        let ip = shared.client_ip.client_ip(&req);
        if ip.is_none() {
            shared.missing_key_warning.warn(
                "concurrency limiter",
                &policy.policy.name,
                shared.missing_key,
            );
            match shared
                .missing_key
                .action(policy.policy.failure == FailureMode::Open)
            {
                Unkeyed::Decide => {}
                Unkeyed::Pass => {
                    policy.counters.outcome(Outcome::Unkeyed);
                    return ResponseFuture::calling(self.inner.call(req), None);
                }
                Unkeyed::Refuse(status) => {
                    policy.counters.outcome(Outcome::Unkeyed);
                    let mut res = text_response(status, status_line(status));
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        set_retry_after(res.headers_mut(), policy.policy.retry_after);
                    }
                    return ResponseFuture {
                        state: State::Respond {
                            res: Some(res.map(ResBody::from)),
                        },
                    };
                }
            }
        }
        let user = shared.user.user_key(req.headers(), req.extensions());
        let key = Key::new(&policy.policy.name, route, ip, user);
        let acquire = shared.store.acquire(&key, policy.policy.limit());
        drop(key);
        let policy = Arc::clone(policy);
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Acquiring {
                acquire,
                inner: Some(ready),
                req: Some(req),
                policy,
            },
        }
    }
}

pin_project! {
    /// The response future of [`ConcurrencyLimit`].
    pub struct ResponseFuture<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: ConcurrencyStore,
    {
        #[pin]
        state: State<S, St, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: ConcurrencyStore,
    {
        Acquiring {
            #[pin]
            acquire: St::Future,
            inner: Option<S>,
            req: Option<Request<ReqBody>>,
            policy: Arc<Compiled>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            // Held while the inner service works; moved into the body when it answers.
            permit: Option<St::Permit>,
        },
        Respond {
            res: Option<S::Response>,
        },
    }
}

impl<S, St, ReqBody> ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: ConcurrencyStore,
{
    fn calling(fut: S::Future, permit: Option<St::Permit>) -> Self {
        ResponseFuture {
            state: State::Calling { fut, permit },
        }
    }
}

impl<S, St, ReqBody, ResBody> Future for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: ConcurrencyStore,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ConcurrencyBody<ResBody, St::Permit>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring {
                    acquire,
                    inner,
                    req,
                    policy,
                } => {
                    let acquired = ready!(acquire.poll(cx));
                    let (Some(mut inner), Some(req)) = (inner.take(), req.take()) else {
                        return Poll::Ready(Ok(refusal(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Internal Server Error\n",
                            None,
                        )));
                    };
                    let permit = match acquired {
                        Ok(Acquire::Acquired { permit, .. }) => {
                            policy.counters.outcome(Outcome::Allowed);
                            Some(permit)
                        }
                        Ok(Acquire::Full { .. }) => {
                            policy.counters.outcome(Outcome::Limited);
                            let p = &policy.policy;
                            return Poll::Ready(Ok(refusal(
                                p.status,
                                "Too Many Concurrent Requests\n",
                                Some(p.retry_after),
                            )));
                        }
                        Err(err) => {
                            let open = policy.policy.failure == FailureMode::Open;
                            policy.counters.outcome(if open {
                                Outcome::FailOpen
                            } else {
                                Outcome::FailClosed
                            });
                            policy.counters.failure(open, err.kind());
                            if let Some(_held_back) = policy.log.permit() {
                                #[cfg(feature = "tracing")]
                                tracing::warn!(
                                    policy = %policy.policy.name,
                                    reason = err.kind().reason(),
                                    error = %err,
                                    suppressed = _held_back,
                                    "rate-limit-degraded: the concurrency store failed; {}",
                                    if open { "letting the request through (fail open)" } else { "refusing with 503 (fail closed)" }
                                );
                            }
                            if !open {
                                return Poll::Ready(Ok(refusal(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "Service Unavailable\n",
                                    Some(policy.policy.retry_after),
                                )));
                            }
                            None
                        }
                    };
                    let fut = inner.call(req);
                    this.state.set(State::Calling { fut, permit });
                }
                StateProj::Calling { fut, permit } => {
                    let res = ready!(fut.poll(cx))?;
                    let permit = permit.take();
                    return Poll::Ready(Ok(res.map(|b| ConcurrencyBody::new(b, permit))));
                }
                StateProj::Respond { res } => {
                    return Poll::Ready(Ok(match res.take() {
                        Some(res) => res.map(|b| ConcurrencyBody::new(b, None)),
                        None => refusal(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Internal Server Error\n",
                            None,
                        ),
                    }));
                }
            }
        }
    }
}

fn refusal<B: From<Bytes>, P>(
    status: StatusCode,
    body: &'static str,
    retry_after: Option<Duration>,
) -> Response<ConcurrencyBody<B, P>> {
    let mut res = text_response(status, body);
    if let Some(wait) = retry_after {
        set_retry_after(res.headers_mut(), wait);
    }
    res.map(|b| ConcurrencyBody::new(B::from(b), None))
}

impl<S, St, ReqBody> fmt::Debug for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: ConcurrencyStore,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
