//! The Redis key format, written once: `<prefix>{<policy>:<route>:<ip>:<user>}:<suffix>`.
//!
//! The braces are the Redis Cluster hash tag, so every key of one request lives in one slot.
//! The tag is the key's escaped, qualified form ([`Key::qualified`]): no request content can add
//! a brace and move the slot, or a separator and reach another client's state.

use std::ops::Range;

use tollgate::{Key, Quota};

use crate::batch::StateKeys;

/// Room for a quota's [`id`](Quota::id): two `u32`s, a period and the suffixes fit.
const QUOTA_ID_ROOM: usize = 48;

/// Room for the tag of `key`: its parts as given (escaping lengthens them only for unusual
/// bytes), an address (at most 45 characters) and the separators, so that writing it never
/// grows the string.
fn tag_room(key: &Key<'_>) -> usize {
    key.policy().len() + key.route().len() + key.user().map_or(0, str::len) + 48
}

/// The hash tag of `key`: what the deny cache and the key format share.
pub(crate) fn tag(key: &Key<'_>) -> String {
    let mut tag = String::with_capacity(tag_room(key));
    key.push_qualified(&mut tag);
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
    quota.push_id(&mut key);
    key
}

/// The state keys of `key`, one per quota in order (each what [`state_key`] names), and where
/// the tag lies in each of them. The tag is written once, into the first key, and not kept in
/// a string of its own: a check's keys are its only allocations for names.
pub(crate) fn state_keys(
    prefix: &str,
    key: &Key<'_>,
    quotas: &[Quota],
) -> (StateKeys, Range<usize>) {
    let mut first = String::with_capacity(prefix.len() + tag_room(key) + 3 + QUOTA_ID_ROOM);
    first.push_str(prefix);
    first.push('{');
    let start = first.len();
    key.push_qualified(&mut first);
    let tag = start..first.len();
    first.push_str("}:");
    let head = first.len();
    let mut keys = StateKeys::with_capacity(quotas.len().max(1));
    keys.push(first);
    for quota in quotas.iter().skip(1) {
        let mut name = String::with_capacity(head + QUOTA_ID_ROOM);
        name.push_str(&keys[0][..head]);
        quota.push_id(&mut name);
        keys.push(name);
    }
    match quotas.first() {
        Some(quota) => quota.push_id(&mut keys[0]),
        None => keys.clear(),
    }
    (keys, tag)
}

/// The Redis key of the concurrency leases of `key`.
pub(crate) fn inflight_key(prefix: &str, key: &Key<'_>) -> String {
    let mut name = String::with_capacity(prefix.len() + tag_room(key) + 11);
    name.push_str(prefix);
    name.push('{');
    key.push_qualified(&mut name);
    name.push_str("}:inflight");
    name
}
