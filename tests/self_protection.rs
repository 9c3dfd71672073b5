//! Self-protection: load shedding beyond `max_in_flight`, client deadlines, and the message
//! size limit. A slow ledger is made by pausing Redis's writes (`CLIENT PAUSE ... WRITE`), so
//! the calls that got in wait inside Redis while the rest arrive.

mod common;

use std::time::Duration;

use common::dsl::users;
use common::ops::{http_get_ready, metric, pause_writes, unpause};
use common::{Backend, D, TestServer, ts};
use tonic::Code;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{AcquireBatchRequest, AcquireRequest};

fn acquire_req(recipient: &str) -> AcquireRequest {
    AcquireRequest {
        sender: "s1".into(),
        recipient: recipient.into(),
        at: Some(ts(D)),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_beyond_max_in_flight_are_shed_at_once() {
    let mut server = TestServer::start_with(Backend::Redis, |s| {
        s.max_in_flight = 4;
        s.redis_timeout = Duration::from_secs(30);
        s.metrics_listen = Some(common::ANY_PORT);
    })
    .await;
    let metrics = server.metrics.unwrap();
    let mut q = server.quota().await;
    q.acquire(acquire_req("warm-up")).await.expect("warm-up");
    let port = server.redis().unwrap().port;

    pause_writes(port, 3000);
    let calls: Vec<_> = users("r", 20)
        .into_iter()
        .map(|r| {
            let mut q = q.clone();
            tokio::spawn(async move { q.acquire(acquire_req(&r)).await.map_err(|s| s.code()) })
        })
        .collect();
    let mut shed = 0;
    let mut ok = 0;
    for (i, c) in calls.into_iter().enumerate() {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Code::ResourceExhausted) => shed += 1,
            Err(other) => panic!("call {i}: unexpected {other:?}"),
        }
    }
    unpause(port);
    assert_eq!((ok, shed), (4, 16), "4 admitted, 16 shed");

    let (_, text) = tokio::task::spawn_blocking(move || http_get_ready(metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(metric(&text, "waquota_requests_shed_total"), Some(16.0));
    assert_eq!(metric(&text, "waquota_requests_in_flight"), Some(0.0));

    // Capacity is back once the slow calls finished.
    q.acquire(acquire_req("after"))
        .await
        .expect("after the burst");
}

#[tokio::test]
async fn a_call_whose_deadline_passes_is_answered_and_stops_occupying_the_server() {
    let mut server = TestServer::start_with(Backend::Redis, |s| {
        s.redis_timeout = Duration::from_secs(30);
        s.metrics_listen = Some(common::ANY_PORT);
    })
    .await;
    let metrics = server.metrics.unwrap();
    let mut q = server.quota().await;
    q.acquire(acquire_req("warm-up")).await.expect("warm-up");
    let port = server.redis().unwrap().port;

    pause_writes(port, 10_000);
    // A tonic Channel enforces grpc-timeout itself and would give up at the same moment; this
    // client only sends the header, so what comes back is the server's own answer.
    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tonic::body::Body>();
    let mut patient = QuotaServiceClient::with_origin(http2, server.endpoint().parse().unwrap());
    let mut req = tonic::Request::new(acquire_req("late"));
    req.set_timeout(Duration::from_millis(300));
    let got = patient.acquire(req).await.map_err(|s| s.code());
    // While Redis is still paused: the call was answered and nothing of it runs here any more.
    let (_, text) = tokio::task::spawn_blocking(move || http_get_ready(metrics, "/metrics"))
        .await
        .unwrap();
    unpause(port);
    assert_eq!(got.err(), Some(Code::DeadlineExceeded));
    assert_eq!(
        metric(&text, "waquota_requests_deadline_exceeded_total"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "waquota_requests_in_flight"), Some(0.0));
}

#[tokio::test]
async fn messages_over_the_size_limit_are_refused_both_ways() {
    let server = TestServer::start_with(Backend::Memory, |s| s.max_message_bytes = 1024).await;
    let mut q = server.quota().await;

    let too_big = q
        .acquire_batch(AcquireBatchRequest {
            sender: "s1".into(),
            recipients: users("a-long-recipient-id", 100),
            at: Some(ts(D)),
            ..Default::default()
        })
        .await;
    assert_eq!(
        too_big.map_err(|s| s.code()).err(),
        Some(Code::ResourceExhausted)
    );

    // A request under the limit whose answer is over it.
    let answer_too_big = q
        .acquire_batch(AcquireBatchRequest {
            sender: "s1".into(),
            recipients: users("r", 60),
            at: Some(ts(D)),
            ..Default::default()
        })
        .await;
    assert_eq!(
        answer_too_big.map_err(|s| s.code()).err(),
        Some(Code::ResourceExhausted)
    );

    q.acquire(acquire_req("r1"))
        .await
        .expect("small messages pass");
}

/// With Redis frozen, every Acquire answers within `redis_timeout` of its own arrival, those
/// that queued behind a decision of the same sender included (they used to wait for that one
/// and then for their own call: twice the timeout).
#[tokio::test]
async fn queued_acquires_answer_within_the_store_timeout_of_their_arrival() {
    let timeout = Duration::from_millis(1000);
    let mut server = TestServer::start_with(Backend::Redis, |s| {
        s.redis_timeout = timeout;
    })
    .await;
    let q = server.quota().await;
    // On the store's clock (no `at`): only those requests are decided together.
    let real = |r: &str| AcquireRequest {
        at: None,
        ..acquire_req(r)
    };
    q.clone().acquire(real("warm-up")).await.expect("warm-up");
    let port = server.redis().unwrap().port;

    pause_writes(port, 5000);
    let call = |r: String| {
        let mut q = q.clone();
        let req = real(&r);
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            let got = q.acquire(req).await.map_err(|s| s.code());
            (got, start.elapsed())
        })
    };
    // One decision in flight, held by Redis; then the rest arrive and queue behind it.
    let mut calls = vec![call("first".into())];
    common::eventually("the first decision to wait inside Redis", || async {
        common::raw_command(port, "INFO clients").filter(|info| !info.contains("blocked_clients:0"))
    })
    .await;
    calls.extend(users("r", 30).into_iter().map(call));
    let mut slowest = Duration::ZERO;
    for (i, c) in calls.into_iter().enumerate() {
        let (got, took) = c.await.unwrap();
        assert_eq!(got.map(drop), Err(Code::Unavailable), "call {i}");
        slowest = slowest.max(took);
    }
    unpause(port);
    // The bound is the promise (one timeout), with room for a loaded machine; the defect
    // answered after two timeouts or more.
    assert!(
        slowest < timeout * 3 / 2,
        "slowest answer after {slowest:?}, timeout {timeout:?}"
    );
}
