//! A real Prometheus server for the tests: started on a free loopback port with its own
//! storage in a temporary directory, scraping the targets it is given every second, and
//! queried through its HTTP API. Killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::free_port;
use crate::require_program;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One `prometheus` process.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    port: u16,
    // Kept for the process's lifetime: its configuration and its storage.
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) every second as job
    /// `job`, and waits until its API answers.
    ///
    /// # Panics
    ///
    /// When `prometheus` is not installed (the message says how to install it), or it does not
    /// become ready within 30 seconds (the message carries its log).
    pub fn start(job: &str, targets: &[String]) -> Prometheus {
        let binary = require_program("prometheus", "prometheus");
        let dir = tempfile::tempdir().expect("temp dir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: '{job}'\n    scrape_interval: 1s\n    \
             scrape_timeout: 1s\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).expect("prometheus log");
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut prometheus = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!(
                    "prometheus exited at start ({status}):\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if ready(port) {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready on 127.0.0.1:{port} after {READY_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Evaluates `expr` now (`/api/v1/query`) and returns the API's whole answer: `status`
    /// is `success` or `error`, `data.result` the samples.
    ///
    /// # Panics
    ///
    /// When the API does not answer with JSON.
    pub async fn query(&self, client: &reqwest::Client, expr: &str) -> serde_json::Value {
        let res = client
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("prometheus answers");
        let body = res.text().await.expect("prometheus body");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    }

    /// The value of an expression that yields one sample, or `None` when it yields none.
    ///
    /// # Panics
    ///
    /// When the query fails or yields more than one sample.
    pub async fn scalar(&self, client: &reqwest::Client, expr: &str) -> Option<f64> {
        let answer = self.query(client, expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        let result = answer["data"]["result"].as_array().expect("a result list");
        assert!(result.len() <= 1, "{expr} gave several samples: {answer}");
        let value = result.first()?["value"][1].as_str()?;
        value.parse().ok()
    }
}

/// Whether Prometheus answers on `port` as ready (`/-/ready`).
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
