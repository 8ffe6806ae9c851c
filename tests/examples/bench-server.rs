//! The service the load comparisons run against: a hello handler behind no limiter, tollgate
//! with the memory store, tower_governor, or tollgate with Redis; on the allowed path (limit
//! never reached) or the limited path (almost every request refused).
//!
//! `cargo run --release -p tollgate-tests --no-default-features --example bench-server -- VARIANT MODE ADDR [REDIS_URL]`
//! where VARIANT is none | memory | governor | redis and MODE is allowed | limited.
//! Started by scripts/bench.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer};
use tollgate_redis::RedisStore;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [variant, mode, addr, rest @ ..] = args.as_slice() else {
        return Err("usage: bench-server VARIANT MODE ADDR [REDIS_URL]".into());
    };
    let allowed = match mode.as_str() {
        "allowed" => true,
        "limited" => false,
        other => return Err(format!("unknown mode {other}").into()),
    };
    // Allowed: a million per second per client, never reached. Limited: one per hour, so all
    // but the first request are refused.
    let quota = if allowed {
        Quota::per_second(1_000_000)?
    } else {
        Quota::per_hour(1)?
    };
    let hello = Router::new().route("/hello", get(|| async { "hello\n" }));
    let app = match variant.as_str() {
        "none" => hello,
        "memory" => hello.layer(
            RateLimitLayer::new(MemoryStore::new()).route("/hello", Policy::new("hello", quota)),
        ),
        "redis" => {
            let url = rest.first().ok_or("redis needs a URL")?;
            let store = RedisStore::builder(url)?.build()?;
            store.wait_connected(Duration::from_secs(5)).await?;
            hello.layer(RateLimitLayer::new(store).route("/hello", Policy::new("hello", quota)))
        }
        "governor" => {
            let mut builder = GovernorConfigBuilder::default();
            if allowed {
                builder
                    .period(Duration::from_micros(1))
                    .burst_size(1_000_000);
            } else {
                builder.period(Duration::from_secs(3600)).burst_size(1);
            }
            let config = builder.finish().ok_or("invalid governor config")?;
            hello.layer(GovernorLayer::new(config))
        }
        other => return Err(format!("unknown variant {other}").into()),
    };
    let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
