//! One budget per API key, whatever address it is used from, and per address for anonymous
//! requests. The limiter keys on what the authentication layer verified, never on the raw
//! header: a client could invent a fresh key per request.
//!
//! ```sh
//! cargo run -p tollgate --example api_key
//! curl -i -H 'x-api-key: demo-key-1' localhost:3000/data     # 3 per minute for this key
//! curl -i localhost:3000/data                                 # anonymous: 3 per minute per address
//! curl -i -H 'x-api-key: forged' localhost:3000/data          # 401, never reaches the limiter
//! ```

use std::borrow::Cow;
use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Router, routing::get};
use tollgate::key::{AsUserKey, ClientAddress, FromExtension, KeyExtractor};
use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer};

/// What the authentication layer puts in the request once it has checked the key.
#[derive(Clone)]
struct ApiKeyId(String);

impl AsUserKey for ApiKeyId {
    fn as_user_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.0)
    }
}

/// A stand-in for a real key check (a database or a signed token).
async fn authenticate(mut req: Request<Body>, next: Next) -> Response {
    match req.headers().get("x-api-key").map(|v| v.to_str()) {
        None => {}
        Some(Ok(key)) if ["demo-key-1", "demo-key-2"].contains(&key) => {
            let id = ApiKeyId(key.to_owned());
            req.extensions_mut().insert(id);
        }
        Some(_) => return (StatusCode::UNAUTHORIZED, "unknown API key\n").into_response(),
    }
    next.run(req).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keyed: Quota = "3/m".parse()?;
    let limits = RateLimitLayer::new(MemoryStore::new())
        .key(FromExtension::<ApiKeyId>::new().or(ClientAddress))
        .route("/data", Policy::new("data", keyed));
    let app = Router::new()
        .route("/data", get(|| async { "data\n" }))
        // Layers run outside-in: authentication first, so the limiter sees its verdict.
        .layer(limits)
        .layer(middleware::from_fn(authenticate));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
