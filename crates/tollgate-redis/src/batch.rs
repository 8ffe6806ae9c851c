//! Coalescing: the checks in flight at the same moment go to Redis in one script call.
//!
//! Every check is queued to one task per store. Each hash slot (the one slot 0 off a cluster)
//! has at most four calls out at once; a check whose slot has a call free goes as soon as the
//! tasks that were ready with it have queued theirs (one pass of the scheduler, no timer), with
//! the checks of its slot that queued meanwhile (at most
//! [`RedisStoreBuilder::max_batch`](crate::RedisStoreBuilder::max_batch) per call). The script
//! decides the checks of a call one after the other, as separate calls in that order would, so
//! coalescing changes how many calls Redis runs, never a decision. Under light load every
//! check goes alone: nothing waits for company that is not already there.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use fred::bytes::BytesMut;
use fred::clients::Client;
use fred::prelude::{ClientLike, Error as FredError, ErrorKind as FredErrorKind, LuaInterface};
use fred::prelude::{Options, Value};
use fred::types::scripts::Script;
use fred::types::{Key as FredKey, MultipleKeys};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tollgate::metrics::StoreMetrics;

use crate::msgpack::Ints;
use crate::script::{CheckArgs, CheckReply, REPLY_FIELDS, Times};
use crate::waiters::{self, Waiters};

/// A script and what runs it.
#[derive(Clone)]
pub(crate) struct Runner {
    pub(crate) client: Client,
    pub(crate) options: Options,
    pub(crate) script: Script,
    pub(crate) source: &'static str,
    /// Counts every call sent.
    pub(crate) metrics: StoreMetrics,
}

impl Runner {
    /// EVALSHA, and on NOSCRIPT (a restarted or failed-over server lost its script cache)
    /// SCRIPT LOAD on every primary and EVALSHA once more. NOSCRIPT means the script did not
    /// run, so the retry cannot count a request twice; nothing else is retried.
    pub(crate) async fn eval<A>(&self, keys: Vec<String>, args: Vec<A>) -> Result<Value, FredError>
    where
        A: Into<Value> + Clone + Send,
    {
        let args: Vec<Value> = args.into_iter().map(Into::into).collect();
        self.eval_with(|| (keys.clone(), args.clone())).await
    }

    /// [`eval`](Self::eval) with the call's keys and arguments made by `call`, once for the
    /// first EVALSHA and once more only after a NOSCRIPT: no copy is kept for a retry that
    /// almost never happens.
    pub(crate) async fn eval_with<K, F>(&self, call: F) -> Result<Value, FredError>
    where
        K: Into<MultipleKeys> + Send,
        F: Fn() -> (K, Vec<Value>),
    {
        // fred fails most commands at once while it is not connected (`fail_fast`), but not
        // EVAL/EVALSHA, which wait in its queue for the whole deadline (seen with fred
        // 10.1.0): check the connection here, so that a call while the connection is down
        // fails at once, as documented, instead of costing every request the deadline.
        if !self.client.is_connected() {
            return Err(not_connected());
        }
        let client = self.client.with_options(&self.options);
        let sha = self.script.sha1().clone();
        self.metrics.call();
        let (keys, args) = call();
        // fred's command futures are large (kilobytes): boxed, so that every future holding
        // this one (a check's, a call's in the sending task) stays small, and moving it moves
        // a few words instead of copying them all.
        match Box::pin(client.evalsha::<Value, _, _, _>(sha.clone(), keys, args)).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                #[cfg(feature = "tracing")]
                tracing::info!("rate-limit script not in the Redis script cache; loading it");
                Box::pin(client.script_load_cluster::<(), _>(self.source)).await?;
                self.metrics.call();
                let (keys, args) = call();
                Box::pin(client.evalsha(sha, keys, args)).await
            }
            other => other,
        }
    }
}

/// How many distinct shapes a call looks through for a check's own before it lists the
/// check's shape again: a call carries the checks of a few policies, so this is a bound that
/// no real call reaches, set by the number of policies an operator configured, not by clients.
const SHAPES_SEARCHED: usize = 8;

/// The keys and arguments of one call for `checks`, as Redis receives them (the header of
/// `rate_limit.lua`): the number of shapes (signed by how the checks' times read), each
/// distinct shape once, then each check's own numbers, after its shape's place in the list
/// when there are several. The integers go in one argument, a JSON array: each argument is a
/// frame fred encodes (several hundred instructions, most of them spent working out lengths
/// and digits) and an object Redis parses and frees and Lua interns, where the script decodes
/// one array in one C loop (cjson). The key names and the numbers are written in one buffer,
/// each a slice of it: every key would otherwise be an allocation of its own.
fn encode<'a, I>(times: Times, checks: I) -> (Vec<FredKey>, Vec<Value>)
where
    I: Iterator<Item = (&'a [String], &'a CheckArgs)> + Clone,
{
    // One pass over the checks: each one's shape, as its place in the call's list of
    // shapes, and what the call will hold (key names and their bytes, each check's numbers
    // and its shape's place).
    let mut shapes: SmallVec<[&[i64]; 4]> = SmallVec::new();
    let mut index: SmallVec<[u16; 64]> = SmallVec::new();
    let (mut n_keys, mut name_bytes, mut n_numbers) = (0, 0, 1);
    for (keys, args) in checks.clone() {
        let shape = args.shape();
        let found = shapes
            .iter()
            .take(SHAPES_SEARCHED)
            .position(|s| *s == shape);
        let i = found.unwrap_or_else(|| {
            shapes.push(shape);
            n_numbers += shape.len();
            shapes.len() - 1
        });
        // A call carries at most `max_batch` (at most 1024) checks, so at most that many
        // shapes.
        index.push(u16::try_from(i + 1).unwrap_or(u16::MAX));
        n_keys += keys.len();
        name_bytes += keys.iter().map(String::len).sum::<usize>();
        n_numbers += 1 + args.own().len();
    }
    // Room for the longest integer and its comma (21 bytes) and the brackets, so the buffer
    // never grows: once split, it could only grow into a new allocation.
    let mut buf = BytesMut::with_capacity(name_bytes + n_numbers * 21 + 2);
    let mut keys = Vec::with_capacity(n_keys);
    for (check_keys, _) in checks.clone() {
        for k in check_keys {
            buf.extend_from_slice(k.as_bytes());
            keys.push(FredKey::from(buf.split().freeze()));
        }
    }
    let mut itoa = itoa::Buffer::new();
    buf.extend_from_slice(b"[");
    let mut number = |buf: &mut BytesMut, n: i64| {
        if buf.len() > 1 {
            buf.extend_from_slice(b",");
        }
        buf.extend_from_slice(itoa.format(n).as_bytes());
    };
    number(&mut buf, times.shapes_arg(shapes.len()));
    let one_shape = shapes.len() == 1;
    for shape in &shapes {
        for n in *shape {
            number(&mut buf, *n);
        }
    }
    for ((_, check_args), shape) in checks.zip(index) {
        if !one_shape {
            number(&mut buf, i64::from(shape));
        }
        for n in check_args.own() {
            number(&mut buf, *n);
        }
    }
    buf.extend_from_slice(b"]");
    (keys, vec![Value::Bytes(buf.freeze())])
}

fn not_connected() -> FredError {
    FredError::new(FredErrorKind::Canceled, "not connected to Redis")
}

/// A check's state keys, one per quota: inline for one.
pub(crate) type StateKeys = SmallVec<[String; 1]>;

/// What a check is answered: its reply, or why it has none.
type Answer = Result<CheckReply, FredError>;

/// A check on its way to the sending task.
struct Queued {
    keys: StateKeys,
    args: CheckArgs,
    /// The hash slot of its keys (on a cluster; 0 elsewhere).
    slot: u16,
    /// When its caller stops waiting: the task answers it then if its call has not.
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

/// A check waiting for its call, or in it.
struct Pending {
    keys: StateKeys,
    args: CheckArgs,
    /// Where the task keeps its reply channel and deadline.
    waiter: waiters::Id,
}

/// Sends the rate-limit checks, coalesced.
pub(crate) struct Coalescer {
    runner: Arc<Runner>,
    /// `None` when every check goes alone (`max_batch(1)`).
    queue: Option<mpsc::UnboundedSender<Queued>>,
    clustered: bool,
    /// What each check's time is: the same for every check of a store.
    times: Times,
    /// Checks queued and not sent (nor dropped) yet, at most `max_queued`.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

/// How many calls of one slot are in flight at once: enough to keep Redis busy while a reply
/// travels back and the next call is built; past it, that slot's checks queue and its next
/// call takes them together.
const IN_FLIGHT: usize = 4;

/// The most checks the task takes from its queue at once: all of them under any real load, so
/// that the checks of each slot are seen together; a bound on the work between two looks at
/// the calls that came back.
const TAKE: usize = 1_024;

/// The most times the task lets the other ready tasks run before it sends the checks it took,
/// while each time brings more and no call is full yet (see [`gather`]): a bound on how long
/// a flood can hold the first check back.
const GATHER_ROUNDS: usize = 16;

impl Coalescer {
    /// Starts the task that sends the queued checks, at most `max_batch` per call; past
    /// `max_queued` checks waiting, a check fails at once. The task ends when the coalescer is
    /// dropped. Must be called within a Tokio runtime.
    pub(crate) fn start(
        runner: Runner,
        max_batch: usize,
        max_queued: usize,
        clustered: bool,
        times: Times,
    ) -> Self {
        let runner = Arc::new(runner);
        let queued = Arc::new(AtomicUsize::new(0));
        let queue = (max_batch > 1).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(
                rx,
                Arc::clone(&runner),
                max_batch,
                Arc::clone(&queued),
                times,
            ));
            tx
        });
        Coalescer {
            runner,
            queue,
            clustered,
            times,
            queued,
            max_queued,
        }
    }

    /// The reply of one check (its state keys, one per quota, and its arguments), from the
    /// call that carried it; a [`Timeout`](FredErrorKind::Timeout) error at `deadline` if
    /// that call has not answered by then.
    pub(crate) async fn check(
        &self,
        keys: StateKeys,
        args: CheckArgs,
        deadline: Instant,
    ) -> Result<CheckReply, FredError> {
        let Some(queue) = &self.queue else {
            let call = self
                .runner
                .eval_with(|| encode(self.times, std::iter::once((&keys[..], &args))));
            let reply = tokio::time::timeout_at(deadline, call)
                .await
                .map_err(|_| deadline_passed())??;
            return split_reply(&reply, std::iter::once(keys.len())).map(|mut r| r.swap_remove(0));
        };
        if !self.runner.client.is_connected() {
            return Err(not_connected());
        }
        let slot = match (self.clustered, keys.first()) {
            (true, Some(k)) => fred::util::redis_keyslot(k.as_bytes()),
            _ => 0,
        };
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(FredError::new(
                FredErrorKind::Backpressure,
                "too many rate-limit checks waiting for Redis (max_queued)",
            ));
        }
        let (reply, answer) = oneshot::channel();
        let check = Queued {
            keys,
            args,
            slot,
            deadline,
            reply,
        };
        if queue.send(check).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// What a check whose deadline passed before its call answered is told.
fn deadline_passed() -> FredError {
    FredError::new(
        FredErrorKind::Timeout,
        "Redis did not answer within the store's deadline",
    )
}

fn stopped() -> FredError {
    FredError::new(
        FredErrorKind::Canceled,
        "the store's sending task stopped (its Tokio runtime shut down), or the call \
         carrying this check panicked",
    )
}

/// The task. Each slot (the one slot 0 off a cluster) has at most `IN_FLIGHT` calls out; a
/// check of a slot with a call free goes once the tasks ready with it have queued theirs
/// ([`gather`]), with every check of its slot that queued meanwhile (at most `max_batch` per
/// call). Under light load every call carries one check; under load the checks of a busy slot
/// queue while Redis works on its calls, and the next call takes them together. Checks of
/// different slots never wait for each other. The task answers every check: with its call's
/// reply, or when its deadline passes first.
async fn run(
    mut queue: mpsc::UnboundedReceiver<Queued>,
    runner: Arc<Runner>,
    max_batch: usize,
    queued: Arc<AtomicUsize>,
    times: Times,
) {
    // The calls out, driven here rather than each spawned as a task of its own: spawning
    // costs a task and, on a busy runtime, waking another worker to steal it; the call's work
    // is fred's (its own task writes and reads), so this task only waits for the replies.
    let mut calls = FuturesUnordered::new();
    let mut slots: HashMap<u16, Slot, BuildHasherDefault<SlotHash>> = HashMap::default();
    let mut taken = Vec::new();
    let mut waiters: Waiters<Answer> = Waiters::default();
    // One timer for every check's deadline, set to the first one owed. It is moved earlier
    // when a check's deadline comes before it, never later: when it fires for a check that
    // was answered meanwhile, it is set again to the first one still owed. So it is reset
    // about once per deadline's length, not once per check or per call.
    let mut timer = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut armed: Option<Instant> = None;
    loop {
        let event = std::future::poll_fn(|cx| {
            if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            if let Poll::Ready(Some(done)) = calls.poll_next_unpin(cx) {
                return Poll::Ready(Event::Done(done));
            }
            queue
                .poll_recv_many(cx, &mut taken, TAKE)
                .map(Event::Queued)
        })
        .await;
        let mut ready: Vec<u16> = Vec::new();
        match event {
            Event::Queued(0) => return,
            Event::Queued(_) => {
                gather(&mut queue, &mut taken, max_batch).await;
                let now = Instant::now();
                for check in taken.drain(..) {
                    // A caller that gave up (its request was dropped) is not sent: what nobody
                    // waits for must not count against the client.
                    if check.reply.is_closed() {
                        queued.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    // Nor one whose deadline passed while it queued (a task held up on a busy
                    // runtime): its caller is answered now, and nothing is sent for it.
                    if check.deadline <= now {
                        queued.fetch_sub(1, Ordering::AcqRel);
                        let _ = check.reply.send(Err(deadline_passed()));
                        continue;
                    }
                    let waiter = waiters.insert(check.reply, check.deadline);
                    let slot = slots.entry(check.slot).or_default();
                    if slot.waiting.is_empty() {
                        ready.push(check.slot);
                    }
                    slot.waiting.push_back(Pending {
                        keys: check.keys,
                        args: check.args,
                        waiter,
                    });
                }
            }
            Event::Done(done) => {
                match done.replies {
                    Some(Ok(replies)) => {
                        for (id, reply) in done.checks.into_iter().zip(replies) {
                            waiters.answer(id, Ok(reply));
                        }
                    }
                    Some(Err(e)) => {
                        for id in done.checks {
                            waiters.answer(id, Err(e.clone()));
                        }
                    }
                    None => {
                        for id in done.checks {
                            waiters.answer(id, Err(stopped()));
                        }
                    }
                }
                waiters.prune();
                if let Some(s) = slots.get_mut(&done.slot) {
                    s.in_flight -= 1;
                }
                ready.push(done.slot);
            }
            Event::Timer => {
                armed = None;
                waiters.expire(Instant::now(), || Err(deadline_passed()));
            }
        }
        if let Some(first) = waiters.next_deadline()
            && armed.is_none_or(|at| first < at)
        {
            timer.as_mut().reset(first);
            armed = Some(first);
        }
        for id in ready {
            let Some(slot) = slots.get_mut(&id) else {
                continue;
            };
            while slot.in_flight < IN_FLIGHT && !slot.waiting.is_empty() {
                let mut checks = Vec::with_capacity(max_batch.min(slot.waiting.len()));
                while checks.len() < max_batch
                    && let Some(check) = slot.waiting.pop_front()
                {
                    queued.fetch_sub(1, Ordering::AcqRel);
                    // Not sent: a check answered already (its deadline passed while it waited
                    // for a call), or whose caller gave up.
                    if waiters.is_waiting(check.waiter) {
                        checks.push(check);
                    } else {
                        waiters.forget(check.waiter);
                    }
                }
                if checks.is_empty() {
                    break;
                }
                slot.in_flight += 1;
                let runner = Arc::clone(&runner);
                calls.push(returning(id, send(runner, times, checks)));
            }
            if slot.in_flight == 0 && slot.waiting.is_empty() {
                slots.remove(&id);
            }
        }
    }
}

/// Takes the checks that the tasks ready at the same moment as the first one queue, before
/// any of them is sent. Tokio runs a task woken by the running one next (its LIFO slot), so
/// this task wakes as soon as the first check is queued, ahead of the tasks that were ready
/// with it (the other requests read in the same pass over the sockets): sent at once, that
/// check would go in a call of its own and the others in the next calls, and under a moderate
/// load every call would carry one check, each costing the service more than the check itself.
/// Each yield puts this task behind them. It stops as soon as a yield brings nothing new, or
/// once it holds a full call (`enough`), or after `GATHER_ROUNDS` yields: under light load a
/// check waits one pass of the scheduler, with no timer and no fixed delay. Meanwhile the task
/// does not look at the calls that came back or at its timer: under a flood, their checks are
/// answered up to that many passes later.
async fn gather(
    queue: &mut mpsc::UnboundedReceiver<Queued>,
    taken: &mut Vec<Queued>,
    enough: usize,
) {
    for _ in 0..GATHER_ROUNDS {
        if taken.len() >= enough {
            return;
        }
        tokio::task::yield_now().await;
        let before = taken.len();
        while taken.len() < TAKE
            && let Ok(check) = queue.try_recv()
        {
            taken.push(check);
        }
        if taken.len() == before {
            return;
        }
    }
}

/// A call that came back.
struct Done {
    /// Its slot.
    slot: u16,
    /// Its checks, in order.
    checks: Vec<waiters::Id>,
    /// Their replies, in the same order; `None` if the call panicked.
    replies: Option<Result<Vec<CheckReply>, FredError>>,
}

/// A call of slot `slot` for `checks`, which answers its slot and checks when it ends, however
/// it ends. One that panics (nothing in it should) loses only its own checks, whose callers
/// then hear that their call stopped, not the sending task: the slot gets its place back and
/// every later check is sent as before.
fn returning(
    slot: u16,
    (checks, call): (
        Vec<waiters::Id>,
        impl Future<Output = Result<Vec<CheckReply>, FredError>>,
    ),
) -> impl Future<Output = Done> {
    AssertUnwindSafe(call)
        .catch_unwind()
        .map(move |replies| Done {
            slot,
            checks,
            replies: replies.ok(),
        })
}

/// What woke the task.
enum Event {
    /// This many checks were taken from the queue (0: the store is gone).
    Queued(usize),
    /// A call came back.
    Done(Done),
    /// The first deadline owed has come.
    Timer,
}

/// The hash of a slot number in the task's table of slots: one multiplication, where the
/// default hasher (SipHash) cost about a hundred instructions a check. Slots are at most 16 384
/// numbers (a CRC16 of the key, on a cluster; 0 elsewhere), so nothing a client sends can crowd
/// the table past that.
#[derive(Default)]
struct SlotHash(u64);

impl Hasher for SlotHash {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A slot's calls out and checks waiting for one.
#[derive(Default)]
struct Slot {
    in_flight: usize,
    waiting: VecDeque<Pending>,
}

/// One call for `checks`: their ids, and the call, which gives their replies in the same order.
fn send(
    runner: Arc<Runner>,
    times: Times,
    checks: Vec<Pending>,
) -> (
    Vec<waiters::Id>,
    impl Future<Output = Result<Vec<CheckReply>, FredError>>,
) {
    let ids = checks.iter().map(|c| c.waiter).collect();
    let call = async move {
        let reply = runner
            .eval_with(|| encode(times, checks.iter().map(|c| (&c.keys[..], &c.args))))
            .await?;
        split_reply(&reply, checks.iter().map(|c| c.keys.len()))
    };
    (ids, call)
}

/// The script's reply to a call (one MessagePack array of integers, [`Ints`]) split into the
/// replies of its checks, each of which has the given number of quotas (its state keys):
/// `[now, then for each check its status and, unless it is -1 (late), five numbers per
/// quota]` (the header of `rate_limit.lua`). Each check's
/// reply is `[status, now, its numbers]`. Anything but integers laid out so is a parse error
/// (an invalid response) for every check of the call, never a guess.
fn split_reply(
    reply: &Value,
    quotas: impl ExactSizeIterator<Item = usize>,
) -> Result<Vec<CheckReply>, FredError> {
    let invalid = |why: &str| {
        FredError::new(
            FredErrorKind::Parse,
            format!("rate-limit script reply {why}: {reply:?}"),
        )
    };
    let bytes: &[u8] = match reply {
        Value::Bytes(b) => b,
        Value::String(s) => s.as_bytes(),
        _ => return Err(invalid("is not a string")),
    };
    let mut numbers = Ints::new(bytes)
        .ok_or_else(|| invalid("is not an array"))?
        .map(|n| n.ok_or_else(|| invalid("holds a value that is not an integer")));
    let short = || invalid("is shorter than its checks");
    let now = numbers.next().ok_or_else(short)??;
    let mut replies = Vec::with_capacity(quotas.len());
    for n in quotas {
        let mut check = CheckReply::new();
        let status = numbers.next().ok_or_else(short)??;
        check.extend([status, now]);
        if status != -1 {
            for _ in 0..REPLY_FIELDS * n {
                check.push(numbers.next().ok_or_else(short)??);
            }
        }
        replies.push(check);
    }
    if numbers.next().is_some() {
        return Err(invalid("is longer than its checks"));
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_answers_its_slot_and_checks_however_it_ends() {
        let (a, b) = {
            let mut w = Waiters::<()>::default();
            let far = Instant::now() + std::time::Duration::from_secs(60);
            (
                w.insert(oneshot::channel().0, far),
                w.insert(oneshot::channel().0, far),
            )
        };
        let done = returning(7, (vec![a, b], async { Ok(Vec::new()) }))
            .now_or_never()
            .unwrap();
        assert_eq!((done.slot, done.checks), (7, vec![a, b]));
        assert!(matches!(done.replies, Some(Ok(r)) if r.is_empty()));
        // A panicking call still gives its slot's place back and names its checks, so that
        // they are answered.
        let call = async { panic!("a call that panics") };
        let done = returning(9, (vec![b], call)).now_or_never().unwrap();
        assert_eq!((done.slot, done.checks), (9, vec![b]));
        assert!(done.replies.is_none());
    }

    /// A call's numbers as the script reads them: one argument, a JSON array of integers.
    fn numbers(args: &[Value]) -> Vec<String> {
        let [Value::Bytes(b)] = args else {
            panic!("not one argument of bytes: {args:?}");
        };
        let text = std::str::from_utf8(b).unwrap();
        let items = text
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .unwrap_or_else(|| panic!("not an array: {text}"));
        items
            .split(',')
            .map(|n| {
                assert!(n.parse::<i64>().is_ok(), "not an integer: {n:?} in {text}");
                n.to_owned()
            })
            .collect()
    }

    fn check(policy: &str, quotas: &[&str], cost: u32, time: i64) -> CheckArgs {
        let quotas: Vec<tollgate::Quota> = quotas.iter().map(|q| q.parse().unwrap()).collect();
        let key = tollgate::Key::new(policy, "/x", None, Some("u"));
        let mut args = CheckArgs::new(&key, &quotas, cost);
        args.set_time(time);
        args
    }

    #[test]
    fn a_call_carries_every_key_and_integer_of_its_checks_in_order() {
        let keys_a = vec!["tollgate:{a}:q1".to_owned(), "tollgate:{a}:q2".to_owned()];
        let keys_b = vec![String::new()];
        let a = check("a", &["5/s", "100/m"], 2, i64::MAX);
        let b = check("b", &["7/s"], 0, i64::MIN);
        let checks = [(&keys_a, &a), (&keys_b, &b)];
        let (keys, args) = encode(Times::Deadlines, checks.iter().map(|(k, a)| (&k[..], *a)));
        let keys: Vec<&str> = keys.iter().map(|k| k.as_str().unwrap()).collect();
        assert_eq!(keys, ["tollgate:{a}:q1", "tollgate:{a}:q2", ""]);
        let expected = [
            // Two shapes (positive: the times are deadlines): GCRA 5/s (T 200 ms, span 1 s)
            // and 100/m; then 7/s.
            2,
            2,
            0,
            200_000,
            1_000_000,
            0,
            600_000,
            60_000_000,
            1,
            0,
            // 7/s: T rounded up to a whole microsecond, as the store keeps it.
            142_858,
            1_000_006,
            // The first check: shape 1, cost 2, its time; the second: shape 2, cost 0.
            1,
            2,
            i64::MAX,
            2,
            0,
            i64::MIN,
        ]
        .map(|n| n.to_string());
        assert_eq!(numbers(&args), expected);
    }

    #[test]
    fn checks_of_one_policy_send_its_shape_once_and_windows_their_own_offsets() {
        let keys = ["k1".to_owned(), "k2".to_owned()];
        let window = ["5/s", "100/m sliding-window"];
        let checks = [
            check("a", &window, 1, 10),
            check("a", &["5/s"], 1, 11),
            check("b", &window, 3, 12),
        ];
        let (_, args) = encode(Times::Given, checks.iter().map(|a| (&keys[..], a)));
        let got = numbers(&args);
        // Two shapes (the window policy's, the GCRA one's), each sent once; negative: the
        // times are given.
        assert_eq!(got[..2], ["-2", "2"]);
        assert_eq!(got[2..8], ["0", "200000", "1000000", "2", "60000", "100"]);
        assert_eq!(got[8..12], ["1", "0", "200000", "1000000"]);
        // Each check: its shape, cost, time, then the sliding window's offset for its key.
        let offset = |policy: &str| {
            let key = tollgate::Key::new(policy, "/x", None, Some("u"));
            let q: tollgate::Quota = "100/m sliding-window".parse().unwrap();
            tollgate::store::window_offset(&key, &q).to_string()
        };
        assert_eq!(got[12..16], ["1", "1", "10", offset("a").as_str()]);
        assert_eq!(got[16..19], ["2", "1", "11"]);
        assert_eq!(got[19..], ["1", "3", "12", offset("b").as_str()]);
        assert_ne!(offset("a"), offset("b"), "keys of one window offset alike");
    }

    #[test]
    fn the_checks_of_a_call_of_one_shape_send_only_their_own_numbers() {
        let keys = ["k".to_owned()];
        let checks = [check("a", &["5/s"], 1, 10), check("b", &["5/s"], 2, 11)];
        let (_, args) = encode(Times::Deadlines, checks.iter().map(|a| (&keys[..], a)));
        let expected = [1, 1, 0, 200_000, 1_000_000, 1, 10, 2, 11].map(|n| n.to_string());
        assert_eq!(numbers(&args), expected);
    }

    #[test]
    fn a_call_of_many_shapes_lists_each_beyond_the_searched_ones_again() {
        // More shapes than a call looks through: each check still names a shape equal to its
        // own, so the script decides it with its own quotas.
        let keys = ["k".to_owned()];
        let checks: Vec<CheckArgs> = (1..=SHAPES_SEARCHED as u32 + 3)
            .chain(1..=SHAPES_SEARCHED as u32 + 3)
            .map(|n| check("p", &[&format!("{n}/s")], 1, -1))
            .collect();
        let (_, args) = encode(Times::Deadlines, checks.iter().map(|a| (&keys[..], a)));
        let got: Vec<i64> = numbers(&args).iter().map(|n| n.parse().unwrap()).collect();
        let n_shapes = usize::try_from(got[0]).unwrap();
        let shapes: Vec<&[i64]> = got[1..1 + 4 * n_shapes].chunks(4).collect();
        let sent: Vec<&[i64]> = got[1 + 4 * n_shapes..].chunks(3).collect();
        assert_eq!(sent.len(), checks.len());
        for (args, sent) in checks.iter().zip(&sent) {
            let shape = usize::try_from(sent[0]).unwrap();
            assert_eq!(shapes[shape - 1], args.shape());
            assert_eq!(&sent[1..], args.own());
        }
        // The first SHAPES_SEARCHED shapes are found again; the three beyond them are listed
        // once more for their second checks.
        assert_eq!(n_shapes, SHAPES_SEARCHED + 3 + 3);
    }

    #[test]
    fn a_reply_that_is_not_laid_out_for_its_checks_is_a_parse_error() {
        let packed = |numbers: &[i64]| Value::Bytes(crate::msgpack::pack(numbers).into());
        let now = 1_700_000_000_000_000;
        let cases = [
            Value::Null,
            Value::Integer(1),
            // An array replied as such (the layout before the reply was packed).
            Value::Array(vec![
                Value::Integer(now),
                Value::Integer(-1),
                Value::Integer(-1),
            ]),
            packed(&[]),
            // Only the time.
            packed(&[now]),
            // The first check one number short, then none for the second.
            packed(&[now, 1, 1, 4, 0, 0]),
            // A number too many.
            packed(&[now, 1, 1, 4, 0, 0, 0, -1, 7]),
            // A number that is not an integer (a one-character string), and a reply cut short.
            Value::Bytes(vec![0x93, 0x01, 0x01, 0xa1, b'4'].into()),
            Value::Bytes(crate::msgpack::pack(&[now, -1, -1])[..20].to_vec().into()),
        ];
        for reply in cases {
            let err = split_reply(&reply, [1, 1].into_iter()).unwrap_err();
            assert_eq!(err.kind(), &FredErrorKind::Parse, "{reply:?}");
        }
        // A decided check of two quotas, a late one (nothing follows its status), a refused
        // one of one quota.
        let numbers: Vec<i64> = [1_700_000_000_000_000, 1]
            .into_iter()
            .chain([1, 9, 0, 0, 0])
            .chain([1, 3, 0, 0, 0])
            .chain([-1])
            .chain([0, 0, 0, 5, 7, 7])
            .collect();
        let reply = packed(&numbers);
        let got = split_reply(&reply, [2, 1, 1].into_iter()).unwrap();
        let t = 1_700_000_000_000_000;
        let want: [&[i64]; 3] = [
            &[1, t, 1, 9, 0, 0, 0, 1, 3, 0, 0, 0],
            &[-1, t],
            &[0, t, 0, 0, 5, 7, 7],
        ];
        assert_eq!(got.len(), 3);
        for (got, want) in got.iter().zip(want) {
            assert_eq!(got.as_slice(), want);
        }
    }
}
