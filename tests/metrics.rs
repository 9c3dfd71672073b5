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

    // A Redis that forgot its scripts: one reload, and the call still succeeds.
    let reloads = metric(&text, "waquota_redis_script_reloads_total").unwrap();
    let port = server.redis().unwrap().port;
    assert!(raw_command(port, "SCRIPT FLUSH").is_some_and(|r| r.starts_with("+OK")));
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
