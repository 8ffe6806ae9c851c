//! Errors: building a store, and what a failed Redis call counts as.

use std::time::Duration;

use fred::prelude::{Error as FredError, ErrorKind as FredErrorKind};
use tollgate::{StoreError, StoreErrorKind};

/// Maps a fred error to the reason the layer counts it under.
pub(crate) fn classify(e: FredError) -> StoreError {
    let kind = match e.kind() {
        FredErrorKind::Timeout => StoreErrorKind::Timeout,
        FredErrorKind::IO
        | FredErrorKind::Canceled
        | FredErrorKind::Backpressure
        | FredErrorKind::Routing
        | FredErrorKind::Cluster
        | FredErrorKind::Sentinel => StoreErrorKind::Unavailable,
        FredErrorKind::Auth => StoreErrorKind::Auth,
        #[cfg(feature = "tls")]
        FredErrorKind::Tls => StoreErrorKind::Unavailable,
        FredErrorKind::Protocol | FredErrorKind::Parse => StoreErrorKind::InvalidResponse,
        // An ACL user without a right the store needs (before the script check: a denied
        // command inside the script reads as a script error too).
        _ if e.details().contains("NOPERM") => StoreErrorKind::Auth,
        _ if is_script_error(e.details()) => StoreErrorKind::Script,
        _ if is_unavailable(e.details()) => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Other,
    };
    StoreError::with_source(kind, e)
}

pub(crate) fn is_script_error(details: &str) -> bool {
    [
        "NOSCRIPT",
        "ERR Error running script",
        "user_script",
        "ERR Error compiling script",
    ]
    .iter()
    .any(|p| details.contains(p))
}

pub(crate) fn is_unavailable(details: &str) -> bool {
    [
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "READONLY",
    ]
    .iter()
    .any(|p| details.starts_with(p))
}

/// Why a [`RedisStore`](crate::RedisStore) could not be built or connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL could not be read.
    #[error(
        "invalid Redis URL {url:?}: {source} (a password holding '/', '@', '?', '#' or ':' must \
         be percent-encoded, e.g. '/' as %2F)"
    )]
    Url {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// fred's reason.
        source: FredError,
    },
    /// The URL's scheme is not one of Redis's.
    #[error(
        "invalid Redis URL {url:?}: expected redis://, rediss://, redis-cluster://, \
         redis-sentinel:// (or their rediss-/valkey variants)"
    )]
    Scheme {
        /// The URL, with any password replaced by `***`.
        url: String,
    },
    /// A TLS URL (`rediss://`, `valkeys://` and their cluster and sentinel forms) with the
    /// crate's `tls` feature turned off: fred would connect in plaintext and send the password
    /// in the clear, so the store refuses to be built.
    #[error(
        "Redis URL {url:?} asks for TLS, but tollgate-redis was built without its `tls` \
         feature: enable it (it is on by default: `tollgate-redis = {{ features = [\"tls\"] }}`) \
         or use a redis:// URL"
    )]
    TlsDisabled {
        /// The URL, with any password replaced by `***`.
        url: String,
    },
    /// The TLS settings cannot work: a certificate or key that cannot be read, or settings for
    /// a URL without TLS.
    #[error("Redis TLS settings: {0}")]
    Tls(String),
    /// The key prefix cannot work.
    #[error(
        "invalid key prefix {0:?}: use at most 64 bytes without braces, spaces or control characters"
    )]
    Prefix(String),
    /// A zero deadline would fail every call.
    #[error("the store timeout must be longer than zero")]
    Timeout,
    /// fred refused the configuration.
    #[error("invalid Redis client configuration: {0}")]
    Config(#[source] FredError),
    /// `build` was called outside a Tokio runtime.
    #[error("RedisStore::build must be called inside a Tokio runtime")]
    NoRuntime,
    /// The server is older than Redis 3.2 and cannot run the script.
    #[error("Redis {version} is too old: tollgate needs Redis 3.2 or newer")]
    ServerTooOld {
        /// The server's `redis_version`.
        version: String,
    },
    /// The client did not connect in time.
    #[error(
        "not connected to Redis after {waited:?}{}",
        cause.as_deref().map(|c| format!(": {c}")).unwrap_or_default()
    )]
    NotConnected {
        /// How long it waited.
        waited: Duration,
        /// Why, when a connection attempt said so: what happened and what to fix.
        cause: Option<String>,
        /// The connection error, if one was reported.
        #[source]
        source: Option<FredError>,
    },
}

/// The URL with every secret replaced by `***`, for error messages and logs.
///
/// The userinfo is everything up to the **last** `@`, since a password may hold `/`, `?`, `#`,
/// `:` or `@` (written raw by mistake, or percent-encoded); the user name before the first `:`
/// is kept. A userinfo without `:` is hidden whole (some clients read it as a password). Query
/// parameters whose name mentions a password, secret, token or auth (fred's
/// `sentinelPassword`) are hidden too. It only ever hides too much, never too little.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        Some(at) => {
            match rest[..at].split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#', '@']) => {
                    out.push_str(user);
                    out.push_str(":***@");
                }
                _ => out.push_str("***@"),
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    match rest.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((name, _)) if is_secret_param(name) => {
                        out.push_str(name);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(rest),
    }
    out
}

pub(crate) fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "secret", "token", "auth"]
        .iter()
        .any(|s| name.contains(s))
}
