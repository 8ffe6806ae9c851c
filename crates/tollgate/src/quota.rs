//! Quotas: how many units a key may spend per period, and how many at once.

use std::error::Error;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use crate::text::Text;

/// The shortest emission interval a quota may have: one unit per microsecond.
///
/// Faster rates per key are not meaningful for HTTP and could not be represented identically by
/// every store (the Redis store counts in microseconds).
const MIN_EMISSION_NS: u64 = 1_000;
/// The longest period a quota may have.
const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest span a full burst may cover (`burst * emission interval`).
const MAX_BURST_SPAN_NS: u64 = 10 * 366 * 24 * 3600 * 1_000_000_000;

/// A rate limit: `limit` units per `period`, of which up to `burst` may be spent at once.
///
/// The names say what they mean: [`Quota::per_second(10)`](Quota::per_second) allows ten
/// requests per second, not one request every ten seconds. The burst defaults to the limit, so
/// `Quota::per_minute(30)` lets a fresh client send 30 requests at once and then one every two
/// seconds.
///
/// Every constructor validates its input and returns a [`QuotaError`] for values that cannot
/// work (a zero limit or burst, a zero or absurdly long period, a rate over one unit per
/// microsecond), so a bad value fails at start-up, never at request time.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tollgate::Quota;
///
/// # fn main() -> Result<(), tollgate::QuotaError> {
/// // 30 requests per 5 minutes.
/// let q = Quota::new(30, Duration::from_secs(300))?;
/// assert_eq!(q, "30/5m".parse()?);
///
/// // 10 per second with bursts of 20.
/// let q = Quota::per_second(10)?.with_burst(20)?;
/// assert_eq!(q.burst(), 20);
/// assert_eq!(q.emission_interval(), Duration::from_millis(100));
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: NonZeroU32,
    /// In nanoseconds (a `Duration` would double the size of every quota state).
    period_ns: u64,
    burst: NonZeroU32,
    /// `period / limit`, rounded up to a whole microsecond, in nanoseconds.
    emission_ns: u64,
    algorithm: Algorithm,
    /// [`fingerprint`](Self::fingerprint), computed once (it fills what would be padding).
    fingerprint: u32,
}

/// How a quota counts.
///
/// Every algorithm behaves the same in every store; see `docs/algorithms.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// The generic cell rate algorithm (the default): a smooth rate of `limit` per `period` with
    /// bursts of up to `burst`; no window boundary to game, exact `Retry-After`.
    #[default]
    Gcra,
    /// `limit` units per window of `period`. Each key's windows start at its own offset, so
    /// keys do not all reset at the same instant. A client can spend up to twice the limit
    /// across a window boundary.
    FixedWindow,
    /// The sliding window counter: the previous window's count, weighted by how much of it still
    /// overlaps the sliding window, plus the current window's count. Smooths the boundary of
    /// the fixed window with two counters per key.
    SlidingWindow,
}

impl Algorithm {
    /// The name used in configuration files: `gcra`, `fixed_window`, `sliding_window`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Gcra => "gcra",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
        }
    }
}

impl FromStr for Algorithm {
    type Err = QuotaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "gcra" => Ok(Algorithm::Gcra),
            "fixed_window" | "fixed" => Ok(Algorithm::FixedWindow),
            "sliding_window" | "sliding" => Ok(Algorithm::SlidingWindow),
            _ => Err(QuotaError::UnknownAlgorithm(truncate_for_error(s))),
        }
    }
}

/// The largest `limit × period in ms` a window quota may have, so that its arithmetic is exact
/// in every store (Redis computes in Lua doubles, exact up to 2^53).
const MAX_WINDOW_PRODUCT: u128 = 1 << 52;

impl Quota {
    /// `limit` units per `period`, with a burst equal to `limit`.
    ///
    /// # Errors
    ///
    /// Fails when `limit` is zero, `period` is zero or longer than 366 days, or the rate is
    /// faster than one unit per microsecond.
    pub fn new(limit: u32, period: Duration) -> Result<Self, QuotaError> {
        let limit = NonZeroU32::new(limit).ok_or(QuotaError::ZeroLimit)?;
        if period.is_zero() {
            return Err(QuotaError::ZeroPeriod);
        }
        if period > MAX_PERIOD {
            return Err(QuotaError::PeriodTooLong(period));
        }
        // Fits: MAX_PERIOD is far below u64::MAX nanoseconds.
        let period_ns = period.as_nanos() as u64;
        let emission_ns = period_ns.div_ceil(u64::from(limit.get()));
        if emission_ns < MIN_EMISSION_NS {
            return Err(QuotaError::RateTooHigh {
                limit: limit.get(),
                period,
            });
        }
        // Round up to whole microseconds: never faster than nominal, and every store can
        // represent the interval exactly.
        let emission_ns = emission_ns.div_ceil(1_000) * 1_000;
        let quota = Quota {
            limit,
            period_ns,
            burst: limit,
            emission_ns,
            algorithm: Algorithm::Gcra,
            fingerprint: 0,
        }
        .fingerprinted();
        quota.check_span()?;
        Ok(quota)
    }

    /// `limit` units per second. `per_second(10)` allows ten requests a second.
    ///
    /// # Errors
    ///
    /// As [`Quota::new`].
    pub fn per_second(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` units per minute.
    ///
    /// # Errors
    ///
    /// As [`Quota::new`].
    pub fn per_minute(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` units per hour.
    ///
    /// # Errors
    ///
    /// As [`Quota::new`].
    pub fn per_hour(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(3600))
    }

    /// `limit` units per day (86 400 seconds).
    ///
    /// # Errors
    ///
    /// As [`Quota::new`].
    pub fn per_day(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(86_400))
    }

    /// Sets how many units may be spent at once (the bucket size). The sustained rate stays
    /// `limit` per `period`.
    ///
    /// # Errors
    ///
    /// Fails when `burst` is zero, or when a full burst would span more than ten years.
    pub fn with_burst(self, burst: u32) -> Result<Self, QuotaError> {
        let burst = NonZeroU32::new(burst).ok_or(QuotaError::ZeroBurst)?;
        if self.algorithm != Algorithm::Gcra && burst != self.limit {
            return Err(QuotaError::BurstWithWindow(self.algorithm));
        }
        let quota = Quota { burst, ..self }.fingerprinted();
        quota.check_span()?;
        Ok(quota)
    }

    /// Sets how the quota counts (default [`Algorithm::Gcra`]).
    ///
    /// # Errors
    ///
    /// For a window algorithm: when a burst different from the limit was set (windows have no
    /// burst), when the period is not a whole number of milliseconds, or when `limit × period`
    /// (in ms) exceeds 2^52, beyond which window arithmetic would not be exact in every store.
    pub fn with_algorithm(self, algorithm: Algorithm) -> Result<Self, QuotaError> {
        if algorithm != Algorithm::Gcra {
            if self.burst != self.limit {
                return Err(QuotaError::BurstWithWindow(algorithm));
            }
            if !self.period_ns.is_multiple_of(1_000_000) {
                return Err(QuotaError::WindowNotWholeMillis(self.period()));
            }
            if u128::from(self.limit.get()) * u128::from(self.period_ns / 1_000_000)
                > MAX_WINDOW_PRODUCT
            {
                return Err(QuotaError::WindowTooLarge {
                    limit: self.limit.get(),
                    period: self.period(),
                });
            }
        }
        Ok(Quota { algorithm, ..self }.fingerprinted())
    }

    /// How the quota counts.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The window length in milliseconds (window algorithms count in whole milliseconds).
    pub(crate) fn window_ms(&self) -> u64 {
        self.period_ns / 1_000_000
    }

    fn check_span(&self) -> Result<(), QuotaError> {
        match self.emission_ns.checked_mul(u64::from(self.burst.get())) {
            Some(span) if span <= MAX_BURST_SPAN_NS => Ok(()),
            _ => Err(QuotaError::BurstTooLong {
                burst: self.burst.get(),
            }),
        }
    }

    /// The number of units per period.
    pub fn limit(&self) -> u32 {
        self.limit.get()
    }

    /// The period over which `limit` units are allowed.
    pub fn period(&self) -> Duration {
        Duration::from_nanos(self.period_ns)
    }

    /// The largest number of units a key may spend at once.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// The time it takes for one unit to be replenished: `period / limit`, rounded up to a
    /// whole microsecond.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.emission_ns)
    }

    /// The emission interval in nanoseconds.
    pub(crate) fn emission_ns(&self) -> u64 {
        self.emission_ns
    }

    /// A short text that names the quota's arithmetic: its limit, period, burst and algorithm
    /// (`5/10s`, `10/s-b20`, `3/10s-fw`, `100/m-sw`). Stores name a key's state by it, so that
    /// a deploy that reorders a policy's quotas, or adds one, keeps every state with its quota;
    /// a quota whose numbers change starts afresh (its old state expires on its own).
    ///
    /// ```
    /// use tollgate::Quota;
    /// let q: Quota = "10/s burst 20".parse().unwrap();
    /// assert_eq!(q.id().to_string(), "10/s-b20");
    /// ```
    pub fn id(&self) -> impl fmt::Display + '_ {
        struct Id<'q>(&'q Quota);
        impl fmt::Display for Id<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0.id_text().as_str())
            }
        }
        Id(self)
    }

    /// Appends the quota's [`id`](Self::id) to `out`: the same text, without the formatter.
    /// For stores that name a state with it on every check.
    ///
    /// ```
    /// use tollgate::Quota;
    /// let q: Quota = "3/10s fixed-window".parse().unwrap();
    /// let mut name = String::from("state:");
    /// q.push_id(&mut name);
    /// assert_eq!(name, format!("state:{}", q.id()));
    /// ```
    pub fn push_id(&self, out: &mut String) {
        out.push_str(self.id_text().as_str());
    }

    /// The [`id`](Self::id), written on the stack: at most 10 + 1 + 19 + 2 + 10 + 3 bytes.
    fn id_text(&self) -> Text<48> {
        let mut t = Text::<48>::new();
        t.int(self.limit.get());
        t.push("/");
        push_period(&mut t, self.period());
        if self.burst != self.limit {
            t.push("-b");
            t.int(self.burst.get());
        }
        t.push(match self.algorithm {
            Algorithm::FixedWindow => "-fw",
            Algorithm::SlidingWindow => "-sw",
            Algorithm::Gcra => "",
        });
        t
    }

    /// A 32-bit fingerprint of what [`id`](Self::id) names, for stores that index by hash.
    #[inline]
    pub(crate) fn fingerprint(&self) -> u64 {
        u64::from(self.fingerprint)
    }

    /// The quota with its fingerprint computed from its other fields: every constructor ends
    /// here.
    fn fingerprinted(self) -> Self {
        // A fixed multiply-xorshift mix, folded to 32 bits: distinct quotas of one policy
        // collide with a chance of one in 4 billion a pair, and nothing here comes from a
        // client.
        let mut h = self.period_ns ^ 0x9e37_79b9_7f4a_7c15;
        for word in [
            u64::from(self.limit.get()),
            u64::from(self.burst.get()),
            self.algorithm as u64,
        ] {
            h = (h ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^= h >> 33;
        }
        Quota {
            fingerprint: (h ^ (h >> 32)) as u32,
            ..self
        }
    }

    /// `burst * emission interval` in nanoseconds: how far ahead of now a key's theoretical
    /// arrival time may run (the GCRA's delay variation tolerance plus one interval).
    pub(crate) fn burst_span_ns(&self) -> u64 {
        // Checked at construction.
        self.emission_ns * u64::from(self.burst.get())
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Quota({self})")
    }
}

impl fmt::Display for Quota {
    /// Formats as the string [`FromStr`] reads, with the burst when it differs from the limit:
    /// `30/5m`, `10/s burst 20`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.limit)?;
        let mut period = Text::<24>::new();
        push_period(&mut period, self.period());
        f.write_str(period.as_str())?;
        if self.burst != self.limit {
            write!(f, " burst {}", self.burst)?;
        }
        match self.algorithm {
            Algorithm::Gcra => Ok(()),
            Algorithm::FixedWindow => f.write_str(" fixed-window"),
            Algorithm::SlidingWindow => f.write_str(" sliding-window"),
        }
    }
}

/// `period` as the quota syntax writes it: `s`, `10s`, `5m`, `250ms`, `1500ns`. At most 19
/// digits (366 days in ns) and a unit.
fn push_period<const N: usize>(t: &mut Text<N>, period: Duration) {
    const UNITS: [(u64, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    // In u64 (a period is at most 366 days): u128 division is a library call.
    let ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
    if period.subsec_nanos().is_multiple_of(1_000_000) {
        for (unit_ms, name) in UNITS {
            if ms.is_multiple_of(unit_ms) {
                let n = ms / unit_ms;
                if n != 1 {
                    t.int(n);
                }
                t.push(name);
                return;
            }
        }
    }
    t.int(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
    t.push("ns");
}

impl FromStr for Quota {
    type Err = QuotaError;

    /// Parses `"<limit>/<period>"` with an optional `" burst <n>"` and an optional algorithm
    /// (`gcra`, `fixed-window`, `sliding-window`) at the end.
    ///
    /// The period is an optional count and a unit: `ms`, `s`/`sec`/`second`, `m`/`min`/`minute`,
    /// `h`/`hour`, `d`/`day` (plurals accepted): `"5/10s"`, `"30/5m"`, `"1000/day"`,
    /// `"10/s burst 20"`, `"100/m sliding-window"`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if let Some((rest, last)) = s.rsplit_once(char::is_whitespace) {
            if let Ok(algorithm) = last.parse::<Algorithm>() {
                return parse_rate(input, rest)?.with_algorithm(algorithm);
            }
            if parse_rate(input, rest).is_ok() && parse_rate(input, s).is_err() {
                return Err(QuotaError::UnknownAlgorithm(truncate_for_error(last)));
            }
        }
        parse_rate(input, s)
    }
}

/// `<limit>/<period>[ burst <n>]`.
fn parse_rate(input: &str, s: &str) -> Result<Quota, QuotaError> {
    let invalid = |reason: &'static str| QuotaError::Parse {
        input: truncate_for_error(input),
        reason,
    };
    let (rate, burst) = match s.split_once("burst") {
        Some((rate, burst)) => (rate, Some(burst.trim())),
        None => (s, None),
    };
    let (limit, period) = rate
        .split_once('/')
        .ok_or_else(|| invalid("expected <limit>/<period>, for example 30/5m"))?;
    let limit: u32 = limit
        .trim()
        .parse()
        .map_err(|_| invalid("the limit is not a whole number up to 4294967295"))?;
    let period = parse_period(period.trim())
        .ok_or_else(|| invalid("the period is not a duration like 10s, 5m, 1h, day or 250ms"))?;
    let mut quota = Quota::new(limit, period)?;
    if let Some(b) = burst {
        let b: u32 = b
            .parse()
            .map_err(|_| invalid("the burst is not a whole number up to 4294967295"))?;
        quota = quota.with_burst(b)?;
    }
    Ok(quota)
}

pub(crate) fn parse_period(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (count, unit) = s.split_at(split);
    let count: u64 = if count.is_empty() {
        1
    } else {
        count.parse().ok()?
    };
    let unit_ms: u64 = match unit.trim() {
        "ms" | "millis" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(count.checked_mul(unit_ms)?))
}

fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Why a [`Quota`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaError {
    /// The limit was zero: nothing could ever pass.
    ZeroLimit,
    /// The burst was zero: nothing could ever pass.
    ZeroBurst,
    /// The period was zero.
    ZeroPeriod,
    /// The period is longer than 366 days.
    PeriodTooLong(Duration),
    /// More than one unit per microsecond.
    RateTooHigh {
        /// The requested limit.
        limit: u32,
        /// The requested period.
        period: Duration,
    },
    /// `burst * emission interval` is longer than ten years.
    BurstTooLong {
        /// The requested burst.
        burst: u32,
    },
    /// A window algorithm was given a burst: windows count `limit` per window, with no burst.
    BurstWithWindow(Algorithm),
    /// A window algorithm needs a period of whole milliseconds.
    WindowNotWholeMillis(Duration),
    /// `limit × period` is too large for exact window arithmetic.
    WindowTooLarge {
        /// The requested limit.
        limit: u32,
        /// The requested period.
        period: Duration,
    },
    /// An algorithm name that does not exist.
    UnknownAlgorithm(String),
    /// A quota string could not be parsed.
    Parse {
        /// The input (shortened when long).
        input: String,
        /// What was wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuotaError::ZeroLimit => f.write_str("quota limit must be at least 1"),
            QuotaError::ZeroBurst => f.write_str("quota burst must be at least 1"),
            QuotaError::ZeroPeriod => f.write_str("quota period must be longer than zero"),
            QuotaError::PeriodTooLong(p) => {
                write!(
                    f,
                    "quota period {p:?} is longer than the maximum of 366 days"
                )
            }
            QuotaError::RateTooHigh { limit, period } => write!(
                f,
                "quota {limit} per {period:?} is faster than the maximum of one unit per microsecond per key"
            ),
            QuotaError::BurstTooLong { burst } => write!(
                f,
                "quota burst {burst} would take more than ten years to replenish"
            ),
            QuotaError::BurstWithWindow(a) => write!(
                f,
                "a burst applies to gcra only; {} counts the limit per window",
                a.name()
            ),
            QuotaError::WindowNotWholeMillis(p) => {
                write!(
                    f,
                    "window period {p:?} is not a whole number of milliseconds"
                )
            }
            QuotaError::WindowTooLarge { limit, period } => write!(
                f,
                "window quota {limit} per {period:?} is too large: limit x period in ms must be at most 2^52"
            ),
            QuotaError::UnknownAlgorithm(name) => write!(
                f,
                "unknown algorithm {name:?}: expected \"gcra\", \"fixed_window\" or \"sliding_window\""
            ),
            QuotaError::Parse { input, reason } => {
                write!(f, "invalid quota {input:?}: {reason}")
            }
        }
    }
}

impl Error for QuotaError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_keeps_its_fingerprint_in_its_padding() {
        // Evaluations carry a quota and must stay within 128 bytes (algorithm.rs).
        assert_eq!(std::mem::size_of::<Quota>(), 32);
    }

    #[test]
    fn every_constructor_fingerprints_what_it_built() {
        // The cached fingerprint is the one the quota's fields give, however it was made, and
        // quotas that differ in any field the id names differ in it.
        let base = Quota::per_second(10).unwrap();
        let variants = [
            base,
            base.with_burst(20).unwrap(),
            base.with_algorithm(Algorithm::FixedWindow).unwrap(),
            base.with_algorithm(Algorithm::SlidingWindow).unwrap(),
            Quota::per_second(11).unwrap(),
            Quota::new(10, Duration::from_secs(2)).unwrap(),
            "10/s".parse().unwrap(),
        ];
        for q in variants {
            assert_eq!(
                q.fingerprint(),
                u64::from(
                    Quota {
                        fingerprint: 0,
                        ..q
                    }
                    .fingerprinted()
                    .fingerprint
                )
            );
        }
        let distinct: std::collections::HashSet<u64> =
            variants[..6].iter().map(Quota::fingerprint).collect();
        assert_eq!(distinct.len(), 6);
        assert_eq!(variants[6].fingerprint(), base.fingerprint());
    }

    #[test]
    fn names_mean_what_they_say() {
        let q = Quota::per_second(10).unwrap();
        assert_eq!(q.limit(), 10);
        assert_eq!(q.period(), Duration::from_secs(1));
        assert_eq!(q.burst(), 10);
        assert_eq!(q.emission_interval(), Duration::from_millis(100));
        assert_eq!(
            Quota::per_minute(30).unwrap().emission_interval(),
            Duration::from_secs(2)
        );
        assert_eq!(
            Quota::per_hour(3600).unwrap().emission_interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Quota::per_day(24).unwrap().emission_interval(),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn emission_interval_rounds_up_to_whole_microseconds() {
        // 3/s is 333_333.33 us: never allow faster than nominal.
        let q = Quota::per_second(3).unwrap();
        assert_eq!(q.emission_interval(), Duration::from_micros(333_334));
    }

    #[test]
    fn window_quotas_refuse_what_windows_cannot_do() {
        // A burst is a GCRA notion: a window holds its limit.
        let burst = Quota::per_minute(10).unwrap().with_burst(20).unwrap();
        assert_eq!(
            burst.with_algorithm(Algorithm::FixedWindow),
            Err(QuotaError::BurstWithWindow(Algorithm::FixedWindow))
        );
        let window = Quota::per_minute(10)
            .unwrap()
            .with_algorithm(Algorithm::SlidingWindow)
            .unwrap();
        assert_eq!(
            window.with_burst(20),
            Err(QuotaError::BurstWithWindow(Algorithm::SlidingWindow))
        );
        // Setting the burst to the limit is no burst at all: allowed.
        assert!(window.with_burst(10).is_ok());
        // Windows count in whole milliseconds.
        let odd = Quota::new(3, Duration::from_micros(1_500_500)).unwrap();
        assert_eq!(
            odd.with_algorithm(Algorithm::FixedWindow),
            Err(QuotaError::WindowNotWholeMillis(Duration::from_micros(
                1_500_500
            )))
        );
        // limit × window (ms) above 2^52 would not be exact in every store.
        let huge = Quota::new(u32::MAX, Duration::from_secs(366 * 24 * 3600)).unwrap();
        assert!(matches!(
            huge.with_algorithm(Algorithm::FixedWindow),
            Err(QuotaError::WindowTooLarge {
                limit: u32::MAX,
                ..
            })
        ));
        let fits = Quota::new(1_000_000, Duration::from_secs(86_400)).unwrap();
        assert!(fits.with_algorithm(Algorithm::FixedWindow).is_ok());
        for e in [
            QuotaError::BurstWithWindow(Algorithm::FixedWindow),
            QuotaError::WindowNotWholeMillis(Duration::from_micros(1_500_500)),
            QuotaError::WindowTooLarge {
                limit: 7,
                period: Duration::from_secs(1),
            },
        ] {
            assert!(!e.to_string().is_empty());
        }
        // And through the text form, which the configuration file uses.
        assert!("10/m burst 20 fixed-window".parse::<Quota>().is_err());
    }

    #[test]
    fn rejects_values_that_cannot_work() {
        assert_eq!(Quota::per_second(0), Err(QuotaError::ZeroLimit));
        assert_eq!(Quota::new(1, Duration::ZERO), Err(QuotaError::ZeroPeriod));
        assert!(matches!(
            Quota::new(1, Duration::from_secs(400 * 86_400)),
            Err(QuotaError::PeriodTooLong(_))
        ));
        assert!(matches!(
            Quota::per_second(2_000_000),
            Err(QuotaError::RateTooHigh { .. })
        ));
        assert_eq!(
            Quota::per_second(1).unwrap().with_burst(0),
            Err(QuotaError::ZeroBurst)
        );
        assert!(matches!(
            Quota::per_day(1).unwrap().with_burst(u32::MAX),
            Err(QuotaError::BurstTooLong { .. })
        ));
        // The largest values that do work are accepted.
        assert!(Quota::per_second(1_000_000).is_ok());
        assert!(Quota::new(1, MAX_PERIOD).is_ok());
        assert!(
            Quota::per_second(1000)
                .unwrap()
                .with_burst(u32::MAX)
                .is_ok()
        );
    }

    #[test]
    fn parses_human_readable_quotas() {
        let cases = [
            ("5/10s", 5, 10, 5),
            ("30/5m", 30, 300, 30),
            ("1000/day", 1000, 86_400, 1000),
            ("1000/d", 1000, 86_400, 1000),
            ("10/s burst 20", 10, 1, 20),
            (" 3 / minute ", 3, 60, 3),
            ("100/2hours", 100, 7200, 100),
        ];
        for (input, limit, secs, burst) in cases {
            let q: Quota = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(q.limit(), limit, "{input}");
            assert_eq!(q.period(), Duration::from_secs(secs), "{input}");
            assert_eq!(q.burst(), burst, "{input}");
        }
        assert_eq!(
            "250/250ms".parse::<Quota>().unwrap().period(),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn parse_errors_name_the_input_and_the_problem() {
        let err = "five/s".parse::<Quota>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid quota \"five/s\": the limit is not a whole number up to 4294967295"
        );
        let err = "5/fortnight".parse::<Quota>().unwrap_err().to_string();
        assert!(
            err.contains("\"5/fortnight\"") && err.contains("period"),
            "{err}"
        );
        let err = "5".parse::<Quota>().unwrap_err().to_string();
        assert!(err.contains("expected <limit>/<period>"), "{err}");
        assert_eq!(
            "0/s".parse::<Quota>().unwrap_err().to_string(),
            "quota limit must be at least 1"
        );
        // Overflowing periods are rejected, not wrapped.
        assert!("1/99999999999999999d".parse::<Quota>().is_err());
        // Megabytes of input produce a short error.
        let huge = "9".repeat(1 << 20);
        let err = huge.parse::<Quota>().unwrap_err().to_string();
        assert!(err.len() < 200, "{}", err.len());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "5/10s",
            "30/5m",
            "1000/d",
            "10/s burst 20",
            "7/250ms",
            "1/h",
        ] {
            let q: Quota = s.parse().unwrap();
            assert_eq!(q.to_string(), s);
            assert_eq!(q.to_string().parse::<Quota>().unwrap(), q);
        }
    }

    /// What `id` and `Display` wrote with `write!`, before they were written on the stack: a
    /// state's name in Redis must not change between versions.
    fn reference(q: &Quota, id: bool) -> String {
        let period = q.period();
        let ms = period.as_millis();
        let mut p = format!("{}ns", period.as_nanos());
        if period.subsec_nanos().is_multiple_of(1_000_000) {
            for (unit_ms, name) in [
                (86_400_000, "d"),
                (3_600_000, "h"),
                (60_000, "m"),
                (1_000, "s"),
                (1, "ms"),
            ] {
                if ms.is_multiple_of(unit_ms) {
                    let n = ms / unit_ms;
                    p = if n == 1 {
                        name.to_owned()
                    } else {
                        format!("{n}{name}")
                    };
                    break;
                }
            }
        }
        let burst = match (q.burst != q.limit, id) {
            (false, _) => String::new(),
            (true, true) => format!("-b{}", q.burst),
            (true, false) => format!(" burst {}", q.burst),
        };
        let algo = match (q.algorithm, id) {
            (Algorithm::Gcra, _) => "",
            (Algorithm::FixedWindow, true) => "-fw",
            (Algorithm::SlidingWindow, true) => "-sw",
            (Algorithm::FixedWindow, false) => " fixed-window",
            (Algorithm::SlidingWindow, false) => " sliding-window",
        };
        format!("{}/{p}{burst}{algo}", q.limit)
    }

    proptest::proptest! {
        #[test]
        fn ids_and_display_are_written_as_before(
            limit in 1u32..=u32::MAX,
            period_ns in 1u64..=366 * 86_400_000_000_000,
            whole in proptest::sample::select(vec![1u64, 1_000_000, 1_000_000_000, 60_000_000_000, 3_600_000_000_000, 86_400_000_000_000]),
            burst in proptest::option::of(1u32..=u32::MAX),
            algo in 0u8..3,
        ) {
            // Whole units as often as odd nanoseconds: each branch of the period's unit.
            let ns = (period_ns / whole).max(1) * whole;
            let Ok(mut q) = Quota::new(limit, Duration::from_nanos(ns)) else {
                return Ok(());
            };
            if let Some(b) = burst && let Ok(with) = q.with_burst(b) {
                q = with;
            }
            let algorithm = [Algorithm::Gcra, Algorithm::FixedWindow, Algorithm::SlidingWindow][usize::from(algo)];
            if let Ok(with) = q.with_algorithm(algorithm) {
                q = with;
            }
            proptest::prop_assert_eq!(q.id().to_string(), reference(&q, true));
            let mut pushed = String::from("k:");
            q.push_id(&mut pushed);
            proptest::prop_assert_eq!(&pushed[2..], reference(&q, true));
            proptest::prop_assert_eq!(q.to_string(), reference(&q, false));
        }
    }
}
