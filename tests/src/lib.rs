//! Support code for the end-to-end tests: start the demo as a real process on a free loopback
//! port, read its log, stop it when the test ends; start real Redis servers and clusters, and a
//! real Prometheus server. (The store conformance suite ships in the core,
//! `tollgate::conformance`.)

pub mod prometheus;
pub mod redis;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The entry point of the `demo-under-test` binary.
pub fn run_demo() -> std::process::ExitCode {
    tollgate_demo::cli_main()
}

/// How long a demo may take to start listening before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running demo process. Killed when dropped.
#[derive(Debug)]
pub struct Demo {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    /// Starts `binary` (the `CARGO_BIN_EXE_demo-under-test` of the calling test) with
    /// `--listen 127.0.0.1:0` and `args`, and waits until it logs `listening on ADDR`.
    ///
    /// # Panics
    ///
    /// When the process cannot start, exits, or does not listen within 30 seconds; the panic
    /// message carries its log.
    pub fn start(binary: &str, args: &[&str]) -> Demo {
        let mut child = Command::new(binary)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, Some(tx)),
            (Box::new(stderr), None),
        ] {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let (Some(tx), Some(addr)) = (&tx, line.split("listening on ").nth(1))
                        && let Ok(addr) = addr.trim().parse::<SocketAddr>()
                    {
                        let _ = tx.send(addr);
                    }
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => return Demo { child, addr, log },
                Err(_) if Instant::now() > deadline => {
                    let _ = child.kill();
                    panic!(
                        "demo did not listen within {START_TIMEOUT:?}; log:\n{}",
                        log.lock().expect("log lock").join("\n")
                    );
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        // Give the reader threads a moment to collect the last lines.
                        std::thread::sleep(Duration::from_millis(100));
                        panic!(
                            "demo exited with {status} before listening; log:\n{}",
                            log.lock().expect("log lock").join("\n")
                        );
                    }
                }
            }
        }
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The demo's `/metrics` exposition, fetched with `client`.
    pub async fn metrics(&self, client: &reqwest::Client) -> String {
        let res = client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200, "/metrics answered {}", res.status());
        res.text().await.unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory now, in bytes (Linux: `VmRSS` of `/proc/PID/status`).
    ///
    /// # Panics
    ///
    /// When `/proc` cannot be read.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .expect("VmRSS in /proc/PID/status")
            * 1024
    }

    /// The lines the process logged so far (stdout and stderr).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `binary` with `args` to completion (at most 30 seconds) and returns its exit status and
/// everything it printed.
///
/// # Panics
///
/// When the process cannot start or runs too long.
pub fn run_to_exit(binary: &str, args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{binary} {args:?} did not exit within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// The path of a program the tests need, or a panic that says how to install it. Tests never
/// skip silently because a tool is missing.
///
/// # Panics
///
/// When `program` is not on the `PATH`.
pub fn require_program(program: &str, debian_package: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "`{program}` is needed by this test and is not installed. Install it with \
                 `sudo apt-get install -y {debian_package}` (or run `.ci/run`, which does)."
            )
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The sum of every sample of `name` in a Prometheus text exposition whose labels include all
/// of `labels`; 0 when there is none.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// A temporary TOML file holding `text`, kept until the returned value is dropped.
///
/// # Panics
///
/// When the file cannot be written.
pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new().expect("temp config file");
    file.write_all(text.as_bytes()).expect("write config file");
    file
}

/// Starts `binary` with `--config` holding `config` and expects it to refuse to start: returns
/// everything it printed, after checking it exited with failure and never listened.
///
/// # Panics
///
/// When the process started listening or exited successfully.
pub fn refused_config(binary: &str, config: &str) -> String {
    let file = config_file(config);
    let path = file.path().to_str().expect("utf-8 temp path");
    let (status, out) = run_to_exit(binary, &["--listen", "127.0.0.1:0", "--config", path]);
    assert!(
        !status.success(),
        "started with this configuration:\n{config}\n{out}"
    );
    assert!(!out.contains("listening on"), "{out}");
    out
}

/// Every metric name (`ratelimit_...`) that `text` (a PromQL expression, a rules file, a
/// dashboard) mentions, with a histogram's `_bucket`, `_sum` and `_count` suffix taken off, in
/// order of appearance.
pub fn series_named(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("ratelimit_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.push(base.to_owned());
    }
    names
}

/// docs/dashboards/tollgate.json, the Grafana dashboard.
pub fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboards/tollgate.json")
}

/// Every panel's queries, as written in the dashboard.
///
/// # Panics
///
/// When the file is missing or not a dashboard with queries in every panel.
pub fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(dashboard_path()).expect("the dashboard file");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut out = Vec::new();
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            out.push(t["expr"].as_str().expect("a PromQL expr").to_owned());
        }
    }
    out
}

/// A query as Prometheus sees it once Grafana has put in its variables (all jobs, all
/// policies, a 1-minute rate window).
pub fn as_prometheus_sees_it(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$job", ".*")
        .replace("$policy", ".*")
}

/// The HTTP client of the end-to-end tests: never through a proxy (the tests talk to loopback
/// only), and a request that takes over 30 s fails the test instead of hanging it.
///
/// # Panics
///
/// When the client cannot be built.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// Runs `promtool` with `args` in `dir` and fails with its output unless it succeeds.
///
/// # Panics
///
/// When promtool is missing (the message says how to install it), or it fails.
pub fn promtool<S: AsRef<std::ffi::OsStr>>(args: &[S], dir: &Path) {
    let out = Command::new(require_program("promtool", "prometheus"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {:?} failed:\n{}{}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
