//! Policy features through the layer: costs from a closure, allowlists, shadow mode.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http::{Request, StatusCode};
use metrics_util::debugging::DebuggingRecorder;
use tollgate::clock::ManualClock;
use tollgate::key::UserFn;
use tollgate::{Allowlist, Policy, RateLimitLayer};
use tower::{ServiceBuilder, ServiceExt};

use support::{Counters, FlakyStore, counting, quota};

fn request(peer: [u8; 4], uri: &str) -> Request<()> {
    let mut req = Request::builder().uri(uri).body(()).unwrap();
    req.extensions_mut().insert(SocketAddr::from((peer, 1)));
    req
}

#[tokio::test]
async fn cost_comes_from_the_request() {
    let (_, inner) = counting();
    // ?rows=N costs N / 100 units, at least 1.
    let policy = Policy::new("search", quota("10/h")).with_cost_fn(|req| {
        req.uri()
            .query()
            .and_then(|q| q.strip_prefix("rows="))
            .and_then(|n| n.parse::<u32>().ok())
            .map_or(1, |rows| (rows / 100).max(1))
    });
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(tollgate::MemoryStore::new()).policy(policy))
        .service(inner);
    let peer = [192, 0, 2, 1];
    let res = svc
        .clone()
        .oneshot(request(peer, "/s?rows=700"))
        .await
        .unwrap();
    // 7 of 10 spent: 3 left, and one more unit comes back in 360 s (one emission interval),
    // which is what `t` says (draft-10), not the 2520 s until all ten are back.
    assert_eq!(res.headers()["ratelimit"], "\"search\";r=3;t=360");
    let res = svc
        .clone()
        .oneshot(request(peer, "/s?rows=400"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let res = svc
        .clone()
        .oneshot(request(peer, "/s?rows=300"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // A request that could never fit is a 413, not a 429.
    let res = svc.oneshot(request(peer, "/s?rows=5000")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn allowlisted_requests_skip_the_store_and_are_counted() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let store = FlakyStore::new(&ManualClock::new());
    let (calls, inner) = counting();
    let policy = Policy::new("api", quota("1/h")).with_allowlist(Allowlist::new().user("robot"));
    let layer = RateLimitLayer::new(store.clone())
        .policy(policy)
        .allowlist(
            Allowlist::new()
                .cidr("198.51.100.0/24".parse().unwrap())
                .predicate(|req| req.headers().contains_key("x-internal")),
        )
        .user_key(UserFn::new(|h: &http::HeaderMap, _: &http::Extensions| {
            h.get("x-user")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }));
    let svc = ServiceBuilder::new().layer(layer).service(inner);

    // The office network, the robot user and internal jobs: never limited, never stored.
    for _ in 0..5 {
        let res = svc
            .clone()
            .oneshot(request([198, 51, 100, 7], "/"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(!res.headers().contains_key("ratelimit"));
        let mut robot = request([203, 0, 113, 1], "/");
        robot
            .headers_mut()
            .insert("x-user", "robot".parse().unwrap());
        assert_eq!(
            svc.clone().oneshot(robot).await.unwrap().status(),
            StatusCode::OK
        );
        let mut job = request([203, 0, 113, 1], "/");
        job.headers_mut().insert("x-internal", "1".parse().unwrap());
        assert_eq!(
            svc.clone().oneshot(job).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(store.calls(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 15);
    assert_eq!(
        counters.get(
            "ratelimit_requests_total",
            &[("policy", "api"), ("decision", "allowlisted")]
        ),
        Some(15)
    );
    // Everybody else is limited as usual.
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(
                svc.clone()
                    .oneshot(request([203, 0, 113, 1], "/"))
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        v
    };
    assert_eq!(statuses, [200, 429]);
}

#[tokio::test]
async fn shadow_mode_decides_and_counts_but_never_refuses() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    for (policy_shadow, layer_shadow) in [(true, false), (false, true)] {
        let name = format!("new-limit-{policy_shadow}");
        let (calls, inner) = counting();
        let policy = Policy::new(name.clone(), quota("2/h")).with_shadow(policy_shadow);
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(tollgate::MemoryStore::new())
                    .policy(policy)
                    .shadow(layer_shadow),
            )
            .service(inner);
        for _ in 0..5 {
            let res = svc
                .clone()
                .oneshot(request([192, 0, 2, 9], "/"))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert!(!res.headers().contains_key("ratelimit"));
            assert!(!res.headers().contains_key("retry-after"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        let get = |decision| {
            counters.get(
                "ratelimit_requests_total",
                &[("policy", name.as_str()), ("decision", decision)],
            )
        };
        assert_eq!(get("allowed"), Some(2));
        assert_eq!(get("shadow_limited"), Some(3));
        assert_eq!(get("limited"), Some(0));
    }
}
