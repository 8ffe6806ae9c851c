//! gRPC clients get gRPC answers: a real tonic client calls a real tonic service (the standard
//! health service) served through an axum router behind the layers, over HTTP/2. A limited
//! call ends with `RESOURCE_EXHAUSTED` and a retry delay the client can read; a fail-closed
//! policy whose store is down answers `UNAVAILABLE`; a full concurrency limit answers
//! `RESOURCE_EXHAUSTED`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tollgate::clock::ManualClock;
use tollgate::conformance::FailingStore;
use tollgate::{
    ConcurrencyLimitLayer, ConcurrencyPolicy, FailureMode, MemoryConcurrencyStore, MemoryStore,
    Policy, Quota, RateLimitLayer, StoreErrorKind,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

/// The standard health service as an axum router, for the layers to wrap.
fn health() -> axum::Router {
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::service::Routes::new(health).into_axum_router()
}

/// Serves `app` on a free loopback port (HTTP/2 included); returns a connected client.
async fn serve(app: axum::Router) -> HealthClient<tonic::transport::Channel> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn check(client: &mut HealthClient<tonic::transport::Channel>) -> Result<(), tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_limited_call_is_resource_exhausted_with_a_retry_delay() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let layer =
        RateLimitLayer::new(store).policy(Policy::new("grpc", "2/m".parse::<Quota>().unwrap()));
    let mut client = serve(health().layer(layer)).await;
    check(&mut client).await.expect("first call");
    clock.advance(Duration::from_millis(250));
    check(&mut client).await.expect("second call");

    let status = check(&mut client).await.expect_err("the third is limited");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        "rate limit exceeded; retry after 29750 ms"
    );
    // gRPC's own retry pushback, and the standard RetryInfo detail, agree with Retry-After.
    let meta = status.metadata();
    assert_eq!(meta.get("grpc-retry-pushback-ms").unwrap(), "29750");
    assert_eq!(meta.get("retry-after").unwrap(), "30");
    let retry = status
        .get_details_retry_info()
        .expect("a google.rpc.RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_millis(29_750)));
    // The rate-limit headers are there too, for clients that read them.
    assert!(
        meta.get("ratelimit")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("r=0")
    );

    // Once the wait is over the call passes again.
    clock.advance(Duration::from_millis(29_750));
    check(&mut client).await.expect("after the wait");
}

#[tokio::test]
async fn a_fail_closed_policy_whose_store_is_down_is_unavailable() {
    let store = FailingStore::new(&ManualClock::new());
    store.fail_with(Some(StoreErrorKind::Unavailable));
    let layer = RateLimitLayer::new(store)
        .policy(
            Policy::new("grpc", "100/s".parse::<Quota>().unwrap())
                .with_failure_mode(FailureMode::Closed),
        )
        .unavailable_retry_after(Duration::from_secs(3));
    let mut client = serve(health().layer(layer)).await;
    let status = check(&mut client).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "rate limiter unavailable: its store failed; retry after 3000 ms"
    );
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn a_fail_open_policy_whose_store_is_down_lets_the_call_through() {
    let store = FailingStore::new(&ManualClock::new());
    store.fail_with(Some(StoreErrorKind::Timeout));
    let layer =
        RateLimitLayer::new(store).policy(Policy::new("grpc", "1/h".parse::<Quota>().unwrap()));
    let mut client = serve(health().layer(layer)).await;
    for _ in 0..3 {
        check(&mut client).await.expect("let through undecided");
    }
}

#[tokio::test]
async fn a_full_concurrency_limit_is_resource_exhausted() {
    let layer = ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
        .policy(ConcurrencyPolicy::new("grpc", 1));
    let mut client = serve(health().layer(layer)).await;
    // A Watch call streams until dropped: it holds the only slot.
    let mut watching = client.clone();
    let stream = watching
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the watch starts");
    let status = check(&mut client).await.expect_err("no slot is free");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("too many concurrent requests; retry after"),
        "{status:?}"
    );
    drop(stream);
    // The slot comes back when the stream ends (the server sees the reset shortly after).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while check(&mut client).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
