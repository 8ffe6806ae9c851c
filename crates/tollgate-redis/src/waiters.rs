//! The checks the sending task owes an answer, and their deadlines: one timer for all of them.
//!
//! Each check used to wait for its call under a Tokio timer of its own, registered and
//! removed once per check (about 900 of the client's 15k instructions per coalesced check).
//! The sending task answers every check anyway, so it also keeps the deadlines: they are
//! ordered (every check of a store waits the same time, so they come nearly in order), and the
//! task sleeps until the first one. A check is answered exactly once: by its call's reply, or
//! when its deadline passes, whichever comes first.

use std::collections::VecDeque;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// A waiting check, as its call knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Id {
    index: u32,
    /// Which of the checks that used this index: an answered check's id never answers the next.
    generation: u32,
}

struct Entry<T> {
    generation: u32,
    reply: Option<oneshot::Sender<T>>,
}

/// The checks owed an answer: their reply channels, reused by index, and their deadlines in
/// order.
pub(crate) struct Waiters<T> {
    entries: Vec<Entry<T>>,
    /// The indexes of `entries` without a reply channel, for the next checks.
    free: Vec<u32>,
    /// Every check not yet answered, earliest deadline first; answered ones leave from the
    /// front as they reach it ([`prune`](Self::prune)).
    deadlines: VecDeque<(Instant, Id)>,
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters {
            entries: Vec::new(),
            free: Vec::new(),
            deadlines: VecDeque::new(),
        }
    }
}

impl<T> Waiters<T> {
    /// Owes `reply` an answer by `deadline`.
    pub(crate) fn insert(&mut self, reply: oneshot::Sender<T>, deadline: Instant) -> Id {
        let id = match self.free.pop() {
            Some(index) => {
                let entry = &mut self.entries[index as usize];
                entry.reply = Some(reply);
                Id {
                    index,
                    generation: entry.generation,
                }
            }
            None => {
                // As many checks as wait at once: at most `max_queued` plus those in flight,
                // which u32::MAX of them (hundreds of gigabytes of waiting checks) would
                // exceed long before the index could.
                let index = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
                self.entries.push(Entry {
                    generation: 0,
                    reply: Some(reply),
                });
                Id {
                    index,
                    generation: 0,
                }
            }
        };
        // Deadlines arrive in order but for the time between a caller reading the clock and
        // queueing its check: walk back from the end past the few that came before it.
        if self
            .deadlines
            .back()
            .is_none_or(|(last, _)| *last <= deadline)
        {
            self.deadlines.push_back((deadline, id));
        } else {
            let at = self
                .deadlines
                .iter()
                .rposition(|(d, _)| *d <= deadline)
                .map_or(0, |i| i + 1);
            self.deadlines.insert(at, (deadline, id));
        }
        id
    }

    fn live(&self, id: Id) -> Option<&oneshot::Sender<T>> {
        live(&self.entries, id)
    }

    /// How many checks are owed an answer: every entry holds a reply channel but the free ones.
    fn owed(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Whether `id` is owed an answer and its caller still waits for it (it did not give up).
    pub(crate) fn is_waiting(&self, id: Id) -> bool {
        self.live(id).is_some_and(|r| !r.is_closed())
    }

    /// Takes `id`'s reply channel, when it is still owed an answer.
    fn take(&mut self, id: Id) -> Option<oneshot::Sender<T>> {
        self.live(id)?;
        let entry = &mut self.entries[id.index as usize];
        entry.generation = entry.generation.wrapping_add(1);
        self.free.push(id.index);
        entry.reply.take()
    }

    /// Answers `id` with `value`, unless it was answered already (its deadline passed first).
    pub(crate) fn answer(&mut self, id: Id, value: T) {
        if let Some(reply) = self.take(id) {
            // The caller may have given up meanwhile; then nobody reads this.
            let _ = reply.send(value);
        }
    }

    /// Forgets `id` without an answer: its caller gave up.
    pub(crate) fn forget(&mut self, id: Id) {
        self.take(id);
    }

    /// Answers with `value()` every check whose deadline is `now` or earlier.
    pub(crate) fn expire(&mut self, now: Instant, mut value: impl FnMut() -> T) {
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now && self.live(id).is_some() {
                break;
            }
            self.deadlines.pop_front();
            self.answer(id, value());
        }
    }

    /// Drops the answered checks from the front of the deadlines; and, when a check owed an
    /// answer for long (its call stuck on a frozen server) holds many answered ones behind it,
    /// all of those: the deadlines kept stay within twice the checks owed (and a few more),
    /// not as many as a deadline's length of traffic.
    pub(crate) fn prune(&mut self) {
        while let Some(&(_, id)) = self.deadlines.front() {
            if self.live(id).is_some() {
                break;
            }
            self.deadlines.pop_front();
        }
        let room = 2 * self.owed() + 64;
        if self.deadlines.len() > room {
            let entries = &self.entries;
            self.deadlines
                .retain(|(_, id)| live(entries, *id).is_some());
            self.deadlines.shrink_to(room);
        }
    }

    /// The first deadline still owed, once [`prune`](Self::prune)d; otherwise possibly that of
    /// a check answered since, which is early, never late.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|(d, _)| *d)
    }

    /// How many deadlines are kept (the owed ones and the answered ones behind them).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.deadlines.len()
    }
}

/// `id`'s reply channel in `entries`, when it is still owed an answer.
fn live<T>(entries: &[Entry<T>], id: Id) -> Option<&oneshot::Sender<T>> {
    entries
        .get(id.index as usize)
        .filter(|e| e.generation == id.generation)
        .and_then(|e| e.reply.as_ref())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(ms: u64) -> Instant {
        // One base for the whole test process: instants compare across tests' helpers.
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    #[test]
    fn each_check_is_answered_once_by_its_reply_or_its_deadline() {
        let mut w = Waiters::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        let (tx3, mut rx3) = oneshot::channel();
        let a = w.insert(tx1, at(10));
        let b = w.insert(tx2, at(20));
        let c = w.insert(tx3, at(30));
        assert_eq!(w.next_deadline(), Some(at(10)));
        // b's reply comes first.
        w.answer(b, "reply");
        assert_eq!(rx2.try_recv(), Ok("reply"));
        // At 20 ms, a's deadline has passed; c's has not.
        w.expire(at(20), || "late");
        assert_eq!(rx1.try_recv(), Ok("late"));
        assert!(rx3.try_recv().is_err());
        assert_eq!(w.next_deadline(), Some(at(30)));
        // a's reply arrives after its deadline: it is not answered twice, and its index,
        // reused, does not reach the check now using it.
        let (tx4, mut rx4) = oneshot::channel();
        let d = w.insert(tx4, at(40));
        assert_eq!(d.index, a.index);
        w.answer(a, "stale");
        assert!(rx4.try_recv().is_err());
        assert!(w.is_waiting(d));
        w.answer(d, "fresh");
        assert_eq!(rx4.try_recv(), Ok("fresh"));
        w.expire(at(100), || "late");
        assert_eq!(rx3.try_recv(), Ok("late"));
        assert_eq!(w.next_deadline(), None);
        assert!(!w.is_waiting(c));
    }

    #[test]
    fn a_deadline_that_arrives_out_of_order_is_still_kept_in_order() {
        let mut w = Waiters::default();
        let mut rxs = Vec::new();
        for ms in [10, 30, 20, 25, 5] {
            let (tx, rx) = oneshot::channel();
            w.insert(tx, at(ms));
            rxs.push((ms, rx));
        }
        assert_eq!(w.next_deadline(), Some(at(5)));
        w.expire(at(24), || ());
        for (ms, rx) in &mut rxs {
            assert_eq!(rx.try_recv().is_ok(), *ms <= 24, "{ms} ms");
        }
        assert_eq!(w.next_deadline(), Some(at(25)));
    }

    #[test]
    fn answered_checks_leave_the_deadlines_and_given_up_ones_are_not_waiting() {
        let mut w = Waiters::default();
        let mut ids = Vec::new();
        let mut rxs = Vec::new();
        for ms in 0..100 {
            let (tx, rx) = oneshot::channel::<u32>();
            ids.push(w.insert(tx, at(1_000 + ms)));
            rxs.push(rx);
        }
        for id in &ids[..60] {
            w.answer(*id, 1);
        }
        w.prune();
        assert_eq!(w.kept(), 40);
        // Answered checks behind one still owed leave too once they outnumber the owed ones.
        let mut late = Vec::new();
        for _ in 0..200 {
            let (tx, rx) = oneshot::channel::<u32>();
            late.push((w.insert(tx, at(3_000)), rx));
        }
        for (id, _) in &late {
            w.answer(*id, 3);
        }
        assert_eq!(w.kept(), 240);
        w.prune();
        assert_eq!(w.kept(), 40, "only the owed ones are kept");
        assert_eq!(w.next_deadline(), Some(at(1_060)));
        // A caller that gave up.
        drop(rxs.pop());
        assert!(!w.is_waiting(ids[99]));
        assert!(w.is_waiting(ids[98]));
        w.forget(ids[99]);
        // Indexes are reused: waiting checks never take more room than the most at once.
        let room = w.entries.len();
        for _ in 0..1_000 {
            let (tx, _rx) = oneshot::channel::<u32>();
            let id = w.insert(tx, at(2_000));
            w.answer(id, 2);
            w.prune();
        }
        assert_eq!(w.entries.len(), room);
        assert!(w.kept() <= 2 * 39 + 64 + 1, "{} deadlines kept", w.kept());
    }

    /// Owed checks (the first stuck, `owed - 1` more after them) with `answered` answered ones
    /// between, then pruned: how many deadlines are kept.
    fn kept_after_prune(owed: usize, answered: usize) -> usize {
        let mut w = Waiters::default();
        let mut rxs = Vec::new();
        let mut add = |w: &mut Waiters<()>, ms| {
            let (tx, rx) = oneshot::channel();
            rxs.push(rx);
            w.insert(tx, at(ms))
        };
        add(&mut w, 0);
        let done: Vec<Id> = (0..answered).map(|_| add(&mut w, 1)).collect();
        for _ in 1..owed {
            add(&mut w, 2);
        }
        for id in done {
            w.answer(id, ());
        }
        w.prune();
        w.kept()
    }

    #[test]
    fn answered_deadlines_are_dropped_past_twice_the_owed_ones_and_64_not_before() {
        // 101 owed: room for 266. 150 answered behind the stuck one are kept (a compaction
        // walks every deadline: it waits until they outnumber the owed ones well) ...
        assert_eq!(kept_after_prune(101, 150), 251);
        // ... up to the bound itself, and dropped one past it.
        assert_eq!(kept_after_prune(1, 65), 66);
        assert_eq!(kept_after_prune(1, 66), 1);
        assert_eq!(kept_after_prune(101, 166), 101);
    }

    #[test]
    fn a_check_forgotten_or_due_now_is_owed_nothing_more() {
        let mut w = Waiters::default();
        let (tx1, _rx1) = oneshot::channel::<()>();
        let (tx2, mut rx2) = oneshot::channel();
        let (tx3, mut rx3) = oneshot::channel();
        let a = w.insert(tx1, at(10));
        let b = w.insert(tx2, at(20));
        w.insert(tx3, at(30));
        // Its caller gave up: its deadline no longer holds the timer.
        w.forget(a);
        assert!(!w.is_waiting(a));
        w.prune();
        assert_eq!(w.next_deadline(), Some(at(20)));
        // A deadline that is now is due now, not a tick later.
        w.expire(at(20), || ());
        assert_eq!(rx2.try_recv(), Ok(()));
        assert!(!w.is_waiting(b));
        assert!(rx3.try_recv().is_err());
        assert_eq!(w.next_deadline(), Some(at(30)));
    }
}
