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
pub mod future;
mod gcra;
pub mod key;
mod layer;
pub mod metrics;
mod policy;
mod quota;
mod response;
mod routes;
mod service;
pub mod store;

pub use client_ip::{ClientIp, ClientIpWarning, ForwardedHeader};
pub use decision::{Decision, QuotaState};
pub use key::{Key, MissingKey};
pub use layer::RateLimitLayer;
pub use policy::{Allowlist, FailureMode, KeyScope, Policy, PolicyError, RequestParts};
pub use quota::{Algorithm, Quota, QuotaError};
pub use response::RateLimitHeaders;
pub use service::RateLimit;
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
