//! A limited request never reaches the upstream: the limiter in front of a proxying handler,
//! with wiremock as the upstream counting exactly what arrived.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use http::StatusCode;
use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[derive(Clone)]
struct Upstream {
    client: reqwest::Client,
    base: String,
}

async fn proxy(State(up): State<Upstream>) -> Result<String, StatusCode> {
    let res = up
        .client
        .get(format!("{}/upstream", up.base))
        .send()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    res.text().await.map_err(|_| StatusCode::BAD_GATEWAY)
}

#[tokio::test]
async fn limited_requests_never_reach_the_upstream() {
    let upstream = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/upstream"))
        .respond_with(ResponseTemplate::new(200).set_body_string("from upstream"))
        // Exactly the allowed count: one more (a limited request leaking through) or one
        // fewer fails the test.
        .expect(5)
        .mount(&upstream)
        .await;

    let state = Upstream {
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        base: upstream.uri(),
    };
    let limits = RateLimitLayer::new(MemoryStore::new()).route(
        "/proxy",
        Policy::new("proxy", Quota::new(5, Duration::from_secs(3600)).unwrap()),
    );
    let app = Router::new()
        .route("/proxy", get(proxy))
        .layer(limits)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let res = client
            .get(format!("http://{addr}/proxy"))
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
        if res.status() == StatusCode::OK {
            assert_eq!(res.text().await.unwrap(), "from upstream");
        }
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429, 429, 429, 429, 429]
    );
    upstream.verify().await;
    server.abort();
}
