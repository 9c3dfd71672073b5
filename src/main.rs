//! The `waquota` binary: `serve` runs the service, `config check` validates settings, and the
//! operator commands (`inspect`, `window`, `policy`, `sender`, `reset`) talk to a running server.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use waquota::cli::{self, ClientArgs};
use waquota::config::{
    Durability, LogFormat, OnLedgerLoss, OnStoreError, Overrides, Settings, Store, parse_bool,
};
use waquota::model::{Tier, WindowMode};

#[derive(Parser)]
#[command(
    name = "waquota",
    version,
    about = "Distributed rate limiter for WhatsApp Business messaging limits"
)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service (in-memory ledger unless a Redis store is given).
    Serve(SettingsArgs),
    /// Load a running server (and/or Redis directly) and print throughput, latency and memory.
    Bench(waquota::bench::BenchArgs),
    /// Work with the server's settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    #[command(flatten)]
    Operator(cli::Command),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the settings and print the effective ones, secrets redacted.
    Check(SettingsArgs),
}

/// Every server setting as a flag; a flag beats the environment, which beats the file.
#[derive(clap::Args)]
struct SettingsArgs {
    /// TOML configuration file (between the built-in defaults and the environment).
    #[arg(long, env = "WAQUOTA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the gRPC listener [default: 0.0.0.0:50051] [env: WAQUOTA_LISTEN].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Standalone Redis URL (redis:// or rediss:// for TLS; user:password@ for ACL); without a
    /// store the ledger is in memory [env: WAQUOTA_REDIS_URL].
    #[arg(long, value_name = "URL", conflicts_with_all = ["redis_cluster", "redis_sentinel"])]
    redis: Option<String>,
    /// Redis Cluster seed node URLs, comma-separated [env: WAQUOTA_REDIS_CLUSTER].
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        conflicts_with = "redis_sentinel"
    )]
    redis_cluster: Vec<String>,
    /// Seed sentinels, comma-separated URLs: the primary is found and followed through them
    /// (their credentials and TLS serve the data nodes too) [env: WAQUOTA_REDIS_SENTINEL].
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        requires = "redis_sentinel_master"
    )]
    redis_sentinel: Vec<String>,
    /// The master name the sentinels monitor [env: WAQUOTA_REDIS_SENTINEL_MASTER].
    #[arg(long, value_name = "NAME", requires = "redis_sentinel")]
    redis_sentinel_master: Option<String>,
    /// async: answer once the primary ran a change; replicated: once replicas acknowledged it
    /// (WAIT, in the same round trip) [env: WAQUOTA_DURABILITY].
    #[arg(long, value_name = "async|replicated")]
    durability: Option<Durability>,
    /// Replicas that must acknowledge a change with --durability replicated (default 1)
    /// [env: WAQUOTA_DURABILITY_REPLICAS].
    #[arg(long, value_name = "N")]
    durability_replicas: Option<u32>,
    /// Longest wait for those acknowledgements, then UNAVAILABLE (default 50)
    /// [env: WAQUOTA_DURABILITY_TIMEOUT_MS].
    #[arg(long, value_name = "MS")]
    durability_timeout_ms: Option<u64>,
    /// New slots once the ledger is found lost: deny_new (default) or allow
    /// [env: WAQUOTA_ON_LEDGER_LOSS].
    #[arg(long, value_name = "deny_new|allow")]
    on_ledger_loss: Option<OnLedgerLoss>,
    /// Listen for WhatsApp webhooks at /webhooks/whatsapp on this address (off by default)
    /// [env: WAQUOTA_WEBHOOK_LISTEN].
    #[arg(long, value_name = "ADDR")]
    webhook_listen: Option<SocketAddr>,
    /// The token Meta's verification request must carry [env: WAQUOTA_WEBHOOK_VERIFY_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    webhook_verify_token: Option<String>,
    /// App secret(s) webhook signatures are checked with; repeat or comma-separate to rotate
    /// [env: WAQUOTA_WEBHOOK_APP_SECRETS].
    #[arg(long, value_name = "SECRET", value_delimiter = ',')]
    webhook_app_secret: Option<Vec<String>>,
    /// Relay every verified webhook POST to this http:// URL too [env: WAQUOTA_WEBHOOK_FORWARD].
    #[arg(long, value_name = "URL")]
    webhook_forward: Option<String>,
    /// Largest webhook body accepted (default 1 MiB) [env: WAQUOTA_WEBHOOK_MAX_BODY_BYTES].
    #[arg(long, value_name = "BYTES")]
    webhook_max_body_bytes: Option<usize>,
    /// A WABA's portfolio for WABA-wide webhooks, WABA=PORTFOLIO (repeat or comma-separate)
    /// [env: WAQUOTA_WEBHOOK_WABAS].
    #[arg(long, value_name = "WABA=PORTFOLIO", value_delimiter = ',')]
    webhook_waba: Vec<String>,
    /// The sender (phone_number_id) of a display number, for webhooks that carry only the
    /// display number, DISPLAY=SENDER (repeat or comma-separate) [env: WAQUOTA_WEBHOOK_DISPLAYS].
    #[arg(long, value_name = "DISPLAY=SENDER", value_delimiter = ',')]
    webhook_display: Vec<String>,
    /// Prefix of every Redis key [default: wq] [env: WAQUOTA_KEY_PREFIX].
    #[arg(long, value_name = "PREFIX")]
    key_prefix: Option<String>,
    /// Honour the `at` field of requests (tests, replays, simulations) [default: false] [env: WAQUOTA_TRUST_CLIENT_CLOCK].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = parse_bool)]
    trust_client_clock: Option<bool>,
    /// Tier of senders without a stored policy: 50, 250, 1k, 2k, 10k, 100k, unlimited
    /// [default: 250] [env: WAQUOTA_DEFAULT_TIER].
    #[arg(long, alias = "default-sender-tier", value_name = "TIER")]
    default_tier: Option<Tier>,
    /// Window mode of senders without a stored policy: conversation or rolling
    /// [default: conversation] [env: WAQUOTA_DEFAULT_SENDER_MODE].
    #[arg(long, value_name = "MODE")]
    default_sender_mode: Option<WindowMode>,
    /// Tier of portfolios without a stored policy [default: 250] [env: WAQUOTA_DEFAULT_PORTFOLIO_TIER].
    #[arg(long, value_name = "TIER")]
    default_portfolio_tier: Option<Tier>,
    /// Window mode of portfolios without a stored policy [default: rolling] [env: WAQUOTA_DEFAULT_PORTFOLIO_MODE].
    #[arg(long, value_name = "MODE")]
    default_portfolio_mode: Option<WindowMode>,
    /// Messages per second of senders whose policy sets none (inbound and outbound together)
    /// [default: 80] [env: WAQUOTA_DEFAULT_MESSAGES_PER_SECOND].
    #[arg(long, value_name = "N")]
    default_messages_per_second: Option<u32>,
    /// Pair rate: one message per this many milliseconds from a sender to one user
    /// [default: 6000] [env: WAQUOTA_DEFAULT_PAIR_INTERVAL_MS].
    #[arg(long, value_name = "MS")]
    default_pair_interval_ms: Option<u64>,
    /// Pair rate: messages to one user that may go out at once [default: 45] [env: WAQUOTA_DEFAULT_PAIR_BURST].
    #[arg(long, value_name = "N")]
    default_pair_burst: Option<u32>,
    /// Most recipients in one AcquireBatch [default: 1000] [env: WAQUOTA_MAX_BATCH].
    #[arg(long, value_name = "N")]
    max_batch: Option<usize>,
    /// Largest gRPC message accepted, in bytes [default: 4194304] [env: WAQUOTA_MAX_MESSAGE_BYTES].
    #[arg(long, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
    /// Most requests in flight at once [default: 4096] [env: WAQUOTA_MAX_IN_FLIGHT].
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// Multiplexed connections kept to Redis [default: 4] [env: WAQUOTA_REDIS_POOL_SIZE].
    #[arg(long, value_name = "N")]
    redis_pool_size: Option<usize>,
    /// Longest wait for one Redis call before answering UNAVAILABLE [default: 2000] [env: WAQUOTA_REDIS_TIMEOUT_MS].
    #[arg(long, value_name = "MS")]
    redis_timeout_ms: Option<u64>,
    /// How long in-flight requests may take to finish on shutdown [default: 10000] [env: WAQUOTA_SHUTDOWN_GRACE_MS].
    #[arg(long, value_name = "MS")]
    shutdown_grace_ms: Option<u64>,
    /// Answer when the store cannot be reached: deny or allow [default: deny] [env: WAQUOTA_ON_STORE_ERROR].
    #[arg(long, value_name = "deny|allow")]
    on_store_error: Option<OnStoreError>,
    /// Per-sender store-outage answers, e.g. otp=allow (repeat or comma-separate)
    /// [default: none] [env: WAQUOTA_ON_STORE_ERROR_SENDERS].
    #[arg(long, value_name = "SENDER=deny|allow", value_delimiter = ',')]
    on_store_error_sender: Vec<String>,
    /// Between health turning NOT_SERVING and the listener closing on shutdown, so load
    /// balancers drain [default: 0] [env: WAQUOTA_SHUTDOWN_DELAY_MS].
    #[arg(long, value_name = "MS")]
    shutdown_delay_ms: Option<u64>,
    /// CA certificate (PEM) that a rediss:// standalone Redis is verified against, instead of the
    /// built-in roots [default: none] [env: WAQUOTA_REDIS_CA].
    #[arg(long, value_name = "PATH")]
    redis_ca: Option<PathBuf>,
    /// Prometheus /metrics listener address [default: none] [env: WAQUOTA_METRICS_LISTEN].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log format: text or json [default: text] [env: WAQUOTA_LOG_FORMAT].
    #[arg(long, value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax), e.g. info or waquota=debug [default: info] [env: WAQUOTA_LOG_LEVEL].
    #[arg(long, alias = "log", value_name = "FILTER")]
    log_level: Option<String>,
    /// Bearer tokens that may call QuotaService, comma-separated (prefer the file or the
    /// environment: flags show in the process list) [env: WAQUOTA_AUTH_SENDER_TOKENS].
    #[arg(long, value_name = "TOKENS", value_delimiter = ',')]
    auth_sender_tokens: Option<Vec<String>>,
    /// Bearer tokens that may call QuotaService and AdminService, comma-separated [env: WAQUOTA_AUTH_OPERATOR_TOKENS].
    #[arg(long, value_name = "TOKENS", value_delimiter = ',')]
    auth_operator_tokens: Option<Vec<String>>,
    /// Server certificate (PEM) for TLS; needs --tls-key [env: WAQUOTA_TLS_CERT].
    #[arg(long, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert [env: WAQUOTA_TLS_KEY].
    #[arg(long, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to (mutual TLS) [env: WAQUOTA_TLS_CLIENT_CA].
    #[arg(long, value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
}

impl SettingsArgs {
    fn overrides(&self) -> Overrides {
        let store = match (&self.redis, self.redis_cluster.is_empty()) {
            (Some(url), _) => Some(Store::Redis { url: url.clone() }),
            (None, false) => Some(Store::Cluster {
                nodes: self.redis_cluster.clone(),
            }),
            (None, true) => self
                .redis_sentinel_master
                .clone()
                .map(|master| Store::Sentinel {
                    sentinels: self.redis_sentinel.clone(),
                    master,
                }),
        };
        Overrides {
            listen: self.listen,
            store,
            key_prefix: self.key_prefix.clone(),
            trust_client_clock: self.trust_client_clock,
            default_sender_tier: self.default_tier,
            default_sender_mode: self.default_sender_mode,
            default_portfolio_tier: self.default_portfolio_tier,
            default_portfolio_mode: self.default_portfolio_mode,
            default_messages_per_second: self.default_messages_per_second,
            default_pair_interval: self.default_pair_interval_ms.map(Duration::from_millis),
            default_pair_burst: self.default_pair_burst,
            max_batch: self.max_batch,
            max_message_bytes: self.max_message_bytes,
            max_in_flight: self.max_in_flight,
            redis_pool_size: self.redis_pool_size,
            redis_timeout: self.redis_timeout_ms.map(Duration::from_millis),
            shutdown_grace: self.shutdown_grace_ms.map(Duration::from_millis),
            on_store_error: self.on_store_error,
            on_store_error_senders: None,
            durability: self.durability,
            durability_replicas: self.durability_replicas,
            durability_timeout: self.durability_timeout_ms.map(Duration::from_millis),
            on_ledger_loss: self.on_ledger_loss,
            webhook_listen: self.webhook_listen,
            webhook_verify_token: self.webhook_verify_token.clone(),
            webhook_app_secrets: self.webhook_app_secret.clone(),
            webhook_forward: self.webhook_forward.clone(),
            webhook_max_body_bytes: self.webhook_max_body_bytes,
            webhook_wabas: None,
            webhook_displays: None,
            shutdown_delay: self.shutdown_delay_ms.map(Duration::from_millis),
            redis_ca: self.redis_ca.clone(),
            metrics_listen: self.metrics_listen,
            log_format: self.log_format,
            log_level: self.log_level.clone(),
            sender_tokens: self.auth_sender_tokens.clone(),
            operator_tokens: self.auth_operator_tokens.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
        }
    }

    fn load(&self) -> Result<Settings, String> {
        let mut overrides = self.overrides();
        // A repeatable KEY=VALUE flag: None when not given, its error naming the flag.
        let pairs = |flag: &str, values: &[String]| {
            (!values.is_empty())
                .then(|| waquota::config::parse_pairs(values))
                .transpose()
                .map_err(|e| format!("invalid configuration: --{flag}: {e}"))
        };
        overrides.webhook_wabas = pairs("webhook-waba", &self.webhook_waba)?;
        overrides.webhook_displays = pairs("webhook-display", &self.webhook_display)?;
        if !self.on_store_error_sender.is_empty() {
            let senders = waquota::config::parse_sender_policies(&self.on_store_error_sender)
                .map_err(|e| format!("invalid configuration: --on-store-error-sender: {e}"))?;
            overrides.on_store_error_senders = Some(senders);
        }
        Settings::load(self.config.as_deref(), std::env::vars(), overrides)
            .map_err(|e| format!("invalid configuration: {e}"))
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("waquota: {message}");
    ExitCode::from(code)
}

fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_level)
        .unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: redirected logs (files, journald, containers) stay plain text.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match settings.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
}

async fn serve(args: SettingsArgs) -> ExitCode {
    let settings = match args.load() {
        Ok(s) => s,
        Err(e) => return fail(1, &e),
    };
    init_tracing(&settings);
    let listeners = match waquota::server::Listeners::bind(&settings).await {
        Ok(l) => l,
        Err(e) => return fail(1, &e.to_string()),
    };
    match waquota::server::serve(settings, listeners, waquota::server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, &e.to_string()),
    }
}

fn config_check(args: SettingsArgs, json: bool) -> ExitCode {
    let settings = match args.load() {
        Ok(s) => s.redacted(),
        Err(e) => return fail(1, &e),
    };
    let out = if json {
        match serde_json::to_string_pretty(&settings) {
            Ok(s) => s + "\n",
            Err(e) => return fail(1, &format!("cannot print the settings: {e}")),
        }
    } else {
        let source = match &args.config {
            Some(p) => format!("defaults < {} < environment < flags", p.display()),
            None => "defaults < environment < flags".into(),
        };
        format!(
            "# valid; effective settings ({source}); secrets shown as ***\n{}",
            settings.to_toml()
        )
    };
    // Not println!: a reader that stopped (`waquota config check | head -1`) must not panic.
    match cli::write_stdout(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e.message()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(mut args) => {
            // The bench shares the operator options: where the server is, its token, JSON output.
            args.addr = cli.client.addr.clone();
            args.token = cli.client.token.clone();
            args.json = cli.client.json;
            waquota::bench::run(args).await
        }
        Command::Serve(args) => serve(args).await,
        Command::Config(ConfigCommand::Check(args)) => config_check(args, cli.client.json),
        Command::Operator(command) => match cli::run(command, &cli.client).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e.exit_code(), e.message()),
        },
    }
}
