//! `/metrics` after a scripted run: decisions by decision and scope, latency histograms, script
//! reloads, Redis errors and the pool; and no sender or recipient id anywhere in it.

mod common;

use std::net::SocketAddr;

use common::dsl::{policy, put_policy, sender};
use common::ops::{http_get, http_get_ready, metric};
use common::{Backend, D, TestServer, raw_command, ts};
use waquota::proto::{AcquireRequest, Decision, Tier, WindowMode};

const SENDER: &str = "sender-zq81";

fn acquire_req(recipient: &str) -> AcquireRequest {
    AcquireRequest {
        sender: SENDER.into(),
        recipient: recipient.into(),
        at: Some(ts(D)),
        ..Default::default()
    }
}

async fn scrape(addr: SocketAddr) -> String {
    let (code, text) = tokio::task::spawn_blocking(move || http_get_ready(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    text
}

#[tokio::test]
async fn metrics_show_decisions_latencies_and_store_trouble_without_ids() {
    let mut server = TestServer::start_with(Backend::Redis, |s| {
        s.metrics_listen = Some(common::ANY_PORT)
    })
    .await;
    let addr = server.metrics.unwrap();
    let mut q = server.quota().await;
    let mut a = server.admin().await;
    put_policy(
        &mut a,
        sender(SENDER),
        policy(Tier::Tier50, 3, WindowMode::Conversation),
    )
    .await;

    let mut decisions = Vec::new();
    for r in [
        "recipient-qx1",
        "recipient-qx2",
        "recipient-qx3",
        "recipient-qx4",
    ] {
        decisions.push(
            q.acquire(acquire_req(r))
                .await
                .unwrap()
                .into_inner()
                .decision,
        );
    }
    assert_eq!(
        decisions,
        [
            Decision::AllowedNew as i32,
            Decision::AllowedNew as i32,
            Decision::AllowedNew as i32,
            Decision::DeniedLimit as i32
        ]
    );

    let text = scrape(addr).await;
    let series = |s: &str| metric(&text, s);
    assert_eq!(
        series("waquota_decisions_total{decision=\"allowed_new\",scope=\"sender\"}"),
        Some(3.0)
    );
    assert_eq!(
        series("waquota_decisions_total{decision=\"denied_limit\",scope=\"sender\"}"),
        Some(1.0)
    );
    assert_eq!(
        series("waquota_decisions_total{decision=\"allowed_new\",scope=\"portfolio\"}"),
        Some(0.0)
    );
    assert!(series("waquota_request_duration_seconds_count{rpc=\"Acquire\"}").unwrap() >= 4.0);
    assert_eq!(
        series("waquota_request_duration_seconds_bucket{rpc=\"Acquire\",le=\"+Inf\"}"),
        series("waquota_request_duration_seconds_count{rpc=\"Acquire\"}")
    );
    assert!(series("waquota_request_duration_seconds_count{rpc=\"PutPolicy\"}").unwrap() >= 1.0);
    assert!(
        series("waquota_redis_script_duration_seconds_count{script=\"acquire\"}").unwrap() >= 4.0
    );
    assert_eq!(series("waquota_requests_in_flight"), Some(0.0));
    assert_eq!(series("waquota_requests_shed_total"), Some(0.0));
    assert!(series("waquota_redis_pool_connections{state=\"in_use\"}").unwrap() >= 1.0);
    assert!(series("waquota_redis_pool_waiting").is_some());
    assert!(text.contains("# TYPE waquota_request_duration_seconds histogram"));
    for id in [SENDER, "recipient-qx", "qx1"] {
        assert!(!text.contains(id), "{id} leaked into /metrics");
    }

    // A Redis that forgot its function library: one reload, and the call still succeeds.
    let reloads = metric(&text, "waquota_redis_script_reloads_total").unwrap();
    let port = server.redis().unwrap().port;
    assert!(raw_command(port, "FUNCTION FLUSH").is_some_and(|r| r.starts_with("+OK")));
    q.acquire(acquire_req("recipient-qx1")).await.unwrap();
    let text = scrape(addr).await;
    assert_eq!(
        metric(&text, "waquota_redis_script_reloads_total"),
        Some(reloads + 1.0)
    );
    assert_eq!(
        metric(&text, "waquota_redis_errors_total{kind=\"internal\"}"),
        Some(0.0)
    );

    // A Redis that is gone: errors counted by kind.
    server.redis().unwrap().kill();
    let gone = q.acquire(acquire_req("recipient-qx5")).await;
    assert_eq!(gone.unwrap_err().code(), tonic::Code::Unavailable);
    let text = scrape(addr).await;
    assert!(metric(&text, "waquota_redis_errors_total{kind=\"unavailable\"}").unwrap() >= 1.0);
    assert_eq!(
        metric(
            &text,
            "waquota_store_outage_decisions_total{outcome=\"denied\"}"
        ),
        Some(1.0)
    );

    let (code, _) = tokio::task::spawn_blocking(move || http_get(addr, "/other"))
        .await
        .unwrap();
    assert_eq!(code, 404);
}

/// Every series a server on Redis exposes, by sample name: how many series and their label
/// names. Taken from the exposition before the registry moved to `prometheus-client` (then 15
/// RPCs; `ListTargets` and `ListAudit` added two); the dashboard, the alert rules and
/// operators' own queries rely on every one of them.
const SERIES: &[(&str, usize, &[&str])] = &[
    ("waquota_decisions_total", 20, &["decision", "scope"]),
    (
        "waquota_request_duration_seconds_bucket",
        255,
        &["rpc", "le"],
    ),
    ("waquota_request_duration_seconds_sum", 17, &["rpc"]),
    ("waquota_request_duration_seconds_count", 17, &["rpc"]),
    ("waquota_requests_in_flight", 1, &[]),
    ("waquota_requests_shed_total", 1, &[]),
    ("waquota_requests_refused_total", 2, &["reason"]),
    ("waquota_requests_deadline_exceeded_total", 1, &[]),
    ("waquota_durability_timeouts_total", 1, &[]),
    ("waquota_ledger_lost_total", 1, &[]),
    ("waquota_decisions_unanswered_total", 1, &[]),
    ("waquota_webhook_events_total", 50, &["kind", "outcome"]),
    ("waquota_webhook_signature_failures_total", 1, &[]),
    ("waquota_webhook_relay_failures_total", 1, &[]),
    ("waquota_webhook_apply_duration_seconds_bucket", 15, &["le"]),
    ("waquota_webhook_apply_duration_seconds_sum", 1, &[]),
    ("waquota_webhook_apply_duration_seconds_count", 1, &[]),
    ("waquota_ledger_lost", 1, &[]),
    ("waquota_store_outage_decisions_total", 2, &["outcome"]),
    (
        "waquota_redis_script_duration_seconds_bucket",
        210,
        &["script", "le"],
    ),
    ("waquota_redis_script_duration_seconds_sum", 14, &["script"]),
    (
        "waquota_redis_script_duration_seconds_count",
        14,
        &["script"],
    ),
    ("waquota_redis_errors_total", 5, &["kind"]),
    ("waquota_redis_script_reloads_total", 1, &[]),
    ("waquota_redis_pool_connections", 2, &["state"]),
    ("waquota_redis_pool_max_connections", 1, &[]),
    ("waquota_redis_pool_waiting", 1, &[]),
];

/// The declared type of each metric family, as `# TYPE` names it.
const TYPES: &[(&str, &str)] = &[
    ("waquota_decisions_total", "counter"),
    ("waquota_request_duration_seconds", "histogram"),
    ("waquota_requests_in_flight", "gauge"),
    ("waquota_requests_shed_total", "counter"),
    ("waquota_requests_refused_total", "counter"),
    ("waquota_requests_deadline_exceeded_total", "counter"),
    ("waquota_durability_timeouts_total", "counter"),
    ("waquota_ledger_lost_total", "counter"),
    ("waquota_decisions_unanswered_total", "counter"),
    ("waquota_webhook_events_total", "counter"),
    ("waquota_webhook_signature_failures_total", "counter"),
    ("waquota_webhook_relay_failures_total", "counter"),
    ("waquota_webhook_apply_duration_seconds", "histogram"),
    ("waquota_ledger_lost", "gauge"),
    ("waquota_store_outage_decisions_total", "counter"),
    ("waquota_redis_script_duration_seconds", "histogram"),
    ("waquota_redis_errors_total", "counter"),
    ("waquota_redis_script_reloads_total", "counter"),
    ("waquota_redis_pool_connections", "gauge"),
    ("waquota_redis_pool_max_connections", "gauge"),
    ("waquota_redis_pool_waiting", "gauge"),
];

const LE: [&str; 15] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "+Inf",
];

/// One sample line of the text format: `name{k="v",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let close = body.find('}').ok_or("unclosed label set")?;
        for pair in body[..close].split(',') {
            let (k, v) = pair.split_once('=').ok_or("label without =")?;
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or("unquoted label value")?;
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {k:?}"));
            }
            labels.push((k.to_owned(), v.to_owned()));
        }
        rest = &body[close + 1..];
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `GET /metrics`, with the response's Content-Type.
fn get_metrics(addr: SocketAddr) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (content_type, body.to_owned())
}

#[tokio::test]
async fn the_exposition_parses_and_holds_every_series_it_held_before() {
    let server = TestServer::start_with(Backend::Redis, |s| {
        s.metrics_listen = Some(common::ANY_PORT)
    })
    .await;
    let addr = server.metrics.unwrap();
    // One call, so the histograms hold an observation; a scrape before any still has them all.
    let mut a = server.admin().await;
    put_policy(
        &mut a,
        sender(SENDER),
        policy(Tier::Tier50, 3, WindowMode::Conversation),
    )
    .await;
    scrape(addr).await;
    let (content_type, text) = tokio::task::spawn_blocking(move || get_metrics(addr))
        .await
        .unwrap();
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");

    let mut types = std::collections::BTreeMap::new();
    let mut helps = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            match (kind, name, rest) {
                (Some("HELP"), Some(name), Some(help)) => {
                    assert!(helps.insert(name.to_owned()), "two HELP lines for {name}");
                    assert!(
                        help.ends_with('.') && !help.ends_with(".."),
                        "{name}: help {help:?}"
                    );
                }
                (Some("TYPE"), Some(name), Some(t)) => {
                    assert!(
                        types.insert(name.to_owned(), t.to_owned()).is_none(),
                        "two TYPE lines for {name}"
                    );
                }
                _ => panic!("unexpected comment line {line:?}"),
            }
            continue;
        }
        let s = parse_sample(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        // A sample follows the TYPE of its family.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = s.name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(&s.name);
        assert!(types.contains_key(family), "{line:?} before its # TYPE");
        samples.push(s);
    }

    let expected_types: std::collections::BTreeMap<String, String> = TYPES
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(types, expected_types);
    assert_eq!(
        helps.len(),
        TYPES.len(),
        "one HELP line for each metric family"
    );

    let mut seen = std::collections::BTreeSet::new();
    for s in &samples {
        assert!(
            seen.insert((s.name.clone(), s.labels.clone())),
            "series {} {:?} twice",
            s.name,
            s.labels
        );
        assert!(s.value >= 0.0, "{s:?}");
    }
    for (name, count, label_names) in SERIES {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.name == *name).collect();
        assert_eq!(of.len(), *count, "series of {name}");
        for s in &of {
            let keys: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(&keys, label_names, "{s:?}");
        }
    }
    let names: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    let expected: std::collections::BTreeSet<&str> = SERIES.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names, expected, "no series gone, none added");

    // Buckets: the same bounds, spelled as before, cumulative, and +Inf is the count.
    let buckets: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == "waquota_request_duration_seconds_bucket"
                && s.labels[0] == ("rpc".to_owned(), "PutPolicy".to_owned())
        })
        .collect();
    let le: Vec<&str> = buckets.iter().map(|s| s.labels[1].1.as_str()).collect();
    assert_eq!(le, LE);
    assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value));
    let count = metric(
        &text,
        "waquota_request_duration_seconds_count{rpc=\"PutPolicy\"}",
    );
    assert_eq!(Some(buckets[14].value), count);
    assert!(count.unwrap() >= 1.0);
    assert!(
        metric(
            &text,
            "waquota_request_duration_seconds_sum{rpc=\"PutPolicy\"}"
        )
        .unwrap()
            > 0.0
    );
}
