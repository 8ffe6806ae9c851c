//! Redis topologies for real, under traffic: a Sentinel failover, a Redis Cluster master that
//! dies and is replaced by its replica, and a slot that migrates between masters. In each: no
//! 5xx on a fail-open route, decisions come back by themselves, and what the switch costs is
//! measured (printed; docs/redis.md quotes it; run with `--nocapture` to see it).
//!
//! Traffic: 8 "hot" clients that spent their `20/h` budget in the first moments and keep
//! asking (they must stay refused), and a stream of new clients (a fresh address per request,
//! so nothing is cached for them) whose requests show when decisions stop and resume.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tollgate_tests::Demo;
use tollgate_tests::redis::{RedisCluster, RedisSentinel, RedisServer};

const DEMO: &str = env!("CARGO_BIN_EXE_demo-under-test");
const HOT: u8 = 8;
const QUOTA: usize = 20;
const CONFIG: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
    [[policy]]\nname = \"hello\"\nroute = \"/hello\"\nquota = \"20/h\"\n";

/// One response as a client saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Duration,
    status: u16,
    decided: bool,
}

/// What a run measured.
#[derive(Debug)]
struct Report {
    topology: &'static str,
    /// Every status seen, and how often.
    statuses: Vec<(u16, usize)>,
    /// Requests the hot clients got through, decided, beyond their quota.
    hot_decided_over_quota: usize,
    /// Hot clients' requests let through undecided (fail open).
    hot_undecided: usize,
    /// New clients' requests let through undecided after the fault.
    fresh_undecided: usize,
    /// New clients' requests after the fault.
    fresh_after_fault: usize,
    /// From the fault to the first decided request of a new client.
    decisions_back_after: Option<Duration>,
}

fn demo(url: &str) -> (Demo, tempfile::NamedTempFile) {
    let config = tollgate_tests::config_file(CONFIG);
    let path = config.path().to_str().expect("utf-8 path").to_owned();
    // The production deadline (100 ms): what users run.
    (
        Demo::start(DEMO, &["--redis", url, "--config", &path]),
        config,
    )
}

/// Runs the traffic against `demo`; `fault` is called (on a blocking thread) 2 s in. The run
/// ends when new clients have been decided again for 2 s, or 30 s after the fault.
async fn run(topology: &'static str, demo: &Demo, fault: impl FnOnce() + Send + 'static) -> Report {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let fresh_ids = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for k in 0..=HOT {
        let (client, url, stop, fresh_ids) = (
            client.clone(),
            demo.url("/hello"),
            Arc::clone(&stop),
            Arc::clone(&fresh_ids),
        );
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Clients 0..HOT are the hot ones; the last task is the stream of new clients.
                let addr = if k < HOT {
                    format!("198.51.100.{k}")
                } else {
                    let i = fresh_ids.fetch_add(1, Ordering::Relaxed);
                    format!("203.0.{}.{}", (i / 250) % 250, i % 250 + 1)
                };
                let res = client
                    .get(&url)
                    .header("x-forwarded-for", addr)
                    .send()
                    .await
                    .expect("a response");
                seen.push(Seen {
                    at: started.elapsed(),
                    status: res.status().as_u16(),
                    decided: res.headers().contains_key("ratelimit"),
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault_at = started.elapsed();
    tokio::task::spawn_blocking(fault).await.expect("fault");
    // Until new clients are decided again for 2 s, or 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = client.clone();
    let mut decided_since: Option<Instant> = None;
    while Instant::now() < deadline {
        let res = probe
            .get(demo.url("/hello"))
            .header("x-forwarded-for", "192.0.2.250")
            .send()
            .await
            .expect("a response");
        let decided = res.headers().contains_key("ratelimit");
        match (decided, decided_since) {
            (true, None) => decided_since = Some(Instant::now()),
            (true, Some(since)) if since.elapsed() > Duration::from_secs(2) => break,
            (false, _) => decided_since = None,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut per_task = Vec::new();
    for t in tasks {
        per_task.push(t.await.expect("traffic task"));
    }
    let fresh = per_task.pop().expect("fresh task");
    let mut statuses = std::collections::BTreeMap::new();
    for s in per_task.iter().flatten().chain(&fresh) {
        *statuses.entry(s.status).or_insert(0) += 1;
    }
    let hot_decided_over_quota = per_task
        .iter()
        .map(|seen| {
            let allowed = seen.iter().filter(|s| s.status == 200 && s.decided).count();
            allowed.saturating_sub(QUOTA)
        })
        .sum();
    let hot_undecided = per_task.iter().flatten().filter(|s| !s.decided).count();
    let after: Vec<&Seen> = fresh.iter().filter(|s| s.at >= fault_at).collect();
    // The first decided new client after the last undecided one (or after the fault).
    let last_undecided = after.iter().rev().find(|s| !s.decided).map(|s| s.at);
    let back = after
        .iter()
        .find(|s| s.decided && last_undecided.is_none_or(|u| s.at > u))
        .map(|s| s.at.saturating_sub(fault_at));
    Report {
        topology,
        statuses: statuses.into_iter().collect(),
        hot_decided_over_quota,
        hot_undecided,
        fresh_undecided: after.iter().filter(|s| !s.decided).count(),
        fresh_after_fault: after.len(),
        decisions_back_after: back,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}x{n}"))
            .collect();
        write!(
            f,
            "{}: statuses {}; hot clients: {} decided over quota, {} undecided; new clients \
             after the fault: {} of {} undecided; decided again {:?} after the fault",
            self.topology,
            statuses.join(" "),
            self.hot_decided_over_quota,
            self.hot_undecided,
            self.fresh_undecided,
            self.fresh_after_fault,
            self.decisions_back_after
        )
    }
}

/// What every topology must show.
fn check(report: &Report, demo: &Demo) {
    eprintln!("measured: {report}");
    // Every request answered 200 or 429: a fail-open route never answers 5xx.
    assert!(
        report.statuses.iter().all(|(s, _)| *s == 200 || *s == 429),
        "{report:#?}\n{}",
        demo.log().join("\n")
    );
    // Decisions came back by themselves.
    assert!(
        report.decisions_back_after.is_some(),
        "decisions never came back: {report:#?}\n{}",
        demo.log().join("\n")
    );
    // The hot clients' spent budgets were replicated before the fault (WAIT): no decision
    // handed them more.
    assert_eq!(report.hot_decided_over_quota, 0, "{report:#?}");
}

#[tokio::test]
async fn a_sentinel_failover_under_traffic() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start_replica_of(&master);
    let sentinel = RedisSentinel::start(&master, "tollgate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while sentinel.known_replicas() == 0
        || replica.info_field("master_link_status").as_deref() != Some("up")
    {
        assert!(
            Instant::now() < deadline,
            "the sentinel never saw the replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (demo, _config) = demo(&sentinel.url());
    let master_port = master.port;
    let report = run("sentinel", &demo, move || {
        // Every write so far is on the replica, then the master dies.
        assert_eq!(master.cli(&["wait", "1", "5000"]), "1");
        master.stop();
        drop(master);
    })
    .await;
    check(&report, &demo);
    // The sentinel promoted the replica, and the store follows it.
    assert_eq!(sentinel.master_port(), Some(replica.port));
    assert_ne!(sentinel.master_port(), Some(master_port));
    assert_eq!(replica.info_field("role").as_deref(), Some("master"));
}

#[tokio::test]
async fn a_cluster_master_dies_and_its_replica_takes_over_under_traffic() {
    let cluster = Arc::new(std::sync::Mutex::new(RedisCluster::start_with_replicas(1)));
    let url = cluster.lock().unwrap().url();
    let (demo, _config) = demo(&url);
    // The master that holds hot client 0's state.
    let slot: u16 = {
        let c = cluster.lock().unwrap();
        let key = "tollgate:{hello:/hello:198.51.100.0:}:20/h";
        c.nodes[0]
            .cli(&["cluster", "keyslot", key])
            .parse()
            .unwrap()
    };
    let victim = cluster.lock().unwrap().owner_of(slot);
    let faulty = Arc::clone(&cluster);
    let report = run("cluster failover", &demo, move || {
        let mut c = faulty.lock().unwrap();
        for node in c
            .nodes
            .iter()
            .filter(|n| n.info_field("role").as_deref() == Some("master"))
        {
            assert_eq!(node.cli(&["wait", "1", "5000"]), "1");
        }
        c.nodes[victim].stop();
    })
    .await;
    check(&report, &demo);
    let c = cluster.lock().unwrap();
    let new_owner = c.owner_of(slot);
    assert_ne!(new_owner, victim);
    c.wait_ok(Duration::from_secs(30));
}

#[tokio::test]
async fn a_slot_migrates_under_traffic() {
    let cluster = Arc::new(RedisCluster::start());
    let (demo, _config) = demo(&cluster.url());
    let key = "tollgate:{hello:/hello:198.51.100.0:}:20/h";
    let slot: u16 = cluster.nodes[0]
        .cli(&["cluster", "keyslot", key])
        .parse()
        .unwrap();
    let from = cluster.owner_of(slot);
    let to = (from + 1) % 3;
    let migrating = Arc::clone(&cluster);
    let report = run("slot migration", &demo, move || {
        migrating.migrate_slot(slot, from, to, Duration::from_millis(200));
    })
    .await;
    check(&report, &demo);
    assert_eq!(cluster.owner_of(slot), to);
    // The migrated state is still the hot client's spent budget: no new one was started.
    assert_eq!(
        report.hot_decided_over_quota, 0,
        "the migration lost state: {report:#?}"
    );
}
