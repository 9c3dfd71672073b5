//! Server settings: one typed struct, and the layers that fill it.
//!
//! [`Settings::load`] layers, each over the one before: built-in defaults, a TOML file (its keys
//! are the field names of [`Settings`]; any subset may be given), the environment
//! (`WAQUOTA_…`) and command-line flags. The environment and the flags are both
//! [`Overrides`]: only what they set replaces what the layers below said. The merged result is
//! validated once, so every way of setting a value meets the same checks.

use std::collections::BTreeMap;
use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::model::{Defaults, PortfolioId, SenderId};

/// Where the ledger lives. Its `Debug` form hides passwords, since it is logged at start-up.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Store {
    /// In this process only: for trying waquota out and for tests.
    #[default]
    Memory,
    /// A standalone Redis (or a primary behind a proxy): `redis://` or `rediss://` (TLS) URL,
    /// with `user:password@` for an ACL user.
    Redis { url: String },
    /// A Redis Cluster, through the cluster client: one or more seed node URLs.
    Cluster { nodes: Vec<String> },
    /// A primary found through Redis Sentinel: seed sentinel URLs and the master's name. The
    /// credentials and TLS of the sentinel URLs (`rediss://`, `user:password@`, `redis_ca`) are
    /// used for the data nodes too.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
            Store::Sentinel { sentinels, master } => f
                .debug_struct("Sentinel")
                .field(
                    "sentinels",
                    &sentinels.iter().map(|n| redact_url(n)).collect::<Vec<_>>(),
                )
                .field("master", master)
                .finish(),
        }
    }
}

/// When a call that changed the ledger is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// As soon as the primary ran it; Redis replicates afterwards, so a failover can lose the
    /// last admissions (docs/contract.md, "Durability").
    #[default]
    Async,
    /// Only once `durability_replicas` replicas acknowledged it (`WAIT`, in the same pipeline).
    Replicated,
}

impl Durability {
    /// As the configuration says it.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Async => "async",
            Durability::Replicated => "replicated",
        }
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "async" => Ok(Durability::Async),
            "replicated" => Ok(Durability::Replicated),
            _ => Err(format!("unknown durability {s:?}: use async or replicated")),
        }
    }
}

/// What new slots get once the ledger is found lost (docs/contract.md, "A lost ledger").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLedgerLoss {
    /// Refused until an operator accepts the loss or one window has passed since it.
    #[default]
    DenyNew,
    /// Admitted as if the ledger were whole; the loss is still reported.
    Allow,
}

impl OnLedgerLoss {
    pub fn name(self) -> &'static str {
        match self {
            OnLedgerLoss::DenyNew => "deny_new",
            OnLedgerLoss::Allow => "allow",
        }
    }
}

impl FromStr for OnLedgerLoss {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "deny_new" | "deny-new" => Ok(OnLedgerLoss::DenyNew),
            "allow" => Ok(OnLedgerLoss::Allow),
            _ => Err(format!(
                "unknown on_ledger_loss {s:?}: use deny_new or allow"
            )),
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

impl OnStoreError {
    /// As the configuration says it.
    pub fn name(self) -> &'static str {
        match self {
            OnStoreError::Deny => "deny",
            OnStoreError::Allow => "allow",
        }
    }
}

impl FromStr for OnStoreError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "deny" => Ok(OnStoreError::Deny),
            "allow" => Ok(OnStoreError::Allow),
            _ => Err(format!("unknown on_store_error {s:?}: use deny or allow")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// As the configuration says it.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?}: use text or json")),
        }
    }
}

/// Bearer tokens for the two roles. Empty lists = authentication off. `Debug` shows how many,
/// never the tokens.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// May call QuotaService.
    pub sender_tokens: Vec<String>,
    /// May call QuotaService and AdminService.
    pub operator_tokens: Vec<String>,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |v: &Vec<String>| format!("{} token(s)", v.len());
        f.debug_struct("AuthSettings")
            .field("sender_tokens", &count(&self.sender_tokens))
            .field("operator_tokens", &count(&self.operator_tokens))
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address of the gRPC listener.
    pub listen: SocketAddr,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Honour the `at` field of requests (tests, replays, simulations).
    pub trust_client_clock: bool,
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
    /// When a call that changed the ledger is answered: `async` or `replicated`.
    pub durability: Durability,
    /// Replicas that must acknowledge a change with `durability = replicated`.
    pub durability_replicas: u32,
    /// Longest wait for those acknowledgements before answering `UNAVAILABLE`.
    #[serde(with = "millis")]
    pub durability_timeout: Duration,
    /// New slots once the ledger marker is found gone: `deny_new` or `allow`.
    pub on_ledger_loss: OnLedgerLoss,
    /// Seed sentinels (a file may say the Sentinel store this way instead of `[store]`).
    #[serde(skip_serializing, default)]
    pub redis_sentinel: Vec<String>,
    /// The Sentinel master name, with `redis_sentinel`.
    #[serde(skip_serializing, default)]
    pub redis_sentinel_master: Option<String>,
    /// Decisions when the store cannot be reached (a policy may override it).
    pub on_store_error: OnStoreError,
    /// Per-sender overrides of `on_store_error`, by sender id. Why in the configuration and not
    /// in the stored policy: when the store is down, the stored policy cannot be read either,
    /// and neither can a sender's portfolio; so an override for a portfolio lists its senders.
    pub on_store_error_senders: BTreeMap<String, OnStoreError>,
    /// Prometheus `/metrics` listener; `None` = no metrics endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// The WhatsApp webhook listener (`/webhooks/whatsapp`); `None` = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_listen: Option<SocketAddr>,
    /// The token Meta's verification request must carry (`hub.verify_token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_verify_token: Option<String>,
    /// App secrets a POST's `X-Hub-Signature-256` may be made with (several, for rotation).
    pub webhook_app_secrets: Vec<String>,
    /// Largest webhook body accepted, in bytes (beyond it 413).
    pub webhook_max_body_bytes: usize,
    /// The business's own webhook handler: every verified POST is relayed there, and answered
    /// 200 only once it answered 2xx too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_forward: Option<String>,
    /// WABA id -> portfolio, for WABA-wide webhooks (wins over AssignWaba).
    pub webhook_wabas: BTreeMap<String, String>,
    /// Display number -> sender (phone_number_id), for webhooks that carry only the display
    /// number (wins over the numbers learned from `messages` webhooks).
    pub webhook_displays: BTreeMap<String, String>,
    pub log_format: LogFormat,
    /// tracing EnvFilter syntax, e.g. `info` or `waquota=debug`.
    pub log_level: String,
    // Tables come after plain values, so that the settings print as TOML in this order.
    pub store: Store,
    /// Policies of targets that have none stored (the file's `[defaults]` table).
    #[serde(with = "defaults_table")]
    pub defaults: Defaults,
    pub auth: AuthSettings,
    #[serde(
        deserialize_with = "tls_table",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls: Option<TlsSettings>,
    /// Entries per part of a sender's service windows and pair rates before the part splits
    /// (docs/internals.md, "A sender's sets in parts"). Not a setting of the file, the flags or
    /// the environment: it must stay below Redis's `zset-max-listpack-entries` (128), and the
    /// tests lower it so that small sets split and merge.
    #[serde(skip)]
    pub set_part_fill: usize,
}

/// The default of [`Settings::set_part_fill`]: 96, three quarters of Redis's default
/// `zset-max-listpack-entries`, so a part that takes a batch's entries before it splits mostly
/// stays a listpack.
pub const SET_PART_FILL: usize = 96;

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
            durability: Durability::Async,
            durability_replicas: 1,
            durability_timeout: Duration::from_millis(50),
            set_part_fill: SET_PART_FILL,
            on_ledger_loss: OnLedgerLoss::DenyNew,
            redis_sentinel: Vec::new(),
            redis_sentinel_master: None,
            on_store_error: OnStoreError::Deny,
            on_store_error_senders: BTreeMap::new(),
            metrics_listen: None,
            webhook_listen: None,
            webhook_verify_token: None,
            webhook_app_secrets: Vec::new(),
            webhook_max_body_bytes: 1024 * 1024,
            webhook_forward: None,
            webhook_wabas: BTreeMap::new(),
            webhook_displays: BTreeMap::new(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            auth: AuthSettings::default(),
            tls: None,
        }
    }
}

/// A setting that cannot be used, named as it was given: the flag, the variable, or the file
/// (with the key's line when it is found there). Displays as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{var}: {message}")]
    Env { var: String, message: String },
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: &str, message: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Where each setting given above the built-in defaults came from, by file key: its flag, its
/// variable, or the file and line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources(BTreeMap<String, String>);

impl Sources {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn layer(&mut self, layer: &Overrides) {
        // A Sentinel store prints under [store].
        let printed = |key| match key {
            "redis_sentinel" => "store.sentinels",
            "redis_sentinel_master" => "store.master",
            key => key,
        };
        let store = |key| printed(key).starts_with("store.");
        // A store replaces the one below it whole.
        if layer.values.iter().any(|(_, s, _)| store(s.key)) {
            self.0.retain(|k, _| !k.starts_with("store."));
        }
        for (origin, s, _) in &layer.values {
            let name = s.name(*origin);
            if store(s.key) {
                self.0.entry("store.kind".into()).or_insert(name.clone());
            }
            self.0.insert(printed(s.key).to_owned(), name);
        }
    }
}

impl Settings {
    /// Defaults, then `file`, then the `WAQUOTA_…` variables among `env`, then `flags`;
    /// validated. A value refused by validation is named by the layer that gave it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: Overrides,
    ) -> Result<Settings, ConfigError> {
        Settings::load_with_sources(file, env, flags).map(|(s, _)| s)
    }

    /// [`Settings::load`], and where each value came from.
    pub fn load_with_sources(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: Overrides,
    ) -> Result<(Settings, Sources), ConfigError> {
        let (mut settings, text) = match file {
            Some(path) => {
                let text = read_file(path)?;
                let settings = Settings::from_toml(&text).map_err(|message| ConfigError::File {
                    path: path.display().to_string(),
                    message,
                })?;
                (settings, Some(text))
            }
            None => (Settings::default(), None),
        };
        let env = Overrides::from_env(env)?;
        env.apply(&mut settings)?;
        flags.apply(&mut settings)?;
        settings.validate().map_err(|e| {
            let (key, message) = match e {
                ConfigError::Invalid { key, message } => (key, message),
                other => return other,
            };
            let base = key.split('[').next().unwrap_or(&key);
            for layer in [&flags, &env] {
                if let Some(s) = layer.given(base) {
                    return layer.error(s, message);
                }
            }
            match (file, text.as_deref().and_then(|t| line_of(t, base))) {
                (Some(path), Some(line)) => ConfigError::File {
                    path: path.display().to_string(),
                    message: format!("line {line}: {key}: {message}"),
                },
                _ => ConfigError::Invalid { key, message },
            }
        })?;
        let mut sources = Sources::default();
        if let (Some(path), Some(text)) = (file, &text) {
            for (key, _) in settings.toml_lines() {
                if let Some(line) = line_of(text, &key) {
                    sources.0.insert(key, format!("{}:{line}", path.display()));
                }
            }
        }
        sources.layer(&env);
        sources.layer(&flags);
        Ok((settings, sources))
    }

    /// The lines of [`Settings::to_toml`], each with the file key it says (`store.url`, or the
    /// table's for a header), empty for a blank line.
    fn toml_lines(&self) -> Vec<(String, String)> {
        let mut table = String::new();
        self.to_toml()
            .lines()
            .map(|line| {
                let key = if let Some(header) = line.strip_prefix('[') {
                    table = header.trim_end_matches(']').to_owned();
                    table.clone()
                } else if let Some((leaf, _)) = line.split_once(" = ") {
                    match table.as_str() {
                        "" => leaf.to_owned(),
                        t => format!("{t}.{leaf}"),
                    }
                } else {
                    String::new()
                };
                (key, line.to_owned())
            })
            .collect()
    }

    /// [`Settings::to_toml`] with a comment after each value given above the defaults saying
    /// where it came from: `max_batch = 30  # --max-batch`.
    pub fn to_toml_with_sources(&self, sources: &Sources) -> String {
        self.toml_lines()
            .into_iter()
            .map(|(key, line)| {
                // A header only for a map setting ([webhook_wabas]), not for a group ([defaults]).
                let header = line.starts_with('[') && !SETTINGS.iter().any(|s| s.key == key);
                match sources.get(&key) {
                    Some(source) if !header => format!("{line}  # {source}\n"),
                    _ => format!("{line}\n"),
                }
            })
            .collect()
    }

    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        Settings::from_toml(&read_file(path)?).map_err(|message| ConfigError::File {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses a configuration file's text; the error is one line, with the line number.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        let mut s: Settings = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {message}")
                }
                None => message,
            }
        })?;
        s.fold_sentinel_keys()?;
        Ok(s)
    }

    /// `redis_sentinel` and `redis_sentinel_master` at the top of a file say the Sentinel store.
    fn fold_sentinel_keys(&mut self) -> Result<(), String> {
        let sentinels = std::mem::take(&mut self.redis_sentinel);
        let master = self.redis_sentinel_master.take();
        match (sentinels.is_empty(), master) {
            (true, None) => Ok(()),
            (true, Some(_)) => Err("redis_sentinel_master is set without redis_sentinel".into()),
            (false, None) => Err("redis_sentinel is set without redis_sentinel_master".into()),
            (false, Some(master)) if self.store == Store::Memory => {
                self.store = Store::Sentinel { sentinels, master };
                Ok(())
            }
            (false, Some(_)) => {
                Err("redis_sentinel and [store] both name a store: choose one".into())
            }
        }
    }

    /// The settings as a configuration file would say them.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }

    /// A copy safe to print: auth tokens and passwords inside Redis URLs become `***`.
    pub fn redacted(&self) -> Settings {
        let mut s = self.clone();
        let stars = |tokens: &mut Vec<String>| tokens.iter_mut().for_each(|t| *t = "***".into());
        stars(&mut s.auth.sender_tokens);
        stars(&mut s.auth.operator_tokens);
        stars(&mut s.webhook_app_secrets);
        if s.webhook_verify_token.is_some() {
            s.webhook_verify_token = Some("***".into());
        }
        match &mut s.store {
            Store::Memory => {}
            Store::Redis { url } => *url = redact_url(url),
            Store::Cluster { nodes } => nodes.iter_mut().for_each(|n| *n = redact_url(n)),
            Store::Sentinel { sentinels, .. } => {
                sentinels.iter_mut().for_each(|n| *n = redact_url(n))
            }
        }
        s
    }

    /// Checks what types alone do not: ranges, URLs, names, and that TLS files exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.store {
            Store::Memory => {}
            Store::Redis { url } => check_redis_url("store.url", url)?,
            Store::Cluster { nodes } => {
                if nodes.is_empty() {
                    return Err(ConfigError::invalid(
                        "store.nodes",
                        "a cluster needs at least one seed node URL",
                    ));
                }
                for (i, n) in nodes.iter().enumerate() {
                    check_redis_url(&format!("store.nodes[{i}]"), n)?;
                }
            }
            Store::Sentinel { sentinels, master } => {
                if sentinels.is_empty() {
                    return Err(ConfigError::invalid(
                        "redis_sentinel",
                        "Sentinel needs at least one seed sentinel URL",
                    ));
                }
                for (i, n) in sentinels.iter().enumerate() {
                    check_redis_url(&format!("redis_sentinel[{i}]"), n)?;
                }
                if master.is_empty() || !master.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(ConfigError::invalid(
                        "redis_sentinel_master",
                        "the master name Sentinel monitors: 1 or more visible characters",
                    ));
                }
            }
        }
        if self.durability == Durability::Replicated {
            if matches!(self.store, Store::Cluster { .. }) {
                return Err(ConfigError::invalid(
                    "durability",
                    "replicated is supported with a standalone Redis or Sentinel (on a Cluster, WAIT would go to a node other than the one that ran the script)",
                ));
            }
            if !(1..=16).contains(&self.durability_replicas) {
                return Err(ConfigError::invalid(
                    "durability_replicas",
                    format!("must be 1 to 16, got {}", self.durability_replicas),
                ));
            }
            if self.durability_timeout.is_zero() || self.durability_timeout >= self.redis_timeout {
                return Err(ConfigError::invalid(
                    "durability_timeout",
                    format!(
                        "must be at least 1 ms and less than redis_timeout ({} ms), got {} ms",
                        self.redis_timeout.as_millis(),
                        self.durability_timeout.as_millis()
                    ),
                ));
            }
        }
        // The prefix is part of every key: braces would change the hash tag, spaces break
        // redis-cli use.
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || !self
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        {
            return Err(ConfigError::invalid(
                "key_prefix",
                format!(
                    "{:?}: use 1 to 64 characters of [A-Za-z0-9._:-]",
                    self.key_prefix
                ),
            ));
        }
        for (key, value, min) in [
            ("max_batch", self.max_batch, 1),
            ("max_message_bytes", self.max_message_bytes, 1024),
            ("max_in_flight", self.max_in_flight, 1),
            ("redis_pool_size", self.redis_pool_size, 1),
        ] {
            if value < min {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be at least {min}, got {value}"),
                ));
            }
        }
        let d = &self.defaults;
        for (key, ok, rule) in [
            (
                "defaults.messages_per_second",
                (1..=100_000).contains(&d.messages_per_second),
                "1 to 100,000",
            ),
            (
                "defaults.pair_interval_ms",
                (1..=86_400_000).contains(&d.pair_interval_ms),
                "1 ms to 24 h",
            ),
            (
                "defaults.pair_burst",
                (1..=10_000).contains(&d.pair_burst),
                "1 to 10,000",
            ),
        ] {
            if !ok {
                return Err(ConfigError::invalid(key, format!("must be {rule}")));
            }
        }
        if self.redis_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "redis_timeout",
                "must be at least 1 ms",
            ));
        }
        // A CA only means something for TLS: with redis:// the connection would fail at start-up.
        if self.redis_ca.is_some() {
            let plain = match &self.store {
                Store::Redis { url } => vec![("store.url", url)],
                Store::Sentinel { sentinels, .. } => {
                    sentinels.iter().map(|u| ("redis_sentinel", u)).collect()
                }
                _ => vec![],
            };
            if let Some((key, url)) = plain.into_iter().find(|(_, u)| u.starts_with("redis://")) {
                return Err(ConfigError::invalid(
                    "redis_ca",
                    format!(
                        "is set but {key} {:?} is not TLS: use rediss://",
                        redact_url(url)
                    ),
                ));
            }
        }
        // As serve checks it: a cluster verifies rediss:// against the built-in roots only.
        if self.redis_ca.is_some() && matches!(self.store, Store::Cluster { .. }) {
            return Err(ConfigError::invalid(
                "redis_ca",
                "is supported with a standalone Redis only (a cluster verifies rediss:// against the built-in roots)",
            ));
        }
        if let Some(addr) = self.webhook_listen {
            if addr == self.listen || Some(addr) == self.metrics_listen {
                return Err(ConfigError::invalid(
                    "webhook_listen",
                    format!("{addr} is also the gRPC or metrics listen address"),
                ));
            }
            if self.webhook_app_secrets.is_empty() {
                return Err(ConfigError::invalid(
                    "webhook_app_secrets",
                    "the webhook listener needs at least one app secret to check signatures with",
                ));
            }
        }
        // The mappings' values are identifiers the bridge writes policies to: checked here, so a
        // typo is refused at start instead of leaving webhooks silently unapplied.
        for (waba, portfolio) in &self.webhook_wabas {
            PortfolioId::parse("portfolio", portfolio).map_err(|e| {
                ConfigError::invalid("webhook_wabas", format!("{waba}={portfolio}: {e}"))
            })?;
        }
        for (display, sender) in &self.webhook_displays {
            SenderId::parse("sender", sender).map_err(|e| {
                ConfigError::invalid("webhook_displays", format!("{display}={sender}: {e}"))
            })?;
        }
        if self.webhook_max_body_bytes < 1024 {
            return Err(ConfigError::invalid(
                "webhook_max_body_bytes",
                format!("must be at least 1024, got {}", self.webhook_max_body_bytes),
            ));
        }
        if let Some(url) = &self.webhook_forward
            && !url.starts_with("http://")
        {
            return Err(ConfigError::invalid(
                "webhook_forward",
                format!(
                    "{url:?}: use an http:// URL (a TLS-terminating proxy in front of the handler for https)"
                ),
            ));
        }
        if self.metrics_listen == Some(self.listen) {
            return Err(ConfigError::invalid(
                "metrics_listen",
                format!("{} is also the gRPC listen address", self.listen),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(ConfigError::invalid(
                "log_level",
                format!("{:?}: {e}", self.log_level),
            ));
        }
        for (key, tokens) in [
            ("auth.sender_tokens", &self.auth.sender_tokens),
            ("auth.operator_tokens", &self.auth.operator_tokens),
        ] {
            for (i, t) in tokens.iter().enumerate() {
                // A token travels in an `authorization` header: visible ASCII, no spaces.
                if t.is_empty() || !t.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(ConfigError::invalid(
                        &format!("{key}[{i}]"),
                        "a token is 1 or more visible ASCII characters, without spaces",
                    ));
                }
            }
        }
        // Read and parsed here, so that what `config check` passes does not fail at start-up.
        if let Some(tls) = &self.tls {
            check_pem("tls.cert", &tls.cert, Pem::Certificates)?;
            check_pem("tls.key", &tls.key, Pem::PrivateKey)?;
            if let Some(ca) = &tls.client_ca {
                check_pem("tls.client_ca", ca, Pem::Certificates)?;
            }
        }
        if let Some(ca) = &self.redis_ca {
            check_pem("redis_ca", ca, Pem::Certificates)?;
        }
        Ok(())
    }
}

enum Pem {
    Certificates,
    PrivateKey,
}

/// A PEM file a setting names: readable, and holding what that setting needs.
fn check_pem(key: &str, path: &Path, want: Pem) -> Result<(), ConfigError> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let bad = |m: String| ConfigError::invalid(key, format!("{}: {m}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    match want {
        Pem::PrivateKey => PrivateKeyDer::from_pem_slice(&bytes)
            .map(|_| ())
            .map_err(|e| bad(format!("not a PEM private key ({e})"))),
        Pem::Certificates => {
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("not PEM certificates ({e})")))?;
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".into()));
            }
            Ok(())
        }
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

/// `redis://user:secret@host` → `redis://user:***@host`; anything else is returned as is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

fn check_redis_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{:?} is not a Redis URL: use redis://host:port or rediss://host:port (TLS)",
                redact_url(url)
            ),
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|e| ConfigError::invalid(key, format!("{:?}: {e}", redact_url(url))))
}

// ------------------------------------------------------------------------------ the settings

/// Where a value came from, so that an error about it names what the operator wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    /// The variable's name as given (an older name counts).
    Env(&'static str),
}

impl Origin {
    fn error(self, setting: &Setting, message: impl fmt::Display) -> ConfigError {
        let message = message.to_string();
        match self {
            Origin::Flag => ConfigError::Flag {
                flag: setting.name(self),
                message,
            },
            Origin::Env(var) => ConfigError::Env {
                var: var.to_owned(),
                message,
            },
        }
    }
}

/// How a setting's text is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value.
    One,
    /// A list: the flag may be repeated, and flag and variable comma-separated.
    List,
    /// `--flag` alone means true; `--flag=false` turns it off.
    Switch,
}

/// One setting as an operator gives it: its flag, its environment variable and its key in the
/// configuration file, with the help `--help` shows. [`SETTINGS`] declares every one; the
/// flags ([`clap_args`]), the variables read ([`env_vars`]), the defaults in the help and the
/// names in errors all come from there. The file is read into [`Settings`] by its field names,
/// which `key` names (a test reads each setting back from a file under its key).
pub struct Setting {
    /// The file key (`defaults.sender_tier`), also the name [`Settings::validate`] reports.
    pub key: &'static str,
    /// The long flag, without `--`.
    pub flag: &'static str,
    /// Other spellings of the flag that keep working.
    pub flag_aliases: &'static [&'static str],
    pub env: &'static str,
    /// An older name of the variable; `env` wins when both are set.
    pub env_alias: Option<&'static str>,
    pub value_name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Parses the text and writes it into the settings (or, for the store's and TLS's parts,
    /// into [`Parts`], since they only mean something together).
    set: fn(&mut Settings, &mut Parts, &str) -> Result<(), String>,
    /// The value as the help shows it for the default; `None` = nothing to show.
    show: fn(&Settings) -> Option<String>,
}

impl fmt::Debug for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Setting({})", self.key)
    }
}

impl PartialEq for Setting {
    fn eq(&self, other: &Self) -> bool {
        self.flag == other.flag
    }
}

impl Setting {
    /// The name of this setting for someone who gave it through `origin`.
    pub fn name(&self, origin: Origin) -> String {
        match origin {
            Origin::Flag => format!("--{}", self.flag),
            Origin::Env(var) => var.to_owned(),
        }
    }

    /// Whether `value` can be this setting's, without applying it anywhere.
    pub fn check(&self, value: &str) -> Result<(), String> {
        (self.set)(&mut Settings::default(), &mut Parts::default(), value)
    }
}

/// The parts of a setting that several settings say together, within one layer.
#[derive(Default)]
struct Parts {
    redis: Option<String>,
    cluster: Option<Vec<String>>,
    sentinels: Option<Vec<String>>,
    master: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
}

const fn one(
    key: &'static str,
    flag: &'static str,
    env: &'static str,
    value_name: &'static str,
    help: &'static str,
    set: fn(&mut Settings, &mut Parts, &str) -> Result<(), String>,
    show: fn(&Settings) -> Option<String>,
) -> Setting {
    Setting {
        key,
        flag,
        flag_aliases: &[],
        env,
        env_alias: None,
        value_name,
        help,
        kind: Kind::One,
        set,
        show,
    }
}

const fn list(s: Setting) -> Setting {
    Setting {
        kind: Kind::List,
        ..s
    }
}

const fn alias(s: Setting, flag_aliases: &'static [&'static str]) -> Setting {
    Setting { flag_aliases, ..s }
}

fn put<T>(slot: &mut T, value: T) -> Result<(), String> {
    *slot = value;
    Ok(())
}

fn count<T: FromStr>(value: &str) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|e| format!("{value:?} is not a whole number: {e}"))
}

fn addr(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|e| format!("{value:?} is not a socket address (host:port): {e}"))
}

fn ms(value: &str) -> Result<Duration, String> {
    count(value).map(Duration::from_millis)
}

fn name<T: FromStr<Err = String>>(value: &str) -> Result<T, String> {
    value.parse()
}

fn millis_of(d: Duration) -> Option<String> {
    Some(d.as_millis().to_string())
}

fn none() -> Option<String> {
    Some("none".into())
}

/// Every setting, in the order `--help` lists them.
#[rustfmt::skip]
pub static SETTINGS: [Setting; 43] = [
    one("listen", "listen", "WAQUOTA_LISTEN", "ADDR",
        "Address of the gRPC listener",
        |s, _, v| put(&mut s.listen, addr(v)?), |s| Some(s.listen.to_string())),
    one("store.url", "redis", "WAQUOTA_REDIS_URL", "URL",
        "Standalone Redis URL (redis:// or rediss:// for TLS; user:password@ for ACL); without a store the ledger is in memory",
        |_, p, v| put(&mut p.redis, Some(v.to_owned())), |_| None),
    list(one("store.nodes", "redis-cluster", "WAQUOTA_REDIS_CLUSTER", "URLS",
        "Redis Cluster seed node URLs, comma-separated",
        |_, p, v| put(&mut p.cluster, Some(parse_list(v))), |_| None)),
    list(one("redis_sentinel", "redis-sentinel", "WAQUOTA_REDIS_SENTINEL", "URLS",
        "Seed sentinels, comma-separated URLs: the primary is found and followed through them (their credentials and TLS serve the data nodes too)",
        |_, p, v| put(&mut p.sentinels, Some(parse_list(v))), |_| None)),
    one("redis_sentinel_master", "redis-sentinel-master", "WAQUOTA_REDIS_SENTINEL_MASTER", "NAME",
        "The master name the sentinels monitor",
        |_, p, v| put(&mut p.master, Some(v.to_owned())), |_| None),
    one("durability", "durability", "WAQUOTA_DURABILITY", "async|replicated",
        "async: answer once the primary ran a change; replicated: once replicas acknowledged it (WAIT, in the same round trip)",
        |s, _, v| put(&mut s.durability, name(v)?), |s| Some(s.durability.name().into())),
    one("durability_replicas", "durability-replicas", "WAQUOTA_DURABILITY_REPLICAS", "N",
        "Replicas that must acknowledge a change with --durability replicated",
        |s, _, v| put(&mut s.durability_replicas, count(v)?), |s| Some(s.durability_replicas.to_string())),
    one("durability_timeout", "durability-timeout-ms", "WAQUOTA_DURABILITY_TIMEOUT_MS", "MS",
        "Longest wait for those acknowledgements, then UNAVAILABLE",
        |s, _, v| put(&mut s.durability_timeout, ms(v)?), |s| millis_of(s.durability_timeout)),
    one("on_ledger_loss", "on-ledger-loss", "WAQUOTA_ON_LEDGER_LOSS", "deny_new|allow",
        "New slots once the ledger is found lost",
        |s, _, v| put(&mut s.on_ledger_loss, name(v)?), |s| Some(s.on_ledger_loss.name().into())),
    one("webhook_listen", "webhook-listen", "WAQUOTA_WEBHOOK_LISTEN", "ADDR",
        "Listen for WhatsApp webhooks at /webhooks/whatsapp on this address",
        |s, _, v| put(&mut s.webhook_listen, Some(addr(v)?)), |_| Some("off".into())),
    one("webhook_verify_token", "webhook-verify-token", "WAQUOTA_WEBHOOK_VERIFY_TOKEN", "TOKEN",
        "The token Meta's verification request must carry",
        |s, _, v| put(&mut s.webhook_verify_token, Some(v.to_owned())), |_| None),
    list(one("webhook_app_secrets", "webhook-app-secret", "WAQUOTA_WEBHOOK_APP_SECRETS", "SECRET",
        "App secret(s) webhook signatures are checked with; repeat or comma-separate to rotate",
        |s, _, v| put(&mut s.webhook_app_secrets, parse_list(v)), |_| None)),
    one("webhook_forward", "webhook-forward", "WAQUOTA_WEBHOOK_FORWARD", "URL",
        "Relay every verified webhook POST to this http:// URL too",
        |s, _, v| put(&mut s.webhook_forward, Some(v.to_owned())), |_| None),
    one("webhook_max_body_bytes", "webhook-max-body-bytes", "WAQUOTA_WEBHOOK_MAX_BODY_BYTES", "BYTES",
        "Largest webhook body accepted",
        |s, _, v| put(&mut s.webhook_max_body_bytes, count(v)?), |s| Some(s.webhook_max_body_bytes.to_string())),
    list(one("webhook_wabas", "webhook-waba", "WAQUOTA_WEBHOOK_WABAS", "WABA=PORTFOLIO",
        "A WABA's portfolio for WABA-wide webhooks (repeat or comma-separate)",
        |s, _, v| put(&mut s.webhook_wabas, parse_pairs(&parse_list(v))?), |_| None)),
    list(one("webhook_displays", "webhook-display", "WAQUOTA_WEBHOOK_DISPLAYS", "DISPLAY=SENDER",
        "The sender (phone_number_id) of a display number, for webhooks that carry only the display number (repeat or comma-separate)",
        |s, _, v| put(&mut s.webhook_displays, parse_pairs(&parse_list(v))?), |_| None)),
    one("key_prefix", "key-prefix", "WAQUOTA_KEY_PREFIX", "PREFIX",
        "Prefix of every Redis key",
        |s, _, v| put(&mut s.key_prefix, v.to_owned()), |s| Some(s.key_prefix.clone())),
    Setting {
        kind: Kind::Switch,
        ..one("trust_client_clock", "trust-client-clock", "WAQUOTA_TRUST_CLIENT_CLOCK", "BOOL",
        "Honour the `at` field of requests (tests, replays, simulations)",
        |s, _, v| put(&mut s.trust_client_clock, parse_bool(v)?), |s| Some(s.trust_client_clock.to_string()))
    },
    alias(one("defaults.sender_tier", "default-tier", "WAQUOTA_DEFAULT_TIER", "TIER",
        "Tier of senders without a stored policy: 50, 250, 1k, 2k, 10k, 100k, unlimited",
        |s, _, v| put(&mut s.defaults.sender.tier, name(v)?), |s| Some(s.defaults.sender.tier.name().into())),
        &["default-sender-tier"]),
    one("defaults.sender_mode", "default-sender-mode", "WAQUOTA_DEFAULT_SENDER_MODE", "MODE",
        "Window mode of senders without a stored policy: conversation or rolling",
        |s, _, v| put(&mut s.defaults.sender.window_mode, name(v)?), |s| Some(s.defaults.sender.window_mode.name().into())),
    one("defaults.portfolio_tier", "default-portfolio-tier", "WAQUOTA_DEFAULT_PORTFOLIO_TIER", "TIER",
        "Tier of portfolios without a stored policy",
        |s, _, v| put(&mut s.defaults.portfolio.tier, name(v)?), |s| Some(s.defaults.portfolio.tier.name().into())),
    one("defaults.portfolio_mode", "default-portfolio-mode", "WAQUOTA_DEFAULT_PORTFOLIO_MODE", "MODE",
        "Window mode of portfolios without a stored policy",
        |s, _, v| put(&mut s.defaults.portfolio.window_mode, name(v)?), |s| Some(s.defaults.portfolio.window_mode.name().into())),
    one("defaults.messages_per_second", "default-messages-per-second", "WAQUOTA_DEFAULT_MESSAGES_PER_SECOND", "N",
        "Messages per second of senders whose policy sets none (inbound and outbound together)",
        |s, _, v| put(&mut s.defaults.messages_per_second, count(v)?), |s| Some(s.defaults.messages_per_second.to_string())),
    one("defaults.pair_interval_ms", "default-pair-interval-ms", "WAQUOTA_DEFAULT_PAIR_INTERVAL_MS", "MS",
        "Pair rate: one message per this many milliseconds from a sender to one user",
        |s, _, v| put(&mut s.defaults.pair_interval_ms, i64::try_from(count::<u64>(v)?).map_err(|e| format!("{v:?}: {e}"))?),
        |s| Some(s.defaults.pair_interval_ms.to_string())),
    one("defaults.pair_burst", "default-pair-burst", "WAQUOTA_DEFAULT_PAIR_BURST", "N",
        "Pair rate: messages to one user that may go out at once",
        |s, _, v| put(&mut s.defaults.pair_burst, count(v)?), |s| Some(s.defaults.pair_burst.to_string())),
    one("max_batch", "max-batch", "WAQUOTA_MAX_BATCH", "N",
        "Most recipients in one AcquireBatch",
        |s, _, v| put(&mut s.max_batch, count(v)?), |s| Some(s.max_batch.to_string())),
    one("max_message_bytes", "max-message-bytes", "WAQUOTA_MAX_MESSAGE_BYTES", "BYTES",
        "Largest gRPC message accepted, in bytes",
        |s, _, v| put(&mut s.max_message_bytes, count(v)?), |s| Some(s.max_message_bytes.to_string())),
    one("max_in_flight", "max-in-flight", "WAQUOTA_MAX_IN_FLIGHT", "N",
        "Most requests in flight at once",
        |s, _, v| put(&mut s.max_in_flight, count(v)?), |s| Some(s.max_in_flight.to_string())),
    one("redis_pool_size", "redis-pool-size", "WAQUOTA_REDIS_POOL_SIZE", "N",
        "Multiplexed connections kept to Redis",
        |s, _, v| put(&mut s.redis_pool_size, count(v)?), |s| Some(s.redis_pool_size.to_string())),
    one("redis_timeout", "redis-timeout-ms", "WAQUOTA_REDIS_TIMEOUT_MS", "MS",
        "Longest wait for one Redis call before answering UNAVAILABLE",
        |s, _, v| put(&mut s.redis_timeout, ms(v)?), |s| millis_of(s.redis_timeout)),
    one("shutdown_grace", "shutdown-grace-ms", "WAQUOTA_SHUTDOWN_GRACE_MS", "MS",
        "How long in-flight requests may take to finish on shutdown",
        |s, _, v| put(&mut s.shutdown_grace, ms(v)?), |s| millis_of(s.shutdown_grace)),
    one("on_store_error", "on-store-error", "WAQUOTA_ON_STORE_ERROR", "deny|allow",
        "Answer when the store cannot be reached",
        |s, _, v| put(&mut s.on_store_error, name(v)?), |s| Some(s.on_store_error.name().into())),
    list(one("on_store_error_senders", "on-store-error-sender", "WAQUOTA_ON_STORE_ERROR_SENDERS", "SENDER=deny|allow",
        "Per-sender store-outage answers, e.g. otp=allow (repeat or comma-separate)",
        |s, _, v| put(&mut s.on_store_error_senders, parse_sender_policies(&parse_list(v))?), |_| none())),
    one("shutdown_delay", "shutdown-delay-ms", "WAQUOTA_SHUTDOWN_DELAY_MS", "MS",
        "Between health turning NOT_SERVING and the listener closing on shutdown, so load balancers drain",
        |s, _, v| put(&mut s.shutdown_delay, ms(v)?), |s| millis_of(s.shutdown_delay)),
    one("redis_ca", "redis-ca", "WAQUOTA_REDIS_CA", "PATH",
        "CA certificate (PEM) that a rediss:// standalone Redis is verified against, instead of the built-in roots",
        |s, _, v| put(&mut s.redis_ca, Some(v.into())), |_| none()),
    one("metrics_listen", "metrics-listen", "WAQUOTA_METRICS_LISTEN", "ADDR",
        "Prometheus /metrics listener address",
        |s, _, v| put(&mut s.metrics_listen, Some(addr(v)?)), |_| none()),
    one("log_format", "log-format", "WAQUOTA_LOG_FORMAT", "text|json",
        "Log format",
        |s, _, v| put(&mut s.log_format, name(v)?), |s| Some(s.log_format.name().into())),
    Setting {
        env_alias: Some("WAQUOTA_LOG"),
        ..alias(one("log_level", "log-level", "WAQUOTA_LOG_LEVEL", "FILTER",
        "Log filter (tracing EnvFilter syntax), e.g. info or waquota=debug",
        |s, _, v| put(&mut s.log_level, v.to_owned()), |s| Some(s.log_level.clone())), &["log"])
    },
    list(one("auth.sender_tokens", "auth-sender-tokens", "WAQUOTA_AUTH_SENDER_TOKENS", "TOKENS",
        "Bearer tokens that may call QuotaService, comma-separated (prefer the file or the environment: flags show in the process list)",
        |s, _, v| put(&mut s.auth.sender_tokens, parse_list(v)), |_| None)),
    list(one("auth.operator_tokens", "auth-operator-tokens", "WAQUOTA_AUTH_OPERATOR_TOKENS", "TOKENS",
        "Bearer tokens that may call QuotaService and AdminService, comma-separated",
        |s, _, v| put(&mut s.auth.operator_tokens, parse_list(v)), |_| None)),
    one("tls.cert", "tls-cert", "WAQUOTA_TLS_CERT", "PEM",
        "Server certificate (PEM) for TLS; needs --tls-key",
        |_, p, v| put(&mut p.tls_cert, Some(v.into())), |_| None),
    one("tls.key", "tls-key", "WAQUOTA_TLS_KEY", "PEM",
        "Private key (PEM) of --tls-cert",
        |_, p, v| put(&mut p.tls_key, Some(v.into())), |_| None),
    one("tls.client_ca", "tls-client-ca", "WAQUOTA_TLS_CLIENT_CA", "PEM",
        "CA (PEM) that client certificates must chain to (mutual TLS)",
        |_, p, v| put(&mut p.tls_client_ca, Some(v.into())), |_| None),
];

/// Every environment variable read, and the setting it sets (older names included).
pub fn env_vars() -> Vec<(&'static str, &'static str)> {
    SETTINGS
        .iter()
        .flat_map(|s| {
            std::iter::once(s.env)
                .chain(s.env_alias)
                .map(|var| (var, s.key))
        })
        .collect()
}

/// Adds every setting's flag to `cmd`. Each value is checked as it is parsed, so a value that
/// cannot be a setting's is a usage error naming the flag, like any other bad argument.
pub fn clap_args(mut cmd: clap::Command) -> clap::Command {
    let defaults = Settings::default();
    for s in SETTINGS.iter() {
        let mut help = s.help.to_owned();
        if let Some(d) = (s.show)(&defaults) {
            help.push_str(&format!(" [default: {d}]"));
        }
        match s.env_alias {
            Some(older) => help.push_str(&format!(" [env: {}, or the older {older}]", s.env)),
            None => help.push_str(&format!(" [env: {}]", s.env)),
        }
        let mut arg = clap::Arg::new(s.flag)
            .long(s.flag)
            .aliases(s.flag_aliases)
            .value_name(s.value_name)
            .help(help)
            .value_parser(move |v: &str| s.check(v).map(|()| v.to_owned()));
        arg = match s.kind {
            Kind::One => arg.action(clap::ArgAction::Set),
            Kind::List => arg.action(clap::ArgAction::Append).value_delimiter(','),
            Kind::Switch => arg
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true"),
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

/// A comma-separated list; blanks around items are dropped.
pub fn parse_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `true`/`false` as people write them in environments.
pub fn parse_bool(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not a boolean: use true or false")),
    }
}

/// `sender=deny|allow` pairs: per-sender store-outage answers.
pub fn parse_sender_policies(pairs: &[String]) -> Result<BTreeMap<String, OnStoreError>, String> {
    pairs
        .iter()
        .map(|pair| {
            let (sender, policy) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: use sender=deny or sender=allow"))?;
            Ok((sender.trim().to_owned(), name(policy.trim())?))
        })
        .collect()
}

/// `key=value` pairs: the webhook bridge's mappings (`waba=portfolio`, `display=sender`).
pub fn parse_pairs(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    pairs
        .iter()
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: use key=value"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Settings given by the environment or by flags, as text with where each came from: each one
/// given replaces what the layers below said.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    values: Vec<(Origin, &'static Setting, String)>,
}

impl Overrides {
    /// Reads the `WAQUOTA_…` variables of [`SETTINGS`] among `vars`; others are ignored, and so
    /// is a variable set to the empty string.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut values = Vec::new();
        for (var, value) in vars {
            let value = value.trim();
            if !var.starts_with("WAQUOTA_") || value.is_empty() {
                continue;
            }
            // WAQUOTA_ADDR, WAQUOTA_TOKEN, WAQUOTA_CONFIG are the CLI's, not settings.
            for s in SETTINGS.iter() {
                if s.env == var {
                    values.push((Origin::Env(s.env), s, value.to_owned()));
                } else if s.env_alias == Some(var.as_str()) {
                    values.push((
                        Origin::Env(s.env_alias.unwrap_or(s.env)),
                        s,
                        value.to_owned(),
                    ));
                }
            }
        }
        // An older name first, so that the current one, applied after it, wins.
        values.sort_by_key(|(origin, s, _)| *origin == Origin::Env(s.env));
        Overrides::checked(values)
    }

    /// Flags by their name without `--` (an alias counts), with their text as given.
    pub fn flags<'a>(
        flags: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ConfigError> {
        let mut values = Vec::new();
        for (flag, value) in flags {
            let setting = SETTINGS
                .iter()
                .find(|s| s.flag == flag || s.flag_aliases.contains(&flag))
                .ok_or_else(|| ConfigError::Flag {
                    flag: format!("--{flag}"),
                    message: "is not a setting".into(),
                })?;
            values.push((Origin::Flag, setting, value.to_owned()));
        }
        Overrides::checked(values)
    }

    /// Each value parses, and the store is named once: a layer's errors show before any layer
    /// is applied.
    fn checked(values: Vec<(Origin, &'static Setting, String)>) -> Result<Self, ConfigError> {
        let o = Overrides { values };
        let parts = o.stage(&mut Settings::default())?;
        o.store(&parts)?;
        Ok(o)
    }

    /// The error about `setting` as this layer gave it.
    fn error(&self, setting: &Setting, message: impl fmt::Display) -> ConfigError {
        let given = self.values.iter().rev().find(|(_, s, _)| *s == setting);
        given
            .map_or(Origin::Flag, |(o, _, _)| *o)
            .error(setting, message)
    }

    /// How this layer names `key` (`--tls-key`, `WAQUOTA_TLS_KEY`).
    fn name_of(&self, key: &str) -> String {
        let origin = self.values.first().map_or(Origin::Flag, |(o, _, _)| *o);
        let s = setting(key);
        match origin {
            Origin::Flag => s.name(Origin::Flag),
            Origin::Env(_) => s.env.to_owned(),
        }
    }

    /// Where this layer gave `key`, if it did.
    fn given(&self, key: &str) -> Option<&'static Setting> {
        self.values
            .iter()
            .rev()
            .find(|(_, s, _)| s.key == key)
            .map(|(_, s, _)| *s)
    }

    /// Writes the plain settings into `s`; returns the parts said together.
    fn stage(&self, s: &mut Settings) -> Result<Parts, ConfigError> {
        let mut parts = Parts::default();
        for (origin, setting, value) in &self.values {
            (setting.set)(s, &mut parts, value).map_err(|m| origin.error(setting, m))?;
        }
        Ok(parts)
    }

    /// The store this layer names, if any; naming two is an error.
    fn store(&self, p: &Parts) -> Result<Option<Store>, ConfigError> {
        let sentinel = match (&p.sentinels, &p.master) {
            (Some(sentinels), Some(master)) => Some(Store::Sentinel {
                sentinels: sentinels.clone(),
                master: master.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.error(
                    setting("redis_sentinel"),
                    format!("is set without {}", self.name_of("redis_sentinel_master")),
                ));
            }
            (None, Some(_)) => {
                return Err(self.error(
                    setting("redis_sentinel_master"),
                    format!("is set without {}", self.name_of("redis_sentinel")),
                ));
            }
        };
        let stores = [
            ("store.url", p.redis.clone().map(|url| Store::Redis { url })),
            (
                "store.nodes",
                p.cluster.clone().map(|nodes| Store::Cluster { nodes }),
            ),
            ("redis_sentinel", sentinel),
        ];
        let mut named = stores.into_iter().filter(|(_, s)| s.is_some());
        match (named.next(), named.next()) {
            (Some((a, _)), Some((b, _))) => Err(self.error(
                setting(a),
                format!("{} is set too: choose one store", self.name_of(b)),
            )),
            (Some((_, store)), None) => Ok(store),
            _ => Ok(None),
        }
    }

    /// Writes every setting given here over `s`.
    pub fn apply(&self, s: &mut Settings) -> Result<(), ConfigError> {
        let parts = self.stage(s)?;
        if let Some(store) = self.store(&parts)? {
            s.store = store;
        }
        if parts.tls_cert.is_some() || parts.tls_key.is_some() || parts.tls_client_ca.is_some() {
            let below = s.tls.take();
            let cert = parts.tls_cert.or(below.as_ref().map(|t| t.cert.clone()));
            let key = parts.tls_key.or(below.as_ref().map(|t| t.key.clone()));
            let client_ca = parts.tls_client_ca.or(below.and_then(|t| t.client_ca));
            let (given, missing, what) = match (cert, key) {
                (Some(cert), Some(key)) => {
                    s.tls = Some(TlsSettings {
                        cert,
                        key,
                        client_ca,
                    });
                    return Ok(());
                }
                (Some(_), None) => (
                    "tls.cert",
                    self.name_of("tls.key"),
                    "the certificate's private key",
                ),
                (None, Some(_)) => (
                    "tls.key",
                    self.name_of("tls.cert"),
                    "the server certificate",
                ),
                (None, None) => (
                    "tls.client_ca",
                    format!(
                        "{} and {}",
                        self.name_of("tls.cert"),
                        self.name_of("tls.key")
                    ),
                    "mutual TLS needs TLS",
                ),
            };
            return Err(self.error(setting(given), format!("is set without {missing} ({what})")));
        }
        Ok(())
    }
}

/// The setting with file key `key`; every key named in this module is in [`SETTINGS`].
fn setting(key: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .unwrap_or(&SETTINGS[0])
}

/// The line of `key` (`defaults.sender_tier`: `sender_tier` under `[defaults]`; a map's
/// `[webhook_wabas]`) in a TOML file's text, when it is written there plainly.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let mut current = "";
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.trim_end_matches(']').trim();
            // A map setting (`[webhook_wabas]`) is a table of its own.
            if current == key {
                return Some(i + 1);
            }
        } else if current == table
            && let Some(rest) = line.strip_prefix(leaf)
            && rest.trim_start().starts_with('=')
        {
            return Some(i + 1);
        }
    }
    None
}

/// A TLS section from parts: a certificate needs its key, and a client CA needs both.
fn tls_settings(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<TlsSettings, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(TlsSettings {
            cert,
            key,
            client_ca,
        }),
        (Some(_), None) => Err(ConfigError::invalid(
            "tls.cert",
            "is set without tls.key (the certificate's private key)",
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            "tls.key",
            "is set without tls.cert (the server certificate)",
        )),
        (None, None) => Err(ConfigError::invalid(
            "tls.client_ca",
            "is set without tls.cert and tls.key (mutual TLS needs TLS)",
        )),
    }
}

fn tls_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TlsSettings>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Parts {
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    }
    let p = Parts::deserialize(d)?;
    tls_settings(p.cert, p.key, p.client_ca)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `[defaults]`: tier and window mode, by name, for senders and portfolios without a policy.
mod defaults_table {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::model::{Defaults, Policy, Tier, WindowMode};

    #[derive(Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Table {
        sender_tier: String,
        sender_mode: String,
        portfolio_tier: String,
        portfolio_mode: String,
        messages_per_second: u32,
        pair_interval_ms: u64,
        pair_burst: u32,
    }

    impl Default for Table {
        fn default() -> Self {
            table(&Defaults::default())
        }
    }

    fn table(d: &Defaults) -> Table {
        Table {
            sender_tier: d.sender.tier.name().into(),
            sender_mode: d.sender.window_mode.name().into(),
            portfolio_tier: d.portfolio.tier.name().into(),
            portfolio_mode: d.portfolio.window_mode.name().into(),
            messages_per_second: d.messages_per_second,
            pair_interval_ms: d.pair_interval_ms as u64,
            pair_burst: d.pair_burst,
        }
    }

    pub fn serialize<S: Serializer>(d: &Defaults, s: S) -> Result<S::Ok, S::Error> {
        table(d).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Defaults, D::Error> {
        let t = Table::deserialize(d)?;
        let err = |key: &str, e: String| serde::de::Error::custom(format!("defaults.{key}: {e}"));
        let tier = |key: &str, s: &str| s.parse::<Tier>().map_err(|e| err(key, e));
        let mode = |key: &str, s: &str| s.parse::<WindowMode>().map_err(|e| err(key, e));
        let base = Defaults::default();
        Ok(Defaults {
            sender: Policy {
                tier: tier("sender_tier", &t.sender_tier)?,
                window_mode: mode("sender_mode", &t.sender_mode)?,
                ..base.sender
            },
            portfolio: Policy {
                tier: tier("portfolio_tier", &t.portfolio_tier)?,
                window_mode: mode("portfolio_mode", &t.portfolio_mode)?,
                ..base.portfolio
            },
            messages_per_second: t.messages_per_second,
            pair_interval_ms: t.pair_interval_ms as i64,
            pair_burst: t.pair_burst,
        })
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
    use crate::model::{Tier, WindowMode};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile_path::Temp {
        tempfile_path::Temp::with(text)
    }

    /// A file under the system temp dir, removed on drop (no extra crate for one test helper).
    mod tempfile_path {
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicU32, Ordering};

        static SEQ: AtomicU32 = AtomicU32::new(0);

        pub struct Temp(pub PathBuf);

        impl Temp {
            pub fn with(text: &str) -> Temp {
                let path = std::env::temp_dir().join(format!(
                    "waquota-config-{}-{}.toml",
                    std::process::id(),
                    SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).unwrap();
                Temp(path)
            }
        }

        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn nothing_given_is_the_defaults() {
        let s = Settings::load(None, env(&[]), Overrides::default()).unwrap();
        assert_eq!(s.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(s.store, Store::Memory);
        assert_eq!(s.defaults, Defaults::default());
        assert_eq!(s.max_batch, 1000);
        assert_eq!(s.redis_timeout, Duration::from_millis(2000));
    }

    #[test]
    fn file_below_env_below_flags() {
        let f = file(
            r#"
            listen = "127.0.0.1:1000"
            key_prefix = "from-file"
            max_batch = 10
            max_in_flight = 7
            redis_timeout = 300
            [store]
            kind = "cluster"
            nodes = ["redis://127.0.0.1:7000"]
            [defaults]
            sender_tier = "1k"
            portfolio_mode = "conversation"
            [auth]
            operator_tokens = ["file-op"]
            "#,
        );
        let vars = env(&[
            ("WAQUOTA_KEY_PREFIX", "from-env"),
            ("WAQUOTA_MAX_BATCH", "20"),
            ("WAQUOTA_REDIS_URL", "redis://127.0.0.1:6379"),
            ("WAQUOTA_DEFAULT_TIER", "10k"),
            ("WAQUOTA_AUTH_SENDER_TOKENS", "a, b,"),
            ("HOME", "/root"),
        ]);
        let flags = Overrides::flags([("max-batch", "30"), ("default-tier", "100k")]).unwrap();
        let s = Settings::load(Some(&f.0), vars, flags).unwrap();
        assert_eq!(s.listen, "127.0.0.1:1000".parse().unwrap(), "file only");
        assert_eq!(s.max_in_flight, 7, "file only");
        assert_eq!(s.redis_timeout, Duration::from_millis(300), "file only");
        assert_eq!(s.key_prefix, "from-env", "env beats file");
        assert_eq!(
            s.store,
            Store::Redis {
                url: "redis://127.0.0.1:6379".into()
            },
            "env's store replaces the file's"
        );
        assert_eq!(s.max_batch, 30, "flag beats env and file");
        assert_eq!(
            s.defaults.sender.tier,
            Tier::T100K,
            "flag beats env and file"
        );
        assert_eq!(s.defaults.portfolio.window_mode, WindowMode::Conversation);
        assert_eq!(s.defaults.sender.window_mode, WindowMode::Conversation);
        assert_eq!(s.auth.sender_tokens, vec!["a", "b"]);
        assert_eq!(s.auth.operator_tokens, vec!["file-op"]);
    }

    #[test]
    fn sentinel_from_env_file_and_its_errors() {
        let vars = env(&[
            (
                "WAQUOTA_REDIS_SENTINEL",
                "redis://s1:26379, redis://s2:26379",
            ),
            ("WAQUOTA_REDIS_SENTINEL_MASTER", "waquota"),
        ]);
        let mut s = Settings::default();
        Overrides::from_env(vars).unwrap().apply(&mut s).unwrap();
        let want = Store::Sentinel {
            sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
            master: "waquota".into(),
        };
        assert_eq!(s.store, want);
        let f = Settings::from_toml(
            "redis_sentinel = [\"redis://s1:26379\", \"redis://s2:26379\"]\nredis_sentinel_master = \"waquota\"\n",
        )
        .unwrap();
        assert_eq!(f.store, want);
        // What config check prints reads back as the same store.
        assert_eq!(Settings::from_toml(&f.to_toml()).unwrap().store, want);
        let e = Overrides::from_env(env(&[("WAQUOTA_REDIS_SENTINEL", "redis://s1:26379")]))
            .unwrap_err();
        assert!(
            e.to_string().contains("WAQUOTA_REDIS_SENTINEL_MASTER"),
            "{e}"
        );
        let e = Overrides::from_env(env(&[
            ("WAQUOTA_REDIS_URL", "redis://a:1"),
            ("WAQUOTA_REDIS_SENTINEL", "redis://s1:26379"),
            ("WAQUOTA_REDIS_SENTINEL_MASTER", "m"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("choose one store"), "{e}");
        let e = Settings::from_toml("redis_sentinel_master = \"m\"\n").unwrap_err();
        assert!(e.contains("without redis_sentinel"), "{e}");
    }

    #[test]
    fn a_ca_needs_a_tls_url() {
        let s = Settings {
            store: Store::Redis {
                url: "redis://a:1".into(),
            },
            redis_ca: Some("/ca.pem".into()),
            ..Settings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "redis_ca: is set but store.url \"redis://a:1\" is not TLS: use rediss://"
        );
    }

    #[test]
    fn webhook_mappings_name_valid_identifiers() {
        let mut s = Settings::default();
        s.webhook_wabas.insert("w1".into(), "p 1".into());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("webhook_wabas: w1=p 1: "), "{e}");
        s.webhook_wabas.clear();
        s.webhook_displays
            .insert("15550001111".into(), String::new());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("webhook_displays: 15550001111=: "), "{e}");
        s.webhook_displays
            .insert("15550001111".into(), "1234567890".into());
        s.validate().unwrap();
    }

    #[test]
    fn replicated_durability_is_checked() {
        let mut s = Settings {
            store: Store::Cluster {
                nodes: vec!["redis://a:1".into()],
            },
            durability: Durability::Replicated,
            ..Settings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("durability: replicated is supported"), "{e}");
        s.store = Store::Redis {
            url: "redis://a:1".into(),
        };
        s.validate().unwrap();
        s.durability_timeout = s.redis_timeout;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("durability_timeout: must be"), "{e}");
        s.durability_timeout = Duration::from_millis(50);
        s.durability_replicas = 0;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("durability_replicas: must be 1 to 16"), "{e}");
    }

    #[test]
    fn every_env_var_is_read() {
        let vars = env(&[
            ("WAQUOTA_LISTEN", "127.0.0.1:1"),
            ("WAQUOTA_REDIS_CLUSTER", "redis://a:1,redis://b:2"),
            ("WAQUOTA_KEY_PREFIX", "p"),
            ("WAQUOTA_TRUST_CLIENT_CLOCK", "yes"),
            ("WAQUOTA_DEFAULT_TIER", "50"),
            ("WAQUOTA_DEFAULT_SENDER_MODE", "rolling"),
            ("WAQUOTA_DEFAULT_PORTFOLIO_TIER", "2k"),
            ("WAQUOTA_DEFAULT_PORTFOLIO_MODE", "conversation"),
            ("WAQUOTA_DEFAULT_MESSAGES_PER_SECOND", "20"),
            ("WAQUOTA_DEFAULT_PAIR_INTERVAL_MS", "3000"),
            ("WAQUOTA_DEFAULT_PAIR_BURST", "9"),
            ("WAQUOTA_MAX_BATCH", "2"),
            ("WAQUOTA_MAX_MESSAGE_BYTES", "2048"),
            ("WAQUOTA_MAX_IN_FLIGHT", "3"),
            ("WAQUOTA_REDIS_POOL_SIZE", "5"),
            ("WAQUOTA_REDIS_TIMEOUT_MS", "6"),
            ("WAQUOTA_SHUTDOWN_GRACE_MS", "7"),
            ("WAQUOTA_ON_STORE_ERROR", "allow"),
            ("WAQUOTA_SHUTDOWN_DELAY_MS", "8"),
            ("WAQUOTA_ON_STORE_ERROR_SENDERS", "otp=allow, bulk=deny"),
            ("WAQUOTA_REDIS_CA", "/redis-ca"),
            ("WAQUOTA_METRICS_LISTEN", "127.0.0.1:2"),
            ("WAQUOTA_LOG_FORMAT", "json"),
            ("WAQUOTA_LOG", "warn"),
            ("WAQUOTA_LOG_LEVEL", "debug"),
            ("WAQUOTA_AUTH_SENDER_TOKENS", "s1"),
            ("WAQUOTA_AUTH_OPERATOR_TOKENS", "o1,o2"),
            ("WAQUOTA_TLS_CERT", "/c"),
            ("WAQUOTA_TLS_KEY", "/k"),
            ("WAQUOTA_TLS_CLIENT_CA", "/ca"),
            ("WAQUOTA_DURABILITY", "replicated"),
            ("WAQUOTA_DURABILITY_REPLICAS", "2"),
            ("WAQUOTA_DURABILITY_TIMEOUT_MS", "40"),
            ("WAQUOTA_ON_LEDGER_LOSS", "allow"),
            ("WAQUOTA_WEBHOOK_LISTEN", "127.0.0.1:3"),
            ("WAQUOTA_WEBHOOK_VERIFY_TOKEN", "vt"),
            ("WAQUOTA_WEBHOOK_APP_SECRETS", "a1, a2"),
            ("WAQUOTA_WEBHOOK_FORWARD", "http://handler.internal/hook"),
            ("WAQUOTA_WEBHOOK_MAX_BODY_BYTES", "4096"),
            ("WAQUOTA_WEBHOOK_WABAS", "w1=p1"),
            ("WAQUOTA_WEBHOOK_DISPLAYS", "15550001111=s1"),
        ]);
        assert_eq!(
            vars.len() + 3,
            env_vars().len(),
            "all but WAQUOTA_REDIS_URL and the two Sentinel ones (the store is the cluster here)"
        );
        let o = Overrides::from_env(vars).unwrap();
        let mut s = Settings::default();
        o.apply(&mut s).unwrap();
        assert_eq!(s.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(
            s.store,
            Store::Cluster {
                nodes: vec!["redis://a:1".into(), "redis://b:2".into()]
            }
        );
        assert_eq!(s.key_prefix, "p");
        assert_eq!(
            (
                s.defaults.messages_per_second,
                s.defaults.pair_interval_ms,
                s.defaults.pair_burst
            ),
            (20, 3000, 9)
        );
        assert!(s.trust_client_clock);
        assert_eq!(s.defaults.sender.tier, Tier::T50);
        assert_eq!(s.defaults.sender.window_mode, WindowMode::Rolling);
        assert_eq!(s.defaults.portfolio.tier, Tier::T2K);
        assert_eq!(s.defaults.portfolio.window_mode, WindowMode::Conversation);
        assert_eq!(
            (s.max_batch, s.max_message_bytes, s.max_in_flight),
            (2, 2048, 3)
        );
        assert_eq!(s.redis_pool_size, 5);
        assert_eq!(
            (
                s.durability,
                s.durability_replicas,
                s.durability_timeout,
                s.on_ledger_loss
            ),
            (
                Durability::Replicated,
                2,
                Duration::from_millis(40),
                OnLedgerLoss::Allow
            )
        );
        assert_eq!(s.redis_timeout, Duration::from_millis(6));
        assert_eq!(s.webhook_listen, Some("127.0.0.1:3".parse().unwrap()));
        assert_eq!(s.webhook_verify_token.as_deref(), Some("vt"));
        assert_eq!(s.webhook_app_secrets, vec!["a1", "a2"]);
        assert_eq!(
            s.webhook_displays.get("15550001111").map(String::as_str),
            Some("s1")
        );
        assert_eq!(
            s.webhook_forward.as_deref(),
            Some("http://handler.internal/hook")
        );
        assert_eq!(s.shutdown_grace, Duration::from_millis(7));
        assert_eq!(s.on_store_error, OnStoreError::Allow);
        assert_eq!(s.metrics_listen, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.log_level, "debug", "WAQUOTA_LOG_LEVEL beats WAQUOTA_LOG");
        assert_eq!(s.auth.sender_tokens, vec!["s1"]);
        assert_eq!(s.auth.operator_tokens, vec!["o1", "o2"]);
        let tls = s.tls.unwrap();
        assert_eq!(
            (tls.cert, tls.key, tls.client_ca),
            ("/c".into(), "/k".into(), Some("/ca".into()))
        );
    }

    #[test]
    fn every_file_key_is_read_and_printed_settings_read_back() {
        let f = file(
            r#"
            listen = "127.0.0.1:1"
            key_prefix = "p"
            trust_client_clock = true
            max_batch = 2
            max_message_bytes = 2048
            max_in_flight = 3
            redis_pool_size = 5
            redis_timeout = 6
            shutdown_grace = 7
            on_store_error = "allow"
            metrics_listen = "127.0.0.1:2"
            log_format = "json"
            log_level = "debug"
            [store]
            kind = "redis"
            url = "redis://u:pw@127.0.0.1:6379/0"
            [defaults]
            sender_tier = "unlimited"
            sender_mode = "rolling"
            portfolio_tier = "100k"
            portfolio_mode = "conversation"
            [auth]
            sender_tokens = ["s"]
            operator_tokens = ["o"]
            "#,
        );
        let s = Settings::from_file(&f.0).unwrap();
        assert_eq!(s.defaults.sender.tier, Tier::Unlimited);
        assert_eq!(s.defaults.portfolio.tier, Tier::T100K);
        assert_eq!(s.max_message_bytes, 2048);
        assert_eq!(s.log_format, LogFormat::Json);
        let again = Settings::from_toml(&s.to_toml()).unwrap();
        assert_eq!(again.to_toml(), s.to_toml());
        assert_eq!(again.defaults, s.defaults);
        assert_eq!(again.store, s.store);
    }

    #[test]
    fn redaction_hides_tokens_and_url_passwords() {
        assert_eq!(
            redact_url("rediss://app:s3cret@redis.example:6380/0"),
            "rediss://app:***@redis.example:6380/0"
        );
        assert_eq!(
            redact_url("redis://:pw@h:1"),
            "redis://:***@h:1",
            "password only"
        );
        assert_eq!(redact_url("redis://h:1/2"), "redis://h:1/2");
        let s = Settings {
            store: Store::Cluster {
                nodes: vec!["redis://a:pa@h:1".into(), "redis://h:2".into()],
            },
            auth: AuthSettings {
                sender_tokens: vec!["tok-s".into()],
                operator_tokens: vec!["tok-o".into()],
            },
            ..Settings::default()
        };
        let out = s.redacted().to_toml();
        for secret in ["tok-s", "tok-o", "pa@"] {
            assert!(!out.contains(secret), "{secret} printed in {out}");
        }
        assert!(out.contains("redis://a:***@h:1"), "{out}");
        let debug = format!("{s:?}");
        for secret in ["tok-s", "tok-o", "pa@"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let load = |vars: &[(&str, &str)], flags: Overrides| {
            Settings::load(None, env(vars), flags)
                .unwrap_err()
                .to_string()
        };
        let e = load(
            &[
                ("WAQUOTA_REDIS_URL", "redis://a:1"),
                ("WAQUOTA_REDIS_CLUSTER", "redis://b:1"),
            ],
            Overrides::default(),
        );
        assert!(e.contains("choose one store"), "{e}");
        let e = load(&[("WAQUOTA_DEFAULT_TIER", "3k")], Overrides::default());
        assert!(
            e.starts_with("WAQUOTA_DEFAULT_TIER: unknown tier \"3k\""),
            "{e}"
        );
        let e = load(&[("WAQUOTA_MAX_BATCH", "many")], Overrides::default());
        assert!(
            e.starts_with("WAQUOTA_MAX_BATCH: \"many\" is not a whole number"),
            "{e}"
        );
        let e = load(&[("WAQUOTA_TLS_CERT", "/c")], Overrides::default());
        assert_eq!(
            e,
            "WAQUOTA_TLS_CERT: is set without WAQUOTA_TLS_KEY (the certificate's private key)"
        );
        let flag = |name, value| Overrides::flags([(name, value)]).unwrap();
        let e = load(&[], flag("redis", "http://u:secret@h"));
        assert!(
            e.starts_with("--redis: \"http://u:***@h\" is not a Redis URL"),
            "{e}"
        );
        let e = load(&[], flag("key-prefix", "a{b}"));
        assert!(e.starts_with("--key-prefix:"), "{e}");
        let e = load(&[], flag("redis-pool-size", "0"));
        assert_eq!(e, "--redis-pool-size: must be at least 1, got 0");
        let e = load(
            &[],
            Overrides::flags([
                ("tls-cert", "/nonexistent/cert.pem"),
                ("tls-key", "/nonexistent/key.pem"),
            ])
            .unwrap(),
        );
        assert!(e.starts_with("--tls-cert: /nonexistent/cert.pem:"), "{e}");
        let e = load(
            &[
                ("WAQUOTA_REDIS_CLUSTER", "rediss://b:1"),
                ("WAQUOTA_REDIS_CA", "/ca.pem"),
            ],
            Overrides::default(),
        );
        assert!(
            e.starts_with("WAQUOTA_REDIS_CA: is supported with a standalone Redis only"),
            "{e}"
        );
        let e = load(
            &[("WAQUOTA_DEFAULT_MESSAGES_PER_SECOND", "0")],
            Overrides::default(),
        );
        assert_eq!(
            e,
            "WAQUOTA_DEFAULT_MESSAGES_PER_SECOND: must be 1 to 100,000"
        );
    }

    #[test]
    fn every_setting_is_read_back_under_its_file_key() {
        let sample = |s: &Setting| match s.value_name {
            "ADDR" => "127.0.0.1:9",
            "URL" if s.flag == "redis" => "redis://h:1",
            "URL" => "http://h/",
            "URLS" => "redis://h:1",
            "N" | "BYTES" | "MS" => "4097",
            "TIER" => "1k",
            "MODE" if s.key == "defaults.sender_mode" => "rolling",
            "MODE" => "conversation",
            "async|replicated" => "replicated",
            "deny_new|allow" | "deny|allow" => "allow",
            "text|json" => "json",
            "WABA=PORTFOLIO" | "DISPLAY=SENDER" | "SENDER=deny|allow" => "a=allow",
            "BOOL" => "true",
            "FILTER" => "debug",
            "NAME" => "m",
            _ => "x",
        };
        for s in SETTINGS.iter() {
            let mut given = vec![(s.flag, sample(s))];
            match s.key {
                "redis_sentinel" => given.push(("redis-sentinel-master", "m")),
                "redis_sentinel_master" => given.push(("redis-sentinel", "redis://h:1")),
                "tls.client_ca" => given.extend([("tls-cert", "c"), ("tls-key", "k")]),
                "tls.cert" => given.push(("tls-key", "k")),
                "tls.key" => given.push(("tls-cert", "c")),
                _ => {}
            }
            let mut settings = Settings::default();
            Overrides::flags(given)
                .unwrap()
                .apply(&mut settings)
                .unwrap();
            let printed = settings.to_toml();
            assert_ne!(
                printed,
                Settings::default().to_toml(),
                "{s:?} changed nothing"
            );
            let again = Settings::from_toml(&printed).unwrap();
            assert_eq!(again.to_toml(), printed, "{s:?}");
            // The Sentinel store prints as [store]; its top-level spelling is read as a file.
            if s.key.starts_with("redis_sentinel") {
                let file = "redis_sentinel = [\"redis://h:1\"]\nredis_sentinel_master = \"m\"\n";
                assert_eq!(Settings::from_toml(file).unwrap().store, settings.store);
            } else {
                assert!(
                    line_of(&printed, s.key).is_some(),
                    "{} not in {printed}",
                    s.key
                );
            }
        }
        let vars = env_vars();
        assert!(
            vars.contains(&("WAQUOTA_LOG", "log_level")),
            "the older name"
        );
        assert_eq!(vars.len(), SETTINGS.len() + 1);
    }

    #[test]
    fn a_refused_value_is_named_where_it_was_given() {
        let f = file("max_batch = 5\nredis_timeout = 0\n[defaults]\npair_burst = 0\n");
        let flags = |pairs: &[(&str, &str)]| Overrides::flags(pairs.iter().copied()).unwrap();
        let load = |vars: &[(&str, &str)], flags: Overrides| {
            Settings::load(Some(&f.0), env(vars), flags)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let path = f.0.display();
        let burst = [("WAQUOTA_DEFAULT_PAIR_BURST", "3")];
        assert_eq!(
            load(&burst, Overrides::default()),
            Err(format!(
                "{path}: line 2: redis_timeout: must be at least 1 ms"
            )),
            "the file's key and line"
        );
        assert_eq!(
            load(&[], flags(&[("redis-timeout-ms", "9")])),
            Err(format!(
                "{path}: line 4: defaults.pair_burst: must be 1 to 10,000"
            ))
        );
        let both = [
            ("WAQUOTA_DEFAULT_PAIR_BURST", "3"),
            ("WAQUOTA_REDIS_TIMEOUT_MS", "9"),
        ];
        assert_eq!(load(&both, Overrides::default()), Ok(()));
        assert_eq!(
            load(
                &[("WAQUOTA_REDIS_TIMEOUT_MS", "0")],
                flags(&[("default-pair-burst", "3")])
            ),
            Err("WAQUOTA_REDIS_TIMEOUT_MS: must be at least 1 ms".into()),
            "the variable over the file"
        );
        assert_eq!(
            load(&both, flags(&[("redis-timeout-ms", "0")])),
            Err("--redis-timeout-ms: must be at least 1 ms".into()),
            "the flag over the variable and the file"
        );
        assert_eq!(
            load(&both, flags(&[("durability-timeout-ms", "0"), ("durability", "replicated"), ("redis", "redis://h:1")])),
            Err("--durability-timeout-ms: must be at least 1 ms and less than redis_timeout (9 ms), got 0 ms".into())
        );
        let e = Overrides::flags([("redis-sentinel", "redis://h:1")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--redis-sentinel: is set without --redis-sentinel-master"
        );
        let e = Overrides::flags([("redis", "redis://h:1"), ("redis-cluster", "redis://h:2")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--redis: --redis-cluster is set too: choose one store"
        );
    }

    #[test]
    fn pem_files_are_read_and_parsed() {
        let cert = file("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        let junk = file("not pem\n");
        let with = |cert_path: &Path, key_path: &Path| Settings {
            tls: Some(TlsSettings {
                cert: cert_path.into(),
                key: key_path.into(),
                client_ca: None,
            }),
            ..Settings::default()
        };
        let e = with(&junk.0, &junk.0).validate().unwrap_err().to_string();
        assert_eq!(
            e,
            format!("tls.cert: {}: holds no PEM certificate", junk.0.display())
        );
        let e = with(&cert.0, &cert.0).validate().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "tls.key: {}: not a PEM private key",
                cert.0.display()
            )),
            "{e}"
        );
        let s = Settings {
            store: Store::Redis {
                url: "rediss://h:1".into(),
            },
            redis_ca: Some(junk.0.clone()),
            ..Settings::default()
        };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.starts_with("redis_ca: "), "{e}");
        let s = Settings {
            redis_ca: Some(cert.0.clone()),
            ..s
        };
        s.validate().unwrap();
    }

    #[test]
    fn file_errors_are_one_line_with_the_line_number() {
        for (text, want) in [
            ("listen = \"x\"\n", "line 1:"),
            (
                "\n[defaults]\nsender_tier = \"3k\"\n",
                "unknown tier \"3k\"",
            ),
            (
                "max_batch = 1\nlisten_addr = \"a\"\n",
                "line 2: unknown field `listen_addr`",
            ),
            ("[tls]\ncert = \"/c\"\n", "is set without tls.key"),
            (
                "[store]\nkind = \"redis\"\nurl = \"redis://a\"\nnodes = []\n",
                "unknown field `nodes`",
            ),
        ] {
            let e = Settings::from_toml(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
