//! Real `redis-server` processes for the tests: each test starts its own on free loopback ports
//! (never 6379), and can stop, freeze or restart them to inject faults: standalone servers,
//! replicas, sentinels, and clusters with or without replicas. They stop when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::require_program;

const READY_TIMEOUT: Duration = Duration::from_secs(15);

fn redis_server() -> PathBuf {
    require_program("redis-server", "redis-server")
}

fn redis_cli() -> PathBuf {
    require_program("redis-cli", "redis-tools")
}

/// A loopback port that is free now, and whose cluster bus port (+10000) is free too.
///
/// Another process may take it before the server binds it; [`RedisServer`] then notices (the
/// server that answers is not the one it started) and tries another port.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = listener.local_addr() else {
            continue;
        };
        let port = addr.port();
        if port == 6379 || port > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port pair found");
}

/// What kind of server to start.
#[derive(Debug, Clone, Default)]
struct Role {
    cluster: bool,
    /// A replica of the server on this port.
    replica_of: Option<u16>,
    /// A sentinel watching the master on this port under this name.
    sentinel_of: Option<(String, u16)>,
}

/// One `redis-server` process (or sentinel) without persistence.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    role: Role,
}

impl RedisServer {
    /// Starts a standalone server on a free port and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_role(&Role::default())
    }

    /// Starts a replica of `master` (which must be running) on a free port.
    pub fn start_replica_of(master: &RedisServer) -> Self {
        Self::start_role(&Role {
            replica_of: Some(master.port),
            ..Role::default()
        })
    }

    /// Starts a standalone server on `port` (for a server that appears where a service already
    /// expects one).
    ///
    /// # Panics
    ///
    /// When it cannot start there.
    pub fn start_on(port: u16) -> Self {
        let mut server = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir for redis-server"),
            role: Role::default(),
        };
        if let Err(e) = server.spawn() {
            panic!("redis-server did not start on port {port}: {e}");
        }
        server
    }

    /// A handle on a server someone else started on `port`, for [`cli`](Self::cli) from
    /// another thread; dropping it does not stop the server.
    pub fn start_on_existing(port: u16) -> Self {
        RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            role: Role::default(),
        }
    }

    fn start_role(role: &Role) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
                dir: tempfile::tempdir().expect("temp dir for redis-server"),
                role: role.clone(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start on any of 5 free ports: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(redis_server());
        if let Some((name, master)) = &self.role.sentinel_of {
            // A sentinel rewrites its configuration file, so it gets one of its own.
            let conf = self.dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nloglevel warning\ndir {dir}\n\
                     sentinel monitor {name} 127.0.0.1 {master} 1\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 10000\n\
                     sentinel parallel-syncs {name} 1\n",
                    port = self.port,
                    dir = self.dir.path().display(),
                ),
            )
            .map_err(|e| format!("cannot write sentinel.conf: {e}"))?;
            cmd.arg(conf).arg("--sentinel");
        } else {
            cmd.args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--daemonize", "no"])
                .args(["--loglevel", "warning"])
                .arg("--dir")
                .arg(self.dir.path());
            if self.role.cluster {
                cmd.args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", "nodes.conf"])
                    .args(["--cluster-node-timeout", "2000"]);
            }
            if let Some(master) = self.role.replica_of {
                cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("redis-server exited with {status}"));
            }
            if self.ping() {
                // The port may have been taken by another test's server between free_port
                // and our bind: make sure the one answering is ours.
                let answering = self.info_field("process_id");
                if answering.as_deref() == Some(pid.to_string().as_str()) {
                    return Ok(());
                }
                self.stop();
                return Err(format!(
                    "port {} answers as process {answering:?}, not {pid}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err("redis-server did not answer PING".into())
    }

    /// Whether the server answers `PING` now.
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// A field of `INFO` (`process_id`, `role`, `redis_version`...), read over a plain
    /// connection; `None` when the server does not answer.
    pub fn info_field(&self, field: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"INFO\r\n").ok()?;
        // A bulk string: `$<len>\r\n<body>\r\n`.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n") {
            s.read_exact(&mut byte).ok()?;
            head.push(byte[0]);
        }
        let len: usize = std::str::from_utf8(head.get(1..head.len() - 2)?)
            .ok()?
            .parse()
            .ok()?;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).ok()?;
        let body = String::from_utf8_lossy(&body);
        let prefix = format!("{field}:");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().to_owned())
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL, as a crash) and waits for it to go.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a new one on the same port: empty data, empty script cache.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The port may linger for a moment after the kill.
                Err(e) if Instant::now() > deadline => panic!("restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// How many times the server has run `command` (lower case, as `INFO commandstats` names
    /// it: `evalsha`, `zadd`), since it started or its last `CONFIG RESETSTAT`.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.cli(&["info", "commandstats"])
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Freezes the process (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Thaws a frozen process (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("server is running");
        let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits an i32"));
        kill(pid, signal).unwrap_or_else(|e| panic!("cannot send {signal} to {pid}: {e}"));
    }

    /// Runs `redis-cli -p PORT args...` and returns its output.
    ///
    /// # Panics
    ///
    /// When `redis-cli` fails or writes to stderr, or the server answers with an error: a
    /// fault injection that did not happen must not pass silently.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_raw(args);
        assert!(
            !out.starts_with("ERR") && !out.starts_with("WRONGTYPE"),
            "redis-cli {args:?} answered an error: {out}"
        );
        out
    }

    /// As [`cli`](Self::cli), but an error reply from the server is returned, not a panic.
    ///
    /// # Panics
    ///
    /// When `redis-cli` itself fails.
    pub fn cli_raw(&self, args: &[&str]) -> String {
        let out = Command::new(redis_cli())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "redis-cli -p {} {args:?} failed ({}): {stderr}",
            self.port,
            out.status
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sentinel watching one master, with a quorum of one, that calls it down after one second.
#[derive(Debug)]
pub struct RedisSentinel {
    /// The sentinel process.
    pub server: RedisServer,
    /// The name the master is monitored under.
    pub service: String,
}

impl RedisSentinel {
    /// Starts a sentinel for `master` (which must be running) under the name `service`.
    pub fn start(master: &RedisServer, service: &str) -> Self {
        let server = RedisServer::start_role(&Role {
            sentinel_of: Some((service.to_owned(), master.port)),
            ..Role::default()
        });
        RedisSentinel {
            server,
            service: service.to_owned(),
        }
    }

    /// `redis-sentinel://127.0.0.1:PORT/0?sentinelServiceName=NAME`.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={}",
            self.server.port, self.service
        )
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let out = self
            .server
            .cli_raw(&["sentinel", "get-master-addr-by-name", &self.service]);
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// How many replicas the sentinel knows of the master.
    pub fn known_replicas(&self) -> usize {
        let out = self
            .server
            .cli_raw(&["sentinel", "replicas", &self.service]);
        out.lines().filter(|l| l.trim() == "ip").count()
    }
}

/// Builds `builder`'s store and waits, at most 10 s, until it is connected to its server.
///
/// # Panics
///
/// When the store cannot be built or does not connect in time.
pub async fn connected(builder: tollgate_redis::RedisStoreBuilder) -> tollgate_redis::RedisStore {
    let store = builder.build().expect("build store");
    store
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("connect to the test server");
    store
}

/// A Redis Cluster of three masters (and optionally one replica each), built by the test itself.
#[derive(Debug)]
pub struct RedisCluster {
    /// The masters, then the replicas (as `redis-cli --cluster create` assigns them).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled masters, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// Starts three masters with `replicas` replicas each.
    pub fn start_with_replicas(replicas: usize) -> Self {
        let count = 3 * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_role(&Role {
                    cluster: true,
                    ..Role::default()
                })
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(redis_cli())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        if replicas > 0 {
            // Every replica is attached and in sync before the test starts failing masters.
            let deadline = Instant::now() + Duration::from_secs(30);
            while cluster
                .nodes
                .iter()
                .filter(|n| n.info_field("role").as_deref() == Some("slave"))
                .any(|n| n.info_field("master_link_status").as_deref() != Some("up"))
            {
                assert!(Instant::now() < deadline, "replicas did not sync");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// Waits until every running node reports `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// After `within` without that.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            while !node
                .cli_raw(&["cluster", "info"])
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `redis-cluster://127.0.0.1:P1?node=127.0.0.1:P2&node=...` (every node, so the client
    /// finds the cluster whichever of them is down).
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, n) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", n.port));
        }
        url
    }

    /// The node serving `slot` now (a master), by index in [`nodes`](Self::nodes).
    pub fn owner_of(&self, slot: u16) -> usize {
        let ask = self
            .nodes
            .iter()
            .find(|n| n.pid().is_some())
            .expect("a running node");
        // CLUSTER NODES lines: `id addr flags master ping pong epoch state slots...`.
        let nodes = ask.cli_raw(&["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                let port: u16 = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("node address");
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port == port)
                    .expect("a node of this cluster");
            }
        }
        panic!("no master owns slot {slot}:\n{nodes}");
    }

    /// The node id of `node`.
    pub fn node_id(&self, node: usize) -> String {
        self.nodes[node].cli(&["cluster", "myid"])
    }

    /// Moves `slot` from the node at index `from` to the one at `to` while clients keep using
    /// it: `IMPORTING`/`MIGRATING`, then `MIGRATE` of its keys in batches (clients meanwhile get
    /// `ASK` redirects and `TRYAGAIN`), then the new owner everywhere. Between batches it sleeps
    /// `pause`, so that requests land mid-migration.
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize, pause: Duration) {
        let slot_text = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        target.cli(&["cluster", "setslot", &slot_text, "importing", &from_id]);
        source.cli(&["cluster", "setslot", &slot_text, "migrating", &to_id]);
        loop {
            let keys = source.cli(&["cluster", "getkeysinslot", &slot_text, "1"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = target.port.to_string();
            let mut args = vec![
                "migrate",
                "127.0.0.1",
                port.as_str(),
                "",
                "0",
                "5000",
                "keys",
            ];
            args.extend(keys.iter().copied());
            source.cli(&args);
            std::thread::sleep(pause);
        }
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            if node.info_field("role").as_deref() == Some("master") {
                node.cli(&["cluster", "setslot", &slot_text, "node", &to_id]);
            }
        }
    }
}
