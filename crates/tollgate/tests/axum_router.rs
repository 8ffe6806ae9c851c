//! The layer inside axum routers: per-route tables with `.layer()`, a single route with
//! `.route_layer()`, keys on the matched template and the peer address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tollgate::key::UserFromExtension;
use tollgate::{Decision, FailureMode, KeyScope, MemoryStore, Policy, Quota, RateLimitLayer};
use tower::ServiceExt;

fn quota(s: &str) -> Quota {
    s.parse().unwrap()
}

fn req(method: Method, uri: &str, peer: [u8; 4]) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((peer, 40_000))));
    req
}

async fn statuses(app: &Router, method: Method, uri: &str, peer: [u8; 4], n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let res = app
            .clone()
            .oneshot(req(method.clone(), uri, peer))
            .await
            .unwrap();
        out.push(res.status().as_u16());
    }
    out
}

fn app() -> Router {
    let limits = RateLimitLayer::new(MemoryStore::new())
        .route("/hello", Policy::new("hello", quota("5/10s")))
        .route(
            "/login",
            Policy::new("login", quota("3/m")).with_failure_mode(FailureMode::Closed),
        )
        .route("/users/{id}", Policy::new("users", quota("2/m")))
        .route_method(
            Method::POST,
            "/items",
            Policy::new("items-write", quota("1/m")),
        )
        .route("/items", Policy::new("items-read", quota("3/m")));
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/login", post(|| async { "welcome" }))
        .route("/users/{id}", get(|| async { "user" }))
        .route(
            "/items",
            get(|| async { "items" }).post(|| async { "created" }),
        )
        .route("/free", get(|| async { "free" }))
        .layer(limits)
}

#[tokio::test]
async fn per_route_policies_from_one_router_layer() {
    let app = app();
    let c = [198, 51, 100, 1];
    assert_eq!(
        statuses(&app, Method::GET, "/hello", c, 6).await,
        [200, 200, 200, 200, 200, 429]
    );
    assert_eq!(
        statuses(&app, Method::POST, "/login", c, 4).await,
        [200, 200, 200, 429]
    );
    // A route without a policy passes untouched.
    let res = app
        .clone()
        .oneshot(req(Method::GET, "/free", c))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.headers().contains_key("ratelimit"));
    assert_eq!(statuses(&app, Method::GET, "/free", c, 50).await, [200; 50]);
    // Another client is unaffected by the first one's spending.
    assert_eq!(
        statuses(&app, Method::GET, "/hello", [198, 51, 100, 2], 1).await,
        [200]
    );
}

#[tokio::test]
async fn keys_on_the_route_template_not_the_raw_path() {
    let app = app();
    let c = [198, 51, 100, 3];
    // Varying the path parameter does not buy a fresh budget.
    let mut got = Vec::new();
    for id in ["1", "2", "3", "%2e", "4?x=1"] {
        got.extend(statuses(&app, Method::GET, &format!("/users/{id}"), c, 1).await);
    }
    assert_eq!(got, [200, 200, 429, 429, 429]);
}

#[tokio::test]
async fn method_specific_entries_win() {
    let app = app();
    let c = [198, 51, 100, 4];
    assert_eq!(
        statuses(&app, Method::POST, "/items", c, 2).await,
        [200, 429]
    );
    assert_eq!(
        statuses(&app, Method::GET, "/items", c, 4).await,
        [200, 200, 200, 429]
    );
    let res = app
        .clone()
        .oneshot(req(Method::GET, "/items", c))
        .await
        .unwrap();
    assert_eq!(res.headers()["ratelimit-policy"], "\"items-read\";q=3;w=60");
}

#[tokio::test]
async fn route_layer_on_a_single_route() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let search =
        RateLimitLayer::new(MemoryStore::new()).policy(Policy::new("search", quota("2/m")));
    let app = Router::new()
        .route(
            "/search",
            get(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                async { "results" }
            })
            .route_layer(search),
        )
        .route("/other", get(|| async { "other" }));
    let c = [198, 51, 100, 5];
    assert_eq!(
        statuses(&app, Method::GET, "/search", c, 3).await,
        [200, 200, 429]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(statuses(&app, Method::GET, "/other", c, 5).await, [200; 5]);
    // route_layer does not turn unknown paths into 429s.
    assert_eq!(statuses(&app, Method::GET, "/nope", c, 3).await, [404; 3]);
}

#[tokio::test]
async fn policy_scope_shares_one_budget_across_routes() {
    let shared = Policy::new("api", quota("3/m")).with_scope(KeyScope::Policy);
    let app = Router::new()
        .route("/a", get(|| async { "a" }))
        .route("/b", get(|| async { "b" }))
        .layer(RateLimitLayer::new(MemoryStore::new()).policy(shared));
    let c = [198, 51, 100, 6];
    let mut got = statuses(&app, Method::GET, "/a", c, 2).await;
    got.extend(statuses(&app, Method::GET, "/b", c, 2).await);
    assert_eq!(got, [200, 200, 200, 429]);

    // The default scope gives each route its own budget.
    let per_route = Policy::new("api", quota("1/m"));
    let app = Router::new()
        .route("/a", get(|| async { "a" }))
        .route("/b", get(|| async { "b" }))
        .layer(RateLimitLayer::new(MemoryStore::new()).policy(per_route));
    assert_eq!(statuses(&app, Method::GET, "/a", c, 2).await, [200, 429]);
    assert_eq!(statuses(&app, Method::GET, "/b", c, 2).await, [200, 429]);
}

#[derive(Clone)]
struct UserId(u64);

impl tollgate::key::AsUserKey for UserId {
    fn as_user_key(&self) -> std::borrow::Cow<'_, str> {
        self.0.to_string().into()
    }
}

#[tokio::test]
async fn user_part_from_an_auth_extension() {
    // A stand-in for an authentication layer: the user id comes from a header here.
    let auth = axum::middleware::from_fn(
        |mut req: Request<Body>, next: axum::middleware::Next| async move {
            if let Some(id) = req
                .headers()
                .get("x-user")
                .and_then(|v| v.to_str().ok()?.parse().ok())
            {
                req.extensions_mut().insert(UserId(id));
            }
            next.run(req).await
        },
    );
    let limits = RateLimitLayer::new(MemoryStore::new())
        .route("/me", Policy::new("me", quota("1/m")))
        .user_key(UserFromExtension::<UserId>::new());
    // Layers run outside-in: auth first, then the limiter.
    let app = Router::new()
        .route("/me", get(|| async { "me" }))
        .layer(limits)
        .layer(auth);

    let as_user = |user: &str| {
        let mut r = req(Method::GET, "/me", [198, 51, 100, 7]);
        r.headers_mut().insert("x-user", user.parse().unwrap());
        r
    };
    let status = |r: Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(r).await.unwrap().status().as_u16() }
    };
    // Same IP, two users: two budgets.
    assert_eq!(status(as_user("1")).await, 200);
    assert_eq!(status(as_user("1")).await, 429);
    assert_eq!(status(as_user("2")).await, 200);
}

#[tokio::test]
async fn handlers_read_the_decision() {
    let app = Router::new()
        .route(
            "/quota",
            get(|Extension(d): Extension<Decision>| async move {
                format!("{}/{}", d.remaining(), d.limit())
            }),
        )
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .route("/quota", Policy::new("q", quota("10/m")))
                .decision_extension(true),
        );
    let res = app
        .oneshot(req(Method::GET, "/quota", [198, 51, 100, 8]))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "9/10");
}

#[tokio::test]
async fn mock_connect_info_works_for_tests() {
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .route("/hello", Policy::new("hello", quota("1/m"))),
        )
        .layer(axum::extract::connect_info::MockConnectInfo(
            SocketAddr::from(([203, 0, 113, 1], 1)),
        ));
    let plain = || Request::get("/hello").body(Body::empty()).unwrap();
    assert_eq!(app.clone().oneshot(plain()).await.unwrap().status(), 200);
    assert_eq!(app.oneshot(plain()).await.unwrap().status(), 429);
}

#[tokio::test]
async fn a_get_policy_covers_head_and_shares_its_budget() {
    // axum answers HEAD with the GET handler; `curl -I` must not step around a GET limit.
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let app = Router::new()
        .route(
            "/export",
            get(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                async { "rows" }
            }),
        )
        .route("/any", get(|| async { "any" }))
        .route(
            "/own-head",
            get(|| async { "get" }).head(|| async { "head" }),
        )
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .route_method(Method::GET, "/export", Policy::new("export", quota("2/s")))
                .route("/any", Policy::new("any", quota("1/m")))
                .route_method(
                    Method::GET,
                    "/own-head",
                    Policy::new("own-get", quota("1/m")),
                )
                .route_method(
                    Method::HEAD,
                    "/own-head",
                    Policy::new("own-head", quota("3/m")),
                ),
        );
    let c = [198, 51, 100, 9];
    assert_eq!(
        statuses(&app, Method::HEAD, "/export", c, 6).await,
        [200, 200, 429, 429, 429, 429]
    );
    // One budget for both methods: the HEADs spent it.
    assert_eq!(statuses(&app, Method::GET, "/export", c, 1).await, [429]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A policy for any method covers HEAD too.
    assert_eq!(statuses(&app, Method::HEAD, "/any", c, 2).await, [200, 429]);
    // An explicit HEAD entry wins over the GET one.
    assert_eq!(
        statuses(&app, Method::HEAD, "/own-head", c, 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(
        statuses(&app, Method::GET, "/own-head", c, 2).await,
        [200, 429]
    );
}

#[tokio::test]
async fn the_layer_spends_the_state_of_the_key_its_policy_and_route_name() {
    // The layer hashes each policy's name and route template once, when it is built. Whatever
    // the way a request found its policy, the state it spends is the one a caller of the store
    // reaches with `Key::new` from the policy's name and the key's route part: a prefix hashed
    // from the wrong pair would leave that state untouched (and split or merge budgets).
    let store = MemoryStore::new();
    let one = quota("1/m");
    let layer = RateLimitLayer::new(store.clone())
        .route("/any", Policy::new("any", one))
        .route_method(Method::POST, "/post", Policy::new("post", one))
        .route(
            "/shared",
            Policy::new("shared", one).with_scope(KeyScope::Policy),
        )
        .policy(Policy::new("default", one));
    let app = Router::new()
        .route("/any", get(|| async { "any" }))
        .route("/post", get(|| async { "get" }).post(|| async { "post" }))
        .route("/shared", get(|| async { "shared" }))
        .route("/unbound", get(|| async { "unbound" }))
        .layer(layer);
    let peer = [203, 0, 113, 9];
    let ip = Some(std::net::IpAddr::from(peer));
    // (method, path, policy name, the key's route part)
    let cases = [
        (Method::GET, "/any", "any", "/any"),
        (Method::POST, "/post", "post", "/post"),
        // A template with an entry, but not for this method: the default policy.
        (Method::GET, "/post", "default", "/post"),
        // A template without an entry: the default policy, hashed per request.
        (Method::GET, "/unbound", "default", "/unbound"),
        // A policy keyed on its name, not on the route.
        (Method::GET, "/shared", "shared", "shared"),
    ];
    for (method, path, policy, route) in cases {
        let key = tollgate::Key::new(policy, route, ip, None::<&str>);
        // A zero-cost check reads the state without spending.
        let before = store.decide(&key, &[one], 0).unwrap().states()[0].remaining();
        assert_eq!(before, 1, "{method} {path}: spent before its request");
        assert_eq!(statuses(&app, method.clone(), path, peer, 1).await, [200]);
        let after = store.decide(&key, &[one], 0).unwrap().states()[0].remaining();
        assert_eq!(
            after, 0,
            "{method} {path}: the request spent another key's state"
        );
    }
}
