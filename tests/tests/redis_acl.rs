//! Least privilege: the store works with a Redis 6+ ACL user allowed exactly the commands it
//! sends and the keys under its prefix (the line docs/redis.md gives), and every one of those
//! rights is needed: take one away and a named error follows (`NOPERM`, in the store's error
//! or in the server's ACL log). A cluster adds two rights.

use std::time::Duration;

use tollgate::concurrency::{Acquire, ConcurrencyStore};
use tollgate::{Key, Quota, Store};
use tollgate_redis::RedisStore;
use tollgate_tests::redis::{RedisCluster, RedisServer};

/// The rights of the ACL line in docs/redis.md, after the user's name and password.
const RIGHTS: &[&str] = &[
    "~tollgate:*",
    "resetchannels",
    "-@all",
    "+evalsha",
    "+script|load",
    "+time",
    "+info",
    "+client|id",
    "+get",
    "+set",
    "+del",
    "+pexpireat",
    "+zadd",
    "+zcard",
    "+zrange",
    "+zrem",
    "+zremrangebyscore",
    "+zscore",
];

/// What a cluster adds to [`RIGHTS`].
const CLUSTER_RIGHTS: &[&str] = &["+cluster|slots", "+cluster|info"];

fn set_user(server: &RedisServer, rights: &[&str]) {
    let mut args = vec!["ACL", "SETUSER", "tollgate", "reset", "on", ">tollgate-pw"];
    args.extend_from_slice(rights);
    assert_eq!(server.cli(&args).trim(), "OK");
    server.cli(&["ACL", "LOG", "RESET"]);
}

/// Everything the store does: decide with each algorithm, reset a key, take and give back a
/// concurrency slot. The errors, as text.
async fn exercise(server: &RedisServer, prefix: &str) -> Vec<String> {
    let url = format!("redis://tollgate:tollgate-pw@127.0.0.1:{}", server.port);
    let store = RedisStore::builder(&url)
        .unwrap()
        .prefix(prefix)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut errors = Vec::new();
    if let Err(e) = store.wait_connected(Duration::from_secs(10)).await {
        errors.push(e.to_string());
        return errors;
    }
    let key = Key::new("acl", "/r", None, Some("u"));
    for algorithm in ["gcra", "fixed_window", "sliding_window"] {
        let q = "5/s"
            .parse::<Quota>()
            .unwrap()
            .with_algorithm(algorithm.parse().unwrap())
            .unwrap();
        match store.check(&key, &[q], 1).await {
            Ok(d) => assert!(d.is_allowed()),
            Err(e) => errors.push(format!("{} ({})", e, e.kind().reason())),
        }
    }
    if let Err(e) = store.reset(&key, &["5/s".parse().unwrap()]).await {
        errors.push(e.to_string());
    }
    // A short lease, held long enough to be renewed (every third of it) before it is given back.
    let slots = store.concurrency(Duration::from_millis(300));
    match slots.acquire(&key, 2).await {
        Ok(Acquire::Acquired { permit, .. }) => {
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(permit);
        }
        Ok(other) => errors.push(format!("no slot: {other:?}")),
        Err(e) => errors.push(e.to_string()),
    }
    // The permit gives its slot back in a task of its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let denied = server.cli(&["ACL", "LOG"]);
    if !denied.trim().is_empty() {
        errors.push(format!("ACL LOG: {}", denied.replace('\n', " ")));
    }
    errors
}

#[tokio::test]
async fn the_store_works_with_exactly_the_documented_rights() {
    let server = RedisServer::start();
    set_user(&server, RIGHTS);
    let errors = exercise(&server, "tollgate:").await;
    assert!(errors.is_empty(), "{errors:?}");

    // The documented line is this one.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/redis.md"),
    )
    .unwrap();
    let line = format!("ACL SETUSER tollgate on >PASSWORD {}", RIGHTS.join(" "));
    assert!(doc.contains(&line), "docs/redis.md does not give: {line}");
}

#[tokio::test]
async fn every_right_is_needed_and_its_absence_is_named() {
    let server = RedisServer::start();
    // Keys outside the prefix are refused.
    set_user(&server, RIGHTS);
    let errors = exercise(&server, "elsewhere:").await;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("NOPERM") || e.contains("no permissions")),
        "keys outside ~tollgate:* were allowed: {errors:?}"
    );
    // Each command right.
    for right in RIGHTS.iter().filter(|r| r.starts_with('+')) {
        let fewer: Vec<&str> = RIGHTS.iter().copied().filter(|r| r != right).collect();
        set_user(&server, &fewer);
        let errors = exercise(&server, "tollgate:").await;
        let command = right.trim_start_matches('+');
        assert!(
            errors.iter().any(|e| (e.contains("NOPERM")
                || e.contains("no permissions")
                || e.contains("ACL LOG"))
                && e.to_lowercase().contains(command)),
            "without {right} nothing named it: {errors:?}"
        );
    }
}

#[tokio::test]
async fn on_a_cluster_the_store_needs_the_two_cluster_rights_too() {
    let cluster = RedisCluster::start();
    let all: Vec<&str> = RIGHTS.iter().chain(CLUSTER_RIGHTS).copied().collect();
    for node in &cluster.nodes {
        set_user(node, &all);
    }
    let url = cluster.url().replacen(
        "redis-cluster://",
        "redis-cluster://tollgate:tollgate-pw@",
        1,
    );
    let store = RedisStore::builder(&url)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    if let Err(e) = store.wait_connected(Duration::from_secs(10)).await {
        for node in &cluster.nodes {
            eprintln!(
                "port {} ACL LOG: {}",
                node.port,
                node.cli(&["ACL", "LOG"]).replace('\n', " ")
            );
        }
        panic!("not connected with the documented rights: {e}");
    }
    // Keys in every slot range, so every master runs the script.
    for user in 0..30 {
        let key = Key::new("acl", "/r", None, Some(format!("user-{user}")));
        let d = store.check(&key, &["5/s".parse().unwrap()], 1).await;
        assert!(d.expect("decided").is_allowed());
    }
    for node in &cluster.nodes {
        let denied = node.cli(&["ACL", "LOG"]);
        assert!(denied.trim().is_empty(), "port {}: {denied}", node.port);
    }
}
