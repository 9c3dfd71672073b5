//! The operator commands of the `waquota` binary: a gRPC client of `AdminService` that prints
//! tables for people and JSON for scripts.
//!
//! Every failure becomes one line on stderr and an exit code: 2 for a usage error (bad
//! arguments, a confirmation that cannot be asked for), 1 for an error from the connection or
//! the server. Times print as RFC 3339 in UTC; `--at` takes the same form or unix milliseconds.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use crate::grpc::convert;
use crate::model::{Millis, Tier, WindowMode};
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
    },
    /// List the recipients that hold a slot.
    #[command(subcommand)]
    Window(WindowCommand),
    /// Read or change a policy (tier, custom limit, window mode).
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
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum WindowCommand {
    /// The recipients holding a slot, earliest expiry first.
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
    /// The policy of the window that decides for the target.
    Get {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Store a policy; what is not given keeps its current value.
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
    Set {
        #[command(flatten)]
        target: TargetArgs,
        /// 50, 250, 1k, 2k, 10k, 100k or unlimited.
        #[arg(long, group = "change")]
        tier: Option<Tier>,
        /// A limit that overrides the tier's (0 = use the tier).
        #[arg(long, value_name = "N", group = "change")]
        custom_limit: Option<u64>,
        /// conversation (slot fixed at first delivery) or rolling (extended by each delivery).
        #[arg(long, group = "change")]
        mode: Option<WindowMode>,
    },
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum SenderCommand {
    /// Share a portfolio's window: the sender is limited by the portfolio from now on.
    Assign {
        sender: String,
        #[arg(long, value_name = "ID")]
        portfolio: String,
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
    let mut s = connect(args).await?;
    let out = match command {
        Command::Inspect { target, recipient } => {
            inspect(&mut s, &proto_target(&target), recipient).await?
        }
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
        Command::Policy(PolicyCommand::Set {
            target,
            tier,
            custom_limit,
            mode,
        }) => policy_set(&mut s, &proto_target(&target), tier, custom_limit, mode).await?,
        Command::Sender(SenderCommand::Assign { sender, portfolio }) => {
            assign(&mut s, sender, Some(portfolio)).await?
        }
        Command::Sender(SenderCommand::Detach { sender }) => assign(&mut s, sender, None).await?,
        Command::Reset { target, yes } => reset(&mut s, &proto_target(&target), yes).await?,
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    Ok(())
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

/// Two aligned columns.
fn table(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

fn tier_name(t: i32) -> String {
    proto::Tier::try_from(t)
        .ok()
        .and_then(convert::tier_from_proto)
        .map(|t| t.name().to_owned())
        .unwrap_or_else(|| "default".into())
}

fn mode_name(m: i32) -> String {
    proto::WindowMode::try_from(m)
        .ok()
        .and_then(convert::mode_from_proto)
        .map(|m| m.name().to_owned())
        .unwrap_or_else(|| "default".into())
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

#[derive(Serialize)]
struct PolicyJson {
    tier: String,
    custom_limit: u64,
    mode: String,
}

fn policy_json(p: Option<&proto::Policy>) -> PolicyJson {
    let p = p.cloned().unwrap_or_default();
    PolicyJson {
        tier: tier_name(p.tier),
        custom_limit: p.custom_limit,
        mode: mode_name(p.window_mode),
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
struct InspectJson<'a> {
    target: TargetJson<'a>,
    now: Option<String>,
    scope: &'static str,
    portfolio: Option<String>,
    senders: Vec<String>,
    policy: PolicyJson,
    /// 0 = unlimited, as on the wire.
    limit: u64,
    unlimited: bool,
    used: u64,
    remaining: u64,
    next_slot_free_at: Option<String>,
    slots_freeing_next_hour: u64,
    open_service_windows: u64,
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
    let policy = policy_json(i.policy.as_ref());
    if s.json {
        return Ok(json_out(&InspectJson {
            target: target_json(target),
            now: time(i.now.as_ref()),
            scope: scope_name(i.scope),
            portfolio: (!i.portfolio.is_empty()).then(|| i.portfolio.clone()),
            senders: i.senders.clone(),
            policy,
            limit: i.limit,
            unlimited,
            used: i.used,
            remaining: i.remaining,
            next_slot_free_at: time(i.next_slot_free_at.as_ref()),
            slots_freeing_next_hour: i.slots_freeing_next_hour,
            open_service_windows: i.open_service_windows,
            recipient: asked_recipient.then(|| RecipientJson {
                id: i.recipient.clone(),
                counted_until: time(i.counted_until.as_ref()),
                service_window_until: time(i.service_window_until.as_ref()),
            }),
        }));
    }
    let is_portfolio = matches!(target.target, Some(target::Target::Portfolio(_)));
    let unlimited_or = |n: u64| {
        if unlimited {
            "unlimited".to_owned()
        } else {
            n.to_string()
        }
    };
    let mut rows = vec![("target", describe(target))];
    if is_portfolio {
        rows.push(("senders", or_dash(&i.senders.join(", "))));
    } else {
        rows.push(("portfolio", or_dash(&i.portfolio)));
    }
    rows.push(("scope", scope_name(i.scope).to_owned()));
    rows.push(("tier", policy.tier));
    if policy.custom_limit > 0 {
        rows.push(("custom limit", policy.custom_limit.to_string()));
    }
    rows.extend([
        ("mode", policy.mode),
        ("limit", unlimited_or(i.limit)),
        ("used", i.used.to_string()),
        ("remaining", unlimited_or(i.remaining)),
        (
            "next slot free at",
            time_or_dash(i.next_slot_free_at.as_ref()),
        ),
        (
            "slots freeing next hour",
            i.slots_freeing_next_hour.to_string(),
        ),
        ("open service windows", i.open_service_windows.to_string()),
    ]);
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

async fn list_window(
    s: &mut Session,
    target: &proto::Target,
    page_size: u32,
    mut page_token: String,
    all: bool,
) -> Result<String, CliError> {
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
        let rows: Vec<[String; 3]> = entries
            .iter()
            .map(|e| {
                [
                    e.recipient.clone(),
                    time_or_dash(e.expires_at.as_ref()),
                    e.sender.clone(),
                ]
            })
            .collect();
        let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(9);
        let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(10);
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  SENDER\n",
            "RECIPIENT", "EXPIRES AT"
        ));
        for [r, t, snd] in rows {
            out.push_str(&format!("{r:<w0$}  {t:<w1$}  {snd}\n"));
        }
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
    policy: PolicyJson,
    limit: u64,
    unlimited: bool,
}

fn policy_rows(target: &proto::Target, p: &PolicyJson) -> Vec<(&'static str, String)> {
    let custom = if p.custom_limit == 0 {
        "- (the tier's)".to_owned()
    } else {
        p.custom_limit.to_string()
    };
    vec![
        ("target", describe(target)),
        ("tier", p.tier.clone()),
        ("custom limit", custom),
        ("mode", p.mode.clone()),
    ]
}

async fn policy_get(s: &mut Session, target: &proto::Target) -> Result<String, CliError> {
    let i = fetch_inspection(s, target, None).await?;
    let policy = policy_json(i.policy.as_ref());
    let portfolio = (!i.portfolio.is_empty()).then(|| i.portfolio.clone());
    if s.json {
        return Ok(json_out(&PolicyOutJson {
            target: target_json(target),
            scope: scope_name(i.scope),
            portfolio,
            policy,
            limit: i.limit,
            unlimited: i.limit == 0,
        }));
    }
    let mut rows = policy_rows(target, &policy);
    let decided_by = match &portfolio {
        Some(p) => format!("portfolio {p} (the sender is assigned to it)"),
        None => describe(target),
    };
    rows.push(("decided by", decided_by));
    rows.push((
        "limit",
        if i.limit == 0 {
            "unlimited".into()
        } else {
            i.limit.to_string()
        },
    ));
    Ok(table(&rows))
}

async fn policy_set(
    s: &mut Session,
    target: &proto::Target,
    tier: Option<Tier>,
    custom_limit: Option<u64>,
    mode: Option<WindowMode>,
) -> Result<String, CliError> {
    // PutPolicy stores a whole policy: start from the current one, so that what is not given
    // keeps its value.
    let current = fetch_inspection(s, target, None).await?;
    let own = matches!(target.target, Some(target::Target::Portfolio(_)))
        || current.scope == proto::Scope::Sender as i32;
    let base = match target.target {
        Some(target::Target::Portfolio(_)) => current.policy,
        // A sender's own policy, even while a portfolio's window decides for it.
        _ => current.sender_policy,
    }
    .unwrap_or_default();
    let policy = proto::Policy {
        tier: tier.map_or(base.tier, |t| convert::tier_to_proto(t) as i32),
        custom_limit: custom_limit.unwrap_or(base.custom_limit),
        window_mode: mode.map_or(base.window_mode, |m| convert::mode_to_proto(m) as i32),
        ..base
    };
    let stored = s
        .admin
        .put_policy(proto::PutPolicyRequest {
            target: Some(target.clone()),
            policy: Some(policy),
            at: s.at,
        })
        .await?
        .into_inner();
    let policy = policy_json(stored.policy.as_ref());
    if s.json {
        #[derive(Serialize)]
        struct Stored<'a> {
            target: TargetJson<'a>,
            policy: PolicyJson,
        }
        return Ok(json_out(&Stored {
            target: target_json(target),
            policy,
        }));
    }
    let mut out = table(&policy_rows(target, &policy));
    if !own {
        out.push_str(&format!(
            "note: {} is assigned to portfolio {}, whose window policy (tier, limit, mode) decides while it stays assigned\n",
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
) -> Result<String, CliError> {
    s.admin
        .assign_sender(proto::AssignSenderRequest {
            sender: sender.clone(),
            portfolio: portfolio.clone().unwrap_or_default(),
            at: s.at,
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
        eprint!(
            "Reset {}? This clears its window: {} slot(s) held now.\nType the {} id ({id}) to confirm: ",
            describe(target),
            i.used,
            if matches!(target.target, Some(target::Target::Portfolio(_))) {
                "portfolio"
            } else {
                "sender"
            },
        );
        let _ = std::io::stderr().flush();
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

// ------------------------------------------------------------------------------ time

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) → days since 1970-01-01; the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix milliseconds as RFC 3339 in UTC: `2026-03-02T12:00:00Z`, with `.mmm` when not whole.
pub fn rfc3339(ms: Millis) -> String {
    let days = ms.div_euclid(86_400_000);
    let rest = ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, frac) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    if frac == 0 {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:03}Z")
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff…]Z` (or a `±HH:MM` offset instead of `Z`) or unix
/// milliseconds; fractions beyond milliseconds are cut.
pub fn parse_time(s: &str) -> Result<Millis, String> {
    let bad =
        || format!("{s:?} is not a time: use RFC 3339 (2026-03-02T12:00:00Z) or unix milliseconds");
    if !s.is_empty()
        && s.trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
    {
        return s.parse().map_err(|_| bad());
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(r).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse().map_err(|_| bad())
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac_ms = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().map_err(|_| bad())? * 10_i64.pow(3 - digits.len() as u32);
    }
    let offset_ms = match &s[i..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6
            && matches!(tz.as_bytes()[0], b'+' | b'-')
            && tz.as_bytes()[3] == b':' =>
        {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3_600_000 + om * 60_000)
        }
        _ => return Err(bad()),
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > month_days[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 59
    {
        return Err(bad());
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok(days * 86_400_000 + h * 3_600_000 + mi * 60_000 + sec * 1000 + frac_ms - offset_ms)
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
        for day in -800_000..800_000 {
            if day % 997 == 0 {
                let (y, m, d) = civil_from_days(day);
                assert_eq!(days_from_civil(y, m, d), day);
            }
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
