//! What the store knows of the Redis server's clock, so that it can tell a script when its
//! caller gives up, in the server's own time.

use std::sync::{Mutex, PoisonError};

/// How fast an old sample loses credit: clocks drift, and NTP may slew a clock by up to
/// 500 ppm (500 µs per second).
const DRIFT_US_PER_S: u64 = 500;

/// The offset between the store's monotonic clock and the server's `TIME`, learned from the
/// server time that every script reply carries.
///
/// A reply sent at local `s` and received at local `r` that says the server's time was `t`
/// bounds the offset to `[t - r, t - s]`: the midpoint is off by at most half the round trip,
/// however long the command waited in a queue. The sample with the smallest bound is kept, and
/// its bound grows with its age; a sample that does not overlap the current estimate (the
/// server or its clock changed) replaces it at once. One sample is kept whole behind a lock, so
/// an offset is never paired with another sample's bound.
#[derive(Debug)]
pub(crate) struct ServerClock {
    estimate: Mutex<Option<Estimate>>,
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Server µs minus local µs.
    offset_us: i64,
    /// Half the round trip of the sample, in µs.
    uncertainty_us: u64,
    /// Local µs when the sample arrived.
    sampled_at_us: u64,
}

impl Estimate {
    /// The bound on the offset's error at local time `now`.
    fn uncertainty_at(&self, now: u64) -> u64 {
        let age = now.saturating_sub(self.sampled_at_us);
        self.uncertainty_us
            .saturating_add(age.saturating_mul(DRIFT_US_PER_S) / 1_000_000)
    }
}

impl ServerClock {
    pub(crate) fn new() -> Self {
        ServerClock {
            estimate: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Estimate> {
        *self.estimate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Learns from a reply sent at local `sent`, received at local `received`, that says the
    /// server's time was `server` (all µs).
    pub(crate) fn sample(&self, sent: u64, received: u64, server: i64) {
        let half = received.saturating_sub(sent) / 2;
        let mid = i64::try_from(sent.saturating_add(half)).unwrap_or(i64::MAX);
        let offset = server.saturating_sub(mid);
        let mut estimate = self.estimate.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = *estimate {
            let bound = current.uncertainty_at(received);
            let (lo, hi) = (
                offset.saturating_sub_unsigned(half),
                offset.saturating_add_unsigned(half),
            );
            let consistent = hi >= current.offset_us.saturating_sub_unsigned(bound)
                && lo <= current.offset_us.saturating_add_unsigned(bound);
            if consistent && half > bound {
                return;
            }
        }
        *estimate = Some(Estimate {
            offset_us: offset,
            uncertainty_us: half,
            sampled_at_us: received,
        });
    }

    /// The deadline to send with a call made at local `sent` that its caller abandons
    /// `timeout` µs later: the server time after which the script must not write, or -1 while
    /// the offset is unknown.
    ///
    /// It is earlier than the caller's deadline by the offset's uncertainty and an allowance
    /// for the reply's way back (a tenth of the timeout, at least 1 ms), so that a script that
    /// writes still gets its answer to the caller in time. The margin is at most half the
    /// timeout: a store that knows the server's clock that badly still refuses the latest
    /// writes.
    pub(crate) fn deadline(&self, sent: u64, timeout_us: u64) -> i64 {
        let Some(estimate) = self.current() else {
            return -1;
        };
        let allowance = (timeout_us / 10).max(1_000);
        let margin = estimate
            .uncertainty_at(sent)
            .saturating_add(allowance)
            .min(timeout_us / 2);
        let local_deadline = sent.saturating_add(timeout_us - margin);
        i64::try_from(local_deadline)
            .unwrap_or(i64::MAX)
            .saturating_add(estimate.offset_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_the_first_reply() {
        let c = ServerClock::new();
        assert_eq!(c.deadline(0, 100_000), -1);
        // Sent at 1000, back at 1200: the server said 5_000_100.
        c.sample(1_000, 1_200, 5_000_100);
        // Offset 5_000_100 - 1_100 = 4_999_000, uncertain by 100 µs; margin 100 + 10 000.
        assert_eq!(
            c.deadline(2_000, 100_000),
            2_000 + 100_000 - 10_100 + 4_999_000
        );
    }

    #[test]
    fn the_tightest_sample_wins_and_ages() {
        let c = ServerClock::new();
        c.sample(0, 1_000, 10_500); // offset 10_000 ± 500
        c.sample(2_000, 2_100, 12_055); // offset 10_005 ± 50: tighter, consistent
        assert_eq!(c.current().unwrap().offset_us, 10_005);
        c.sample(3_000, 4_000, 13_600); // ± 500, consistent: not better
        assert_eq!(c.current().unwrap().offset_us, 10_005);
        // Ten seconds later the kept sample is worth 50 + 5 000 µs: a ± 500 one replaces it.
        c.sample(10_002_000, 10_003_000, 10_012_505);
        assert_eq!(c.current().unwrap().uncertainty_us, 500);
    }

    #[test]
    fn a_server_whose_clock_changed_is_relearned_at_once() {
        let c = ServerClock::new();
        c.sample(0, 100, 1_000_050); // offset 1_000_000 ± 50
        // A failover to a server 3 s behind: the sample contradicts the estimate.
        c.sample(1_000, 3_000, 2_000 - 3_000_000);
        assert_eq!(c.current().unwrap().offset_us, -3_000_000);
        assert_eq!(c.current().unwrap().uncertainty_us, 1_000);
    }

    #[test]
    fn a_poor_estimate_still_leaves_half_the_timeout() {
        let c = ServerClock::new();
        c.sample(0, 400_000, 200_000); // ± 200 ms
        assert_eq!(c.deadline(0, 100_000), 50_000);
    }
}
