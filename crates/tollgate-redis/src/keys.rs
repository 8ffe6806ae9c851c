//! The Redis key format, written once: `<prefix>{<policy>:<route>:<ip>:<user>}:<suffix>`.
//!
//! The braces are the Redis Cluster hash tag, so every key of one request lives in one slot.
//! The tag is the key's escaped, qualified form ([`Key::qualified`]): no request content can add
//! a brace and move the slot, or a separator and reach another client's state.

use tollgate::{Key, Quota};

/// The hash tag of `key`: what the deny cache and the key format share.
pub(crate) fn tag(key: &Key<'_>) -> String {
    key.qualified().to_string()
}

/// The Redis key of `quota`'s state for the key whose tag is `tag`. The quota's
/// [`id`](Quota::id) names the state, so reordering or adding quotas never mixes states up.
pub(crate) fn state_key(prefix: &str, tag: &str, quota: &Quota) -> String {
    format!("{prefix}{{{tag}}}:{}", quota.id())
}

/// The Redis key of the concurrency leases of `key`.
pub(crate) fn inflight_key(prefix: &str, key: &Key<'_>) -> String {
    format!("{prefix}{{{}}}:inflight", key.qualified())
}
