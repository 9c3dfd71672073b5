//! One Redis round trip per decision (docs/contract.md, "One round trip"): every Acquire,
//! AcquireBatch, Release and RecordInbound is exactly one FCALL, whatever the number of keys
//! and recipients.
//!
//! How it is measured, on every Redis node involved:
//! - `MONITOR` records every command Redis executes, with its origin: a client address, or
//!   `lua` for the commands a script runs. It is the proof that the client sent one command.
//! - `INFO commandstats` (after `CONFIG RESETSTAT`) counts every command executed, the ones a
//!   function runs included (Redis counts `redis.call` too); so besides `fcall calls=1`, every
//!   other command it counts must be one MONITOR saw coming from `lua`.
//! - Excluded from both: `ping`, sent once a second by the server's health probe (not part of
//!   any decision), and the test's own `config|resetstat`, `info` and `echo` (the marker that
//!   tells when MONITOR has caught up).
//!
//! Before measuring, each test warms up: enough calls that every pooled connection is open and
//! the function library is loaded on Redis, so the measured call is the steady state.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Backend, TestServer, raw_command};
use tonic::transport::Channel;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, AssignSenderRequest, Decision,
    RecordInboundRequest, ReleaseRequest,
};

// ------------------------------------------------------------------------------ Redis probes

/// Sends one command (RESP array) and reads its whole reply, however many reads that takes.
fn command(port: u16, args: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).expect("reply");
    match head.as_bytes().first() {
        Some(b'$') => {
            let len: i64 = head[1..].trim().parse().expect("bulk length");
            if len < 0 {
                return String::new();
            }
            let mut body = vec![0u8; len as usize + 2];
            r.read_exact(&mut body).expect("bulk body");
            body.truncate(len as usize);
            String::from_utf8_lossy(&body).into_owned()
        }
        Some(b'-') => panic!("redis refused {args:?}: {head}"),
        _ => head.trim_end().to_owned(),
    }
}

/// `INFO commandstats` as command name -> calls.
fn commandstats(port: u16) -> BTreeMap<String, u64> {
    command(port, &["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

/// One `MONITOR` connection, its lines collected by a thread.
struct Monitor {
    stream: TcpStream,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Monitor {
    fn start(port: u16) -> Monitor {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
        stream.write_all(b"MONITOR\r\n").unwrap();
        let mut r = BufReader::new(stream.try_clone().unwrap());
        let mut ok = String::new();
        r.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim_end(), "+OK", "MONITOR refused");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push(line.trim_end().to_owned());
                line.clear();
            }
        });
        Monitor {
            stream,
            lines,
            reader: Some(reader),
        }
    }

    /// Lines seen before `marker` (waits until it arrives).
    fn until(&self, marker: &str) -> Vec<String> {
        common::wait_until(&format!("MONITOR to show {marker}"), || {
            let lines = self.lines.lock().unwrap();
            let end = lines.iter().position(|l| l.contains(marker))?;
            Some(lines[..end].to_vec())
        })
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Commands that `INFO commandstats` names `command|subcommand`.
const CONTAINERS: [&str; 10] = [
    "client", "cluster", "config", "script", "object", "command", "memory", "function", "acl",
    "xinfo",
];

/// A MONITOR line as (from lua?, command name as commandstats spells it).
fn parse_monitor(line: &str) -> Option<(bool, String)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let origin = &line[open + 1..close];
    let from_lua = origin.split_whitespace().nth(1) == Some("lua");
    let mut args = line[close + 1..].split('"').skip(1).step_by(2);
    let name = args.next()?.to_ascii_lowercase();
    let name = if CONTAINERS.contains(&name.as_str()) {
        match args.next() {
            Some(sub) => format!("{name}|{}", sub.to_ascii_lowercase()),
            None => name,
        }
    } else {
        name
    };
    Some((from_lua, name))
}

/// What Redis executed while one operation ran, summed over the nodes watched.
#[derive(Debug, Default)]
struct Trace {
    /// Commands clients sent, in order (health pings left out).
    client: Vec<String>,
    /// Commands scripts ran, by name.
    lua: BTreeMap<String, u64>,
    /// `INFO commandstats` calls, by name (the test's own commands and pings left out).
    stats: BTreeMap<String, u64>,
    /// Health-probe pings seen meanwhile (left out of the rest).
    pings: u64,
}

/// Not part of a decision: the health probe's PING, and this test's own probes.
const NOT_DECISIONS: [&str; 4] = ["ping", "info", "config|resetstat", "echo"];

static MARKS: AtomicU32 = AtomicU32::new(0);

/// Runs `op` with every node in `ports` watched, and returns its result and what Redis did.
async fn measure<T>(ports: &[u16], op: impl std::future::Future<Output = T>) -> (T, Trace) {
    let monitors: Vec<Monitor> = ports.iter().map(|p| Monitor::start(*p)).collect();
    for p in ports {
        let r = raw_command(*p, "CONFIG RESETSTAT");
        assert!(
            r.as_deref().is_some_and(|r| r.starts_with("+OK")),
            "CONFIG RESETSTAT: {r:?}"
        );
    }
    let out = op.await;
    let mut trace = Trace::default();
    for (p, m) in ports.iter().zip(&monitors) {
        let marker = format!(
            "waquota-round-trip-marker-{}",
            MARKS.fetch_add(1, Ordering::Relaxed)
        );
        command(*p, &["ECHO", &marker]);
        for line in m.until(&marker) {
            let Some((from_lua, name)) = parse_monitor(&line) else {
                continue;
            };
            if from_lua {
                *trace.lua.entry(name).or_default() += 1;
            } else if name == "ping" {
                trace.pings += 1;
            } else {
                trace.client.push(name);
            }
        }
        for (name, calls) in commandstats(*p) {
            if !NOT_DECISIONS.contains(&name.as_str()) {
                *trace.stats.entry(name).or_default() += calls;
            }
        }
    }
    (out, trace)
}

/// The client sent exactly the commands in `sent` (in order), and every other command Redis
/// counted was run by the script.
fn assert_round_trips(what: &str, trace: &Trace, sent: &[&str]) {
    println!(
        "{what}: client sent {:?}; scripts ran {:?}; commandstats {:?}; health pings meanwhile: {}",
        trace.client, trace.lua, trace.stats, trace.pings
    );
    assert_eq!(trace.client, sent, "{what}: commands the client sent");
    let mut expect_script_cmds: BTreeMap<&str, u64> = BTreeMap::new();
    for s in sent {
        *expect_script_cmds.entry(s).or_default() += 1;
    }
    for (name, calls) in &trace.stats {
        let by_client = expect_script_cmds.get(name.as_str()).copied().unwrap_or(0);
        let by_lua = trace.lua.get(name).copied().unwrap_or(0);
        assert_eq!(
            *calls,
            by_client + by_lua,
            "{what}: commandstats counts {calls} `{name}`, the client sent {by_client} and scripts ran {by_lua}"
        );
    }
    for s in sent {
        assert!(
            trace.stats.contains_key(*s),
            "{what}: commandstats lacks {s}"
        );
    }
}

fn assert_one_fcall(what: &str, trace: &Trace) {
    assert_round_trips(what, trace, &["fcall"]);
    assert_eq!(trace.stats.get("fcall"), Some(&1), "{what}: fcall calls=1");
}

// ------------------------------------------------------------------------------ requests

fn acquire(sender: &str, recipient: &str) -> AcquireRequest {
    AcquireRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        ..Default::default()
    }
}

async fn acquire_ok(
    q: &mut QuotaServiceClient<Channel>,
    sender: &str,
    recipient: &str,
) -> AcquireResponse {
    q.acquire(acquire(sender, recipient))
        .await
        .expect("acquire")
        .into_inner()
}

fn decision(r: &AcquireResponse) -> Decision {
    Decision::try_from(r.decision).unwrap_or(Decision::Unspecified)
}

/// Opens every pooled connection and caches the acquire, release and inbound scripts.
async fn warm_up(q: &mut QuotaServiceClient<Channel>, sender: &str) {
    let mut last = None;
    for i in 0..8 {
        let r = acquire_ok(q, sender, &format!("49170000000{i:02}")).await;
        assert_eq!(decision(&r), Decision::AllowedNew, "warm-up");
        last = Some(r);
    }
    let last = last.unwrap();
    q.release(ReleaseRequest {
        sender: sender.into(),
        recipient: last.recipient,
        reservation: last.reservation,
        at: None,
    })
    .await
    .expect("warm-up release");
    q.record_inbound(RecordInboundRequest {
        sender: sender.into(),
        recipient: "4917000000099".into(),
        ..Default::default()
    })
    .await
    .expect("warm-up inbound");
}

async fn standalone() -> (TestServer, u16, QuotaServiceClient<Channel>) {
    let mut server = TestServer::start(Backend::Redis).await;
    let port = server.redis().expect("standalone redis").port;
    let q = server.quota().await;
    (server, port, q)
}

// ------------------------------------------------------------------------------ standalone

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_is_one_fcall() {
    let (_server, port, mut q) = standalone().await;
    warm_up(&mut q, "rt-sender").await;

    let (r, trace) = measure(&[port], acquire_ok(&mut q, "rt-sender", "4915100000001")).await;
    assert_eq!(decision(&r), Decision::AllowedNew);
    assert_one_fcall("Acquire (new user)", &trace);

    let (r, trace) = measure(&[port], acquire_ok(&mut q, "rt-sender", "4915100000001")).await;
    assert_eq!(decision(&r), Decision::AllowedCounted);
    assert_one_fcall("Acquire (counted user)", &trace);

    let mut dry = acquire("rt-sender", "4915100000002");
    dry.dry_run = true;
    let (r, trace) = measure(&[port], async { q.acquire(dry).await.expect("dry run") }).await;
    assert_eq!(decision(&r.into_inner()), Decision::AllowedNew);
    assert_one_fcall("Acquire (dry run)", &trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_batch_of_100_is_one_fcall() {
    let (_server, port, mut q) = standalone().await;
    warm_up(&mut q, "rt-batch-sender").await;
    let recipients: Vec<String> = (0..100).map(|i| format!("4915100001{i:03}")).collect();
    let (results, trace) = measure(&[port], async {
        q.acquire_batch(AcquireBatchRequest {
            sender: "rt-batch-sender".into(),
            recipients: recipients.clone(),
            ..Default::default()
        })
        .await
        .expect("acquire_batch")
        .into_inner()
        .results
    })
    .await;
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|r| decision(r) == Decision::AllowedNew));
    assert_one_fcall("AcquireBatch of 100", &trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_is_one_fcall() {
    let (_server, port, mut q) = standalone().await;
    warm_up(&mut q, "rt-release-sender").await;
    let r = acquire_ok(&mut q, "rt-release-sender", "4915100000001").await;
    assert_eq!(decision(&r), Decision::AllowedNew);
    let req = ReleaseRequest {
        sender: "rt-release-sender".into(),
        recipient: r.recipient.clone(),
        reservation: r.reservation.clone(),
        at: None,
    };
    let (released, trace) = measure(&[port], async {
        q.release(req.clone())
            .await
            .expect("release")
            .into_inner()
            .released
    })
    .await;
    assert!(released);
    assert_one_fcall("Release", &trace);
    // Idempotent, and still one round trip.
    let (released, trace) = measure(&[port], async {
        q.release(req).await.expect("release").into_inner().released
    })
    .await;
    assert!(!released);
    assert_one_fcall("Release (again)", &trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_inbound_is_one_fcall() {
    let (_server, port, mut q) = standalone().await;
    warm_up(&mut q, "rt-inbound-sender").await;
    let (resp, trace) = measure(&[port], async {
        q.record_inbound(RecordInboundRequest {
            sender: "rt-inbound-sender".into(),
            recipient: "4915100000001".into(),
            free_entry_point: false,
            at: None,
        })
        .await
        .expect("record_inbound")
        .into_inner()
    })
    .await;
    assert!(resp.service_window_expires_at.is_some());
    assert_one_fcall("RecordInbound", &trace);
    // Inside the service window now: still one round trip, and not counted.
    let (r, trace) = measure(
        &[port],
        acquire_ok(&mut q, "rt-inbound-sender", "4915100000001"),
    )
    .await;
    assert_eq!(decision(&r), Decision::AllowedServiceWindow);
    assert_one_fcall("Acquire (service window)", &trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_for_a_portfolio_sender_is_one_fcall() {
    let (server, port, mut q) = standalone().await;
    let mut admin = server.admin().await;
    admin
        .assign_sender(AssignSenderRequest {
            create: true,
            sender: "rt-pf-sender".into(),
            portfolio: "rt-portfolio".into(),
            at: None,
        })
        .await
        .expect("assign_sender");
    warm_up(&mut q, "rt-pf-sender").await;
    let (r, trace) = measure(&[port], acquire_ok(&mut q, "rt-pf-sender", "4915100000001")).await;
    assert_eq!(decision(&r), Decision::AllowedNew);
    assert_eq!(r.scope, waquota::proto::Scope::Portfolio as i32);
    assert_one_fcall("Acquire (sender in a portfolio)", &trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_function_flush_the_library_is_reloaded_then_one_fcall_again() {
    let (_server, port, mut q) = standalone().await;
    warm_up(&mut q, "rt-flush-sender").await;
    let r = raw_command(port, "FUNCTION FLUSH");
    assert!(
        r.as_deref().is_some_and(|r| r.starts_with("+OK")),
        "FUNCTION FLUSH: {r:?}"
    );

    // "Function not found", then the library is loaded and the call repeated once: the request
    // still succeeds.
    let (r, trace) = measure(
        &[port],
        acquire_ok(&mut q, "rt-flush-sender", "4915100000001"),
    )
    .await;
    assert_eq!(decision(&r), Decision::AllowedNew);
    assert_round_trips(
        "Acquire after FUNCTION FLUSH",
        &trace,
        &["fcall", "function|load", "fcall"],
    );

    let (r, trace) = measure(
        &[port],
        acquire_ok(&mut q, "rt-flush-sender", "4915100000002"),
    )
    .await;
    assert_eq!(decision(&r), Decision::AllowedNew);
    assert_one_fcall("Acquire after the reload", &trace);
    assert_eq!(
        r.used, 9,
        "the flush lost no state (8 warm-up slots, one released, two new)"
    );
}

// ------------------------------------------------------------------------------ cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_acquire_and_batch_are_one_fcall() {
    let server = TestServer::start(Backend::Cluster).await;
    let ports: Vec<u16> = server
        .cluster()
        .expect("a cluster")
        .nodes
        .iter()
        .map(|n| n.port)
        .collect();
    let mut q = server.quota().await;
    warm_up(&mut q, "rt-cluster-sender").await;

    let (r, trace) = measure(
        &ports,
        acquire_ok(&mut q, "rt-cluster-sender", "4915100000001"),
    )
    .await;
    assert_eq!(decision(&r), Decision::AllowedNew);
    assert_one_fcall("Cluster: Acquire (new user)", &trace);

    let recipients: Vec<String> = (0..100).map(|i| format!("4915100001{i:03}")).collect();
    let (results, trace) = measure(&ports, async {
        q.acquire_batch(AcquireBatchRequest {
            sender: "rt-cluster-sender".into(),
            recipients: recipients.clone(),
            ..Default::default()
        })
        .await
        .expect("acquire_batch")
        .into_inner()
        .results
    })
    .await;
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(|r| decision(r) == Decision::AllowedNew));
    assert_one_fcall("Cluster: AcquireBatch of 100", &trace);
}

// ------------------------------------------------------------------------------ coalescing

/// Concurrent Acquires of one sender are decided together (fewer FCALL calls than requests)
/// and exactly as if one after the other: the limit admits exactly `limit` new users, each
/// `used` value once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_of_one_sender_share_calls_and_stay_exact() {
    let (_server, port, mut q) = standalone().await;
    warm_up(&mut q, "rt-sender").await;
    let n = 400;
    command(port, &["CONFIG", "RESETSTAT"]);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut q = q.clone();
            tokio::spawn(
                async move { acquire_ok(&mut q, "rt-busy", &format!("49180{i:08}")).await },
            )
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task"));
    }
    let limit = answers[0].limit;
    let mut used: Vec<u64> = answers
        .iter()
        .filter(|r| decision(r) == Decision::AllowedNew)
        .map(|r| r.used)
        .collect();
    used.sort_unstable();
    assert_eq!(
        used,
        (1..=limit).collect::<Vec<_>>(),
        "each used value once"
    );
    let denied = answers
        .iter()
        .filter(|r| decision(r) == Decision::DeniedLimit)
        .count();
    assert_eq!(denied as u64, n - limit);
    let calls = commandstats(port).get("fcall").copied().unwrap_or(0);
    assert!(
        calls >= 1 && calls < n,
        "{n} concurrent Acquires took {calls} FCALL calls"
    );
}
