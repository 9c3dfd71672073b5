//! Graceful shutdown of the real binary: on SIGTERM health turns NOT_SERVING, an in-flight call
//! still completes, and the process exits 0; past `shutdown_grace` it exits 0 anyway.
//!
//! A call is kept in flight by pausing Redis's writes; the short sleep before the signal only
//! orders events (the call must have reached the server), nothing asserts how long anything took.

mod common;
use common::eventually;

use std::time::Duration;

use common::ops::{connect, pause_writes, unpause};
use common::{RedisServer, WaquotaProcess};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use waquota::proto::AcquireRequest;
use waquota::proto::quota_service_client::QuotaServiceClient;

fn acquire_req(recipient: &str) -> AcquireRequest {
    AcquireRequest {
        sender: "s1".into(),
        recipient: recipient.into(),
        ..Default::default()
    }
}

fn sigterm(p: &mut WaquotaProcess) {
    let pid = p.child().id() as libc::pid_t;
    // SAFETY: sends a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

/// Waits for the process to exit; returns its exit code.
async fn exit_code(p: &mut WaquotaProcess) -> Option<i32> {
    eventually("waquota to exit after SIGTERM", || {
        let status = p.child().try_wait().expect("try_wait");
        async move { status.map(|s| s.code()) }
    })
    .await
}

#[tokio::test]
async fn sigterm_turns_health_not_serving_finishes_in_flight_calls_and_exits_zero() {
    let redis = RedisServer::start();
    let mut p = WaquotaProcess::start(&[
        "--redis",
        &redis.url(),
        "--redis-timeout-ms",
        "20000",
        "--shutdown-grace-ms",
        "20000",
    ]);
    let channel = connect(&p.endpoint()).await;
    let mut q = QuotaServiceClient::new(channel.clone());
    q.acquire(acquire_req("warm-up")).await.expect("warm-up");

    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "waquota.v1.QuotaService".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    pause_writes(redis.port, 2000);
    let in_flight = {
        let mut q = q.clone();
        tokio::spawn(async move { q.acquire(acquire_req("in-flight")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&mut p);

    let next = watch
        .message()
        .await
        .expect("watch stream")
        .expect("an update");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);

    let answered = in_flight.await.unwrap();
    unpause(redis.port);
    let answered = answered.expect("the in-flight call completes");
    assert!(answered.into_inner().allowed);
    assert_eq!(exit_code(&mut p).await, Some(0));
}

#[tokio::test]
async fn past_the_grace_period_the_process_exits_zero_anyway() {
    let redis = RedisServer::start();
    let mut p = WaquotaProcess::start(&[
        "--redis",
        &redis.url(),
        "--redis-timeout-ms",
        "60000",
        "--shutdown-grace-ms",
        "300",
    ]);
    let channel = connect(&p.endpoint()).await;
    let mut q = QuotaServiceClient::new(channel);
    q.acquire(acquire_req("warm-up")).await.expect("warm-up");

    pause_writes(redis.port, 30_000);
    let in_flight = {
        let mut q = q.clone();
        tokio::spawn(async move { q.acquire(acquire_req("stuck")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&mut p);
    let code = exit_code(&mut p).await;
    // Redis still holds the call: the process stopped without waiting for it.
    let answered = in_flight.await.unwrap();
    unpause(redis.port);
    assert_eq!(code, Some(0));
    assert!(answered.is_err(), "{answered:?}");
}

#[tokio::test]
async fn during_shutdown_delay_health_is_not_serving_and_calls_still_succeed() {
    let server = common::TestServer::start_with(common::Backend::Memory, |s| {
        s.shutdown_delay = Duration::from_secs(10);
    })
    .await;
    let channel = connect(&server.endpoint()).await;
    let mut q = QuotaServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let check = HealthCheckRequest {
        service: String::new(),
    };
    let status = health
        .check(check.clone())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    drop(server); // signals shutdown; the server goes on in the background
    eventually("health to turn NOT_SERVING", || {
        let (mut health, check) = (health.clone(), check.clone());
        async move {
            let status = health.check(check).await.unwrap().into_inner().status;
            (status == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    let r = q
        .acquire(AcquireRequest {
            sender: "s1".into(),
            recipient: "r1".into(),
            ..Default::default()
        })
        .await
        .expect("calls are still served while balancers drain");
    assert!(r.into_inner().allowed);
}
