//! The layers' own answers to gRPC calls. A gRPC client reads the call's outcome from
//! `grpc-status`, not from the HTTP status, so an HTTP 429 reaches it as a protocol error. When
//! the request's `content-type` is `application/grpc` (or `application/grpc+proto`, ...), the
//! layer answers in the gRPC way instead: a *trailers-only* response (HTTP 200, no body, the
//! status in the headers) with
//!
//! - `grpc-status`: 8 `RESOURCE_EXHAUSTED` for a rate or concurrency limit (and a request that
//!   costs more than the burst), 14 `UNAVAILABLE` for the 503 of a fail-closed policy, 13
//!   `INTERNAL` for the 500 of a refused keyless request;
//! - `grpc-message`: what happened, percent-encoded as the gRPC spec requires;
//! - the retry delay, when there is one, twice: `grpc-retry-pushback-ms` (what gRPC's own
//!   retry policies obey, gRFC A6) and `grpc-status-details-bin`, a `google.rpc.Status` whose
//!   details hold a `google.rpc.RetryInfo` (what `tonic-types`, grpc-java's `StatusProto`,
//!   grpc-go's `status.Details` read);
//! - every header the HTTP answer had (`Retry-After`, `RateLimit`, `RateLimit-Policy`).

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
static GRPC_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
static GRPC_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// gRPC status codes the layers answer with.
const RESOURCE_EXHAUSTED: u8 = 8;
const INTERNAL: u8 = 13;
const UNAVAILABLE: u8 = 14;
const UNKNOWN: u8 = 2;

/// Whether the request is a gRPC call: a `POST` (gRPC never uses another method) whose
/// content type is `application/grpc`, alone or with a `+codec` or parameters. gRPC-Web
/// (`application/grpc-web`) is not: its clients read HTTP statuses. Requiring `POST` means a
/// `GET` can never turn a refusal into a 200 that a shared cache might keep.
pub(crate) fn is_grpc<B>(request: &Request<B>) -> bool {
    request.method() == Method::POST && is_grpc_content(request.headers())
}

fn is_grpc_content(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let v = value.as_bytes();
    let prefix = b"application/grpc";
    v.len() >= prefix.len()
        && v[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(v.get(prefix.len()), None | Some(b'+' | b';'))
}

/// The layer's own answer `res`, in the gRPC form when the request is a gRPC call (`grpc`,
/// from [`is_grpc`]): `what` says what happened (the `grpc-message`), `retry` how long the
/// client should wait before it tries again, when it may.
pub(crate) fn own_answer(
    grpc: bool,
    res: Response<Bytes>,
    what: &str,
    retry: Option<Duration>,
) -> Response<Bytes> {
    if grpc {
        trailers_only(res, what, retry)
    } else {
        res
    }
}

/// The gRPC code of the layers' HTTP answers: limits (429, and 413 for a cost above the
/// burst) exhaust a resource, a store that is down (503) makes the service unavailable, a
/// refused keyless request (500) is internal.
fn code_of(status: StatusCode) -> u8 {
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => RESOURCE_EXHAUSTED,
        StatusCode::SERVICE_UNAVAILABLE => UNAVAILABLE,
        StatusCode::INTERNAL_SERVER_ERROR => INTERNAL,
        _ => UNKNOWN,
    }
}

/// `res` as a trailers-only gRPC response.
fn trailers_only(res: Response<Bytes>, what: &str, retry: Option<Duration>) -> Response<Bytes> {
    let (mut parts, _) = res.into_parts();
    let code = code_of(parts.status);
    let mut message = String::from(what);
    let retry_ms = retry.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if let Some(ms) = retry_ms {
        let _ = write!(message, "; retry after {ms} ms");
    }
    parts.status = StatusCode::OK;
    let headers = &mut parts.headers;
    headers.remove(CONTENT_LENGTH);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    // A refusal, though its HTTP status is 200: never to be kept by a cache.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(GRPC_STATUS.clone(), HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert(GRPC_MESSAGE.clone(), v);
    }
    if let (Some(ms), Some(delay)) = (retry_ms, retry) {
        headers.insert(GRPC_PUSHBACK.clone(), HeaderValue::from(ms));
        let details = status_with_retry_info(code, &message, delay);
        if let Ok(v) = HeaderValue::from_str(&base64(&details)) {
            headers.insert(GRPC_DETAILS.clone(), v);
        }
    }
    Response::from_parts(parts, Bytes::new())
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A `google.rpc.Status { code, message, details: [Any(google.rpc.RetryInfo { retry_delay })] }`
/// in protobuf's wire format.
fn status_with_retry_info(code: u8, message: &str, delay: Duration) -> Vec<u8> {
    // google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2; }
    let mut duration = Vec::new();
    let seconds = delay.as_secs();
    if seconds > 0 {
        varint_field(&mut duration, 1, seconds);
    }
    if delay.subsec_nanos() > 0 {
        varint_field(&mut duration, 2, u64::from(delay.subsec_nanos()));
    }
    // google.rpc.RetryInfo { google.protobuf.Duration retry_delay = 1; }
    let mut retry_info = Vec::new();
    bytes_field(&mut retry_info, 1, &duration);
    // google.protobuf.Any { string type_url = 1; bytes value = 2; }
    let mut any = Vec::new();
    bytes_field(&mut any, 1, b"type.googleapis.com/google.rpc.RetryInfo");
    bytes_field(&mut any, 2, &retry_info);
    // google.rpc.Status { int32 code = 1; string message = 2; repeated Any details = 3; }
    let mut status = Vec::new();
    varint_field(&mut status, 1, u64::from(code));
    bytes_field(&mut status, 2, message.as_bytes());
    bytes_field(&mut status, 3, &any);
    status
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Standard base64 without padding, as gRPC emits binary headers.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: Method, content_type: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .header(CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    fn grpc_call(content_type: &str) -> bool {
        is_grpc(&call(Method::POST, content_type))
    }

    #[test]
    fn grpc_calls_are_told_from_other_requests_by_their_content_type() {
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "Application/GRPC",
            "application/grpc;charset=utf-8",
        ] {
            assert!(grpc_call(grpc), "{grpc}");
        }
        for other in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/json",
            "application/grp",
            "text/plain",
            "",
        ] {
            assert!(!grpc_call(other), "{other}");
        }
        assert!(!is_grpc(&Request::post("/").body(()).unwrap()));
        // gRPC is always POST: a GET with that content type gets the HTTP answer, so no
        // client can make a refusal a cacheable 200.
        assert!(!is_grpc(&call(Method::GET, "application/grpc")));
    }

    #[test]
    fn other_requests_get_the_http_answer_unchanged() {
        let res = crate::response::text_response(StatusCode::TOO_MANY_REQUESTS, "Too Many\n");
        let out = own_answer(
            grpc_call("application/json"),
            res,
            "limited",
            Some(Duration::from_secs(1)),
        );
        assert_eq!(out.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(out.body().as_ref(), b"Too Many\n");
        assert!(!out.headers().contains_key("grpc-status"));
    }

    #[test]
    fn a_limited_call_is_resource_exhausted_with_its_retry_delay() {
        let mut res = crate::response::text_response(StatusCode::TOO_MANY_REQUESTS, "Too Many\n");
        res.headers_mut()
            .insert("retry-after", HeaderValue::from_static("2"));
        let out = own_answer(
            grpc_call("application/grpc"),
            res,
            "rate limit exceeded",
            Some(Duration::from_millis(1_500)),
        );
        assert_eq!(out.status(), StatusCode::OK);
        assert!(out.body().is_empty());
        let h = out.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(
            h["grpc-message"],
            "rate limit exceeded; retry after 1500 ms"
        );
        assert_eq!(h["grpc-retry-pushback-ms"], "1500");
        assert_eq!(h["retry-after"], "2", "the HTTP answer's headers are kept");
        assert_eq!(h["cache-control"], "no-store");
        assert!(!h.contains_key("content-length"));
    }

    #[test]
    fn statuses_map_to_grpc_codes() {
        for (status, code) in [
            (StatusCode::TOO_MANY_REQUESTS, "8"),
            (StatusCode::PAYLOAD_TOO_LARGE, "8"),
            (StatusCode::SERVICE_UNAVAILABLE, "14"),
            (StatusCode::INTERNAL_SERVER_ERROR, "13"),
            (StatusCode::FORBIDDEN, "2"),
        ] {
            let res = crate::response::text_response(status, "x\n");
            let out = own_answer(grpc_call("application/grpc"), res, "refused", None);
            assert_eq!(out.headers()["grpc-message"], "refused");
            assert_eq!(out.headers()["grpc-status"], code, "{status}");
            assert!(!out.headers().contains_key("grpc-retry-pushback-ms"));
            assert!(!out.headers().contains_key("grpc-status-details-bin"));
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b"), "a b");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn base64_matches_rfc_4648_vectors_unpadded() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4");
    }

    #[test]
    fn the_status_details_are_protobuf() {
        // google.rpc.Status { code: 8, message: "m", details: [Any { RetryInfo { 1.5 s } }] }
        let got = status_with_retry_info(8, "m", Duration::from_millis(1_500));
        let duration = [0x08, 0x01, 0x10, 0x80, 0xCA, 0xB5, 0xEE, 0x01];
        let mut retry_info = vec![0x0A, duration.len() as u8];
        retry_info.extend_from_slice(&duration);
        let url = b"type.googleapis.com/google.rpc.RetryInfo";
        let mut any = vec![0x0A, url.len() as u8];
        any.extend_from_slice(url);
        any.extend_from_slice(&[0x12, retry_info.len() as u8]);
        any.extend_from_slice(&retry_info);
        let mut want = vec![0x08, 0x08, 0x12, 0x01, b'm', 0x1A, any.len() as u8];
        want.extend_from_slice(&any);
        assert_eq!(got, want);
    }
}
