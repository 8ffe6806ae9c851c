use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::layer::Shared;
use super::{ConcurrencyBody, ConcurrencyStore, ResponseFuture};
use crate::key::{ClientAddress, KeyExtractor};
use crate::pipeline::Classified;

/// The concurrency-limiting service. Built by
/// [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer).
pub struct ConcurrencyLimit<S, St, K = ClientAddress> {
    inner: S,
    shared: Arc<Shared<St, K>>,
}

impl<S, St, K> ConcurrencyLimit<S, St, K> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<St, K>>) -> Self {
        ConcurrencyLimit { inner, shared }
    }

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

impl<S: Clone, St, K> Clone for ConcurrencyLimit<S, St, K> {
    fn clone(&self) -> Self {
        ConcurrencyLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, St, K> fmt::Debug for ConcurrencyLimit<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for ConcurrencyLimit<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: ConcurrencyStore,
    K: KeyExtractor,
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
        let (policy, acquire) = match shared.classifier.classify(&req) {
            Classified::Pass => return ResponseFuture::calling(self.inner.call(req), None),
            Classified::Respond(res) => return ResponseFuture::respond(res.map(ResBody::from)),
            Classified::Decide { policy, key, .. } => {
                (Arc::clone(policy), shared.store.acquire(&key, policy.limit))
            }
        };
        // Move the service that was polled ready into the future; keep a fresh clone here.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::acquiring(acquire, ready, req, policy)
    }
}
