//! `waquota bench` end to end: the real binary loads a server started here (and Redis directly
//! for the ceiling and memory figures) and prints one JSON report whose counts add up. Nothing
//! here asserts on timing.

mod common;

use std::process::Command;

use common::{Backend, RedisServer, TestServer};
use serde_json::Value;

/// Runs `waquota bench ARGS --json` and parses its report.
async fn bench(args: Vec<String>) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_waquota"))
            .arg("bench")
            .args(&args)
            .arg("--json")
            .output()
            .expect("run waquota bench")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "waquota bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn sum(v: &Value) -> u64 {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Every figure is there, every call and recipient is accounted for, and since every share of
/// the mix has exactly one possible answer, what was asked is what was decided.
fn check_run(run: &Value, calls: u64, batch: u64) {
    assert_eq!(run["calls"], calls, "{run}");
    assert_eq!(run["batch"], batch, "{run}");
    let errors = sum(&run["errors"]);
    assert_eq!(errors, 0, "no call fails against a healthy server: {run}");
    assert_eq!(run["ok_calls"].as_u64().unwrap() + errors, calls);
    let decided = run["recipients_decided"].as_u64().unwrap();
    assert_eq!(decided, calls * batch);
    assert_eq!(sum(&run["decisions"]), decided);
    assert_eq!(sum(&run["asked"]), calls * batch);
    let (asked, decisions) = (&run["asked"], &run["decisions"]);
    assert_eq!(
        count(asked, "new"),
        count(decisions, "allowed_new"),
        "{run}"
    );
    assert_eq!(count(asked, "counted"), count(decisions, "allowed_counted"));
    assert_eq!(
        count(asked, "service"),
        count(decisions, "allowed_service_window")
    );
    assert_eq!(count(asked, "denied"), count(decisions, "denied_limit"));
    for key in ["decisions_per_s", "recipients_per_s", "elapsed_s"] {
        assert!(run[key].as_f64().is_some_and(|x| x >= 0.0), "{key}: {run}");
    }
    let l = &run["latency_ms"];
    for key in ["p50", "p90", "p99", "p99_9", "max", "mean"] {
        assert!(l[key].as_f64().is_some(), "latency_ms.{key}: {run}");
    }
    assert!(l["p50"].as_f64() <= l["p99"].as_f64());
    assert!(l["p99"].as_f64() <= l["max"].as_f64());
    assert!(
        run["cpu"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "bench")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_reports_every_decision_of_a_short_run() {
    let server = TestServer::start(Backend::Memory).await;
    let report = bench(args(&[
        "--addr",
        &server.endpoint(),
        "--requests",
        "200",
        "--concurrency",
        "4",
        "--warmup",
        "0",
        "--senders",
        "3",
        "--recipients",
        "20",
        "--service-recipients",
        "5",
        "--mix",
        "new=40,counted=30,service=15,denied=15",
    ]))
    .await;
    check_run(&report["service"], 200, 1);
    assert!(report["ceiling"].is_null());
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_runs_count_recipients() {
    let server = TestServer::start(Backend::Memory).await;
    let report = bench(args(&[
        "--addr",
        &server.endpoint(),
        "--requests",
        "40",
        "--batch",
        "5",
        "--concurrency",
        "2",
        "--warmup",
        "0",
        "--senders",
        "2",
        "--recipients",
        "10",
    ]))
    .await;
    check_run(&report["service"], 40, 5);
}

/// A short run of 200 calls through the service at `endpoint` and, with `flag` (a script-direct
/// run: `--ceiling-redis` or `--anchor-redis`), straight on the Redis at `redis`.
fn script_direct_run(endpoint: &str, flag: &str, redis: &str) -> Vec<String> {
    args(&[
        "--addr",
        endpoint,
        flag,
        redis,
        "--requests",
        "200",
        "--concurrency",
        "4",
        "--pipeline",
        "4",
        "--warmup",
        "0",
        "--senders",
        "3",
        "--recipients",
        "20",
        "--service-recipients",
        "5",
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn ceiling_drives_the_same_script_on_redis() {
    let mut server = TestServer::start(Backend::Redis).await;
    let redis = server.redis().unwrap().url();
    let report = bench(script_direct_run(
        &server.endpoint(),
        "--ceiling-redis",
        &redis,
    ))
    .await;
    check_run(&report["service"], 200, 1);
    check_run(&report["ceiling"], 200, 1);
    assert!(report["service_to_ceiling"].as_f64().is_some());
    // One FCALL per decision on the ceiling; at most one through the service, which decides a
    // sender's concurrent requests together (calls still in flight from before the measured
    // part began may add a few).
    for (run, least) in [("service", 1), ("ceiling", 200)] {
        let r = &report[run]["redis"];
        let evalsha = r["script_calls"].as_u64().unwrap();
        assert!(evalsha >= least, "{run}: {r}");
        assert!(evalsha < 300, "{run}: {r}");
        assert!(
            r["commands_per_decision"].as_f64().unwrap() > 1.0,
            "{run}: {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_reports_bytes_per_slot_and_encodings() {
    let redis = RedisServer::start();
    let report = bench(args(&["--memory-redis", &redis.url()])).await;
    assert!(report["service"].is_null(), "no service run without --addr");
    let m = &report["memory"];
    let windows = m["windows"].as_array().unwrap();
    let slots: Vec<u64> = windows
        .iter()
        .map(|w| w["slots"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, [250, 1_000, 10_000, 100_000]);
    for w in windows {
        assert!(w["window_bytes"].as_u64().unwrap() > 0, "{w}");
        assert!(w["shards"].as_u64().unwrap() > 0, "{w}");
        assert!(
            w["shard_bytes"].as_u64().unwrap() <= w["window_bytes"].as_u64().unwrap(),
            "{w}"
        );
        // Every shard, and every part of the pair-rate set, stays in the compact encoding.
        for field in ["encodings", "pair_rate_encodings"] {
            let enc = w[field].as_str().unwrap();
            assert!(enc.contains("listpack"), "{field}: {w}");
            assert!(
                !enc.contains("skiplist") && !enc.contains("hashtable"),
                "{field}: {w}"
            );
        }
    }
    let csw = m["service_windows"].as_array().unwrap();
    assert!(!csw.is_empty());
    for s in csw {
        assert!(s["key_bytes"].as_u64().unwrap() > 0, "{s}");
        let enc = s["encoding"].as_str().unwrap();
        assert!(enc.contains("listpack") && !enc.contains("skiplist"), "{s}");
    }
}

/// The webhook load posts signed bodies the server applies in full: every POST answered 200,
/// and the server counted exactly the events the report says it sent.
#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_run_posts_bodies_the_bridge_applies() {
    let server = TestServer::start_with(Backend::Redis, |s| {
        s.webhook_listen = Some(common::ANY_PORT);
        s.webhook_app_secrets = vec!["bench-secret".into()];
        s.metrics_listen = Some(common::ANY_PORT);
    })
    .await;
    let (hooks, metrics) = (server.webhook.unwrap(), server.metrics.unwrap());
    common::ops::http_get_ready(metrics, "/metrics");
    let report = bench(args(&[
        "--addr",
        &server.endpoint(),
        "--webhook-url",
        &format!("http://{hooks}/webhooks/whatsapp"),
        "--webhook-secret",
        "bench-secret",
        "--webhook-reservations",
        "50",
        "--senders",
        "2",
        "--concurrency",
        "2",
        "--duration",
        "0.3",
        "--warmup",
        "0",
    ]))
    .await;
    let w = &report["webhooks"];
    assert_eq!(w["events_per_post"], 10, "{w}");
    assert!(w["reservations"].as_u64().unwrap() >= 50, "{w}");
    let posts = w["posts"].as_u64().unwrap();
    assert!(posts > 0, "{w}");
    assert_eq!(w["ok_posts"], posts, "{w}");
    assert_eq!(sum(&w["errors"]), 0, "{w}");
    assert!(report["service"].is_null() && report["ceiling"].is_null());
    // With no warm-up, every POST the bench sent is one it counted: 5 inbound messages and 5
    // statuses each, all applied or (a `read` after its `delivered`) answered as seen.
    let text = common::ops::http_get(metrics, "/metrics").1;
    let events = |kind: &str, outcome: &str| {
        common::ops::metric(
            &text,
            &format!("waquota_webhook_events_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0) as u64
    };
    assert_eq!(events("inbound", "applied"), posts * 5, "{text}");
    let statuses: u64 = ["status_delivered", "status_read"]
        .iter()
        .flat_map(|k| ["applied", "duplicate"].map(|o| events(k, o)))
        .sum();
    assert_eq!(statuses, posts * 5);
    assert_eq!(
        events("status_delivered", "unusable") + events("status_read", "unusable"),
        0
    );
}

/// The anchor script runs the same workload, unpipelined and pipelined, beside the service: new
/// recipients are counted, counted and service ones are found (the anchor has no service
/// windows: they were counted in the setup), and a full sender's are refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_anchor_runs_the_same_workload_beside_the_service() {
    let mut server = TestServer::start(Backend::Redis).await;
    let redis = server.redis().unwrap().url();
    let report = bench(script_direct_run(
        &server.endpoint(),
        "--anchor-redis",
        &redis,
    ))
    .await;
    check_run(&report["service"], 200, 1);
    assert!(report["service_to_anchor"].as_f64().is_some(), "{report}");
    for (name, depth) in [("anchor", 1), ("anchor_pipelined", 4)] {
        let run = &report[name];
        assert_eq!(run["calls"], 200, "{run}");
        assert_eq!(run["in_flight_per_worker"], depth, "{run}");
        assert_eq!(sum(&run["errors"]), 0, "{run}");
        let (asked, decisions) = (&run["asked"], &run["decisions"]);
        assert_eq!(count(asked, "new"), count(decisions, "allowed_new"));
        assert_eq!(count(asked, "denied"), count(decisions, "denied_limit"));
        assert_eq!(
            count(asked, "counted") + count(asked, "service"),
            count(decisions, "allowed_counted"),
            "{run}"
        );
        // One script call a decision at least; calls made between the first Redis reading and the
        // start of the measured part add a few.
        assert!(
            run["redis"]["script_calls"].as_u64().unwrap() >= 200,
            "{run}"
        );
        assert!(run["cpu_us_per_decision"]["bench"].as_f64().is_some());
        // Redis's time in the script, by command and the Lua around them.
        let us = &run["redis"]["us_per_decision"];
        for cmd in ["zadd", "zscore", "lua"] {
            assert!(us[cmd].as_f64().is_some_and(|x| x >= 0.0), "{cmd}: {run}");
        }
    }
}

/// `--cost` runs every load (single Acquires and batches of 10 and 100, each uncoalesced and
/// coalesced) for every outcome alone and for the mix, and each run decides every recipient.
#[tokio::test(flavor = "multi_thread")]
async fn the_cost_matrix_runs_every_load_and_outcome() {
    let server = TestServer::start(Backend::Memory).await;
    let report = bench(args(&[
        "--addr",
        &server.endpoint(),
        "--cost",
        "--requests",
        "20",
        "--concurrency",
        "2",
        "--warmup",
        "0",
        "--senders",
        "2",
        "--recipients",
        "20",
        "--service-recipients",
        "5",
    ]))
    .await;
    let runs = report["cost"].as_array().unwrap();
    let loads = [
        ("single uncoalesced", 1, true),
        ("single coalesced", 1, false),
        ("batch 10 uncoalesced", 10, true),
        ("batch 10 coalesced", 10, false),
        ("batch 100 uncoalesced", 100, true),
        ("batch 100 coalesced", 100, false),
    ];
    let outcomes = ["new", "counted", "service", "denied", "mix"];
    assert_eq!(runs.len(), loads.len() * outcomes.len(), "{report}");
    for (i, (load, batch, pinned)) in loads.iter().enumerate() {
        for (j, outcome) in outcomes.iter().enumerate() {
            let run = &runs[i * outcomes.len() + j];
            assert_eq!(run["label"], format!("service {load} {outcome}"));
            assert_eq!(run["pinned"], *pinned, "{run}");
            // Every recipient decided, none failed (a batch of 100 drawn from a pool of 20 meets
            // a recipient twice, so the per-pair rate answers some: not checked one by one).
            assert_eq!(run["calls"], 20, "{run}");
            assert_eq!(sum(&run["errors"]), 0, "{run}");
            assert_eq!(sum(&run["decisions"]), 20 * batch, "{run}");
            if *outcome != "mix" {
                assert_eq!(count(&run["asked"], outcome), 20 * batch, "{run}");
            }
        }
    }
}
