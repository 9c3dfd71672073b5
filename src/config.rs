//! Server settings: one typed struct with the defaults the README documents.
//!
//! The struct is plain data with serde defaults, so that a configuration file may set any subset
//! of it; the binary layers built-in defaults, the file, the environment and flags onto it.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::model::Defaults;

/// Where the ledger lives.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Store {
    /// In this process only: for trying waquota out and for tests.
    #[default]
    Memory,
    /// A standalone Redis (or a primary behind a proxy): `redis://` or `rediss://` (TLS) URL,
    /// with `user:password@` for an ACL user.
    Redis { url: String },
    /// A Redis Cluster, through the cluster client: one or more seed node URLs.
    Cluster { nodes: Vec<String> },
}

/// A Redis URL with its password replaced by `***`, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => format!("{scheme}://***@{host}{path}"),
        },
        None => url.to_owned(),
    }
}

/// Passwords in URLs are redacted: settings may be logged.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Memory => f.write_str("Memory"),
            Store::Redis { url } => f
                .debug_struct("Redis")
                .field("url", &redact_url(url))
                .finish(),
            Store::Cluster { nodes } => f
                .debug_struct("Cluster")
                .field(
                    "nodes",
                    &nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// What a decision answers when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// `UNAVAILABLE`: the safe side for a quota.
    #[default]
    Deny,
    /// Admit the message (transactional traffic may prefer sending to stalling); counted in
    /// metrics and logged, never silent.
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Bearer tokens for the two roles. Empty lists = authentication off.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// May call QuotaService.
    pub sender_tokens: Vec<String>,
    /// May call QuotaService and AdminService.
    pub operator_tokens: Vec<String>,
}

/// Counts only: settings may be logged, tokens never.
impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("sender_tokens", &self.sender_tokens.len())
            .field("operator_tokens", &self.operator_tokens.len())
            .finish()
    }
}

impl AuthSettings {
    pub fn enabled(&self) -> bool {
        !self.sender_tokens.is_empty() || !self.operator_tokens.is_empty()
    }
}

/// TLS for the gRPC listener; with `client_ca`, clients must present a certificate (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Address of the gRPC listener.
    pub listen: SocketAddr,
    pub store: Store,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Honour the `at` field of requests (tests, replays, simulations).
    pub trust_client_clock: bool,
    /// Policies of targets that have none stored.
    #[serde(skip)]
    pub defaults: Defaults,
    /// Most recipients in one `AcquireBatch`.
    pub max_batch: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most requests in flight at once; beyond it calls get `RESOURCE_EXHAUSTED` immediately.
    pub max_in_flight: usize,
    /// Connections kept to Redis (each one multiplexed).
    pub redis_pool_size: usize,
    /// PEM CA certificate(s) that a `rediss://` server's certificate must chain to, instead of
    /// the built-in Mozilla roots (a self-hosted Redis with a private CA).
    pub redis_ca: Option<PathBuf>,
    /// Longest wait for one Redis call before answering `UNAVAILABLE`.
    #[serde(with = "millis")]
    pub redis_timeout: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    #[serde(with = "millis")]
    pub shutdown_grace: Duration,
    /// On shutdown, how long health reports NOT_SERVING before the listener closes, so load
    /// balancers stop routing here while calls still succeed.
    #[serde(with = "millis")]
    pub shutdown_delay: Duration,
    /// Decisions when the store cannot be reached (a policy may override it).
    pub on_store_error: OnStoreError,
    /// Per-sender overrides of `on_store_error`, by sender id. Why in the configuration and not
    /// in the stored policy: when the store is down, the stored policy cannot be read either,
    /// and neither can a sender's portfolio; so an override for a portfolio lists its senders.
    pub on_store_error_senders: BTreeMap<String, OnStoreError>,
    /// Prometheus `/metrics` listener; `None` = no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// tracing EnvFilter syntax, e.g. `info` or `waquota=debug`.
    pub log_level: String,
    pub auth: AuthSettings,
    pub tls: Option<TlsSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            store: Store::Memory,
            key_prefix: "wq".into(),
            trust_client_clock: false,
            defaults: Defaults::default(),
            max_batch: 1000,
            max_message_bytes: 4 * 1024 * 1024,
            max_in_flight: 4096,
            redis_pool_size: 4,
            redis_ca: None,
            redis_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            on_store_error: OnStoreError::Deny,
            on_store_error_senders: BTreeMap::new(),
            metrics_listen: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            auth: AuthSettings::default(),
            tls: None,
        }
    }
}

/// Durations in configuration files are whole milliseconds.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_redis_passwords() {
        assert_eq!(
            redact_url("rediss://waq:s3cret@redis.internal:6380/0"),
            "rediss://waq:***@redis.internal:6380/0"
        );
        assert_eq!(
            redact_url("redis://:s3cret@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let s = Store::Cluster {
            nodes: vec!["redis://u:pw@a:1".into()],
        };
        assert!(!format!("{s:?}").contains("pw"));
    }
}
