//! The operator commands of the `waquota` binary: a gRPC client of `AdminService` that prints
//! tables for people and JSON for scripts.
//!
//! Every failure becomes one line on stderr and an exit code: 2 for a usage error (bad
//! arguments, a confirmation that cannot be asked for), 1 for an error from the connection or
//! the server. Times print as RFC 3339 in UTC; `--at` takes the same form or unix milliseconds.
//! Nothing is printed with `println!`: output to a reader that stopped early (`| head -c1`) ends
//! quietly instead of panicking ([`write_stdout`]).

mod targets;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::chart::{self, Chart};
use crate::grpc::convert;
use crate::model::{Defaults, Millis, Policy, Quality, RuleSet, SenderStatus, Tier, WindowMode};
use crate::proto::{self, admin_service_client::AdminServiceClient, target};

// ------------------------------------------------------------------------------ arguments

/// Where operator commands look for the server when --addr is not given.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// How to reach the server, and how to print: options of every operator command.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Address of the waquota server (https:// for TLS) [default: http://127.0.0.1:50051].
    #[arg(
        long,
        global = true,
        env = "WAQUOTA_ADDR",
        help_heading = "Operator options"
    )]
    pub addr: Option<String>,
    /// Bearer token sent as `authorization: Bearer <token>`.
    #[arg(
        long,
        global = true,
        env = "WAQUOTA_TOKEN",
        hide_env_values = true,
        help_heading = "Operator options"
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; turns TLS on.
    #[arg(
        long,
        global = true,
        value_name = "PEM",
        help_heading = "Operator options"
    )]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --client-key.
    #[arg(
        long,
        global = true,
        value_name = "PEM",
        requires = "client_key",
        help_heading = "Operator options"
    )]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(
        long,
        global = true,
        value_name = "PEM",
        requires = "client_cert",
        help_heading = "Operator options"
    )]
    pub client_key: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true, help_heading = "Operator options")]
    pub json: bool,
    /// The moment to ask about (RFC 3339 UTC, e.g. 2026-03-02T12:00:00Z, or unix
    /// milliseconds); honoured only by a server that trusts client clocks.
    #[arg(long, global = true, value_parser = parse_time, value_name = "TIME", help_heading = "Operator options")]
    pub at: Option<Millis>,
}

/// A sender, or with `--portfolio` a portfolio.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "target", required = true, multiple = false)]
pub struct TargetArgs {
    /// The sender (business phone number id).
    pub sender: Option<String>,
    /// A business portfolio instead of a sender.
    #[arg(long, value_name = "ID")]
    pub portfolio: Option<String>,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Show a sender's or a portfolio's window: limit, used, remaining, when slots free up.
    Inspect {
        #[command(flatten)]
        target: TargetArgs,
        /// Also show this recipient's slot and service window.
        #[arg(long)]
        recipient: Option<String>,
        /// Also draw the next 24 hours: the window's occupancy and the slots freeing each hour.
        #[arg(long)]
        chart: bool,
        /// Write that chart as an SVG image to FILE.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Ask the server's gRPC health service: exit 0 when it is SERVING, 1 otherwise (for a
    /// container HEALTHCHECK or a script).
    Health {
        /// The service to ask for ("" = the server as a whole, or waquota.v1.QuotaService,
        /// waquota.v1.AdminService).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Plan a campaign on a copy of the live window: when it completes, hour by hour what goes
    /// out and frees, and when the next tiers come. Changes nothing.
    Plan(PlanArgs),
    /// List the recipients that hold a slot.
    #[command(subcommand)]
    Window(WindowCommand),
    /// Read or change a policy (tier, limits, mode, status, quality, rates, caps, rules).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Assign a sender to a portfolio, or detach it.
    #[command(subcommand)]
    Sender(SenderCommand),
    /// Clear a sender's or a portfolio's window (every slot it holds).
    Reset {
        #[command(flatten)]
        target: TargetArgs,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// The ledger as a whole: accept a loss that waquota detected.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Map a WhatsApp Business Account to a portfolio, for the webhook bridge.
    #[command(subcommand)]
    Waba(WabaCommand),
    /// Try the webhook bridge: sign and post a saved webhook body.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// The senders and portfolios the ledger knows.
    #[command(subcommand)]
    Targets(targets::TargetsCommand),
    /// The latest changes made to a sender, a portfolio or the ledger (who, when, what).
    Audit(targets::AuditArgs),
}

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("campaign").required(true).args(["new", "recipients"])))]
pub struct PlanArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// A campaign to N users the window has never seen.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub new: Option<String>,
    /// A campaign to the users in FILE, one id per line, in sending order.
    #[arg(long, value_name = "FILE")]
    pub recipients: Option<PathBuf>,
    /// When it starts (RFC 3339 or Unix milliseconds); default now.
    #[arg(long, value_name = "TIME")]
    pub start: Option<String>,
    /// Messages per second; default the sender's throughput (a portfolio's senders together).
    #[arg(long, value_name = "PER_SECOND", allow_hyphen_values = true)]
    pub rate: Option<String>,
    /// The template category: marketing, utility, authentication or service.
    #[arg(long)]
    pub category: Option<String>,
    /// Messages each user gets.
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub deliveries_per_user: Option<String>,
    /// Apply the projected tier upgrades at their moments (default: keep the tier in force).
    #[arg(long)]
    pub with_upgrades: bool,
    /// How far ahead to plan, in days (default 30, at most 90).
    #[arg(long, value_name = "DAYS", allow_hyphen_values = true)]
    pub horizon_days: Option<String>,
    /// Write the chart of the plan's first 24 hours as an SVG image to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum WebhookCommand {
    /// Sign FILE with the app secret as WhatsApp does (X-Hub-Signature-256) and POST it to the
    /// webhook listener; prints the listener's answer.
    Replay {
        file: PathBuf,
        /// The app secret (one of the server's webhook_app_secrets).
        #[arg(long, env = "WAQUOTA_WEBHOOK_SECRET")]
        secret: String,
        /// The webhook listener.
        #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/whatsapp")]
        url: String,
    },
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum WabaCommand {
    /// WABA-wide webhooks (business_capability_update) of this WABA set this portfolio's tier.
    Assign {
        waba: String,
        #[arg(long)]
        portfolio: String,
    },
    /// Forget the WABA's portfolio.
    Detach { waba: String },
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum LedgerCommand {
    /// Confirm that the ledger may be trusted again after a loss (Redis came back empty): new
    /// slots are admitted from now on, counted from what the ledger now holds.
    AcceptLoss,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum WindowCommand {
    /// The recipients holding a slot, in listing order (stable; each page costs the same).
    List {
        #[command(flatten)]
        target: TargetArgs,
        /// Entries per page (server default 100, at most 1000).
        #[arg(long, value_name = "N")]
        page_size: Option<u32>,
        /// Continue from this token (printed by the previous page).
        #[arg(long, value_name = "TOKEN")]
        page_token: Option<String>,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum PolicyCommand {
    /// Every field of the target's policy; for a sender in a portfolio, the portfolio's too.
    Get {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Store a policy; what is not given keeps its current value.
    #[command(
        override_usage = "waquota policy set <SENDER|--portfolio <ID>> <FIELD FLAG>... [OPTIONS]"
    )]
    Set {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        changes: PolicyChanges,
    },
}

/// The fields `policy set` can change; at least one is needed. The named values (status,
/// quality, rule set, auto tier) are read after parsing, so that a bad one is a one-line usage
/// error.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "change", required = true, multiple = true)]
pub struct PolicyChanges {
    /// 50, 250, 1k, 2k, 10k, 100k or unlimited.
    #[arg(long)]
    pub tier: Option<Tier>,
    /// A limit that overrides the tier's (0 = use the tier).
    #[arg(long, value_name = "N")]
    pub custom_limit: Option<u64>,
    /// conversation (slot fixed at first delivery) or rolling (extended by each delivery).
    #[arg(long)]
    pub mode: Option<WindowMode>,
    /// connected, flagged, restricted, paused, banned or disconnected.
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// green, yellow, red, or none (unknown: eligible for upgrades).
    #[arg(long, value_name = "QUALITY")]
    pub quality: Option<String>,
    /// Throughput, inbound included: 1 to 100,000 (0 = the server's default, 80 unless configured).
    #[arg(long, value_name = "N")]
    pub messages_per_second: Option<u32>,
    /// Pair rate: one message per this many milliseconds to one user (0 = the server's default).
    #[arg(long, value_name = "MS")]
    pub pair_interval_ms: Option<u64>,
    /// Pair rate: messages to one user that may go out at once (0 = the server's default).
    #[arg(long, value_name = "N")]
    pub pair_burst: Option<u32>,
    /// 0 to 99: the effective limit keeps this margin below the limit.
    #[arg(long, value_name = "N")]
    pub headroom_percent: Option<u32>,
    /// On a sender in a portfolio: the most of the portfolio's slots it may hold (0 = no cap).
    #[arg(long, value_name = "N")]
    pub sender_cap: Option<u64>,
    /// The most marketing templates from this sender to one user per period (0 = no cap).
    #[arg(long, value_name = "N")]
    pub marketing_cap: Option<u32>,
    /// The marketing cap's period in milliseconds (0 = 24 h).
    #[arg(long, value_name = "MS")]
    pub marketing_cap_period_ms: Option<u64>,
    /// legacy (per phone number) or portfolio: which tier rules the projections follow.
    #[arg(long, value_name = "RULES")]
    pub rule_set: Option<String>,
    /// true or false: apply projected tier changes at their moment (replays, simulations).
    #[arg(long, value_name = "BOOL")]
    pub auto_tier: Option<String>,
}

/// [`PolicyChanges`] with every value read.
#[derive(Debug, Clone, Default)]
struct Changes {
    tier: Option<Tier>,
    custom_limit: Option<u64>,
    mode: Option<WindowMode>,
    status: Option<SenderStatus>,
    /// `Some(None)`: back to unknown.
    quality: Option<Option<Quality>>,
    messages_per_second: Option<u32>,
    pair_interval_ms: Option<Millis>,
    pair_burst: Option<u32>,
    headroom_percent: Option<u32>,
    sender_cap: Option<u64>,
    marketing_cap: Option<u32>,
    marketing_cap_period_ms: Option<Millis>,
    rule_set: Option<RuleSet>,
    auto_tier: Option<bool>,
}

/// A named value of a flag, or a usage error that lists the names.
fn named<T>(
    flag: &str,
    value: Option<&str>,
    from_name: impl Fn(&str) -> Option<T>,
    names: &str,
) -> Result<Option<T>, CliError> {
    value
        .map(|v| {
            from_name(v).ok_or_else(|| {
                CliError::Usage(format!("--{flag} {v:?}: unknown value; use {names}"))
            })
        })
        .transpose()
}

/// Milliseconds from a flag; beyond the range of a time they stay out of range, for the server
/// to refuse naming the field.
fn millis(v: Option<u64>) -> Option<Millis> {
    v.map(|ms| Millis::try_from(ms).unwrap_or(Millis::MAX))
}

impl PolicyChanges {
    fn read(&self) -> Result<Changes, CliError> {
        Ok(Changes {
            tier: self.tier,
            custom_limit: self.custom_limit,
            mode: self.mode,
            status: named(
                "status",
                self.status.as_deref(),
                SenderStatus::from_name,
                "connected, flagged, restricted, paused, banned or disconnected",
            )?,
            quality: named(
                "quality",
                self.quality.as_deref(),
                |v| {
                    if v.eq_ignore_ascii_case("none") {
                        Some(None)
                    } else {
                        Quality::from_name(v).map(Some)
                    }
                },
                "green, yellow, red or none",
            )?,
            messages_per_second: self.messages_per_second,
            pair_interval_ms: millis(self.pair_interval_ms),
            pair_burst: self.pair_burst,
            headroom_percent: self.headroom_percent,
            sender_cap: self.sender_cap,
            marketing_cap: self.marketing_cap,
            marketing_cap_period_ms: millis(self.marketing_cap_period_ms),
            rule_set: named(
                "rule-set",
                self.rule_set.as_deref(),
                RuleSet::from_name,
                "legacy or portfolio",
            )?,
            auto_tier: named(
                "auto-tier",
                self.auto_tier.as_deref(),
                |v| match v.to_ascii_lowercase().as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
                "true or false",
            )?,
        })
    }
}

impl Changes {
    /// `p` with the given fields changed and every other one kept.
    fn apply(&self, p: Policy) -> Policy {
        Policy {
            tier: self.tier.unwrap_or(p.tier),
            custom_limit: self.custom_limit.unwrap_or(p.custom_limit),
            window_mode: self.mode.unwrap_or(p.window_mode),
            status: self.status.unwrap_or(p.status),
            // A status an operator sets holds until changed.
            status_until: if self.status.is_some() {
                None
            } else {
                p.status_until
            },
            quality: self.quality.unwrap_or(p.quality),
            messages_per_second: self.messages_per_second.unwrap_or(p.messages_per_second),
            pair_interval_ms: self.pair_interval_ms.unwrap_or(p.pair_interval_ms),
            pair_burst: self.pair_burst.unwrap_or(p.pair_burst),
            headroom_percent: self.headroom_percent.unwrap_or(p.headroom_percent),
            sender_cap: self.sender_cap.unwrap_or(p.sender_cap),
            marketing_cap: self.marketing_cap.unwrap_or(p.marketing_cap),
            marketing_cap_period_ms: self
                .marketing_cap_period_ms
                .unwrap_or(p.marketing_cap_period_ms),
            rule_set: self.rule_set.unwrap_or(p.rule_set),
            auto_tier: self.auto_tier.unwrap_or(p.auto_tier),
        }
    }
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum SenderCommand {
    /// Share a portfolio's window: the sender is limited by the portfolio from now on.
    Assign {
        sender: String,
        #[arg(long, value_name = "ID")]
        portfolio: String,
        /// Allow a portfolio the ledger does not know yet (it starts with the default policy);
        /// without it an unknown portfolio is refused, as a mistyped id would be.
        #[arg(long)]
        create: bool,
    },
    /// Detach a sender from its portfolio: it is limited by its own window again.
    Detach { sender: String },
}

// ------------------------------------------------------------------------------ errors

/// A failure of a command: one line for stderr, and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    /// Bad arguments or a missing confirmation: exit code 2, like clap's own usage errors.
    Usage(String),
    /// The connection or the server failed: exit code 1.
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            CliError::Usage(m) | CliError::Failed(m) => m,
        }
    }
}

/// gRPC's canonical name of a status code (`INVALID_ARGUMENT`, …).
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        let mut message = if s.message().is_empty() {
            "no message".to_owned()
        } else {
            one_line(s.message())
        };
        // A call that failed in transport says only "transport error": add the cause.
        if std::error::Error::source(&s).is_some() {
            message = format!("{message}: {}", root_cause(&s));
        }
        CliError::Failed(format!("{}: {message}", code_name(s.code())))
    }
}

/// The innermost cause of an error ("connection refused" rather than "transport error").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    match cur.downcast_ref::<std::io::Error>() {
        // An OS error reads best as its kind ("connection refused"); a wrapped one (TLS) as
        // what it wraps.
        Some(io) if io.get_ref().is_none() => io.kind().to_string(),
        _ => one_line(&cur.to_string()),
    }
}

// ------------------------------------------------------------------------------ the client

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// What every command needs: a connected client, the `at` to send, the output format.
struct Session {
    admin: Admin,
    health: tonic_health::pb::health_client::HealthClient<Channel>,
    at: Option<prost_types::Timestamp>,
    json: bool,
}

fn read_pem(flag: &str, path: &PathBuf) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
}

/// The endpoint the arguments describe (TLS when --ca-cert is given); checks everything that
/// can be checked before connecting.
fn endpoint(args: &ClientArgs) -> Result<(String, Endpoint), CliError> {
    let given = args.addr.as_deref().unwrap_or(DEFAULT_ADDR);
    let addr = if given.contains("://") {
        given.to_owned()
    } else if args.ca_cert.is_some() {
        format!("https://{given}")
    } else {
        format!("http://{given}")
    };
    let https = addr.starts_with("https://");
    if !https && !addr.starts_with("http://") {
        return Err(CliError::Usage(format!(
            "--addr {addr}: use http://host:port, or https://host:port for TLS"
        )));
    }
    let mut ep = Endpoint::from_shared(addr.clone())
        .map_err(|e| CliError::Usage(format!("--addr {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    match (&args.ca_cert, https) {
        (Some(ca), true) => {
            let mut tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read_pem("--ca-cert", ca)?));
            if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
                tls = tls.identity(Identity::from_pem(
                    read_pem("--client-cert", cert)?,
                    read_pem("--client-key", key)?,
                ));
            }
            ep = ep
                .tls_config(tls)
                .map_err(|e| CliError::Usage(format!("TLS: {}", root_cause(&e))))?;
        }
        (Some(_), false) => {
            return Err(CliError::Usage(format!(
                "--ca-cert needs an https:// address, got {addr}"
            )));
        }
        (None, true) => {
            return Err(CliError::Usage(format!(
                "{addr}: TLS needs --ca-cert (the CA that signed the server's certificate)"
            )));
        }
        (None, false) if args.client_cert.is_some() => {
            return Err(CliError::Usage(
                "--client-cert needs TLS: give --ca-cert and an https:// address".into(),
            ));
        }
        (None, false) => {}
    }
    Ok((addr, ep))
}

async fn connect(args: &ClientArgs) -> Result<Session, CliError> {
    let bearer = match &args.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| {
                    CliError::Usage("--token: not a valid header value (visible ASCII)".into())
                })?,
        ),
        None => None,
    };
    let (addr, ep) = endpoint(args)?;
    let channel = ep
        .connect()
        .await
        .map_err(|e| CliError::Failed(format!("cannot reach {addr}: {}", root_cause(&e))))?;
    Ok(Session {
        health: tonic_health::pb::health_client::HealthClient::new(channel.clone()),
        admin: AdminServiceClient::with_interceptor(channel, Bearer(bearer)),
        at: args.at.map(convert::timestamp),
        json: args.json,
    })
}

/// Runs one operator command and prints its result on stdout.
pub async fn run(command: Command, args: &ClientArgs) -> Result<(), CliError> {
    // Refuse before connecting: nothing else could make the command succeed.
    if let Command::Reset { yes: false, target } = &command
        && !std::io::stdin().is_terminal()
    {
        return Err(CliError::Usage(format!(
            "refusing to reset {} without confirmation: no terminal to ask on; pass --yes",
            describe(&proto_target(target))
        )));
    }
    // Bad flag values are usage errors, found before connecting too.
    let changes = match &command {
        Command::Policy(PolicyCommand::Set { changes, .. }) => changes.read()?,
        _ => Changes::default(),
    };
    if let Command::Webhook(WebhookCommand::Replay { file, secret, url }) = &command {
        return write_stdout(&replay(file, secret, url).await?);
    }
    let plan_request = match &command {
        Command::Plan(p) => plan_request(p)?,
        _ => proto::PlanRequest::default(),
    };
    let mut s = connect(args).await?;
    let out = match command {
        Command::Inspect {
            target,
            recipient,
            chart,
            svg,
        } => {
            let target = proto_target(&target);
            let mut out = inspect(&mut s, &target, recipient).await?;
            if chart || svg.is_some() {
                let c = window_chart(&mut s, &target).await?;
                if let Some(path) = &svg {
                    write_svg(path, &c)?;
                }
                if chart && !s.json {
                    out.push('\n');
                    out.push_str(&c.terminal());
                }
            }
            out
        }
        Command::Plan(args) => plan(&mut s, &plan_request, &args).await?,
        Command::Health { service } => health(&mut s, service).await?,
        Command::Window(WindowCommand::List {
            target,
            page_size,
            page_token,
            all,
        }) => {
            list_window(
                &mut s,
                &proto_target(&target),
                page_size.unwrap_or(0),
                page_token.unwrap_or_default(),
                all,
            )
            .await?
        }
        Command::Policy(PolicyCommand::Get { target }) => {
            policy_get(&mut s, &proto_target(&target)).await?
        }
        Command::Policy(PolicyCommand::Set { target, .. }) => {
            policy_set(&mut s, &proto_target(&target), &changes).await?
        }
        Command::Sender(SenderCommand::Assign {
            sender,
            portfolio,
            create,
        }) => assign(&mut s, sender, Some(portfolio), create).await?,
        Command::Sender(SenderCommand::Detach { sender }) => {
            assign(&mut s, sender, None, false).await?
        }
        Command::Reset { target, yes } => reset(&mut s, &proto_target(&target), yes).await?,
        Command::Ledger(LedgerCommand::AcceptLoss) => accept_loss(&mut s).await?,
        Command::Waba(WabaCommand::Assign { waba, portfolio }) => {
            assign_waba(&mut s, waba, portfolio).await?
        }
        Command::Waba(WabaCommand::Detach { waba }) => {
            assign_waba(&mut s, waba, String::new()).await?
        }
        Command::Targets(targets::TargetsCommand::List {
            kind,
            page_size,
            page_token,
        }) => targets::list(&mut s, kind, page_size.unwrap_or(0), page_token).await?,
        Command::Audit(args) => targets::audit(&mut s, &args).await?,
        Command::Webhook(_) => unreachable!("answered before connecting"),
    };
    write_stdout(&out)
}

/// Writes `text` on stdout. A reader that went away (`waquota inspect s1 --json | head -c1`) is
/// not a failure: it stopped reading, so the rest is dropped quietly. Any other write error is.
pub fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Failed(format!("cannot write the output: {e}"))),
    }
}

// ------------------------------------------------------------------------------ commands

fn proto_target(t: &TargetArgs) -> proto::Target {
    let target = match (&t.sender, &t.portfolio) {
        (_, Some(p)) => target::Target::Portfolio(p.clone()),
        (Some(s), None) => target::Target::Sender(s.clone()),
        // clap's group makes one of them required.
        (None, None) => target::Target::Sender(String::new()),
    };
    proto::Target {
        target: Some(target),
    }
}

fn describe(t: &proto::Target) -> String {
    match &t.target {
        Some(target::Target::Sender(s)) => format!("sender {s}"),
        Some(target::Target::Portfolio(p)) => format!("portfolio {p}"),
        None => "nothing".into(),
    }
}

fn target_id(t: &proto::Target) -> &str {
    match &t.target {
        Some(target::Target::Sender(s)) => s,
        Some(target::Target::Portfolio(p)) => p,
        None => "",
    }
}

#[derive(Serialize)]
struct TargetJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    portfolio: Option<&'a str>,
}

fn target_json(t: &proto::Target) -> TargetJson<'_> {
    match &t.target {
        Some(target::Target::Sender(s)) => TargetJson {
            sender: Some(s),
            portfolio: None,
        },
        Some(target::Target::Portfolio(p)) => TargetJson {
            sender: None,
            portfolio: Some(p),
        },
        None => TargetJson {
            sender: None,
            portfolio: None,
        },
    }
}

fn json_out(v: &impl Serialize) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":{e:?}}}"));
    s.push('\n');
    s
}

/// Two aligned columns: a name and its value.
fn table(rows: &[(&str, String)]) -> String {
    grid(
        None,
        rows.iter().map(|(k, v)| vec![k.to_string(), v.clone()]),
        &[],
    )
}

/// Columns for people: no lines, two spaces between columns, the columns numbered in `right`
/// aligned right (counts).
fn grid(
    header: Option<&[&str]>,
    rows: impl IntoIterator<Item = Vec<String>>,
    right: &[usize],
) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    if let Some(header) = header {
        t.set_header(header.to_vec());
    }
    for row in rows {
        t.add_row(row);
    }
    let last = t.column_count().saturating_sub(1);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
        if right.contains(&i) {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t.lines().map(|l| l.trim_end().to_owned() + "\n").collect()
}

/// A tier from the wire, `None` when unspecified (or unknown to this client).
fn tier_opt(t: i32) -> Option<&'static str> {
    proto::Tier::try_from(t)
        .ok()
        .and_then(convert::tier_from_proto)
        .map(Tier::name)
}

fn scope_name(s: i32) -> &'static str {
    proto::Scope::try_from(s)
        .ok()
        .and_then(convert::scope_from_proto)
        .map(|s| s.name())
        .unwrap_or("unknown")
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| match convert::ms_from_timestamp("time", t) {
        Ok(ms) => rfc3339(ms),
        Err(_) => format!("{}s", t.seconds),
    })
}

fn time_or_dash(t: Option<&prost_types::Timestamp>) -> String {
    time(t).unwrap_or_else(|| "-".into())
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// A duration for people: `6s`, `24h`, `1500ms`.
fn span(ms: Millis) -> String {
    const UNITS: [(Millis, &str); 4] = [(3_600_000, "h"), (60_000, "m"), (1000, "s"), (1, "ms")];
    UNITS
        .iter()
        .find(|(unit, _)| ms % unit == 0)
        .map(|(unit, name)| format!("{}{name}", ms / unit))
        .unwrap_or_else(|| format!("{ms}ms"))
}

/// A rate field: 0 means the server's configured default.
fn or_default(n: u64) -> String {
    if n == 0 {
        "default".into()
    } else {
        n.to_string()
    }
}

fn or_none(n: u64) -> String {
    if n == 0 { "none".into() } else { n.to_string() }
}

fn quality_name(q: Option<Quality>) -> &'static str {
    q.map_or("-", Quality::name)
}

/// A policy the server sent, read through the one proto-domain conversion. Unspecified fields
/// never come from a server (it stores and answers whole policies).
fn read_policy(p: Option<&proto::Policy>, target: &proto::Target) -> Result<Policy, CliError> {
    let unreadable = |e: crate::model::InvalidArgument| {
        CliError::Failed(format!(
            "the server sent a policy this client cannot read: {e}"
        ))
    };
    let t = convert::target(Some(target)).map_err(unreadable)?;
    convert::policy(p, &t, &Defaults::default()).map_err(unreadable)
}

/// Every field of a policy, as on the wire: 0 means the default (rates, caps) or none.
#[derive(Serialize)]
struct PolicyJson {
    tier: &'static str,
    custom_limit: u64,
    mode: &'static str,
    status: &'static str,
    /// null: unknown (eligible for upgrades).
    quality: Option<&'static str>,
    messages_per_second: u32,
    pair_interval_ms: Millis,
    pair_burst: u32,
    headroom_percent: u32,
    sender_cap: u64,
    marketing_cap: u32,
    marketing_cap_period_ms: Millis,
    rule_set: &'static str,
    auto_tier: bool,
}

fn policy_json(p: &Policy) -> PolicyJson {
    PolicyJson {
        tier: p.tier.name(),
        custom_limit: p.custom_limit,
        mode: p.window_mode.name(),
        status: p.status.name(),
        quality: p.quality.map(Quality::name),
        messages_per_second: p.messages_per_second,
        pair_interval_ms: p.pair_interval_ms,
        pair_burst: p.pair_burst,
        headroom_percent: p.headroom_percent,
        sender_cap: p.sender_cap,
        marketing_cap: p.marketing_cap,
        marketing_cap_period_ms: p.marketing_cap_period_ms,
        rule_set: p.rule_set.name(),
        auto_tier: p.auto_tier,
    }
}

/// Every field of a policy, one row each.
fn policy_rows(p: &Policy) -> Vec<(&'static str, String)> {
    vec![
        ("tier", p.tier.name().to_owned()),
        (
            "custom limit",
            if p.custom_limit == 0 {
                "- (the tier's)".to_owned()
            } else {
                p.custom_limit.to_string()
            },
        ),
        ("mode", p.window_mode.name().to_owned()),
        ("headroom", format!("{}%", p.headroom_percent)),
        ("rule set", p.rule_set.name().to_owned()),
        ("auto tier", p.auto_tier.to_string()),
        ("status", p.status.name().to_owned()),
        ("quality", quality_name(p.quality).to_owned()),
        (
            "messages per second",
            or_default(p.messages_per_second.into()),
        ),
        (
            "pair interval",
            if p.pair_interval_ms == 0 {
                "default".to_owned()
            } else {
                span(p.pair_interval_ms)
            },
        ),
        ("pair burst", or_default(p.pair_burst.into())),
        ("sender cap", or_none(p.sender_cap)),
        ("marketing cap", or_none(p.marketing_cap.into())),
        ("marketing cap period", marketing_period(p)),
    ]
}

fn marketing_period(p: &Policy) -> String {
    if p.marketing_cap_period_ms == 0 {
        "24h (default)".into()
    } else {
        span(p.marketing_cap_period_ms)
    }
}

/// A sender's own rates in one line: what 0 (the default) stands for is the server's to know.
fn rates_line(p: &Policy) -> String {
    let pair = if p.pair_interval_ms == 0 {
        "default".to_owned()
    } else {
        span(p.pair_interval_ms)
    };
    format!(
        "messages/s {}, pair interval {pair}, pair burst {}",
        or_default(p.messages_per_second.into()),
        or_default(p.pair_burst.into())
    )
}

/// A sender's own caps in one line.
fn caps_line(p: &Policy) -> String {
    let marketing = if p.marketing_cap == 0 {
        "none".to_owned()
    } else {
        format!(
            "{} per {}",
            p.marketing_cap,
            if p.marketing_cap_period_ms == 0 {
                "24h".to_owned()
            } else {
                span(p.marketing_cap_period_ms)
            }
        )
    };
    format!(
        "sender cap {}, marketing cap {marketing}",
        or_none(p.sender_cap)
    )
}

/// A count against the limit, or `unlimited`.
fn count_or_unlimited(limit: u64, n: u64) -> String {
    if limit == 0 {
        "unlimited".to_owned()
    } else {
        n.to_string()
    }
}

async fn fetch_inspection(
    s: &mut Session,
    target: &proto::Target,
    recipient: Option<String>,
) -> Result<proto::InspectResponse, CliError> {
    Ok(s.admin
        .inspect(proto::InspectRequest {
            target: Some(target.clone()),
            recipient: recipient.unwrap_or_default(),
            at: s.at,
        })
        .await?
        .into_inner())
}

#[derive(Serialize)]
struct ProjectionJson {
    next_tier: Option<&'static str>,
    upgrade_at: Option<String>,
    downgrade_at: Option<String>,
}

fn projection_json(p: Option<&proto::Projection>) -> ProjectionJson {
    ProjectionJson {
        next_tier: p.and_then(|p| tier_opt(p.next_tier)),
        upgrade_at: p.and_then(|p| time(p.upgrade_at.as_ref())),
        downgrade_at: p.and_then(|p| time(p.downgrade_at.as_ref())),
    }
}

#[derive(Serialize)]
struct InspectJson<'a> {
    target: TargetJson<'a>,
    known: bool,
    now: Option<String>,
    scope: &'static str,
    portfolio: Option<String>,
    senders: Vec<String>,
    /// The sender's own status for a sender, the portfolio's for a portfolio.
    status: &'static str,
    quality: Option<&'static str>,
    /// The policy of the deciding window.
    policy: PolicyJson,
    /// For a sender: its own policy (status, rates, caps), wherever its window is.
    sender_policy: Option<PolicyJson>,
    /// 0 = unlimited, as on the wire.
    limit: u64,
    effective_limit: u64,
    unlimited: bool,
    used: u64,
    remaining: u64,
    next_slot_free_at: Option<String>,
    slots_freeing_next_hour: u64,
    open_service_windows: u64,
    unique_7d: u64,
    unique_30d: u64,
    projection: ProjectionJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient: Option<RecipientJson>,
}

#[derive(Serialize)]
struct RecipientJson {
    id: String,
    counted_until: Option<String>,
    service_window_until: Option<String>,
}

async fn inspect(
    s: &mut Session,
    target: &proto::Target,
    recipient: Option<String>,
) -> Result<String, CliError> {
    let asked_recipient = recipient.is_some();
    let i = fetch_inspection(s, target, recipient).await?;
    let unlimited = i.limit == 0;
    let policy = read_policy(i.policy.as_ref(), target)?;
    let own = match &i.sender_policy {
        Some(p) => Some(read_policy(Some(p), target)?),
        None => None,
    };
    // Status and quality: the sender's own for a sender, the portfolio's for a portfolio.
    let subject = own.unwrap_or(policy);
    if s.json {
        return Ok(json_out(&InspectJson {
            target: target_json(target),
            known: i.known,
            now: time(i.now.as_ref()),
            scope: scope_name(i.scope),
            portfolio: (!i.portfolio.is_empty()).then(|| i.portfolio.clone()),
            senders: i.senders.clone(),
            status: subject.status.name(),
            quality: subject.quality.map(Quality::name),
            policy: policy_json(&policy),
            sender_policy: own.as_ref().map(policy_json),
            limit: i.limit,
            effective_limit: i.effective_limit,
            unlimited,
            used: i.used,
            remaining: i.remaining,
            next_slot_free_at: time(i.next_slot_free_at.as_ref()),
            slots_freeing_next_hour: i.slots_freeing_next_hour,
            open_service_windows: i.open_service_windows,
            unique_7d: i.unique_7d,
            unique_30d: i.unique_30d,
            projection: projection_json(i.projection.as_ref()),
            recipient: asked_recipient.then(|| RecipientJson {
                id: i.recipient.clone(),
                counted_until: time(i.counted_until.as_ref()),
                service_window_until: time(i.service_window_until.as_ref()),
            }),
        }));
    }
    let is_portfolio = matches!(target.target, Some(target::Target::Portfolio(_)));
    // A sender in a portfolio: the portfolio's status and quality count too; shown when they
    // differ from the sender's.
    let also = |mine: &str, theirs: &str| {
        if own.is_some() && !i.portfolio.is_empty() && mine != theirs {
            format!("{mine} (portfolio {}: {theirs})", i.portfolio)
        } else {
            mine.to_owned()
        }
    };
    let mut rows = vec![("target", describe(target))];
    if !i.known {
        rows.push((
            "known",
            format!(
                "no: the ledger holds nothing for this {} (no policy, slot or history); \
                 the figures below are the defaults",
                if is_portfolio { "portfolio" } else { "sender" }
            ),
        ));
    }
    if is_portfolio {
        rows.push(("senders", or_dash(&i.senders.join(", "))));
    } else {
        rows.push(("portfolio", or_dash(&i.portfolio)));
    }
    rows.push(("scope", scope_name(i.scope).to_owned()));
    rows.push(("status", also(subject.status.name(), policy.status.name())));
    rows.push((
        "quality",
        also(quality_name(subject.quality), quality_name(policy.quality)),
    ));
    rows.push(("tier", policy.tier.name().to_owned()));
    if policy.custom_limit > 0 {
        rows.push(("custom limit", policy.custom_limit.to_string()));
    }
    let effective = match (unlimited, policy.headroom_percent) {
        (true, _) => "unlimited".to_owned(),
        (false, 0) => i.effective_limit.to_string(),
        (false, h) => format!("{} (headroom {h}%)", i.effective_limit),
    };
    let projection = projection_json(i.projection.as_ref());
    rows.extend([
        ("mode", policy.window_mode.name().to_owned()),
        ("limit", count_or_unlimited(i.limit, i.limit)),
        ("effective limit", effective),
        ("used", i.used.to_string()),
        ("remaining", count_or_unlimited(i.limit, i.remaining)),
        (
            "next slot free at",
            time_or_dash(i.next_slot_free_at.as_ref()),
        ),
        (
            "slots freeing next hour",
            i.slots_freeing_next_hour.to_string(),
        ),
        ("open service windows", i.open_service_windows.to_string()),
        ("unique users 7d", i.unique_7d.to_string()),
        ("unique users 30d", i.unique_30d.to_string()),
        ("next tier", projection.next_tier.unwrap_or("-").to_owned()),
        (
            "upgrade at",
            projection.upgrade_at.unwrap_or_else(|| "-".into()),
        ),
        (
            "downgrade at",
            projection.downgrade_at.unwrap_or_else(|| "-".into()),
        ),
    ]);
    if let Some(own) = &own {
        rows.push(("rates", rates_line(own)));
        rows.push(("caps", caps_line(own)));
    }
    if asked_recipient {
        rows.extend([
            ("recipient", i.recipient.clone()),
            ("counted until", time_or_dash(i.counted_until.as_ref())),
            (
                "service window until",
                time_or_dash(i.service_window_until.as_ref()),
            ),
        ]);
    }
    rows.push(("as of", time_or_dash(i.now.as_ref())));
    Ok(table(&rows))
}

/// The plan request from the flags, every value checked before connecting (one line each).
fn plan_request(a: &PlanArgs) -> Result<proto::PlanRequest, CliError> {
    let usage = |flag: &str, why: String| CliError::Usage(format!("{flag}: {why}"));
    let number = |flag: &str, v: &Option<String>| -> Result<Option<u64>, CliError> {
        v.as_deref()
            .map(|t| {
                t.trim()
                    .parse::<u64>()
                    .map_err(|_| usage(flag, format!("not a whole number of at least 0: {t:?}")))
            })
            .transpose()
    };
    let new_users = number("--new", &a.new)?.unwrap_or(0);
    if a.new.is_some() && new_users == 0 {
        return Err(usage(
            "--new",
            "the campaign is empty: give at least 1".into(),
        ));
    }
    let mut recipients = Vec::new();
    if let Some(path) = &a.recipients {
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage("--recipients", format!("{}: {e}", path.display())))?;
        for (n, line) in text.lines().enumerate() {
            let id = line.trim();
            if id.is_empty() {
                continue;
            }
            crate::model::RecipientId::parse("recipient", id).map_err(|e| {
                usage(
                    "--recipients",
                    format!("{} line {}: {:?}: {}", path.display(), n + 1, id, e.reason),
                )
            })?;
            recipients.push(id.to_owned());
        }
        if recipients.is_empty() {
            return Err(usage(
                "--recipients",
                format!("{}: no recipient ids in it (one per line)", path.display()),
            ));
        }
    }
    let rate = match a.rate.as_deref() {
        None => 0.0,
        Some(t) => match t.trim().parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 && r <= crate::plan::MAX_RATE => r,
            _ => {
                return Err(usage(
                    "--rate",
                    format!(
                        "messages per second above 0 and at most {}: {t:?}",
                        crate::plan::MAX_RATE
                    ),
                ));
            }
        },
    };
    let deliveries = number("--deliveries-per-user", &a.deliveries_per_user)?.unwrap_or(1);
    if !(1..=u64::from(crate::plan::MAX_DELIVERIES_PER_USER)).contains(&deliveries) {
        return Err(usage(
            "--deliveries-per-user",
            format!("1 to {}", crate::plan::MAX_DELIVERIES_PER_USER),
        ));
    }
    let max_days = crate::plan::MAX_HORIZON_MS / crate::model::DAY_MS;
    let horizon = match number("--horizon-days", &a.horizon_days)? {
        None => None,
        Some(d) if (1..=max_days as u64).contains(&d) => {
            Some(convert::duration(d as Millis * crate::model::DAY_MS))
        }
        Some(_) => return Err(usage("--horizon-days", format!("1 to {max_days}"))),
    };
    let category = match a.category.as_deref() {
        None => proto::Category::Unspecified,
        Some(c) => crate::model::Category::from_name(c)
            .and_then(|c| {
                proto::Category::from_str_name(&format!("CATEGORY_{}", c.name().to_uppercase()))
            })
            .ok_or_else(|| {
                usage(
                    "--category",
                    format!("{c:?}: one of marketing, utility, authentication, service"),
                )
            })?,
    };
    let start = a
        .start
        .as_deref()
        .map(|t| parse_time(t).map_err(|e| usage("--start", e)))
        .transpose()?;
    Ok(proto::PlanRequest {
        target: Some(proto_target(&a.target)),
        new_users,
        recipients,
        start: start.map(convert::timestamp),
        rate,
        category: category as i32,
        deliveries_per_user: deliveries as u32,
        with_upgrades: a.with_upgrades,
        horizon,
        at: None,
    })
}

#[derive(Serialize)]
struct PlanHourJson {
    start: Option<String>,
    sent: u64,
    new_users: u64,
    refused_limit: u64,
    refused_other: u64,
    freed: u64,
    used: u64,
    remaining: u64,
    limit: u64,
    tier: Option<&'static str>,
}

#[derive(Serialize)]
struct PlannedTierJson {
    tier: Option<&'static str>,
    at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_users: Option<u64>,
}

#[derive(Serialize)]
struct PlanJson<'a> {
    target: TargetJson<'a>,
    scope: &'static str,
    senders: &'a [String],
    now: Option<String>,
    start: Option<String>,
    rate: f64,
    completes_at: Option<String>,
    stalled: Option<&'a str>,
    users: u64,
    messages: u64,
    new_users: u64,
    free_users: u64,
    skipped_users: u64,
    used_at_start: u64,
    remaining_at_start: u64,
    hours: Vec<PlanHourJson>,
    upgrades: Vec<PlannedTierJson>,
    ladder: Vec<PlannedTierJson>,
    ladder_note: &'a str,
}

/// The chart of a plan's first 24 hours: occupancy at each hour's end, slots freed within it.
fn plan_chart(target: &proto::Target, p: &proto::PlanResponse) -> Chart {
    let limit = p.hours.first().map_or(0, |h| h.limit);
    Chart {
        title: format!(
            "plan for {} from {}: occupancy and slots freeing by hour",
            describe(target),
            time_or_dash(p.start.as_ref())
        ),
        limit,
        hours: p
            .hours
            .iter()
            .take(24)
            .map(|h| chart::Hour {
                start: h
                    .start
                    .as_ref()
                    .and_then(|t| convert::ms_from_timestamp("start", t).ok())
                    .unwrap_or_default(),
                used: h.used,
                freed: h.freed,
            })
            .collect(),
    }
}

/// The most hours the text output lists (`--json` has them all).
const PLAN_HOURS_SHOWN: usize = 48;

async fn plan(
    s: &mut Session,
    req: &proto::PlanRequest,
    args: &PlanArgs,
) -> Result<String, CliError> {
    let mut req = req.clone();
    req.at = s.at;
    let target = req.target.clone().unwrap_or_default();
    let p = s.admin.plan(req).await?.into_inner();
    let chart = plan_chart(&target, &p);
    if let Some(path) = &args.svg {
        write_svg(path, &chart)?;
    }
    let tier_json = |t: &proto::PlannedTier, ladder: bool| PlannedTierJson {
        tier: tier_opt(t.tier),
        at: time(t.at.as_ref()),
        new_users: ladder.then_some(t.new_users),
    };
    if s.json {
        return Ok(json_out(&PlanJson {
            target: target_json(&target),
            scope: scope_name(p.scope),
            senders: &p.senders,
            now: time(p.now.as_ref()),
            start: time(p.start.as_ref()),
            rate: p.rate,
            completes_at: time(p.completes_at.as_ref()),
            stalled: (!p.stalled.is_empty()).then_some(p.stalled.as_str()),
            users: p.users,
            messages: p.messages,
            new_users: p.new_users,
            free_users: p.free_users,
            skipped_users: p.skipped_users,
            used_at_start: p.used_at_start,
            remaining_at_start: p.remaining_at_start,
            hours: p
                .hours
                .iter()
                .map(|h| PlanHourJson {
                    start: time(h.start.as_ref()),
                    sent: h.sent,
                    new_users: h.new_users,
                    refused_limit: h.refused_limit,
                    refused_other: h.refused_other,
                    freed: h.freed,
                    used: h.used,
                    remaining: h.remaining,
                    limit: h.limit,
                    tier: tier_opt(h.tier),
                })
                .collect(),
            upgrades: p.upgrades.iter().map(|t| tier_json(t, false)).collect(),
            ladder: p.ladder.iter().map(|t| tier_json(t, true)).collect(),
            ladder_note: &p.ladder_note,
        }));
    }
    let tier_at = |t: &proto::PlannedTier| {
        format!(
            "{} at {}",
            tier_opt(t.tier).unwrap_or("?"),
            time_or_dash(t.at.as_ref())
        )
    };
    let least = p.hours.iter().min_by_key(|h| h.remaining);
    let unlimited = p.hours.first().is_some_and(|h| h.limit == 0);
    let mut rows = vec![
        ("target", describe(&target)),
        ("window", scope_name(p.scope).to_owned()),
        ("senders", p.senders.join(", ")),
        ("start", time_or_dash(p.start.as_ref())),
        ("rate", format!("{} messages/s", p.rate)),
        (
            "users",
            format!(
                "{} ({} new, {} free: already counted or in a service window, {} skipped)",
                p.users, p.new_users, p.free_users, p.skipped_users
            ),
        ),
        ("messages", p.messages.to_string()),
        (
            "completes at",
            match (&p.completes_at, p.stalled.as_str()) {
                (Some(t), _) => time_or_dash(Some(t)),
                (None, why) => format!("does not complete: {why}"),
            },
        ),
        (
            "window at start",
            format!(
                "{} used, {} remaining",
                p.used_at_start,
                count_or_unlimited(u64::from(!unlimited), p.remaining_at_start)
            ),
        ),
    ];
    if let Some(h) = least {
        rows.push((
            "capacity left",
            format!(
                "at least {} for other traffic (hour from {})",
                count_or_unlimited(h.limit, h.remaining),
                time_or_dash(h.start.as_ref())
            ),
        ));
    }
    rows.push((
        "upgrades",
        if p.upgrades.is_empty() {
            "none projected".into()
        } else {
            let list: Vec<String> = p.upgrades.iter().map(tier_at).collect();
            if args.with_upgrades {
                format!("{} (applied)", list.join(", "))
            } else {
                format!(
                    "{} (advisory: the plan keeps the tier in force; --with-upgrades applies it)",
                    list.join(", ")
                )
            }
        },
    ));
    let ladder: Vec<String> = p
        .ladder
        .iter()
        .map(|t| format!("{} new users → {}", t.new_users, tier_at(t)))
        .collect();
    rows.push((
        "fastest path up",
        match (ladder.is_empty(), p.ladder_note.is_empty()) {
            (true, _) => format!("- ({})", p.ladder_note),
            (false, true) => ladder.join("; "),
            (false, false) => format!("{}; then {}", ladder.join("; "), p.ladder_note),
        },
    ));
    let mut out = table(&rows);
    out.push_str("\nschedule by hour\n");
    let hours = p.hours.iter().take(PLAN_HOURS_SHOWN).map(|h| {
        vec![
            time_or_dash(h.start.as_ref()),
            h.sent.to_string(),
            h.new_users.to_string(),
            h.refused_limit.to_string(),
            h.freed.to_string(),
            h.used.to_string(),
            count_or_unlimited(h.limit, h.remaining),
            tier_opt(h.tier).unwrap_or("?").to_owned(),
        ]
    });
    out.push_str(&grid(
        Some(&[
            "HOUR FROM",
            "SENT",
            "NEW",
            "REFUSED LIMIT",
            "FREED",
            "USED",
            "REMAINING",
            "TIER",
        ]),
        hours,
        &[1, 2, 3, 4, 5, 6],
    ));
    if p.hours.len() > PLAN_HOURS_SHOWN {
        out.push_str(&format!(
            "… {} more hours (--json lists them all)\n",
            p.hours.len() - PLAN_HOURS_SHOWN
        ));
    }
    out.push('\n');
    out.push_str(&chart.terminal());
    Ok(out)
}

async fn health(s: &mut Session, service: String) -> Result<String, CliError> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let r = s
        .health
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
    let name = if service.is_empty() {
        "server"
    } else {
        &service
    };
    match status {
        ServingStatus::Serving => Ok(if s.json {
            json_out(&serde_json::json!({"service": service, "status": "SERVING"}))
        } else {
            format!("{name}: SERVING\n")
        }),
        other => Err(CliError::Failed(format!("{name}: {}", other.as_str_name()))),
    }
}

/// The next 24 hours of a live window, from its listing.
async fn window_chart(s: &mut Session, target: &proto::Target) -> Result<Chart, CliError> {
    let i = fetch_inspection(s, target, None).await?;
    let now = i
        .now
        .as_ref()
        .and_then(|t| convert::ms_from_timestamp("now", t).ok())
        .unwrap_or_default();
    let (entries, _) = fetch_window(s, target, 1000, String::new(), true).await?;
    let expiries: Vec<Millis> = entries
        .iter()
        .filter_map(|e| e.expires_at.as_ref())
        .filter_map(|t| convert::ms_from_timestamp("expires_at", t).ok())
        .collect();
    Ok(Chart {
        title: format!(
            "{} from {}: occupancy and slots freeing, next 24 hours",
            describe(target),
            rfc3339(now)
        ),
        limit: i.effective_limit,
        hours: chart::window_hours(now, &expiries, 24),
    })
}

fn write_svg(path: &std::path::Path, c: &Chart) -> Result<(), CliError> {
    std::fs::write(path, c.svg())
        .map_err(|e| CliError::Failed(format!("--svg {}: {e}", path.display())))
}

#[derive(Serialize)]
struct EntryJson {
    recipient: String,
    expires_at: Option<String>,
    sender: String,
}

#[derive(Serialize)]
struct WindowJson {
    entries: Vec<EntryJson>,
    next_page_token: Option<String>,
}

/// Window entries from `page_token` on: one page, or with `all` every page; and the next
/// page's token when one is left.
async fn fetch_window(
    s: &mut Session,
    target: &proto::Target,
    page_size: u32,
    mut page_token: String,
    all: bool,
) -> Result<(Vec<proto::WindowEntry>, Option<String>), CliError> {
    let mut entries = Vec::new();
    let next = loop {
        let page = s
            .admin
            .list_window(proto::ListWindowRequest {
                target: Some(target.clone()),
                page_size,
                page_token: page_token.clone(),
                at: s.at,
            })
            .await?
            .into_inner();
        entries.extend(page.entries);
        if !all || page.next_page_token.is_empty() {
            break (!page.next_page_token.is_empty()).then_some(page.next_page_token);
        }
        if page.next_page_token == page_token {
            return Err(CliError::Failed(format!(
                "the server returned the same page token twice ({page_token}): stopping"
            )));
        }
        page_token = page.next_page_token;
    };
    Ok((entries, next))
}

async fn list_window(
    s: &mut Session,
    target: &proto::Target,
    page_size: u32,
    page_token: String,
    all: bool,
) -> Result<String, CliError> {
    let (entries, next) = fetch_window(s, target, page_size, page_token, all).await?;
    if s.json {
        return Ok(json_out(&WindowJson {
            entries: entries
                .into_iter()
                .map(|e| EntryJson {
                    expires_at: time(e.expires_at.as_ref()),
                    recipient: e.recipient,
                    sender: e.sender,
                })
                .collect(),
            next_page_token: next,
        }));
    }
    let mut out = String::new();
    if entries.is_empty() {
        out.push_str(&format!(
            "no recipient holds a slot of {}\n",
            describe(target)
        ));
    } else {
        let rows = entries.iter().map(|e| {
            vec![
                e.recipient.clone(),
                time_or_dash(e.expires_at.as_ref()),
                e.sender.clone(),
            ]
        });
        out.push_str(&grid(
            Some(&["RECIPIENT", "EXPIRES AT", "SENDER"]),
            rows,
            &[],
        ));
    }
    if let Some(token) = next {
        out.push_str(&format!("next page: --page-token {token}\n"));
    }
    Ok(out)
}

#[derive(Serialize)]
struct PolicyOutJson<'a> {
    target: TargetJson<'a>,
    scope: &'static str,
    portfolio: Option<String>,
    /// The policy of the deciding window (the portfolio's for a sender assigned to one).
    policy: PolicyJson,
    /// For a sender: its own policy, which `policy set` changes.
    sender_policy: Option<PolicyJson>,
    limit: u64,
    effective_limit: u64,
    unlimited: bool,
}

async fn policy_get(s: &mut Session, target: &proto::Target) -> Result<String, CliError> {
    let i = fetch_inspection(s, target, None).await?;
    let policy = read_policy(i.policy.as_ref(), target)?;
    let own = match &i.sender_policy {
        Some(p) => Some(read_policy(Some(p), target)?),
        None => None,
    };
    let portfolio = (!i.portfolio.is_empty()).then(|| i.portfolio.clone());
    if s.json {
        return Ok(json_out(&PolicyOutJson {
            target: target_json(target),
            scope: scope_name(i.scope),
            portfolio,
            policy: policy_json(&policy),
            sender_policy: own.as_ref().map(policy_json),
            limit: i.limit,
            effective_limit: i.effective_limit,
            unlimited: i.limit == 0,
        }));
    }
    let is_portfolio = matches!(target.target, Some(target::Target::Portfolio(_)));
    let mut rows = vec![("target", describe(target))];
    if !is_portfolio {
        rows.push(("portfolio", or_dash(&i.portfolio)));
    }
    let decided_by = match &portfolio {
        Some(p) => format!("portfolio {p} (the sender is assigned to it)"),
        None => describe(target),
    };
    rows.push(("decided by", decided_by));
    rows.extend(policy_rows(&policy));
    rows.push(("limit", count_or_unlimited(i.limit, i.limit)));
    rows.push((
        "effective limit",
        count_or_unlimited(i.limit, i.effective_limit),
    ));
    let mut out = table(&rows);
    // The sender's own policy, when it is not the one shown: it is in a portfolio, or a
    // projected tier change (auto_tier) is shown applied above but not stored yet.
    if let Some(own) = own.filter(|own| *own != policy) {
        let header = if portfolio.is_some() {
            "its status, rates and caps apply; the rest applies once it is detached"
        } else {
            "as stored; above, the projected tier change is applied"
        };
        out.push_str(&format!(
            "\nown policy of {} ({header}):\n",
            describe(target)
        ));
        out.push_str(&table(&policy_rows(&own)));
    }
    Ok(out)
}

async fn policy_set(
    s: &mut Session,
    target: &proto::Target,
    changes: &Changes,
) -> Result<String, CliError> {
    // PutPolicy stores a whole policy: start from the current one, so that what is not given
    // keeps its value.
    let current = fetch_inspection(s, target, None).await?;
    let own = matches!(target.target, Some(target::Target::Portfolio(_)))
        || current.scope == proto::Scope::Sender as i32;
    let base = match target.target {
        Some(target::Target::Portfolio(_)) => current.policy.as_ref(),
        // A sender's own policy, even while a portfolio's window decides for it.
        _ => current.sender_policy.as_ref(),
    };
    let policy = changes.apply(read_policy(base, target)?);
    let stored = s
        .admin
        .put_policy(proto::PutPolicyRequest {
            target: Some(target.clone()),
            policy: Some(convert::policy_to_proto(&policy)),
            at: s.at,
        })
        .await?
        .into_inner();
    let policy = read_policy(stored.policy.as_ref(), target)?;
    if s.json {
        #[derive(Serialize)]
        struct Stored<'a> {
            target: TargetJson<'a>,
            policy: PolicyJson,
        }
        return Ok(json_out(&Stored {
            target: target_json(target),
            policy: policy_json(&policy),
        }));
    }
    let mut rows = vec![("target", describe(target))];
    rows.extend(policy_rows(&policy));
    let mut out = table(&rows);
    if !own {
        out.push_str(&format!(
            "note: {} is assigned to portfolio {}, whose policy decides its window (tier, limit, mode, headroom, rule set, auto tier) while it stays assigned\n",
            describe(target),
            current.portfolio
        ));
    }
    Ok(out)
}

async fn assign(
    s: &mut Session,
    sender: String,
    portfolio: Option<String>,
    create: bool,
) -> Result<String, CliError> {
    s.admin
        .assign_sender(proto::AssignSenderRequest {
            sender: sender.clone(),
            portfolio: portfolio.clone().unwrap_or_default(),
            at: s.at,
            create,
        })
        .await?;
    if s.json {
        #[derive(Serialize)]
        struct Assigned {
            sender: String,
            portfolio: Option<String>,
        }
        return Ok(json_out(&Assigned { sender, portfolio }));
    }
    Ok(match portfolio {
        Some(p) => format!("sender {sender} assigned to portfolio {p}\n"),
        None => format!("sender {sender} detached: it has its own window again\n"),
    })
}

async fn reset(s: &mut Session, target: &proto::Target, yes: bool) -> Result<String, CliError> {
    if !yes {
        let i = fetch_inspection(s, target, None).await?;
        let id = target_id(target);
        // Not eprint!: a closed stderr must not panic. The answer decides, not the prompt.
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "Reset {}? This clears its window: {} slot(s) held now.\nType the {} id ({id}) to confirm: ",
            describe(target),
            i.used,
            if matches!(target.target, Some(target::Target::Portfolio(_))) {
                "portfolio"
            } else {
                "sender"
            },
        );
        let _ = err.flush();
        drop(err);
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| CliError::Failed(format!("cannot read the confirmation: {e}")))?;
        if answer.trim() != id {
            return Err(CliError::Failed(format!(
                "reset cancelled: {:?} is not {id:?}",
                answer.trim()
            )));
        }
    }
    s.admin
        .reset(proto::ResetRequest {
            target: Some(target.clone()),
            at: s.at,
        })
        .await?;
    if s.json {
        #[derive(Serialize)]
        struct Reset<'a> {
            reset: TargetJson<'a>,
        }
        return Ok(json_out(&Reset {
            reset: target_json(target),
        }));
    }
    Ok(format!("{}: window cleared\n", describe(target)))
}

/// Signs and posts a saved webhook body; the answer's status and body.
async fn replay(file: &std::path::Path, secret: &str, url: &str) -> Result<String, CliError> {
    use http_body_util::BodyExt;
    let body = std::fs::read(file)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| CliError::Usage(format!("--url {url:?}: {e}")))?;
    let req = hyper::Request::post(uri)
        .header("content-type", "application/json")
        .header(
            "x-hub-signature-256",
            crate::webhook::signature(&body, secret),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| CliError::Usage(format!("--url {url:?}: {e}")))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(req)
        .await
        .map_err(|e| CliError::Failed(format!("cannot reach {url}: {e}")))?;
    let status = resp.status();
    let text = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if !status.is_success() {
        return Err(CliError::Failed(format!(
            "{url} answered {status}: {}",
            text.trim()
        )));
    }
    Ok(format!("{status}: {}\n", text.trim()))
}

async fn assign_waba(s: &mut Session, waba: String, portfolio: String) -> Result<String, CliError> {
    s.admin
        .assign_waba(proto::AssignWabaRequest {
            waba: waba.clone(),
            portfolio: portfolio.clone(),
        })
        .await?;
    if s.json {
        #[derive(Serialize)]
        struct Assigned {
            waba: String,
            portfolio: Option<String>,
        }
        return Ok(json_out(&Assigned {
            waba,
            portfolio: (!portfolio.is_empty()).then_some(portfolio),
        }));
    }
    Ok(if portfolio.is_empty() {
        format!("WABA {waba}: detached from its portfolio\n")
    } else {
        format!("WABA {waba}: portfolio {portfolio}\n")
    })
}

async fn accept_loss(s: &mut Session) -> Result<String, CliError> {
    let r = s
        .admin
        .accept_ledger_loss(proto::AcceptLedgerLossRequest {})
        .await?
        .into_inner();
    let since = r
        .lost_since
        .as_ref()
        .map(|t| rfc3339(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000));
    if s.json {
        #[derive(Serialize)]
        struct Accepted {
            was_lost: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            lost_since: Option<String>,
        }
        return Ok(json_out(&Accepted {
            was_lost: r.was_lost,
            lost_since: since,
        }));
    }
    Ok(match since {
        Some(t) => format!("ledger loss (since {t}) accepted: new slots are admitted again\n"),
        None => "the ledger was not lost: nothing to accept\n".into(),
    })
}

// ------------------------------------------------------------------------------ time

fn epoch() -> jiff::civil::DateTime {
    jiff::civil::date(1970, 1, 1).at(0, 0, 0, 0)
}

/// Unix milliseconds as RFC 3339 in UTC: `2026-03-02T12:00:00Z`, with `.mmm` when not whole.
/// Civil time, not `jiff::Timestamp`, whose range stops a day short of the year 9999's end;
/// beyond the years -9999 to 9999 (no real time) the milliseconds are printed as they are.
pub fn rfc3339(ms: Millis) -> String {
    match epoch().checked_add(jiff::SignedDuration::from_millis(ms)) {
        Ok(t) if ms % 1000 == 0 => format!("{t:.0}Z"),
        Ok(t) => format!("{t:.3}Z"),
        Err(_) => ms.to_string(),
    }
}

/// Parses RFC 3339 (`2026-03-02T12:00:00Z`, or a `±HH:MM` offset instead of `Z`) or unix
/// milliseconds; fractions beyond milliseconds are cut.
pub fn parse_time(s: &str) -> Result<Millis, String> {
    use jiff::fmt::temporal::{Pieces, PiecesOffset};
    let bad =
        || format!("{s:?} is not a time: use RFC 3339 (2026-03-02T12:00:00Z) or unix milliseconds");
    if !s.is_empty()
        && s.trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return s.parse().map_err(|_| bad());
    }
    let p = Pieces::parse(s).map_err(|_| bad())?;
    let offset = match (p.time(), p.offset()) {
        (Some(_), Some(PiecesOffset::Zulu)) => jiff::tz::Offset::UTC,
        (Some(_), Some(PiecesOffset::Numeric(n))) => n.offset(),
        _ => return Err(bad()),
    };
    let local = p.date().to_datetime(p.time().unwrap_or_default());
    let since_epoch = local.duration_since(epoch()) - offset.duration_since(jiff::tz::Offset::UTC);
    Millis::try_from(since_epoch.as_nanos().div_euclid(1_000_000)).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_772_409_600_000), "2026-03-02T00:00:00Z");
        assert_eq!(rfc3339(1_772_452_800_123), "2026-03-02T12:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(253_402_300_799_000), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn parse_time_reads_rfc3339_and_millis() {
        assert_eq!(parse_time("2026-03-02T12:00:00Z"), Ok(1_772_452_800_000));
        assert_eq!(
            parse_time("2026-03-02T12:00:00.123Z"),
            Ok(1_772_452_800_123)
        );
        assert_eq!(
            parse_time("2026-03-02T12:00:00.1234567Z"),
            Ok(1_772_452_800_123)
        );
        assert_eq!(parse_time("2026-03-02T12:00:00.5Z"), Ok(1_772_452_800_500));
        assert_eq!(
            parse_time("2026-03-02T14:00:00+02:00"),
            Ok(1_772_452_800_000)
        );
        assert_eq!(parse_time("1772452800000"), Ok(1_772_452_800_000));
        assert_eq!(parse_time("-5"), Ok(-5));
        for bad in [
            "",
            "2026-03-02",
            "2026-03-02T12:00:00",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-03-02T24:00:00Z",
            "2026-03-02T12:00:00.Z",
            "2026-03-02T12:00:00+2:00",
            "yesterday",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn formatting_and_parsing_round_trip() {
        for ms in [0, 1, 999, 1_772_452_800_123, -86_400_001, 4_102_444_800_000] {
            assert_eq!(parse_time(&rfc3339(ms)), Ok(ms), "{}", rfc3339(ms));
        }
    }

    #[test]
    fn status_errors_are_one_line() {
        let e = CliError::from(Status::invalid_argument(
            "target.sender:\n must not be empty",
        ));
        assert_eq!(
            e.message(),
            "INVALID_ARGUMENT: target.sender: must not be empty"
        );
        assert_eq!(e.exit_code(), 1);
    }
}
