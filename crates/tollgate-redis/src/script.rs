//! The rate-limit script seen from Rust: the names of the keys it reads, the arguments it takes,
//! and the reply it gives.

use std::time::Duration;

use smallvec::SmallVec;
use tollgate::store::window_offset;
use tollgate::{Algorithm, Decision, Key, Quota, QuotaState, StoreError, StoreErrorKind};

/// The Lua source of the script the store runs: GCRA, fixed and sliding windows, every quota of
/// a request at once.
pub(crate) const RATE_LIMIT_SCRIPT: &str = include_str!("rate_limit.lua");

/// The Lua source of the concurrency-lease script.
pub(crate) const CONCURRENCY_SCRIPT: &str = include_str!("concurrency.lua");

/// What the time each check sends is: a store decides on the server's clock (and sends each
/// check's deadline) or, in tests, on a clock of its own (and sends each check's time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Times {
    /// Each check's time is its deadline on the server's clock (-1: none); the script reads the
    /// server's clock once per call.
    Deadlines,
    /// Each check's time is its own `now`, from the store's test clock; no deadline.
    Given,
}

impl Times {
    /// The first argument of a call of `shapes` shapes (see the header of `rate_limit.lua`):
    /// their number, negative when the checks' times are given.
    pub(crate) fn shapes_arg(self, shapes: usize) -> i64 {
        let n = i64::try_from(shapes).unwrap_or(i64::MAX);
        match self {
            Times::Deadlines => n,
            Times::Given => -n,
        }
    }
}

/// One check's arguments (see the header of `rate_limit.lua`), in one allocation: first its
/// policy's *shape* (the number of quotas, and each quota's algorithm and two parameters,
/// alike for every check of the policy, so a call sends each shape once, however many of its
/// checks share it), then its own: the cost, its time, and each window quota's offset.
#[derive(Debug)]
pub(crate) struct CheckArgs {
    numbers: Vec<i64>,
    /// Where the check's own numbers start.
    own: usize,
}

/// Where the time is among a check's own numbers.
const TIME: usize = 1;

impl CheckArgs {
    /// The arguments of a check of `quotas` for `key` at `cost`, with no time yet (-1).
    pub(crate) fn new(key: &Key<'_>, quotas: &[Quota], cost: u32) -> Self {
        let windows = quotas.iter().filter(|q| is_window(q.algorithm())).count();
        let own = 1 + 3 * quotas.len();
        let mut numbers = Vec::with_capacity(own + 2 + windows);
        numbers.push(i64::try_from(quotas.len()).unwrap_or(i64::MAX));
        for q in quotas {
            match q.algorithm() {
                a if is_window(a) => {
                    let window_ms = i64::try_from(q.period().as_millis()).unwrap_or(i64::MAX);
                    let algo = if a == Algorithm::FixedWindow { 1 } else { 2 };
                    numbers.extend([algo, window_ms, i64::from(q.limit())]);
                }
                _ => numbers.extend([
                    0,
                    micros(q.emission_interval()),
                    micros(q.emission_interval() * q.burst()),
                ]),
            }
        }
        numbers.extend([i64::from(cost), -1]);
        for q in quotas.iter().filter(|q| is_window(q.algorithm())) {
            numbers.push(i64::try_from(window_offset(key, q)).unwrap_or(0));
        }
        CheckArgs { numbers, own }
    }

    /// Sets the check's time: its deadline on the server's clock, or its own `now` under a
    /// test clock ([`Times`]).
    pub(crate) fn set_time(&mut self, time: i64) {
        self.numbers[self.own + TIME] = time;
    }

    /// The policy's shape: the same numbers for every check of the policy.
    pub(crate) fn shape(&self) -> &[i64] {
        &self.numbers[..self.own]
    }

    /// The check's own numbers: cost, time, window offsets.
    pub(crate) fn own(&self) -> &[i64] {
        &self.numbers[self.own..]
    }
}

fn is_window(a: Algorithm) -> bool {
    matches!(a, Algorithm::FixedWindow | Algorithm::SlidingWindow)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// What the script answered.
#[derive(Debug)]
pub(crate) enum Reply {
    /// It decided (and wrote, if the request was allowed) at the server's time `now_us`.
    Decided { decision: Decision, now_us: i64 },
    /// It ran past the caller's deadline and wrote nothing.
    Late { now_us: i64 },
}

impl Reply {
    /// The server's time the script ran at (0 when a test clock gave the times: then nothing
    /// reads it).
    pub(crate) fn now_us(&self) -> i64 {
        match self {
            Reply::Decided { now_us, .. } | Reply::Late { now_us } => *now_us,
        }
    }
}

/// The numbers the script reports for each quota.
pub(crate) const REPLY_FIELDS: usize = 5;

/// One check's reply, as the sending task hands it over: its status (1 allowed, 0 refused, -1
/// late), the server's time of the call, then its quotas' numbers (none when late). Inline for
/// a check of one quota: no allocation.
pub(crate) type CheckReply = SmallVec<[i64; 2 + REPLY_FIELDS]>;

/// Reads one check's reply: `[status, now_us, (allowed, remaining, reset_after_us,
/// retry_after_us, next_unit_us) for each quota]`, or `[-1, now_us]` when it ran past the
/// deadline. Anything else is an invalid response, never a panic or a guess.
pub(crate) fn parse_reply(reply: &[i64], quotas: &[Quota]) -> Result<Reply, StoreError> {
    let invalid = |why: &str| {
        StoreError::with_source(
            StoreErrorKind::InvalidResponse,
            format!("rate-limit script reply {why}: {reply:?}"),
        )
    };
    if let [-1, now_us] = reply {
        return Ok(Reply::Late { now_us: *now_us });
    }
    if reply.len() != 2 + REPLY_FIELDS * quotas.len() {
        return Err(invalid("has the wrong length"));
    }
    if reply.iter().any(|n| *n < 0) {
        return Err(invalid("holds a negative number"));
    }
    let flag = |v: i64| match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(invalid("holds a flag that is neither 0 nor 1")),
    };
    let all = flag(reply[0])?;
    let now_us = reply[1];
    for q in 0..quotas.len() {
        if !flag(reply[2 + REPLY_FIELDS * q])? && all {
            return Err(invalid(
                "allows the request while refusing one of its quotas",
            ));
        }
    }
    let states = quotas.iter().enumerate().map(|(q, quota)| {
        let field = |f: usize| reply[2 + REPLY_FIELDS * q + f];
        let micros = |f: usize| Duration::from_micros(field(f).unsigned_abs());
        let remaining = u32::try_from(field(1)).unwrap_or(u32::MAX);
        QuotaState::new(*quota, field(0) == 1, remaining, micros(2), micros(3))
            .with_next_unit_after(micros(4))
    });
    let decision = Decision::from_states(states);
    if decision.is_allowed() != all {
        return Err(invalid("disagrees with itself"));
    }
    Ok(Reply::Decided { decision, now_us })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(s: &str) -> Quota {
        s.parse().unwrap()
    }

    #[test]
    fn replies_that_are_not_decisions_are_invalid_responses() {
        let q = [quota("5/s")];
        let now = 1_700_000_000_000_000;
        let cases: [&[i64]; 11] = [
            &[],
            &[1],
            &[-1],
            &[-1, 1, 1],
            &[1, now, 1, 4, 200_000],
            // The reply of a script before next_unit_us: one number short per quota.
            &[1, now, 1, 4, 200_000, 0],
            &[1, now, 1, -4, 200_000, 0, 0],
            &[2, now, 1, 4, 200_000, 0, 0],
            &[1, now, 0, 4, 200_000, 0, 0],
            &[1, -7, 1, 4, 200_000, 0, 0],
            // A quota's own flag that is neither 0 nor 1, in a refusal.
            &[0, now, 2, 4, 200_000, 0, 0],
        ];
        for reply in cases {
            let err = parse_reply(reply, &q).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::InvalidResponse, "{reply:?}");
        }
        // A refusal that says so for every quota is one.
        assert!(parse_reply(&[0, now, 0, 4, 200_000, 0, 0], &q).is_ok());
    }

    #[test]
    fn a_valid_reply_becomes_a_decision() {
        let q = [quota("5/10s"), quota("20/m")];
        let reply = [
            0,
            1_700_000_000_000_000,
            0,
            0,
            10_000_000,
            2_000_000,
            2_000_000,
            1,
            19,
            3_000_000,
            0,
            3_000_000,
        ];
        let Reply::Decided {
            decision: d,
            now_us,
        } = parse_reply(&reply, &q).unwrap()
        else {
            panic!("not a decision");
        };
        assert_eq!(now_us, 1_700_000_000_000_000);
        assert!(d.is_limited());
        assert_eq!(d.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(d.states()[1].remaining(), 19);
        assert_eq!(d.states()[1].next_unit_after(), Duration::from_secs(3));
        assert!(matches!(
            parse_reply(&[-1, 42], &q),
            Ok(Reply::Late { now_us: 42 })
        ));
    }

    #[test]
    fn state_keys_are_named_by_the_quota() {
        let q = quota("10/s burst 20");
        let key = Key::new("p", "/x", None, None::<&str>);
        assert_eq!(
            crate::keys::first_state_key("app:", &key, &q).0,
            "app:{p:/x:-:}:10/s-b20"
        );
        let key = Key::new("t", "/k", None, None::<&str>);
        assert_eq!(
            crate::keys::first_state_key("t:", &key, &quota("3/10s fixed-window")).0,
            "t:{t:/k:-:}:3/10s-fw"
        );
    }

    /// A check's keys, the first written with its tag and the others copied from its head, are
    /// `<prefix>{<tag>}:<quota id>` in the quotas' order, and the range the first gives is the
    /// tag (what the deny cache hashes) in each of them.
    #[test]
    fn a_checks_keys_are_its_quotas_state_keys_with_the_tag_inside() {
        use std::net::{IpAddr, Ipv6Addr};
        let long = "u".repeat(tollgate::key::MAX_USER_LEN + 1);
        let quotas = [
            quota("10/s burst 20"),
            quota("3/10s fixed-window"),
            quota("100/h sliding-window"),
        ];
        let v6 = Some(IpAddr::V6(Ipv6Addr::LOCALHOST));
        for key in [
            Key::new("p", "/x", None, None::<&str>),
            Key::new("a:b{", "/é}", v6, Some("u:~%")),
            Key::new(
                "p",
                "/x",
                Some(IpAddr::from([192, 0, 2, 1])),
                Some(long.as_str()),
            ),
        ] {
            let tag = crate::keys::tag(&key);
            assert_eq!(tag, key.qualified().to_string());
            for n in 1..=quotas.len() {
                let (first, range) = crate::keys::first_state_key("app:", &key, &quotas[0]);
                assert_eq!(&first[range.clone()], tag);
                let keys = crate::keys::state_keys(first, range.end, &quotas[1..n]);
                let named: Vec<String> = quotas[..n]
                    .iter()
                    .map(|q| format!("app:{{{tag}}}:{}", q.id()))
                    .collect();
                assert_eq!(keys.to_vec(), named);
                for k in &keys {
                    assert_eq!(&k[range.clone()], tag);
                }
            }
            assert_eq!(
                crate::keys::inflight_key("app:", &key),
                format!("app:{{{tag}}}:inflight")
            );
        }
    }
}
