//! Keys: who is spending budget, on what.
//!
//! Every request is keyed on `<route>:<ip>:<user>`, in the namespace of its policy:
//!
//! - **route**: axum's [`MatchedPath`](axum::extract::MatchedPath) template (`/users/{id}`, never
//!   the raw path, which a client could vary to get a fresh bucket per request), or the policy's
//!   name when the policy's [`KeyScope`](crate::KeyScope) says so or when there is no matched path;
//! - **ip** and **user**: the [`Identity`] a [`KeyExtractor`] gives the request.
//!
//! The layers take the extractor with `.key(..)`. The built-ins:
//!
//! | extractor | one budget per | missing when |
//! |---|---|---|
//! | [`ClientAddress`] (the default) | client address ([`ClientIpSource`](crate::ClientIpSource)) | the server gave no peer address |
//! | [`ClientAndUser`] (`.user_key(..)`) | address, and user when there is one | as above |
//! | [`FromExtension`] | identity an auth layer put in the extensions (API key, user id), whatever the address | the extension is absent |
//! | [`TrustedHeader`] | value of a header a trusted gateway sets (a tenant) | the header is absent, empty, repeated or not visible ASCII |
//! | [`Global`] | nothing: one budget for every client | never |
//! | a closure `Fn(&RequestParts) -> Option<Identity>` | whatever it returns | it returns `None` |
//!
//! [`or`](KeyExtractor::or) falls back to a second extractor when the first finds nothing
//! (`FromExtension::<ApiKey>::new().or(ClientAddress)`). A request whose identity is missing
//! is handled as the layer's [`MissingKey`] says.
//!
//! Calling a store directly, build keys with [`Key::new`], or with a [`KeyPrefix`] made once
//! per route when many keys share a policy and a route: the same keys, without hashing the
//! policy and the route for each (the layers do this for every route they are given).

use std::borrow::Cow;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use http::{Extensions, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use crate::RequestParts;
use crate::text::Text;

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
    /// The hash of `policy` and `route` ([`prefix_hash`]): the part of a memory store's
    /// identity that is the same for every key of one route, computed once per route by the
    /// layer and by [`KeyPrefix`]. A function of the two strings alone, so keys that are equal
    /// have equal prefixes.
    prefix: u64,
    ip: Option<IpAddr>,
    user: Option<Cow<'a, str>>,
    /// The user part is the digest of a long user, not a user as given: the two never compare
    /// equal, whatever the text.
    digested: bool,
}

impl<'a> Key<'a> {
    /// Builds a key in the namespace of the policy named `policy`.
    ///
    /// An empty user is the same as no user; a user longer than [`MAX_USER_LEN`] bytes is
    /// replaced by `~` and the hex of the first 16 bytes of its SHA-256, so its length is
    /// bounded. A digested user is never the same key as a short user that happens to read
    /// like a digest: the key records which it is, and the [`Display`](fmt::Display) form
    /// escapes a `~` in a user as given (`%7E`), so only digests start with a plain `~`.
    pub fn new(
        policy: &'a str,
        route: &'a str,
        ip: Option<IpAddr>,
        user: Option<impl Into<Cow<'a, str>>>,
    ) -> Self {
        Key::prefixed(policy, route, prefix_hash(policy, route), ip, user)
    }

    /// [`Key::new`] with the prefix already hashed: `prefix` must be
    /// `prefix_hash(policy, route)`, as [`KeyPrefix`] and the layer's route table keep it.
    #[inline]
    pub(crate) fn prefixed(
        policy: &'a str,
        route: &'a str,
        prefix: u64,
        ip: Option<IpAddr>,
        user: Option<impl Into<Cow<'a, str>>>,
    ) -> Self {
        debug_assert_eq!(prefix, prefix_hash(policy, route));
        let mut digested = false;
        let user = user.map(Into::into).filter(|u| !u.is_empty()).map(|u| {
            if u.len() > MAX_USER_LEN {
                digested = true;
                Cow::Owned(digest_user(&u))
            } else {
                u
            }
        });
        Key {
            policy,
            route,
            prefix,
            ip,
            user,
            digested,
        }
    }

    /// Whether the user part is the digest of a user longer than [`MAX_USER_LEN`] bytes.
    pub fn is_user_digested(&self) -> bool {
        self.digested
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
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The user part, if any (already shortened when it was long).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// A 128-bit keyed hash of the key, as two independently, randomly seeded 64-bit hashes:
    /// what the memory concurrency store identifies a key by.
    pub(crate) fn hash128(&self, seeds: &KeyHasher) -> (u64, u64) {
        (
            self.hash64(seeds),
            self.hash_text_with(seeds.1.build_hasher()),
        )
    }

    /// The first half of [`hash128`](Self::hash128) alone: what the rate-limit memory store
    /// indexes by.
    #[inline]
    pub(crate) fn hash64(&self, seeds: &KeyHasher) -> u64 {
        self.hash_with(seeds.0.build_hasher())
    }

    fn hash_with(&self, mut h: impl Hasher) -> u64 {
        // The policy and the route come in as their prefix hash (itself fed unambiguously:
        // `feed_prefix`), with a head that says the address family and whether the user part
        // is a digest; then the address; the user part last, so its end is the end of what the
        // hasher is fed (an empty user part is no user part).
        let (family, addr) = match self.ip {
            None => (0u8, 0u128),
            Some(IpAddr::V4(ip)) => (1, u128::from(u32::from(ip))),
            Some(IpAddr::V6(ip)) => (2, u128::from(ip)),
        };
        // Laid out as bytes, not fields OR-ed into disjoint bits (docs/testing.md, `key.rs`).
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&self.prefix.to_le_bytes());
        head[8] = family;
        head[9] = u8::from(self.digested);
        h.write_u128(u128::from_le_bytes(head));
        h.write_u128(addr);
        if let Some(user) = &self.user {
            h.write(user.as_bytes());
        }
        h.finish()
    }

    /// The whole key fed to `h`, the policy and the route as their text (the prefix's own
    /// input) rather than their prefix hash: the second half of [`hash128`](Self::hash128),
    /// so that the concurrency store's identity keeps its 128 bits for every part of a key.
    fn hash_text_with(&self, mut h: impl Hasher) -> u64 {
        feed_prefix(&mut h, self.policy, self.route);
        self.hash_with(h)
    }
}

/// One random seed per process for [`prefix_hash`], so that no client can choose routes (a
/// direct caller may build keys from anything) whose prefixes collide.
fn prefix_seed() -> &'static ahash::RandomState {
    static SEED: OnceLock<ahash::RandomState> = OnceLock::new();
    SEED.get_or_init(ahash::RandomState::new)
}

/// The prefix hash of a key's policy and route (see [`KeyPrefix`]).
pub(crate) fn prefix_hash(policy: &str, route: &str) -> u64 {
    let mut h = prefix_seed().build_hasher();
    feed_prefix(&mut h, policy, route);
    h.finish()
}

/// A head with both lengths first, so that no two (policy, route) pairs feed the hasher the
/// same bytes. Lengths saturate far above what a key holds: policy names are at most 64 bytes,
/// routes are the operator's templates.
fn feed_prefix(h: &mut impl Hasher, policy: &str, route: &str) {
    let [p0, p1] = u16::try_from(policy.len())
        .unwrap_or(u16::MAX)
        .to_le_bytes();
    let [r0, r1, r2, r3] = u32::try_from(route.len()).unwrap_or(u32::MAX).to_le_bytes();
    h.write_u64(u64::from_le_bytes([0, 0, p0, p1, r0, r1, r2, r3]));
    h.write(policy.as_bytes());
    h.write(route.as_bytes());
}

/// The policy and route of keys, hashed once: [`key`](Self::key) makes the key of one
/// client on that route without hashing them again, which is what the layer does for every
/// route it is given. A key made here is equal to the one [`Key::new`] makes from the same
/// parts, and a memory store keeps one state for both.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use tollgate::key::KeyPrefix;
/// use tollgate::{Key, MemoryStore, Quota};
///
/// let store = MemoryStore::new();
/// let quotas = [Quota::per_minute(1).unwrap()];
/// let search = KeyPrefix::new("api", "/search");
/// let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
///
/// assert!(store.decide(&search.key(Some(ip), None::<&str>), &quotas, 1).unwrap().is_allowed());
/// // The same key, however it was made: the one unit is spent.
/// let again = Key::new("api", "/search", Some(ip), None::<&str>);
/// assert_eq!(again, search.key(Some(ip), None::<&str>));
/// assert!(store.decide(&again, &quotas, 1).unwrap().is_limited());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix {
    policy: Box<str>,
    route: Box<str>,
    prefix: u64,
}

impl KeyPrefix {
    /// The keys of `route` in the namespace of the policy named `policy`.
    pub fn new(policy: impl Into<Box<str>>, route: impl Into<Box<str>>) -> Self {
        let (policy, route) = (policy.into(), route.into());
        let prefix = prefix_hash(&policy, &route);
        KeyPrefix {
            policy,
            route,
            prefix,
        }
    }

    /// The key of a client on this route: [`Key::new`] with this prefix's policy and route.
    pub fn key<'a>(&'a self, ip: Option<IpAddr>, user: Option<impl Into<Cow<'a, str>>>) -> Key<'a> {
        Key::prefixed(&self.policy, &self.route, self.prefix, ip, user)
    }

    /// The policy's name.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The route part.
    pub fn route(&self) -> &str {
        &self.route
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPrefix")
            .field("policy", &self.policy)
            .field("route", &self.route)
            .finish_non_exhaustive()
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

/// [`BYTE_CLASS`] of a byte always written as it is.
const PLAIN: u8 = 1;
/// [`BYTE_CLASS`] of `~`, written as it is where [`write_escaped`] is told so.
const TILDE: u8 = 2;

/// What [`write_escaped`] does with each byte: [`PLAIN`] for `[A-Za-z0-9._/-]`, [`TILDE`] for
/// `~`, 0 (escaped) for every other.
const BYTE_CLASS: [u8; 256] = {
    let mut class = [0; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'/' | b'-') {
            class[b] = PLAIN;
        } else if c == b'~' {
            class[b] = TILDE;
        }
        b += 1;
    }
    class
};

/// Writes `s` with every byte outside `[A-Za-z0-9._~/-]` percent-encoded (and `~` too when
/// `tilde` is false).
fn write_escaped<W: fmt::Write>(f: &mut W, s: &str, tilde: bool) -> fmt::Result {
    let bytes = s.as_bytes();
    let mut start = 0;
    // One look-up a byte: the Redis store writes every key's parts on every check.
    let plain = if tilde { PLAIN | TILDE } else { PLAIN };
    for (i, &b) in bytes.iter().enumerate() {
        if BYTE_CLASS[usize::from(b)] & plain == 0 {
            // Bytes start..i are plain ASCII, so both ends are char boundaries. When none is
            // (start == i), start may sit inside a multi-byte character escaped byte by byte,
            // and even an empty slice there would panic.
            if start < i {
                f.write_str(&s[start..i])?;
            }
            let esc = [b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]];
            f.write_str(std::str::from_utf8(&esc).map_err(|_| fmt::Error)?)?;
            start = i + 1;
        }
    }
    f.write_str(&s[start..])
}

impl fmt::Display for Key<'_> {
    /// `<route>:<ip>:<user>` with the route and user escaped; `-` when there is no IP. A user
    /// longer than [`MAX_USER_LEN`] is written as its digest, `~` and 32 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Key<'_> {
    /// The [`Display`](fmt::Display) form written to `f`: through a formatter, or straight into
    /// a `String` ([`push_qualified`](Self::push_qualified)), where each piece is a copy
    /// instead of a call through the formatter.
    fn write_to<W: fmt::Write>(&self, f: &mut W) -> fmt::Result {
        write_escaped(f, self.route, true)?;
        f.write_str(":")?;
        match self.ip {
            // Written on the stack, then in one write (the Redis store names every key with
            // it): `write!` would format each octet through the formatter.
            Some(IpAddr::V4(ip)) => {
                let mut t = Text::<15>::new();
                let [a, b, c, d] = ip.octets();
                t.int(a);
                t.push(".");
                t.int(b);
                t.push(".");
                t.int(c);
                t.push(".");
                t.int(d);
                f.write_str(t.as_str())?;
            }
            Some(ip) => write!(f, "{ip}")?,
            None => f.write_str("-")?,
        }
        f.write_str(":")?;
        match &self.user {
            // `~` and hex digits: written as they are, the only user part starting with `~`.
            Some(digest) if self.digested => f.write_str(digest)?,
            // A `~` in a user as given is escaped, so it can never read like a digest.
            Some(user) => write_escaped(f, user, false)?,
            None => {}
        }
        Ok(())
    }
}

/// A [`Key`] that owns its parts, for stores whose decision outlives the request (a future
/// that decides after a network round trip, a fallback store). [`key`](Self::key) gives back
/// exactly the key it was made from, a digested user included.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OwnedKey {
    policy: String,
    route: String,
    prefix: u64,
    ip: Option<IpAddr>,
    user: Option<String>,
    digested: bool,
}

impl From<&Key<'_>> for OwnedKey {
    fn from(key: &Key<'_>) -> Self {
        OwnedKey {
            policy: key.policy.to_owned(),
            route: key.route.to_owned(),
            prefix: key.prefix,
            ip: key.ip,
            user: key.user.as_deref().map(str::to_owned),
            digested: key.digested,
        }
    }
}

/// The parts, without the prefix hash (a random seed's, different in every process).
impl fmt::Debug for OwnedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedKey")
            .field("policy", &self.policy)
            .field("route", &self.route)
            .field("ip", &self.ip)
            .field("user", &self.user)
            .field("digested", &self.digested)
            .finish_non_exhaustive()
    }
}

impl OwnedKey {
    /// The key, borrowing from this.
    pub fn key(&self) -> Key<'_> {
        Key {
            policy: &self.policy,
            route: &self.route,
            prefix: self.prefix,
            ip: self.ip,
            user: self.user.as_deref().map(Cow::Borrowed),
            digested: self.digested,
        }
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
                self.0.write_qualified(f)
            }
        }
        Qualified(self)
    }

    /// Appends the [`qualified`](Self::qualified) form to `out`: the same text as
    /// `out.push_str(&key.qualified().to_string())`, without a `String` of its own, and without
    /// the formatter but for an IPv6 address. For stores that name their state with it on
    /// every check.
    ///
    /// ```
    /// use std::net::{IpAddr, Ipv4Addr};
    /// use tollgate::Key;
    ///
    /// let key = Key::new("api", "/login", Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))), None::<&str>);
    /// let mut name = String::from("state{");
    /// key.push_qualified(&mut name);
    /// assert_eq!(name, "state{api:/login:192.0.2.1:");
    /// assert_eq!(&name[6..], key.qualified().to_string());
    /// ```
    pub fn push_qualified(&self, out: &mut String) {
        // Writing to a `String` cannot fail.
        let _ = self.write_qualified(out);
    }

    fn write_qualified<W: fmt::Write>(&self, f: &mut W) -> fmt::Result {
        write_escaped(f, self.policy, true)?;
        f.write_str(":")?;
        self.write_to(f)
    }
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

/// Extracts the optional user part of a key from a request, for [`ClientAndUser`].
///
/// Implemented by [`NoUser`], [`UserFromExtension`] and [`UserFn`].
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
/// Key on an identity that something you trust has checked, such as the API key or user id
/// an authentication layer put in the request extensions. Do not key on a raw header a client
/// writes (`x-api-key`, `x-user-id`): every random value would be a fresh, full budget, and a
/// flood of them would churn the store. If the key must come from a header, let it count only
/// once it is verified, and give unverified requests no user part (they are then limited per
/// address).
///
/// ```
/// use tollgate::key::UserFn;
///
/// /// What the authentication layer puts in the extensions once it has checked the API key.
/// #[derive(Clone)]
/// struct VerifiedApiKey {
///     id: String,
/// }
///
/// let users = UserFn::new(|_: &http::HeaderMap, extensions: &http::Extensions| {
///     extensions.get::<VerifiedApiKey>().map(|k| k.id.clone())
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

/// Who a request spends budget as: a client address, a user (an API key, a tenant), both, or
/// neither (one budget for everybody). What a [`KeyExtractor`] gives; the layer adds the policy
/// and the route, masks the address (see [`ClientIpSource::ipv6_prefix`](crate::ClientIpSource)) and bounds
/// the user part ([`MAX_USER_LEN`]).
///
/// There is deliberately no `Default`: an identity that means "everybody shares one budget"
/// is spelled [`Identity::global`], never produced by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity<'a> {
    ip: Option<IpAddr>,
    user: Option<Cow<'a, str>>,
}

impl<'a> Identity<'a> {
    /// No address and no user: every request with this identity shares one budget.
    pub fn global() -> Self {
        Identity {
            ip: None,
            user: None,
        }
    }

    /// A client address.
    pub fn from_client_ip(ip: IpAddr) -> Self {
        Identity {
            ip: Some(ip),
            user: None,
        }
    }

    /// A user, API key or tenant, whatever address it comes from.
    pub fn from_user(user: impl Into<Cow<'a, str>>) -> Self {
        Identity::global().with_user(user)
    }

    /// Adds a user part (an empty one is no user part).
    #[must_use]
    pub fn with_user(mut self, user: impl Into<Cow<'a, str>>) -> Self {
        self.user = Some(user.into()).filter(|u| !u.is_empty());
        self
    }

    /// The address part.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// The user part.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub(crate) fn into_parts(self) -> (Option<IpAddr>, Option<Cow<'a, str>>) {
        (self.ip, self.user)
    }
}

/// Finds who a request spends budget as. Both layers take one with `.key(..)`; see the
/// [module docs](self) for the built-ins.
///
/// Closures `Fn(&RequestParts<'_>) -> Option<Identity<'static>>` are extractors too:
///
/// ```
/// use tollgate::key::Identity;
/// use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer, RequestParts};
///
/// // One budget per API version and client address.
/// let layer = RateLimitLayer::new(MemoryStore::new())
///     .key(|req: &RequestParts<'_>| {
///         let version = req.headers().get("x-api-version")?.to_str().ok()?.to_owned();
///         Some(Identity::from_client_ip(req.client_ip()?).with_user(version))
///     })
///     .policy(Policy::new("api", Quota::per_second(10).unwrap()));
/// # let _ = layer;
/// ```
///
/// Key on what something you trust has checked. A value the client writes freely (a raw
/// `x-api-key`, `x-user-id`) gives every client as many budgets as it can invent values.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The identity of this request, or `None` when what the key is made of is missing (the
    /// layer's [`MissingKey`] then decides).
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>>;

    /// Tries `self`, then `other` when `self` finds nothing.
    fn or<B: KeyExtractor>(self, other: B) -> Or<Self, B>
    where
        Self: Sized,
    {
        Or(self, other)
    }
}

impl<F> KeyExtractor for F
where
    F: Fn(&RequestParts<'_>) -> Option<Identity<'static>> + Send + Sync + 'static,
{
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>> {
        self(req)
    }
}

/// One budget per client address: `<route>:<ip>:`. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientAddress;

impl KeyExtractor for ClientAddress {
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>> {
        req.client_ip().map(Identity::from_client_ip)
    }
}

/// One budget per client address and user: `<route>:<ip>:<user>`, or `<route>:<ip>:` for an
/// anonymous request. What the layers' `.user_key(..)` sets.
#[derive(Debug, Clone, Default)]
pub struct ClientAndUser<U>(U);

impl<U: UserKey> ClientAndUser<U> {
    /// Address and the user part `user` finds.
    pub fn new(user: U) -> Self {
        ClientAndUser(user)
    }
}

impl<U: UserKey> KeyExtractor for ClientAndUser<U> {
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>> {
        let id = Identity::from_client_ip(req.client_ip()?);
        Some(match self.0.user_key(req.headers(), req.extensions()) {
            Some(user) => id.with_user(user),
            None => id,
        })
    }
}

/// One budget per identity an earlier layer (authentication) put in the request extensions:
/// an API key or a user id, whatever address it comes from (`<route>:-:<identity>`).
///
/// A request without the extension is missing its key (see [`MissingKey`]); to limit
/// anonymous requests by address instead, use `FromExtension::<T>::new().or(ClientAddress)`.
///
/// ```
/// use tollgate::key::{ClientAddress, FromExtension, KeyExtractor};
/// use tollgate::{MemoryStore, Policy, Quota, RateLimitLayer};
///
/// /// What the authentication layer inserts once it has checked the key.
/// #[derive(Clone)]
/// struct ApiKeyId(String);
///
/// impl tollgate::key::AsUserKey for ApiKeyId {
///     fn as_user_key(&self) -> std::borrow::Cow<'_, str> {
///         self.0.as_str().into()
///     }
/// }
///
/// let layer = RateLimitLayer::new(MemoryStore::new())
///     .key(FromExtension::<ApiKeyId>::new().or(ClientAddress))
///     .policy(Policy::new("api", Quota::per_minute(600).unwrap()));
/// # let _ = layer;
/// ```
pub struct FromExtension<T>(std::marker::PhantomData<fn() -> T>);

impl<T> FromExtension<T> {
    /// Keys on the `T` extension of each request.
    pub fn new() -> Self {
        FromExtension(std::marker::PhantomData)
    }
}

impl<T> Default for FromExtension<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for FromExtension<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for FromExtension<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FromExtension")
            .field(&std::any::type_name::<T>())
            .finish()
    }
}

impl<T: AsUserKey + Send + Sync + 'static> KeyExtractor for FromExtension<T> {
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>> {
        let id = req.extensions().get::<T>()?.as_user_key();
        (!id.is_empty()).then(|| Identity::from_user(id))
    }
}

/// One budget per value of a header that a trusted gateway sets, such as a tenant id
/// (`<route>:-:<value>`).
///
/// Only for a header the gateway in front of the service writes itself, replacing whatever the
/// client sent: otherwise every client picks its own budget. A request where the header is
/// absent, empty, given more than once (a client's copy and the gateway's) or not visible
/// ASCII is missing its key (see [`MissingKey`]).
#[derive(Debug, Clone)]
pub struct TrustedHeader(HeaderName);

impl TrustedHeader {
    /// Keys on the header `name`.
    pub fn new(name: HeaderName) -> Self {
        TrustedHeader(name)
    }
}

impl KeyExtractor for TrustedHeader {
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>> {
        let mut values = req.headers().get_all(&self.0).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let value = value.to_str().ok()?.trim();
        (!value.is_empty()).then(|| Identity::from_user(value))
    }
}

/// One budget for every client of a policy (per route, or for the whole policy with
/// [`KeyScope::Policy`](crate::KeyScope)): protects a resource whatever the number of clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract<'r>(&self, _: &RequestParts<'r>) -> Option<Identity<'r>> {
        Some(Identity::global())
    }
}

/// Tries one extractor, then another; see [`KeyExtractor::or`].
#[derive(Debug, Clone, Default)]
pub struct Or<A, B>(A, B);

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for Or<A, B> {
    fn extract<'r>(&self, req: &RequestParts<'r>) -> Option<Identity<'r>> {
        self.0.extract(req).or_else(|| self.1.extract(req))
    }
}

/// What to do with a request whose key cannot be built: its [`KeyExtractor`] found nothing. With
/// the default [`ClientAddress`], that is a request the server put no peer address in (usually:
/// axum served without `into_make_service_with_connect_info::<SocketAddr>()`); with
/// [`FromExtension`], a request the auth layer let through without an identity.
///
/// Whichever is chosen, the first request of a layer that has no peer address logs one error,
/// `rate-limit-misconfigured`, naming the cause and the fix. A fail-closed policy never
/// becomes unlimited through a missing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Limit every such request together, under one key with neither address nor user
    /// (`<route>:-:`): the limit still holds, for all of them at once. The default: a
    /// deployment that forgot the peer address is limited too hard (and says so in its log),
    /// never not at all.
    #[default]
    Shared,
    /// Let requests of fail-open policies through unlimited; fail-closed policies answer 503,
    /// as when the store cannot decide. Counted in
    /// `ratelimit_requests_total{decision="unkeyed"}`.
    Allow,
    /// Answer 500 Internal Server Error: the deployment is broken and should be fixed. Counted
    /// in `ratelimit_requests_total{decision="unkeyed"}`.
    Reject,
}

/// What a layer does with one request whose key is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unkeyed {
    /// Decide it under the shared key without an address.
    Decide,
    /// Let it through undecided.
    Pass,
    /// Refuse it with this status.
    Refuse(http::StatusCode),
}

impl MissingKey {
    /// What to do for a policy that fails open (or not).
    pub(crate) fn action(self, fails_open: bool) -> Unkeyed {
        match self {
            MissingKey::Shared => Unkeyed::Decide,
            MissingKey::Allow if fails_open => Unkeyed::Pass,
            MissingKey::Allow => Unkeyed::Refuse(http::StatusCode::SERVICE_UNAVAILABLE),
            MissingKey::Reject => Unkeyed::Refuse(http::StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The name used in configuration files.
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) fn name(self) -> &'static str {
        match self {
            MissingKey::Shared => "shared",
            MissingKey::Allow => "allow",
            MissingKey::Reject => "reject",
        }
    }
}

/// The one error a layer logs when requests arrive without a peer address.
#[derive(Debug, Default)]
pub(crate) struct MissingKeyWarning(std::sync::atomic::AtomicBool);

impl MissingKeyWarning {
    /// Logs, the first time only, that `policy` saw a request without a peer address.
    pub(crate) fn warn(&self, layer: &str, policy: &str, mode: MissingKey) {
        use std::sync::atomic::Ordering;
        if self.0.load(Ordering::Relaxed) || self.0.swap(true, Ordering::Relaxed) {
            return;
        }
        let what = match mode {
            MissingKey::Shared => "every such request shares one budget per route",
            MissingKey::Allow => {
                "such requests pass unlimited on fail-open policies and get 503 on fail-closed ones"
            }
            MissingKey::Reject => "such requests are answered 500",
        };
        #[cfg(feature = "tracing")]
        tracing::error!(
            layer,
            policy,
            missing_key = mode.name(),
            "rate-limit-misconfigured: a request reached the {layer} without a peer address, so \
             it cannot be keyed by client IP and {what}. Serve axum with \
             `into_make_service_with_connect_info::<SocketAddr>()` (or add a SocketAddr request \
             extension). Logged once."
        );
        #[cfg(not(feature = "tracing"))]
        let _ = (layer, policy, what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    /// A hasher that keeps every byte it is fed: what `hash_with` promises is about the bytes
    /// (no two different keys feed the same ones), whatever the hasher does with lengths.
    #[derive(Default)]
    struct Recorded(Vec<u8>);

    impl Hasher for Recorded {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    fn fed(key: &Key<'_>) -> Vec<u8> {
        let mut r = Recorded::default();
        key.hash_with(&mut r);
        r.0
    }

    #[test]
    fn no_two_prefixes_feed_the_hasher_the_same_bytes() {
        // The same bytes split differently between policy and route, or all in one of them.
        let pairs = [
            ("ab", "c"),
            ("a", "bc"),
            ("", "abc"),
            ("abc", ""),
            ("a", "b"),
        ];
        let fed: Vec<Vec<u8>> = pairs
            .iter()
            .map(|(policy, route)| {
                let mut r = Recorded::default();
                feed_prefix(&mut r, policy, route);
                r.0
            })
            .collect();
        for (i, a) in fed.iter().enumerate() {
            for (j, b) in fed.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "{:?} and {:?}", pairs[i], pairs[j]);
            }
        }
        // Keys of those pairs have distinct prefixes, and a key's prefix is its pair's.
        let prefixes: std::collections::HashSet<u64> =
            pairs.iter().map(|(p, r)| prefix_hash(p, r)).collect();
        assert_eq!(prefixes.len(), pairs.len());
        assert_eq!(
            Key::new("ab", "c", None, None::<&str>).prefix,
            prefix_hash("ab", "c")
        );
    }

    #[test]
    fn a_key_prefix_makes_the_keys_key_new_makes() {
        let prefix = KeyPrefix::new("api", "/users/{id}");
        let long = "u".repeat(MAX_USER_LEN + 1);
        for user in [None, Some(""), Some("alice"), Some(long.as_str())] {
            let made = prefix.key(Some(IP), user);
            let new = Key::new("api", "/users/{id}", Some(IP), user);
            assert_eq!(made, new);
            assert_eq!(made.is_user_digested(), new.is_user_digested());
            let h = KeyHasher::new();
            assert_eq!(made.hash128(&h), new.hash128(&h));
        }
        assert_eq!((prefix.policy(), prefix.route()), ("api", "/users/{id}"));
        assert_eq!(
            format!("{prefix:?}"),
            "KeyPrefix { policy: \"api\", route: \"/users/{id}\", .. }"
        );
        // The concurrency store's second half reads the text: keys of two routes differ there
        // even if their prefixes were to collide.
        let mut a = Key::new("p", "/a", Some(IP), None::<&str>);
        let b = Key::new("p", "/b", Some(IP), None::<&str>);
        a.prefix = b.prefix;
        let h = KeyHasher::new();
        assert_eq!(a.hash64(&h), b.hash64(&h));
        assert_ne!(a.hash128(&h).1, b.hash128(&h).1);
    }

    #[test]
    fn no_two_keys_feed_the_hasher_the_same_bytes() {
        let v4: IpAddr = "1.2.3.4".parse().unwrap();
        let v6: IpAddr = "::102:304".parse().unwrap();
        let keys = [
            // The same bytes split differently between policy and route.
            Key::new("ab", "c", None, None::<&str>),
            Key::new("a", "bc", None, None::<&str>),
            // The same address bits in both families, and none.
            Key::new("p", "/r", Some(v4), None::<&str>),
            Key::new("p", "/r", Some(v6), None::<&str>),
            Key::new("p", "/r", None, None::<&str>),
            // An empty user part is no user part; a user that reads like no address.
            Key::new("p", "/r", None, Some("u")),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(fed(a), fed(b), "{a:?} and {b:?}");
            }
        }
    }

    #[test]
    fn an_identity_reads_back_what_it_was_built_from() {
        let id = Identity::from_client_ip(IP).with_user("alice");
        assert_eq!((id.client_ip(), id.user()), (Some(IP), Some("alice")));
        let user = Identity::from_user("bob");
        assert_eq!((user.client_ip(), user.user()), (None, Some("bob")));
        assert_eq!(Identity::from_client_ip(IP).with_user("").user(), None);
        let global = Identity::global();
        assert_eq!((global.client_ip(), global.user()), (None, None));
        // The extractors say which type they read, for a misconfigured layer's log line.
        assert!(format!("{:?}", FromExtension::<u64>::new()).contains("u64"));
    }

    #[test]
    fn a_tenant_header_a_client_could_bend_is_no_key() {
        let tenant = TrustedHeader::new(HeaderName::from_static("x-tenant"));
        let extract = |values: &[&[u8]]| {
            let mut req = http::Request::new(());
            for v in values {
                req.headers_mut()
                    .append("x-tenant", http::HeaderValue::from_bytes(v).unwrap());
            }
            tenant
                .extract(&RequestParts::new(&req))
                .map(|id| id.user().map(str::to_owned))
        };
        assert_eq!(extract(&[b"acme"]), Some(Some("acme".to_owned())));
        assert_eq!(extract(&[b" acme "]), Some(Some("acme".to_owned())));
        // Absent, empty, repeated, or bytes outside visible ASCII: missing, never a key.
        assert_eq!(extract(&[]), None);
        assert_eq!(extract(&[b"  "]), None);
        assert_eq!(extract(&[b"mine", b"acme"]), None);
        assert_eq!(extract(&[b"caf\xe9"]), None);
    }

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

    /// The pieces that could make two keys collide: separators, their escaped forms, braces,
    /// `~` and its escape, text outside ASCII.
    const PIECES: [&str; 10] = ["a", ":", "%", "%3A", "{", "}", "~", "%7E", "é", "-"];

    /// A key's three parts (policy, route, user) as pieces; the user is sometimes long enough
    /// to be digested.
    fn parts() -> impl proptest::strategy::Strategy<Value = [Vec<String>; 3]> {
        use proptest::prelude::*;
        let part = || {
            proptest::collection::vec(proptest::sample::select(PIECES.to_vec()), 0..4)
                .prop_map(|p| p.into_iter().map(str::to_owned).collect::<Vec<_>>())
        };
        (part(), part(), part(), any::<bool>()).prop_map(|(a, b, mut c, long)| {
            if long {
                c.push("u".repeat(MAX_USER_LEN + 1));
            }
            [a, b, c]
        })
    }

    /// A second key made from the first by the one edit most likely to collide with it:
    /// moving a piece across a part boundary, swapping a separator for its escaped form, or
    /// replacing a long user by the text of its digest.
    fn near(parts: &[Vec<String>; 3], edit: usize, at: usize) -> [Vec<String>; 3] {
        let mut b = parts.clone();
        match edit % 4 {
            0 | 1 => {
                let (from, to) = if edit.is_multiple_of(4) {
                    (at % 2, at % 2 + 1)
                } else {
                    (at % 2 + 1, at % 2)
                };
                if let Some(piece) = b[from].pop() {
                    b[to].insert(0, piece);
                }
            }
            2 => {
                for part in &mut b {
                    for piece in part.iter_mut() {
                        let swapped = match piece.as_str() {
                            ":" => "%3A",
                            "%3A" => ":",
                            "~" => "%7E",
                            "%7E" => "~",
                            _ => continue,
                        };
                        *piece = swapped.to_owned();
                        return b;
                    }
                }
            }
            _ => {
                let user = b[2].concat();
                if user.len() > MAX_USER_LEN {
                    b[2] = vec![digest_user(&user)];
                }
            }
        }
        b
    }

    fn key_of<'a>(parts: &'a [String; 3], ip: Option<IpAddr>) -> Key<'a> {
        Key::new(&parts[0], &parts[1], ip, Some(parts[2].as_str()))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2_000, ..Default::default() })]

        /// No two distinct keys share a qualified form (the Redis key) or an in-memory
        /// identity, and no qualified form contains a brace: checked on pairs one edit apart.
        #[test]
        fn qualified_form_is_injective(
            a in parts(),
            edit in 0usize..4,
            at in 0usize..2,
            v6 in proptest::prelude::any::<bool>(),
        ) {
            let b = near(&a, edit, at);
            let (a, b) = (a.map(|p| p.concat()), b.map(|p| p.concat()));
            let ip = Some(if v6 { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IP });
            let (ka, kb) = (key_of(&a, ip), key_of(&b, ip));
            let (sa, sb) = (ka.qualified().to_string(), kb.qualified().to_string());
            proptest::prop_assert!(!sa.contains(['{', '}']), "braces in {}", sa);
            // The form appended without the formatter is the same text, after what was there.
            let mut pushed = String::from("{");
            ka.push_qualified(&mut pushed);
            proptest::prop_assert_eq!(&pushed[1..], sa.as_str());
            proptest::prop_assert_eq!(ka == kb, sa == sb, "{} vs {}", sa, sb);
            let h = KeyHasher::new();
            proptest::prop_assert_eq!(ka == kb, ka.hash128(&h) == kb.hash128(&h), "{} vs {}", sa, sb);
        }
    }

    /// Every ASCII byte, and the bytes of a character outside ASCII, escaped in a route (where
    /// `~` is written as it is) and in a user (where it is escaped): only `[A-Za-z0-9._/-]`, and
    /// `~` in a route, are left as they are.
    #[test]
    fn each_byte_is_escaped_unless_plain() {
        // The table, for all 256 bytes, against the rule: no byte outside ASCII is ever plain,
        // so the slices written between escapes always end on a character boundary.
        for b in 0..=255u8 {
            let plain = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-');
            assert_eq!(BYTE_CLASS[usize::from(b)] & PLAIN != 0, plain, "{b:#x}");
            let with_tilde = BYTE_CLASS[usize::from(b)] & (PLAIN | TILDE) != 0;
            assert_eq!(with_tilde, plain || b == b'~', "{b:#x}");
        }
        for c in (0u8..128).map(char::from).chain(['é']) {
            let text = c.to_string();
            let escaped: String = text.bytes().map(|b| format!("%{b:02X}")).collect();
            let plain = c.is_ascii_alphanumeric() || "._/-".contains(c);
            let (route, user) = match (plain, c == '~') {
                (true, _) => (text.clone(), text.clone()),
                (false, true) => (text.clone(), escaped.clone()),
                (false, false) => (escaped.clone(), escaped.clone()),
            };
            let key = Key::new("p", &text, None, Some(text.as_str()));
            assert_eq!(key.to_string(), format!("{route}:-:{user}"), "{c:?}");
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
    fn a_user_that_reads_like_a_digest_is_not_the_digest() {
        let long = "u".repeat(MAX_USER_LEN + 1);
        let digested = Key::new("p", "/a", Some(IP), Some(long.as_str()));
        assert!(digested.is_user_digested());
        let lookalike_text = digested.user().unwrap().to_owned();
        let lookalike = Key::new("p", "/a", Some(IP), Some(lookalike_text.as_str()));
        assert!(!lookalike.is_user_digested());
        assert_eq!(lookalike.user(), digested.user());
        // Different keys everywhere a store looks: equality, the display form (Redis keys) and
        // the in-memory hash.
        assert_ne!(digested, lookalike);
        assert_ne!(digested.to_string(), lookalike.to_string());
        assert_ne!(
            digested.qualified().to_string(),
            lookalike.qualified().to_string()
        );
        let h = KeyHasher::new();
        assert_ne!(digested.hash128(&h), lookalike.hash128(&h));
        assert!(
            digested
                .to_string()
                .ends_with(&format!(":{lookalike_text}"))
        );
        assert!(
            lookalike
                .to_string()
                .ends_with(&format!(":%7E{}", &lookalike_text[1..]))
        );
    }

    #[test]
    fn an_owned_key_gives_back_the_same_key() {
        let long = "u".repeat(MAX_USER_LEN + 1);
        for key in [
            Key::new("p", "/a", Some(IP), Some(long.as_str())),
            Key::new("p", "/a", Some(IP), Some("~not-a-digest")),
            Key::new("p", "/a", None, None::<&str>),
        ] {
            let owned = OwnedKey::from(&key);
            assert_eq!(owned.key(), key);
            assert_eq!(owned.key().is_user_digested(), key.is_user_digested());
            let h = KeyHasher::new();
            assert_eq!(owned.key().hash128(&h), key.hash128(&h));
        }
    }

    proptest::proptest! {
        /// IPv4 addresses are written on the stack now: as `std` writes them, as before, so a
        /// Redis key's name does not change between versions.
        #[test]
        fn an_ipv4_address_is_written_as_std_writes_it(octets in proptest::array::uniform4(0u8..=255)) {
            let ip = Ipv4Addr::from(octets);
            let key = Key::new("p", "/a", Some(IpAddr::V4(ip)), Some("u"));
            proptest::prop_assert_eq!(key.to_string(), format!("/a:{ip}:u"));
        }
    }

    #[test]
    fn an_owned_key_shows_its_parts_and_not_its_per_process_prefix() {
        let key = Key::new("policy-p", "/route-a", Some(IP), Some("user-u"));
        let shown = format!("{:?}", OwnedKey::from(&key));
        for part in [
            "policy-p",
            "/route-a",
            "192.0.2.1",
            "user-u",
            "digested: false",
        ] {
            assert!(shown.contains(part), "{part} in {shown}");
        }
        // The prefix is a random seed's hash: logged, it would differ in every process.
        assert!(!shown.contains("prefix"), "{shown}");
        assert!(!shown.contains(&key.prefix.to_string()), "{shown}");
    }

    #[test]
    fn an_ipv4_client_and_its_ipv4_compatible_ipv6_twin_are_two_keys() {
        // ::192.0.2.1 has the same low 32 bits as 192.0.2.1: only the address family in the
        // hash tells them apart in the memory store.
        let v4 = Key::new("p", "/a", Some(IP), None::<&str>);
        let v6 = Key::new(
            "p",
            "/a",
            Some(IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_compatible())),
            None::<&str>,
        );
        assert_ne!(v4, v6);
        let h = KeyHasher::new();
        assert_ne!(v4.hash128(&h), v6.hash128(&h));
        // And no address is not an address of all zeros.
        let none = Key::new("p", "/a", None, None::<&str>);
        let zero = Key::new(
            "p",
            "/a",
            Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            None::<&str>,
        );
        assert_ne!(none.hash128(&h), zero.hash128(&h));
    }

    #[test]
    fn both_halves_of_the_identity_vary() {
        // The high half picks the memory store's shard, the low half the key within it: both
        // must depend on the key, or every key lands in one shard.
        let h = KeyHasher::new();
        let hashes: Vec<(u64, u64)> = (0..64u32)
            .map(|i| {
                Key::new("p", "/a", Some(IpAddr::V4(Ipv4Addr::from(i))), None::<&str>).hash128(&h)
            })
            .collect();
        let high: std::collections::HashSet<u64> = hashes.iter().map(|h| h.0).collect();
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h.1).collect();
        assert_eq!(high.len(), 64);
        assert_eq!(low.len(), 64);
    }

    #[test]
    fn accessors_and_debug_forms() {
        let k = Key::new("api", "/users/{id}", Some(IP), Some("alice"));
        assert_eq!(k.policy(), "api");
        assert_eq!(k.route(), "/users/{id}");
        assert_eq!(k.client_ip(), Some(IP));
        assert_eq!(k.user(), Some("alice"));
        assert_eq!(format!("{k:?}"), "Key(/users/%7Bid%7D:192.0.2.1:alice)");
        let users = UserFromExtension::<u64>::new();
        assert_eq!(format!("{users:?}"), "UserFromExtension(\"u64\")");
        let f = UserFn::new(|_: &HeaderMap, _: &Extensions| None);
        assert_eq!(format!("{f:?}"), "UserFn { .. }");
        assert_eq!(MissingKey::Shared.name(), "shared");
        assert_eq!(MissingKey::Allow.name(), "allow");
        assert_eq!(MissingKey::Reject.name(), "reject");
    }

    #[test]
    fn strings_and_shared_strings_are_user_keys() {
        let mut ext = Extensions::new();
        let headers = HeaderMap::new();
        ext.insert(String::from("bob"));
        assert_eq!(
            UserFromExtension::<String>::new()
                .user_key(&headers, &ext)
                .as_deref(),
            Some("bob")
        );
        ext.insert(Arc::<str>::from("carol"));
        assert_eq!(
            UserFromExtension::<Arc<str>>::new()
                .user_key(&headers, &ext)
                .as_deref(),
            Some("carol")
        );
        ext.insert(7i64);
        assert_eq!(
            UserFromExtension::<i64>::new()
                .user_key(&headers, &ext)
                .as_deref(),
            Some("7")
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
