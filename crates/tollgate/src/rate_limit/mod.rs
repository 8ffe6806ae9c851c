//! The rate limiter: [`RateLimitLayer`] builds [`RateLimit`], whose [`ResponseFuture`] asks the
//! store and answers 429 itself when the key has no budget left.
//!
//! Laid out as tower-http lays out a middleware: `layer` (the builder and what it compiles),
//! `service` (classifies each request through the shared pipeline) and `future` (the store's
//! answer, then the inner service or the layer's own response).

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use service::RateLimit;
