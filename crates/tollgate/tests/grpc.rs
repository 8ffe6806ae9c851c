//! The gRPC form of the layers' own answers, through the layer as a tower service (the
//! end-to-end test with a real tonic client is tests/tests/grpc.rs): a limited call, a
//! fail-closed store failure, and the same requests in plain HTTP, or as a GET.

mod support;

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tollgate::clock::ManualClock;
use tollgate::{FailureMode, MemoryStore, Policy, RateLimitLayer, StoreErrorKind};
use tower::{ServiceBuilder, ServiceExt};

use support::{FlakyStore, counting, quota};

fn request(method: Method, content_type: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri("/svc.Greeter/SayHello")
        .header("content-type", content_type)
        .body(())
        .unwrap()
}

async fn answer<L>(layer: L, req: Request<()>) -> Response<http_body_util::Full<bytes::Bytes>>
where
    L: tower::Layer<
            tower::util::BoxCloneService<
                Request<()>,
                Response<http_body_util::Full<bytes::Bytes>>,
                std::convert::Infallible,
            >,
        >,
    L::Service: tower::Service<
            Request<()>,
            Response = Response<http_body_util::Full<bytes::Bytes>>,
            Error = std::convert::Infallible,
        >,
{
    let (_calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::util::BoxCloneService::new(inner));
    svc.oneshot(req).await.unwrap()
}

#[tokio::test]
async fn a_limited_grpc_call_is_resource_exhausted_and_a_limited_page_is_429() {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::new(MemoryStore::builder().clock(clock.clone()).build())
        .policy(Policy::new("grpc", quota("1/s")));
    let first = answer(layer.clone(), request(Method::POST, "application/grpc")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(
        !first.headers().contains_key("grpc-status"),
        "the service answered"
    );

    let limited = answer(
        layer.clone(),
        request(Method::POST, "application/grpc+proto"),
    )
    .await;
    assert_eq!(limited.status(), StatusCode::OK);
    let h = limited.headers();
    assert_eq!(h["grpc-status"], "8");
    assert_eq!(
        h["grpc-message"],
        "rate limit exceeded; retry after 1000 ms"
    );
    assert_eq!(h["grpc-retry-pushback-ms"], "1000");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h.contains_key("grpc-status-details-bin"));

    // Plain HTTP, and a GET that claims to be gRPC, get the HTTP answer.
    for req in [
        request(Method::POST, "application/json"),
        request(Method::GET, "application/grpc"),
    ] {
        let res = answer(layer.clone(), req).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(!res.headers().contains_key("grpc-status"));
    }
}

#[tokio::test]
async fn a_fail_closed_grpc_call_is_unavailable_and_says_the_store_failed() {
    let store = FlakyStore::new(&ManualClock::new());
    store.fail_with(Some(StoreErrorKind::Unavailable));
    let layer = RateLimitLayer::new(store)
        .policy(Policy::new("grpc", quota("10/s")).with_failure_mode(FailureMode::Closed))
        .unavailable_retry_after(Duration::from_secs(2));
    let res = answer(layer, request(Method::POST, "application/grpc")).await;
    let h = res.headers();
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(
        h["grpc-message"],
        "rate limiter unavailable: its store failed; retry after 2000 ms"
    );
    assert_eq!(h["grpc-retry-pushback-ms"], "2000");
}
