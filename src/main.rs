//! The `waquota` binary: `serve` runs the service, `config check` validates settings, and the
//! operator commands (`inspect`, `window`, `policy`, `sender`, `reset`) talk to a running server.

use std::{path::PathBuf, process::ExitCode};

use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use waquota::cli::{self, ClientArgs};
use waquota::config::{LogFormat, Overrides, SETTINGS, Settings, Sources};

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

/// Every server setting as a flag, from `config::SETTINGS`; a flag beats the environment,
/// which beats the file.
struct SettingsArgs {
    config: Option<PathBuf>,
    /// Each flag given, by its name, with its values joined by commas.
    flags: Vec<(&'static str, String)>,
}

impl clap::FromArgMatches for SettingsArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let flags = SETTINGS
            .iter()
            .filter_map(|s| {
                let values: Vec<&str> = m.get_many::<String>(s.flag)?.map(String::as_str).collect();
                Some((s.flag, values.join(",")))
            })
            .collect();
        Ok(SettingsArgs {
            config: m.get_one::<PathBuf>("config").cloned(),
            flags,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for SettingsArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let config = Arg::new("config")
            .long("config")
            .env("WAQUOTA_CONFIG")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help("TOML configuration file (between the built-in defaults and the environment)");
        waquota::config::clap_args(cmd.arg(config))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl SettingsArgs {
    fn load(&self) -> Result<(Settings, Sources), String> {
        let flags = self.flags.iter().map(|(f, v)| (*f, v.as_str()));
        Overrides::flags(flags)
            .and_then(|flags| {
                Settings::load_with_sources(self.config.as_deref(), std::env::vars(), flags)
            })
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
        Ok((s, _)) => s,
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
    let (settings, sources) = match args.load() {
        Ok((s, sources)) => (s.redacted(), sources),
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
            settings.to_toml_with_sources(&sources)
        )
    };
    // Not println!: a reader that stopped (`waquota config check | head -1`) must not panic.
    match cli::write_stdout(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), e.message()),
    }
}

/// The operator options (`cli::ClientArgs`, global so they may come before or after an
/// operator command) that `serve` does not use; `config check` uses only `--json`.
const OPERATOR_OPTIONS: [&str; 7] = [
    "addr",
    "token",
    "ca_cert",
    "client_cert",
    "client_key",
    "at",
    "json",
];

/// The command line's grammar, with the operator options hidden from the help of the server's
/// commands. They are global, so clap would give them to every subcommand; a subcommand that
/// has an argument of the same id keeps its own, so those get hidden copies.
fn command() -> clap::Command {
    let operator: Vec<Arg> =
        <ClientArgs as clap::Args>::augment_args(clap::Command::new("operator"))
            .get_arguments()
            .cloned()
            .collect();
    let hide = |keep: &'static [&'static str]| {
        let operator = operator.clone();
        move |mut cmd: clap::Command| {
            for a in operator
                .iter()
                .filter(|a| !keep.contains(&a.get_id().as_str()))
            {
                cmd = cmd.arg(a.clone().global(false).hide(true));
            }
            cmd
        }
    };
    Cli::command()
        .mut_subcommand("serve", hide(&[]))
        .mut_subcommand("config", |c| c.mut_subcommand("check", hide(&["json"])))
}

/// An operator option given on the command line of a command that does not use it.
fn unused_operator_option(m: &ArgMatches) -> Option<String> {
    let (name, sub) = m.subcommand()?;
    let (sub, keep): (&ArgMatches, &[&str]) = match name {
        "serve" => (sub, &[]),
        "config" => (sub.subcommand()?.1, &["json"]),
        _ => return None,
    };
    let given = OPERATOR_OPTIONS.iter().copied().find(|id| {
        !keep.contains(id) && sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    })?;
    Some(format!(
        "--{} is an operator option: {name} does not use it",
        given.replace('_', "-")
    ))
}

/// A clap error as every other error of this binary: one `waquota: …` line, exit code 2. Help
/// and version are printed as clap writes them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(e.exit_code() as u8);
    }
    let text = e.render().to_string();
    let mut line = String::new();
    for part in text.lines().map(str::trim).filter(|l| {
        !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
    }) {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part.strip_prefix("error: ").unwrap_or(part));
    }
    fail(2, &line)
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage_error(e),
    };
    if let Some(message) = unused_operator_option(&matches) {
        return fail(2, &message);
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
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
