//! Keys: who is spending budget, on what.
//!
//! Every request is keyed on `<route>:<ip>:<user?>`:
//!
//! - **route**: axum's [`MatchedPath`](axum::extract::MatchedPath) template (`/users/{id}`, never
//!   the raw path, which a client could vary to get a fresh bucket per request), or the policy's
//!   name when the policy's [`KeyScope`](crate::KeyScope) says so or when there is no matched path;
//! - **ip**: the client address, see [`ClientIp`](crate::ClientIp);
//! - **user**: optional, from a [`UserKey`] extractor (for example the user id an authentication
//!   layer put in the request extensions).

use std::borrow::Cow;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use http::{Extensions, HeaderMap};
use sha2::{Digest, Sha256};

/// Two randomly seeded hashers: a key's 128-bit identity in the memory stores. Clients cannot
/// choose keys that collide, since they do not know the seeds.
#[derive(Clone)]
pub(crate) struct KeyHasher(ahash::RandomState, ahash::RandomState);

impl KeyHasher {
    pub(crate) fn new() -> Self {
        KeyHasher(ahash::RandomState::new(), ahash::RandomState::new())
    }
}

/// User parts longer than this many bytes are replaced by a digest, so that huge values cannot
/// bloat a store.
pub const MAX_USER_LEN: usize = 128;

/// The identity a request spends budget under: `<route>:<ip>:<user?>`, in the namespace of one
/// policy.
///
/// A key borrows from the request it was built from; stores copy what they need.
///
/// Its [`Display`](fmt::Display) form escapes every part, so that a `:` (or `{`, `}`, `%`,
/// whitespace) inside a route or user cannot make two different clients share a key:
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use tollgate::Key;
///
/// let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
/// let a = Key::new("p", "/x", Some(ip), Some("a:b"));
/// let b = Key::new("p", "/x", Some(ip), Some("a%3Ab"));
/// assert_eq!(a.to_string(), "/x:192.0.2.7:a%3Ab");
/// assert_eq!(b.to_string(), "/x:192.0.2.7:a%253Ab");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key<'a> {
    policy: &'a str,
    route: &'a str,
    ip: Option<IpAddr>,
    user: Option<Cow<'a, str>>,
}

impl<'a> Key<'a> {
    /// Builds a key in the namespace of the policy named `policy`.
    ///
    /// An empty user is the same as no user; a user longer than [`MAX_USER_LEN`] bytes is
    /// replaced by `~` and the hex of the first 16 bytes of its SHA-256, so its length is
    /// bounded.
    pub fn new(
        policy: &'a str,
        route: &'a str,
        ip: Option<IpAddr>,
        user: Option<impl Into<Cow<'a, str>>>,
    ) -> Self {
        let user = user.map(Into::into).filter(|u| !u.is_empty()).map(|u| {
            if u.len() > MAX_USER_LEN {
                Cow::Owned(digest_user(&u))
            } else {
                u
            }
        });
        Key {
            policy,
            route,
            ip,
            user,
        }
    }

    /// The name of the policy whose state this key addresses. Two policies never share state,
    /// even on the same route (for example one for `GET` and one for `POST`).
    pub fn policy(&self) -> &str {
        self.policy
    }

    /// The route part: a route template or a policy name.
    pub fn route(&self) -> &str {
        self.route
    }

    /// The client address, if the key has one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The user part, if any (already shortened when it was long).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// A 128-bit keyed hash of the key (two independently, randomly seeded 64-bit hashes):
    /// what the memory stores index by.
    pub(crate) fn hash128(&self, seeds: &KeyHasher) -> u128 {
        let hi = self.hash_with(seeds.0.build_hasher());
        let lo = self.hash_with(seeds.1.build_hasher());
        (u128::from(hi) << 64) | u128::from(lo)
    }

    fn hash_with(&self, mut h: impl Hasher) -> u64 {
        // One word of lengths and the address family first, so that no two different keys
        // feed the hasher the same bytes (lengths are far below 2^20: policy and route names
        // are the operator's, user parts at most MAX_USER_LEN).
        let user = self.user.as_deref().map(str::as_bytes);
        let (family, addr) = match self.ip {
            None => (0u64, 0u128),
            Some(IpAddr::V4(ip)) => (1, u128::from(u32::from(ip))),
            Some(IpAddr::V6(ip)) => (2, u128::from(ip)),
        };
        let len = |n: usize| (n as u64) & 0xf_ffff;
        let head = family << 62
            | u64::from(user.is_some()) << 61
            | len(self.policy.len()) << 40
            | len(self.route.len()) << 20
            | user.map_or(0, |u| len(u.len()));
        h.write_u64(head);
        h.write(self.policy.as_bytes());
        h.write(self.route.as_bytes());
        h.write_u128(addr);
        if let Some(user) = user {
            h.write(user);
        }
        h.finish()
    }
}

fn digest_user(user: &str) -> String {
    let digest = Sha256::digest(user.as_bytes());
    let mut out = String::with_capacity(33);
    out.push('~');
    for byte in &digest[..16] {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Writes `s` with every byte outside `[A-Za-z0-9._~/-]` percent-encoded.
fn write_escaped(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let plain = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'/' | b'-');
        if !plain {
            // Bytes start..i are plain ASCII, so both ends are char boundaries.
            if start < i {
                f.write_str(&s[start..i])?;
            }
            let esc = [b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]];
            f.write_str(std::str::from_utf8(&esc).map_err(|_| fmt::Error)?)?;
            start = i + 1;
        }
    }
    if start < bytes.len() {
        f.write_str(&s[start..])?;
    }
    Ok(())
}

impl fmt::Display for Key<'_> {
    /// `<route>:<ip>:<user>` with the route and user escaped; `-` when there is no IP.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.route)?;
        f.write_str(":")?;
        match self.ip {
            Some(ip) => write!(f, "{ip}")?,
            None => f.write_str("-")?,
        }
        f.write_str(":")?;
        if let Some(user) = &self.user {
            write_escaped(f, user)?;
        }
        Ok(())
    }
}

impl Key<'_> {
    /// The key with its policy: `<policy>:<route>:<ip>:<user>`, every part escaped as in the
    /// [`Display`](fmt::Display) form. Distinct keys (policy included) always render distinctly:
    /// the policy, route and user contain no raw `:`, so the first two `:` and the last one
    /// delimit the parts, whatever the IP. The result contains no `{` or `}`, so it is safe
    /// inside a Redis Cluster hash tag.
    pub fn qualified(&self) -> impl fmt::Display + '_ {
        struct Qualified<'k, 'a>(&'k Key<'a>);
        impl fmt::Display for Qualified<'_, '_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_escaped(f, self.0.policy)?;
                f.write_str(":")?;
                fmt::Display::fmt(self.0, f)
            }
        }
        Qualified(self)
    }
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// Extracts the optional user part of a key from a request.
///
/// Implemented by [`NoUser`] (the default), [`UserFromExtension`] and [`UserFn`].
pub trait UserKey: Send + Sync + 'static {
    /// The user part for this request, or `None` for an anonymous request.
    fn user_key<'r>(
        &self,
        headers: &'r HeaderMap,
        extensions: &'r Extensions,
    ) -> Option<Cow<'r, str>>;
}

/// No user part: requests are keyed on route and IP only.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoUser;

impl UserKey for NoUser {
    fn user_key<'r>(&self, _: &'r HeaderMap, _: &'r Extensions) -> Option<Cow<'r, str>> {
        None
    }
}

/// The user part is a value an earlier layer (authentication) put in the request extensions.
///
/// `T` says how it turns into a key part through [`AsUserKey`]; `String`, `Arc<str>`, `u64`
/// and the other integer types already do.
///
/// ```
/// use tollgate::key::UserFromExtension;
///
/// #[derive(Clone)]
/// struct UserId(u64);
///
/// impl tollgate::key::AsUserKey for UserId {
///     fn as_user_key(&self) -> std::borrow::Cow<'_, str> {
///         self.0.to_string().into()
///     }
/// }
///
/// let users = UserFromExtension::<UserId>::new();
/// # let _ = users;
/// ```
pub struct UserFromExtension<T>(std::marker::PhantomData<fn() -> T>);

impl<T> UserFromExtension<T> {
    /// Keys on the `T` extension of each request.
    pub fn new() -> Self {
        UserFromExtension(std::marker::PhantomData)
    }
}

impl<T> Default for UserFromExtension<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for UserFromExtension<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for UserFromExtension<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("UserFromExtension")
            .field(&std::any::type_name::<T>())
            .finish()
    }
}

impl<T: AsUserKey + Send + Sync + 'static> UserKey for UserFromExtension<T> {
    fn user_key<'r>(&self, _: &'r HeaderMap, extensions: &'r Extensions) -> Option<Cow<'r, str>> {
        extensions.get::<T>().map(AsUserKey::as_user_key)
    }
}

/// A value that can be the user part of a key.
pub trait AsUserKey {
    /// The key part; it is escaped and bounded by [`Key`].
    fn as_user_key(&self) -> Cow<'_, str>;
}

impl AsUserKey for String {
    fn as_user_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl AsUserKey for Arc<str> {
    fn as_user_key(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

macro_rules! int_user_key {
    ($($t:ty),*) => {$(
        impl AsUserKey for $t {
            fn as_user_key(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }
        }
    )*};
}
int_user_key!(u32, u64, u128, i32, i64, i128);

/// The user part comes from a closure over the request's headers and extensions.
///
/// ```
/// use tollgate::key::UserFn;
///
/// // Key on an API key header (hashed by the key when it is long).
/// let users = UserFn::new(|headers: &http::HeaderMap, _: &http::Extensions| {
///     headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_owned)
/// });
/// # let _ = users;
/// ```
#[derive(Clone)]
pub struct UserFn<F>(F);

impl<F> UserFn<F>
where
    F: Fn(&HeaderMap, &Extensions) -> Option<String> + Send + Sync + 'static,
{
    /// Wraps the closure.
    pub fn new(f: F) -> Self {
        UserFn(f)
    }
}

impl<F> fmt::Debug for UserFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserFn").finish_non_exhaustive()
    }
}

impl<F> UserKey for UserFn<F>
where
    F: Fn(&HeaderMap, &Extensions) -> Option<String> + Send + Sync + 'static,
{
    fn user_key<'r>(
        &self,
        headers: &'r HeaderMap,
        extensions: &'r Extensions,
    ) -> Option<Cow<'r, str>> {
        (self.0)(headers, extensions).map(Cow::Owned)
    }
}

/// What to do with a request whose key cannot be built because the server put no peer address
/// in it (usually: axum served without `into_make_service_with_connect_info`).
///
/// Whichever is chosen, the first such request logs one warning naming the cause. With `Allow`
/// and `Reject` every such request is counted in `ratelimit_requests_total{decision="unkeyed"}`;
/// with `Shared` they are decided and counted like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Let the request through without limiting it (the default, in line with failing open).
    #[default]
    Allow,
    /// Answer 500 Internal Server Error: the deployment is broken and should be fixed.
    Reject,
    /// Limit all such requests together under one key with no IP (`<route>:-:<user?>`).
    Shared,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn separators_cannot_make_two_clients_share_a_key() {
        let pairs = [
            (
                Key::new("p", "/a:b", Some(IP), None::<&str>),
                Key::new("p", "/a", Some(IP), Some("b")),
            ),
            (
                Key::new("p", "/a", Some(IP), Some("x:y")),
                Key::new("p", "/a", Some(IP), Some("x%3Ay")),
            ),
            (
                Key::new("p", "/a", None, Some("{t}")),
                Key::new("p", "/a", None, Some("%7Bt%7D")),
            ),
        ];
        for (a, b) in pairs {
            assert_ne!(a.to_string(), b.to_string());
            let h = KeyHasher::new();
            assert_ne!(a.hash128(&h), b.hash128(&h));
        }
        let v6 = Key::new("p", "/a", Some(IpAddr::V6(Ipv6Addr::LOCALHOST)), Some("u"));
        assert_eq!(v6.to_string(), "/a:::1:u");
        assert_eq!(
            Key::new("p", "/users/{id}", None, Some("é")).to_string(),
            "/users/%7Bid%7D:-:%C3%A9"
        );
    }

    #[test]
    fn qualified_form_includes_the_escaped_policy() {
        let k = Key::new("a:b{", "/x", Some(IP), Some("u}"));
        assert_eq!(k.qualified().to_string(), "a%3Ab%7B:/x:192.0.2.1:u%7D");
        assert_ne!(
            Key::new("a", "/b", None, None::<&str>)
                .qualified()
                .to_string(),
            Key::new("a:/b", "", None, None::<&str>)
                .qualified()
                .to_string()
        );
    }

    proptest::proptest! {
        /// No two distinct keys share a qualified form, and none contains a brace.
        #[test]
        fn qualified_form_is_injective(
            a in proptest::collection::vec(".{0,6}", 3),
            b in proptest::collection::vec(".{0,6}", 3),
            ip_a in proptest::option::of(proptest::arbitrary::any::<std::net::IpAddr>()),
            ip_b in proptest::option::of(proptest::arbitrary::any::<std::net::IpAddr>()),
        ) {
            let ka = Key::new(&a[0], &a[1], ip_a, Some(a[2].as_str()));
            let kb = Key::new(&b[0], &b[1], ip_b, Some(b[2].as_str()));
            let (sa, sb) = (ka.qualified().to_string(), kb.qualified().to_string());
            let braces = sa.contains(['{', '}']);
            proptest::prop_assert!(!braces, "braces in {}", sa);
            proptest::prop_assert_eq!(ka == kb, sa == sb, "{} vs {}", sa, sb);
        }
    }

    #[test]
    fn huge_user_parts_are_bounded() {
        let huge = "u".repeat(4 << 20);
        let key = Key::new("p", "/a", Some(IP), Some(huge.as_str()));
        let user = key.user().unwrap();
        assert_eq!(user.len(), 33);
        assert!(user.starts_with('~'));
        assert!(key.to_string().len() < 64);
        // Distinct long users stay distinct.
        let other = "u".repeat((4 << 20) + 1);
        assert_ne!(key, Key::new("p", "/a", Some(IP), Some(other.as_str())));
        // Short users are kept as they are.
        let exact = "v".repeat(MAX_USER_LEN);
        assert_eq!(
            Key::new("p", "/a", None, Some(exact.as_str())).user(),
            Some(exact.as_str())
        );
    }

    #[test]
    fn empty_user_is_no_user() {
        assert_eq!(
            Key::new("p", "/a", Some(IP), Some("")),
            Key::new("p", "/a", Some(IP), None::<&str>)
        );
    }

    #[test]
    fn user_extractors() {
        let mut ext = Extensions::new();
        let headers = HeaderMap::new();
        assert_eq!(NoUser.user_key(&headers, &ext), None);
        assert_eq!(
            UserFromExtension::<u64>::new().user_key(&headers, &ext),
            None
        );
        ext.insert(42u64);
        assert_eq!(
            UserFromExtension::<u64>::new()
                .user_key(&headers, &ext)
                .as_deref(),
            Some("42")
        );
        let f = UserFn::new(|h: &HeaderMap, _: &Extensions| {
            h.get("x-user")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "bob".parse().unwrap());
        assert_eq!(f.user_key(&headers, &ext).as_deref(), Some("bob"));
    }
}
