//! A lost ledger is detected, never silently trusted (docs/contract.md, "A lost ledger"), and
//! `durability = replicated` answers a change only once a replica has it. Real redis-server
//! processes: FLUSHALL, a restart without persistence, a clean restart with AOF, a replica that
//! stops acknowledging.
//!
//! These tests decide on the store's clock (no `at`), since the health probe also looks at the
//! marker on it; where a window must pass, the trusted clock jumps a day past the loss.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::ops::{http_get, http_get_ready, metric};
use common::{
    DAY, MAX_ATTEMPTS, RETRY_PAUSE, RedisServer, TestServer, raw_command, ts, wait_until,
};
use waquota::config::{Durability, OnLedgerLoss, Settings, Store};
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{
    AcquireRequest, AcquireResponse, Decision, InspectRequest, RecordInboundRequest, Target, target,
};

const SENDER: &str = "sender-loss";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn acquire_at(
    q: &mut QuotaServiceClient<tonic::transport::Channel>,
    recipient: &str,
    at: Option<i64>,
) -> Result<AcquireResponse, tonic::Status> {
    q.acquire(AcquireRequest {
        sender: SENDER.into(),
        recipient: recipient.into(),
        at: at.map(ts),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn decide(
    q: &mut QuotaServiceClient<tonic::transport::Channel>,
    recipient: &str,
) -> Decision {
    acquire_at(q, recipient, None).await.unwrap().decision()
}

/// A server on `redis` with a metrics listener; `tweak` sets the rest.
async fn server_on(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut Settings),
) -> (TestServer, SocketAddr) {
    let url = redis.url();
    let srv = TestServer::start_with(common::Backend::Memory, |s| {
        s.store = Store::Redis { url };
        s.metrics_listen = Some(common::ANY_PORT);
        s.redis_timeout = Duration::from_millis(500);
        tweak(s);
    })
    .await;
    let metrics = srv.metrics.unwrap();
    http_get_ready(metrics, "/metrics");
    (srv, metrics)
}

fn scrape(addr: SocketAddr, series: &str) -> f64 {
    metric(&http_get(addr, "/metrics").1, series).unwrap_or_else(|| panic!("no {series}"))
}

fn cli(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_waquota"))
        .args(["--addr", endpoint])
        .args(args)
        .output()
        .expect("run waquota");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The decision for `recipient` once the store answers again: calls failing `UNAVAILABLE`
/// meanwhile are retried (at most `MAX_ATTEMPTS`); returns the decision and how many failed.
async fn decide_through(
    q: &mut QuotaServiceClient<tonic::transport::Channel>,
    recipient: &str,
) -> (Decision, usize) {
    for failed in 0..MAX_ATTEMPTS {
        match acquire_at(q, recipient, None).await {
            Ok(r) => return (r.decision(), failed),
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e}"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    panic!("the store did not answer again after {MAX_ATTEMPTS} attempts");
}

async fn decide_once_back(
    q: &mut QuotaServiceClient<tonic::transport::Channel>,
    recipient: &str,
) -> Decision {
    decide_through(q, recipient).await.0
}

async fn used(srv: &TestServer) -> u64 {
    srv.admin()
        .await
        .inspect(InspectRequest {
            target: Some(Target {
                target: Some(target::Target::Sender(SENDER.into())),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .used
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_ledger_refuses_new_slots_until_an_operator_accepts_the_loss() {
    let redis = RedisServer::start();
    let (srv, metrics) = server_on(&redis, |_| {}).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 0.0);
    let (code, body) = http_get(metrics, "/health");
    assert_eq!((code, body.as_str()), (200, "{\"ledger\":\"whole\"}\n"));

    // Someone's FLUSHALL: the day's admissions are gone from Redis.
    assert!(raw_command(redis.port, "FLUSHALL").is_some_and(|r| r.starts_with("+OK")));
    let lost_at = now_ms();
    let r = acquire_at(&mut q, "4915100000002", None).await.unwrap();
    assert_eq!(r.decision(), Decision::DeniedLedgerLost, "{r:?}");
    let retry = common::dsl::retry_after(&r);
    assert!(
        (DAY - 5_000..=DAY).contains(&retry),
        "new slots wait one window from the loss: retry_after {retry} ms"
    );
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 1.0);
    assert_eq!(scrape(metrics, "waquota_ledger_lost"), 1.0);
    let (code, body) = http_get(metrics, "/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"ledger\":\"lost\""), "{body}");
    // Nothing was recorded for the refused user.
    assert_eq!(used(&srv).await, 0);

    // A service window opened after the loss still admits, uncounted.
    q.record_inbound(RecordInboundRequest {
        sender: SENDER.into(),
        recipient: "4915100000003".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        decide(&mut q, "4915100000003").await,
        Decision::AllowedServiceWindow
    );
    // Found once: the refusals that follow do not count again.
    assert_eq!(
        decide(&mut q, "4915100000004").await,
        Decision::DeniedLedgerLost
    );
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 1.0);

    let (code, out, err) = cli(&srv.endpoint(), &["ledger", "accept-loss"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ledger loss (since ")
            && out.ends_with("accepted: new slots are admitted again\n"),
        "{out}"
    );
    assert_eq!(decide(&mut q, "4915100000002").await, Decision::AllowedNew);
    assert_eq!(scrape(metrics, "waquota_ledger_lost"), 0.0);
    let (code, _) = http_get(metrics, "/health");
    assert_eq!(code, 200);
    let (code, out, _) = cli(&srv.endpoint(), &["ledger", "accept-loss"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "the ledger was not lost: nothing to accept\n")
    );
    assert!(now_ms() - lost_at < DAY);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_ledger_is_trusted_again_one_window_after_the_loss() {
    let redis = RedisServer::start();
    let (srv, _) = server_on(&redis, |_| {}).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    raw_command(redis.port, "FLUSHALL");
    let r = acquire_at(&mut q, "4915100000002", None).await.unwrap();
    assert_eq!(r.decision(), Decision::DeniedLedgerLost);
    let free_at = now_ms() + common::dsl::retry_after(&r);
    // A moment before the window has passed: still refused; at it: admitted.
    let early = acquire_at(&mut q, "4915100000002", Some(free_at - 10_000))
        .await
        .unwrap();
    assert_eq!(early.decision(), Decision::DeniedLedgerLost);
    let late = acquire_at(&mut q, "4915100000002", Some(free_at + 1_000))
        .await
        .unwrap();
    assert_eq!(late.decision(), Decision::AllowedNew, "{late:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_on_ledger_loss_allow_a_loss_is_reported_and_admission_goes_on() {
    let redis = RedisServer::start();
    let (srv, metrics) = server_on(&redis, |s| s.on_ledger_loss = OnLedgerLoss::Allow).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    raw_command(redis.port, "FLUSHALL");
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 1.0);
    assert_eq!(scrape(metrics, "waquota_ledger_lost"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_health_probe_finds_a_loss_without_any_decision() {
    let redis = RedisServer::start();
    let (srv, metrics) = server_on(&redis, |_| {}).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    raw_command(redis.port, "FLUSHALL");
    // The probe runs each second; bounded wait for it, no decision made meanwhile.
    wait_until("the probe reports the loss", || {
        (scrape(metrics, "waquota_ledger_lost_total") == 1.0).then_some(())
    });
    assert_eq!(
        raw_command(redis.port, "GET wq:ledger").map(|r| r.starts_with("$")),
        Some(true),
        "the loss is recorded in Redis, for every instance to see"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_without_persistence_is_a_loss_and_a_clean_restart_with_aof_is_not() {
    // No persistence: kill -9 and back empty.
    let mut redis = RedisServer::start();
    let (srv, metrics) = server_on(&redis, |_| {}).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    redis.restart();
    let d = decide_once_back(&mut q, "4915100000002").await;
    assert_eq!(d, Decision::DeniedLedgerLost);
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 1.0);
    let (code, _, err) = cli(&srv.endpoint(), &["ledger", "accept-loss"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(decide(&mut q, "4915100000002").await, Decision::AllowedNew);
    drop(srv);

    // AOF everysec and a clean restart (SHUTDOWN writes it out): the ledger survives.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let (srv, metrics) = server_on(&redis, |_| {}).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    let _ = raw_command(redis.port, "SHUTDOWN");
    redis.restart();
    let d = decide_once_back(&mut q, "4915100000001").await;
    assert_eq!(d, Decision::AllowedCounted, "the slot survived the restart");
    assert_eq!(decide(&mut q, "4915100000002").await, Decision::AllowedNew);
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 0.0);
}

/// A primary and one replica of it.
fn primary_and_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    wait_until("the replica in sync", || {
        raw_command(replica.port, "INFO replication")
            .is_some_and(|r| r.contains("master_link_status:up"))
            .then_some(())
    });
    (primary, replica)
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_durability_answers_once_a_replica_has_the_change() {
    let (primary, mut replica) = primary_and_replica();
    let (srv, metrics) = server_on(&primary, |s| {
        s.durability = Durability::Replicated;
        s.durability_timeout = Duration::from_millis(50);
    })
    .await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    assert_eq!(scrape(metrics, "waquota_durability_timeouts_total"), 0.0);
    // The slot is on the replica already: it was acknowledged before the answer.
    let on_replica = raw_command(replica.port, "KEYS wq:{s:sender-loss}:w:*").unwrap_or_default();
    assert!(on_replica.contains("wq:{s:sender-loss}:w:"), "{on_replica}");

    // The replica goes away: a change is answered UNAVAILABLE within the WAIT timeout, and the
    // slot stays consumed (the safe side).
    replica.kill();
    let e = acquire_at(&mut q, "4915100000002", None).await.unwrap_err();
    // WAIT's own timeout answered (it names the replicas), not the store timeout.
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("replica"), "{e}");
    assert_eq!(scrape(metrics, "waquota_durability_timeouts_total"), 1.0);
    assert_eq!(
        used(&srv).await,
        2,
        "the unacknowledged slot stays consumed"
    );
    // Reads do not wait for replicas.
    assert_eq!(
        srv.admin()
            .await
            .inspect(InspectRequest {
                target: Some(Target {
                    target: Some(target::Target::Sender(SENDER.into())),
                }),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code()),
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_cluster_each_slot_has_its_marker_and_a_flushed_node_is_found() {
    let srv = TestServer::start(common::Backend::Cluster).await;
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915100000001").await, Decision::AllowedNew);
    let nodes: Vec<u16> = srv
        .cluster()
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.port)
        .collect();
    // One marker per hash slot, spread over the masters.
    let markers: usize = nodes
        .iter()
        .map(|p| {
            let r = raw_command(*p, "EVAL \"return #redis.call('KEYS', 'wq:ledger:*')\" 0")
                .unwrap_or_default();
            r.trim_start_matches(':')
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(markers, 16_384);
    for p in &nodes {
        raw_command(*p, "FLUSHALL");
    }
    assert_eq!(
        decide(&mut q, "4915100000002").await,
        Decision::DeniedLedgerLost
    );
    let (code, out, err) = cli(&srv.endpoint(), &["ledger", "accept-loss"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ledger loss (since "), "{out}");
    assert_eq!(decide(&mut q, "4915100000002").await, Decision::AllowedNew);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_under_load_admits_no_new_slot_until_accept_loss() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 8;
    const RECIPIENTS: usize = 600;
    let mut redis = RedisServer::start();
    let (srv, metrics) = server_on(&redis, |_| {}).await;
    let next = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    // (sent after the kill, decision) of every answered call.
    let answers: Arc<Mutex<Vec<(bool, Decision)>>> = Arc::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut q = srv.quota().await;
        let (next, killed, answers, failed) = (
            next.clone(),
            killed.clone(),
            answers.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= RECIPIENTS {
                    return;
                }
                let recipient = format!("{}", 4_915_300_000_000u64 + i as u64);
                // Whether the call that decided was sent after the kill: the flag is read
                // before each attempt, so a retry after the kill counts as after it.
                let after_kill = killed.load(Ordering::Acquire);
                let (d, n) = decide_through(&mut q, &recipient).await;
                let after_kill = after_kill || n > 0;
                answers.lock().unwrap().push((after_kill, d));
                failed.fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    while next.load(Ordering::Relaxed) < RECIPIENTS / 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    killed.store(true, Ordering::Release);
    tokio::task::block_in_place(|| redis.restart());
    for t in tasks {
        t.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let new_after: usize = answers
        .iter()
        .filter(|(after, d)| *after && *d == Decision::AllowedNew)
        .count();
    let lost_after = answers
        .iter()
        .filter(|(after, d)| *after && *d == Decision::DeniedLedgerLost)
        .count();
    let new_before = answers
        .iter()
        .filter(|(after, d)| !*after && *d == Decision::AllowedNew)
        .count();
    eprintln!(
        "FAULT redis_restart_empty: {CLIENTS} clients, {RECIPIENTS} recipients; {new_before} admitted before the kill, {} calls failed while Redis restarted, after it {lost_after} refused DENIED_LEDGER_LOST and {new_after} admitted",
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(new_after, 0, "no new slot on the empty ledger");
    assert!(lost_after > 0);
    assert_eq!(scrape(metrics, "waquota_ledger_lost_total"), 1.0);
    let (code, _, err) = cli(&srv.endpoint(), &["ledger", "accept-loss"]);
    assert_eq!(code, 0, "{err}");
    let mut q = srv.quota().await;
    assert_eq!(decide(&mut q, "4915300000000").await, Decision::AllowedNew);
}
