//! A tight loop of requests through the rate-limit layer on the allowed path, for profilers:
//! `valgrind --tool=callgrind` counts its instructions exactly, whatever else the machine is
//! doing, so a change to the request path can be measured before and after on a busy machine.
//!
//! `cargo build --release -p tollgate-tests --no-default-features --example layer-loop`, then
//! `valgrind --tool=callgrind target/release/examples/layer-loop [ITERATIONS] [headers|none|bare|floor] [empty|browser|router]`
//!
//! The request carries no header fields (`empty`, the default, as in the criterion layer bench)
//! or eight ordinary ones (`browser`: `host`, `user-agent`, `accept`, `cookie` and the like), for
//! what the layer's work on the request's headers costs on a request as clients send them.
//! `router` serves the empty request through an axum `Router` instead, the policy bound to its
//! route and the handler answering text (with its `content-type`), as an axum service does:
//! the layer's cost where it is used, its route looked up by the matched template; its
//! `governor` and `governor-headers` modes put tower_governor's layer there instead, to count
//! the alternative alike.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use tollgate::{MemoryStore, Policy, Quota, RateLimitHeaders, RateLimitLayer};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

// Statics, as the layer's own names are: built when compiled, not checked per request.
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Polls a future that is ready without waiting (every future here is).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the services here are ready at once"),
    }
}

/// Eight header fields of an ordinary request.
const BROWSER: [(&str, &str); 8] = [
    ("host", "api.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, br"),
    ("accept-language", "en-GB,en;q=0.9"),
    ("cookie", "session=4f2a9c"),
    ("authorization", "Bearer 5b1e"),
    ("x-request-id", "7d3c1f0a"),
];

/// The peer address as axum's `into_make_service_with_connect_info` gives it (the README's
/// setup), found by the layer's first lookup. Until 2026-12-07 this was a bare `SocketAddr`,
/// the last of three lookups (38 instructions more per request).
fn empty_request() -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [192, 0, 2, 1],
            4000,
        ))));
    req
}

fn browser_request() -> Request<()> {
    let mut req = empty_request();
    for (name, value) in BROWSER {
        req.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    req
}

/// The requests answered 200, of `iterations`. Each kind of request is its own loop, so the
/// empty request's costs no branch or call more than before the browser kind existed.
fn run<S>(svc: &S, iterations: u32, browser: bool) -> usize
where
    S: Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone,
{
    if browser {
        run_with(svc, iterations, browser_request)
    } else {
        run_with(svc, iterations, empty_request)
    }
}

fn run_with<S>(svc: &S, iterations: u32, request: impl Fn() -> Request<()>) -> usize
where
    S: Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone,
{
    (0..iterations)
        .filter(|_| black_box(now(svc.clone().oneshot(request()))).is_ok_and(|r| r.status() == 200))
        .count()
}

/// The requests an axum router answered 200, of `iterations`: `GET /hello` from a connected
/// peer, as `into_make_service_with_connect_info` serves it.
fn run_router(router: &Router, iterations: u32) -> usize {
    (0..iterations)
        .filter(|_| {
            let mut req = Request::new(axum::body::Body::empty());
            *req.uri_mut() = Uri::from_static("/hello");
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000))));
            black_box(now(router.clone().oneshot(req))).is_ok_and(|r| r.status() == 200)
        })
        .count()
}

/// `mode` through an axum router: no layer (`bare`), the layer with the policy bound to the
/// route, with or without rate-limit headers, or tower_governor's layer on the router, keyed by
/// the peer address with the same rate and burst, without its header fields (`governor`) or
/// with them (`governor-headers`, its `use_headers`).
fn router(mode: &str, iterations: u32) {
    let app = Router::new().route("/hello", get(|| async { "hello" }));
    let app = match mode {
        "bare" => app,
        "none" | "headers" => {
            let headers = if mode == "none" {
                RateLimitHeaders::None
            } else {
                RateLimitHeaders::Ietf
            };
            let quota = Quota::per_second(1_000_000)
                .and_then(|q| q.with_burst(u32::MAX))
                .expect("quota");
            app.layer(
                RateLimitLayer::new(MemoryStore::new())
                    .route("/hello", Policy::new("api", quota))
                    .headers(headers),
            )
        }
        "governor" | "governor-headers" => {
            let mut config = GovernorConfigBuilder::default();
            config.period(Duration::from_micros(1)).burst_size(u32::MAX);
            if mode == "governor" {
                app.layer(GovernorLayer::new(config.finish().expect("config")))
            } else {
                app.layer(GovernorLayer::new(
                    config.use_headers().finish().expect("config"),
                ))
            }
        }
        other => panic!(
            "mode {other} is not served through a router: bare, none, headers, governor or \
             governor-headers"
        ),
    };
    // Its routes made once, as `into_make_service` does: a `Router` called before that makes
    // each handler's route (and applies the layers to it) per request.
    let app = app.with_state(());
    let ok = run_router(&app, iterations);
    println!("{ok} of {iterations} answered 200 (router, {mode})");
}

fn main() {
    let iterations: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let mode = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "headers".to_owned());
    let browser = match std::env::args().nth(3).as_deref() {
        None | Some("empty") => false,
        Some("browser") => true,
        Some("router") => return router(&mode, iterations),
        Some(other) => panic!("unknown request kind {other}: empty, browser or router"),
    };
    let handler = |_req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())))
    };
    let quota = Quota::per_second(1_000_000)
        .and_then(|q| q.with_burst(u32::MAX))
        .expect("quota");
    let headers = match mode.as_str() {
        "bare" => {
            let ok = run(
                &ServiceBuilder::new().service_fn(handler),
                iterations,
                browser,
            );
            println!("{ok} of {iterations} answered 200 (no limiter)");
            return;
        }
        "floor" => {
            // No limiter, but the handler's response carries the two header fields the layer
            // adds, with values of the same length: what adding them costs in http itself (the
            // map's tables on its first insert, a value's allocation), whoever computes them.
            let policy =
                HeaderValue::try_from(String::from("\"api\";q=1000000;w=1")).expect("value");
            // Borrowed, so that the service is copied per request as the bare one is.
            let policy = &policy;
            let with_fields = move |_req: Request<()>| {
                let mut res = Response::new(Full::<Bytes>::default());
                let value = HeaderValue::from_bytes(black_box(b"\"api\";r=999999;t=0"));
                let headers = res.headers_mut();
                headers.append(RATELIMIT_POLICY.clone(), policy.clone());
                headers.append(RATELIMIT.clone(), value.expect("value"));
                std::future::ready(Ok::<_, Infallible>(res))
            };
            let ok = run(
                &ServiceBuilder::new().service_fn(with_fields),
                iterations,
                browser,
            );
            println!("{ok} of {iterations} answered 200 (no limiter, two header fields)");
            return;
        }
        "none" => RateLimitHeaders::None,
        _ => RateLimitHeaders::Ietf,
    };
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .policy(Policy::new("api", quota))
                .headers(headers),
        )
        .service_fn(handler);
    let ok = run(&svc, iterations, browser);
    println!("{ok} of {iterations} allowed ({mode})");
}
