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
/// bytes), an address (an IPv6 address of eight full groups, the longest, is 39 characters),
/// the three separators and a few bytes to spare, so that writing it never grows the string.
fn tag_room(key: &Key<'_>) -> usize {
    key.policy().len() + key.route().len() + key.user().map_or(0, str::len) + 48
}

/// The hash tag of `key`: what the deny cache and the key format share.
pub(crate) fn tag(key: &Key<'_>) -> String {
    let mut tag = String::with_capacity(tag_room(key));
    key.push_qualified(&mut tag);
    tag
}

/// `<prefix>{<tag>}:` for `key`, with room for `suffix` more bytes, and where the tag lies in
/// it: the one writer of the key format, which every key below ends.
fn head(prefix: &str, key: &Key<'_>, suffix: usize) -> (String, Range<usize>) {
    let mut name = String::with_capacity(prefix.len() + tag_room(key) + 3 + suffix);
    name.push_str(prefix);
    name.push('{');
    let start = name.len();
    key.push_qualified(&mut name);
    let tag = start..name.len();
    name.push_str("}:");
    (name, tag)
}

/// The Redis key of `quota`'s state for `key`, and where the tag lies in it. The quota's
/// [`id`](Quota::id) names the state, so reordering or adding quotas never mixes states up.
/// A check names its first quota's state with it: the tag is written once, here, not kept in
/// a string of its own; the deny cache hashes it in this key, and [`state_keys`] copies it for
/// a policy's other quotas, once the check is known to need them.
pub(crate) fn first_state_key(
    prefix: &str,
    key: &Key<'_>,
    quota: &Quota,
) -> (String, Range<usize>) {
    let (mut name, tag) = head(prefix, key, QUOTA_ID_ROOM);
    quota.push_id(&mut name);
    (name, tag)
}

/// A check's state keys, one per quota in order: `first`, from [`first_state_key`] (its tag
/// ending at `tag_end`), then one for each of `rest`, each its head (`<prefix>{<tag>}:`) copied
/// and that quota's id appended.
pub(crate) fn state_keys(first: String, tag_end: usize, rest: &[Quota]) -> StateKeys {
    // The head ends after the tag's closing brace and the colon.
    let head = tag_end + 2;
    let mut keys = StateKeys::with_capacity(1 + rest.len());
    for quota in rest {
        let mut name = String::with_capacity(head + QUOTA_ID_ROOM);
        name.push_str(&first[..head]);
        quota.push_id(&mut name);
        keys.push(name);
    }
    keys.insert(0, first);
    keys
}

/// The Redis key of the concurrency leases of `key`.
pub(crate) fn inflight_key(prefix: &str, key: &Key<'_>) -> String {
    let (mut name, _) = head(prefix, key, "inflight".len());
    name.push_str("inflight");
    name
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;

    /// The room made for a tag holds the tag of a key with the longest address text (an IPv6
    /// address of eight full groups, 39 characters) and parts that need no escaping, so writing
    /// it never grows the string, and wastes at most a few bytes.
    #[test]
    fn a_tags_room_holds_the_longest_address_with_little_to_spare() {
        let widest = IpAddr::V6(Ipv6Addr::new(
            0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
        ));
        for (policy, route, user) in [("api", "/get", Some("alice")), ("p", "/", None)] {
            let key = Key::new(policy, route, Some(widest), user);
            let tag = tag(&key);
            assert_eq!(tag.len(), key.qualified().to_string().len());
            let room = tag_room(&key);
            assert!(room >= tag.len(), "{room} < {} for {tag}", tag.len());
            assert!(room <= tag.len() + 8, "{room} wastes room for {tag}");
        }
    }
}
