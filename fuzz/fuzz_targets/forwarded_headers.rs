//! Fuzzes client-IP resolution with arbitrary forwarding headers, and checks the trusted-peer
//! property: no bytes a client writes to the left of what trusted proxies appended change the
//! key.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::{ClientIpSource, ForwardedHeader};

/// The client the proxies saw, and the proxy that appended it.
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const TRUSTED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
const UNTRUSTED: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));

fuzz_target!(|data: &[u8]| {
    let ranges = ["10.0.0.0/8".parse().expect("cidr")];

    // 1. Arbitrary values in every header: never a panic, and an untrusted peer is its own key.
    let mut parts = data.splitn(3, |&b| b == 0);
    let mut headers = HeaderMap::new();
    for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        if let Some(Ok(v)) = parts.next().map(HeaderValue::from_bytes) {
            headers.append(HeaderName::from_static(name), v);
        }
    }
    for header in [
        ForwardedHeader::XForwardedFor,
        ForwardedHeader::Forwarded,
        ForwardedHeader::Single(HeaderName::from_static("x-real-ip")),
    ] {
        let by_range = ClientIpSource::peer().trust_proxies(ranges).header(header.clone());
        let _ = by_range.resolve(TRUSTED, &headers);
        assert_eq!(by_range.resolve(UNTRUSTED, &headers), UNTRUSTED);
        let by_hops = ClientIpSource::peer().trust_hops(2).header(header);
        let _ = by_hops.resolve(TRUSTED, &headers);
    }
    assert_eq!(ClientIpSource::peer().resolve(UNTRUSTED, &headers), UNTRUSTED);

    // 2. The whole input is what the client wrote; a trusted proxy then appended the client it
    //    saw, on the same line (nginx's $proxy_add_x_forwarded_for) or on a line of its own.
    for (name, header, appended) in [
        ("x-forwarded-for", ForwardedHeader::XForwardedFor, "198.51.100.7, 10.0.0.2"),
        (
            "forwarded",
            ForwardedHeader::Forwarded,
            "for=198.51.100.7;proto=https, for=\"10.0.0.2:443\"",
        ),
    ] {
        let by_range = ClientIpSource::peer().trust_proxies(ranges).header(header.clone());
        let by_hops = ClientIpSource::peer().trust_hops(2).header(header);
        let merged = [data, b", ", appended.as_bytes()].concat();
        let mut one_line = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&merged) {
            one_line.append(HeaderName::from_static(name), v);
            assert_eq!(by_range.resolve(TRUSTED, &one_line), CLIENT);
            assert_eq!(by_hops.resolve(TRUSTED, &one_line), CLIENT);
        }
        let mut own_lines = HeaderMap::new();
        for line in data.split(|&b| b == b'\n') {
            if let Ok(v) = HeaderValue::from_bytes(line) {
                own_lines.append(HeaderName::from_static(name), v);
            }
        }
        own_lines.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(appended),
        );
        assert_eq!(by_range.resolve(TRUSTED, &own_lines), CLIENT);
        assert_eq!(by_hops.resolve(TRUSTED, &own_lines), CLIENT);
    }
});
