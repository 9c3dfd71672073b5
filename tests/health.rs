//! The operational surface: the standard gRPC health service on every backend, server
//! reflection, the behaviour while Redis is down and after it comes back, and the real
//! `waquota serve` binary with its default (in-memory) store and untrusted clock.
//!
//! Waiting for a health change polls (`common::eventually`); nothing sleeps for a time window
//! and nothing is timed.

mod common;
use common::connect as channel;

use common::{Backend, RedisServer, TestServer, WaquotaProcess, eventually, ts};
use tonic::Code;
use tonic::codegen::tokio_stream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use waquota::config::Store;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{AcquireRequest, AcquireResponse, Decision};

const SERVICES: [&str; 3] = ["", "waquota.v1.QuotaService", "waquota.v1.AdminService"];

/// The status the health service reports for `service`, or the gRPC code it refused with.
async fn health_of(
    client: &mut HealthClient<Channel>,
    service: &str,
) -> Result<ServingStatus, Code> {
    let req = HealthCheckRequest {
        service: service.to_owned(),
    };
    match client.check(req).await {
        Ok(r) => {
            Ok(ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown))
        }
        Err(s) => Err(s.code()),
    }
}

/// Waits until every service in SERVICES reports `want`.
async fn wait_health(client: &mut HealthClient<Channel>, want: ServingStatus) {
    eventually(&format!("health {want:?}"), || {
        let mut client = client.clone();
        async move {
            for s in SERVICES {
                if health_of(&mut client, s).await != Ok(want) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await
}

/// The first Acquire that succeeds once the store is back; every failure before must be
/// UNAVAILABLE (a pooled connection that died with the old Redis).
async fn acquire_when_back(
    q: &QuotaServiceClient<Channel>,
    sender: &str,
    recipient: &str,
) -> AcquireResponse {
    eventually("an Acquire after Redis came back", || {
        let mut q = q.clone();
        async move {
            match try_acquire(&mut q, sender, recipient).await {
                Ok(r) => Some(r),
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                    None
                }
            }
        }
    })
    .await
}

fn acquire(sender: &str, recipient: &str) -> AcquireRequest {
    AcquireRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        ..Default::default()
    }
}

async fn try_acquire(
    q: &mut QuotaServiceClient<Channel>,
    sender: &str,
    recipient: &str,
) -> Result<AcquireResponse, tonic::Status> {
    q.acquire(acquire(sender, recipient))
        .await
        .map(|r| r.into_inner())
}

fn decision(r: &AcquireResponse) -> Decision {
    Decision::try_from(r.decision).unwrap_or(Decision::Unspecified)
}

// ------------------------------------------------------------------------------ health

async fn health_serving_on(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut health = HealthClient::new(channel(&server.endpoint()).await);
    wait_health(&mut health, ServingStatus::Serving).await;
    // A service waquota does not run is unknown to the health service.
    assert_eq!(
        health_of(&mut health, "no.such.Service").await,
        Err(Code::NotFound)
    );
    // And it really serves.
    let mut q = server.quota().await;
    let r = try_acquire(&mut q, "health-sender", "4915100000001")
        .await
        .expect("acquire");
    assert_eq!(decision(&r), Decision::AllowedNew);
}

#[tokio::test]
async fn health_serving_memory() {
    health_serving_on(Backend::Memory).await;
}

#[tokio::test]
async fn health_serving_redis() {
    health_serving_on(Backend::Redis).await;
}

#[tokio::test]
async fn health_serving_cluster() {
    health_serving_on(Backend::Cluster).await;
}

// ------------------------------------------------------------------------------ reflection

async fn list_services(endpoint: &str) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel(endpoint).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .expect("reflection call")
        .into_inner();
    let reply = replies
        .message()
        .await
        .expect("reflection reply")
        .expect("one reflection reply");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("expected a service list, got {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_both_services() {
    for backend in [Backend::Memory, Backend::Redis] {
        let server = TestServer::start(backend).await;
        let names = list_services(&server.endpoint()).await;
        println!("{backend:?}: reflection lists {names:?}");
        for want in [
            "waquota.v1.QuotaService",
            "waquota.v1.AdminService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{backend:?}: reflection does not list {want}: {names:?}"
            );
        }
    }
}

// ------------------------------------------------------------------------------ Redis down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_and_recovers_without_restart() {
    // Redis comes back empty here: that is a lost ledger, which tests/ledger_loss.rs covers;
    // this test follows the connections, so it takes the empty ledger as it is.
    let mut server = TestServer::start_with(Backend::Redis, |s| {
        s.on_ledger_loss = waquota::config::OnLedgerLoss::Allow
    })
    .await;
    let mut health = HealthClient::new(channel(&server.endpoint()).await);
    let mut q = server.quota().await;
    wait_health(&mut health, ServingStatus::Serving).await;

    // Use enough requests that every pooled connection has been opened.
    for i in 0..8 {
        let r = try_acquire(&mut q, "down-sender", &format!("49151000000{i:02}"))
            .await
            .expect("acquire before the outage");
        assert_eq!(decision(&r), Decision::AllowedNew);
    }

    server.redis().expect("a standalone Redis").kill();

    // While Redis is down: every Acquire is UNAVAILABLE (never another code, never a hang).
    for i in 0..6 {
        let err = try_acquire(&mut q, "down-sender", &format!("49151000001{i:02}"))
            .await
            .expect_err("an Acquire cannot succeed while Redis is down");
        assert_eq!(
            err.code(),
            Code::Unavailable,
            "Redis down must be UNAVAILABLE, got {err:?}"
        );
    }
    wait_health(&mut health, ServingStatus::NotServing).await;
    let err = try_acquire(&mut q, "down-sender", "4915100000200")
        .await
        .expect_err("still down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The answer names the store and its address, not just the socket's error.
    let url = server.redis().expect("a standalone Redis").url();
    assert!(
        err.message().starts_with(&format!("Redis at {url}: ")),
        "{err:?}"
    );

    // Bring Redis back on the same port (empty: no persistence), without touching waquota.
    server.redis().expect("a standalone Redis").restart();
    wait_health(&mut health, ServingStatus::Serving).await;

    // The first Acquires after SERVING may still meet a pooled connection that died with the
    // old Redis; each such answer must be UNAVAILABLE, and the pool heals.
    let first_ok = acquire_when_back(&q, "down-sender", "4915100000300").await;
    // The ledger started over empty: the recipient is new again.
    assert_eq!(decision(&first_ok), Decision::AllowedNew);
    assert_eq!(first_ok.used, 1, "the restarted Redis holds no old slots");
    // From then on every request succeeds (twice the pool size, so every connection is used).
    for i in 0..8 {
        let r = try_acquire(&mut q, "down-sender", &format!("49151000004{i:02}"))
            .await
            .expect("acquire after recovery");
        assert_eq!(decision(&r), Decision::AllowedNew);
    }
    let r = try_acquire(&mut q, "down-sender", "4915100000300")
        .await
        .expect("acquire after recovery");
    assert_eq!(decision(&r), Decision::AllowedCounted);
    assert_eq!(r.used, 9);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_up_is_not_serving_until_it_answers() {
    let mut dead = RedisServer::start();
    let url = dead.url();
    dead.kill();
    // Start-up does not fail on an unreachable store: it serves UNAVAILABLE until Redis answers.
    let server = TestServer::start_with(Backend::Memory, |s| s.store = Store::Redis { url }).await;
    let mut health = HealthClient::new(channel(&server.endpoint()).await);
    wait_health(&mut health, ServingStatus::NotServing).await;
    let mut q = server.quota().await;
    let err = try_acquire(&mut q, "late-sender", "4915100000001")
        .await
        .expect_err("no store yet");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    dead.restart();
    wait_health(&mut health, ServingStatus::Serving).await;
    let r = acquire_when_back(&q, "late-sender", "4915100000001").await;
    assert_eq!((decision(&r), r.used), (Decision::AllowedNew, 1));
    server.stop().await;
}

// ------------------------------------------------------------------------------ the binary

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binary_serves_in_memory_with_the_real_clock() {
    let process = WaquotaProcess::start(&[]);
    let ch = channel(&process.endpoint()).await;
    let mut health = HealthClient::new(ch.clone());
    wait_health(&mut health, ServingStatus::Serving).await;

    let mut q = QuotaServiceClient::new(ch);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let r = try_acquire(&mut q, "binary-sender", "+49 151 0000-0001")
        .await
        .expect("acquire without `at` on the real clock");
    assert_eq!(decision(&r), Decision::AllowedNew);
    assert!(r.allowed);
    assert_eq!(r.recipient, "4915100000001");
    assert_eq!((r.limit, r.used, r.remaining), (250, 1, 249));
    // The slot runs 24 h from now (the server's clock, which is this machine's).
    let expires = common::ms_of(r.expires_at.as_ref().expect("expires_at"));
    let slot = expires - before;
    assert!(
        (common::DAY..common::DAY + 60_000).contains(&slot),
        "the slot should end 24 h after now, ends {slot} ms after"
    );

    let mut with_at = acquire("binary-sender", "4915100000002");
    with_at.at = Some(ts(common::at(12, 0, 0, 0)));
    let err = q
        .acquire(with_at)
        .await
        .expect_err("`at` without --trust-client-clock must be refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    println!("`at` refused: {}", err.message());
    // A refused request changes nothing.
    let r = try_acquire(&mut q, "binary-sender", "4915100000003")
        .await
        .expect("acquire");
    assert_eq!((decision(&r), r.used), (Decision::AllowedNew, 2));
}

#[tokio::test]
async fn real_binary_health_and_reflection() {
    let redis = RedisServer::start();
    let url = redis.url();
    let process = WaquotaProcess::start(&["--redis", &url]);
    let mut health = HealthClient::new(channel(&process.endpoint()).await);
    wait_health(&mut health, ServingStatus::Serving).await;
    let names = list_services(&process.endpoint()).await;
    assert!(
        names.iter().any(|n| n == "waquota.v1.QuotaService"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "waquota.v1.AdminService"),
        "{names:?}"
    );
}

/// `waquota health`, as the Docker image's HEALTHCHECK runs it: exit 0 and SERVING from a
/// serving server; an unknown service is one line and exit 1.
#[tokio::test]
async fn the_health_command_exits_0_only_when_serving() {
    let server = TestServer::start(Backend::Memory).await;
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_waquota"))
                .args(&args)
                .env_remove("WAQUOTA_ADDR")
                .env_remove("WAQUOTA_TOKEN")
                .output()
                .expect("run waquota")
        })
    };
    let base = vec!["--addr".to_owned(), server.endpoint(), "health".to_owned()];
    let out = run(base.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "server: SERVING\n");
    let mut quota = base.clone();
    quota.extend(["--service".to_owned(), "waquota.v1.QuotaService".to_owned()]);
    let out = run(quota).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut unknown = base;
    unknown.extend(["--service".to_owned(), "nope".to_owned()]);
    let out = run(unknown).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("NOT_FOUND"), "{err}");
    server.stop().await;
}
