//! Which client a request comes from: the socket peer, or, behind proxies the operator names,
//! the first untrusted address of the forwarding chain.
//!
//! The threat: `X-Forwarded-For` and `Forwarded` are written by whoever sends the request. A
//! client can put any address it likes at the left of them, and a limiter that believes it lets
//! the client choose its own key (a fresh budget per request). So headers are read only when the
//! operator names the proxies to trust, only when the request really comes from one of them, and
//! from the right, where trusted proxies appended what they saw. See `docs/client-ip.md`.
//!
//! ```
//! use tollgate::ClientIpSource;
//!
//! // Behind a load balancer in 10.0.0.0/8: read X-Forwarded-For from it, and only from it.
//! let behind_lb = ClientIpSource::peer().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
//!
//! // Behind Cloudflare: it overwrites CF-Connecting-IP, and the peer must be Cloudflare.
//! # let cloudflare_ranges: Vec<ipnet::IpNet> = vec!["173.245.48.0/20".parse().unwrap()];
//! let behind_cdn = ClientIpSource::peer()
//!     .trust_proxies(cloudflare_ranges)
//!     .header(tollgate::ForwardedHeader::Single(http::HeaderName::from_static("cf-connecting-ip")));
//! # let _ = (behind_lb, behind_cdn);
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(test)]
use http::HeaderValue;
use http::header::{FORWARDED, HeaderName};
use http::{Extensions, HeaderMap, Request};
pub use ipnet::IpNet;

/// The header a trusted proxy reports the client in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For`: a comma-separated list, each proxy appending its peer; several header
    /// lines are joined in order. The default.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded`: the `for=` parameter of each element.
    Forwarded,
    /// A header holding one address that the proxy sets (overwriting whatever the client sent):
    /// `X-Real-IP`, `CF-Connecting-IP`, `True-Client-IP`, `Fly-Client-IP`... The last line
    /// counts when there are several.
    Single(HeaderName),
}

impl std::str::FromStr for ForwardedHeader {
    type Err = http::header::InvalidHeaderName;

    /// `x-forwarded-for`, `forwarded` (any case), or the name of a single-address header.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        Ok(match name.as_str() {
            "x-forwarded-for" => ForwardedHeader::XForwardedFor,
            "forwarded" => ForwardedHeader::Forwarded,
            other => ForwardedHeader::Single(HeaderName::from_bytes(other.as_bytes())?),
        })
    }
}

/// A client-IP setting that lets clients choose their key, or that does nothing: see
/// [`ClientIpSource::warnings`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientIpWarning {
    /// A trusted range covers every address (`0.0.0.0/0`, `::/0`): every client is "a trusted
    /// proxy", so every client writes its own key in the forwarding header.
    TrustsEveryone(IpNet),
    /// A hop count with a single-address header: the count is not used, and the header is
    /// believed from whoever connects.
    HopsWithSingleHeader(HeaderName),
    /// A header is named but no proxy is trusted: it is never read.
    HeaderWithoutTrust(String),
}

impl std::fmt::Display for ClientIpWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientIpWarning::TrustsEveryone(net) => write!(
                f,
                "trusted proxy range {net} covers every address, so every client can write its \
                 own key in the forwarding header; name only your proxies' ranges"
            ),
            ClientIpWarning::HopsWithSingleHeader(name) => write!(
                f,
                "a trusted hop count does not apply to the single-address header {name}, which \
                 is then believed from whoever connects; trust the proxies by range instead"
            ),
            ClientIpWarning::HeaderWithoutTrust(name) => write!(
                f,
                "the client-IP header {name} is named but no proxy is trusted, so it is never \
                 read; name the proxies (trusted_proxies / --trusted-proxy)"
            ),
        }
    }
}

/// Which proxies are trusted to report the client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Trust {
    /// None: the socket peer is the client.
    Nobody,
    /// Proxies whose addresses are in these ranges.
    Ranges(Vec<IpNet>),
    /// A fixed number of proxies in front of the service.
    Hops(usize),
}

/// Why an IPv6 prefix length was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixError(u8);

impl std::fmt::Display for PrefixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IPv6 prefix length {} is out of range: use 1 to 128 (64 keys one customer network)",
            self.0
        )
    }
}

impl std::error::Error for PrefixError {}

/// Where the client address of a request comes from, and how it is keyed.
///
/// - By default the client is the **socket peer**: axum's `ConnectInfo<SocketAddr>` (serve with
///   `into_make_service_with_connect_info::<SocketAddr>()`; axum's `MockConnectInfo` works in
///   tests), or a plain [`SocketAddr`] request extension for other servers. No header is read.
/// - [`trust_proxies`](Self::trust_proxies) names the proxies by address range: when the peer
///   is one of them, the forwarding header is walked from the right, skipping trusted hops, and
///   the first untrusted address is the client. When the peer is not trusted, the headers are
///   ignored.
/// - [`trust_hops`](Self::trust_hops) names the number of proxies instead, for when their
///   addresses are not known; only safe when the service cannot be reached but through them.
/// - IPv6 clients are keyed on their network prefix ([`ipv6_prefix`](Self::ipv6_prefix),
///   default /64), since one customer usually holds a whole /64 or more; IPv4-mapped IPv6
///   addresses are keyed as the IPv4 address they are.
///
/// A malformed header never panics and never lets the client choose its key: a bad entry at
/// the client's position makes the nearest trusted proxy the key.
#[derive(Debug, Clone)]
pub struct ClientIpSource {
    trust: Trust,
    header: ForwardedHeader,
    ipv6_prefix: u8,
    warned_untrusted_header: Arc<AtomicBool>,
}

impl Default for ClientIpSource {
    fn default() -> Self {
        ClientIpSource::peer()
    }
}

impl ClientIpSource {
    /// The socket peer, and nothing a client can write.
    pub fn peer() -> Self {
        ClientIpSource {
            trust: Trust::Nobody,
            header: ForwardedHeader::XForwardedFor,
            ipv6_prefix: 64,
            warned_untrusted_header: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Trusts the proxies in these ranges to report the client in the forwarding header.
    /// IPv4 ranges also match IPv4-mapped IPv6 peers. An empty list trusts nobody.
    #[must_use]
    pub fn trust_proxies(mut self, ranges: impl IntoIterator<Item = IpNet>) -> Self {
        let ranges: Vec<IpNet> = ranges.into_iter().map(|r| r.trunc()).collect();
        self.trust = if ranges.is_empty() {
            Trust::Nobody
        } else {
            Trust::Ranges(ranges)
        };
        self
    }

    /// Trusts exactly `hops` proxies in front of the service (1: one load balancer; 2: a CDN
    /// and a load balancer): the client is the `hops`-th address from the right of the
    /// forwarding header. Requests with fewer entries did not come through the proxies and are
    /// keyed on the peer. 0 trusts nobody.
    #[must_use]
    pub fn trust_hops(mut self, hops: usize) -> Self {
        self.trust = if hops == 0 {
            Trust::Nobody
        } else {
            Trust::Hops(hops)
        };
        self
    }

    /// Which header trusted proxies report the client in (default `X-Forwarded-For`).
    #[must_use]
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// Keys IPv6 clients on their first `bits` bits (default 64; 128 keys each address).
    ///
    /// # Errors
    ///
    /// When `bits` is 0 or above 128.
    pub fn ipv6_prefix(mut self, bits: u8) -> Result<Self, PrefixError> {
        if bits == 0 || bits > 128 {
            return Err(PrefixError(bits));
        }
        self.ipv6_prefix = bits;
        Ok(self)
    }

    /// The key address of a request: the client, masked to the IPv6 prefix; `None` when the
    /// server put no peer address in the request.
    pub fn client_ip<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        self.client_addr(req).map(|ip| self.mask(ip))
    }

    /// The client address of a request, not masked; `None` without a peer address.
    pub fn client_addr<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = peer_addr(req.extensions())?.ip().to_canonical();
        Some(self.resolve(peer, req.headers()))
    }

    /// The client address (unmasked), given the socket peer and the request headers.
    ///
    /// The forwarding header is read from the right and only as far as the answer needs:
    /// however long a header a client sends, the work is bounded by the number of trusted
    /// hops (at most [`MAX_HOPS`]) and one pass over the bytes.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        match &self.trust {
            Trust::Nobody => {
                self.warn_if_forwarded(headers);
                peer
            }
            Trust::Ranges(ranges) => {
                let trusted = |ip: &IpAddr| ranges.iter().any(|r| r.contains(ip));
                if !trusted(&peer) {
                    return peer;
                }
                match &self.header {
                    ForwardedHeader::Single(name) => single(headers, name).unwrap_or(peer),
                    chain_header => {
                        rightmost_untrusted(hops_from_right(headers, chain_header), peer, trusted)
                    }
                }
            }
            Trust::Hops(hops) => match &self.header {
                ForwardedHeader::Single(name) => single(headers, name).unwrap_or(peer),
                chain_header => {
                    nth_from_right(hops_from_right(headers, chain_header), *hops).unwrap_or(peer)
                }
            },
        }
    }

    /// Settings that let clients choose their key, or that do nothing: a trusted range
    /// covering every address, a hop count with a single-address header, a header named
    /// without any trusted proxy. The layers log each one at start-up
    /// (`rate-limit-misconfigured`), as express-rate-limit does for a permissive `trust proxy`.
    pub fn warnings(&self) -> Vec<ClientIpWarning> {
        let mut out = Vec::new();
        match (&self.trust, &self.header) {
            (Trust::Ranges(ranges), _) => out.extend(
                ranges
                    .iter()
                    .filter(|r| r.prefix_len() == 0)
                    .map(|r| ClientIpWarning::TrustsEveryone(*r)),
            ),
            (Trust::Hops(_), ForwardedHeader::Single(name)) => {
                out.push(ClientIpWarning::HopsWithSingleHeader(name.clone()));
            }
            (Trust::Nobody, ForwardedHeader::Forwarded) => {
                out.push(ClientIpWarning::HeaderWithoutTrust("forwarded".into()));
            }
            (Trust::Nobody, ForwardedHeader::Single(name)) => {
                out.push(ClientIpWarning::HeaderWithoutTrust(name.to_string()));
            }
            _ => {}
        }
        out
    }

    /// Logs [`warnings`](Self::warnings), once per layer that uses these settings.
    pub(crate) fn log_warnings(&self, layer: &str) {
        for w in self.warnings() {
            #[cfg(feature = "tracing")]
            tracing::warn!(layer, "rate-limit-misconfigured: {w}");
            #[cfg(not(feature = "tracing"))]
            let _ = (layer, w);
        }
    }

    /// Keys IPv6 on its prefix; IPv4 (mapped ones included, already canonical) as is.
    pub fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                // The prefix is 1 to 128, so the shift is 0 to 127.
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            v4 @ IpAddr::V4(_) => v4,
        }
    }

    /// One warning per `ClientIpSource` when forwarding headers arrive while no proxy is trusted:
    /// either the service is behind a proxy that is not configured (every client then shares
    /// the proxy's key), or clients are trying to spoof.
    fn warn_if_forwarded(&self, headers: &HeaderMap) {
        if self.warned_untrusted_header.load(Ordering::Relaxed) {
            return;
        }
        // One pass over the names, not two lookups: each lookup hashes its name (FNV over
        // `x-forwarded-for`'s bytes), and a request carries a handful of names, compared here
        // by their length or standard index before any byte (at most hyper's 100).
        let forwarded = headers
            .keys()
            .any(|name| *name == X_FORWARDED_FOR || *name == FORWARDED);
        if forwarded && !self.warned_untrusted_header.swap(true, Ordering::Relaxed) {
            #[cfg(feature = "tracing")]
            tracing::warn!(
                "rate-limit-misconfigured: a request carries X-Forwarded-For or Forwarded but no \
                 proxy is trusted, so clients are keyed on the socket peer. Behind a proxy, every \
                 client then shares the proxy's budget: name it with ClientIpSource::trust_proxies \
                 (demo: --trusted-proxy CIDR). If there is no proxy, ignore this: the header is \
                 not trusted. (Logged once.)"
            );
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The most hops of a forwarding chain that are read. A chain of trusted hops longer than this
/// (no real deployment has 64 proxies) is keyed on the 64th from the right, so that a client
/// inside the trusted network cannot make each request walk a huge header.
pub const MAX_HOPS: usize = 64;

/// One entry of a forwarding chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// An address.
    Ip(IpAddr),
    /// `unknown`, an obfuscated identifier, or garbage: a hop with no usable address.
    Opaque,
}

/// Walks the chain from the right, skipping trusted addresses; the first untrusted hop is the
/// client. An opaque hop there cannot be keyed: the trusted proxy that reported it (the hop to
/// its right, or the peer) is the key instead. A chain of only trusted hops means the request
/// started inside the trusted network: its leftmost address is the client (the [`MAX_HOPS`]-th
/// from the right, at most).
fn rightmost_untrusted(
    hops: impl Iterator<Item = Hop>,
    peer: IpAddr,
    trusted: impl Fn(&IpAddr) -> bool,
) -> IpAddr {
    let mut reporter = peer;
    for hop in hops.take(MAX_HOPS) {
        match hop {
            Hop::Ip(ip) if trusted(&ip) => reporter = ip,
            Hop::Ip(ip) => return ip,
            Hop::Opaque => return reporter,
        }
    }
    reporter
}

/// The `n`-th hop from the right (1 is the rightmost), or, if that hop is opaque, the nearest
/// address to its right (the proxy that reported it). `None` when the chain has fewer than `n`
/// hops: the request did not come through the proxies.
fn nth_from_right(hops: impl Iterator<Item = Hop>, n: usize) -> Option<IpAddr> {
    let mut nearest = None;
    for (i, hop) in hops.take(n.min(MAX_HOPS)).enumerate() {
        if let Hop::Ip(ip) = hop {
            nearest = Some(ip);
        }
        if i + 1 == n {
            return nearest;
        }
    }
    None
}

fn single(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    let value = headers.get_all(name).iter().next_back()?;
    match parse_node(trim_ows(value.as_bytes())) {
        Hop::Ip(ip) => Some(ip),
        Hop::Opaque => None,
    }
}

/// The hops of the chain header from the right: the last header line first, each line from
/// its end. Lazy, so a walk that stops early never looks at the rest.
pub(crate) fn hops_from_right<'h>(
    headers: &'h HeaderMap,
    header: &ForwardedHeader,
) -> impl Iterator<Item = Hop> + 'h {
    let (name, forwarded) = match header {
        ForwardedHeader::XForwardedFor => (Some(X_FORWARDED_FOR), false),
        ForwardedHeader::Forwarded => (Some(FORWARDED), true),
        ForwardedHeader::Single(_) => (None, false),
    };
    name.into_iter()
        .flat_map(move |name| headers.get_all(name).iter().rev())
        .flat_map(move |line| {
            let line = line.as_bytes();
            let (xff, fwd) = if forwarded {
                (None, Some(ForwardedFromRight::new(line)))
            } else {
                (Some(xff_from_right(line)), None)
            };
            xff.into_iter().flatten().chain(fwd.into_iter().flatten())
        })
}

/// Every hop of the chain header, left to right (several header lines joined in order).
#[cfg(test)]
pub(crate) fn chain(headers: &HeaderMap, header: &ForwardedHeader) -> Vec<Hop> {
    let mut hops: Vec<Hop> = hops_from_right(headers, header).collect();
    hops.reverse();
    hops
}

/// `X-Forwarded-For: 203.0.113.7, 2001:db8::1, 198.51.100.2:4711`, from the right. Each entry
/// is an address, optionally with a port, IPv6 bare or bracketed; empty entries are skipped;
/// anything else (garbage, bytes that are not ASCII) is one opaque hop and does not spoil its
/// neighbours.
fn xff_from_right(line: &[u8]) -> impl Iterator<Item = Hop> + '_ {
    line.rsplit(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .map(parse_node)
}

/// `X-Forwarded-For` entries left to right.
#[cfg(test)]
pub(crate) fn parse_xff(line: &str) -> Vec<Hop> {
    let mut hops: Vec<Hop> = xff_from_right(line.as_bytes()).collect();
    hops.reverse();
    hops
}

/// RFC 7239 `Forwarded` elements left to right: the `for=` of each; an element without one,
/// or that is malformed, is opaque.
#[cfg(test)]
pub(crate) fn parse_forwarded(line: &str) -> Vec<Hop> {
    let mut hops: Vec<Hop> = ForwardedFromRight::new(line.as_bytes()).collect();
    hops.reverse();
    hops
}

/// The elements of one `Forwarded` line, from the right.
///
/// A proxy appends `, <element>` to what it received. So the rightmost element is the shortest
/// well-formed suffix that follows a comma: it is found from what the proxy wrote alone,
/// whatever the client wrote to its left (an unclosed quote, stray semicolons, bytes that are
/// not ASCII). Reading left to right instead would let a client's unclosed `"` swallow the
/// proxy's element and choose its own key. When no suffix is well-formed, the text after the
/// last comma is one opaque element, and the walk goes on to its left.
struct ForwardedFromRight<'a> {
    rest: &'a [u8],
    done: bool,
}

impl<'a> ForwardedFromRight<'a> {
    fn new(line: &'a [u8]) -> Self {
        ForwardedFromRight {
            rest: line,
            done: false,
        }
    }
}

impl Iterator for ForwardedFromRight<'_> {
    type Item = Hop;

    fn next(&mut self) -> Option<Hop> {
        while !self.done {
            let rest = self.rest;
            let last_comma = rest.iter().rposition(|&b| b == b',');
            // Try the suffixes after each comma, shortest first, then the whole line.
            let mut end = rest.len();
            let (cut, hop) = loop {
                let comma = rest[..end].iter().rposition(|&b| b == b',');
                if let Ok(hop) = parse_element(&rest[comma.map_or(0, |c| c + 1)..]) {
                    break (comma, hop);
                }
                match comma {
                    Some(c) => end = c,
                    // Nothing well-formed: the last comma-separated piece (not empty, or it
                    // would have parsed) is one opaque element.
                    None => break (last_comma, Some(Hop::Opaque)),
                }
            };
            match cut {
                Some(c) => self.rest = &rest[..c],
                None => self.done = true,
            }
            // An empty element (`a,,b`) is no hop.
            if hop.is_some() {
                return hop;
            }
        }
        None
    }
}

/// Not one well-formed `Forwarded` element.
struct Malformed;

/// Parses one `Forwarded` element: `[pair] *( ";" [pair] )`, `pair = token "=" value`,
/// `value = token / quoted-string`, with optional whitespace around pairs (unquoted values may
/// also hold `:`, `[` and `]`, which proxies write unquoted more often than the RFC allows).
///
/// `Ok(None)` for an empty element; `Ok(Some(hop))` with the address of its one `for=`
/// parameter, or opaque when it has none, several, or one that is not an address.
fn parse_element(b: &[u8]) -> Result<Option<Hop>, Malformed> {
    let ows = |i: &mut usize| {
        while matches!(b.get(*i), Some(b' ' | b'\t')) {
            *i += 1;
        }
    };
    let mut i = 0;
    let mut pairs: usize = 0;
    let mut fors: usize = 0;
    let mut hop = Hop::Opaque;
    loop {
        ows(&mut i);
        match b.get(i) {
            None => break,
            Some(b';') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name_start = i;
        while b.get(i).is_some_and(|&c| is_tchar(c)) {
            i += 1;
        }
        if i == name_start || b.get(i) != Some(&b'=') {
            return Err(Malformed);
        }
        let name = &b[name_start..i];
        i += 1;
        let value_start = i;
        let mut escaped = false;
        // A quoted string: up to the next unescaped `"`; a `\` takes the byte after it (a `\`
        // that ends the value takes nothing, and the string is unclosed). A header value holds
        // no control bytes, so every other byte is quoted text.
        let value = if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(Malformed),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        escaped = true;
                        i += 2;
                    }
                    Some(_) => i += 1,
                }
            }
            i += 1;
            &b[value_start + 1..i - 1]
        } else {
            while b
                .get(i)
                .is_some_and(|&c| is_tchar(c) || matches!(c, b':' | b'[' | b']'))
            {
                i += 1;
            }
            if i == value_start {
                return Err(Malformed);
            }
            &b[value_start..i]
        };
        // A pair ends the element or is followed by `;` (which the loop's top takes).
        ows(&mut i);
        if !matches!(b.get(i), None | Some(b';')) {
            return Err(Malformed);
        }
        pairs += 1;
        if name.eq_ignore_ascii_case(b"for") {
            fors += 1;
            hop = if escaped {
                // An address never needs escaping; take the value as it reads.
                let unescaped: Vec<u8> = unescape(value);
                parse_node(&unescaped)
            } else {
                parse_node(value)
            };
        }
    }
    if pairs == 0 {
        return Ok(None);
    }
    // A parameter may occur once per element (RFC 7239 section 4): two `for`s name no one.
    Ok(Some(if fors == 1 { hop } else { Hop::Opaque }))
}

fn unescape(quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&c) = bytes.next() {
        if c == b'\\' {
            if let Some(&next) = bytes.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// RFC 9110 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// A node: `192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]`, `[2001:db8::1]:80`, `2001:db8::1`;
/// `unknown`, `_obfuscated` and anything else (bytes that are not ASCII included) are opaque.
/// Mapped IPv4 is made IPv4.
pub(crate) fn parse_node(node: &[u8]) -> Hop {
    let Ok(node) = std::str::from_utf8(node) else {
        return Hop::Opaque;
    };
    let ip = if let Some(rest) = node.strip_prefix('[') {
        rest.split_once(']')
            .filter(|(_, port)| port.is_empty() || valid_port(port))
            .and_then(|(ip, _)| ip.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6)
    } else if let Ok(ip) = node.parse::<IpAddr>() {
        Some(ip)
    } else {
        node.rsplit_once(':')
            .filter(|(_, port)| valid_port(port))
            .and_then(|(ip, _)| ip.parse::<std::net::Ipv4Addr>().ok())
            .map(IpAddr::V4)
    };
    ip.map_or(Hop::Opaque, |ip| Hop::Ip(ip.to_canonical()))
}

fn valid_port(port: &str) -> bool {
    let port = port.strip_prefix(':').unwrap_or(port);
    (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit())
        || port.starts_with('_')
}

pub(crate) fn peer_addr(ext: &Extensions) -> Option<SocketAddr> {
    #[cfg(feature = "axum")]
    {
        use axum::extract::ConnectInfo;
        use axum::extract::connect_info::MockConnectInfo;
        if let Some(ConnectInfo(addr)) = ext.get::<ConnectInfo<SocketAddr>>() {
            return Some(*addr);
        }
        // What axum's own `ConnectInfo` extractor falls back to in tests.
        if let Some(MockConnectInfo(addr)) = ext.get::<MockConnectInfo<SocketAddr>>() {
            return Some(*addr);
        }
    }
    ext.get::<SocketAddr>().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn rfc7239_examples() {
        // RFC 7239 section 4 and 7.
        let cases: [(&str, &[Hop]); 7] = [
            ("for=\"_gazonk\"", &[Hop::Opaque]),
            (
                "For=\"[2001:db8:cafe::17]:4711\"",
                &[Hop::Ip(ip("2001:db8:cafe::17"))],
            ),
            (
                "for=192.0.2.60;proto=http;by=203.0.113.43",
                &[Hop::Ip(ip("192.0.2.60"))],
            ),
            (
                "for=192.0.2.43, for=198.51.100.17",
                &[Hop::Ip(ip("192.0.2.43")), Hop::Ip(ip("198.51.100.17"))],
            ),
            ("for=unknown", &[Hop::Opaque]),
            ("for=\"192.0.2.43:47011\"", &[Hop::Ip(ip("192.0.2.43"))]),
            (
                "proto=https;host=example.com, FOR=\"[2001:db8::1]\";by=_x",
                &[Hop::Opaque, Hop::Ip(ip("2001:db8::1"))],
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_forwarded(line), want, "{line}");
        }
    }

    #[test]
    fn forwarded_quoting_and_garbage() {
        // A comma inside a quoted value does not split elements.
        assert_eq!(
            parse_forwarded("for=\"a,b\";proto=http, for=192.0.2.1"),
            [Hop::Opaque, Hop::Ip(ip("192.0.2.1"))]
        );
        assert_eq!(
            parse_forwarded("for=\"x\\\"y\", for=192.0.2.2"),
            [Hop::Opaque, Hop::Ip(ip("192.0.2.2"))]
        );
        // Unquoted IPv6 is invalid per RFC 7239; we read it rather than guess a port.
        assert_eq!(
            parse_forwarded("for=2001:db8::9"),
            [Hop::Ip(ip("2001:db8::9"))]
        );
        for junk in [
            "",
            ";;;",
            "for",
            "for=",
            "=",
            "\"",
            "for=\"[::1",
            "for=[::1]x",
        ] {
            assert!(
                parse_forwarded(junk).iter().all(|h| *h == Hop::Opaque),
                "{junk:?} -> {:?}",
                parse_forwarded(junk)
            );
        }
    }

    #[test]
    fn x_forwarded_for_entries() {
        let got: Vec<Hop> = parse_xff(
            " 203.0.113.7 ,2001:db8::1, 198.51.100.2:4711,[2001:db8::2]:80,, junk, ::ffff:192.0.2.9",
        );
        assert_eq!(
            got,
            [
                Hop::Ip(ip("203.0.113.7")),
                Hop::Ip(ip("2001:db8::1")),
                Hop::Ip(ip("198.51.100.2")),
                Hop::Ip(ip("2001:db8::2")),
                Hop::Opaque,
                Hop::Ip(ip("192.0.2.9")),
            ]
        );
    }

    #[test]
    fn several_header_lines_are_joined_in_order() {
        let h = headers(&[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        assert_eq!(
            chain(&h, &ForwardedHeader::XForwardedFor),
            [
                Hop::Ip(ip("1.1.1.1")),
                Hop::Ip(ip("2.2.2.2")),
                Hop::Ip(ip("3.3.3.3"))
            ]
        );
    }

    /// (trusted ranges, peer, X-Forwarded-For, expected client)
    const XFF_CASES: &[(&[&str], &str, &str, &str)] = &[
        // Nobody trusted: the peer, whatever the header says.
        (&[], "203.0.113.5", "198.51.100.1", "203.0.113.5"),
        // Trusted load balancer: the entry it appended.
        (&["10.0.0.0/8"], "10.0.0.2", "198.51.100.1", "198.51.100.1"),
        // A spoofed leftmost entry is never used.
        (
            &["10.0.0.0/8"],
            "10.0.0.2",
            "6.6.6.6, 198.51.100.1",
            "198.51.100.1",
        ),
        // A chain through several trusted proxies.
        (
            &["10.0.0.0/8"],
            "10.0.0.2",
            "6.6.6.6, 198.51.100.1, 10.1.1.1, 10.2.2.2",
            "198.51.100.1",
        ),
        // The peer is not trusted: the headers are ignored entirely.
        (&["10.0.0.0/8"], "203.0.113.5", "10.0.0.9", "203.0.113.5"),
        // Mixed IPv4/IPv6, with a port on the way.
        (
            &["10.0.0.0/8", "fd00::/8"],
            "fd00::1",
            "2001:db8::7, 10.0.0.3:8080",
            "2001:db8::7",
        ),
        // An IPv4-mapped peer matches an IPv4 range.
        (
            &["10.0.0.0/8"],
            "::ffff:10.0.0.2",
            "198.51.100.1",
            "198.51.100.1",
        ),
        // Garbage at the client's position: the proxy that reported it is the key.
        (
            &["10.0.0.0/8"],
            "10.0.0.2",
            "198.51.100.1, not-an-ip, 10.0.0.5",
            "10.0.0.5",
        ),
        (&["10.0.0.0/8"], "10.0.0.2", "garbage", "10.0.0.2"),
        // Garbage to the left of the client is the client's own business.
        (
            &["10.0.0.0/8"],
            "10.0.0.2",
            "%%%, 198.51.100.1",
            "198.51.100.1",
        ),
        // All hops trusted: the request started inside; the leftmost is the client.
        (
            &["10.0.0.0/8"],
            "10.0.0.2",
            "10.9.9.9, 10.0.0.3",
            "10.9.9.9",
        ),
        // No header from a trusted proxy: the proxy itself.
        (&["10.0.0.0/8"], "10.0.0.2", "", "10.0.0.2"),
    ];

    #[test]
    fn x_forwarded_for_table() {
        for &(ranges, peer, xff, want) in XFF_CASES {
            let c = ClientIpSource::peer().trust_proxies(ranges.iter().map(|r| net(r)));
            let h = if xff.is_empty() {
                HeaderMap::new()
            } else {
                headers(&[("x-forwarded-for", xff)])
            };
            assert_eq!(
                c.resolve(ip(peer), &h),
                ip(want),
                "{ranges:?} {peer} {xff:?}"
            );
        }
    }

    #[test]
    fn forwarded_header_table() {
        let c = ClientIpSource::peer()
            .trust_proxies([net("10.0.0.0/8")])
            .header(ForwardedHeader::Forwarded);
        let cases = [
            (
                "for=6.6.6.6, for=\"[2001:db8::5]:1234\";proto=https, for=10.0.0.3",
                "2001:db8::5",
            ),
            ("for=198.51.100.1;by=10.0.0.2", "198.51.100.1"),
            ("for=unknown, for=10.0.0.3", "10.0.0.3"),
            ("for=\"_hidden\"", "10.0.0.2"),
        ];
        for (line, want) in cases {
            let h = headers(&[("forwarded", line)]);
            assert_eq!(c.resolve(ip("10.0.0.2"), &h), ip(want), "{line}");
        }
        // X-Forwarded-For is not read when Forwarded is configured.
        let h = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(c.resolve(ip("10.0.0.2"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn hop_counts() {
        let one = ClientIpSource::peer().trust_hops(1);
        let two = ClientIpSource::peer().trust_hops(2);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.1, 203.0.113.9")]);
        assert_eq!(one.resolve(ip("10.0.0.2"), &h), ip("203.0.113.9"));
        assert_eq!(two.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        // Fewer entries than hops: not through the proxies; the peer.
        let short = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(two.resolve(ip("10.0.0.2"), &short), ip("10.0.0.2"));
        assert_eq!(
            two.resolve(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
        assert_eq!(
            ClientIpSource::peer()
                .trust_hops(0)
                .resolve(ip("10.0.0.2"), &h),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn single_ip_headers_only_when_named_and_from_a_trusted_peer() {
        let real_ip = HeaderName::from_static("x-real-ip");
        let c = ClientIpSource::peer()
            .trust_proxies([net("10.0.0.0/8")])
            .header(ForwardedHeader::Single(real_ip));
        let h = headers(&[("x-real-ip", "6.6.6.6"), ("x-real-ip", "198.51.100.1")]);
        assert_eq!(c.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        assert_eq!(c.resolve(ip("203.0.113.5"), &h), ip("203.0.113.5"));
        let bad = headers(&[("x-real-ip", "nope")]);
        assert_eq!(c.resolve(ip("10.0.0.2"), &bad), ip("10.0.0.2"));
        // Not named: never read.
        let plain = ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")]);
        let h = headers(&[("x-real-ip", "198.51.100.1")]);
        assert_eq!(plain.resolve(ip("10.0.0.2"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn ipv6_is_keyed_on_its_prefix_and_mapped_ipv4_as_ipv4() {
        let c = ClientIpSource::peer();
        assert_eq!(c.mask(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(c.mask(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        // Not mapped, even though it is written with a dotted quad.
        assert_eq!(c.mask(ip("2001:db8::1.2.3.4")), ip("2001:db8::"));
        let c56 = ClientIpSource::peer().ipv6_prefix(56).unwrap();
        assert_eq!(c56.mask(ip("2001:db8:1:2ff::1")), ip("2001:db8:1:200::"));
        let c128 = ClientIpSource::peer().ipv6_prefix(128).unwrap();
        assert_eq!(c128.mask(ip("2001:db8::1")), ip("2001:db8::1"));
        assert!(ClientIpSource::peer().ipv6_prefix(0).is_err());
        assert!(ClientIpSource::peer().ipv6_prefix(129).is_err());
        assert_eq!(
            ClientIpSource::peer()
                .ipv6_prefix(0)
                .unwrap_err()
                .to_string(),
            "IPv6 prefix length 0 is out of range: use 1 to 128 (64 keys one customer network)"
        );
    }

    #[test]
    fn the_peer_comes_from_connect_info_mock_connect_info_or_a_socket_addr() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:4000".parse().unwrap();
        let mut req = Request::new(());
        assert_eq!(ClientIpSource::peer().client_ip(&req), None);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(mapped));
        assert_eq!(
            ClientIpSource::peer().client_ip(&req),
            Some(ip("192.0.2.1"))
        );
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(axum::extract::connect_info::MockConnectInfo(mapped));
        assert_eq!(
            ClientIpSource::peer().client_ip(&req),
            Some(ip("192.0.2.1"))
        );
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 1], 1)));
        assert_eq!(
            ClientIpSource::peer().client_ip(&req),
            Some(ip("192.0.2.1"))
        );
    }

    #[test]
    fn forwarding_headers_are_ignored_by_default() {
        let mut req = Request::builder()
            .header("x-forwarded-for", "203.0.113.9")
            .header("forwarded", "for=203.0.113.9")
            .header("x-real-ip", "203.0.113.9")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 1], 1)));
        let c = ClientIpSource::peer();
        assert_eq!(c.client_ip(&req), Some(ip("192.0.2.1")));
        // And it warned (once) that a forwarding header arrived with no proxy trusted.
        assert!(c.warned_untrusted_header.load(Ordering::Relaxed));
    }

    #[test]
    fn either_forwarding_header_alone_warns_and_no_other_does() {
        let warns = |names: &[&'static str]| {
            let mut req = Request::new(());
            for name in names {
                req.headers_mut().append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static("203.0.113.9"),
                );
            }
            req.extensions_mut()
                .insert(SocketAddr::from(([192, 0, 2, 1], 1)));
            let c = ClientIpSource::peer();
            assert_eq!(c.client_ip(&req), Some(ip("192.0.2.1")));
            c.warned_untrusted_header.load(Ordering::Relaxed)
        };
        let others = [
            "host",
            "x-real-ip",
            "x-forwarded-host",
            "forwarded-for",
            "cookie",
        ];
        assert!(!warns(&[]));
        assert!(!warns(&others));
        for header in ["x-forwarded-for", "forwarded"] {
            assert!(warns(&[header]), "{header}");
            // Wherever it comes among the others.
            let mut names = others.to_vec();
            names.insert(2, header);
            assert!(warns(&names), "{header} among others");
        }
    }

    #[test]
    fn client_ip_from_the_request() {
        let mut req = Request::builder()
            .header("x-forwarded-for", "2001:db8:aa:bb:1::1")
            .body(())
            .unwrap();
        let c = ClientIpSource::peer().trust_proxies([net("127.0.0.0/8")]);
        assert_eq!(c.client_ip(&req), None);
        req.extensions_mut()
            .insert(SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(c.client_ip(&req), Some(ip("2001:db8:aa:bb::")));
    }

    #[test]
    fn permissive_or_useless_settings_are_warned_about() {
        assert_eq!(ClientIpSource::peer().warnings(), []);
        assert_eq!(
            ClientIpSource::peer()
                .trust_proxies([net("10.0.0.0/8")])
                .warnings(),
            []
        );
        let everyone = ClientIpSource::peer().trust_proxies([net("10.0.0.0/8"), net("0.0.0.0/0")]);
        assert_eq!(
            everyone.warnings(),
            [ClientIpWarning::TrustsEveryone(net("0.0.0.0/0"))]
        );
        let v6 = ClientIpSource::peer().trust_proxies([net("::/0")]);
        assert!(
            v6.warnings()[0]
                .to_string()
                .contains("covers every address")
        );
        let real_ip = HeaderName::from_static("x-real-ip");
        let hops = ClientIpSource::peer()
            .trust_hops(1)
            .header(ForwardedHeader::Single(real_ip.clone()));
        assert_eq!(
            hops.warnings(),
            [ClientIpWarning::HopsWithSingleHeader(real_ip.clone())]
        );
        let unread = ClientIpSource::peer().header(ForwardedHeader::Single(real_ip));
        assert_eq!(
            unread.warnings(),
            [ClientIpWarning::HeaderWithoutTrust("x-real-ip".into())]
        );
        assert_eq!(
            ClientIpSource::peer()
                .header(ForwardedHeader::Forwarded)
                .warnings()
                .len(),
            1
        );
    }

    #[test]
    fn header_names_parse_in_any_case() {
        for (text, want) in [
            ("X-Forwarded-For", ForwardedHeader::XForwardedFor),
            ("x-forwarded-for", ForwardedHeader::XForwardedFor),
            (" FORWARDED ", ForwardedHeader::Forwarded),
            (
                "CF-Connecting-IP",
                ForwardedHeader::Single(HeaderName::from_static("cf-connecting-ip")),
            ),
        ] {
            assert_eq!(text.parse::<ForwardedHeader>().unwrap(), want, "{text}");
        }
        assert!("not a header".parse::<ForwardedHeader>().is_err());
    }

    fn header_bytes(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn an_unclosed_quote_cannot_swallow_what_the_proxy_appended() {
        // The client sent `Forwarded: for=9.9.9.9;x="`; its proxy appended its own element on
        // the same line. Read left to right, the quote would swallow the proxy's element and
        // the client would choose its key.
        let c = ClientIpSource::peer()
            .trust_proxies([net("10.0.0.0/8")])
            .header(ForwardedHeader::Forwarded);
        for line in [
            "for=9.9.9.9;x=\", for=198.51.100.1",
            "for=9.9.9.9;x=\", for=\"198.51.100.1:4711\"",
            "x=\"\\\", for=198.51.100.1",
            "for=9.9.9.9;x=\"a, for=6.6.6.6\", for=198.51.100.1",
            "\", for=198.51.100.1",
            "for=\"[2001:db8::1]:80, for=198.51.100.1",
        ] {
            let h = headers(&[("forwarded", line)]);
            assert_eq!(c.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"), "{line}");
        }
        // The broken element is one opaque hop; elements to its right still count.
        assert_eq!(
            parse_forwarded("for=9.9.9.9;x=\", for=198.51.100.1"),
            [Hop::Opaque, Hop::Ip(ip("198.51.100.1"))]
        );
        // A quoted comma inside a well-formed element is still not a separator.
        assert_eq!(
            parse_forwarded("for=192.0.2.1;host=\"a, for=6.6.6.6\", for=198.51.100.1"),
            [Hop::Ip(ip("192.0.2.1")), Hop::Ip(ip("198.51.100.1"))]
        );
        // Two `for`s in one element name no one.
        assert_eq!(parse_forwarded("for=1.1.1.1;for=2.2.2.2"), [Hop::Opaque]);
    }

    #[test]
    fn forwarded_escapes_and_broken_pairs() {
        // A quoted address may be written with escapes (nothing needs them, but it is valid).
        assert_eq!(
            parse_forwarded("for=\"\\1\\98.51.100.1\""),
            [Hop::Ip(ip("198.51.100.1"))]
        );
        assert_eq!(
            parse_forwarded("for=\"[2001:db8::\\1]:80\""),
            [Hop::Ip(ip("2001:db8::1"))]
        );
        // A trailing backslash leaves the string unclosed.
        assert_eq!(parse_forwarded("for=\"1.2.3.4\\"), [Hop::Opaque]);
        // A pair needs a name and an `=`: an element with a broken pair names no one, even if
        // it also has a `for`.
        for element in [
            "=x;for=198.51.100.1",
            "for;proto=http",
            "proto;for=198.51.100.1",
        ] {
            assert_eq!(parse_forwarded(element), [Hop::Opaque], "{element}");
        }
        // Whitespace around pairs and empty pairs are fine.
        assert_eq!(
            parse_forwarded(" for=198.51.100.1 ;; proto=https ; "),
            [Hop::Ip(ip("198.51.100.1"))]
        );
    }

    /// Captures what `tracing` writes on this thread while `f` runs.
    fn logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = lines.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    #[cfg(feature = "tracing")]
    fn forwarding_headers_without_a_trusted_proxy_are_said_once_each_kind() {
        for name in ["x-forwarded-for", "forwarded"] {
            let c = ClientIpSource::peer();
            let h = headers(&[(name, "for=203.0.113.9")]);
            let lines = logged(|| {
                for _ in 0..5 {
                    assert_eq!(c.resolve(ip("192.0.2.1"), &h), ip("192.0.2.1"));
                }
                // No header, no warning.
                let _ = ClientIpSource::peer().resolve(ip("192.0.2.1"), &HeaderMap::new());
            });
            let warned: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains("rate-limit-misconfigured"))
                .collect();
            assert_eq!(warned.len(), 1, "{name}: {lines:#?}");
            assert!(warned[0].contains("WARN"), "{}", warned[0]);
        }
    }

    #[test]
    #[cfg(feature = "tracing")]
    fn permissive_settings_are_logged_when_a_layer_uses_them() {
        let lines = logged(|| {
            ClientIpSource::peer()
                .trust_proxies([net("0.0.0.0/0")])
                .log_warnings("rate limiter");
            ClientIpSource::peer().log_warnings("rate limiter");
        });
        let warned: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("rate-limit-misconfigured"))
            .collect();
        assert_eq!(warned.len(), 1, "{lines:#?}");
        assert!(warned[0].contains("covers every address"), "{}", warned[0]);
    }

    #[test]
    fn a_byte_that_is_not_ascii_spoils_only_its_own_entry() {
        // nginx's $proxy_add_x_forwarded_for joins the client's value and the address it saw on
        // one line; hyper accepts bytes 0x80-0xFF.
        let xff = ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")]);
        let h = header_bytes(&[("x-forwarded-for", b"\xff, 198.51.100.1")]);
        assert_eq!(xff.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        let h = header_bytes(&[("x-forwarded-for", b"1.1.1.1\xe9, 198.51.100.1, 10.0.0.7")]);
        assert_eq!(xff.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        let fwd = xff.clone().header(ForwardedHeader::Forwarded);
        let h = header_bytes(&[("forwarded", b"for=\xff;x=\"\xfe, for=198.51.100.1")]);
        assert_eq!(fwd.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        // A bad byte where the client should be: the proxy that reported it is the key.
        let h = header_bytes(&[("x-forwarded-for", b"198.51.100.1, \xff, 10.0.0.5")]);
        assert_eq!(xff.resolve(ip("10.0.0.2"), &h), ip("10.0.0.5"));
    }

    #[test]
    fn a_chain_of_trusted_hops_is_read_to_max_hops_at_most() {
        let c = ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")]);
        let mut entries: Vec<String> = (0..MAX_HOPS + 10)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        entries.insert(0, "198.51.100.1".into());
        let h = headers(&[("x-forwarded-for", &entries.join(", "))]);
        // The MAX_HOPS-th from the right.
        let want = &entries[entries.len() - MAX_HOPS];
        assert_eq!(c.resolve(ip("10.0.0.2"), &h), ip(want));
    }

    /// What a client may write in a header value: every byte hyper accepts, with the ones that
    /// matter to the parsers (quotes, separators, escapes, `for=`) made likely.
    fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                4 => prop_oneof![
                    Just(b'"'), Just(b','), Just(b';'), Just(b'='), Just(b'\\'), Just(b' '),
                    Just(b'['), Just(b']'), Just(b':'),
                ],
                2 => 0x21u8..0x7f,
                1 => 0x80u8..=0xff,
                1 => Just(b'\t'),
            ],
            0..40,
        )
        .prop_flat_map(|bytes| {
            prop_oneof![
                Just(bytes.clone()),
                Just([b"for=9.9.9.9;x=\"".as_slice(), &bytes].concat()),
                Just([bytes.as_slice(), b", for=\"6.6.6.6\""].concat()),
            ]
        })
    }

    /// An address as a proxy writes it in each header, with or without a port.
    fn written(addr: IpAddr, port: Option<u16>, forwarded: bool) -> String {
        match (addr, port, forwarded) {
            (IpAddr::V4(a), None, false) => a.to_string(),
            (IpAddr::V4(a), Some(p), false) => format!("{a}:{p}"),
            (IpAddr::V6(a), None, false) => a.to_string(),
            (IpAddr::V6(a), Some(p), false) => format!("[{a}]:{p}"),
            (IpAddr::V4(a), None, true) => format!("for={a}"),
            (IpAddr::V4(a), Some(p), true) => format!("for=\"{a}:{p}\";proto=https"),
            (IpAddr::V6(a), None, true) => format!("For=\"[{a}]\""),
            (IpAddr::V6(a), Some(p), true) => format!("for=\"[{a}]:{p}\";by=_lb"),
        }
    }

    proptest! {
        /// The trusted-peer property: whatever a client writes to the left of what trusted
        /// proxies appended (in its own header lines, or on the line a proxy appended to)
        /// never changes the key. For both chain headers and both kinds of trust.
        #[test]
        fn client_text_left_of_the_proxies_never_changes_the_key(
            client_lines in proptest::collection::vec(client_bytes(), 0..3),
            client in any::<IpAddr>(),
            proxies in proptest::collection::vec((0u8..255, any::<bool>()), 0..3),
            port in proptest::option::of(1u16..),
            merge in any::<bool>(),
            forwarded in any::<bool>(),
        ) {
            let client = client.to_canonical();
            let trusted_v4 = net("10.0.0.0/8");
            let trusted_v6 = net("fd00::/8");
            prop_assume!(!trusted_v4.contains(&client) && !trusted_v6.contains(&client));
            // What the proxies appended, left to right: the client first, then each proxy
            // that passed the request on.
            let mut appended = vec![written(client, port, forwarded)];
            for &(p, v6) in &proxies {
                let addr: IpAddr = if v6 { ip(&format!("fd00::{p}")) } else { ip(&format!("10.0.0.{p}")) };
                appended.push(written(addr, None, forwarded));
            }
            let appended = appended.join(", ");
            let mut lines: Vec<Vec<u8>> = client_lines;
            match lines.last_mut() {
                // nginx-style: the proxy joined the client's value and its own on one line.
                Some(last) if merge => last.extend_from_slice(format!(", {appended}").as_bytes()),
                _ => lines.push(appended.into_bytes()),
            }
            let name = if forwarded { "forwarded" } else { "x-forwarded-for" };
            let mut h = HeaderMap::new();
            for line in &lines {
                h.append(HeaderName::from_static(name), HeaderValue::from_bytes(line).unwrap());
            }
            let header = if forwarded { ForwardedHeader::Forwarded } else { ForwardedHeader::XForwardedFor };
            let by_range = ClientIpSource::peer().trust_proxies([trusted_v4, trusted_v6]).header(header.clone());
            prop_assert_eq!(by_range.resolve(ip("10.9.9.9"), &h), client);
            let by_hops = ClientIpSource::peer().trust_hops(1 + proxies.len()).header(header);
            prop_assert_eq!(by_hops.resolve(ip("10.9.9.9"), &h), client);
        }
    }

    fn any_header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[ -~]{0,80}",
            proptest::collection::vec(
                prop_oneof![
                    any::<IpAddr>().prop_map(|i| i.to_string()),
                    any::<std::net::SocketAddr>().prop_map(|s| s.to_string()),
                    Just("unknown".to_owned()),
                    Just("\"_x\"".to_owned()),
                    "[ -~]{0,12}",
                ],
                0..6
            )
            .prop_map(|v| v.join(", ")),
        ]
    }

    proptest! {
        /// With an untrusted peer, no header content changes the key.
        #[test]
        fn an_untrusted_peer_cannot_choose_its_key(
            peer in any::<IpAddr>(),
            xff in any_header_value(),
            fwd in any_header_value(),
            real in any_header_value(),
        ) {
            let peer = peer.to_canonical();
            let mut h = HeaderMap::new();
            for (name, v) in [("x-forwarded-for", &xff), ("forwarded", &fwd), ("x-real-ip", &real)] {
                if let Ok(v) = v.parse() {
                    h.append(HeaderName::from_static(name), v);
                }
            }
            let configs = [
                ClientIpSource::peer(),
                ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")]),
                ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")]).header(ForwardedHeader::Forwarded),
                ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")])
                    .header(ForwardedHeader::Single(HeaderName::from_static("x-real-ip"))),
            ];
            prop_assume!(!net("10.0.0.0/8").contains(&peer));
            for c in &configs {
                prop_assert_eq!(c.resolve(peer, &h), peer);
            }
        }

        /// With a trusted peer, the client is never an address left of an untrusted one: what
        /// a client wrote before the first proxy is never believed.
        #[test]
        fn spoofed_prefixes_are_never_believed(
            spoofed in proptest::collection::vec(any_header_value(), 0..3),
            client in any::<std::net::Ipv4Addr>(),
            proxies in proptest::collection::vec(0u8..255, 0..3),
        ) {
            let client = IpAddr::V4(client);
            prop_assume!(!net("10.0.0.0/8").contains(&client));
            let mut entries: Vec<String> = spoofed;
            entries.push(client.to_string());
            entries.extend(proxies.iter().map(|p| format!("10.0.0.{p}")));
            let h = headers_lossy(&entries.join(", "));
            let c = ClientIpSource::peer().trust_proxies([net("10.0.0.0/8")]);
            prop_assert_eq!(c.resolve(ip("10.9.9.9"), &h), client);
        }

        /// Parsing never panics on any bytes.
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            let _ = parse_forwarded(&s);
            let _ = parse_xff(&s);
            let _ = parse_node(s.as_bytes());
        }
    }

    fn headers_lossy(xff: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = xff.parse() {
            h.insert(X_FORWARDED_FOR, v);
        }
        h
    }
}
