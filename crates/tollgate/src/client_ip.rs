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
//! use tollgate::ClientIp;
//!
//! // Behind a load balancer in 10.0.0.0/8: read X-Forwarded-For from it, and only from it.
//! let behind_lb = ClientIp::peer().trust_proxies(["10.0.0.0/8".parse().unwrap()]);
//!
//! // Behind Cloudflare: it overwrites CF-Connecting-IP, and the peer must be Cloudflare.
//! # let cloudflare_ranges: Vec<ipnet::IpNet> = vec!["173.245.48.0/20".parse().unwrap()];
//! let behind_cdn = ClientIp::peer()
//!     .trust_proxies(cloudflare_ranges)
//!     .header(tollgate::ForwardedHeader::Single(http::HeaderName::from_static("cf-connecting-ip")));
//! # let _ = (behind_lb, behind_cdn);
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
pub struct ClientIp {
    trust: Trust,
    header: ForwardedHeader,
    ipv6_prefix: u8,
    warned_untrusted_header: Arc<AtomicBool>,
}

impl Default for ClientIp {
    fn default() -> Self {
        ClientIp::peer()
    }
}

impl ClientIp {
    /// The socket peer, and nothing a client can write.
    pub fn peer() -> Self {
        ClientIp {
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
                        let chain = chain(headers, chain_header);
                        rightmost_untrusted(&chain, peer, trusted)
                    }
                }
            }
            Trust::Hops(hops) => match &self.header {
                ForwardedHeader::Single(name) => single(headers, name).unwrap_or(peer),
                chain_header => {
                    let chain = chain(headers, chain_header);
                    // Too few entries: the request did not come through the proxies.
                    match chain.len().checked_sub(*hops) {
                        Some(i) => nearest_ip(&chain, i).unwrap_or(peer),
                        None => peer,
                    }
                }
            },
        }
    }

    /// Keys IPv6 on its prefix; IPv4 (mapped ones included, already canonical) as is.
    pub fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) if self.ipv6_prefix < 128 => {
                let bits = u128::from(v6);
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
            other => other,
        }
    }

    /// One warning per `ClientIp` when forwarding headers arrive while no proxy is trusted:
    /// either the service is behind a proxy that is not configured (every client then shares
    /// the proxy's key), or clients are trying to spoof.
    fn warn_if_forwarded(&self, headers: &HeaderMap) {
        if self.warned_untrusted_header.load(Ordering::Relaxed) {
            return;
        }
        let forwarded = headers.contains_key(X_FORWARDED_FOR) || headers.contains_key(FORWARDED);
        if forwarded && !self.warned_untrusted_header.swap(true, Ordering::Relaxed) {
            #[cfg(feature = "tracing")]
            tracing::warn!(
                "rate-limit-misconfigured: a request carries X-Forwarded-For or Forwarded but no \
                 proxy is trusted, so clients are keyed on the socket peer. Behind a proxy, every \
                 client then shares the proxy's budget: name it with ClientIp::trust_proxies \
                 (demo: --trusted-proxy CIDR). If there is no proxy, ignore this: the header is \
                 not trusted. (Logged once.)"
            );
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

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
/// started inside the trusted network: its leftmost address is the client.
fn rightmost_untrusted(chain: &[Hop], peer: IpAddr, trusted: impl Fn(&IpAddr) -> bool) -> IpAddr {
    let mut reporter = peer;
    for hop in chain.iter().rev() {
        match hop {
            Hop::Ip(ip) if trusted(ip) => reporter = *ip,
            Hop::Ip(ip) => return *ip,
            Hop::Opaque => return reporter,
        }
    }
    reporter
}

/// The address at `i`, or, if that hop is opaque, the nearest address to its right (the proxy
/// that reported it).
fn nearest_ip(chain: &[Hop], i: usize) -> Option<IpAddr> {
    chain.get(i..)?.iter().find_map(|hop| match hop {
        Hop::Ip(ip) => Some(*ip),
        Hop::Opaque => None,
    })
}

fn single(headers: &HeaderMap, name: &HeaderName) -> Option<IpAddr> {
    let value = headers.get_all(name).iter().next_back()?;
    match parse_node(value.to_str().ok()?.trim()) {
        Hop::Ip(ip) => Some(ip),
        Hop::Opaque => None,
    }
}

/// Every hop of the chain header, left to right, several header lines joined in order.
pub(crate) fn chain(headers: &HeaderMap, header: &ForwardedHeader) -> Vec<Hop> {
    let mut hops = Vec::new();
    match header {
        ForwardedHeader::XForwardedFor => {
            for line in headers.get_all(X_FORWARDED_FOR) {
                let Ok(line) = line.to_str() else {
                    // Not visible ASCII: one opaque hop, so it cannot be skipped silently.
                    hops.push(Hop::Opaque);
                    continue;
                };
                hops.extend(parse_xff(line));
            }
        }
        ForwardedHeader::Forwarded => {
            for line in headers.get_all(FORWARDED) {
                let Ok(line) = line.to_str() else {
                    hops.push(Hop::Opaque);
                    continue;
                };
                hops.extend(parse_forwarded(line));
            }
        }
        ForwardedHeader::Single(_) => {}
    }
    hops
}

/// `X-Forwarded-For: 203.0.113.7, 2001:db8::1, 198.51.100.2:4711` — addresses, optionally with
/// ports; IPv6 bare or bracketed. Empty entries are ignored; anything else unreadable is opaque.
pub(crate) fn parse_xff(line: &str) -> impl Iterator<Item = Hop> + '_ {
    line.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(parse_node)
}

/// RFC 7239 `Forwarded`: the `for=` of each element; an element without `for` is opaque.
pub(crate) fn parse_forwarded(line: &str) -> Vec<Hop> {
    split_outside_quotes(line, ',')
        .into_iter()
        .filter(|element| !element.trim().is_empty())
        .map(|element| {
            split_outside_quotes(element, ';')
                .into_iter()
                .find_map(|pair| {
                    let (name, value) = pair.split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| parse_node(unquote(value.trim())))
                })
                .unwrap_or(Hop::Opaque)
        })
        .collect()
}

/// Splits on `sep` where it is not inside a quoted string (which may hold escaped quotes).
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// A node: `192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]`, `[2001:db8::1]:80`, `2001:db8::1`;
/// `unknown`, `_obfuscated` and anything else are opaque. Mapped IPv4 is made IPv4.
pub(crate) fn parse_node(node: &str) -> Hop {
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
        let got: Vec<Hop> =
            parse_xff(" 203.0.113.7 ,2001:db8::1, 198.51.100.2:4711,[2001:db8::2]:80,, junk, ::ffff:192.0.2.9").collect();
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
            let c = ClientIp::peer().trust_proxies(ranges.iter().map(|r| net(r)));
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
        let c = ClientIp::peer()
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
        let one = ClientIp::peer().trust_hops(1);
        let two = ClientIp::peer().trust_hops(2);
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
            ClientIp::peer().trust_hops(0).resolve(ip("10.0.0.2"), &h),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn single_ip_headers_only_when_named_and_from_a_trusted_peer() {
        let real_ip = HeaderName::from_static("x-real-ip");
        let c = ClientIp::peer()
            .trust_proxies([net("10.0.0.0/8")])
            .header(ForwardedHeader::Single(real_ip));
        let h = headers(&[("x-real-ip", "6.6.6.6"), ("x-real-ip", "198.51.100.1")]);
        assert_eq!(c.resolve(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        assert_eq!(c.resolve(ip("203.0.113.5"), &h), ip("203.0.113.5"));
        let bad = headers(&[("x-real-ip", "nope")]);
        assert_eq!(c.resolve(ip("10.0.0.2"), &bad), ip("10.0.0.2"));
        // Not named: never read.
        let plain = ClientIp::peer().trust_proxies([net("10.0.0.0/8")]);
        let h = headers(&[("x-real-ip", "198.51.100.1")]);
        assert_eq!(plain.resolve(ip("10.0.0.2"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn ipv6_is_keyed_on_its_prefix_and_mapped_ipv4_as_ipv4() {
        let c = ClientIp::peer();
        assert_eq!(c.mask(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(c.mask(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        // Not mapped, even though it is written with a dotted quad.
        assert_eq!(c.mask(ip("2001:db8::1.2.3.4")), ip("2001:db8::"));
        let c56 = ClientIp::peer().ipv6_prefix(56).unwrap();
        assert_eq!(c56.mask(ip("2001:db8:1:2ff::1")), ip("2001:db8:1:200::"));
        let c128 = ClientIp::peer().ipv6_prefix(128).unwrap();
        assert_eq!(c128.mask(ip("2001:db8::1")), ip("2001:db8::1"));
        assert!(ClientIp::peer().ipv6_prefix(0).is_err());
        assert!(ClientIp::peer().ipv6_prefix(129).is_err());
        assert_eq!(
            ClientIp::peer().ipv6_prefix(0).unwrap_err().to_string(),
            "IPv6 prefix length 0 is out of range: use 1 to 128 (64 keys one customer network)"
        );
    }

    #[test]
    fn the_peer_comes_from_connect_info_mock_connect_info_or_a_socket_addr() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:4000".parse().unwrap();
        let mut req = Request::new(());
        assert_eq!(ClientIp::peer().client_ip(&req), None);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(mapped));
        assert_eq!(ClientIp::peer().client_ip(&req), Some(ip("192.0.2.1")));
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(axum::extract::connect_info::MockConnectInfo(mapped));
        assert_eq!(ClientIp::peer().client_ip(&req), Some(ip("192.0.2.1")));
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(SocketAddr::from(([192, 0, 2, 1], 1)));
        assert_eq!(ClientIp::peer().client_ip(&req), Some(ip("192.0.2.1")));
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
        let c = ClientIp::peer();
        assert_eq!(c.client_ip(&req), Some(ip("192.0.2.1")));
        // And it warned (once) that a forwarding header arrived with no proxy trusted.
        assert!(c.warned_untrusted_header.load(Ordering::Relaxed));
    }

    #[test]
    fn client_ip_from_the_request() {
        let mut req = Request::builder()
            .header("x-forwarded-for", "2001:db8:aa:bb:1::1")
            .body(())
            .unwrap();
        let c = ClientIp::peer().trust_proxies([net("127.0.0.0/8")]);
        assert_eq!(c.client_ip(&req), None);
        req.extensions_mut()
            .insert(SocketAddr::from(([127, 0, 0, 1], 1)));
        assert_eq!(c.client_ip(&req), Some(ip("2001:db8:aa:bb::")));
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
                ClientIp::peer(),
                ClientIp::peer().trust_proxies([net("10.0.0.0/8")]),
                ClientIp::peer().trust_proxies([net("10.0.0.0/8")]).header(ForwardedHeader::Forwarded),
                ClientIp::peer().trust_proxies([net("10.0.0.0/8")])
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
            let c = ClientIp::peer().trust_proxies([net("10.0.0.0/8")]);
            prop_assert_eq!(c.resolve(ip("10.9.9.9"), &h), client);
        }

        /// Parsing never panics on any bytes.
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            let _ = parse_forwarded(&s);
            let _ = parse_xff(&s).count();
            let _ = parse_node(&s);
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
