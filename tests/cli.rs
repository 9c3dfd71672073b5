//! The operator commands of the real `waquota` binary against a real server, on both ledgers.
//!
//! The server trusts the client clock and every command passes `--at`, so nothing depends on
//! the time the tests run at.

mod common;

use std::process::{Command, Output, Stdio};

use common::certs::TestCerts;
use common::dsl::{self, Quota};
use common::{Backend, D, DAY, HOUR, TestServer, WaquotaProcess, at};
use serde_json::Value;
use waquota::cli::rfc3339;

/// Runs the binary with `args` (stdin closed: never a terminal).
async fn waquota(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_waquota"))
            .args(&args)
            .env_remove("WAQUOTA_ADDR")
            .env_remove("WAQUOTA_TOKEN")
            .output()
            .expect("run waquota")
    })
    .await
    .unwrap()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "stderr: {}", self.stderr);
        &self.stdout
    }

    /// A failure: the exit code, and exactly one line on stderr, which is returned.
    fn failed(&self, code: i32) -> &str {
        assert_eq!(
            self.code, code,
            "stdout: {} stderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "one line on stderr: {:?}",
            self.stderr
        );
        self.stderr.trim_end()
    }
}

/// `waquota --addr <server> --at <at_ms> <args…>`
async fn cli(server: &TestServer, at_ms: i64, args: &[&str]) -> Run {
    let mut all = vec![
        "--addr".to_owned(),
        server.endpoint(),
        "--at".to_owned(),
        rfc3339(at_ms),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    let out = waquota(all).await;
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn raw(args: &[&str]) -> Run {
    let out = waquota(args.iter().map(|s| s.to_string()).collect()).await;
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The value of a row of a two-column table.
fn row<'a>(table: &'a str, key: &str) -> &'a str {
    table
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .filter(|rest| rest.starts_with("  "))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no row {key:?} in\n{table}"))
}

const NOON: i64 = D + 12 * HOUR;

/// Three recipients get a slot from sender `s1`, at 12:00, 12:01 and 12:02 on day D.
async fn three_slots(q: &mut Quota) {
    for (i, r) in ["4915100000001", "4915100000002", "4915100000003"]
        .iter()
        .enumerate()
    {
        let a = dsl::acquire(q, "s1", r, at(12, i as i64, 0, 0)).await;
        assert!(a.allowed);
    }
}

macro_rules! on_both_ledgers {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Redis).await;
                }
            )*
        }
    };
}

on_both_ledgers!(
    inspect_prints_a_table_and_json,
    inspect_a_recipient_and_a_portfolio,
    window_list_pages_and_lists_all,
    policy_set_changes_only_what_is_given,
    sender_assign_and_detach,
    reset_needs_confirmation_and_then_clears,
    server_errors_are_one_line_with_the_status_code,
    inspect_shows_status_effective_limit_and_projection,
    inspect_shows_an_upgrade_projection_and_the_portfolio_status,
    policy_set_keeps_every_field_not_given,
    policy_get_shows_the_portfolio_policy_and_the_sender_own,
    a_closed_stdout_is_not_a_panic,
);

async fn inspect_prints_a_table_and_json(backend: Backend) {
    let server = TestServer::start(backend).await;
    three_slots(&mut server.quota().await).await;

    let j = cli(&server, NOON + HOUR, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["limit"], 250);
    assert_eq!(j["used"], 3);
    assert_eq!(j["remaining"], 247);
    assert_eq!(j["unlimited"], false);
    assert_eq!(j["scope"], "sender");
    assert_eq!(j["target"]["sender"], "s1");
    assert_eq!(j["policy"]["tier"], "250");
    assert_eq!(j["policy"]["mode"], "conversation");
    assert_eq!(j["portfolio"], Value::Null);
    assert_eq!(j["next_slot_free_at"], rfc3339(NOON + DAY));
    assert_eq!(j["slots_freeing_next_hour"], 0);
    assert_eq!(j["now"], "2026-03-02T13:00:00Z");
    assert!(j.get("recipient").is_none(), "{j}");

    // Half an hour before the first slot frees, all three free within the hour.
    let j = cli(&server, NOON + DAY - HOUR / 2, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["slots_freeing_next_hour"], 3);

    let t = cli(&server, NOON + HOUR, &["inspect", "s1"]).await;
    let t = t.ok();
    println!("{t}");
    assert_eq!(row(t, "target"), "sender s1");
    assert_eq!(row(t, "limit"), "250");
    assert_eq!(row(t, "used"), "3");
    assert_eq!(row(t, "remaining"), "247");
    assert_eq!(row(t, "tier"), "250");
    assert_eq!(row(t, "mode"), "conversation");
    assert_eq!(row(t, "scope"), "sender");
    assert_eq!(row(t, "portfolio"), "-");
    assert_eq!(row(t, "next slot free at"), "2026-03-03T12:00:00Z");
    assert_eq!(row(t, "open service windows"), "0");

    // A sender never seen: nothing used, the default policy, no slot to free.
    let t = cli(&server, NOON, &["inspect", "nobody"]).await;
    assert_eq!(row(t.ok(), "used"), "0");
    assert_eq!(row(t.ok(), "next slot free at"), "-");

    // Unlimited shows as such, in the table and in JSON.
    cli(
        &server,
        NOON,
        &["policy", "set", "big", "--tier", "unlimited"],
    )
    .await
    .ok();
    let t = cli(&server, NOON, &["inspect", "big"]).await;
    assert_eq!(row(t.ok(), "limit"), "unlimited");
    assert_eq!(row(t.ok(), "remaining"), "unlimited");
    let j = cli(&server, NOON, &["inspect", "big", "--json"])
        .await
        .json();
    assert_eq!(
        (j["limit"].as_u64(), &j["unlimited"]),
        (Some(0), &Value::Bool(true))
    );
}

async fn inspect_a_recipient_and_a_portfolio(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut q = server.quota().await;
    three_slots(&mut q).await;
    dsl::inbound(&mut q, "s1", "4915100000009", at(12, 30, 0, 0)).await;

    let args = [
        "inspect",
        "s1",
        "--recipient",
        "+49 151 0000-0002",
        "--json",
    ];
    let j = cli(&server, NOON + HOUR, &args).await.json();
    assert_eq!(j["recipient"]["id"], "4915100000002", "normalised");
    assert_eq!(j["recipient"]["counted_until"], "2026-03-03T12:01:00Z");
    assert_eq!(j["recipient"]["service_window_until"], Value::Null);
    assert_eq!(j["open_service_windows"], 1);

    let t = cli(
        &server,
        NOON + HOUR,
        &["inspect", "s1", "--recipient", "4915100000009"],
    )
    .await;
    let t = t.ok();
    assert_eq!(row(t, "recipient"), "4915100000009");
    assert_eq!(row(t, "counted until"), "-");
    assert_eq!(row(t, "service window until"), "2026-03-03T12:30:00Z");

    cli(
        &server,
        NOON,
        &["sender", "assign", "s2", "--portfolio", "p1", "--create"],
    )
    .await
    .ok();
    dsl::acquire(&mut q, "s2", "4915100000001", at(13, 0, 0, 0)).await;
    let j = cli(
        &server,
        NOON + HOUR,
        &["inspect", "--portfolio", "p1", "--json"],
    )
    .await
    .json();
    assert_eq!(j["target"]["portfolio"], "p1");
    assert_eq!(j["scope"], "portfolio");
    assert_eq!(j["senders"], serde_json::json!(["s2"]));
    assert_eq!(j["policy"]["mode"], "rolling");
    assert_eq!(j["used"], 1);
    let t = cli(&server, NOON + HOUR, &["inspect", "--portfolio", "p1"]).await;
    assert_eq!(row(t.ok(), "senders"), "s2");
    assert_eq!(row(t.ok(), "target"), "portfolio p1");
}

async fn window_list_pages_and_lists_all(backend: Backend) {
    let server = TestServer::start(backend).await;
    three_slots(&mut server.quota().await).await;
    let now = NOON + HOUR;

    let j = cli(&server, now, &["window", "list", "s1", "--json"])
        .await
        .json();
    let entries = j["entries"].as_array().unwrap();
    // In listing order (docs/contract.md, "Listing a window").
    let mut order = ["4915100000001", "4915100000002", "4915100000003"];
    order.sort_by_key(|r| {
        waquota::model::listing_position(&waquota::model::RecipientId::parse("r", r).unwrap())
    });
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["recipient"], order[0]);
    assert_eq!(entries[0]["sender"], "s1");
    assert_eq!(entries[2]["recipient"], order[2]);
    let expiry_of = |r: &str| match r {
        "4915100000001" => "2026-03-03T12:00:00Z",
        _ => "",
    };
    for e in entries {
        let r = e["recipient"].as_str().unwrap();
        if !expiry_of(r).is_empty() {
            assert_eq!(e["expires_at"], expiry_of(r));
        }
    }
    assert_eq!(j["next_page_token"], Value::Null);

    // Page by page: two, then the rest via the token.
    let j = cli(
        &server,
        now,
        &["window", "list", "s1", "--page-size", "2", "--json"],
    )
    .await
    .json();
    assert_eq!(j["entries"].as_array().unwrap().len(), 2);
    let token = j["next_page_token"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let args = [
        "window",
        "list",
        "s1",
        "--page-size",
        "2",
        "--page-token",
        &token,
        "--json",
    ];
    let j = cli(&server, now, &args).await.json();
    assert_eq!(j["entries"].as_array().unwrap().len(), 1);
    assert_eq!(j["entries"][0]["recipient"], order[2]);
    assert_eq!(j["next_page_token"], Value::Null);

    // --all follows the tokens.
    let j = cli(
        &server,
        now,
        &[
            "window",
            "list",
            "s1",
            "--page-size",
            "1",
            "--all",
            "--json",
        ],
    )
    .await
    .json();
    let all: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["recipient"].as_str().unwrap())
        .collect();
    assert_eq!(all, order);
    assert_eq!(j["next_page_token"], Value::Null);

    let t = cli(&server, now, &["window", "list", "s1", "--page-size", "2"]).await;
    let t = t.ok();
    println!("{t}");
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("RECIPIENT"), "{t}");
    assert!(
        lines[0].contains("EXPIRES AT") && lines[0].contains("SENDER"),
        "{t}"
    );
    assert!(lines[1].contains(order[0]), "{t}");
    assert!(lines[1].trim_end().ends_with("s1"), "{t}");
    assert!(lines[2].contains(order[1]), "{t}");
    assert!(lines[1].contains("2026-03-03T12:0"), "{t}");
    assert_eq!(lines[3], format!("next page: --page-token {token}"));

    let t = cli(&server, now, &["window", "list", "--portfolio", "empty"]).await;
    assert_eq!(
        t.ok().trim(),
        "no recipient holds a slot of portfolio empty"
    );
}

async fn policy_set_changes_only_what_is_given(backend: Backend) {
    let server = TestServer::start(backend).await;
    let t = cli(&server, NOON, &["policy", "get", "s1"]).await;
    let t = t.ok();
    assert_eq!(row(t, "tier"), "250");
    assert_eq!(row(t, "mode"), "conversation");
    assert_eq!(row(t, "limit"), "250");

    let t = cli(&server, NOON, &["policy", "set", "s1", "--tier", "1k"]).await;
    assert_eq!(row(t.ok(), "tier"), "1k");
    let j = cli(
        &server,
        NOON,
        &["policy", "set", "s1", "--mode", "rolling", "--json"],
    )
    .await
    .json();
    assert_eq!(j["policy"]["tier"], "1k", "the tier was kept");
    assert_eq!(j["policy"]["mode"], "rolling");
    cli(
        &server,
        NOON,
        &["policy", "set", "s1", "--custom-limit", "300"],
    )
    .await
    .ok();
    let j = cli(&server, NOON, &["policy", "get", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["policy"]["tier"], "1k");
    assert_eq!(j["policy"]["custom_limit"], 300);
    assert_eq!(j["policy"]["mode"], "rolling");
    assert_eq!(j["limit"], 300);
    let j = cli(&server, NOON, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(
        (j["limit"].as_u64(), j["remaining"].as_u64()),
        (Some(300), Some(300))
    );

    let args = [
        "policy",
        "set",
        "--portfolio",
        "p1",
        "--tier",
        "2k",
        "--json",
    ];
    let j = cli(&server, NOON, &args).await.json();
    assert_eq!(j["target"]["portfolio"], "p1");
    assert_eq!(j["policy"]["tier"], "2k");
    assert_eq!(j["policy"]["mode"], "rolling", "a portfolio's default mode");
}

async fn sender_assign_and_detach(backend: Backend) {
    let server = TestServer::start(backend).await;
    // A portfolio the ledger does not know is refused, as a mistyped id would be: "P1" is not
    // "p1". Nothing changes.
    let out = cli(
        &server,
        NOON,
        &["sender", "assign", "s1", "--portfolio", "P1"],
    )
    .await;
    assert!(
        out.failed(1)
            .starts_with("waquota: FAILED_PRECONDITION: portfolio P1 is unknown"),
        "{}",
        out.stderr
    );
    let j = cli(&server, NOON, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(
        (j["portfolio"].clone(), j["known"].clone()),
        (Value::Null, Value::Bool(false))
    );
    // A portfolio with a stored policy is known: no --create needed.
    cli(
        &server,
        NOON,
        &["policy", "set", "--portfolio", "p2", "--tier", "2k"],
    )
    .await
    .ok();
    let out = cli(
        &server,
        NOON,
        &["sender", "assign", "s3", "--portfolio", "p2"],
    )
    .await;
    assert_eq!(out.ok().trim(), "sender s3 assigned to portfolio p2");
    let out = cli(
        &server,
        NOON,
        &["sender", "assign", "s1", "--portfolio", "p1", "--create"],
    )
    .await;
    assert_eq!(out.ok().trim(), "sender s1 assigned to portfolio p1");
    let j = cli(&server, NOON, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["portfolio"], "p1");
    assert_eq!(j["scope"], "portfolio");
    let t = cli(&server, NOON, &["policy", "get", "s1"]).await;
    assert!(
        row(t.ok(), "decided by").starts_with("portfolio p1"),
        "{}",
        t.ok()
    );

    let j = cli(&server, NOON, &["sender", "detach", "s1", "--json"])
        .await
        .json();
    assert_eq!(j, serde_json::json!({"sender": "s1", "portfolio": null}));
    let j = cli(&server, NOON, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["portfolio"], Value::Null);
    assert_eq!(j["scope"], "sender");
}

async fn reset_needs_confirmation_and_then_clears(backend: Backend) {
    let server = TestServer::start(backend).await;
    three_slots(&mut server.quota().await).await;

    // No terminal and no --yes: refused before anything is sent.
    let out = cli(&server, NOON + HOUR, &["reset", "s1"]).await;
    let line = out.failed(2);
    assert!(
        line.starts_with("waquota: refusing to reset sender s1"),
        "{line}"
    );
    assert!(line.contains("--yes"), "{line}");
    let j = cli(&server, NOON + HOUR, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["used"], 3, "a refused reset changes nothing");

    let out = cli(&server, NOON + HOUR, &["reset", "s1", "--yes"]).await;
    assert_eq!(out.ok().trim(), "sender s1: window cleared");
    let j = cli(&server, NOON + HOUR, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["used"], 0);
    assert_eq!(j["next_slot_free_at"], Value::Null);

    let j = cli(
        &server,
        NOON,
        &["reset", "--portfolio", "p1", "--yes", "--json"],
    )
    .await
    .json();
    assert_eq!(j, serde_json::json!({"reset": {"portfolio": "p1"}}));
}

async fn server_errors_are_one_line_with_the_status_code(backend: Backend) {
    let server = TestServer::start(backend).await;
    let out = cli(&server, NOON, &["inspect", "not a sender"]).await;
    let line = out.failed(1);
    assert!(
        line.starts_with("waquota: INVALID_ARGUMENT: target.sender: invalid character ' '"),
        "{line}"
    );
    let out = cli(
        &server,
        NOON,
        &["window", "list", "s1", "--page-token", "bogus"],
    )
    .await;
    assert!(
        out.failed(1)
            .starts_with("waquota: INVALID_ARGUMENT: page_token:")
    );

    // A sender in a portfolio cannot be reset on its own.
    cli(
        &server,
        NOON,
        &["sender", "assign", "s1", "--portfolio", "p1", "--create"],
    )
    .await
    .ok();
    let out = cli(&server, NOON, &["reset", "s1", "--yes"]).await;
    assert!(
        out.failed(1)
            .starts_with("waquota: FAILED_PRECONDITION: sender s1 is assigned"),
        "{}",
        out.stderr
    );
}

// ------------------------------------------------------------------------------ no server needed

#[tokio::test]
async fn bad_arguments_exit_2_with_a_clear_message() {
    for (args, want) in [
        (&["inspect"][..], "required arguments were not provided"),
        (
            &["inspect", "s1", "--portfolio", "p1"],
            "cannot be used with",
        ),
        (
            &["policy", "set", "s1"],
            "required arguments were not provided",
        ),
        (
            &["policy", "set", "s1", "--tier", "3k"],
            "unknown tier \"3k\"",
        ),
        (
            &["policy", "set", "s1", "--mode", "daily"],
            "unknown window mode",
        ),
        (&["inspect", "s1", "--at", "yesterday"], "is not a time"),
        (
            &["window", "list", "s1", "--page-size", "many"],
            "--page-size",
        ),
        (&["sender", "assign", "s1"], "--portfolio"),
        (
            &["policy", "set", "s1", "--messages-per-second", "many"],
            "--messages-per-second",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ] {
        let out = raw(args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
        // clap's own errors look like every other error: one `waquota: …` line.
        let line = out.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "{args:?}: {line}");
        assert!(line.starts_with("waquota: "), "{args:?}: {line}");
    }
    // Usage errors found before connecting are one line too.
    let args = [
        "--addr",
        "http://127.0.0.1:1",
        "--ca-cert",
        "/nonexistent.pem",
        "inspect",
        "s1",
    ];
    let out = raw(&args).await;
    assert_eq!(
        out.failed(2),
        "waquota: --ca-cert needs an https:// address, got http://127.0.0.1:1"
    );
    let args = ["--addr", "https://127.0.0.1:1", "inspect", "s1"];
    assert!(raw(&args).await.failed(2).contains("TLS needs --ca-cert"));

    // Bad named values of `policy set`: one line, found before connecting (nothing listens on
    // port 1).
    for (flag, value, names) in [
        (
            "--status",
            "nope",
            "connected, flagged, restricted, paused, banned or disconnected",
        ),
        ("--quality", "purple", "green, yellow, red or none"),
        ("--rule-set", "new", "legacy or portfolio"),
        ("--auto-tier", "maybe", "true or false"),
    ] {
        let args = [
            "--addr",
            "http://127.0.0.1:1",
            "policy",
            "set",
            "s1",
            "--tier",
            "1k",
            flag,
            value,
        ];
        assert_eq!(
            raw(&args).await.failed(2),
            format!("waquota: {flag} \"{value}\": unknown value; use {names}")
        );
    }
}

#[tokio::test]
async fn unreachable_server_is_one_line_and_exit_1() {
    let out = raw(&["--addr", "http://127.0.0.1:1", "inspect", "s1"]).await;
    assert_eq!(
        out.failed(1),
        "waquota: cannot reach http://127.0.0.1:1: connection refused"
    );
    let out = raw(&["--addr", "127.0.0.1:1", "window", "list", "s1", "--json"]).await;
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", out.stdout);
    assert!(
        out.failed(1)
            .starts_with("waquota: cannot reach http://127.0.0.1:1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_against_an_untrusting_server_is_refused_by_the_server() {
    let process = WaquotaProcess::start(&[]);
    let endpoint = process.endpoint();
    let args = [
        "--addr",
        &endpoint,
        "--at",
        "2026-03-02T12:00:00Z",
        "inspect",
        "s1",
    ];
    let out = raw(&args).await;
    assert!(
        out.failed(1)
            .starts_with("waquota: INVALID_ARGUMENT: at: this server does not trust"),
        "{}",
        out.stderr
    );
    // Without --at the real clock answers.
    let out = raw(&["--addr", &endpoint, "inspect", "s1", "--json"]).await;
    assert_eq!(out.json()["used"], 0);
}

// ------------------------------------------------------------------------------ TLS and token

/// Runs the binary with extra environment variables, off the async runtime.
async fn with_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_waquota"))
            .args(&args)
            .env_remove("WAQUOTA_ADDR")
            .env_remove("WAQUOTA_TOKEN")
            .envs(env)
            .output()
            .expect("run waquota")
    })
    .await
    .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The real server (in-memory ledger) behind mutual TLS and bearer-token auth.
async fn start_tls_admin(certs: &TestCerts) -> (TestServer, String) {
    use std::path::PathBuf;
    use waquota::config::TlsSettings;

    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    let srv = TestServer::start_with(Backend::Memory, |s| {
        s.tls = Some(TlsSettings {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            client_ca: Some(PathBuf::from(ca)),
        });
        s.auth.operator_tokens = vec!["ops-token".into()];
    })
    .await;
    let addr = format!("https://127.0.0.1:{}", srv.addr.port());
    (srv, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_the_bearer_token_reach_the_server() {
    let certs = TestCerts::generate();
    let (_srv, addr) = start_tls_admin(&certs).await;
    let (ca, cert, key) = (
        certs.path("ca.pem"),
        certs.path("client.pem"),
        certs.path("client.key"),
    );
    let tls = [
        "--addr",
        &addr,
        "--ca-cert",
        &ca,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "--at",
        "2026-03-02T12:00:00Z",
    ];
    let with = |extra: &[&'static str]| {
        let mut v: Vec<&str> = tls.to_vec();
        v.extend_from_slice(extra);
        v
    };

    // Token by flag, and by WAQUOTA_TOKEN.
    let out = with_env(
        &with(&["--token", "ops-token", "inspect", "s1", "--json"]),
        &[],
    )
    .await;
    assert_eq!(out.json()["limit"], 250);
    let out = with_env(
        &with(&["policy", "set", "s1", "--tier", "2k"]),
        &[("WAQUOTA_TOKEN", "ops-token")],
    )
    .await;
    assert_eq!(row(out.ok(), "tier"), "2k");

    // No token, or a wrong one: the server's UNAUTHENTICATED, in one line.
    let out = with_env(&with(&["inspect", "s1"]), &[]).await;
    assert_eq!(
        out.failed(1),
        "waquota: UNAUTHENTICATED: missing or invalid bearer token (authorization: Bearer <token>)"
    );
    let out = with_env(&with(&["--token", "guess", "inspect", "s1"]), &[]).await;
    assert!(out.failed(1).contains("UNAUTHENTICATED"));

    // Without the client certificate the server does not let the call through.
    let args = [
        "--addr",
        &addr,
        "--ca-cert",
        &ca,
        "--token",
        "ops-token",
        "inspect",
        "s1",
    ];
    let out = with_env(&args, &[]).await;
    let line = out.failed(1);
    // TLS 1.3 finishes the client's side of the handshake before the server refuses, so the
    // refusal surfaces on the first call, worded by whichever side of the closing connection
    // the client notices first (the alert, a broken pipe, a closed stream): only its outcome
    // is pinned.
    assert!(line.starts_with("waquota: "), "{line}");
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    println!("without a client certificate: {line}");

    // A CA that did not sign the server's certificate: the handshake fails.
    let args = [
        "--addr",
        &addr,
        "--ca-cert",
        &cert,
        "--token",
        "ops-token",
        "inspect",
        "s1",
    ];
    let out = with_env(&args, &[]).await;
    let line = out.failed(1);
    assert!(
        line.starts_with(&format!("waquota: cannot reach {addr}")),
        "{line}"
    );
    println!("with the wrong CA: {line}");
}

// ------------------------------------------------------------------------------ policy engine

async fn inspect_shows_status_effective_limit_and_projection(backend: Backend) {
    let server = TestServer::start(backend).await;
    three_slots(&mut server.quota().await).await;
    let now = NOON + HOUR;

    // Nothing due yet: the projection is all null, and "-" in the table.
    let j = cli(&server, now, &["inspect", "s1", "--json"]).await.json();
    assert_eq!(j["status"], "connected");
    assert_eq!(j["quality"], Value::Null);
    assert_eq!(j["effective_limit"], 250);
    assert_eq!(
        (j["unique_7d"].as_u64(), j["unique_30d"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        j["projection"],
        serde_json::json!({"next_tier": null, "upgrade_at": null, "downgrade_at": null})
    );
    assert_eq!(j["sender_policy"]["messages_per_second"], 0);

    let args = [
        "policy",
        "set",
        "s1",
        "--status",
        "flagged",
        "--headroom-percent",
        "10",
    ];
    cli(&server, now, &args).await.ok();
    let j = cli(&server, now, &["inspect", "s1", "--json"]).await.json();
    assert_eq!(j["status"], "flagged");
    assert_eq!(j["policy"]["status"], "flagged");
    assert_eq!(j["sender_policy"]["status"], "flagged");
    assert_eq!(j["policy"]["headroom_percent"], 10);
    assert_eq!(j["limit"], 250, "the nominal limit");
    assert_eq!(j["effective_limit"], 225, "250 less 10 % headroom");
    assert_eq!(j["remaining"], 222, "counted against the effective limit");
    // Legacy FLAGGED: one tier down 7 days after the status was set.
    assert_eq!(j["projection"]["next_tier"], "50");
    assert_eq!(j["projection"]["downgrade_at"], rfc3339(now + 7 * DAY));
    assert_eq!(j["projection"]["upgrade_at"], Value::Null);

    let t = cli(&server, now, &["inspect", "s1"]).await;
    let t = t.ok();
    println!("{t}");
    assert_eq!(row(t, "status"), "flagged");
    assert_eq!(row(t, "quality"), "-");
    assert_eq!(row(t, "tier"), "250");
    assert_eq!(row(t, "mode"), "conversation");
    assert_eq!(row(t, "limit"), "250");
    assert_eq!(row(t, "effective limit"), "225 (headroom 10%)");
    assert_eq!(row(t, "used"), "3");
    assert_eq!(row(t, "remaining"), "222");
    assert_eq!(row(t, "next slot free at"), "2026-03-03T12:00:00Z");
    assert_eq!(row(t, "slots freeing next hour"), "0");
    assert_eq!(row(t, "unique users 7d"), "3");
    assert_eq!(row(t, "unique users 30d"), "3");
    assert_eq!(row(t, "next tier"), "50");
    assert_eq!(row(t, "upgrade at"), "-");
    assert_eq!(row(t, "downgrade at"), "2026-03-09T13:00:00Z");
    assert_eq!(
        row(t, "rates"),
        "messages/s default, pair interval default, pair burst default"
    );
    assert_eq!(row(t, "caps"), "sender cap none, marketing cap none");

    let args = [
        "policy",
        "set",
        "s1",
        "--messages-per-second",
        "20",
        "--pair-interval-ms",
        "3000",
        "--marketing-cap",
        "2",
        "--marketing-cap-period-ms",
        "7200000",
        "--quality",
        "red",
    ];
    cli(&server, now, &args).await.ok();
    let t = cli(&server, now, &["inspect", "s1"]).await;
    let t = t.ok();
    assert_eq!(
        row(t, "rates"),
        "messages/s 20, pair interval 3s, pair burst default"
    );
    assert_eq!(row(t, "caps"), "sender cap none, marketing cap 2 per 2h");
    assert_eq!(row(t, "quality"), "red");
    assert_eq!(row(t, "status"), "flagged", "kept");

    // Connected again: no downgrade is due.
    cli(
        &server,
        now,
        &["policy", "set", "s1", "--status", "connected"],
    )
    .await
    .ok();
    let j = cli(&server, now, &["inspect", "s1", "--json"]).await.json();
    assert_eq!(j["status"], "connected");
    assert_eq!(j["projection"]["downgrade_at"], Value::Null);
    assert_eq!(j["effective_limit"], 225, "the headroom was kept");
    let t = cli(&server, now, &["inspect", "s1"]).await;
    assert_eq!(row(t.ok(), "downgrade at"), "-");
    assert_eq!(row(t.ok(), "next tier"), "-");

    // An unlimited tier: every limit figure says so.
    cli(
        &server,
        now,
        &["policy", "set", "s1", "--tier", "unlimited"],
    )
    .await
    .ok();
    let t = cli(&server, now, &["inspect", "s1"]).await;
    assert_eq!(row(t.ok(), "effective limit"), "unlimited");
}

async fn inspect_shows_an_upgrade_projection_and_the_portfolio_status(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut q = server.quota().await;
    // Legacy 250: half the limit in 7 days projects 1k 24 h after the crossing.
    let users: Vec<String> = (0..125).map(|i| format!("49151{i:08}")).collect();
    let r = dsl::batch(&mut q, "s1", &users, NOON).await;
    assert!(r.iter().all(|r| r.allowed));
    let j = cli(&server, NOON + HOUR, &["inspect", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["unique_7d"], 125);
    assert_eq!(j["projection"]["next_tier"], "1k");
    assert_eq!(j["projection"]["upgrade_at"], rfc3339(NOON + DAY));
    assert_eq!(j["projection"]["downgrade_at"], Value::Null);
    let t = cli(&server, NOON + HOUR, &["inspect", "s1"]).await;
    assert_eq!(row(t.ok(), "next tier"), "1k");
    assert_eq!(row(t.ok(), "upgrade at"), "2026-03-03T12:00:00Z");

    // A portfolio's status is its own; a sender in it shows both when they differ.
    cli(
        &server,
        NOON,
        &["sender", "assign", "s2", "--portfolio", "p1", "--create"],
    )
    .await
    .ok();
    let args = ["policy", "set", "--portfolio", "p1", "--status", "paused"];
    cli(&server, NOON, &args).await.ok();
    let j = cli(&server, NOON, &["inspect", "--portfolio", "p1", "--json"])
        .await
        .json();
    assert_eq!(j["status"], "paused");
    assert_eq!(j["sender_policy"], Value::Null);
    let t = cli(&server, NOON, &["inspect", "--portfolio", "p1"]).await;
    assert_eq!(row(t.ok(), "status"), "paused");
    assert!(!t.ok().contains("rates"), "no sender rates for a portfolio");

    let j = cli(&server, NOON, &["inspect", "s2", "--json"])
        .await
        .json();
    assert_eq!(j["status"], "connected", "the sender's own");
    assert_eq!(j["policy"]["status"], "paused", "the deciding window's");
    assert_eq!(j["sender_policy"]["status"], "connected");
    let t = cli(&server, NOON, &["inspect", "s2"]).await;
    assert_eq!(row(t.ok(), "status"), "connected (portfolio p1: paused)");
}

async fn policy_set_keeps_every_field_not_given(backend: Backend) {
    let server = TestServer::start(backend).await;
    let set = |args: &'static [&'static str]| {
        let mut all = vec!["policy", "set", "s1"];
        all.extend_from_slice(args);
        all
    };
    cli(&server, NOON, &set(&["--messages-per-second", "20"]))
        .await
        .ok();
    cli(&server, NOON, &set(&["--sender-cap", "5"])).await.ok();
    let j = cli(&server, NOON, &["policy", "get", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["sender_policy"]["messages_per_second"], 20);
    assert_eq!(j["sender_policy"]["sender_cap"], 5);
    assert_eq!(
        j["policy"]["messages_per_second"], 20,
        "unassigned: the same"
    );
    assert_eq!(j["policy"]["sender_cap"], 5);
    let t = cli(&server, NOON, &["policy", "get", "s1"]).await;
    let t = t.ok();
    println!("{t}");
    assert_eq!(row(t, "messages per second"), "20");
    assert_eq!(row(t, "sender cap"), "5");
    assert_eq!(row(t, "decided by"), "sender s1");
    assert!(
        !t.contains("own policy"),
        "one policy when it is the deciding one"
    );

    // Every other field at once, then one more: all of them stay.
    let every = set(&[
        "--status",
        "restricted",
        "--quality",
        "yellow",
        "--pair-interval-ms",
        "3000",
        "--pair-burst",
        "10",
        "--headroom-percent",
        "5",
        "--marketing-cap",
        "2",
        "--marketing-cap-period-ms",
        "3600000",
        "--rule-set",
        "portfolio",
        "--auto-tier",
        "true",
        "--custom-limit",
        "300",
        "--mode",
        "rolling",
    ]);
    let t = cli(&server, NOON, &every).await;
    assert_eq!(row(t.ok(), "status"), "restricted");
    assert_eq!(row(t.ok(), "pair interval"), "3s");
    cli(&server, NOON, &set(&["--tier", "1k"])).await.ok();
    let j = cli(&server, NOON, &["policy", "get", "s1", "--json"])
        .await
        .json();
    assert_eq!(
        j["sender_policy"],
        serde_json::json!({
            "tier": "1k",
            "custom_limit": 300,
            "mode": "rolling",
            "status": "restricted",
            "quality": "yellow",
            "messages_per_second": 20,
            "pair_interval_ms": 3000,
            "pair_burst": 10,
            "headroom_percent": 5,
            "sender_cap": 5,
            "marketing_cap": 2,
            "marketing_cap_period_ms": 3600000,
            "rule_set": "portfolio",
            "auto_tier": true,
        })
    );
    assert_eq!(
        (j["limit"].as_u64(), j["effective_limit"].as_u64()),
        (Some(300), Some(285))
    );
    let t = cli(&server, NOON, &["policy", "get", "s1"]).await;
    let t = t.ok();
    for (key, want) in [
        ("tier", "1k"),
        ("custom limit", "300"),
        ("mode", "rolling"),
        ("headroom", "5%"),
        ("rule set", "portfolio"),
        ("auto tier", "true"),
        ("status", "restricted"),
        ("quality", "yellow"),
        ("messages per second", "20"),
        ("pair interval", "3s"),
        ("pair burst", "10"),
        ("sender cap", "5"),
        ("marketing cap", "2"),
        ("marketing cap period", "1h"),
        ("limit", "300"),
        ("effective limit", "285"),
    ] {
        assert_eq!(row(t, key), want, "{key}");
    }

    // Back to the defaults: quality none, 0 for a rate.
    let args = set(&["--quality", "none", "--pair-interval-ms", "0", "--json"]);
    let j = cli(&server, NOON, &args).await.json();
    assert_eq!(j["policy"]["quality"], Value::Null);
    assert_eq!(j["policy"]["pair_interval_ms"], 0);
    assert_eq!(j["policy"]["pair_burst"], 10);
    let t = cli(&server, NOON, &["policy", "get", "s1"]).await;
    assert_eq!(row(t.ok(), "quality"), "-");
    assert_eq!(row(t.ok(), "pair interval"), "default");

    // A value the server refuses: one line naming the field, and nothing changes.
    let out = cli(&server, NOON, &set(&["--headroom-percent", "100"])).await;
    assert!(
        out.failed(1)
            .starts_with("waquota: INVALID_ARGUMENT: policy.headroom_percent"),
        "{}",
        out.stderr
    );
    let j = cli(&server, NOON, &["policy", "get", "s1", "--json"])
        .await
        .json();
    assert_eq!(j["sender_policy"]["headroom_percent"], 5);

    // A portfolio keeps its fields too.
    let p = |extra: &'static [&'static str]| {
        let mut all = vec!["policy", "set", "--portfolio", "p1"];
        all.extend_from_slice(extra);
        all
    };
    cli(&server, NOON, &p(&["--headroom-percent", "20"]))
        .await
        .ok();
    cli(&server, NOON, &p(&["--tier", "2k"])).await.ok();
    let j = cli(
        &server,
        NOON,
        &["policy", "get", "--portfolio", "p1", "--json"],
    )
    .await
    .json();
    assert_eq!(j["policy"]["tier"], "2k");
    assert_eq!(j["policy"]["headroom_percent"], 20);
    assert_eq!(j["policy"]["rule_set"], "portfolio");
    assert_eq!(j["policy"]["mode"], "rolling");
    assert_eq!(j["sender_policy"], Value::Null);
    assert_eq!(j["effective_limit"], 1600);
}

async fn policy_get_shows_the_portfolio_policy_and_the_sender_own(backend: Backend) {
    let server = TestServer::start(backend).await;
    cli(
        &server,
        NOON,
        &["sender", "assign", "s2", "--portfolio", "p1", "--create"],
    )
    .await
    .ok();
    cli(
        &server,
        NOON,
        &["policy", "set", "--portfolio", "p1", "--tier", "2k"],
    )
    .await
    .ok();
    let out = cli(
        &server,
        NOON,
        &["policy", "set", "s2", "--messages-per-second", "50"],
    )
    .await;
    assert!(
        out.ok()
            .contains("note: sender s2 is assigned to portfolio p1")
    );

    let j = cli(&server, NOON, &["policy", "get", "s2", "--json"])
        .await
        .json();
    assert_eq!(j["scope"], "portfolio");
    assert_eq!(j["portfolio"], "p1");
    assert_eq!(j["policy"]["tier"], "2k");
    assert_eq!(j["policy"]["mode"], "rolling");
    assert_eq!(j["sender_policy"]["tier"], "250");
    assert_eq!(j["sender_policy"]["messages_per_second"], 50);
    assert_eq!(j["limit"], 2000);

    let t = cli(&server, NOON, &["policy", "get", "s2"]).await;
    let t = t.ok();
    println!("{t}");
    assert_eq!(row(t, "portfolio"), "p1");
    assert!(row(t, "decided by").starts_with("portfolio p1"), "{t}");
    assert_eq!(row(t, "tier"), "2k", "the deciding window's first");
    assert_eq!(row(t, "limit"), "2000");
    let (_, own) = t
        .split_once("own policy of sender s2")
        .unwrap_or_else(|| panic!("no own policy in\n{t}"));
    assert_eq!(row(own, "tier"), "250");
    assert_eq!(row(own, "mode"), "conversation");
    assert_eq!(row(own, "messages per second"), "50");
}

/// Runs the binary with stdout a pipe whose read end is closed before it starts: every write
/// to stdout fails with EPIPE, as when `| head -c1` has exited.
async fn with_closed_stdout(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        Command::new(env!("CARGO_BIN_EXE_waquota"))
            .args(&args)
            .env_remove("WAQUOTA_ADDR")
            .env_remove("WAQUOTA_TOKEN")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run waquota")
    })
    .await
    .unwrap()
}

fn assert_quiet_on_a_closed_pipe(args: &[String], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    assert!(stderr.is_empty(), "{args:?}: {stderr}");
}

async fn a_closed_stdout_is_not_a_panic(backend: Backend) {
    let server = TestServer::start(backend).await;
    three_slots(&mut server.quota().await).await;
    for args in [
        &["inspect", "s1", "--json"][..],
        &["inspect", "s1"],
        &["policy", "get", "s1"],
        &["window", "list", "s1", "--json"],
    ] {
        let mut all = vec![
            "--addr".to_owned(),
            server.endpoint(),
            "--at".to_owned(),
            rfc3339(NOON + HOUR),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let out = with_closed_stdout(all.clone()).await;
        assert_quiet_on_a_closed_pipe(&all, &out);
    }
}

#[tokio::test]
async fn config_check_on_a_closed_stdout_is_not_a_panic() {
    for args in [&["config", "check"][..], &["config", "check", "--json"]] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = with_closed_stdout(args.clone()).await;
        assert_quiet_on_a_closed_pipe(&args, &out);
    }
}

/// The same with the read end closed right after the start, as `| head -c1` does.
#[tokio::test]
async fn config_check_with_its_reader_gone_is_not_a_panic() {
    let out = tokio::task::spawn_blocking(|| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_waquota"))
            .args(["config", "check"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run waquota");
        drop(child.stdout.take());
        child.wait_with_output().expect("wait for waquota")
    })
    .await
    .unwrap();
    assert_quiet_on_a_closed_pipe(&["config check".to_owned()], &out);
}
