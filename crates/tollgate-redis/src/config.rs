//! The `[store]` section of a tollgate configuration file, for `type = "redis"` (feature
//! `config`).
//!
//! The core reads the file ([`tollgate::config::Config`]) and keeps a store section it does not
//! know as written; this crate reads it, with the same error type and the same kind of
//! messages as the rest of the file.
//!
//! ```
//! use tollgate::config::Config;
//! use tollgate_redis::RedisConfig;
//!
//! let config = Config::from_toml(r#"
//!     [store]
//!     type = "redis"
//!     url = "redis://127.0.0.1:6379"
//!     timeout = "50ms"
//! "#).unwrap();
//! let redis = RedisConfig::from_config(&config).unwrap().expect("type = \"redis\"");
//! assert_eq!(redis.url, "redis://127.0.0.1:6379");
//! // RedisConfig::builder(&redis) applies every setting to a RedisStoreBuilder.
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tollgate::MemoryStore;
use tollgate::config::{Config, ConfigError, StoreConfig, StoreSection, duration};

use crate::{Error, RedisStore, RedisStoreBuilder};

/// The settings of a Redis store, as read from a configuration file's `[store]` section.
/// Unset settings keep [`RedisStoreBuilder`]'s defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server URL (`redis://`, `rediss://`, `redis-cluster://`, `redis-sentinel://`).
    pub url: String,
    /// Deadline of each decision.
    pub timeout: Option<Duration>,
    /// Key prefix.
    pub prefix: Option<String>,
    /// Decide locally (a default [`MemoryStore`]) while Redis cannot.
    pub fallback: bool,
    /// Consecutive failures that open the circuit.
    pub breaker_threshold: Option<u32>,
    /// How many refused keys each instance remembers (0: no deny cache).
    pub deny_cache: Option<usize>,
    /// The longest a remembered refusal is trusted.
    pub deny_cache_ttl: Option<Duration>,
    /// The most checks sent in one script call (1: each its own call).
    pub max_batch: Option<usize>,
    /// PEM file of the CA certificates to trust instead of the system's (a private CA); see
    /// [`RedisTls`](crate::RedisTls). Needs a TLS URL.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM files of a client certificate and its key, for mutual TLS (both or neither).
    pub tls_client_cert_file: Option<PathBuf>,
    /// The key of [`tls_client_cert_file`](Self::tls_client_cert_file).
    pub tls_client_key_file: Option<PathBuf>,
}

/// The section as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisFile {
    url: Option<String>,
    timeout: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    fallback: bool,
    breaker_threshold: Option<u32>,
    deny_cache: Option<usize>,
    deny_cache_ttl: Option<String>,
    max_batch: Option<usize>,
    tls_ca_file: Option<PathBuf>,
    tls_client_cert_file: Option<PathBuf>,
    tls_client_key_file: Option<PathBuf>,
}

impl RedisConfig {
    /// The settings for a store at `url`, every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            timeout: None,
            prefix: None,
            fallback: false,
            breaker_threshold: None,
            deny_cache: None,
            deny_cache_ttl: None,
            max_batch: None,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
        }
    }

    /// The Redis settings of a configuration: `None` when it asks for the memory store.
    ///
    /// # Errors
    ///
    /// As [`from_store`](Self::from_store).
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        Self::from_store(&config.store)
    }

    /// The Redis settings of a `[store]` section: `None` for the memory store.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field and the value: a `type` that is neither `"memory"`
    /// nor `"redis"`, a missing `url`, an unknown field, a duration that is not one, a
    /// `breaker_threshold` of 0.
    pub fn from_store(store: &StoreConfig) -> Result<Option<Self>, ConfigError> {
        match store {
            StoreConfig::Other(section) if section.kind() == "redis" => {
                Self::from_section(section).map(Some)
            }
            StoreConfig::Other(section) => Err(ConfigError::at(
                "store.type",
                section.kind(),
                "expected \"memory\" or \"redis\"",
            )),
            _ => Ok(None),
        }
    }

    fn from_section(section: &StoreSection) -> Result<Self, ConfigError> {
        if section.has("max_keys") {
            return Err(ConfigError::field(
                "store.max_keys",
                "only applies to type = \"memory\"",
            ));
        }
        let file: RedisFile = section.settings()?;
        let Some(url) = file.url else {
            return Err(ConfigError::field(
                "store.url",
                "required for type = \"redis\"",
            ));
        };
        if file.breaker_threshold == Some(0) {
            return Err(ConfigError::at(
                "store.breaker_threshold",
                0,
                "must be at least 1",
            ));
        }
        if let Some(n) = file.max_batch
            && !(1..=crate::builder::MAX_BATCH).contains(&n)
        {
            return Err(ConfigError::at(
                "store.max_batch",
                n,
                format!("must be from 1 to {}", crate::builder::MAX_BATCH),
            ));
        }
        match (&file.tls_client_cert_file, &file.tls_client_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::field(
                    "store.tls_client_key_file",
                    "required with tls_client_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::field(
                    "store.tls_client_cert_file",
                    "required with tls_client_key_file",
                ));
            }
            _ => {}
        }
        let timeout = file
            .timeout
            .as_deref()
            .map(|t| duration("store.timeout", t))
            .transpose()?;
        let deny_cache_ttl = file
            .deny_cache_ttl
            .as_deref()
            .map(|t| duration("store.deny_cache_ttl", t))
            .transpose()?;
        Ok(RedisConfig {
            url,
            timeout,
            prefix: file.prefix,
            fallback: file.fallback,
            breaker_threshold: file.breaker_threshold,
            deny_cache: file.deny_cache,
            deny_cache_ttl,
            max_batch: file.max_batch,
            tls_ca_file: file.tls_ca_file,
            tls_client_cert_file: file.tls_client_cert_file,
            tls_client_key_file: file.tls_client_key_file,
        })
    }

    /// A builder with these settings: [`RedisStore::builder`] for the URL, then every setting
    /// that is set.
    ///
    /// # Errors
    ///
    /// As [`RedisStore::builder`]: a URL that cannot be read. [`Error::Tls`] for a TLS file
    /// that cannot be read, or TLS files without the crate's `tls` feature.
    pub fn builder(&self) -> Result<RedisStoreBuilder, Error> {
        let mut builder = RedisStore::builder(&self.url)?;
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(prefix) = &self.prefix {
            builder = builder.prefix(prefix.clone());
        }
        if self.fallback {
            builder = builder.fallback(MemoryStore::new());
        }
        if let Some(n) = self.breaker_threshold {
            builder = builder.breaker_threshold(n);
        }
        if let Some(n) = self.deny_cache {
            builder = builder.deny_cache(n);
        }
        if let Some(ttl) = self.deny_cache_ttl {
            builder = builder.deny_cache_ttl(ttl);
        }
        if let Some(n) = self.max_batch {
            builder = builder.max_batch(n);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = self.tls()? {
            builder = builder.tls(tls);
        }
        #[cfg(not(feature = "tls"))]
        if self.tls_ca_file.is_some() || self.tls_client_cert_file.is_some() {
            return Err(Error::Tls(
                "tls_ca_file and tls_client_cert_file need tollgate-redis's `tls` feature".into(),
            ));
        }
        Ok(builder)
    }

    /// The TLS settings the file names, if any.
    #[cfg(feature = "tls")]
    fn tls(&self) -> Result<Option<crate::RedisTls>, Error> {
        if self.tls_ca_file.is_none() && self.tls_client_cert_file.is_none() {
            return Ok(None);
        }
        let mut tls = crate::RedisTls::new();
        if let Some(ca) = &self.tls_ca_file {
            tls = tls.with_ca_file(ca)?;
        }
        if let (Some(cert), Some(key)) = (&self.tls_client_cert_file, &self.tls_client_key_file) {
            tls = tls.with_client_cert_files(cert, key)?;
        }
        Ok(Some(tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(toml: &str) -> Result<Option<RedisConfig>, String> {
        let config = Config::from_toml(toml).map_err(|e| e.to_string())?;
        RedisConfig::from_config(&config).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_section() {
        let got = read(
            r#"
            [store]
            type = "redis"
            url = "redis://127.0.0.1:6379"
            timeout = "50ms"
            prefix = "app:"
            fallback = true
            breaker_threshold = 3
            deny_cache = 500
            deny_cache_ttl = "30s"
            max_batch = 16
            tls_ca_file = "/etc/tollgate/ca.pem"
            tls_client_cert_file = "/etc/tollgate/client.pem"
            tls_client_key_file = "/etc/tollgate/client.key"
            "#,
        )
        .unwrap();
        assert_eq!(
            got,
            Some(RedisConfig {
                url: "redis://127.0.0.1:6379".into(),
                timeout: Some(Duration::from_millis(50)),
                prefix: Some("app:".into()),
                fallback: true,
                breaker_threshold: Some(3),
                deny_cache: Some(500),
                deny_cache_ttl: Some(Duration::from_secs(30)),
                max_batch: Some(16),
                tls_ca_file: Some("/etc/tollgate/ca.pem".into()),
                tls_client_cert_file: Some("/etc/tollgate/client.pem".into()),
                tls_client_key_file: Some("/etc/tollgate/client.key".into()),
            })
        );
        let minimal = read("[store]\ntype = \"redis\"\nurl = \"redis://h:1\"").unwrap();
        assert_eq!(minimal, Some(RedisConfig::new("redis://h:1")));
    }

    #[test]
    fn the_memory_store_is_not_redis() {
        assert_eq!(read(""), Ok(None));
        assert_eq!(read("[store]\ntype = \"memory\"\nmax_keys = 5"), Ok(None));
    }

    #[test]
    fn errors_name_the_field_and_the_value() {
        let cases = [
            (
                "[store]\ntype = \"etcd\"",
                "store.type = \"etcd\": expected \"memory\" or \"redis\"",
            ),
            (
                "[store]\ntype = \"redis\"",
                "store.url: required for type = \"redis\"",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\nmax_keys = 5",
                "store.max_keys: only applies to type = \"memory\"",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\ntimeout = \"soon\"",
                "store.timeout = \"soon\": expected a duration like 100ms, 5s, 1m",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\ndeny_cache_ttl = \"0s\"",
                "store.deny_cache_ttl = \"0s\": expected a duration",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\nbreaker_threshold = 0",
                "store.breaker_threshold = 0: must be at least 1",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\nmax_batch = 0",
                "store.max_batch = 0: must be from 1 to 1024",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\nmax_batch = 5000",
                "store.max_batch = 5000: must be from 1 to 1024",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\ntimout = \"1s\"",
                "store: unknown field `timout`",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"redis://x\"\ndeny_cache = -1",
                "store: invalid value: integer `-1`",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"rediss://x\"\ntls_client_cert_file = \"c.pem\"",
                "store.tls_client_key_file: required with tls_client_cert_file",
            ),
            (
                "[store]\ntype = \"redis\"\nurl = \"rediss://x\"\ntls_client_key_file = \"c.key\"",
                "store.tls_client_cert_file: required with tls_client_key_file",
            ),
        ];
        for (toml, want) in cases {
            let got = read(toml).unwrap_err();
            assert!(got.starts_with(want), "{toml:?}: {got}");
        }
    }

    #[tokio::test]
    async fn the_builder_takes_every_setting() {
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.prefix = Some("has space".into());
        // The prefix reached the builder: build refuses it.
        let err = config.builder().unwrap().build().unwrap_err();
        assert!(matches!(err, Error::Prefix(p) if p == "has space"));
        config.prefix = None;
        config.timeout = Some(Duration::from_millis(7));
        config.deny_cache = Some(3);
        config.deny_cache_ttl = Some(Duration::from_secs(2));
        config.breaker_threshold = Some(9);
        config.fallback = true;
        config.max_batch = Some(8);
        let shown = format!("{:?}", config.builder().unwrap());
        for field in [
            "timeout: 7ms",
            "deny_cache: 3",
            "deny_cache_ttl: 2s",
            "breaker_threshold: 9",
            "fallback: true",
            "max_batch: 8",
        ] {
            assert!(shown.contains(field), "{field} missing from {shown}");
        }
        let err = RedisConfig::new("http://h:1").builder().unwrap_err();
        assert!(matches!(err, Error::Scheme { .. }), "{err}");
    }
}
