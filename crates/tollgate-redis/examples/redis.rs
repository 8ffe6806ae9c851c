//! Limits shared by every instance: the state lives in Redis. Run two copies on different
//! ports against one Redis and the limit holds across both.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 PORT=3000 cargo run -p tollgate-redis --example redis
//! ```
//!
//! `/login` fails closed (503 while Redis is unreachable: a brute-force target must not become
//! unlimited); `/hello` fails open (served, and counted in `ratelimit_fail_open_total`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::{
    Router,
    routing::{get, post},
};
use tollgate::{FailureMode, Policy, Quota, RateLimitLayer};
use tollgate_redis::{RedisStore, redact};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let port: u16 = std::env::var("PORT").map_or(Ok(3000), |p| p.parse())?;
    let store = RedisStore::builder(&url)?
        .timeout(Duration::from_millis(50))
        .build()?;
    println!("limits in {} (a password is never printed)", redact(&url));

    let hello: Quota = "5/10s".parse()?;
    let login: Quota = "3/m".parse()?;
    let limits = RateLimitLayer::new(store)
        .route("/hello", Policy::new("hello", hello))
        .route(
            "/login",
            Policy::new("login", login).with_failure_mode(FailureMode::Closed),
        );
    let app = Router::new()
        .route("/hello", get(|| async { "hello\n" }))
        .route("/login", post(|| async { "welcome\n" }))
        .layer(limits);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
