//! The Redis store's check called from 128 concurrent tasks, in checks per second, to compare
//! with `redis-benchmark` running the same script at the same time of day.
//!
//! `cargo run --release -p tollgate-tests --no-default-features --example redis-store-bench -- REDIS_URL [TOTAL] [QUOTAS] [MAX_BATCH] [TASKS]`
//! Started by scripts/bench and scripts/growth. `MAX_BATCH` is the store's `max_batch` (`-` or
//! absent: the store's default; 1 sends each check in a call of its own); `TASKS` the
//! concurrent tasks (default 128).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::{Key, Quota, Store};
use tollgate_redis::RedisStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args
        .first()
        .ok_or("usage: redis-store-bench URL [TOTAL] [QUOTAS] [MAX_BATCH] [TASKS]")?;
    let total: usize = args.get(1).map_or(Ok(200_000), |s| s.parse())?;
    let n_quotas: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let mut builder = RedisStore::builder(url)?
        .timeout(Duration::from_secs(1))
        .deny_cache(0);
    if let Some(n) = args.get(3).filter(|n| *n != "-") {
        builder = builder.max_batch(n.parse()?);
    }
    let tasks: usize = args.get(4).map_or(Ok(128), |s| s.parse())?;
    let store = builder.build()?;
    store.wait_connected(Duration::from_secs(5)).await?;
    // The allowed path: never limited, every check a full read-decide-write.
    let quotas: Arc<Vec<Quota>> = Arc::new(
        (0..n_quotas)
            .map(|i| Quota::per_second(1_000_000 - i as u32))
            .collect::<Result<_, _>>()?,
    );
    let per = total / tasks;
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let quotas = Arc::clone(&quotas);
        handles.push(tokio::spawn(async move {
            let mut failures = 0usize;
            for i in 0..per {
                let user = format!("{}", (t * per + i) % 100_000);
                let key = Key::new("bench", "/hello", None, Some(user.as_str()));
                if store.check(&key, &quotas, 1).await.is_err() {
                    failures += 1;
                }
            }
            failures
        }));
    }
    let mut failures = 0;
    for h in handles {
        failures += h.await?;
    }
    let took = started.elapsed();
    let done = per * tasks;
    println!(
        "checks={done} quotas={n_quotas} failures={failures} seconds={:.3} checks_per_second={:.0}",
        took.as_secs_f64(),
        done as f64 / took.as_secs_f64()
    );
    Ok(())
}
