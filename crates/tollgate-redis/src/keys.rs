//! The Redis key format, written once: `<prefix>{<policy>:<route>:<ip>:<user>}:<suffix>`.
//!
//! The braces are the Redis Cluster hash tag, so every key of one request lives in one slot.
//! The tag is the key's escaped, qualified form ([`Key::qualified`]): no request content can add
//! a brace and move the slot, or a separator and reach another client's state.

use std::fmt::Write;

use tollgate::{Key, Quota};

/// Room for a quota's [`id`](Quota::id): two `u32`s, a period and the suffixes fit.
const QUOTA_ID_ROOM: usize = 48;

/// The hash tag of `key`: what the deny cache and the key format share.
pub(crate) fn tag(key: &Key<'_>) -> String {
    // Sized for the parts as given (escaping lengthens them only for unusual bytes), an
    // address (at most 45 characters) and the separators: written without growing, where
    // `to_string` grew it three or four times.
    let parts = key.policy().len() + key.route().len() + key.user().map_or(0, str::len);
    let mut tag = String::with_capacity(parts + 48);
    // Writing to a String cannot fail.
    let _ = write!(tag, "{}", key.qualified());
    tag
}

/// The Redis key of `quota`'s state for the key whose tag is `tag`. The quota's
/// [`id`](Quota::id) names the state, so reordering or adding quotas never mixes states up.
pub(crate) fn state_key(prefix: &str, tag: &str, quota: &Quota) -> String {
    let mut key = String::with_capacity(prefix.len() + tag.len() + 3 + QUOTA_ID_ROOM);
    key.push_str(prefix);
    key.push('{');
    key.push_str(tag);
    key.push_str("}:");
    let _ = write!(key, "{}", quota.id());
    key
}

/// The Redis key of the concurrency leases of `key`.
pub(crate) fn inflight_key(prefix: &str, key: &Key<'_>) -> String {
    format!("{prefix}{{{}}}:inflight", key.qualified())
}
