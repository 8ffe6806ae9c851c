//! The tollgate demo service, as a library so that tests can build its router.
//!
//! Run with `cargo run -p tollgate-demo`; see the README next to this crate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tollgate::concurrency::{
    ConcurrencyLimitLayer, ConcurrencyPolicy, ConcurrencyStore, MemoryConcurrencyStore,
};
use tollgate::config::StoreConfig;
use tollgate::{ClientIpSource, ForwardedHeader, MemoryStore};
use tollgate_redis::{RedisConfig, redact};

pub use tollgate::config::Config;

/// The demo's policies when no `--config` is given: `examples/demo/tollgate.toml`, embedded, so
/// the documented example and the defaults cannot drift apart.
pub const DEFAULT_CONFIG: &str = include_str!("../tollgate.toml");

/// The route templates the demo serves that policies may name.
pub const ROUTES: [&str; 3] = ["/hello", "/login", "/export"];

/// Command-line arguments.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tollgate-demo",
    about = "A small axum service rate-limited by tollgate"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// TOML file with the policies, store and client-IP settings (default: the embedded
    /// examples/demo/tollgate.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Share limits through Redis (`redis://`, `rediss://`, `redis-cluster://`,
    /// `redis-sentinel://`); without it the in-process memory store is used.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Deadline of each Redis decision, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub redis_timeout: u64,
    /// While Redis cannot decide, limit with an in-process store (per instance) instead of
    /// applying each policy's failure mode.
    #[arg(long)]
    pub redis_fallback: bool,
    /// PEM file of the CA certificates that signed the Redis server's certificate (a private
    /// CA), trusted instead of the system's roots; for `rediss://` URLs. Replaces the file's
    /// `tls_ca_file`.
    #[arg(long, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// PEM file of a client certificate for Redis servers that require one (mutual TLS), with
    /// `--redis-client-key`.
    #[arg(long, value_name = "FILE", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM file of the key of `--redis-client-cert`.
    #[arg(long, value_name = "FILE", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,
    /// How long start-up waits for Redis before serving anyway, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub redis_connect_wait: u64,
    /// A proxy address range to trust (repeatable). Replaces only the file's trusted proxies
    /// (or hop count); the file's header and IPv6 prefix stay. Without it, clients are keyed
    /// as the file says (by default on the socket peer, ignoring forwarding headers).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<tollgate::client_ip::IpNet>,
    /// The header trusted proxies report the client in, in any case: x-forwarded-for (the
    /// default), forwarded, or a single-address header such as x-real-ip or cf-connecting-ip.
    /// Replaces only the file's header.
    #[arg(long, value_name = "NAME")]
    pub client_ip_header: Option<String>,
    /// Key IPv6 clients on this prefix length (1 to 128; default 64). Replaces only the
    /// file's prefix.
    #[arg(long, value_name = "BITS")]
    pub ipv6_prefix: Option<u8>,
    /// At most this many `GET /report` per client in flight (across every instance with
    /// `--redis`).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub report_concurrency: u32,
    /// Where `GET /report` gets its report from (`{URL}/report`); without it the demo makes one
    /// itself in `--report-ms`.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// How long the built-in report takes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub report_ms: u64,
    /// Lease time of a concurrency slot in Redis, in milliseconds: a dead instance's slots come
    /// back after at most this long.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub lease_ms: u64,
}

impl Args {
    /// `client_ip` with the command line's client-IP flags applied: each flag replaces only
    /// the setting it names.
    ///
    /// # Errors
    ///
    /// When the prefix length or header name is invalid.
    pub fn apply_client_ip_flags(
        &self,
        mut client_ip: ClientIpSource,
    ) -> anyhow::Result<ClientIpSource> {
        if !self.trusted_proxies.is_empty() {
            client_ip = client_ip.trust_proxies(self.trusted_proxies.iter().copied());
        }
        if let Some(name) = &self.client_ip_header {
            let header = name
                .parse::<ForwardedHeader>()
                .with_context(|| format!("--client-ip-header {name:?}: not a header name"))?;
            client_ip = client_ip.header(header);
        }
        if let Some(bits) = self.ipv6_prefix {
            client_ip = client_ip
                .ipv6_prefix(bits)
                .with_context(|| format!("--ipv6-prefix {bits}"))?;
        }
        Ok(client_ip)
    }

    /// The configuration: the file, or the embedded defaults, checked against the demo's
    /// routes, with the command line's client-IP settings applied.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or is invalid.
    pub fn load_config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path).context("invalid configuration")?,
            None => Config::from_toml(DEFAULT_CONFIG).context("invalid built-in configuration")?,
        };
        config
            .check_routes(ROUTES)
            .context("invalid configuration")?;
        config.client_ip_source = self.apply_client_ip_flags(config.client_ip_source)?;
        Ok(config)
    }
}

/// The demo's routes behind the rate limiter (deciding with `store`), and `/metrics` outside
/// it.
pub fn app<St, Cs>(
    config: &Config,
    store: St,
    report: Report<Cs>,
    metrics: PrometheusHandle,
) -> Router
where
    St: tollgate::Store + Clone + Send + Sync + 'static,
    St::Future: Send + 'static,
    Cs: ConcurrencyStore + Clone + Send + Sync + 'static,
    Cs::Future: Send + 'static,
{
    let concurrency = ConcurrencyLimitLayer::new(report.store)
        .policy(ConcurrencyPolicy::new("report", report.limit))
        .client_ip_source(config.client_ip_source.clone())
        .missing_key(config.missing_key);
    let upstream = report.upstream.map(|url| {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_default();
        (client, format!("{}/report", url.trim_end_matches('/')))
    });
    let delay = report.delay;
    let report_handler = move || {
        let upstream = upstream.clone();
        async move {
            match upstream {
                Some((client, url)) => {
                    let res = client
                        .get(&url)
                        .send()
                        .await
                        .map_err(|_| StatusCode::BAD_GATEWAY)?;
                    res.text().await.map_err(|_| StatusCode::BAD_GATEWAY)
                }
                None => {
                    tokio::time::sleep(delay).await;
                    Ok("report\n".to_owned())
                }
            }
        }
    };
    Router::new()
        .route("/hello", get(|| async { "hello\n" }))
        .route("/login", post(|| async { "welcome\n" }))
        .route("/export", get(|| async { "id,amount\n1,42\n" }))
        .route("/report", get(report_handler).route_layer(concurrency))
        .layer(config.layer(store))
        // Added after the layer, so outside it: scraping is never limited.
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
}

/// The demo's `main`: logging to stdout, arguments from the command line, a multi-threaded
/// runtime, and an exit code.
pub fn cli_main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;

    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("tollgate_demo=info,tollgate=info")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the demo until Ctrl-C or SIGTERM.
///
/// # Errors
///
/// When the configuration is invalid, the address cannot be bound, or serving fails.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.load_config()?;
    // The Redis settings: the command line's `--redis` and its options, or the file's.
    let redis = match &args.redis {
        Some(url) => {
            let mut r = RedisConfig::new(url.clone());
            r.timeout = Some(Duration::from_millis(args.redis_timeout.max(1)));
            r.fallback = args.redis_fallback;
            Some(r)
        }
        None => RedisConfig::from_config(&config).context("invalid configuration")?,
    };
    let redis = redis.map(|mut r| {
        if let Some(ca) = &args.redis_ca {
            r.tls_ca_file = Some(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&args.redis_client_cert, &args.redis_client_key) {
            r.tls_client_cert_file = Some(cert.clone());
            r.tls_client_key_file = Some(key.clone());
        }
        r
    });
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(tollgate::metrics::STORE_DURATION_SECONDS.to_owned()),
            &[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ],
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    // Build the router after the recorder is installed: the layer registers its metrics then.
    let app = match redis {
        None => {
            tracing::info!("store: memory (limits are per instance)");
            let store = match config.store {
                StoreConfig::Memory { max_keys: Some(n) } => {
                    MemoryStore::builder().max_keys(n).build()
                }
                _ => MemoryStore::new(),
            };
            let report = Report {
                store: MemoryConcurrencyStore::new(),
                limit: args.report_concurrency,
                upstream: args.upstream.clone(),
                delay: Duration::from_millis(args.report_ms),
            };
            app(&config, store, report, metrics)
        }
        Some(r) => {
            let builder = r.builder()?;
            let store = builder.build()?;
            // Start anyway when Redis is not there yet: requests fail open (or closed, or go to
            // the fallback) until it is, and the client keeps reconnecting.
            match store
                .wait_connected(Duration::from_millis(args.redis_connect_wait))
                .await
            {
                Ok(()) => {
                    tracing::info!(url = %redact(&r.url), "store: redis (limits shared by every instance)");
                }
                Err(e) => tracing::warn!(
                    url = %redact(&r.url),
                    "rate-limit-degraded: {e}; starting anyway, the store keeps reconnecting"
                ),
            }
            let report = Report {
                store: store.concurrency(Duration::from_millis(args.lease_ms)),
                limit: args.report_concurrency,
                upstream: args.upstream.clone(),
                delay: Duration::from_millis(args.report_ms),
            };
            app(&config, store, report, metrics)
        }
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    for p in &config.policies {
        tracing::info!(
            policy = p.policy.name(),
            route = %p.route,
            method = p.method.as_ref().map_or("any", http::Method::as_str),
            quotas = ?p.policy.quotas(),
            failure = ?p.policy.failure_mode(),
            shadow = p.policy.is_shadow(),
            "rate-limit policy"
        );
    }
    tracing::info!(client_ip = ?config.client_ip_source, "client ip settings");
    tracing::info!("listening on {addr}");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown())
    .await
    .context("server error")
}

/// The settings of `GET /report`, the concurrency-limited route.
#[derive(Debug)]
pub struct Report<Cs> {
    /// Where slots are counted.
    pub store: Cs,
    /// Most requests per client in flight.
    pub limit: u32,
    /// The upstream to fetch reports from, if any.
    pub upstream: Option<String>,
    /// How long the built-in report takes.
    pub delay: Duration,
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
