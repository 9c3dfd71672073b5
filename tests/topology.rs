//! The production-topology harness itself (`tests/common/topology.rs`): nginx running
//! `deploy/nginx.conf` proxies gRPC to the instances, the sentinels of `deploy/sentinel.conf`
//! fail over a killed primary, and a Redis Cluster with replicas fails over a killed master and
//! moves a slot. The fault tests (`tests/faults.rs`) build on these.

mod common;

use std::time::{Duration, Instant};

use common::topology::{Fleet, Nginx, SentinelSet, info, nginx_conf, redis_cli};
use common::{RedisCluster, connect, eventually, raw_command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use waquota::proto::AcquireRequest;
use waquota::proto::quota_service_client::QuotaServiceClient;

async fn health(endpoint: &str) -> Option<ServingStatus> {
    let mut h = HealthClient::new(connect(endpoint).await);
    let r = h
        .check(HealthCheckRequest {
            service: "waquota.v1.QuotaService".into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

#[test]
fn the_shipped_nginx_conf_takes_the_test_upstreams_and_port() {
    let template =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf")).unwrap();
    let addrs = [
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    let conf = nginx_conf(&template, &addrs, 3);
    assert!(
        conf.contains("server 127.0.0.1:1 max_fails=1 fail_timeout=2s;"),
        "{conf}"
    );
    assert!(
        conf.contains("server 127.0.0.1:2 max_fails=1 fail_timeout=2s;"),
        "{conf}"
    );
    let directives: Vec<&str> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !directives.iter().any(|l| l.contains("waquota-")),
        "no compose host names left: {conf}"
    );
    assert!(conf.contains("listen 127.0.0.1:3 http2;"), "{conf}");
    assert!(conf.contains("grpc_pass grpc://waquota;"));
    assert!(conf.contains("grpc_next_upstream error;"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxies_grpc_to_the_instances() {
    let fleet = Fleet::start(2, &[]);
    let nginx = Nginx::start(&fleet.addrs());
    let status = health(&nginx.endpoint()).await;
    assert_eq!(
        status,
        Some(ServingStatus::Serving),
        "{}",
        nginx.error_log()
    );
    // A decision through the balancer, on each instance's in-memory ledger in turn.
    let mut q = QuotaServiceClient::new(connect(&nginx.endpoint()).await);
    for i in 0..4 {
        let r = q
            .acquire(AcquireRequest {
                sender: "lb-sender".into(),
                recipient: format!("49151000000{i:02}"),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("acquire through nginx: {e:?}\n{}", nginx.error_log()))
            .into_inner();
        assert!(r.allowed, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_skips_an_instance_that_is_down() {
    let mut fleet = Fleet::start(2, &[]);
    let nginx = Nginx::start(&fleet.addrs());
    fleet.kill9(0);
    // Connection refused is retried on the other instance (grpc_next_upstream error).
    for _ in 0..6 {
        assert_eq!(
            health(&nginx.endpoint()).await,
            Some(ServingStatus::Serving)
        );
    }
    fleet.restart(0);
    let direct = health(&fleet.endpoint(0)).await;
    assert_eq!(direct, Some(ServingStatus::Serving));
    fleet.kill9(1);
    // Only the restarted instance is left: the balancer reaches it once fail_timeout passed.
    let status = eventually("nginx reaching the restarted instance", || async {
        health(&nginx.endpoint()).await
    })
    .await;
    assert_eq!(status, ServingStatus::Serving);
}

#[test]
fn sentinels_fail_over_a_killed_primary() {
    let mut set = SentinelSet::start();
    assert_eq!(set.master_name(), "waquota");
    assert_eq!(set.sentinel_urls().split(',').count(), 3);
    let old = set.primary_port();
    assert_eq!(old, set.nodes[0].port, "the first node starts as primary");
    let set_key = raw_command(old, "SET before-failover 1").unwrap();
    assert!(set_key.starts_with("+OK"), "{set_key}");
    // The replica has the key before the primary dies (so the check below is about failover).
    let replica = set.nodes[1].port;
    common::wait_until("the key on the replica", || {
        raw_command(replica, "GET before-failover")
            .is_some_and(|r| r.contains("\r\n1\r\n"))
            .then_some(())
    });
    let killed_at = Instant::now();
    assert_eq!(set.kill_primary(), old);
    let new = set.wait_for_failover(old);
    let took = killed_at.elapsed();
    eprintln!("TOPOLOGY sentinel failover: {:.1} s", took.as_secs_f64());
    assert_eq!(new, replica);
    assert!(info(new, "replication").contains("role:master"));
    assert!(raw_command(new, "GET before-failover").is_some_and(|r| r.contains("\r\n1\r\n")));
    // The old primary comes back as a replica of the new one and syncs from it.
    set.rejoin(old, new, true);
    assert!(raw_command(old, "GET before-failover").is_some_and(|r| r.contains("\r\n1\r\n")));
    assert_eq!(set.primary_port(), new);
}

#[test]
fn a_cluster_with_replicas_moves_a_slot_and_fails_over_a_killed_master() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    assert_eq!(cluster.nodes.len(), 6);
    assert_eq!(cluster.masters().len(), 3);
    let key = "wq:{s:topology-sender}:x";
    let slot = cluster.key_slot(key);
    let owner = cluster.master_of_key_slot(slot);
    assert_eq!(
        redis_cli(owner, &["SET", key, "1"]).as_deref(),
        Some("OK\n")
    );

    let to = *cluster.masters().iter().find(|m| **m != owner).unwrap();
    let start = Instant::now();
    cluster.reshard(slot, to, 10);
    eprintln!(
        "TOPOLOGY cluster reshard of one slot: {} ms",
        start.elapsed().as_millis()
    );
    assert_eq!(cluster.master_of_key_slot(slot), to);
    assert_eq!(redis_cli(to, &["GET", key]).as_deref(), Some("1\n"));

    let killed_at = Instant::now();
    cluster.kill_synced(to);
    let new = cluster.wait_for_failover(to, slot);
    eprintln!(
        "TOPOLOGY cluster failover: {:.1} s",
        killed_at.elapsed().as_secs_f64()
    );
    assert_ne!(new, to);
    assert_eq!(redis_cli(new, &["GET", key]).as_deref(), Some("1\n"));
    assert!(info(new, "replication").contains("role:master"));
    assert!(
        Duration::from_secs(30) > killed_at.elapsed(),
        "failover took {:?}",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_loses_no_call_when_an_instance_shuts_down_gracefully() {
    let mut fleet = Fleet::start(2, &[]);
    let nginx = Nginx::start(&fleet.addrs());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..8 {
        let (endpoint, stop) = (nginx.endpoint(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut q = QuotaServiceClient::new(connect(&endpoint).await);
            let (mut ok, mut failed) = (0, Vec::new());
            for n in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let got = q
                    .acquire(AcquireRequest {
                        sender: format!("drain-{client}"),
                        recipient: format!("{}", 4_915_100_000_000u64 + n),
                        ..Default::default()
                    })
                    .await;
                match got {
                    Ok(_) => ok += 1,
                    Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM: health NOT_SERVING, the listener closes (GOAWAY), calls in flight finish.
    let pid = fleet.instances[0].child().id() as libc::pid_t;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exited = fleet.instances[0].child().wait().expect("wait");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        let (o, f) = t.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!(
        "TOPOLOGY graceful shutdown behind nginx: instance exited {exited}; {ok} calls answered, \
         {} failed {:?}",
        failed.len(),
        failed.first()
    );
    assert!(exited.success(), "{exited}");
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}
