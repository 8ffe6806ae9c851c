//! The response future of [`RateLimit`](crate::RateLimit): the store's decision, then the
//! inner service or the layer's own answer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::CompiledPolicy;
use crate::grpc;
use crate::metrics::Outcome;
use crate::response::{HeaderValues, set_retry_after, text_response};
use crate::{Decision, StoreError, StoreErrorKind};

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit): first the store's decision, then
    /// either the inner service's response (with rate-limit headers) or the layer's own 429.
    pub struct ResponseFuture<S, F, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, F, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        // Boxed: only stores that cannot answer at once come here (their check costs far
        // more than the allocation), and the future every other request moves stays small.
        Checking {
            waiting: Pin<Box<Waiting<S, F, ReqBody>>>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            // The rate-limit headers to add to the response.
            report: Option<HeaderValues>,
        },
        Respond {
            res: Option<S::Response>,
        },
    }
}

pin_project! {
    /// A request waiting for its store's answer.
    struct Waiting<S, F, ReqBody> {
        #[pin]
        check: F,
        inner: S,
        req: Option<Request<ReqBody>>,
        policy: Arc<CompiledPolicy>,
    }
}

impl<S, F, ReqBody> ResponseFuture<S, F, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        Self::calling(fut, None)
    }

    /// The inner service called, its response to get `report`'s headers.
    pub(crate) fn calling(fut: S::Future, report: Option<HeaderValues>) -> Self {
        ResponseFuture {
            state: State::Calling { fut, report },
        }
    }

    pub(crate) fn respond(res: S::Response) -> Self {
        ResponseFuture {
            state: State::Respond { res: Some(res) },
        }
    }

    pub(crate) fn checking(
        check: F,
        inner: S,
        req: Request<ReqBody>,
        policy: Arc<CompiledPolicy>,
    ) -> Self {
        ResponseFuture {
            state: State::Checking {
                waiting: Box::pin(Waiting {
                    check,
                    inner,
                    req: Some(req),
                    policy,
                }),
            },
        }
    }
}

impl<S, F, ReqBody, ResBody> ResponseFuture<S, F, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    pub(crate) fn over_capacity(policy: &CompiledPolicy, cost: u32, grpc: bool) -> Self {
        Self::respond(over_capacity_response(policy, cost, grpc))
    }
}

impl<S, F, ReqBody, ResBody> Future for ResponseFuture<S, F, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    F: Future<Output = Result<Decision, StoreError>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { waiting } => {
                    let waiting = waiting.as_mut().project();
                    let (check, inner, req, policy) =
                        (waiting.check, waiting.inner, waiting.req, waiting.policy);
                    let decision = ready!(check.poll(cx));
                    let Some(mut req) = req.take() else {
                        // Only reachable if polled again after a panic in this very arm.
                        return Poll::Ready(Ok(text_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Internal Server Error\n",
                        )
                        .map(ResBody::from)));
                    };
                    let report = match after_check(policy, decision, &mut req) {
                        Next::Call(report) => report,
                        Next::Respond(res) => return Poll::Ready(Ok(res)),
                    };
                    let fut = inner.call(req);
                    this.state.set(State::Calling { fut, report });
                }
                StateProj::Calling { fut, report } => {
                    // The headers go into the response where the inner future left it: moving
                    // the response out of its `Result` and back costs a copy of it.
                    let mut out = ready!(fut.poll(cx));
                    if let (Ok(res), Some(values)) = (&mut out, report.take()) {
                        values.write(res.headers_mut());
                    }
                    return Poll::Ready(out);
                }
                StateProj::Respond { res } => {
                    return match res.take() {
                        Some(res) => Poll::Ready(Ok(res)),
                        None => Poll::Ready(Ok(text_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "Internal Server Error\n",
                        )
                        .map(ResBody::from))),
                    };
                }
            }
        }
    }
}

/// What the layer does with a request once its store decided: call the inner service, adding
/// these headers to its response, or answer itself.
pub(crate) enum Next<B> {
    Call(Option<HeaderValues>),
    Respond(Response<B>),
}

/// Counts and logs a store's answer for `req` and says what comes next. The one place every
/// decision goes through, whether the store answered at once (in `call`) or later (in `poll`).
pub(crate) fn after_check<ReqBody, B: From<Bytes>>(
    policy: &CompiledPolicy,
    decision: Result<Decision, StoreError>,
    req: &mut Request<ReqBody>,
) -> Next<B> {
    match decision {
        Ok(decision) if decision.is_allowed() || policy.common.shadow => {
            if let Some(reason) = decision.fallback_reason() {
                policy.common.counters.fallback(reason);
            }
            if decision.is_allowed() {
                policy.common.counters.outcome(Outcome::Allowed);
            } else {
                shadow_limited(policy, &decision);
            }
            // A shadow policy is not enforced: it tells clients nothing.
            let report = (policy.respond.headers.any() && !policy.common.shadow)
                .then(|| policy.headers.values(policy.respond.headers, &decision));
            if policy.respond.decision_extension {
                req.extensions_mut().insert(decision);
            }
            Next::Call(report)
        }
        Ok(decision) => {
            if let Some(reason) = decision.fallback_reason() {
                policy.common.counters.fallback(reason);
            }
            policy.common.counters.outcome(Outcome::Limited);
            Next::Respond(limited(policy, &decision, grpc::is_grpc(req)))
        }
        Err(err) => match err.kind() {
            // A shadow policy never changes a response: it counts what it would have done and
            // lets the request through.
            StoreErrorKind::CostExceedsBurst { cost, .. } if policy.common.shadow => {
                shadow_over_capacity(policy, cost);
                Next::Call(None)
            }
            StoreErrorKind::CostExceedsBurst { cost, .. } => {
                Next::Respond(over_capacity_response(policy, cost, grpc::is_grpc(req)))
            }
            _ => match policy.common.store_failed(&err, grpc::is_grpc(req)) {
                Some(res) => Next::Respond(res.map(B::from)),
                None => Next::Call(None),
            },
        },
    }
}

fn limited<B: From<Bytes>>(
    policy: &CompiledPolicy,
    decision: &Decision,
    grpc: bool,
) -> Response<B> {
    let mut res = (policy.respond.limited)(decision);
    let wait = decision.retry_after().unwrap_or_default();
    set_retry_after(res.headers_mut(), wait);
    policy
        .headers
        .apply(policy.respond.headers, decision, res.headers_mut());
    grpc::own_answer(grpc, res, "rate limit exceeded", Some(wait)).map(B::from)
}

fn over_capacity_response<B: From<Bytes>>(
    policy: &CompiledPolicy,
    cost: u32,
    grpc: bool,
) -> Response<B> {
    policy.common.counters.outcome(Outcome::OverCapacity);
    if let Some(_held_back) = policy.common.degraded_log.permit() {
        #[cfg(feature = "tracing")]
        tracing::error!(
            policy = %policy.name(),
            cost,
            burst = policy.min_burst,
            suppressed = _held_back,
            "rate-limit-over-capacity: the request costs more than the policy's burst and can \
             never pass; answering 413. Raise the burst or lower the cost."
        );
    }
    let _ = cost;
    let res = text_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request Cost Exceeds Rate Limit Capacity\n",
    );
    let what = "the request costs more than the rate limit's burst and can never pass";
    grpc::own_answer(grpc, res, what, None).map(B::from)
}

/// A shadow policy's request that costs more than its burst: counted and logged, let through.
pub(crate) fn shadow_over_capacity(policy: &CompiledPolicy, cost: u32) {
    policy.common.counters.outcome(Outcome::ShadowOverCapacity);
    if let Some(_held_back) = policy.shadow_log.permit() {
        #[cfg(feature = "tracing")]
        tracing::info!(
            policy = %policy.name(),
            cost,
            burst = policy.min_burst,
            suppressed = _held_back,
            "rate-limit-shadow: this request costs more than the policy's burst and would have \
             been answered 413; letting it through (shadow mode)"
        );
    }
    let _ = cost;
}

fn shadow_limited(policy: &CompiledPolicy, decision: &Decision) {
    policy.common.counters.outcome(Outcome::ShadowLimited);
    if let Some(_held_back) = policy.shadow_log.permit() {
        #[cfg(feature = "tracing")]
        tracing::info!(
            policy = %policy.name(),
            retry_after = ?decision.retry_after(),
            suppressed = _held_back,
            "rate-limit-shadow: this request would have been refused; letting it through \
             (shadow mode)"
        );
    }
    #[cfg(not(feature = "tracing"))]
    let _ = decision;
}

impl<S, F, ReqBody> fmt::Debug for ResponseFuture<S, F, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
