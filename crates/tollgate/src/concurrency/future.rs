//! The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit): the store's answer to
//! an acquire, then the inner service (its body holding the slot) or the layer's own answer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::Held;
use super::layer::Compiled;
use super::{Acquire, ConcurrencyBody, ConcurrencyStore};
use crate::metrics::Outcome;
use crate::response::{set_retry_after, text_response};

pin_project! {
    /// The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).
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
            permit: Option<Held<St::Permit>>,
        },
        Respond {
            res: Option<S::Response>,
        },
    }
}

type Answer<St, ResBody> = Response<ConcurrencyBody<ResBody, <St as ConcurrencyStore>::Permit>>;

impl<S, St, ReqBody> ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: ConcurrencyStore,
{
    pub(crate) fn calling(fut: S::Future, permit: Option<Held<St::Permit>>) -> Self {
        ResponseFuture {
            state: State::Calling { fut, permit },
        }
    }

    pub(crate) fn respond(res: S::Response) -> Self {
        ResponseFuture {
            state: State::Respond { res: Some(res) },
        }
    }

    pub(crate) fn acquiring(
        acquire: St::Future,
        inner: S,
        req: Request<ReqBody>,
        policy: Arc<Compiled>,
    ) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                acquire,
                inner: Some(inner),
                req: Some(req),
                policy,
            },
        }
    }
}

impl<S, St, ReqBody, ResBody> Future for ResponseFuture<S, St, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: ConcurrencyStore,
    ResBody: From<Bytes>,
{
    type Output = Result<Answer<St, ResBody>, S::Error>;

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
                            false,
                        )));
                    };
                    let permit = match acquired {
                        Ok(Acquire::Acquired { permit, .. }) => {
                            policy.common.counters.outcome(Outcome::Allowed);
                            Some(Held::new(permit, policy.common.counters.in_flight()))
                        }
                        Ok(Acquire::Full { .. }) => {
                            policy.common.counters.outcome(Outcome::Limited);
                            return Poll::Ready(Ok(refusal(
                                policy.status,
                                "Too Many Concurrent Requests\n",
                                Some(policy.common.unavailable_retry_after),
                                crate::grpc::is_grpc(&req),
                            )));
                        }
                        Err(err) => {
                            match policy.common.store_failed(&err, crate::grpc::is_grpc(&req)) {
                                Some(res) => {
                                    return Poll::Ready(Ok(
                                        res.map(|b| ConcurrencyBody::new(ResBody::from(b), None))
                                    ));
                                }
                                None => None,
                            }
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
                            false,
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
    grpc: bool,
) -> Response<ConcurrencyBody<B, P>> {
    let mut res = text_response(status, body);
    if let Some(wait) = retry_after {
        set_retry_after(res.headers_mut(), wait);
    }
    let what = if status == StatusCode::INTERNAL_SERVER_ERROR {
        "internal error"
    } else {
        "too many concurrent requests"
    };
    crate::grpc::own_answer(grpc, res, what, retry_after)
        .map(|b| ConcurrencyBody::new(B::from(b), None))
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
