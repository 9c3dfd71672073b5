//! The deploy artifacts are checked against the real server and the real tools: every query of
//! the Grafana dashboard and of the alert rules names a metric the server exports; the alert
//! rules pass `promtool check rules` and their unit tests (`promtool test rules`); the
//! Kubernetes manifests pass `kubernetes-validate`, and their ConfigMap is a settings file that
//! `waquota config check` accepts.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::ops::http_get_ready;
use common::{Backend, TestServer};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `waquota_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("waquota_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Runs a tool that the test script installs, naming the package when it is missing.
fn run(tool: &str, args: &[&str], install: &str) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (install: {install}; scripts/test does)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

#[tokio::test]
async fn every_dashboard_and_alert_query_uses_a_metric_the_server_exports() {
    let server = TestServer::start_with(Backend::Redis, |s| {
        s.metrics_listen = Some(common::ANY_PORT)
    })
    .await;
    let addr = server.metrics.unwrap();
    let (code, exposition) = tokio::task::spawn_blocking(move || http_get_ready(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    // Exported series, with a histogram's _bucket, _sum and _count.
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/waquota.json")).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6, "{} panels", panels.len());
    let mut queried = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr} names no waquota metric");
            queried.extend(names);
        }
    }
    let alerts = metric_names(&read("deploy/prometheus/alerts.yml"));
    assert!(alerts.len() >= 6, "{alerts:?}");
    for name in queried.iter().chain(&alerts) {
        assert!(
            exported.contains(name),
            "{name} is queried but not exported; exported: {exported:?}"
        );
    }
    server.stop().await;
}

#[test]
fn prometheus_rules_pass_promtool_check_and_their_unit_tests() {
    let install = "apt-get install prometheus";
    let checked = run(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        install,
    );
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = run(
        "promtool",
        &["test", "rules", "deploy/prometheus/alerts_test.yml"],
        install,
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn kubernetes_manifests_validate_and_their_settings_pass_config_check() {
    let files = [
        "configmap.yaml",
        "deployment.yaml",
        "pdb.yaml",
        "secret.yaml",
        "service.yaml",
    ]
    .map(|f| format!("deploy/kubernetes/{f}"));
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let out = run(
        "kubernetes-validate",
        &args,
        "pip install kubernetes-validate",
    );
    for kind in [
        "configmap/waquota",
        "deployment/waquota",
        "poddisruptionbudget/waquota",
        "secret/waquota-tokens",
        "service/waquota",
        "service/waquota-headless",
    ] {
        assert!(
            out.contains(&format!("passed for resource {kind}")),
            "{out}"
        );
    }

    // The ConfigMap's waquota.toml, as the pod reads it, with the Secret's environment.
    let configmap = read("deploy/kubernetes/configmap.yaml");
    let toml: String = configmap
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("waquota.toml: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[store]"), "{toml}");
    let dir = common::scratch_dir("k8s-config");
    let file = dir.join("waquota.toml");
    std::fs::write(&file, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_waquota"))
        .args(["config", "check", "--config", file.to_str().unwrap()])
        .env("WAQUOTA_AUTH_SENDER_TOKENS", "replace-with-a-sender-token")
        .env(
            "WAQUOTA_AUTH_OPERATOR_TOKENS",
            "replace-with-an-operator-token",
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("metrics_listen = \"0.0.0.0:9464\""), "{text}");
    // The probes ask the health service by the names the server registers.
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert!(deployment.contains("service: waquota.v1.QuotaService"));
    assert!(read("Dockerfile").contains("\"health\"]"));
}
