//! Policies from a file: TOML, or any serde format through [`Config`]'s `Deserialize`.
//!
//! Everything is validated when it is read, and every error names the field and the value
//! (`policy[1] (export).quota[0] = "0/s": quota limit must be at least 1`), so a service refuses
//! to start rather than start with a silently wrong limit. The complete reference of the file is
//! `docs/configuration.md`.
//!
//! ```
//! use tollgate::MemoryStore;
//! use tollgate::config::Config;
//!
//! let config = Config::from_toml(r#"
//!     [[policy]]
//!     name = "export"
//!     route = "/export"
//!     method = "GET"
//!     quota = ["2/s", "20/m"]
//!
//!     [[policy]]
//!     name = "login"
//!     route = "/login"
//!     quota = "5/m"
//!     failure = "closed"
//! "#).unwrap();
//! // Every route the file names must exist in the router.
//! config.check_routes(["/export", "/login", "/health"]).unwrap();
//! let layer = config.layer(MemoryStore::new());
//! # let _ = layer;
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::Deserialize;

use crate::{
    Algorithm, Allowlist, ClientIp, FailureMode, ForwardedHeader, KeyScope, MissingKey, Policy,
    Quota, RateLimitHeaders, RateLimitLayer,
};

/// A validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "File")]
#[non_exhaustive]
pub struct Config {
    /// Which rate-limit header fields responses carry.
    pub headers: RateLimitHeaders,
    /// Shadow mode for every policy.
    pub shadow: bool,
    /// What to do with requests without a peer address.
    pub missing_key: MissingKey,
    /// `Retry-After` of the 503 of fail-closed policies.
    pub unavailable_retry_after: Duration,
    /// Which store to use; the application builds it (the Redis store lives in its own crate).
    pub store: StoreConfig,
    /// Where the client address comes from.
    pub client_ip: ClientIp,
    /// Requests no policy limits.
    pub allowlist: Allowlist,
    /// The policies, each bound to a route template (and optionally a method).
    pub policies: Vec<RoutePolicy>,
}

/// A policy bound to a route.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RoutePolicy {
    /// The route template, as written in the router.
    pub route: String,
    /// The method, or any.
    pub method: Option<Method>,
    /// The policy.
    pub policy: Policy,
}

/// The store a configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreConfig {
    /// The in-process memory store.
    Memory {
        /// Its maximum number of quota states.
        max_keys: Option<usize>,
    },
    /// A Redis store (build it with `tollgate-redis`).
    Redis(RedisConfig),
}

/// The settings of a Redis store, as read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server URL (`redis://`, `rediss://`, `redis-cluster://`, `redis-sentinel://`).
    pub url: String,
    /// Deadline of each decision.
    pub timeout: Option<Duration>,
    /// Key prefix.
    pub prefix: Option<String>,
    /// Decide locally while Redis cannot.
    pub fallback: bool,
    /// Consecutive failures that open the circuit.
    pub breaker_threshold: Option<u32>,
}

/// An invalid configuration. Its message names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    fn at(path: impl fmt::Display, value: impl fmt::Debug, why: impl fmt::Display) -> Self {
        ConfigError(format!("{path} = {value:?}: {why}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates TOML.
    ///
    /// # Errors
    ///
    /// When the text is not valid TOML (with its line and column), names an unknown field, or
    /// holds a value that cannot work.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str::<Config>(text).map_err(|e| ConfigError(e.message().trim().to_owned()))
    }

    /// Reads and validates a TOML file.
    ///
    /// # Errors
    ///
    /// As [`from_toml`](Self::from_toml), or when the file cannot be read; the message names
    /// the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str::<Config>(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ConfigError(format!("{}{at}: {}", path.display(), e.message().trim()))
        })
    }

    /// Checks that every route the configuration names is one of `known` (the application's
    /// route templates), so that a typo does not leave a route silently unlimited.
    ///
    /// # Errors
    ///
    /// For the first unknown route, naming the policy and listing the known routes.
    pub fn check_routes<'a>(
        &self,
        known: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ConfigError> {
        let known: Vec<&str> = known.into_iter().collect();
        for (i, p) in self.policies.iter().enumerate() {
            if !known.contains(&p.route.as_str()) {
                return Err(ConfigError::at(
                    format!("policy[{i}] ({}).route", p.policy.name()),
                    &p.route,
                    format!("no such route template (routes: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// A layer with this configuration, deciding with `store`.
    pub fn layer<St>(&self, store: St) -> RateLimitLayer<St> {
        let mut layer = RateLimitLayer::new(store)
            .headers(self.headers)
            .shadow(self.shadow)
            .missing_key(self.missing_key)
            .unavailable_retry_after(self.unavailable_retry_after)
            .client_ip(self.client_ip.clone())
            .allowlist(self.allowlist.clone());
        for p in &self.policies {
            layer = match &p.method {
                Some(m) => layer.route_method(m.clone(), p.route.clone(), p.policy.clone()),
                None => layer.route(p.route.clone(), p.policy.clone()),
            };
        }
        layer
    }
}

// ---- The file as written, before validation. ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    headers: Option<String>,
    #[serde(default)]
    shadow: bool,
    missing_key: Option<String>,
    unavailable_retry_after: Option<String>,
    store: Option<StoreFile>,
    client_ip: Option<ClientIpFile>,
    allowlist: Option<AllowlistFile>,
    #[serde(default, rename = "policy")]
    policies: Vec<PolicyFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    #[serde(rename = "type")]
    kind: String,
    max_keys: Option<usize>,
    url: Option<String>,
    timeout: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    fallback: bool,
    breaker_threshold: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientIpFile {
    #[serde(default)]
    trusted_proxies: Vec<String>,
    trusted_hops: Option<usize>,
    header: Option<String>,
    ipv6_prefix: Option<u8>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AllowlistFile {
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: String,
    route: String,
    method: Option<String>,
    quota: OneOrMany,
    algorithm: Option<String>,
    burst: Option<u32>,
    failure: Option<String>,
    cost: Option<u32>,
    #[serde(default)]
    shadow: bool,
    scope: Option<String>,
    allowlist: Option<AllowlistFile>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn duration(path: &str, s: &str) -> Result<Duration, ConfigError> {
    match crate::quota::parse_period(s.trim()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::at(
            path,
            s,
            "expected a duration like 100ms, 5s, 1m",
        )),
    }
}

fn allowlist(path: &str, file: AllowlistFile) -> Result<Allowlist, ConfigError> {
    let mut cidrs = Vec::new();
    for (i, c) in file.cidrs.iter().enumerate() {
        cidrs.push(c.parse::<IpNet>().map_err(|e| {
            ConfigError::at(
                format!("{path}.cidrs[{i}]"),
                c,
                format!("not a CIDR range: {e}"),
            )
        })?);
    }
    Ok(Allowlist::new().cidrs(cidrs).users(file.users))
}

impl TryFrom<File> for Config {
    type Error = ConfigError;

    fn try_from(file: File) -> Result<Self, Self::Error> {
        let headers = match file.headers.as_deref() {
            None | Some("ietf") => RateLimitHeaders::Ietf,
            Some("legacy") => RateLimitHeaders::Legacy,
            Some("both") => RateLimitHeaders::Both,
            Some("none") => RateLimitHeaders::None,
            Some(other) => {
                return Err(ConfigError::at(
                    "headers",
                    other,
                    "expected one of \"ietf\", \"legacy\", \"both\", \"none\"",
                ));
            }
        };
        let missing_key = match file.missing_key.as_deref() {
            None | Some("allow") => MissingKey::Allow,
            Some("reject") => MissingKey::Reject,
            Some("shared") => MissingKey::Shared,
            Some(other) => {
                return Err(ConfigError::at(
                    "missing_key",
                    other,
                    "expected one of \"allow\", \"reject\", \"shared\"",
                ));
            }
        };
        let unavailable_retry_after = match &file.unavailable_retry_after {
            None => Duration::from_secs(5),
            Some(s) => duration("unavailable_retry_after", s)?,
        };
        let store = match file.store {
            None => StoreConfig::Memory { max_keys: None },
            Some(s) => store(s)?,
        };
        let client_ip = match file.client_ip {
            None => ClientIp::peer(),
            Some(c) => client_ip(&c)?,
        };
        let allowlist = allowlist("allowlist", file.allowlist.unwrap_or_default())?;
        let mut names = HashSet::new();
        let mut bound = HashSet::new();
        let mut policies = Vec::new();
        for (i, p) in file.policies.into_iter().enumerate() {
            let rp = policy(i, p)?;
            if !names.insert(rp.policy.name().to_owned()) {
                return Err(ConfigError::at(
                    format!("policy[{i}].name"),
                    rp.policy.name(),
                    "used by an earlier policy",
                ));
            }
            if !bound.insert((rp.route.clone(), rp.method.clone())) {
                return Err(ConfigError(format!(
                    "policy[{i}] ({}): another policy already applies to {} {}",
                    rp.policy.name(),
                    rp.method.as_ref().map_or("any method on", Method::as_str),
                    rp.route
                )));
            }
            policies.push(rp);
        }
        Ok(Config {
            headers,
            shadow: file.shadow,
            missing_key,
            unavailable_retry_after,
            store,
            client_ip,
            allowlist,
            policies,
        })
    }
}

fn store(s: StoreFile) -> Result<StoreConfig, ConfigError> {
    match s.kind.as_str() {
        "memory" => {
            for (field, set) in [
                ("url", s.url.is_some()),
                ("timeout", s.timeout.is_some()),
                ("prefix", s.prefix.is_some()),
                ("fallback", s.fallback),
                ("breaker_threshold", s.breaker_threshold.is_some()),
            ] {
                if set {
                    return Err(ConfigError(format!(
                        "store.{field}: only applies to type = \"redis\""
                    )));
                }
            }
            if s.max_keys == Some(0) {
                return Err(ConfigError::at("store.max_keys", 0, "must be at least 1"));
            }
            Ok(StoreConfig::Memory {
                max_keys: s.max_keys,
            })
        }
        "redis" => {
            let Some(url) = s.url else {
                return Err(ConfigError(
                    "store.url: required for type = \"redis\"".into(),
                ));
            };
            if s.max_keys.is_some() {
                return Err(ConfigError(
                    "store.max_keys: only applies to type = \"memory\"".into(),
                ));
            }
            if s.breaker_threshold == Some(0) {
                return Err(ConfigError::at(
                    "store.breaker_threshold",
                    0,
                    "must be at least 1",
                ));
            }
            let timeout = s
                .timeout
                .as_deref()
                .map(|t| duration("store.timeout", t))
                .transpose()?;
            Ok(StoreConfig::Redis(RedisConfig {
                url,
                timeout,
                prefix: s.prefix,
                fallback: s.fallback,
                breaker_threshold: s.breaker_threshold,
            }))
        }
        other => Err(ConfigError::at(
            "store.type",
            other,
            "expected \"memory\" or \"redis\"",
        )),
    }
}

fn client_ip(c: &ClientIpFile) -> Result<ClientIp, ConfigError> {
    let mut ranges = Vec::new();
    for (i, r) in c.trusted_proxies.iter().enumerate() {
        ranges.push(r.parse::<IpNet>().map_err(|e| {
            ConfigError::at(
                format!("client_ip.trusted_proxies[{i}]"),
                r,
                format!("not a CIDR range: {e}"),
            )
        })?);
    }
    if !ranges.is_empty() && c.trusted_hops.is_some() {
        return Err(ConfigError(
            "client_ip: set trusted_proxies or trusted_hops, not both".into(),
        ));
    }
    let header = match c.header.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("x-forwarded-for") => ForwardedHeader::XForwardedFor,
        Some("forwarded") => ForwardedHeader::Forwarded,
        Some(other) => ForwardedHeader::Single(
            HeaderName::from_bytes(other.as_bytes())
                .map_err(|_| ConfigError::at("client_ip.header", other, "not a header name"))?,
        ),
    };
    let mut ip = ClientIp::peer().trust_proxies(ranges).header(header);
    if let Some(hops) = c.trusted_hops {
        ip = ip.trust_hops(hops);
    }
    if let Some(bits) = c.ipv6_prefix {
        ip = ip
            .ipv6_prefix(bits)
            .map_err(|e| ConfigError::at("client_ip.ipv6_prefix", bits, e))?;
    }
    Ok(ip)
}

fn policy(i: usize, p: PolicyFile) -> Result<RoutePolicy, ConfigError> {
    if p.name.is_empty()
        || p.name.len() > 64
        || !p
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::at(
            format!("policy[{i}].name"),
            &p.name,
            "use 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let at = format!("policy[{i}] ({})", p.name);
    if !p.route.starts_with('/') {
        return Err(ConfigError::at(
            format!("{at}.route"),
            &p.route,
            "a route template starts with '/'",
        ));
    }
    let method = p
        .method
        .as_deref()
        .map(|m| {
            m.to_ascii_uppercase()
                .parse::<Method>()
                .map_err(|_| ConfigError::at(format!("{at}.method"), m, "not an HTTP method"))
        })
        .transpose()?;
    let algorithm = p
        .algorithm
        .as_deref()
        .map(|a| {
            a.parse::<Algorithm>()
                .map_err(|e| ConfigError::at(format!("{at}.algorithm"), a, e))
        })
        .transpose()?;
    let texts = match p.quota {
        OneOrMany::One(q) => vec![q],
        OneOrMany::Many(qs) => qs,
    };
    if texts.is_empty() {
        return Err(ConfigError(format!(
            "{at}.quota: at least one quota is needed"
        )));
    }
    let several = texts.len() > 1;
    let mut quotas = Vec::new();
    for (j, text) in texts.iter().enumerate() {
        let path = if several {
            format!("{at}.quota[{j}]")
        } else {
            format!("{at}.quota")
        };
        let mut q: Quota = text.parse().map_err(|e| ConfigError::at(&path, text, e))?;
        if let Some(burst) = p.burst {
            q = q
                .burst(burst)
                .map_err(|e| ConfigError::at(format!("{at}.burst"), burst, e))?;
        }
        // The policy's algorithm applies to quotas that name none.
        if let Some(a) = algorithm {
            if q.algorithm_kind() == Algorithm::Gcra && !text.to_ascii_lowercase().contains("gcra")
            {
                q = q
                    .algorithm(a)
                    .map_err(|e| ConfigError::at(format!("{at}.algorithm"), a.name(), e))?;
            }
        }
        quotas.push(q);
    }
    let failure = match p.failure.as_deref() {
        None | Some("open") => FailureMode::Open,
        Some("closed") => FailureMode::Closed,
        Some(other) => {
            return Err(ConfigError::at(
                format!("{at}.failure"),
                other,
                "expected \"open\" or \"closed\"",
            ));
        }
    };
    let scope = match p.scope.as_deref() {
        None | Some("route") => KeyScope::Route,
        Some("policy") => KeyScope::Policy,
        Some(other) => {
            return Err(ConfigError::at(
                format!("{at}.scope"),
                other,
                "expected \"route\" or \"policy\"",
            ));
        }
    };
    let mut quotas = quotas.into_iter();
    let Some(first) = quotas.next() else {
        return Err(ConfigError(format!(
            "{at}.quota: at least one quota is needed"
        )));
    };
    let mut policy = Policy::new(p.name, first)
        .failure_mode(failure)
        .scope(scope)
        .shadow(p.shadow);
    for q in quotas {
        policy = policy.add_quota(q);
    }
    if let Some(cost) = p.cost {
        let min_burst = policy
            .quotas()
            .iter()
            .map(Quota::burst_size)
            .min()
            .unwrap_or(0);
        if cost == 0 || cost > min_burst {
            return Err(ConfigError::at(
                format!("{at}.cost"),
                cost,
                format!(
                    "must be between 1 and the smallest burst ({min_burst}), or no request could pass"
                ),
            ));
        }
        policy = policy.cost(cost);
    }
    if let Some(a) = p.allowlist {
        policy = policy.allowlist(allowlist(&format!("{at}.allowlist"), a)?);
    }
    Ok(RoutePolicy {
        route: p.route,
        method,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        headers = "both"
        shadow = false
        missing_key = "reject"
        unavailable_retry_after = "10s"

        [store]
        type = "redis"
        url = "redis://127.0.0.1:6379"
        timeout = "50ms"
        prefix = "app:"
        fallback = true
        breaker_threshold = 3

        [client_ip]
        trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
        header = "forwarded"
        ipv6_prefix = 56

        [allowlist]
        cidrs = ["192.0.2.0/24"]
        users = ["healthcheck"]

        [[policy]]
        name = "export"
        route = "/export"
        method = "get"
        quota = ["2/s", "20/m"]

        [[policy]]
        name = "login"
        route = "/login"
        method = "POST"
        quota = "5/m"
        failure = "closed"

        [[policy]]
        name = "api"
        route = "/api/{id}"
        quota = "100/m"
        algorithm = "sliding_window"
        scope = "policy"
        shadow = true
        allowlist = { users = ["robot"] }
    "#;

    #[test]
    fn a_full_file() {
        let c = Config::from_toml(FULL).unwrap();
        assert_eq!(c.headers, RateLimitHeaders::Both);
        assert_eq!(c.missing_key, MissingKey::Reject);
        assert_eq!(c.unavailable_retry_after, Duration::from_secs(10));
        assert_eq!(
            c.store,
            StoreConfig::Redis(RedisConfig {
                url: "redis://127.0.0.1:6379".into(),
                timeout: Some(Duration::from_millis(50)),
                prefix: Some("app:".into()),
                fallback: true,
                breaker_threshold: Some(3),
            })
        );
        assert_eq!(c.policies.len(), 3);
        let export = &c.policies[0];
        assert_eq!(export.method, Some(Method::GET));
        assert_eq!(export.policy.quotas().len(), 2);
        let api = &c.policies[2].policy;
        assert_eq!(api.quotas()[0].algorithm_kind(), Algorithm::SlidingWindow);
        assert!(c.check_routes(["/export", "/login", "/api/{id}"]).is_ok());
        let ip = "10.1.1.1".parse().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("forwarded", "for=198.51.100.4".parse().unwrap());
        assert_eq!(
            c.client_ip.resolve(ip, &h),
            "198.51.100.4".parse::<std::net::IpAddr>().unwrap()
        );
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.headers, RateLimitHeaders::Ietf);
        assert_eq!(c.store, StoreConfig::Memory { max_keys: None });
        assert!(c.policies.is_empty());
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let p = |extra: &str| format!("[[policy]]\nname = \"x\"\nroute = \"/x\"\n{extra}\n");
        let cases: Vec<(String, &str)> = vec![
            (
                p("quota = \"0/s\""),
                "policy[0] (x).quota = \"0/s\": quota limit must be at least 1",
            ),
            (
                p("quota = [\"1/s\", \"5/fortnight\"]"),
                "policy[0] (x).quota[1] = \"5/fortnight\": invalid quota \"5/fortnight\": the period is not a duration",
            ),
            (
                p("quota = \"1/s\"\nalgorithm = \"leaky\""),
                "policy[0] (x).algorithm = \"leaky\": unknown algorithm \"leaky\"",
            ),
            (
                p("quota = \"1/s\"\nfailure = \"maybe\""),
                "policy[0] (x).failure = \"maybe\": expected \"open\" or \"closed\"",
            ),
            (
                p("quota = \"1/s\"\nburst = 0"),
                "policy[0] (x).burst = 0: quota burst must be at least 1",
            ),
            (
                p("quota = \"2/s\"\ncost = 3"),
                "policy[0] (x).cost = 3: must be between 1 and the smallest burst (2)",
            ),
            (
                p("quota = \"1/s\"\nscope = \"global\""),
                "policy[0] (x).scope = \"global\": expected \"route\" or \"policy\"",
            ),
            (
                p("quota = \"1/s\"\nmethod = \"G ET\""),
                "policy[0] (x).method = \"G ET\": not an HTTP method",
            ),
            (p("quota = \"1/s\"\nlimit = 3"), "unknown field `limit`"),
            (
                p("quota = []"),
                "policy[0] (x).quota: at least one quota is needed",
            ),
            (
                p("quota = \"1/s\"\nallowlist = { cidrs = [\"10.0.0.0/33\"] }"),
                "policy[0] (x).allowlist.cidrs[0] = \"10.0.0.0/33\": not a CIDR range",
            ),
            (
                "[[policy]]\nname = \"a b\"\nroute = \"/x\"\nquota = \"1/s\"\n".into(),
                "policy[0].name = \"a b\": use 1 to 64 letters",
            ),
            (
                "[[policy]]\nname = \"x\"\nroute = \"x\"\nquota = \"1/s\"\n".into(),
                "policy[0] (x).route = \"x\": a route template starts with '/'",
            ),
            (
                format!(
                    "{}{}",
                    p("quota = \"1/s\""),
                    p("quota = \"2/s\"").replace("\"x\"\nroute", "\"y\"\nroute")
                ),
                "policy[1] (y): another policy already applies to any method on /x",
            ),
            (
                format!(
                    "{}{}",
                    p("quota = \"1/s\""),
                    p("quota = \"2/s\"").replace("\"/x\"", "\"/z\"")
                ),
                "policy[1].name = \"x\": used by an earlier policy",
            ),
            (
                "headers = \"loud\"".into(),
                "headers = \"loud\": expected one of",
            ),
            (
                "missing_key = \"drop\"".into(),
                "missing_key = \"drop\": expected one of",
            ),
            (
                "unavailable_retry_after = \"soon\"".into(),
                "unavailable_retry_after = \"soon\": expected a duration",
            ),
            (
                "[store]\ntype = \"etcd\"".into(),
                "store.type = \"etcd\": expected \"memory\" or \"redis\"",
            ),
            (
                "[store]\ntype = \"redis\"".into(),
                "store.url: required for type = \"redis\"",
            ),
            (
                "[store]\ntype = \"memory\"\nurl = \"redis://x\"".into(),
                "store.url: only applies to type = \"redis\"",
            ),
            (
                "[store]\ntype = \"memory\"\nmax_keys = 0".into(),
                "store.max_keys = 0: must be at least 1",
            ),
            (
                "[client_ip]\ntrusted_proxies = [\"nope\"]".into(),
                "client_ip.trusted_proxies[0] = \"nope\": not a CIDR range",
            ),
            (
                "[client_ip]\nipv6_prefix = 200".into(),
                "client_ip.ipv6_prefix = 200: IPv6 prefix length 200 is out of range",
            ),
            (
                "[client_ip]\ntrusted_proxies = [\"10.0.0.0/8\"]\ntrusted_hops = 1".into(),
                "client_ip: set trusted_proxies or trusted_hops, not both",
            ),
            ("headers = ".into(), "string values must be quoted"),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}\n  got:  {err}\n  want: {want}");
        }
    }

    #[test]
    fn unknown_route_templates_are_named() {
        let c =
            Config::from_toml("[[policy]]\nname = \"x\"\nroute = \"/exprot\"\nquota = \"1/s\"\n")
                .unwrap();
        assert_eq!(
            c.check_routes(["/export", "/login"])
                .unwrap_err()
                .to_string(),
            "policy[0] (x).route = \"/exprot\": no such route template (routes: /export, /login)"
        );
    }

    #[test]
    fn a_file_error_names_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("tollgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(
            &path,
            "headers = \"ietf\"\n\n[[policy]]\nname = \"x\"\nroute = \"/x\"\nquota = \"0/s\"\n",
        )
        .unwrap();
        let err = Config::from_file(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains("quota limit must be at least 1"), "{err}");
        let missing = Config::from_file(dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(missing.starts_with("cannot read config file"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn embeds_in_an_application_config_through_serde() {
        #[derive(Deserialize)]
        struct App {
            #[allow(dead_code)]
            port: u16,
            ratelimit: Config,
        }
        let app: App = toml::from_str("port = 8080\n[ratelimit]\n[[ratelimit.policy]]\nname = \"x\"\nroute = \"/x\"\nquota = \"3/m\"\n").unwrap();
        assert_eq!(app.ratelimit.policies[0].policy.quotas()[0].limit(), 3);
        let bad = toml::from_str::<App>("port = 1\n[ratelimit]\nheaders = \"x\"\n");
        assert!(bad.err().unwrap().to_string().contains("headers = \"x\""));
    }
}
