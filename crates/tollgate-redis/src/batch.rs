//! Coalescing: the checks in flight at the same moment go to Redis in one script call.
//!
//! Every check is queued to one task per store, which takes whatever has queued since it last
//! looked (at most [`RedisStoreBuilder::max_batch`](crate::RedisStoreBuilder::max_batch)
//! checks; on a cluster, checks of one hash slot) and sends it as one `EVALSHA`, without
//! waiting for the answer before it looks again. The script decides the checks one after the
//! other, as separate calls in that order would, so coalescing changes how many calls Redis
//! runs, never a decision. Under light load a check finds the queue empty and goes alone, at
//! once: nothing waits for company.

use fred::clients::Client;
use fred::prelude::{ClientLike, Error as FredError, ErrorKind as FredErrorKind, LuaInterface};
use fred::prelude::{Options, Value};
use fred::types::scripts::Script;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// A script and what runs it.
#[derive(Clone)]
pub(crate) struct Runner {
    pub(crate) client: Client,
    pub(crate) options: Options,
    pub(crate) script: Script,
    pub(crate) source: &'static str,
}

impl Runner {
    /// EVALSHA, and on NOSCRIPT (a restarted or failed-over server lost its script cache)
    /// SCRIPT LOAD on every primary and EVALSHA once more. NOSCRIPT means the script did not
    /// run, so the retry cannot count a request twice; nothing else is retried.
    pub(crate) async fn eval<A>(&self, keys: Vec<String>, args: Vec<A>) -> Result<Value, FredError>
    where
        A: Into<Value> + Clone + Send,
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
        let args: Vec<Value> = args.into_iter().map(Into::into).collect();
        match client
            .evalsha::<Value, _, _, _>(sha.clone(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                #[cfg(feature = "tracing")]
                tracing::info!("rate-limit script not in the Redis script cache; loading it");
                client.script_load_cluster::<(), _>(self.source).await?;
                client.evalsha(sha, keys, args).await
            }
            other => other,
        }
    }
}

fn not_connected() -> FredError {
    FredError::new(FredErrorKind::Canceled, "not connected to Redis")
}

/// One check waiting for its call.
struct Pending {
    keys: Vec<String>,
    args: Vec<i64>,
    /// The hash slot of its keys (on a cluster; 0 elsewhere).
    slot: u16,
    reply: oneshot::Sender<Result<Value, FredError>>,
}

/// Sends the rate-limit checks, coalesced.
pub(crate) struct Coalescer {
    runner: Runner,
    /// `None` when every check goes alone (`max_batch(1)`).
    queue: Option<mpsc::Sender<Pending>>,
    clustered: bool,
}

/// How many queued checks the task looks at at once on a cluster, where they are sent per
/// slot: enough to find checks of one slot together under load.
const CLUSTER_WINDOW: usize = 16;

/// How many calls are in flight at once: enough to keep Redis busy while a reply travels back
/// and the next call is built; past it, checks queue and the next call takes them together.
const IN_FLIGHT: usize = 4;

impl Coalescer {
    /// Starts the task that sends the queued checks, at most `max_batch` per call; past
    /// `max_queued` checks waiting, a check fails at once. The task ends when the coalescer is
    /// dropped. Must be called within a Tokio runtime.
    pub(crate) fn start(
        runner: Runner,
        max_batch: usize,
        max_queued: usize,
        clustered: bool,
    ) -> Self {
        let queue = (max_batch > 1).then(|| {
            let (tx, rx) = mpsc::channel(max_queued.max(1));
            tokio::spawn(run(rx, runner.clone(), max_batch, clustered));
            tx
        });
        Coalescer {
            runner,
            queue,
            clustered,
        }
    }

    /// The reply of one check (`keys` and `args` as `script::args` lays them out for one
    /// check), from the call that carried it.
    pub(crate) async fn check(
        &self,
        keys: Vec<String>,
        args: Vec<i64>,
    ) -> Result<Value, FredError> {
        let Some(queue) = &self.queue else {
            let reply = self.runner.eval(keys, args).await?;
            return one_reply(reply, 1).map(|mut r| r.swap_remove(0));
        };
        if !self.runner.client.is_connected() {
            return Err(not_connected());
        }
        let slot = match (self.clustered, keys.first()) {
            (true, Some(k)) => fred::util::redis_keyslot(k.as_bytes()),
            _ => 0,
        };
        let (reply, answer) = oneshot::channel();
        let check = Pending {
            keys,
            args,
            slot,
            reply,
        };
        queue.try_send(check).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => FredError::new(
                FredErrorKind::Backpressure,
                "too many rate-limit checks waiting for Redis (max_queued)",
            ),
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

fn stopped() -> FredError {
    FredError::new(
        FredErrorKind::Canceled,
        "the store's sending task stopped (its Tokio runtime shut down)",
    )
}

/// The task: waits for one of its `IN_FLIGHT` calls to be free, takes what has queued
/// meanwhile, and sends it in calls of at most `max_batch` checks (of one slot, on a cluster).
/// Under light load a check finds a free call and goes at once; under load the checks queue
/// while Redis works, and the next call takes them all.
async fn run(
    mut queue: mpsc::Receiver<Pending>,
    runner: Runner,
    max_batch: usize,
    clustered: bool,
) {
    let window = if clustered {
        max_batch.saturating_mul(CLUSTER_WINDOW)
    } else {
        max_batch
    };
    let calls = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut taken = Vec::with_capacity(window);
    loop {
        let Ok(first) = Arc::clone(&calls).acquire_owned().await else {
            return;
        };
        if queue.recv_many(&mut taken, window).await == 0 {
            return;
        }
        // A caller that gave up (its deadline passed, its request was dropped) is not sent:
        // what nobody waits for must not count against the client. Its place is taken by
        // the next check waiting, if any.
        taken.retain(|p| !p.reply.is_closed());
        while taken.len() < window
            && let Ok(p) = queue.try_recv()
        {
            if !p.reply.is_closed() {
                taken.push(p);
            }
        }
        if clustered {
            // Stable: checks of one slot keep their order.
            taken.sort_by_key(|p| p.slot);
        }
        let mut free = Some(first);
        while !taken.is_empty() {
            let call = match free.take() {
                Some(call) => call,
                None => match Arc::clone(&calls).acquire_owned().await {
                    Ok(call) => call,
                    Err(_) => return,
                },
            };
            let slot = taken[0].slot;
            let end = taken
                .iter()
                .take(max_batch)
                .position(|p| p.slot != slot)
                .unwrap_or_else(|| taken.len().min(max_batch));
            let checks: Vec<Pending> = taken.drain(..end).collect();
            let runner = runner.clone();
            tokio::spawn(async move {
                send(runner, checks).await;
                drop(call);
            });
        }
    }
}

/// One call for `checks`, and each its own reply.
async fn send(runner: Runner, mut checks: Vec<Pending>) {
    let mut keys = Vec::with_capacity(checks.iter().map(|c| c.keys.len()).sum());
    let mut args = Vec::with_capacity(checks.iter().map(|c| c.args.len()).sum());
    for c in &mut checks {
        keys.append(&mut c.keys);
        args.append(&mut c.args);
    }
    let replies = runner
        .eval(keys, args)
        .await
        .and_then(|reply| one_reply(reply, checks.len()));
    match replies {
        Ok(replies) => {
            for (check, reply) in checks.into_iter().zip(replies) {
                // The caller may have given up meanwhile; then nobody reads this.
                let _ = check.reply.send(Ok(reply));
            }
        }
        Err(e) => {
            for check in checks {
                let _ = check.reply.send(Err(e.clone()));
            }
        }
    }
}

/// The script's reply split into the replies of its `checks` checks: anything but an array of
/// exactly that many is a parse error (an invalid response), never a guess.
fn one_reply(reply: Value, checks: usize) -> Result<Vec<Value>, FredError> {
    match reply {
        Value::Array(replies) if replies.len() == checks => Ok(replies),
        other => Err(FredError::new(
            FredErrorKind::Parse,
            format!(
                "rate-limit script reply is not one reply for each of {checks} checks: {other:?}"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_that_is_not_one_per_check_is_a_parse_error() {
        let one = Value::Array(vec![Value::Integer(1), Value::Integer(2)]);
        let cases = [
            (Value::Null, 1),
            (Value::Integer(1), 1),
            (Value::Array(vec![]), 1),
            (Value::Array(vec![one.clone()]), 2),
            (Value::Array(vec![one.clone(), one.clone()]), 1),
        ];
        for (reply, checks) in cases {
            let err = one_reply(reply.clone(), checks).unwrap_err();
            assert_eq!(err.kind(), &FredErrorKind::Parse, "{reply:?}");
        }
        let two = one_reply(Value::Array(vec![one.clone(), Value::Null]), 2).unwrap();
        assert_eq!(two, vec![one, Value::Null]);
    }
}
