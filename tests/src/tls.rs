//! TLS for the tests: a private CA made on the spot (rcgen), certificates it signs, and
//! TLS-only `redis-server` processes (`--port 0`, so nothing answers in plaintext) on free
//! loopback ports. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::redis::free_port;
use crate::require_program;

/// A private certificate authority, its files in a temporary directory.
#[derive(Debug)]
pub struct Ca {
    dir: tempfile::TempDir,
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Ca {
    /// A new CA named `name`.
    ///
    /// # Panics
    ///
    /// When rcgen cannot make it, or the directory cannot be written.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let pem = cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &pem).expect("write ca.pem");
        Ca {
            dir,
            params,
            key,
            pem,
        }
    }

    /// The CA certificate's file.
    pub fn pem_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names` (host names or IP addresses) signed by this CA, written as
    /// `<file>.pem` and `<file>.key`.
    ///
    /// # Panics
    ///
    /// When rcgen cannot make it.
    pub fn issue(&self, file: &str, names: &[&str]) -> CertFiles {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, file);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// A TLS-only `redis-server` on 127.0.0.1.
#[derive(Debug)]
pub struct TlsRedis {
    /// Its TLS port.
    pub port: u16,
    child: Child,
    ca: PathBuf,
    client: Option<CertFiles>,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    /// Starts a server presenting `server` (signed by the CA in `ca_file`) and waits until it
    /// answers `PING` over TLS. With `require_client_cert`, clients must present a
    /// certificate that CA signed (`tls-auth-clients yes`); `client` is the one the helper's
    /// own `redis-cli` presents. `extra` are more `redis-server` arguments.
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing (the message says how to install them), or
    /// the server does not answer within 15 seconds.
    pub fn start(
        ca_file: &Path,
        server: &CertFiles,
        require_client_cert: bool,
        client: Option<CertFiles>,
        extra: &[&str],
    ) -> TlsRedis {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let port = free_port();
        let child = Command::new(require_program("redis-server", "redis-server"))
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--tls-cert-file")
            .arg(&server.cert)
            .arg("--tls-key-file")
            .arg(&server.key)
            .arg("--tls-ca-cert-file")
            .arg(ca_file)
            .args([
                "--tls-auth-clients",
                if require_client_cert { "yes" } else { "no" },
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let mut server = TlsRedis {
            port,
            child,
            ca: ca_file.to_owned(),
            client,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server with TLS on {port} exited: {status}");
            }
            if server.cli(&["PING"]).trim() == "PONG" {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS on {port} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `redis-cli` over TLS against this server; returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(require_program("redis-cli", "redis-tools"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--tls"])
            .arg("--cacert")
            .arg(&self.ca);
        if let Some(client) = &self.client {
            cmd.arg("--cert")
                .arg(&client.cert)
                .arg("--key")
                .arg(&client.key);
        }
        let out = cmd.args(args).output().expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three TLS-only cluster masters (`--tls-cluster yes`: the cluster bus speaks TLS too),
/// joined with `redis-cli --tls --cluster create`, ready when every node reports
/// `cluster_state:ok`.
///
/// # Panics
///
/// When the servers do not start, or the cluster is not ok within 20 seconds.
pub fn tls_cluster(ca_file: &Path, server: &CertFiles) -> Vec<TlsRedis> {
    let nodes: Vec<TlsRedis> = (0..3)
        .map(|_| {
            TlsRedis::start(
                ca_file,
                server,
                false,
                None,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--tls-cluster",
                    "yes",
                ],
            )
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new(require_program("redis-cli", "redis-tools"))
        .args(["--tls", "--cacert"])
        .arg(ca_file)
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create runs");
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes
        .iter()
        .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    {
        assert!(
            Instant::now() < deadline,
            "the TLS cluster is not ok after 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes
}
