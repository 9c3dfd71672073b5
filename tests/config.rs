//! Settings through the real binary: `config check` (layering, redaction, one-line errors) and
//! `waquota serve` reading a configuration file and logging as JSON.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::certs::TestCerts;
use common::{WaquotaProcess, free_port};
use serde_json::Value;
use waquota::config::{Settings, Store};
use waquota::model::Tier;

/// A configuration file in a fresh temp path, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!(
            "waquota-config-test-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The binary with only the given `WAQUOTA_…` variables set.
fn waquota(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_waquota"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WAQUOTA_")) {
        cmd.env_remove(k);
    }
    cmd.args(args).envs(env.iter().copied());
    cmd
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = waquota(args, env).output().expect("run waquota");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const FILE: &str = r#"
listen = "127.0.0.1:7000"
key_prefix = "from-file"
max_batch = 10
max_in_flight = 64
redis_timeout = 500

[store]
kind = "redis"
url = "redis://app:s3cret@127.0.0.1:6379/0"

[defaults]
sender_tier = "1k"
portfolio_tier = "10k"

[auth]
sender_tokens = ["sender-token-1"]
operator_tokens = ["operator-token-1", "operator-token-2"]
"#;

#[test]
fn config_check_prints_the_effective_settings_with_secrets_redacted() {
    let file = ConfigFile::new("valid", FILE);
    let out = run(
        &[
            "config",
            "check",
            "--config",
            file.path(),
            "--max-batch",
            "30",
        ],
        &[
            ("WAQUOTA_MAX_BATCH", "20"),
            ("WAQUOTA_KEY_PREFIX", "from-env"),
            ("WAQUOTA_DEFAULT_PORTFOLIO_TIER", "100k"),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    println!("{}", out.stdout);
    assert!(out.stdout.starts_with("# valid;"), "{}", out.stdout);
    for secret in ["s3cret", "sender-token-1", "operator-token"] {
        assert!(!out.stdout.contains(secret), "{secret} printed");
    }
    assert!(
        out.stdout
            .contains(r#"url = "redis://app:***@127.0.0.1:6379/0""#)
    );
    assert!(out.stdout.contains(r#"operator_tokens = ["***", "***"]"#));
    // Each value given above the defaults says where it came from.
    let path = file.path();
    for line in [
        "max_batch = 30  # --max-batch".to_owned(),
        r#"key_prefix = "from-env"  # WAQUOTA_KEY_PREFIX"#.to_owned(),
        format!("max_in_flight = 64  # {path}:5"),
        format!("sender_tier = \"1k\"  # {path}:13"),
        "max_message_bytes = 4194304".to_owned(),
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "{line:?} in {}",
            out.stdout
        );
    }

    // What it prints is a configuration file: read it back and check every layer's winner.
    let s = Settings::from_toml(&out.stdout).expect("the output reads back as settings");
    assert_eq!(s.listen.to_string(), "127.0.0.1:7000", "file");
    assert_eq!(s.max_in_flight, 64, "file");
    assert_eq!(s.redis_timeout.as_millis(), 500, "file");
    assert_eq!(s.defaults.sender.tier, Tier::T1K, "file");
    assert_eq!(s.key_prefix, "from-env", "environment beats file");
    assert_eq!(
        s.defaults.portfolio.tier,
        Tier::T100K,
        "environment beats file"
    );
    assert_eq!(s.max_batch, 30, "flag beats environment and file");
    assert_eq!(s.max_message_bytes, 4 * 1024 * 1024, "built-in default");

    let out = run(
        &["config", "check", "--config", file.path(), "--json"],
        &[(
            "WAQUOTA_REDIS_CLUSTER",
            "redis://:pw@127.0.0.1:7001,redis://127.0.0.1:7002",
        )],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["auth"]["sender_tokens"], serde_json::json!(["***"]));
    assert_eq!(
        j["store"],
        serde_json::json!({"kind": "cluster", "nodes": ["redis://:***@127.0.0.1:7001", "redis://127.0.0.1:7002"]}),
        "the environment's store replaces the file's"
    );
}

#[test]
fn config_check_without_a_file_prints_the_defaults() {
    let out = run(&["config", "check"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let s = Settings::from_toml(&out.stdout).unwrap();
    assert_eq!(s.store, Store::Memory);
    assert_eq!(s.listen.to_string(), "0.0.0.0:50051");
    assert!(
        out.stdout.contains(r#"sender_tier = "250""#),
        "{}",
        out.stdout
    );
}

#[test]
fn invalid_settings_fail_with_one_clear_line() {
    let bad_tier = ConfigFile::new(
        "bad-tier",
        "max_batch = 5\n[defaults]\nsender_tier = \"3k\"\n",
    );
    let typo = ConfigFile::new("typo", "max_bacth = 5\n");
    let tls = ConfigFile::new("tls", "[tls]\ncert = \"/etc/waquota/cert.pem\"\n");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--config", bad_tier.path()],
            vec![],
            "defaults.sender_tier: unknown tier \"3k\": use 50, 250, 1k, 2k, 10k, 100k or unlimited",
        ),
        (
            vec!["--config", typo.path()],
            vec![],
            "line 1: unknown field `max_bacth`",
        ),
        (
            vec!["--config", tls.path()],
            vec![],
            "is set without tls.key",
        ),
        (
            vec!["--config", "/nonexistent/waquota.toml"],
            vec![],
            "cannot read",
        ),
        (
            vec![],
            vec![
                ("WAQUOTA_REDIS_URL", "redis://127.0.0.1:6379"),
                ("WAQUOTA_REDIS_CLUSTER", "redis://127.0.0.1:7000"),
            ],
            "choose one store",
        ),
        (
            vec!["--redis", "http://u:pw@host"],
            vec![],
            "--redis: \"http://u:***@host\" is not a Redis URL",
        ),
        (
            vec!["--tls-key", "/k.pem"],
            vec![],
            "--tls-key: is set without --tls-cert",
        ),
        (
            vec![],
            vec![("WAQUOTA_MAX_BATCH", "lots")],
            "WAQUOTA_MAX_BATCH: \"lots\" is not a whole number",
        ),
        (
            vec!["--redis-pool-size", "0"],
            vec![],
            "--redis-pool-size: must be at least 1",
        ),
    ];
    for (args, env, want) in cases {
        let mut all = vec!["config", "check"];
        all.extend(&args);
        let out = run(&all, &env);
        assert_eq!(out.code, 1, "{args:?} {env:?}: {}", out.stderr);
        let line = out.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "one line: {line:?}");
        assert!(
            line.starts_with("waquota: invalid configuration: "),
            "{line}"
        );
        assert!(
            line.contains(want),
            "{args:?} {env:?}: {line:?} lacks {want:?}"
        );
        assert!(!line.contains("pw@"), "{line}");
        assert!(
            out.stdout.is_empty(),
            "nothing printed for invalid settings"
        );
    }
    // A flag that cannot be parsed is a usage error (exit 2), as for every command.
    let out = run(&["config", "check", "--default-tier", "3k"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("unknown tier \"3k\""), "{}", out.stderr);
}

#[test]
fn serve_refuses_invalid_settings_before_listening() {
    let out = run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis",
            "localhost:6379",
        ],
        &[],
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .trim_end()
            .starts_with("waquota: invalid configuration: --redis:"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_its_configuration_file() {
    let file = ConfigFile::new(
        "serve",
        "trust_client_clock = true\n[defaults]\nsender_tier = \"1k\"\nsender_mode = \"rolling\"\n",
    );
    let process = WaquotaProcess::start(&["--config", file.path()]);
    let endpoint = process.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        run(
            &[
                "--addr",
                &endpoint,
                "--at",
                "2026-03-02T12:00:00Z",
                "inspect",
                "s1",
                "--json",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["limit"], 1000, "the file's default tier");
    assert_eq!(j["policy"]["mode"], "rolling", "the file's default mode");
    assert_eq!(j["now"], "2026-03-02T12:00:00Z", "the file's trusted clock");
}

/// Starts `waquota serve` with `args` and its stdout piped: the first line of its output that
/// `wanted` accepts (within the first 50), then stops it.
fn first_log_line(args: &[&str], wanted: impl Fn(&str) -> bool) -> String {
    let port = free_port(false);
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec!["serve", "--listen", &listen];
    all.extend(args);
    let mut child = waquota(&all, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn waquota serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = loop {
        let Some(Ok(line)) = lines.next() else {
            break None;
        };
        if wanted(&line) {
            break Some(line);
        }
        seen.push(line);
        if seen.len() > 50 {
            break None;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    found.unwrap_or_else(|| panic!("no such line among {seen:?}"))
}

#[test]
fn serve_logs_json_lines_when_asked() {
    // Every line is one JSON object; read up to the start-up line.
    let line = first_log_line(&["--log-format", "json", "--log", "info"], |line| {
        let j: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        j["fields"]["message"] == "waquota serving"
    });
    let j: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(j["level"], "INFO", "{j}");
    assert!(j["timestamp"].is_string(), "{j}");
}

#[test]
fn serve_logs_plain_text_without_colours_when_not_on_a_terminal() {
    let line = first_log_line(&["--log", "info"], |l| l.contains("waquota serving"));
    assert!(
        !line.contains('\u{1b}'),
        "no ANSI escapes in a pipe: {line:?}"
    );
    assert!(line.contains(" INFO "), "{line:?}");
    // Fields in their display form, as the settings spell them.
    assert!(line.contains(" addr=127.0.0.1:"), "{line:?}");
    assert!(line.contains(" on_store_error=deny "), "{line:?}");
    assert!(!line.contains("Some("), "{line:?}");
}

// ------------------------------------------------------------------------------ Redis URLs

/// A redis-server that speaks only TLS and knows only the ACL user `app` (password `s3cret`),
/// with a certificate for 127.0.0.1 signed by a CA of the test's own.
struct TlsRedis {
    port: u16,
    certs: TestCerts,
    child: std::process::Child,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        common::require_redis();
        let certs = TestCerts::generate();
        let port = free_port(false);
        let child = Command::new("redis-server")
            .current_dir(&certs.dir)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--user", "app", "on", ">s3cret", "~*", "&*", "+@all"])
            .args(["--user", "default", "off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut redis = TlsRedis { port, certs, child };
        common::wait_until("the TLS redis-server to listen", || {
            assert!(
                redis.child.try_wait().unwrap().is_none(),
                "redis-server exited: is it built with TLS?"
            );
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        redis
    }

    fn ca(&self) -> String {
        self.certs.path("ca.pem")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reaches_redis_over_tls_as_an_acl_user() {
    let redis = TlsRedis::start();
    let url = format!("rediss://app:s3cret@127.0.0.1:{}", redis.port);
    // rediss:// checks the server against the built-in roots; --redis-ca names a private CA.
    let ca = redis.ca();
    let process =
        WaquotaProcess::start(&["--redis", &url, "--redis-ca", &ca, "--trust-client-clock"]);

    let quota =
        waquota::proto::quota_service_client::QuotaServiceClient::connect(process.endpoint())
            .await
            .unwrap();
    let at = common::ts(common::at(12, 0, 0, 0));
    // The pool connects lazily: the first calls may meet a Redis not yet connected.
    let r = common::eventually("an Acquire over rediss://", || {
        let mut quota = quota.clone();
        async move {
            let req = waquota::proto::AcquireRequest {
                sender: "tls-sender".into(),
                recipient: "4915100000001".into(),
                at: Some(at),
                ..Default::default()
            };
            quota.acquire(req).await.ok().map(|r| r.into_inner())
        }
    })
    .await;
    assert!(r.allowed);

    let endpoint = process.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        run(
            &[
                "--addr",
                &endpoint,
                "--at",
                "2026-03-02T12:00:00Z",
                "inspect",
                "tls-sender",
                "--json",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["used"], 1, "the slot is in the TLS Redis");

    // A wrong password: the server runs, and the CLI reports its UNAVAILABLE in one line.
    let bad = format!("rediss://app:wrong@127.0.0.1:{}", redis.port);
    let process = WaquotaProcess::start(&["--redis", &bad, "--redis-ca", &ca]);
    let endpoint = process.endpoint();
    let out =
        tokio::task::spawn_blocking(move || run(&["--addr", &endpoint, "inspect", "s1"], &[]))
            .await
            .unwrap();
    assert_eq!(out.code, 1, "{}", out.stderr);
    let line = out.stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.starts_with("waquota: UNAVAILABLE: "), "{line}");
    assert!(
        !line.contains("wrong"),
        "the password is not echoed: {line}"
    );
}

#[test]
fn every_setting_has_a_flag() {
    let certs = TestCerts::generate();
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    #[rustfmt::skip]
    let args = [
        "config", "check", "--json",
        "--listen", "127.0.0.1:1",
        "--redis-cluster", "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        "--key-prefix", "flag",
        "--trust-client-clock",
        "--default-tier", "50",
        "--default-sender-mode", "rolling",
        "--default-portfolio-tier", "2k",
        "--default-portfolio-mode", "conversation",
        "--default-messages-per-second", "20",
        "--default-pair-interval-ms", "3000",
        "--default-pair-burst", "9",
        "--max-batch", "2",
        "--max-message-bytes", "2048",
        "--max-in-flight", "3",
        "--redis-pool-size", "5",
        "--redis-timeout-ms", "6",
        "--shutdown-grace-ms", "7",
        "--on-store-error", "allow",
        "--on-store-error-sender", "otp=allow,bulk=deny",
        "--shutdown-delay-ms", "8",
        "--durability", "async",
        "--durability-replicas", "2",
        "--durability-timeout-ms", "3",
        "--on-ledger-loss", "allow",
        "--webhook-listen", "127.0.0.1:4",
        "--webhook-verify-token", "vt",
        "--webhook-app-secret", "a1,a2",
        "--webhook-forward", "http://handler.internal/hook",
        "--webhook-max-body-bytes", "4096",
        "--webhook-waba", "w1=p1",
        "--webhook-display", "15550001111=s1",
        "--metrics-listen", "127.0.0.1:2",
        "--log-format", "json",
        "--log-level", "debug",
        "--auth-sender-tokens", "s1,s2",
        "--auth-operator-tokens", "o1",
        "--tls-cert", &cert,
        "--tls-key", &key,
        "--tls-client-ca", &ca,
    ];
    let out = run(&args, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    let want = serde_json::json!({
        "listen": "127.0.0.1:1",
        "key_prefix": "flag",
        "trust_client_clock": true,
        "max_batch": 2,
        "max_message_bytes": 2048,
        "max_in_flight": 3,
        "redis_pool_size": 5,
        "redis_timeout": 6,
        "shutdown_grace": 7,
        "on_store_error": "allow",
        "on_store_error_senders": {"bulk": "deny", "otp": "allow"},
        "shutdown_delay": 8,
        "durability": "async",
        "durability_replicas": 2,
        "durability_timeout": 3,
        "on_ledger_loss": "allow",
        "webhook_listen": "127.0.0.1:4",
        "webhook_verify_token": "***",
        "webhook_app_secrets": ["***", "***"],
        "webhook_forward": "http://handler.internal/hook",
        "webhook_max_body_bytes": 4096,
        "webhook_wabas": {"w1": "p1"},
        "webhook_displays": {"15550001111": "s1"},
        "redis_ca": null,
        "metrics_listen": "127.0.0.1:2",
        "log_format": "json",
        "log_level": "debug",
        "store": {"kind": "cluster", "nodes": ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]},
        "defaults": {
            "sender_tier": "50",
            "sender_mode": "rolling",
            "portfolio_tier": "2k",
            "portfolio_mode": "conversation",
            "messages_per_second": 20,
            "pair_interval_ms": 3000,
            "pair_burst": 9
        },
        "auth": {"sender_tokens": ["***", "***"], "operator_tokens": ["***"]},
        "tls": {"cert": cert, "key": key, "client_ca": ca},
    });
    assert_eq!(j, want);

    // The older spellings still work, and a flag can turn the trusted clock off again.
    let out = run(
        &[
            "config",
            "check",
            "--json",
            "--redis",
            "rediss://127.0.0.1:6379",
            "--redis-ca",
            &ca,
            "--log",
            "warn",
            "--trust-client-clock=false",
        ],
        &[("WAQUOTA_TRUST_CLIENT_CLOCK", "true")],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["log_level"], "warn");
    assert_eq!(j["trust_client_clock"], false);
    assert_eq!(j["store"]["url"], "rediss://127.0.0.1:6379");
    assert_eq!(j["redis_ca"], ca, "--redis-ca goes with a standalone Redis");
}

#[test]
fn server_commands_show_and_take_only_their_own_options() {
    let help = run(&["serve", "--help"], &[]);
    assert_eq!(help.code, 0, "{}", help.stderr);
    for own in ["--listen", "--redis-timeout-ms", "--log-level", "--config"] {
        assert!(help.stdout.contains(own), "{own} missing: {}", help.stdout);
    }
    assert!(
        help.stdout
            .contains("[default: 2000] [env: WAQUOTA_REDIS_TIMEOUT_MS]"),
        "{}",
        help.stdout
    );
    for operator in [
        "--addr",
        "--token",
        "--ca-cert",
        "--client-key",
        "--json",
        "--at ",
    ] {
        assert!(
            !help.stdout.contains(operator),
            "{operator} in {}",
            help.stdout
        );
    }
    let help = run(&["config", "check", "--help"], &[]);
    assert!(help.stdout.contains("--json"), "{}", help.stdout);
    assert!(!help.stdout.contains("--addr"), "{}", help.stdout);
    // An operator option given to the server is refused, not silently ignored.
    let out = run(&["serve", "--addr", "http://127.0.0.1:1"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        "waquota: --addr is an operator option: serve does not use it"
    );
    // The operator commands still take them.
    let help = run(&["inspect", "--help"], &[]);
    assert!(help.stdout.contains("--addr"), "{}", help.stdout);
}

#[test]
fn usage_errors_are_one_line_naming_the_flag() {
    for (args, want) in [
        (
            vec!["serve", "--redis-timeout-ms", "soon"],
            "waquota: invalid value 'soon' for '--redis-timeout-ms <MS>': \"soon\" is not a whole number",
        ),
        (
            vec!["serve", "--lisen", "x"],
            "waquota: unexpected argument '--lisen' found",
        ),
        (
            vec!["config", "check", "--default-sender-tier", "3k"],
            "waquota: invalid value '3k' for '--default-tier <TIER>': unknown tier \"3k\"",
        ),
    ] {
        let out = run(&args, &[]);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        let line = out.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.starts_with(want), "{args:?}: {line}");
    }
}

#[test]
fn config_check_reads_the_files_it_names() {
    let certs = TestCerts::generate();
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let ok = run(
        &["config", "check", "--tls-cert", &cert, "--tls-key", &key],
        &[],
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let swapped = run(
        &["config", "check", "--tls-cert", &cert, "--tls-key", &cert],
        &[],
    );
    assert_eq!(swapped.code, 1, "{}", swapped.stderr);
    assert!(
        swapped.stderr.starts_with(&format!(
            "waquota: invalid configuration: --tls-key: {cert}: not a PEM private key"
        )),
        "{}",
        swapped.stderr
    );
    let file = ConfigFile::new("pem", &format!("[tls]\ncert = {key:?}\nkey = {key:?}\n"));
    let out = run(&["config", "check", "--config", file.path()], &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "{}: line 2: tls.cert: {key}: holds no PEM certificate",
            file.path()
        )),
        "{}",
        out.stderr
    );
    let out = run(
        &["config", "check", "--redis", "rediss://127.0.0.1:1"],
        &[("WAQUOTA_REDIS_CA", "/nonexistent/ca.pem")],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("waquota: invalid configuration: WAQUOTA_REDIS_CA: /nonexistent/ca.pem: "),
        "{}",
        out.stderr
    );
}
