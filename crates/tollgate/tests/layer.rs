//! The layer through `ServiceBuilder` + `oneshot`, with a manual clock and stores that fail on
//! demand.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics_util::debugging::DebuggingRecorder;
use tollgate::clock::ManualClock;
use tollgate::{
    Decision, FailureMode, KeyScope, MemoryStore, MissingKey, Policy, RateLimitHeaders,
    RateLimitLayer, StoreErrorKind,
};
use tower::{Service, ServiceBuilder, ServiceExt};

use support::{Counters, FlakyStore, counting, quota};

const PEER: ([u8; 4], u16) = ([192, 0, 2, 10], 50_000);

fn request_from(peer: impl Into<SocketAddr>) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut().insert(peer.into());
    req
}

fn request() -> Request<()> {
    request_from(PEER)
}

#[tokio::test]
async fn limits_and_recovers_with_the_clock() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
                .policy(Policy::new("api", quota("2/s"))),
        )
        .service(inner);

    for remaining in [1, 0] {
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit-policy"], "\"api\";q=2;w=1");
        assert_eq!(
            res.headers()["ratelimit"],
            format!("\"api\";r={remaining};t=1").as_str()
        );
    }
    let res = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // 500 ms, rounded up to a whole second.
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["ratelimit"], "\"api\";r=0;t=1");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "Too Many Requests\n"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a limited request reached the service"
    );

    // Another client has its own budget.
    let other = svc
        .clone()
        .oneshot(request_from(([192, 0, 2, 11], 1)))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);

    clock.advance(Duration::from_millis(499));
    let res = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    clock.advance(Duration::from_millis(1));
    assert_eq!(
        svc.oneshot(request()).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn retry_after_is_rounded_up_from_the_exact_wait() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    // One per 10 seconds: the second request must wait 10 s; after 2.5 s it must wait 7.5 s,
    // which is sent as 8.
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
                .policy(Policy::new("slow", quota("1/10s"))),
        )
        .service(inner);
    svc.clone().oneshot(request()).await.unwrap();
    let res = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.headers()["retry-after"], "10");
    clock.advance(Duration::from_millis(2500));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.headers()["retry-after"], "8");
}

#[tokio::test]
async fn poll_ready_is_forwarded_and_never_limits() {
    let layer = RateLimitLayer::new(MemoryStore::new()).policy(Policy::new("api", quota("1/h")));
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<Full<Bytes>>, _>(layer);

    handle.allow(0);
    tokio_test_pending(&mut svc);
    handle.allow(1);
    assert!(svc.poll_ready().is_ready());
}

fn tokio_test_pending<T: Service<Request<()>>>(svc: &mut tower_test::mock::Spawn<T>) {
    assert!(
        svc.poll_ready().is_pending(),
        "poll_ready should be pending"
    );
}

#[tokio::test]
async fn decision_is_available_to_the_handler_when_asked_for() {
    let handler = |req: Request<()>| async move {
        let body = match req.extensions().get::<Decision>() {
            Some(d) => format!("{} of {}", d.remaining(), d.limit()),
            None => "no decision".to_owned(),
        };
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body)))
    };
    let body = |layer: RateLimitLayer<MemoryStore>| async move {
        let svc = ServiceBuilder::new()
            .layer(layer.policy(Policy::new("api", quota("5/m"))))
            .service_fn(handler);
        let res = svc.oneshot(request()).await.unwrap();
        res.into_body().collect().await.unwrap().to_bytes()
    };
    let asked = RateLimitLayer::new(MemoryStore::new()).decision_extension(true);
    assert_eq!(body(asked).await, "4 of 5");
    // Not asked for: no work spent on an extension nothing reads.
    assert_eq!(
        body(RateLimitLayer::new(MemoryStore::new())).await,
        "no decision"
    );
}

#[tokio::test]
async fn header_modes() {
    let cases = [
        (RateLimitHeaders::Ietf, true, false),
        (RateLimitHeaders::Legacy, false, true),
        (RateLimitHeaders::Both, true, true),
        (RateLimitHeaders::None, false, false),
    ];
    for (mode, ietf, legacy) in cases {
        let (_, inner) = counting();
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(MemoryStore::new())
                    .policy(Policy::new("api", quota("1/m")))
                    .headers(mode),
            )
            .service(inner);
        for status in [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
            let res = svc.clone().oneshot(request()).await.unwrap();
            assert_eq!(res.status(), status);
            let h = res.headers();
            assert_eq!(h.contains_key("ratelimit"), ietf, "{mode:?}");
            assert_eq!(h.contains_key("ratelimit-policy"), ietf, "{mode:?}");
            assert_eq!(h.contains_key("x-ratelimit-remaining"), legacy, "{mode:?}");
            // Retry-After is not optional on a 429.
            assert_eq!(
                h.contains_key("retry-after"),
                status != StatusCode::OK,
                "{mode:?}"
            );
        }
    }
}

/// What the headers tell a client is exactly when to come back (draft-10): `t` is when more
/// quota comes, not when all of it is back; on a 429 the binding quota's `t`, the legacy
/// reset and `Retry-After` agree; the legacy limit and remaining are on one scale.
#[tokio::test]
async fn headers_say_when_more_quota_comes_and_agree_with_retry_after() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    let header = |res: &Response<_>, name: &str| -> String {
        res.headers()[name].to_str().unwrap().to_owned()
    };
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
                .policy(Policy::new("hello", quota("5/10s")))
                .headers(RateLimitHeaders::Both),
        )
        .service(inner);
    // 5 per 10 s: a unit comes back every 2 s. After two requests, 3 are left and the next one
    // is 2 s away, though the quota is full only in 4 s.
    svc.clone().oneshot(request()).await.unwrap();
    let second = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(header(&second, "ratelimit"), "\"hello\";r=3;t=2");
    // Half a second later the next unit is 1.5 s away: rounded up, never early.
    clock.advance(Duration::from_millis(500));
    let third = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(header(&third, "ratelimit"), "\"hello\";r=2;t=2");
    for _ in 0..2 {
        svc.clone().oneshot(request()).await.unwrap();
    }
    let refused = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry = header(&refused, "retry-after");
    assert_eq!(
        header(&refused, "ratelimit"),
        format!("\"hello\";r=0;t={retry}")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let reset: u64 = header(&refused, "x-ratelimit-reset").parse().unwrap();
    let retry: u64 = retry.parse().unwrap();
    // The Unix reset is the same moment as Retry-After (a second's tick may pass between).
    assert!(
        reset.abs_diff(now + retry) <= 1,
        "{reset} vs {now} + {retry}"
    );

    // 100 per hour: after one request the next unit is 36 s away, not an hour.
    let hourly = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
                .policy(Policy::new("hourly", quota("100/h"))),
        )
        .service(counting().1);
    let res = hourly.oneshot(request()).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), "\"hourly\";r=99;t=36");

    // Two quotas: the refusing one binds the legacy headers and Retry-After, even when the
    // other has the longer reset; the limit is the burst `remaining` counts down from.
    let two = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
                .policy(Policy::new("two", quota("10/s burst 20")).add_quota(quota("1000/d")))
                .headers(RateLimitHeaders::Both),
        )
        .service(counting().1);
    let first = two.clone().oneshot(request()).await.unwrap();
    assert_eq!(header(&first, "x-ratelimit-limit"), "20");
    assert_eq!(header(&first, "x-ratelimit-remaining"), "19");
    for _ in 0..19 {
        two.clone().oneshot(request()).await.unwrap();
    }
    let refused = two.clone().oneshot(request()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_eq!(header(&refused, "x-ratelimit-limit"), "20");
    let reset: u64 = header(&refused, "x-ratelimit-reset").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(reset.abs_diff(now + 1) <= 1, "{reset} vs {now} + 1");
    assert_eq!(
        header(&refused, "ratelimit"),
        "\"two-1\";r=0;t=1, \"two-2\";r=980;t=87"
    );
}

#[tokio::test]
async fn custom_limited_response() {
    let (_, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .policy(Policy::new("api", quota("1/m")))
                .limited_response(|d| {
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header("content-type", "application/json")
                        .body(Bytes::from(format!("{{\"limit\":{}}}", d.limit())))
                        .unwrap()
                }),
        )
        .service(inner);
    svc.clone().oneshot(request()).await.unwrap();
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["retry-after"], "60");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "{\"limit\":1}"
    );
}

#[tokio::test]
async fn fail_open_lets_requests_through_and_counts_them() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let clock = ManualClock::new();
    let store = FlakyStore::new(&clock);
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(store.clone()).policy(Policy::new("api", quota("1/m"))))
        .service(inner);

    // Registered at zero when the layer is applied, before any failure.
    for reason in ["timeout", "unavailable", "circuit_open", "script_error"] {
        assert_eq!(
            counters.get(
                "ratelimit_fail_open_total",
                &[("policy", "api"), ("reason", reason)]
            ),
            Some(0),
            "{reason}"
        );
    }

    store.fail_with(Some(StoreErrorKind::Timeout));
    for _ in 0..3 {
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // No decision, so no rate-limit headers.
        assert!(!res.headers().contains_key("ratelimit"));
    }
    store.fail_with(Some(StoreErrorKind::Unavailable));
    svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    let fail_open = |reason| {
        counters.get(
            "ratelimit_fail_open_total",
            &[("policy", "api"), ("reason", reason)],
        )
    };
    assert_eq!(fail_open("timeout"), Some(3));
    assert_eq!(fail_open("unavailable"), Some(1));
    assert_eq!(
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "api"), ("decision", "fail_open")]
        ),
        Some(4)
    );

    // Once the store answers again, limiting resumes.
    store.fail_with(None);
    assert_eq!(
        svc.clone().oneshot(request()).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        svc.oneshot(request()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "api"), ("decision", "limited")]
        ),
        Some(1)
    );
}

#[tokio::test]
async fn fail_closed_answers_503_without_calling_the_service() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let store = FlakyStore::new(&ManualClock::new());
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(store.clone())
                .policy(Policy::new("login", quota("3/m")).with_failure_mode(FailureMode::Closed))
                .unavailable_retry_after(Duration::from_secs(7)),
        )
        .service(inner);
    store.fail_with(Some(StoreErrorKind::Script));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "7");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        counters.get(
            "ratelimit_fail_closed_total",
            &[("policy", "login"), ("reason", "script_error")]
        ),
        Some(1)
    );
    assert_eq!(
        counters.get(
            "ratelimit_fail_open_total",
            &[("policy", "login"), ("reason", "script_error")]
        ),
        Some(0)
    );
}

#[tokio::test]
async fn a_cost_above_the_burst_is_an_error_not_a_stream_of_429s() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let store = FlakyStore::new(&ManualClock::new());
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            // A fixed cost above the burst is refused when the policy is added; a computed one
            // can still ask for more than the burst at request time.
            RateLimitLayer::new(store.clone())
                .policy(Policy::new("bulk", quota("5/s")).with_cost_fn(|_| 6)),
        )
        .service(inner);
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(!res.headers().contains_key("retry-after"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        store.calls(),
        0,
        "the store was asked a question with no answer"
    );
    assert_eq!(
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "bulk"), ("decision", "over_capacity")]
        ),
        Some(1)
    );
}

#[tokio::test]
async fn store_reporting_a_cost_above_the_burst_is_not_a_store_failure() {
    // A store may also detect it (the cost check lives in the store too).
    let store = FlakyStore::new(&ManualClock::new());
    store.fail_with(Some(StoreErrorKind::CostExceedsBurst { cost: 9, burst: 2 }));
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(store).policy(Policy::new("api", quota("2/s"))))
        .service(inner);
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn requests_without_a_peer_address() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let layer = |missing: Option<MissingKey>, failure: FailureMode| {
        let l = RateLimitLayer::new(MemoryStore::new())
            .policy(Policy::new("api", quota("1/m")).with_failure_mode(failure));
        match missing {
            Some(m) => l.missing_key(m),
            None => l,
        }
    };
    let statuses = |svc: &_, n: usize| {
        let svc: &tower::util::BoxCloneService<Request<()>, Response<Full<Bytes>>, Infallible> =
            svc;
        let svc = svc.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let res = svc.clone().oneshot(Request::new(())).await.unwrap();
                out.push(res.status().as_u16());
            }
            out
        }
    };
    let boxed = |l: RateLimitLayer<MemoryStore>| {
        let (calls, inner) = counting();
        let svc = ServiceBuilder::new().layer(l).service(inner);
        (calls, tower::util::BoxCloneService::new(svc))
    };

    // The default, Shared: all such requests share one budget. The limit holds, even for a
    // fail-open policy.
    let (calls, svc) = boxed(layer(None, FailureMode::Open));
    assert_eq!(statuses(&svc, 3).await, [200, 429, 429]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Keyed requests keep their own budget.
    assert_eq!(
        svc.oneshot(request()).await.unwrap().status(),
        StatusCode::OK
    );

    // Allow: a fail-open policy lets them through, counted as unkeyed...
    let (calls, svc) = boxed(layer(Some(MissingKey::Allow), FailureMode::Open));
    assert_eq!(statuses(&svc, 3).await, [200, 200, 200]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "api"), ("decision", "unkeyed")]
        ),
        Some(3)
    );
    // ...but a fail-closed policy never silently becomes unlimited: 503, as when the store
    // cannot decide.
    let (calls, svc) = boxed(layer(Some(MissingKey::Allow), FailureMode::Closed));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "Service Unavailable\n"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Reject: 500, the service is not called.
    let (calls, svc) = boxed(layer(Some(MissingKey::Reject), FailureMode::Open));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "Internal Server Error\n"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn shadow_mode_never_changes_a_response() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);
    let decision = |d: &str| {
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "trial"), ("decision", d)],
        )
    };

    let store = FlakyStore::new(&ManualClock::new());
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(store.clone())
                .policy(
                    Policy::new("trial", quota("2/m"))
                        .with_failure_mode(FailureMode::Closed)
                        .with_cost_fn(|req| if req.uri().path() == "/big" { 5 } else { 1 }),
                )
                .missing_key(MissingKey::Reject)
                .shadow(true),
        )
        .service(inner);
    let get = |path: &str, keyed: bool| {
        let mut req = Request::get(path).body(()).unwrap();
        if keyed {
            req.extensions_mut().insert(SocketAddr::from(PEER));
        }
        svc.clone().oneshot(req)
    };
    let mut got = Vec::new();
    // Would-be 429s.
    for _ in 0..3 {
        let res = get("/", true).await.unwrap();
        // A shadow policy tells clients nothing.
        assert!(!res.headers().contains_key("ratelimit"));
        got.push(res.status().as_u16());
    }
    // A would-be 413: the cost exceeds the burst.
    got.push(get("/big", true).await.unwrap().status().as_u16());
    // A would-be 500: no peer address under MissingKey::Reject.
    got.push(get("/", false).await.unwrap().status().as_u16());
    // A would-be 503: the store fails on a fail-closed policy.
    store.fail_with(Some(StoreErrorKind::Unavailable));
    got.push(get("/", true).await.unwrap().status().as_u16());
    assert_eq!(got, [200; 6]);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    // It counted what it would have done.
    assert_eq!(decision("allowed"), Some(2));
    assert_eq!(decision("shadow_limited"), Some(1));
    assert_eq!(decision("shadow_over_capacity"), Some(1));
    assert_eq!(decision("unkeyed"), Some(1));
    assert_eq!(decision("shadow_fail_closed"), Some(1));
    // Let through undecided: that is what the fail-open counter counts, whatever the mode.
    assert_eq!(
        counters.get(
            "ratelimit_fail_open_total",
            &[("policy", "trial"), ("reason", "unavailable")]
        ),
        Some(1)
    );
    assert_eq!(
        counters.get(
            "ratelimit_fail_closed_total",
            &[("policy", "trial"), ("reason", "unavailable")]
        ),
        Some(0)
    );
}

#[tokio::test]
async fn a_layer_without_policies_limits_nothing() {
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new()))
        .service(inner);
    for _ in 0..100 {
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(!res.headers().contains_key("ratelimit"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}

#[tokio::test]
async fn several_quotas_are_reported_and_enforced_together() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::with_clock(clock.clone()))
                .policy(Policy::new("export", quota("2/s")).add_quota(quota("3/m"))),
        )
        .service(inner);
    let res = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(
        res.headers()["ratelimit-policy"],
        "\"export-1\";q=2;w=1, \"export-2\";q=3;w=60"
    );
    assert_eq!(
        res.headers()["ratelimit"],
        "\"export-1\";r=1;t=1, \"export-2\";r=2;t=20"
    );
    svc.clone().oneshot(request()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    svc.clone().oneshot(request()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    // The per-second quota allows, the per-minute one does not.
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "18");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn fallback_decisions_are_enforced_and_counted_apart_from_fail_open() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let store = FlakyStore::new(&ManualClock::new());
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(store.clone()).policy(Policy::new("api", quota("2/m"))))
        .service(inner);
    assert_eq!(
        counters.get(
            "ratelimit_fallback_total",
            &[("policy", "api"), ("reason", "circuit_open")]
        ),
        Some(0)
    );
    store.fail_with(Some(StoreErrorKind::CircuitOpen));
    store.fallback(true);
    let mut got = Vec::new();
    for _ in 0..3 {
        let res = svc.clone().oneshot(request()).await.unwrap();
        // A fallback decision is a real decision: headers included.
        assert!(res.headers().contains_key("ratelimit"));
        got.push(res.status().as_u16());
    }
    assert_eq!(got, [200, 200, 429]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        counters.get(
            "ratelimit_fallback_total",
            &[("policy", "api"), ("reason", "circuit_open")]
        ),
        Some(3)
    );
    assert_eq!(
        counters.get(
            "ratelimit_fail_open_total",
            &[("policy", "api"), ("reason", "circuit_open")]
        ),
        Some(0)
    );
    assert_eq!(
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "api"), ("decision", "limited")]
        ),
        Some(1)
    );
}

#[test]
fn the_builder_refuses_what_the_file_refuses() {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let message = |f: &dyn Fn() -> RateLimitLayer<MemoryStore>| {
        let err = catch_unwind(AssertUnwindSafe(f)).expect_err("accepted an invalid policy");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let base = || RateLimitLayer::new(MemoryStore::new());
    let cases: [(&dyn Fn() -> RateLimitLayer<MemoryStore>, &str); 6] = [
        (
            &|| base().route("/a", Policy::new("a b", quota("1/s"))),
            "invalid policy name \"a b\"",
        ),
        (
            &|| base().route("/a", Policy::new("a", quota("2/s")).with_cost(0)),
            "cost 0 must be between 1 and the smallest burst (2)",
        ),
        (
            &|| {
                base().policy(
                    Policy::new("a", quota("2/s"))
                        .add_quota(quota("1/m"))
                        .with_cost(2),
                )
            },
            "cost 2 must be between 1 and the smallest burst (1)",
        ),
        (
            &|| base().route("a", Policy::new("a", quota("1/s"))),
            "route \"a\" is not a route template",
        ),
        (
            &|| {
                base()
                    .route("/a", Policy::new("a", quota("1/s")))
                    .route("/a", Policy::new("b", quota("1/s")))
            },
            "another policy already applies to any method on /a",
        ),
        (
            // Two different policies under one name would share the state of the quota they
            // have in common (1/s here) and merge their metrics.
            &|| {
                base()
                    .route(
                        "/a",
                        Policy::new("p", quota("1/s")).with_scope(KeyScope::Policy),
                    )
                    .route(
                        "/b",
                        Policy::new("p", quota("1/s"))
                            .add_quota(quota("5/m fixed-window"))
                            .with_scope(KeyScope::Policy),
                    )
            },
            "policy name \"p\" is already used by a different policy",
        ),
    ];
    for (build, want) in cases {
        let got = message(build);
        assert!(got.contains(want), "got: {got}\nwant: {want}");
    }
    // The same policy on several routes is one policy: accepted.
    let same = Policy::new("p", quota("1/s"));
    let _ = base()
        .route("/a", same.clone())
        .route("/b", same.clone())
        .policy(same);
}

#[tokio::test]
async fn a_cost_function_cannot_make_a_request_free() {
    let (calls, inner) = counting();
    // A client-controlled cost that says 0: raised to 1, so the limit still holds.
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new()).policy(
            Policy::new("batch", quota("2/m")).with_cost_fn(|req| {
                req.headers()
                    .get("x-batch-size")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1)
            }),
        ))
        .service(inner);
    let mut got = Vec::new();
    for _ in 0..4 {
        let mut req = request();
        req.headers_mut()
            .insert("x-batch-size", "0".parse().unwrap());
        got.push(svc.clone().oneshot(req).await.unwrap().status().as_u16());
    }
    assert_eq!(got, [200, 200, 429, 429]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Lines a `tracing` subscriber wrote, for tests of what the layer logs.
#[derive(Clone, Default)]
struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogLines {
    /// Captures what this thread logs until the guard is dropped.
    #[cfg(feature = "tracing")]
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = LogLines::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(feature = "tracing")]
#[tokio::test]
async fn a_missing_peer_address_is_said_loudly_once() {
    let (logs, _guard) = LogLines::capture();
    let (_, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new()).policy(Policy::new("api", quota("100/m"))))
        .service(inner);
    for _ in 0..10 {
        svc.clone().oneshot(Request::new(())).await.unwrap();
    }
    let said: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("rate-limit-misconfigured"))
        .collect();
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(said[0].contains("ERROR"), "{}", said[0]);
    assert!(
        said[0].contains("into_make_service_with_connect_info"),
        "{}",
        said[0]
    );
    assert!(said[0].contains("shares one budget"), "{}", said[0]);
}

/// A store outage under load writes a line when it starts, not one per request: the first
/// failure of a policy logs `rate-limit-degraded` with its reason, and the failures after it
/// within the interval (10 s; these requests take microseconds) are held back. The interval
/// itself, and the count of lines held back, are tested on an injected clock in pipeline.rs.
#[cfg(feature = "tracing")]
#[tokio::test]
async fn a_failing_store_is_logged_once_not_per_request() {
    let (logs, _guard) = LogLines::capture();
    let store = FlakyStore::new(&ManualClock::new());
    store.fail_with(Some(StoreErrorKind::Timeout));
    let (_, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(store.clone()).policy(Policy::new("api", quota("100/m"))))
        .service(inner);
    for _ in 0..5 {
        let res = svc.clone().oneshot(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "fails open");
    }
    assert_eq!(store.calls(), 5);
    let said: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("rate-limit-degraded"))
        .collect();
    assert_eq!(said.len(), 1, "{said:#?}");
    for part in [
        "WARN",
        "policy=api",
        "reason=\"timeout\"",
        "suppressed=0",
        "fail open",
    ] {
        assert!(said[0].contains(part), "{part} not in {}", said[0]);
    }
}

/// The inner service's error comes back to the caller as it was, and its responses get the
/// rate-limit headers, whether the store decides at once (the memory store: the inner service
/// is called from `call`) or later (a store answering through its future: called from `poll`).
#[tokio::test]
async fn the_inner_services_answer_comes_back_as_it_was_from_either_path() {
    let inner = tower::service_fn(|req: Request<()>| async move {
        if req.uri().path() == "/fail" {
            Err("inner failure")
        } else {
            Ok(Response::new(Full::<Bytes>::default()))
        }
    });
    let policy = || Policy::new("api", quota("100/m"));
    let at_once = ServiceBuilder::new()
        .layer(RateLimitLayer::new(MemoryStore::new()).policy(policy()))
        .service(inner);
    let later = ServiceBuilder::new()
        .layer(RateLimitLayer::new(FlakyStore::new(&ManualClock::new())).policy(policy()))
        .service(inner);
    let to = |path: &'static str| {
        let mut req = request();
        *req.uri_mut() = http::Uri::from_static(path);
        req
    };
    for answer in [
        at_once.clone().oneshot(to("/ok")).await,
        later.clone().oneshot(to("/ok")).await,
    ] {
        let res = answer.expect("the inner service answered");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit"], "\"api\";r=99;t=1");
    }
    assert_eq!(
        at_once.oneshot(to("/fail")).await.err(),
        Some("inner failure")
    );
    assert_eq!(
        later.oneshot(to("/fail")).await.err(),
        Some("inner failure")
    );
}
