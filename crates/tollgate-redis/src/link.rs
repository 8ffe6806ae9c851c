//! Why the store cannot connect. fred retries a failed connection by itself and reports each
//! failure on its error channel; requests meanwhile only time out. This watches that channel,
//! names the cause (credentials, TLS, nothing listening, a name that does not resolve), says
//! what to fix in one log line (not one per retry), counts each failed attempt under its
//! reason, and lets requests that fail while the cause stands carry it as their reason.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::{Error as FredError, ErrorKind as FredErrorKind};
use tollgate::StoreErrorKind;
use tollgate::metrics::StoreMetrics;

/// The same cause is logged again at most this often (with how many were held back).
const RELOG_INTERVAL: Duration = Duration::from_secs(60);

/// A connection failure, named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cause {
    pub(crate) kind: StoreErrorKind,
    /// What happened and what to fix, for logs and [`Error::NotConnected`](crate::Error).
    pub(crate) message: String,
}

/// Names the cause of a failed connection attempt, or `None` when the error says nothing
/// about connecting. `tls` is whether the URL asks for TLS. Never includes a URL: the caller
/// logs the redacted one beside it.
pub(crate) fn cause_of(e: &FredError, tls: bool) -> Option<Cause> {
    let details = e.details();
    let cause = |kind, message: String| Some(Cause { kind, message });
    match e.kind() {
        FredErrorKind::Auth if details.starts_with("WRONGPASS") => cause(
            StoreErrorKind::Auth,
            "Redis refused the user name or password (WRONGPASS): check the credentials in the \
             URL (percent-encode '/', '+', '@', ':' in a password, e.g. '/' as %2F) and that the \
             server's ACL user is enabled"
                .into(),
        ),
        FredErrorKind::Auth if details.starts_with("NOAUTH") => cause(
            StoreErrorKind::Auth,
            "Redis requires a password (NOAUTH): put it in the URL, \
             redis://user:password@host:port"
                .into(),
        ),
        FredErrorKind::Auth => cause(
            StoreErrorKind::Auth,
            format!(
                "Redis refused to authenticate ({}): check the URL's credentials",
                first_word(details)
            ),
        ),
        #[cfg(feature = "tls")]
        FredErrorKind::Tls => cause(StoreErrorKind::Tls, tls_message(details)),
        FredErrorKind::IO
            if details.contains("InvalidCertificate")
                || details.contains("AlertReceived")
                || details.contains("HandshakeFailure") =>
        {
            cause(StoreErrorKind::Tls, tls_message(details))
        }
        FredErrorKind::IO if details.contains("ConnectionRefused") => cause(
            StoreErrorKind::ConnectionRefused,
            "nothing listens at the URL's host and port (connection refused): check them, and \
             that Redis runs and accepts connections from here"
                .into(),
        ),
        FredErrorKind::IO
            if details.contains("failed to lookup address")
                || details.contains("Name or service not known")
                || details.contains("No address associated") =>
        {
            cause(
                StoreErrorKind::Dns,
                "the URL's host name does not resolve: check its spelling and this machine's DNS"
                    .into(),
            )
        }
        FredErrorKind::IO if !tls && details.contains("ConnectionReset") => cause(
            StoreErrorKind::Unavailable,
            "the server closed the connection at once: if it only speaks TLS, use a rediss:// \
             URL"
            .into(),
        ),
        FredErrorKind::Timeout if tls => cause(
            StoreErrorKind::Tls,
            "no TLS handshake before the connect timeout: if this port speaks plaintext Redis, \
             use a redis:// URL; otherwise the server is unreachable or too slow from here"
                .into(),
        ),
        _ => None,
    }
}

fn first_word(details: &str) -> &str {
    details.split_whitespace().next().unwrap_or("")
}

fn tls_message(details: &str) -> String {
    let why = if details.contains("UnknownIssuer") {
        "the server's certificate is not signed by a trusted CA: give the CA that signed it \
         (tls_ca_file, RedisTls::with_ca_file)"
    } else if details.contains("NotValidForName") {
        "the server's certificate is not valid for the URL's host: use the name the \
         certificate was issued for"
    } else if details.contains("Expired") {
        "the server's certificate has expired"
    } else if details.contains("CertificateRequired") || details.contains("certificate required") {
        "the server requires a client certificate: give one (tls_client_cert_file, \
         RedisTls::with_client_cert_files)"
    } else {
        "check the server's certificate and the CA trusted"
    };
    // The TLS library's own words, which name no secret.
    let detail: String = details
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    format!("the TLS handshake failed ({detail}): {why}")
}

/// The cause of the current connection failure, shared by the store and the task that
/// watches fred's error channel.
#[derive(Debug)]
pub(crate) struct Link {
    /// 0: none known (connected, or not yet failed); else a `KINDS` index + 1.
    kind: AtomicU8,
    state: Mutex<LinkState>,
    metrics: StoreMetrics,
    /// Names the store and its redacted URL in logs.
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    store: String,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    url: String,
    tls: bool,
}

#[derive(Debug, Default)]
struct LinkState {
    cause: Option<Cause>,
    logged_at: Option<Instant>,
    held_back: u64,
}

const KINDS: [StoreErrorKind; 5] = [
    StoreErrorKind::Auth,
    StoreErrorKind::Tls,
    StoreErrorKind::ConnectionRefused,
    StoreErrorKind::Dns,
    StoreErrorKind::Unavailable,
];

impl Link {
    pub(crate) fn new(metrics: StoreMetrics, store: String, url: String, tls: bool) -> Self {
        Link {
            kind: AtomicU8::new(0),
            state: Mutex::new(LinkState::default()),
            metrics,
            store,
            url,
            tls,
        }
    }

    /// A connection attempt failed with `e`.
    pub(crate) fn failed(&self, e: &FredError) {
        let Some(cause) = cause_of(e, self.tls) else {
            return;
        };
        self.metrics.error(cause.kind);
        let index = KINDS
            .iter()
            .position(|k| *k == cause.kind)
            .map_or(0, |i| i + 1);
        self.kind
            .store(u8::try_from(index).unwrap_or(0), Ordering::Relaxed);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let changed = state.cause.as_ref() != Some(&cause);
        let due = state
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= RELOG_INTERVAL);
        if changed || due {
            let _held_back = std::mem::take(&mut state.held_back);
            #[cfg(feature = "tracing")]
            tracing::error!(
                store = %self.store,
                url = %self.url,
                reason = cause.kind.reason(),
                suppressed = _held_back,
                "rate-limit-store-connection: cannot connect to Redis: {}",
                cause.message
            );
            state.logged_at = Some(now);
        } else {
            state.held_back += 1;
        }
        state.cause = Some(cause);
    }

    /// The connection is up again (fred reconnected, or a call succeeded: one atomic load
    /// when nothing had failed).
    pub(crate) fn connected(&self) {
        if self.kind.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.kind.store(0, Ordering::Relaxed);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.cause.take().is_some() {
            #[cfg(feature = "tracing")]
            tracing::info!(
                store = %self.store,
                url = %self.url,
                "rate-limit-store-connection: connected to Redis again"
            );
        }
        state.logged_at = None;
        state.held_back = 0;
    }

    /// The reason a request that failed as `kind` while disconnected is counted under: the
    /// connection's cause when one is known, else `kind`.
    pub(crate) fn explain(&self, kind: StoreErrorKind) -> StoreErrorKind {
        if !matches!(kind, StoreErrorKind::Timeout | StoreErrorKind::Unavailable) {
            return kind;
        }
        match self.kind.load(Ordering::Relaxed) {
            0 => kind,
            i => KINDS.get(usize::from(i) - 1).copied().unwrap_or(kind),
        }
    }

    /// What is known of why the store is not connected.
    pub(crate) fn cause(&self) -> Option<Cause> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cause
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(kind: FredErrorKind, details: &str, tls: bool) -> Option<StoreErrorKind> {
        cause_of(&FredError::new(kind, details.to_owned()), tls).map(|c| c.kind)
    }

    #[test]
    fn each_cause_is_named() {
        // What fred reports, as seen against real servers (tests/tests/redis_errors.rs):
        // (kind, details, TLS URL, the cause's kind).
        let cases = [
            (
                FredErrorKind::Auth,
                "WRONGPASS invalid username-password pair or user is disabled.",
                false,
                Some(StoreErrorKind::Auth),
            ),
            (
                FredErrorKind::Auth,
                "NOAUTH Authentication required.",
                false,
                Some(StoreErrorKind::Auth),
            ),
            (
                FredErrorKind::IO,
                r#"Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }"#,
                false,
                Some(StoreErrorKind::ConnectionRefused),
            ),
            (
                FredErrorKind::IO,
                r#"Custom { kind: Uncategorized, error: "failed to lookup address information: Name or service not known" }"#,
                false,
                Some(StoreErrorKind::Dns),
            ),
            (
                FredErrorKind::IO,
                "Custom { kind: InvalidData, error: InvalidCertificate(UnknownIssuer) }",
                true,
                Some(StoreErrorKind::Tls),
            ),
            // TLS spoken to a plaintext port never completes its handshake.
            (
                FredErrorKind::Timeout,
                "Request timed out.",
                true,
                Some(StoreErrorKind::Tls),
            ),
            (FredErrorKind::Timeout, "Request timed out.", false, None),
            (FredErrorKind::Parse, "garbage", false, None),
        ];
        for (kind, details, tls, want) in cases {
            assert_eq!(
                kind_of(kind.clone(), details, tls),
                want,
                "{kind:?} {details}"
            );
        }
    }

    #[test]
    fn messages_say_what_to_fix() {
        let msg = |kind, details: &str, tls| {
            cause_of(&FredError::new(kind, details.to_owned()), tls)
                .unwrap()
                .message
        };
        assert!(msg(FredErrorKind::Auth, "WRONGPASS x", false).contains("check the credentials"));
        assert!(msg(FredErrorKind::Auth, "NOAUTH x", false).contains("put it in the URL"));
        let m = msg(FredErrorKind::IO, "InvalidCertificate(UnknownIssuer)", true);
        assert!(m.contains("tls_ca_file"), "{m}");
        let m = msg(
            FredErrorKind::IO,
            "InvalidCertificate(NotValidForName)",
            true,
        );
        assert!(m.contains("not valid for the URL's host"), "{m}");
    }

    #[test]
    fn requests_carry_the_cause_while_it_stands() {
        let link = Link::new(
            StoreMetrics::new("test"),
            "redis".into(),
            "redis://h".into(),
            false,
        );
        assert_eq!(
            link.explain(StoreErrorKind::Timeout),
            StoreErrorKind::Timeout
        );
        link.failed(&FredError::new(FredErrorKind::Auth, "WRONGPASS no"));
        assert_eq!(link.explain(StoreErrorKind::Timeout), StoreErrorKind::Auth);
        assert_eq!(
            link.explain(StoreErrorKind::Unavailable),
            StoreErrorKind::Auth
        );
        assert_eq!(link.explain(StoreErrorKind::Script), StoreErrorKind::Script);
        link.connected();
        assert_eq!(
            link.explain(StoreErrorKind::Timeout),
            StoreErrorKind::Timeout
        );
        assert!(link.cause().is_none());
    }
}
