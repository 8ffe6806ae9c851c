use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::RateLimitLayer;
use super::future::{Next, ResponseFuture, after_check, shadow_over_capacity};
use super::layer::Shared;
use crate::key::{ClientAddress, KeyExtractor};
use crate::pipeline::Classified;
use crate::store::Store;

/// The rate-limiting service: asks the store about every request a policy applies to, and
/// answers 429 itself when the key has no budget left.
///
/// Built by [`RateLimitLayer`]; see the [crate docs](crate).
///
/// `poll_ready` only forwards to the inner service: limiting never happens through backpressure
/// (axum treats services as always ready). A limited request never reaches the inner service.
pub struct RateLimit<S, St, K = ClientAddress> {
    inner: S,
    shared: Arc<Shared<St, K>>,
}

impl<S, St: Clone, K: Clone> RateLimit<S, St, K> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<St, K>>) -> Self {
        RateLimit { inner, shared }
    }

    /// A shortcut for [`RateLimitLayer::new`].
    pub fn layer(store: St) -> RateLimitLayer<St, ClientAddress> {
        RateLimitLayer::new(store)
    }
}

impl<S, St, K> RateLimit<S, St, K> {
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

impl<S: Clone, St, K> Clone for RateLimit<S, St, K> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, St, K> fmt::Debug for RateLimit<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: Store,
    K: KeyExtractor,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St::Future, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let (policy, check) = match shared.classifier.classify(&req) {
            Classified::Pass => return ResponseFuture::passthrough(self.inner.call(req)),
            Classified::Respond(res) => return ResponseFuture::respond(res.map(ResBody::from)),
            Classified::Decide { policy, key, cost } => {
                if cost > policy.min_burst {
                    // Cannot pass, ever: don't bother the store.
                    if policy.common.shadow {
                        shadow_over_capacity(policy, cost);
                        return ResponseFuture::passthrough(self.inner.call(req));
                    }
                    return ResponseFuture::over_capacity(policy, cost, crate::grpc::is_grpc(&req));
                }
                // A store that decides at once (the memory store) is answered here: the
                // request then goes straight to the inner service, never held in the future.
                if let Some(decision) = shared.store.check_now(&key, &policy.quotas, cost) {
                    drop(key);
                    return match after_check(policy, decision, &mut req) {
                        Next::Call(report) => ResponseFuture::calling(self.inner.call(req), report),
                        Next::Respond(res) => ResponseFuture::respond(res),
                    };
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
