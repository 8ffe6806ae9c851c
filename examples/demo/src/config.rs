//! The demo's policy file (TOML). The full reference is `docs/configuration.md`.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use tollgate::{FailureMode, Policy, Quota, RateLimitHeaders};

/// The routes the demo serves that a policy may name.
pub const ROUTES: [&str; 2] = ["/hello", "/login"];

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which rate-limit header fields responses carry.
    pub headers: RateLimitHeaders,
    /// The policies with the route (and method) each applies to.
    pub policies: Vec<RoutePolicy>,
}

/// A policy bound to a route.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    /// The route template.
    pub route: String,
    /// The method, or any.
    pub method: Option<http::Method>,
    /// The policy.
    pub policy: Policy,
}

impl Default for Config {
    /// The demo's built-in policies: the same as `examples/demo/tollgate.toml`.
    fn default() -> Self {
        let hello = Quota::new(5, Duration::from_secs(10)).and_then(|q| q.burst(5));
        let login = Quota::per_minute(3);
        let (Ok(hello), Ok(login)) = (hello, login) else {
            unreachable!("the built-in quotas are valid")
        };
        Config {
            headers: RateLimitHeaders::Ietf,
            policies: vec![
                RoutePolicy {
                    route: "/hello".into(),
                    method: None,
                    policy: Policy::new("hello", hello),
                },
                RoutePolicy {
                    route: "/login".into(),
                    method: Some(http::Method::POST),
                    policy: Policy::new("login", login).failure_mode(FailureMode::Closed),
                },
            ],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    headers: Option<String>,
    #[serde(default, rename = "policy")]
    policies: Vec<PolicyFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: String,
    route: String,
    method: Option<String>,
    quota: OneOrMany,
    burst: Option<u32>,
    failure: Option<String>,
    cost: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A configuration error that names the offending field and value.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a file.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, is not valid TOML, or names a value that cannot work.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses and validates the text of a file.
    ///
    /// # Errors
    ///
    /// When the text is not valid TOML or names a value that cannot work.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let headers = match file.headers.as_deref() {
            None | Some("ietf") => RateLimitHeaders::Ietf,
            Some("legacy") => RateLimitHeaders::Legacy,
            Some("both") => RateLimitHeaders::Both,
            Some("none") => RateLimitHeaders::None,
            Some(other) => bail!(ConfigError(format!(
                "headers = {other:?}: expected one of \"ietf\", \"legacy\", \"both\", \"none\""
            ))),
        };
        let mut seen = HashSet::new();
        let mut names = HashSet::new();
        let mut policies = Vec::new();
        for (i, p) in file.policies.into_iter().enumerate() {
            let at = format!("policy[{i}]");
            if p.name.is_empty()
                || p.name.len() > 64
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                bail!(ConfigError(format!(
                    "{at}.name = {:?}: use 1 to 64 letters, digits, '-' or '_'",
                    p.name
                )));
            }
            if !names.insert(p.name.clone()) {
                bail!(ConfigError(format!(
                    "{at}.name = {:?}: used by an earlier policy",
                    p.name
                )));
            }
            let at = format!("policy[{i}] ({})", p.name);
            if !ROUTES.contains(&p.route.as_str()) {
                bail!(ConfigError(format!(
                    "{at}.route = {:?}: the demo has no such route (routes: {})",
                    p.route,
                    ROUTES.join(", ")
                )));
            }
            let method =
                match p.method.as_deref() {
                    None => None,
                    Some(m) => Some(m.to_ascii_uppercase().parse::<http::Method>().map_err(
                        |_| ConfigError(format!("{at}.method = {m:?}: not an HTTP method")),
                    )?),
                };
            if !seen.insert((p.route.clone(), method.clone())) {
                bail!(ConfigError(format!(
                    "{at}: another policy already applies to {} {}",
                    method
                        .as_ref()
                        .map_or("any method on", http::Method::as_str),
                    p.route
                )));
            }
            let quotas = match p.quota {
                OneOrMany::One(q) => vec![q],
                OneOrMany::Many(qs) => qs,
            };
            if quotas.is_empty() {
                bail!(ConfigError(format!(
                    "{at}.quota: at least one quota is needed"
                )));
            }
            let mut parsed = Vec::new();
            for q in &quotas {
                let mut quota: Quota = q
                    .parse()
                    .map_err(|e| ConfigError(format!("{at}.quota = {q:?}: {e}")))?;
                if let Some(burst) = p.burst {
                    quota = quota
                        .burst(burst)
                        .map_err(|e| ConfigError(format!("{at}.burst = {burst}: {e}")))?;
                }
                parsed.push(quota);
            }
            let failure = match p.failure.as_deref() {
                None | Some("open") => FailureMode::Open,
                Some("closed") => FailureMode::Closed,
                Some(other) => bail!(ConfigError(format!(
                    "{at}.failure = {other:?}: expected \"open\" or \"closed\""
                ))),
            };
            let mut quotas = parsed.into_iter();
            let Some(first) = quotas.next() else {
                unreachable!("checked non-empty above")
            };
            let mut policy = Policy::new(p.name, first).failure_mode(failure);
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
                    bail!(ConfigError(format!(
                        "{at}.cost = {cost}: must be between 1 and the burst ({min_burst}), or no request could pass"
                    )));
                }
                policy = policy.cost(cost);
            }
            policies.push(RoutePolicy {
                route: p.route,
                method,
                policy,
            });
        }
        Ok(Config { headers, policies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_the_default() {
        let text = include_str!("../tollgate.toml");
        let file = Config::parse(text).unwrap();
        let default = Config::default();
        assert_eq!(file.headers, default.headers);
        assert_eq!(file.policies.len(), default.policies.len());
        for (a, b) in file.policies.iter().zip(&default.policies) {
            assert_eq!(a.route, b.route);
            assert_eq!(a.policy, b.policy);
        }
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let cases = [
            (
                "[[policy]]\nname='x'\nroute='/hello'\nquota='0/s'\n",
                "policy[0] (x).quota = \"0/s\": quota limit must be at least 1",
            ),
            (
                "[[policy]]\nname='x'\nroute='/nope'\nquota='1/s'\n",
                "policy[0] (x).route = \"/nope\": the demo has no such route",
            ),
            (
                "[[policy]]\nname='x'\nroute='/hello'\nquota='1/s'\nfailure='maybe'\n",
                "policy[0] (x).failure = \"maybe\": expected \"open\" or \"closed\"",
            ),
            (
                "[[policy]]\nname='x'\nroute='/hello'\nquota='1/s'\nburst=0\n",
                "policy[0] (x).burst = 0: quota burst must be at least 1",
            ),
            (
                "[[policy]]\nname='x'\nroute='/hello'\nquota='2/s'\ncost=3\n",
                "policy[0] (x).cost = 3: must be between 1 and the burst (2)",
            ),
            ("headers='loud'\n", "headers = \"loud\": expected one of"),
            (
                "[[policy]]\nname='x'\nroute='/hello'\nquota='1/s'\nlimit=3\n",
                "unknown field `limit`",
            ),
            (
                "[[policy]]\nname='a b'\nroute='/hello'\nquota='1/s'\n",
                "policy[0].name = \"a b\"",
            ),
            (
                "[[policy]]\nname='a'\nroute='/hello'\nquota='1/s'\n[[policy]]\nname='b'\nroute='/hello'\nquota='1/s'\n",
                "policy[1] (b): another policy already applies to any method on /hello",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(
                err.contains(want),
                "{text:?}\n  got:  {err}\n  want: {want}"
            );
        }
    }

    #[test]
    fn several_quotas_per_policy() {
        let c =
            Config::parse("[[policy]]\nname='x'\nroute='/hello'\nquota=['2/s','20/m']\n").unwrap();
        assert_eq!(c.policies[0].policy.quotas().len(), 2);
    }
}
