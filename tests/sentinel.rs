//! Sentinel: waquota finds the primary through the sentinels and follows a failover without a
//! restart. Under load (16 clients, one sender at limit 250, 1,000 distinct recipients), the
//! primary is killed with SIGKILL; the sentinels promote the replica and the service carries on.
//! With `durability = replicated` no admission is lost in the failover, so the run admits at
//! most the limit; with `async` the over-admission is measured (docs/contract.md,
//! "Durability"). With TLS on the sentinels and the data nodes, waquota finds and uses the
//! primary over `rediss://` (a test CA as `redis_ca`), before and after a failover.
//!
//! Figures are printed as `FAULT <name>: ...` lines (FAULTS.md).

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dsl::{policy, put_policy, sender};
use common::ops::Pki;
use common::topology::{SentinelSet, redis_cli};
use common::{Backend, MAX_ATTEMPTS, RETRY_PAUSE, TestServer, raw_command};
use waquota::config::{Durability, Store};
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{AcquireRequest, AcquireResponse, Decision, InspectRequest, Tier, WindowMode};

const SENDER: &str = "sender-ha";
const LIMIT: usize = 250;
const CLIENTS: usize = 16;
const DISTINCT: usize = 1_000;

/// `recovery`: from the kill to the end of the last failed call.
struct Run {
    /// Distinct recipients that got an allowing answer.
    admitted: usize,
    failed: usize,
    recovery: Duration,
    used_after: u64,
}

async fn server_on(set: &SentinelSet, durability: Durability) -> TestServer {
    server_with_urls(set, durability, set.sentinel_urls()).await
}

async fn server_with_urls(set: &SentinelSet, durability: Durability, urls: String) -> TestServer {
    server_with_ca(set, durability, urls, None).await
}

/// `server_with_urls`, with `redis_ca` as the roots the `rediss://` sentinels and data nodes
/// must chain to.
async fn server_with_ca(
    set: &SentinelSet,
    durability: Durability,
    urls: String,
    redis_ca: Option<PathBuf>,
) -> TestServer {
    let sentinels: Vec<String> = urls.split(',').map(String::from).collect();
    let master = set.master_name().to_owned();
    TestServer::start_with(Backend::Memory, move |s| {
        s.store = Store::Sentinel { sentinels, master };
        s.redis_ca = redis_ca;
        s.durability = durability;
        s.redis_timeout = Duration::from_millis(1000);
        s.durability_timeout = Duration::from_millis(200);
    })
    .await
}

/// Runs the load on `srv`, killing the primary once a fifth of the recipients were asked.
async fn failover_under_load(set: &mut SentinelSet, srv: &TestServer) -> Run {
    put_policy(
        &mut srv.admin().await,
        sender(SENDER),
        policy(Tier::Tier250, 0, WindowMode::Conversation),
    )
    .await;
    let next = Arc::new(AtomicUsize::new(0));
    let admitted = Arc::new(Mutex::new(HashSet::new()));
    let failed = Arc::new(AtomicUsize::new(0));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let last_failure: Arc<Mutex<Option<Instant>>> = Arc::default();
    let kill_now = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut q: QuotaServiceClient<_> = srv.quota().await;
        let (next, admitted, failed) = (next.clone(), admitted.clone(), failed.clone());
        let (last_failure, kill_now) = (last_failure.clone(), kill_now.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= DISTINCT {
                    return;
                }
                if i == DISTINCT / 5 {
                    kill_now.store(true, Ordering::Release);
                }
                let recipient = format!("{}", 4_915_200_000_000u64 + i as u64);
                // A call that failed in the failover is retried, as a worker would. Whatever
                // admits a send counts: ALLOWED_COUNTED too, for a recipient whose first call
                // failed after its script ran.
                let (r, n) = ask_through(&mut q, &recipient).await;
                if n > 0 {
                    failed.fetch_add(n, Ordering::Relaxed);
                    *last_failure.lock().unwrap() = Some(Instant::now());
                }
                if r.allowed {
                    admitted.lock().unwrap().insert(recipient);
                }
            }
        }));
    }
    // The kill, from this task, once the load has reached it.
    while !kill_now.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let old = set.kill_primary();
    *killed_at.lock().unwrap() = Some(Instant::now());
    tokio::task::block_in_place(|| {
        let new = set.wait_for_failover(old);
        // The old primary comes back as the new primary's replica (as an operator, or the
        // sentinels a little later, would make it): with `replicated` and one replica, changes
        // are acknowledged again from then on.
        set.rejoin(old, new, false);
    });
    for t in tasks {
        t.await.unwrap();
    }
    let killed = killed_at.lock().unwrap().unwrap();
    let recovered = last_failure.lock().unwrap().unwrap_or(killed).max(killed);
    let used_after = srv
        .admin()
        .await
        .inspect(InspectRequest {
            target: sender(SENDER),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .used;
    let admitted = admitted.lock().unwrap().len();
    Run {
        admitted,
        failed: failed.load(Ordering::Relaxed),
        recovery: recovered - killed,
        used_after,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_durability_follows_a_failover_and_never_over_admits() {
    let mut set = SentinelSet::start();
    let srv = server_on(&set, Durability::Replicated).await;
    let run = failover_under_load(&mut set, &srv).await;
    eprintln!(
        "FAULT sentinel-failover replicated: admitted {} of limit {LIMIT}, {} calls failed, recovered in {} ms, used on the new primary {}",
        run.admitted,
        run.failed,
        run.recovery.as_millis(),
        run.used_after
    );
    assert!(run.admitted <= LIMIT, "over-admitted: {}", run.admitted);
    // Every answered admission reached the replica before it was answered, so the new primary
    // holds at least those (and at most the limit).
    assert!(
        run.used_after as usize >= run.admitted && run.used_after as usize <= LIMIT,
        "used {} after admitting {}",
        run.used_after,
        run.admitted
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn async_durability_follows_a_failover_and_its_over_admission_is_measured() {
    let mut over = Vec::new();
    for _ in 0..3 {
        let mut set = SentinelSet::start();
        let srv = server_on(&set, Durability::Async).await;
        let run = failover_under_load(&mut set, &srv).await;
        eprintln!(
            "FAULT sentinel-failover async: admitted {} of limit {LIMIT}, {} calls failed, recovered in {} ms, used on the new primary {}",
            run.admitted,
            run.failed,
            run.recovery.as_millis(),
            run.used_after
        );
        // The service follows the failover and keeps deciding: the rest of the day's capacity
        // is used up on the new primary.
        assert_eq!(run.used_after as usize, LIMIT);
        assert!(run.admitted >= LIMIT, "{} admitted", run.admitted);
        over.push(run.admitted - LIMIT);
    }
    eprintln!("FAULT sentinel-failover async: over-admission per run {over:?}");
}

/// Decides `recipient` on the store's clock, retrying while the store is failing over
/// (bounded); returns the decision and how many calls failed first.
async fn decide_through(srv: &TestServer, recipient: &str) -> (Decision, usize) {
    let (r, failed) = ask_through(&mut srv.quota().await, recipient).await;
    (r.decision(), failed)
}

/// The error of one Acquire that the store cannot answer.
async fn refused(srv: &TestServer, recipient: &str) -> tonic::Status {
    srv.quota()
        .await
        .acquire(AcquireRequest {
            sender: SENDER.into(),
            recipient: recipient.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
}

/// Asks for `recipient` until the store answers, retrying calls that fail `UNAVAILABLE` while
/// it fails over (at most `MAX_ATTEMPTS`, as a worker would); the answer and how many failed.
async fn ask_through(
    q: &mut QuotaServiceClient<tonic::transport::Channel>,
    recipient: &str,
) -> (AcquireResponse, usize) {
    for failed in 0..MAX_ATTEMPTS {
        let r = q
            .acquire(AcquireRequest {
                sender: SENDER.into(),
                recipient: recipient.into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => return (r.into_inner(), failed),
            Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e}"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    panic!("no recovery after {MAX_ATTEMPTS} attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_failover_demotes_the_primary_and_waquota_follows_the_new_one() {
    let set = SentinelSet::start();
    let srv = server_on(&set, Durability::Async).await;
    assert_eq!(
        decide_through(&srv, "4915200000001").await,
        (Decision::AllowedNew, 0)
    );
    // No process dies: the old primary becomes a replica and answers writes with READONLY,
    // while the sentinels announce +switch-master.
    let old = set.primary_port();
    let reply = raw_command(
        set.sentinel_ports()[0],
        &format!("SENTINEL FAILOVER {}", set.master_name()),
    );
    assert!(reply.is_some_and(|r| r.starts_with("+OK")));
    let start = Instant::now();
    let new = tokio::task::block_in_place(|| set.wait_for_failover(old));
    let (d, failed) = decide_through(&srv, "4915200000001").await;
    assert_eq!(
        d,
        Decision::AllowedCounted,
        "the slot is on the new primary"
    );
    let (d, _) = decide_through(&srv, "4915200000002").await;
    assert_eq!(d, Decision::AllowedNew);
    eprintln!(
        "FAULT sentinel-manual-failover: {failed} calls failed, served by the new primary {} ms after the failover began",
        start.elapsed().as_millis()
    );
    let on_new = raw_command(new, "EXISTS wq:{s:sender-ha}:w").unwrap_or_default();
    assert!(on_new.starts_with(":1"), "{on_new}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinels_and_data_nodes_behind_an_acl_user() {
    // On the data nodes only the ACL user waquota may run scripts (the default user may only
    // PING, INFO and ROLE); the replica and the sentinels use it too, and so does waquota, from
    // the credentials of the sentinel URLs.
    #[rustfmt::skip]
    let set = SentinelSet::start_with(
        &[
            "--user", "default", "on", "nopass", "~*", "&*", "-@all", "+ping", "+info", "+role",
            "--user", "waquota", "on", ">s3cret", "~*", "&*", "+@all",
            "--masteruser", "waquota", "--masterauth", "s3cret",
        ],
        &[
            "sentinel auth-user waquota waquota",
            "sentinel auth-pass waquota s3cret",
            "user waquota on >s3cret ~* &* +@all",
        ],
    );
    let with_user = |urls: String| {
        urls.split(',')
            .map(|u| u.replace("redis://", "redis://waquota:s3cret@"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let srv = server_with_urls(&set, Durability::Async, with_user(set.sentinel_urls())).await;
    assert_eq!(
        decide_through(&srv, "4915200000001").await,
        (Decision::AllowedNew, 0)
    );
    // A wrong password is refused by the store: UNAVAILABLE, never a decision.
    let wrong = set
        .sentinel_urls()
        .split(',')
        .map(|u| u.replace("redis://", "redis://waquota:wrong@"))
        .collect::<Vec<_>>()
        .join(",");
    let bad = server_with_urls(&set, Durability::Async, wrong).await;
    let e = refused(&bad, "4915200000002").await;
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
}

/// The local ports of the clients of the node or sentinel on `port` (`laddr` in `CLIENT
/// LIST`), but the one asking.
fn client_ports(port: u16) -> Vec<u16> {
    let list = redis_cli(port, &["CLIENT", "LIST"]).unwrap_or_default();
    list.lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| {
            let laddr = l.split(' ').find_map(|f| f.strip_prefix("laddr="))?;
            laddr.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// Every client of the process on `port` (waquota's among them) came in on `tls_port`.
fn only_tls_clients(port: u16, tls_port: u16) {
    let ports = client_ports(port);
    assert!(
        !ports.is_empty() && ports.iter().all(|p| *p == tls_port),
        "clients of {port} came in on {ports:?}, not only on its TLS port {tls_port}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sentinels_and_data_nodes_over_tls() {
    // The data nodes and the sentinels speak TLS (certificates from the test's own CA) to
    // waquota, to each other and for replication; their plain ports are the harness's only.
    // waquota has rediss:// seeds and the CA: the sentinels name the primary's TLS port, and
    // waquota reaches it with the seeds' TLS settings.
    let began = Instant::now();
    let pki = Pki::generate();
    let mut set = SentinelSet::start_tls(&pki);
    let urls = set.sentinel_tls_urls();
    let srv = server_with_ca(&set, Durability::Async, urls.clone(), Some(pki.ca())).await;
    assert_eq!(
        decide_through(&srv, "4915200000001").await,
        (Decision::AllowedNew, 0)
    );
    let old = set.primary_port();
    only_tls_clients(old, set.announced_port(old));
    for (port, tls_port) in set
        .sentinel_ports()
        .into_iter()
        .zip(set.sentinel_tls_ports())
    {
        only_tls_clients(port, tls_port);
    }
    eprintln!("sentinel-tls: decided over TLS via {urls}");

    // The same TLS ports as plain redis:// seeds: no sentinel answers, UNAVAILABLE.
    let plain = urls.replace("rediss://", "redis://");
    let bad = server_with_urls(&set, Durability::Async, plain).await;
    let e = refused(&bad, "4915200000002").await;
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    eprintln!("sentinel-tls: plain seeds on the TLS ports: {e}");

    // A failover: the replica is promoted and waquota reaches it over TLS too.
    let killed = Instant::now();
    assert_eq!(set.kill_primary(), old);
    let new = tokio::task::block_in_place(|| set.wait_for_failover(old));
    let (d, failed) = decide_through(&srv, "4915200000002").await;
    assert_eq!(d, Decision::AllowedNew);
    let on_new = raw_command(new, "EXISTS wq:{s:sender-ha}:w").unwrap_or_default();
    assert!(on_new.starts_with(":1"), "{on_new}");
    only_tls_clients(new, set.announced_port(new));
    eprintln!(
        "sentinel-tls: after killing port {old}, decided on the promoted {new} (TLS port {}) {} ms after the kill, {failed} calls failed; whole test {} ms",
        set.announced_port(new),
        killed.elapsed().as_millis(),
        began.elapsed().as_millis()
    );
}
