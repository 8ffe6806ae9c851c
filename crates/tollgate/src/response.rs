//! The responses and headers the layer writes.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::{Decision, Quota, QuotaState};

/// Which rate-limit header fields the layer adds to responses (allowed and limited alike).
///
/// `Retry-After` is always sent on 429 and 503 responses, whatever this says.
///
/// # Examples
///
/// What a client of the demo's `GET /hello` (5 per 10 s) is told, on its first request and on
/// the sixth, which is refused:
///
/// ```
/// use std::convert::Infallible;
/// use std::net::SocketAddr;
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::{Request, Response, StatusCode};
/// use http_body_util::Full;
/// use tollgate::clock::ManualClock;
/// use tollgate::{MemoryStore, Policy, Quota, RateLimitHeaders, RateLimitLayer};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryStore::with_clock(ManualClock::new());
/// let hello = Policy::new("hello", Quota::new(5, Duration::from_secs(10))?);
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(store).policy(hello).headers(RateLimitHeaders::Both))
///     .service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())) });
/// let request = || {
///     let mut req = Request::new(());
///     req.extensions_mut().insert(SocketAddr::from(([192, 0, 2, 1], 4000)));
///     req
/// };
///
/// let first = svc.clone().oneshot(request()).await?;
/// assert_eq!(first.headers()["ratelimit-policy"], r#""hello";q=5;w=10"#);
/// assert_eq!(first.headers()["ratelimit"], r#""hello";r=4;t=2"#);
/// assert_eq!(first.headers()["x-ratelimit-limit"], "5");
/// assert_eq!(first.headers()["x-ratelimit-remaining"], "4");
///
/// for _ in 0..4 {
///     svc.clone().oneshot(request()).await?;
/// }
/// let sixth = svc.oneshot(request()).await?;
/// assert_eq!(sixth.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(sixth.headers()["retry-after"], "2");
/// assert_eq!(sixth.headers()["ratelimit"], r#""hello";r=0;t=2"#);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RateLimitHeaders {
    /// `RateLimit-Policy` and `RateLimit` as in draft-ietf-httpapi-ratelimit-headers-10:
    /// `RateLimit-Policy: "hello";q=5;w=10` and `RateLimit: "hello";r=4;t=2` (see the example
    /// above). The default.
    #[default]
    Ietf,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (Unix time in
    /// seconds, as GitHub and express-rate-limit send it), for the binding quota.
    Legacy,
    /// Both of the above.
    Both,
    /// No rate-limit header fields.
    None,
}

impl RateLimitHeaders {
    fn ietf(self) -> bool {
        matches!(self, RateLimitHeaders::Ietf | RateLimitHeaders::Both)
    }

    fn legacy(self) -> bool {
        matches!(self, RateLimitHeaders::Legacy | RateLimitHeaders::Both)
    }

    pub(crate) fn any(self) -> bool {
        self != RateLimitHeaders::None
    }
}

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// A builder of the 429 response: gets the decision, returns the response without the
/// rate-limit headers and `Retry-After`, which the layer adds.
pub(crate) type LimitedResponseFn = Arc<dyn Fn(&Decision) -> Response<Bytes> + Send + Sync>;

/// The default 429: `text/plain` "Too Many Requests".
pub(crate) fn default_limited(_: &Decision) -> Response<Bytes> {
    text_response(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests\n")
}

pub(crate) fn text_response(status: StatusCode, body: &'static str) -> Response<Bytes> {
    let mut res = Response::new(Bytes::from_static(body.as_bytes()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The plain-text body of the layers' own 503 and 500 answers.
pub(crate) fn status_line(status: StatusCode) -> &'static str {
    if status == StatusCode::SERVICE_UNAVAILABLE {
        "Service Unavailable\n"
    } else {
        "Internal Server Error\n"
    }
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` carries.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

pub(crate) fn set_retry_after(headers: &mut HeaderMap, wait: Duration) {
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
}

/// The precomputed header parts of one policy.
#[derive(Debug)]
pub(crate) struct PolicyHeaders {
    /// `RateLimit-Policy`, the same on every response.
    policy: HeaderValue,
    /// Each quota's item of `RateLimit` up to its first number: `"<name>";r=`.
    prefixes: Vec<Box<[u8]>>,
    /// The most bytes a `RateLimit` value of this policy can take.
    capacity: usize,
}

/// The rate-limit header values of one decision. The layer computes them before it calls the
/// inner service, so the decision itself can move into the request's extensions without a
/// copy kept for the response.
#[derive(Debug, Default)]
pub(crate) struct HeaderValues {
    ietf: Option<(HeaderValue, HeaderValue)>,
    /// The binding quota's limit, remaining units and reset (Unix seconds): numbers, not
    /// header values, so that the request future that carries them stays small.
    legacy: Option<(u32, u32, u64)>,
}

impl HeaderValues {
    /// Adds the values to a response's headers.
    pub(crate) fn write(self, headers: &mut HeaderMap) {
        if let Some((policy, ratelimit)) = self.ietf {
            headers.append(RATELIMIT_POLICY.clone(), policy);
            headers.append(RATELIMIT.clone(), ratelimit);
        }
        if let Some((limit, remaining, reset)) = self.legacy {
            headers.insert(X_LIMIT.clone(), HeaderValue::from(limit));
            headers.insert(X_REMAINING.clone(), HeaderValue::from(remaining));
            headers.insert(X_RESET.clone(), HeaderValue::from(reset));
        }
    }
}

/// The `t` of a quota's state (draft-10: seconds until additional quota is made available):
/// for a quota that refused, when the request can be retried, as `Retry-After` says; for the
/// others, when one more unit is available (0 when the quota is full). Rounded up: a client
/// that waits `t` finds the unit there.
fn t_of(state: &QuotaState) -> u64 {
    if state.is_allowed() {
        ceil_secs(state.next_unit_after())
    } else {
        retry_after_secs(state.retry_after())
    }
}

impl PolicyHeaders {
    pub(crate) fn new(name: &str, quotas: &[Quota]) -> Self {
        let items: Vec<String> = if quotas.len() == 1 {
            vec![sf_string(name)]
        } else {
            (1..=quotas.len())
                .map(|i| sf_string(&format!("{name}-{i}")))
                .collect()
        };
        let mut policy = String::new();
        for (item, quota) in items.iter().zip(quotas) {
            if !policy.is_empty() {
                policy.push_str(", ");
            }
            let (q, w) = policy_window(quota);
            // Writing to a String cannot fail.
            let _ = write!(policy, "{item};q={q};w={w}");
        }
        let policy = HeaderValue::try_from(policy)
            .unwrap_or_else(|_| HeaderValue::from_static("\"policy\";q=1;w=1"));
        let prefixes: Vec<Box<[u8]>> = items
            .iter()
            .map(|item| format!("{item};r=").into_bytes().into_boxed_slice())
            .collect();
        // Each item: its prefix, `r` (a u32), ";t=", `t` (a u64), and ", " between items.
        let capacity = prefixes.iter().map(|p| p.len() + 10 + 3 + 20 + 2).sum();
        PolicyHeaders {
            policy,
            prefixes,
            capacity,
        }
    }

    /// The header values for `decision` (`Retry-After` is the caller's, on a refusal).
    pub(crate) fn values(&self, mode: RateLimitHeaders, decision: &Decision) -> HeaderValues {
        let mut values = HeaderValues::default();
        if mode.ietf() {
            // Written on the stack, then copied once into the header value: one allocation of
            // exactly its size, where a `Vec` handed to `Bytes` took two (the buffer, then the
            // shared handle its spare capacity needs).
            let mut stack = [0u8; 256];
            let mut heap = Vec::new();
            let buf = if self.capacity <= stack.len() {
                &mut stack[..]
            } else {
                heap.resize(self.capacity, 0);
                &mut heap[..]
            };
            let mut value = Cursor { buf, len: 0 };
            let mut number = itoa::Buffer::new();
            for (i, (prefix, state)) in self.prefixes.iter().zip(decision.states()).enumerate() {
                if i > 0 {
                    value.put(b", ");
                }
                value.put(prefix);
                value.put(number.format(state.remaining()).as_bytes());
                value.put(b";t=");
                value.put(number.format(t_of(state)).as_bytes());
            }
            if let Ok(v) = HeaderValue::from_bytes(value.written()) {
                values.ietf = Some((self.policy.clone(), v));
            }
        }
        if mode.legacy()
            && let Some(binding) = decision.binding()
        {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // One scale, as GitHub's and express-rate-limit's clients read them: the limit is
            // the most that can be spent at once (the burst), which is what `remaining` counts
            // down from; the reset is when that quota is full again, or for a refusal when the
            // request can be retried (the same moment as `Retry-After`).
            let reset = if decision.is_allowed() {
                ceil_secs(binding.reset_after())
            } else {
                retry_after_secs(binding.retry_after())
            };
            values.legacy = Some((binding.quota().burst(), binding.remaining(), now + reset));
        }
        values
    }

    /// Adds the headers for `decision` (the layer has already set `Retry-After` when limited).
    pub(crate) fn apply(
        &self,
        mode: RateLimitHeaders,
        decision: &Decision,
        headers: &mut HeaderMap,
    ) {
        self.values(mode, decision).write(headers);
    }
}

/// Bytes written into a buffer sized for the most they can be ([`PolicyHeaders`]'s
/// `capacity`). A write that would not fit is dropped rather than a panic: the value is then
/// short, never wrong in what it holds.
struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn written(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The `q` and `w` a quota is advertised with: a full burst, and the time it takes to
/// replenish it at the nominal rate (`burst × period / limit`), in whole seconds rounded up
/// (at least 1), so that `q` per `w` never promises more than the quota allows. For a quota
/// whose burst equals its limit and whose period is whole seconds, that is exactly the limit
/// and the period.
pub(crate) fn policy_window(quota: &Quota) -> (u32, u64) {
    let span = u128::from(quota.burst()) * quota.period().as_nanos();
    let w = span.div_ceil(u128::from(quota.limit()) * 1_000_000_000);
    (quota.burst(), u64::try_from(w).unwrap_or(u64::MAX).max(1))
}

/// An RFC 9651 sf-string: printable ASCII, with `"` and `\` escaped; anything else becomes `_`.
fn sf_string(s: &str) -> String {
    struct Sf<'a>(&'a str);
    impl fmt::Display for Sf<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_char('"')?;
            for c in self.0.chars() {
                match c {
                    '"' | '\\' => {
                        f.write_char('\\')?;
                        f.write_char(c)?;
                    }
                    ' '..='~' => f.write_char(c)?,
                    _ => f.write_char('_')?,
                }
            }
            f.write_char('"')
        }
    }
    Sf(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }

    #[test]
    fn sf_strings_are_escaped() {
        assert_eq!(sf_string("hello"), "\"hello\"");
        assert_eq!(sf_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(sf_string("é\n"), "\"__\"");
    }

    #[test]
    fn policy_advertises_a_full_burst_and_its_replenish_time() {
        let q = |s: &str| s.parse::<Quota>().unwrap();
        assert_eq!(policy_window(&q("5/10s")), (5, 10));
        assert_eq!(policy_window(&q("10/s burst 20")), (20, 2));
        // 3/s is 3 x 333 334 us: still w=1.
        assert_eq!(policy_window(&q("3/s")), (3, 1));
        assert_eq!(policy_window(&q("100/100ms")), (100, 1));
        // 10 per 1.4 s is not 10 per second: w rounds up, so q per w never promises more.
        assert_eq!(policy_window(&q("10/1400ms")), (10, 2));
        assert_eq!(policy_window(&q("10/2500ms burst 3")), (3, 1));
        assert_eq!(policy_window(&q("1/90s")), (1, 90));
        let h = PolicyHeaders::new("export", &[q("2/s"), q("20/m")]);
        assert_eq!(h.policy, "\"export-1\";q=2;w=1, \"export-2\";q=20;w=60");
    }

    #[test]
    fn ietf_headers_on_allowed_and_limited_decisions() {
        let quota: Quota = "5/10s".parse().unwrap();
        let h = PolicyHeaders::new("hello", &[quota]);
        let allowed = Decision::from_states([QuotaState::new(
            quota,
            true,
            4,
            Duration::from_millis(2000),
            Duration::ZERO,
        )]);
        let mut headers = HeaderMap::new();
        h.apply(RateLimitHeaders::Ietf, &allowed, &mut headers);
        assert_eq!(headers["ratelimit-policy"], "\"hello\";q=5;w=10");
        assert_eq!(headers["ratelimit"], "\"hello\";r=4;t=2");
        assert!(headers.get("x-ratelimit-limit").is_none());

        let limited = Decision::from_states([QuotaState::new(
            quota,
            false,
            0,
            Duration::from_secs(10),
            Duration::from_millis(1500),
        )]);
        let mut headers = HeaderMap::new();
        h.apply(RateLimitHeaders::Both, &limited, &mut headers);
        assert_eq!(headers["ratelimit"], "\"hello\";r=0;t=2");
        assert_eq!(headers["x-ratelimit-limit"], "5");
        assert_eq!(headers["x-ratelimit-remaining"], "0");
        let reset: u64 = headers["x-ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!((now + 1..=now + 3).contains(&reset), "{reset} vs {now}");

        let mut headers = HeaderMap::new();
        h.apply(RateLimitHeaders::None, &limited, &mut headers);
        assert!(headers.is_empty());
    }
}
