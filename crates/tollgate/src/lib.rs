#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod algorithm;
pub mod client_ip;
pub mod clock;
pub mod concurrency;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
mod decision;
mod gcra;
mod grpc;
pub mod key;
pub mod metrics;
mod pipeline;
mod policy;
mod quota;
pub mod rate_limit;
mod response;
mod routes;
pub mod store;
mod text;

pub use client_ip::{ClientIpSource, ClientIpWarning, ForwardedHeader};
pub use concurrency::{ConcurrencyLimitLayer, ConcurrencyPolicy, MemoryConcurrencyStore};
pub use decision::{Decision, QuotaState};
pub use key::{Identity, Key, KeyExtractor, MissingKey};
pub use policy::{Allowlist, FailureMode, KeyScope, Policy, PolicyError, RequestParts};
pub use quota::{Algorithm, Quota, QuotaError};
pub use rate_limit::{RateLimit, RateLimitLayer};
pub use response::RateLimitHeaders;
pub use store::{MemoryStore, Store, StoreError, StoreErrorKind};

// The guides' and the README's code blocks compile and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ProjectReadme;
#[cfg(all(doctest, feature = "config"))]
#[doc = include_str!("../../../docs/configuration.md")]
struct ConfigurationGuide;
#[cfg(doctest)]
#[doc = include_str!("../../../docs/algorithms.md")]
struct AlgorithmsGuide;
#[cfg(doctest)]
#[doc = include_str!("../../../docs/client-ip.md")]
struct ClientIpGuide;
#[cfg(all(doctest, feature = "conformance"))]
#[doc = include_str!("../../../docs/stores.md")]
struct StoresGuide;
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../../../docs/cookbook.md")]
struct Cookbook;
#[cfg(doctest)]
#[doc = include_str!("../../../docs/migrating-from-tower-governor.md")]
struct MigrationGuide;
