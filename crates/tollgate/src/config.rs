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

use std::fmt;
use std::path::Path;
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::check_binding;
use crate::{
    Algorithm, Allowlist, ClientIpSource, FailureMode, ForwardedHeader, KeyScope, MissingKey,
    Policy, PolicyError, Quota, RateLimitHeaders, RateLimitLayer,
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
    pub client_ip_source: ClientIpSource,
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
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StoreConfig {
    /// The in-process memory store (`type = "memory"`, the default).
    Memory {
        /// Its maximum number of quota states.
        max_keys: Option<usize>,
    },
    /// A store another crate provides, such as `type = "redis"`: its `[store]` section as
    /// written, which that crate reads and validates (`tollgate_redis::RedisConfig`, feature
    /// `config`). The core does not know the stores it does not depend on.
    Other(StoreSection),
}

/// The `[store]` section of a store another crate provides: its `type` and its settings, kept
/// as written until that crate reads them with [`settings`](StoreSection::settings).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSection {
    kind: String,
    settings: toml::Table,
}

impl StoreSection {
    /// The section's `type` (`"redis"`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Reads the section's settings (every field but `type`) into the store crate's own type,
    /// usually a `#[serde(deny_unknown_fields)]` struct.
    ///
    /// # Errors
    ///
    /// When a field is unknown or of the wrong type; the message starts with `store`.
    pub fn settings<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::Value::Table(self.settings.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(format!("store: {}", e.message().trim())))
    }

    /// Whether the section sets `field`.
    pub fn has(&self, field: &str) -> bool {
        self.settings.contains_key(field)
    }
}

/// An invalid configuration. Its message names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    /// An error in `value` of the field at `path`, for `why`: `store.timeout = "soon": expected a
    /// duration like 100ms, 5s, 1m`. Store crates that read a [`StoreSection`] report with
    /// this, so that every error of a file reads alike.
    pub fn at(path: impl fmt::Display, value: impl fmt::Debug, why: impl fmt::Display) -> Self {
        ConfigError(format!("{path} = {value:?}: {why}"))
    }

    /// An error about the field at `path` as a whole (missing, or not allowed here):
    /// `store.url: required for type = "redis"`.
    pub fn field(path: impl fmt::Display, why: impl fmt::Display) -> Self {
        ConfigError(format!("{path}: {why}"))
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
            .client_ip_source(self.client_ip_source.clone())
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

/// `[store]`: its type, and the rest as written (the memory store's are read here; other
/// stores' by their own crates).
#[derive(Deserialize)]
struct StoreFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    settings: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryFile {
    max_keys: Option<usize>,
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
    route: OneOrMany,
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

/// Reads a duration as the file writes them (`100ms`, `5s`, `1m`, at least 1 ns), reporting an
/// error at `path`. Store crates read their durations with this, so every duration in a file
/// reads alike.
///
/// # Errors
///
/// When `s` is not a duration, or is zero.
pub fn duration(path: &str, s: &str) -> Result<Duration, ConfigError> {
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
            None | Some("shared") => MissingKey::Shared,
            Some("allow") => MissingKey::Allow,
            Some("reject") => MissingKey::Reject,
            Some(other) => {
                return Err(ConfigError::at(
                    "missing_key",
                    other,
                    "expected one of \"shared\", \"allow\", \"reject\"",
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
            None => ClientIpSource::peer(),
            Some(c) => client_ip(&c)?,
        };
        let allowlist = allowlist("allowlist", file.allowlist.unwrap_or_default())?;
        // The checks the layer's builder runs, reported with the field's path.
        let mut bound: Vec<(Option<Method>, String, Policy)> = Vec::new();
        let mut policies = Vec::new();
        for (i, p) in file.policies.into_iter().enumerate() {
            for rp in policy(i, p)? {
                rp.policy
                    .validate()
                    .and_then(|()| {
                        check_binding(
                            &bound,
                            None,
                            Policy::name,
                            rp.method.as_ref(),
                            Some(&rp.route),
                            &rp.policy,
                        )
                    })
                    .map_err(|e| policy_error(i, e))?;
                bound.push((rp.method.clone(), rp.route.clone(), rp.policy.clone()));
                policies.push(rp);
            }
        }
        Ok(Config {
            headers,
            shadow: file.shadow,
            missing_key,
            unavailable_retry_after,
            store,
            client_ip_source: client_ip,
            allowlist,
            policies,
        })
    }
}

fn store(s: StoreFile) -> Result<StoreConfig, ConfigError> {
    let section = StoreSection {
        kind: s.kind,
        settings: s.settings,
    };
    if section.kind != "memory" {
        return Ok(StoreConfig::Other(section));
    }
    if let Some(field) = section.settings.keys().find(|k| *k != "max_keys") {
        return Err(ConfigError::field(
            format!("store.{field}"),
            "not a setting of type = \"memory\" (only max_keys is)",
        ));
    }
    let file: MemoryFile = section.settings()?;
    if file.max_keys == Some(0) {
        return Err(ConfigError::at("store.max_keys", 0, "must be at least 1"));
    }
    Ok(StoreConfig::Memory {
        max_keys: file.max_keys,
    })
}

fn client_ip(c: &ClientIpFile) -> Result<ClientIpSource, ConfigError> {
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
    if let Some(hops) = c.trusted_hops.filter(|&h| h > crate::client_ip::MAX_HOPS) {
        return Err(ConfigError::at(
            "client_ip.trusted_hops",
            hops,
            format!(
                "at most {} hops are read from a forwarding header",
                crate::client_ip::MAX_HOPS
            ),
        ));
    }
    if !ranges.is_empty() && c.trusted_hops.is_some() {
        return Err(ConfigError(
            "client_ip: set trusted_proxies or trusted_hops, not both".into(),
        ));
    }
    let header = match c.header.as_deref() {
        None => ForwardedHeader::XForwardedFor,
        Some(name) => name
            .parse::<ForwardedHeader>()
            .map_err(|_| ConfigError::at("client_ip.header", name, "not a header name"))?,
    };
    let mut ip = ClientIpSource::peer().trust_proxies(ranges).header(header);
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

/// A [`PolicyError`] as the file's error, naming the policy's place in the file.
fn policy_error(i: usize, e: PolicyError) -> ConfigError {
    match e {
        PolicyError::Name { name } => ConfigError::at(
            format!("policy[{i}].name"),
            name,
            "use 1 to 64 letters, digits, '-' or '_'",
        ),
        PolicyError::Route { policy, route } => ConfigError::at(
            format!("policy[{i}] ({policy}).route"),
            route,
            "a route template starts with '/'",
        ),
        PolicyError::Cost {
            policy,
            cost,
            min_burst,
        } => ConfigError::at(
            format!("policy[{i}] ({policy}).cost"),
            cost,
            format!(
                "must be between 1 and the smallest burst ({min_burst}), or no request could pass"
            ),
        ),
        PolicyError::NameTaken { name } => ConfigError::at(
            format!("policy[{i}].name"),
            name,
            "used by an earlier, different policy (two policies with one name would share the \
             state of the quotas they have in common and merge their metrics; repeat the policy \
             exactly to apply it to another route)",
        ),
        other => ConfigError(format!("policy[{i}]: {other}")),
    }
}

fn policy(i: usize, p: PolicyFile) -> Result<Vec<RoutePolicy>, ConfigError> {
    crate::policy::check_name(&p.name).map_err(|e| policy_error(i, e))?;
    let at = format!("policy[{i}] ({})", p.name);
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
                .with_burst(burst)
                .map_err(|e| ConfigError::at(format!("{at}.burst"), burst, e))?;
        }
        // The policy's algorithm applies to quotas that name none.
        if let Some(a) = algorithm
            && q.algorithm() == Algorithm::Gcra
            && !text.to_ascii_lowercase().contains("gcra")
        {
            q = q
                .with_algorithm(a)
                .map_err(|e| ConfigError::at(format!("{at}.algorithm"), a.name(), e))?;
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
    let (routes, listed) = match p.route {
        OneOrMany::One(route) => (vec![route], false),
        OneOrMany::Many(routes) if routes.is_empty() => {
            return Err(ConfigError(format!(
                "{at}.route: at least one route is needed"
            )));
        }
        OneOrMany::Many(routes) => (routes, true),
    };
    let scope = match p.scope.as_deref() {
        // A list of routes shares one budget unless it says otherwise.
        None if listed => KeyScope::Policy,
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
        .with_failure_mode(failure)
        .with_scope(scope)
        .with_shadow(p.shadow);
    for q in quotas {
        policy = policy.add_quota(q);
    }
    if let Some(cost) = p.cost {
        policy = policy.with_cost(cost);
    }
    if let Some(a) = p.allowlist {
        policy = policy.with_allowlist(allowlist(&format!("{at}.allowlist"), a)?);
    }
    Ok(routes
        .into_iter()
        .map(|route| RoutePolicy {
            route,
            method: method.clone(),
            policy: policy.clone(),
        })
        .collect())
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
        deny_cache = 500
        deny_cache_ttl = "30s"

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
        // The Redis section is kept as written, for tollgate-redis to read (its tests).
        let StoreConfig::Other(store) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(store.kind(), "redis");
        assert!(store.has("url") && store.has("deny_cache_ttl") && !store.has("type"));
        assert_eq!(c.policies.len(), 3);
        let export = &c.policies[0];
        assert_eq!(export.method, Some(Method::GET));
        assert_eq!(export.policy.quotas().len(), 2);
        let api = &c.policies[2].policy;
        assert_eq!(api.quotas()[0].algorithm(), Algorithm::SlidingWindow);
        assert!(c.check_routes(["/export", "/login", "/api/{id}"]).is_ok());
        let ip = "10.1.1.1".parse().unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("forwarded", "for=198.51.100.4".parse().unwrap());
        assert_eq!(
            c.client_ip_source.resolve(ip, &h),
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
                "policy[1]: policy \"y\": another policy already applies to any method on /x",
            ),
            (
                format!(
                    "{}{}",
                    p("quota = \"1/s\""),
                    p("quota = \"2/s\"").replace("\"/x\"", "\"/z\"")
                ),
                "policy[1].name = \"x\": used by an earlier, different policy",
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
                "[store]\ntype = \"memory\"\nurl = \"redis://x\"".into(),
                "store.url: not a setting of type = \"memory\"",
            ),
            (
                "[store]\ntype = \"memory\"\nmax_keys = \"many\"".into(),
                "store: invalid type: string \"many\", expected usize",
            ),
            (
                "[store]\nurl = \"redis://x\"".into(),
                "missing field `type`",
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
            (
                "[client_ip]\ntrusted_hops = 65".into(),
                "client_ip.trusted_hops = 65: at most 64 hops are read",
            ),
            ("headers = ".into(), "string values must be quoted"),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}\n  got:  {err}\n  want: {want}");
        }
    }

    #[test]
    fn one_policy_repeated_on_several_routes_is_one_policy() {
        let entry = |route: &str| {
            format!(
                "[[policy]]\nname = \"api\"\nroute = \"{route}\"\nquota = \"3/m\"\nscope = \"policy\"\n"
            )
        };
        let c = Config::from_toml(&format!("{}{}", entry("/a"), entry("/b"))).unwrap();
        assert_eq!(c.policies.len(), 2);
        assert_eq!(c.policies[0].policy, c.policies[1].policy);
        let zero = "[[policy]]\nname = \"x\"\nroute = \"/x\"\nquota = \"2/s\"\ncost = 0\n";
        assert!(
            Config::from_toml(zero)
                .unwrap_err()
                .to_string()
                .contains("policy[0] (x).cost = 0: must be between 1 and the smallest burst (2)")
        );
    }

    /// The ```toml blocks of a document.
    fn toml_blocks(doc: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut current: Option<String> = None;
        for line in doc.lines() {
            match (&mut current, line.trim()) {
                (None, "```toml") => current = Some(String::new()),
                (Some(_), "```") => blocks.extend(current.take()),
                (Some(block), _) => {
                    block.push_str(line);
                    block.push('\n');
                }
                (None, _) => {}
            }
        }
        blocks
    }

    #[test]
    fn every_toml_block_of_the_configuration_guide_is_a_valid_file() {
        let blocks = toml_blocks(include_str!("../../../docs/configuration.md"));
        assert!(blocks.len() >= 4, "{} blocks", blocks.len());
        for block in &blocks {
            if let Err(e) = Config::from_toml(block) {
                panic!("docs/configuration.md: {e}\n{block}");
            }
        }
        // The demo's documented file too.
        Config::from_toml(include_str!("../../../examples/demo/tollgate.toml")).unwrap();
    }

    #[tokio::test]
    async fn the_files_allowlist_and_shadow_reach_the_layer() {
        use http::{Request, Response};
        use tower::{ServiceBuilder, ServiceExt};
        let config = Config::from_toml(
            "shadow = true\n[allowlist]\ncidrs = [\"192.0.2.0/24\"]\nusers = [\"robot\"]\n\
             [[policy]]\nname = \"p\"\nroute = \"/p\"\nquota = \"1/h\"\n",
        )
        .unwrap();
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let layer = config
            .layer(crate::MemoryStore::new())
            .policy(config.policies[0].policy.clone());
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_: Request<()>| async {
                Ok::<_, std::convert::Infallible>(Response::new(bytes::Bytes::new()))
            });
        let from = |ip: [u8; 4]| {
            let mut req = Request::new(());
            req.extensions_mut()
                .insert(std::net::SocketAddr::from((ip, 1)));
            req
        };
        // Shadow: the second request of a 1/h client passes, counted as would-be refused.
        for _ in 0..2 {
            let res = svc.clone().oneshot(from([198, 51, 100, 1])).await.unwrap();
            assert_eq!(res.status(), 200);
            assert!(!res.headers().contains_key("ratelimit"));
        }
        // Allowlisted: never asks the store.
        for _ in 0..3 {
            svc.clone().oneshot(from([192, 0, 2, 9])).await.unwrap();
        }
        let mut decisions = std::collections::HashMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            if let metrics_util::debugging::DebugValue::Counter(n) = value
                && let Some(d) = key.key().labels().find(|l| l.key() == "decision")
            {
                *decisions.entry(d.value().to_owned()).or_insert(0) += n;
            }
        }
        assert_eq!(decisions.get("allowed"), Some(&1), "{decisions:?}");
        assert_eq!(decisions.get("shadow_limited"), Some(&1), "{decisions:?}");
        assert_eq!(decisions.get("allowlisted"), Some(&3), "{decisions:?}");
    }

    #[tokio::test]
    async fn the_guides_group_of_routes_shares_one_budget() {
        use axum::routing::get;
        use tower::ServiceExt;
        // The block of docs/configuration.md that says so, as written there.
        let blocks = toml_blocks(include_str!("../../../docs/configuration.md"));
        let block = blocks
            .iter()
            .find(|b| b.contains("/api/exports"))
            .expect("the group-of-routes example");
        let config = Config::from_toml(block).unwrap();
        let app = axum::Router::new()
            .route("/api/reports", get(|| async { "reports" }))
            .route("/api/exports", get(|| async { "exports" }))
            .layer(config.layer(crate::MemoryStore::new()))
            .layer(axum::extract::connect_info::MockConnectInfo(
                std::net::SocketAddr::from(([198, 51, 100, 1], 1)),
            ));
        let mut statuses = Vec::new();
        for i in 0..61 {
            let path = if i % 2 == 0 {
                "/api/reports"
            } else {
                "/api/exports"
            };
            let req = http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            statuses.push(app.clone().oneshot(req).await.unwrap().status().as_u16());
        }
        // 60 per minute between the two routes, not 60 each.
        assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 60);
        assert_eq!(statuses[60], 429);
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
