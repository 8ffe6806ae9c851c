//! Fuzzes client-IP resolution with arbitrary forwarding headers.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::{ClientIp, ForwardedHeader};

fuzz_target!(|data: &[u8]| {
    // Split the input into three header values.
    let mut parts = data.splitn(3, |&b| b == 0);
    let mut headers = HeaderMap::new();
    for name in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        if let Some(Ok(v)) = parts.next().map(HeaderValue::from_bytes) {
            headers.append(HeaderName::from_static(name), v);
        }
    }
    let trusted: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let untrusted: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
    let ranges = ["10.0.0.0/8".parse().expect("cidr")];
    for header in [
        ForwardedHeader::XForwardedFor,
        ForwardedHeader::Forwarded,
        ForwardedHeader::Single(HeaderName::from_static("x-real-ip")),
    ] {
        let by_range = ClientIp::peer().trust_proxies(ranges).header(header.clone());
        let _ = by_range.resolve(trusted, &headers);
        assert_eq!(by_range.resolve(untrusted, &headers), untrusted);
        let by_hops = ClientIp::peer().trust_hops(2).header(header);
        let _ = by_hops.resolve(trusted, &headers);
    }
    assert_eq!(ClientIp::peer().resolve(untrusted, &headers), untrusted);
});
