use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower_service::Service;

use crate::RateLimitLayer;
use crate::future::ResponseFuture;
use crate::future::shadow_over_capacity;
use crate::key::{NoUser, Unkeyed, UserKey};
use crate::layer::{Keyed, Shared};
use crate::metrics::Outcome;
use crate::response::{set_retry_after, status_line, text_response};
use crate::store::Store;

/// The rate-limiting service: asks the store about every request a policy applies to, and
/// answers 429 itself when the key has no budget left.
///
/// Built by [`RateLimitLayer`]; see the [crate docs](crate).
///
/// `poll_ready` only forwards to the inner service: limiting never happens through backpressure
/// (axum treats services as always ready). A limited request never reaches the inner service.
pub struct RateLimit<S, St, U = NoUser> {
    inner: S,
    shared: Arc<Shared<St, U>>,
}

impl<S, St: Clone, U: Clone> RateLimit<S, St, U> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<St, U>>) -> Self {
        RateLimit { inner, shared }
    }

    /// A shortcut for [`RateLimitLayer::new`].
    pub fn layer(store: St) -> RateLimitLayer<St, NoUser> {
        RateLimitLayer::new(store)
    }
}

impl<S, St, U> RateLimit<S, St, U> {
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

impl<S: Clone, St, U> Clone for RateLimit<S, St, U> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, St, U> fmt::Debug for RateLimit<S, St, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, U, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, St, U>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
    U: UserKey,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St::Future, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let (policy, check) = match shared.key(&req) {
            Keyed::Pass => return ResponseFuture::passthrough(self.inner.call(req)),
            Keyed::Missing(policy) => {
                shared.warn_missing_key(policy);
                policy.counters.outcome(Outcome::Unkeyed);
                match shared.missing_key.action(policy.fails_open()) {
                    // A shadow policy never changes a response.
                    Unkeyed::Refuse(status) if !policy.shadow => {
                        let mut res = text_response(status, status_line(status));
                        if status == StatusCode::SERVICE_UNAVAILABLE {
                            set_retry_after(
                                res.headers_mut(),
                                policy.respond.unavailable_retry_after,
                            );
                        }
                        return ResponseFuture::respond(res.map(ResBody::from));
                    }
                    _ => return ResponseFuture::passthrough(self.inner.call(req)),
                }
            }
            Keyed::Allowlisted(policy) => {
                policy.counters.outcome(Outcome::Allowlisted);
                return ResponseFuture::passthrough(self.inner.call(req));
            }
            Keyed::Key(policy, key, cost) => {
                if key.ip().is_none() {
                    shared.warn_missing_key(policy);
                }
                if cost > policy.min_burst {
                    // Cannot pass, ever: don't bother the store.
                    if policy.shadow {
                        shadow_over_capacity(policy, cost);
                        return ResponseFuture::passthrough(self.inner.call(req));
                    }
                    return ResponseFuture::over_capacity(policy, cost);
                }
                let check = shared.store.check(&key, &policy.quotas, cost);
                (Arc::clone(policy), check)
            }
        };
        // Move the service that was polled ready into the future; keep a fresh clone here (see
        // "Be careful when cloning inner services" in the tower-service docs).
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::checking(check, ready, req, policy)
    }
}
