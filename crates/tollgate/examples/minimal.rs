//! The smallest useful setup: one route, 5 requests per 10 seconds per client address, in
//! process memory.
//!
//! ```sh
//! cargo run -p tollgate --example minimal
//! for i in $(seq 6); do curl -s -o /dev/null -w '%{http_code}\n' localhost:3000/hello; done
//! ```

use std::net::SocketAddr;

use axum::{Router, routing::get};
use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quota: Quota = "5/10s".parse()?;
    let limits =
        RateLimitLayer::new(MemoryStore::new()).route("/hello", Policy::new("hello", quota));
    let app = Router::new()
        .route("/hello", get(|| async { "hello\n" }))
        .layer(limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    // Keys need the client address: serve with connect info.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
