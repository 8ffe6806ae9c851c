//! Who a request spends budget as, through real axum routers: each built-in key extractor, a
//! closure, a fallback with `or`, a shared budget over several routes (in code and in the
//! file), and the concurrency layer classifying through the same pipeline.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use http::{HeaderName, Request, StatusCode};
use tollgate::concurrency::{ConcurrencyLimitLayer, ConcurrencyPolicy, MemoryConcurrencyStore};
use tollgate::key::{AsUserKey, ClientAddress, FromExtension, Global, Identity, TrustedHeader};
use tollgate::{
    Allowlist, KeyExtractor, MemoryStore, MissingKey, Policy, RateLimitLayer, RequestParts,
};
use tower::ServiceExt;

/// What an authentication layer inserts once it has checked an API key.
#[derive(Clone)]
struct ApiKey(&'static str);

impl AsUserKey for ApiKey {
    fn as_user_key(&self) -> std::borrow::Cow<'_, str> {
        self.0.into()
    }
}

/// A request from `peer`, with an optional verified API key and extra headers.
fn req(
    path: &str,
    peer: u8,
    api_key: Option<&'static str>,
    headers: &[(&str, &str)],
) -> Request<Body> {
    let mut req = Request::get(path).body(Body::empty()).unwrap();
    req.extensions_mut().insert(ConnectInfo(SocketAddr::from((
        [198, 51, 100, peer],
        40_000,
    ))));
    if let Some(k) = api_key {
        req.extensions_mut().insert(ApiKey(k));
    }
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    req
}

async fn status(app: &Router, req: Request<Body>) -> u16 {
    app.clone().oneshot(req).await.unwrap().status().as_u16()
}

fn router<K: KeyExtractor + Clone>(key: K, quota: &str) -> Router {
    Router::new()
        .route("/api", get(|| async { "ok" }))
        .route("/other", get(|| async { "ok" }))
        .layer(
            RateLimitLayer::new(MemoryStore::new())
                .key(key)
                .route("/api", Policy::new("api", quota.parse().unwrap())),
        )
}

#[tokio::test]
async fn an_api_key_has_one_budget_whatever_address_it_comes_from() {
    let app = router(FromExtension::<ApiKey>::new(), "2/m");
    assert_eq!(status(&app, req("/api", 1, Some("k1"), &[])).await, 200);
    assert_eq!(status(&app, req("/api", 2, Some("k1"), &[])).await, 200);
    // A third address, the same key: the key's budget is spent.
    assert_eq!(status(&app, req("/api", 3, Some("k1"), &[])).await, 429);
    // Another key from the same address has its own.
    assert_eq!(status(&app, req("/api", 3, Some("k2"), &[])).await, 200);
}

#[tokio::test]
async fn requests_without_the_identity_follow_missing_key() {
    // Shared (the default): every anonymous request spends from one budget.
    let app = router(FromExtension::<ApiKey>::new(), "1/m");
    assert_eq!(status(&app, req("/api", 1, None, &[])).await, 200);
    assert_eq!(status(&app, req("/api", 2, None, &[])).await, 429);
    assert_eq!(status(&app, req("/api", 2, Some("k"), &[])).await, 200);

    // Reject: anonymous requests are answered 500, keyed ones decided.
    let app = Router::new().route("/api", get(|| async { "ok" })).layer(
        RateLimitLayer::new(MemoryStore::new())
            .key(FromExtension::<ApiKey>::new())
            .missing_key(MissingKey::Reject)
            .route("/api", Policy::new("api", "1/m".parse().unwrap())),
    );
    assert_eq!(status(&app, req("/api", 1, None, &[])).await, 500);
    assert_eq!(status(&app, req("/api", 1, Some("k"), &[])).await, 200);
}

#[tokio::test]
async fn or_falls_back_to_the_client_address() {
    let app = router(FromExtension::<ApiKey>::new().or(ClientAddress), "1/m");
    // Anonymous requests are limited per address...
    assert_eq!(status(&app, req("/api", 1, None, &[])).await, 200);
    assert_eq!(status(&app, req("/api", 1, None, &[])).await, 429);
    assert_eq!(status(&app, req("/api", 2, None, &[])).await, 200);
    // ...and a key is not the address it comes from.
    assert_eq!(status(&app, req("/api", 1, Some("k"), &[])).await, 200);
    assert_eq!(status(&app, req("/api", 1, Some("k"), &[])).await, 429);
}

#[tokio::test]
async fn a_tenant_header_from_the_gateway_keys_by_tenant() {
    let app = router(
        TrustedHeader::new(HeaderName::from_static("x-tenant")),
        "1/m",
    );
    let tenant = |t: &'static str| [("x-tenant", t)];
    assert_eq!(
        status(&app, req("/api", 1, None, &tenant("acme"))).await,
        200
    );
    assert_eq!(
        status(&app, req("/api", 2, None, &tenant("acme"))).await,
        429
    );
    assert_eq!(
        status(&app, req("/api", 2, None, &tenant("globex"))).await,
        200
    );
    // A repeated header (the client's copy and the gateway's) is no tenant: such requests
    // share the one budget for missing keys, never a fresh one each.
    let twice = [("x-tenant", "fresh-1"), ("x-tenant", "acme")];
    assert_eq!(status(&app, req("/api", 3, None, &twice)).await, 200);
    let twice = [("x-tenant", "fresh-2"), ("x-tenant", "acme")];
    assert_eq!(status(&app, req("/api", 3, None, &twice)).await, 429);
    // So is an empty one.
    assert_eq!(status(&app, req("/api", 4, None, &tenant(" "))).await, 429);
}

#[tokio::test]
async fn a_global_key_is_one_budget_for_every_client() {
    let app = router(Global, "2/m");
    assert_eq!(status(&app, req("/api", 1, None, &[])).await, 200);
    assert_eq!(status(&app, req("/api", 2, None, &[])).await, 200);
    assert_eq!(status(&app, req("/api", 3, Some("k"), &[])).await, 429);
    // Other routes are not limited by it.
    assert_eq!(status(&app, req("/other", 3, None, &[])).await, 200);
}

#[tokio::test]
async fn a_global_key_needs_no_peer_address() {
    // Global always has its identity: a layer that rejects requests without a key still
    // serves (and limits) requests that come with no peer address at all.
    let app = Router::new().route("/api", get(|| async { "ok" })).layer(
        RateLimitLayer::new(MemoryStore::new())
            .key(Global)
            .missing_key(tollgate::MissingKey::Reject)
            .route("/api", Policy::new("api", "1/m".parse().unwrap())),
    );
    let bare = || Request::get("/api").body(Body::empty()).unwrap();
    assert_eq!(status(&app, bare()).await, 200);
    assert_eq!(status(&app, bare()).await, 429);
}

#[tokio::test]
async fn a_closure_sees_the_resolved_client_and_the_matched_route() {
    let app = router(
        |r: &RequestParts<'_>| {
            assert_eq!(r.route(), Some("/api"));
            let version = r.headers().get("x-version")?.to_str().ok()?.to_owned();
            Some(Identity::from_client_ip(r.client_ip()?).with_user(version))
        },
        "1/m",
    );
    let v = |v: &'static str| [("x-version", v)];
    assert_eq!(status(&app, req("/api", 1, None, &v("1"))).await, 200);
    assert_eq!(status(&app, req("/api", 1, None, &v("1"))).await, 429);
    assert_eq!(status(&app, req("/api", 1, None, &v("2"))).await, 200);
    assert_eq!(status(&app, req("/api", 2, None, &v("1"))).await, 200);
}

#[tokio::test]
async fn a_group_of_routes_shares_one_budget() {
    let app = Router::new()
        .route("/reports", get(|| async { "r" }))
        .route("/exports", get(|| async { "e" }))
        .route("/other", get(|| async { "o" }))
        .layer(RateLimitLayer::new(MemoryStore::new()).routes(
            ["/reports", "/exports"],
            Policy::new("reporting", "2/m".parse().unwrap()),
        ));
    assert_eq!(status(&app, req("/reports", 1, None, &[])).await, 200);
    assert_eq!(status(&app, req("/exports", 1, None, &[])).await, 200);
    assert_eq!(status(&app, req("/reports", 1, None, &[])).await, 429);
    assert_eq!(status(&app, req("/exports", 1, None, &[])).await, 429);
    // Per client, and only on those routes.
    assert_eq!(status(&app, req("/exports", 2, None, &[])).await, 200);
    assert_eq!(status(&app, req("/other", 1, None, &[])).await, 200);
}

#[cfg(feature = "config")]
#[tokio::test]
async fn a_list_of_routes_in_the_file_shares_one_budget() {
    let file = |scope: &str| {
        format!(
            "[[policy]]\nname = \"reporting\"\nroute = [\"/reports\", \"/exports\"]\nquota = \"2/m\"\n{scope}"
        )
    };
    let app = |scope: &str| {
        let config = tollgate::config::Config::from_toml(&file(scope)).unwrap();
        Router::new()
            .route("/reports", get(|| async { "r" }))
            .route("/exports", get(|| async { "e" }))
            .layer(config.layer(MemoryStore::new()))
    };
    let shared = app("");
    assert_eq!(status(&shared, req("/reports", 1, None, &[])).await, 200);
    assert_eq!(status(&shared, req("/exports", 1, None, &[])).await, 200);
    assert_eq!(status(&shared, req("/reports", 1, None, &[])).await, 429);

    // `scope = "route"` gives each listed route its own budget.
    let apart = app("scope = \"route\"\n");
    for path in ["/reports", "/exports"] {
        assert_eq!(status(&apart, req(path, 1, None, &[])).await, 200);
        assert_eq!(status(&apart, req(path, 1, None, &[])).await, 200);
        assert_eq!(status(&apart, req(path, 1, None, &[])).await, 429);
    }

    let empty = "[[policy]]\nname = \"x\"\nroute = []\nquota = \"2/m\"\n";
    let err = tollgate::config::Config::from_toml(empty).unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy[0] (x).route: at least one route is needed"
    );
}

#[tokio::test]
async fn the_concurrency_layer_keys_and_exempts_like_the_rate_limiter() {
    // One slot for everybody (a global key), except the allowlisted address.
    let (entered_tx, entered_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let entered = std::sync::Arc::new(entered_tx);
    let app = Router::new()
        .route(
            "/export",
            get(move || {
                let entered = std::sync::Arc::clone(&entered);
                let mut release = release_rx.clone();
                async move {
                    let _ = entered.send(());
                    let _ = release.wait_for(|r| *r).await;
                    "rows"
                }
            }),
        )
        .layer(
            ConcurrencyLimitLayer::new(MemoryConcurrencyStore::new())
                .key(Global)
                .allowlist(Allowlist::new().cidr("198.51.100.9/32".parse().unwrap()))
                .route("/export", ConcurrencyPolicy::new("export", 1)),
        );
    let mut entered_rx = entered_rx;
    let first = tokio::spawn(app.clone().oneshot(req("/export", 1, None, &[])));
    entered_rx.recv().await.unwrap();
    // Another address: the global slot is taken.
    let refused = app
        .clone()
        .oneshot(req("/export", 2, None, &[]))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // The allowlisted address is not limited: it reaches the handler while the slot is held
    // (a refusal would end the request first, and fail here).
    let mut exempt = tokio::spawn(app.clone().oneshot(req("/export", 9, None, &[])));
    tokio::select! {
        _ = entered_rx.recv() => {}
        res = &mut exempt => panic!("the allowlisted request ended early: {:?}", res.unwrap().unwrap().status()),
    }
    release_tx.send(true).unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(exempt.await.unwrap().unwrap().status(), StatusCode::OK);
}
