//! The `waquota` binary: `serve` runs the service.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use waquota::config::{Settings, Store};
use waquota::model::{Defaults, Tier, WindowMode};

#[derive(Parser)]
#[command(
    name = "waquota",
    version,
    about = "Distributed rate limiter for WhatsApp Business messaging limits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service (in-memory ledger unless a Redis store is given).
    Serve(ServeArgs),
    /// Load a running server (and/or Redis directly) and print throughput, latency and memory.
    Bench(waquota::bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the gRPC listener.
    #[arg(long, env = "WAQUOTA_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Standalone Redis URL (redis:// or rediss://); without a store option the ledger is in memory.
    #[arg(long, env = "WAQUOTA_REDIS_URL", conflicts_with = "redis_cluster")]
    redis: Option<String>,
    /// Redis Cluster seed node URLs, comma-separated.
    #[arg(long, env = "WAQUOTA_REDIS_CLUSTER", value_delimiter = ',')]
    redis_cluster: Vec<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "WAQUOTA_KEY_PREFIX", default_value = "wq")]
    key_prefix: String,
    /// Honour the `at` field of requests (tests, replays, simulations).
    #[arg(long, env = "WAQUOTA_TRUST_CLIENT_CLOCK")]
    trust_client_clock: bool,
    /// Tier of senders that have no stored policy: 50, 250, 1k, 2k, 10k, 100k, unlimited.
    #[arg(long, env = "WAQUOTA_DEFAULT_TIER", default_value = "250", value_parser = parse_tier)]
    default_tier: Tier,
    /// Window mode of senders that have no stored policy: conversation or rolling.
    #[arg(long, env = "WAQUOTA_DEFAULT_SENDER_MODE", default_value = "conversation", value_parser = parse_mode)]
    default_sender_mode: WindowMode,
    /// Tier of portfolios that have no stored policy.
    #[arg(long, env = "WAQUOTA_DEFAULT_PORTFOLIO_TIER", default_value = "250", value_parser = parse_tier)]
    default_portfolio_tier: Tier,
    /// Window mode of portfolios that have no stored policy.
    #[arg(long, env = "WAQUOTA_DEFAULT_PORTFOLIO_MODE", default_value = "rolling", value_parser = parse_mode)]
    default_portfolio_mode: WindowMode,
    /// Most recipients in one AcquireBatch.
    #[arg(long, env = "WAQUOTA_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Multiplexed connections kept to Redis.
    #[arg(long, env = "WAQUOTA_REDIS_POOL_SIZE", default_value_t = 4)]
    redis_pool_size: usize,
    /// Longest wait for one Redis call, in milliseconds, before answering UNAVAILABLE.
    #[arg(long, env = "WAQUOTA_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    redis_timeout_ms: u64,
    /// How long in-flight requests may take to finish on shutdown, in milliseconds.
    #[arg(long, env = "WAQUOTA_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. info or waquota=debug.
    #[arg(long, env = "WAQUOTA_LOG", default_value = "info")]
    log: String,
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    Tier::from_name(s)
        .ok_or_else(|| format!("unknown tier {s:?}: use 50, 250, 1k, 2k, 10k, 100k or unlimited"))
}

fn parse_mode(s: &str) -> Result<WindowMode, String> {
    WindowMode::from_name(s)
        .ok_or_else(|| format!("unknown window mode {s:?}: use conversation or rolling"))
}

impl ServeArgs {
    fn settings(&self) -> Settings {
        let store = match (&self.redis, self.redis_cluster.is_empty()) {
            (Some(url), _) => Store::Redis { url: url.clone() },
            (None, false) => Store::Cluster {
                nodes: self.redis_cluster.clone(),
            },
            (None, true) => Store::Memory,
        };
        let mut defaults = Defaults::default();
        defaults.sender.tier = self.default_tier;
        defaults.sender.window_mode = self.default_sender_mode;
        defaults.portfolio.tier = self.default_portfolio_tier;
        defaults.portfolio.window_mode = self.default_portfolio_mode;
        Settings {
            listen: self.listen,
            store,
            key_prefix: self.key_prefix.clone(),
            trust_client_clock: self.trust_client_clock,
            defaults,
            max_batch: self.max_batch,
            redis_pool_size: self.redis_pool_size.max(1),
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            log_level: self.log.clone(),
            ..Settings::default()
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => waquota::bench::run(args).await,
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_new(&args.log)
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let settings = args.settings();
            let listener = match tokio::net::TcpListener::bind(settings.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("waquota: cannot listen on {}: {e}", settings.listen);
                    return ExitCode::FAILURE;
                }
            };
            match waquota::server::serve(settings, listener, waquota::server::shutdown_signal())
                .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("waquota: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
