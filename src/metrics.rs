//! Prometheus metrics: a fixed registry of atomics, rendered in the text exposition format, and
//! the HTTP listener that serves it at `/metrics`.
//!
//! Why hand-written: every label set here is known at compile time (RPC names, script names,
//! decisions, scopes, error kinds), so each series is one atomic in an array and the hot path
//! never takes a lock or hashes a label. That also bounds cardinality by construction: no
//! sender, recipient or portfolio id can ever become a label.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use tokio::net::TcpListener;

use crate::model::{Decision, Scope};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// RPCs that get their own latency series; anything else is `other`.
pub const RPCS: [&str; 15] = [
    "Acquire",
    "AcquireBatch",
    "Release",
    "RecordInbound",
    "Confirm",
    "ReportFailure",
    "PutPolicy",
    "AssignSender",
    "Inspect",
    "ListWindow",
    "Reset",
    "AcceptLedgerLoss",
    "AssignWaba",
    "Plan",
    "other",
];

/// The Lua scripts (`lua/*.lua`), by the name the Redis ledger gives them.
pub const SCRIPTS: [&str; 14] = [
    "acquire", "release", "inbound", "inspect", "list", "policy", "reset", "move", "move_out",
    "move_in", "confirm", "failure", "ledger", "slot",
];

const SCOPES: [Scope; 2] = [Scope::Sender, Scope::Portfolio];

/// Webhook event kinds (`webhook::events::Event::kind`) and what became of them.
pub const WEBHOOK_KINDS: [&str; 10] = [
    "inbound",
    "status_sent",
    "status_delivered",
    "status_read",
    "status_failed",
    "status_other",
    "quality",
    "capability",
    "account",
    "ignored",
];
pub const WEBHOOK_OUTCOMES: [&str; 5] =
    ["applied", "duplicate", "ignored", "unusable", "store_error"];

/// What went wrong talking to Redis, as far as an operator needs to tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisErrorKind {
    /// Connection refused, dropped or reset; no connection could be had from the pool.
    Unavailable,
    /// No answer within `redis_timeout` (pool wait included).
    Timeout,
    /// Wrong password, or the ACL user may not run the command.
    Auth,
    /// Redis is loading, failing over, read-only, or the cluster is down.
    Busy,
    /// An unexpected error from a script: a bug.
    Internal,
}

const REDIS_ERROR_KINDS: [(RedisErrorKind, &str); 5] = [
    (RedisErrorKind::Unavailable, "unavailable"),
    (RedisErrorKind::Timeout, "timeout"),
    (RedisErrorKind::Auth, "auth"),
    (RedisErrorKind::Busy, "busy"),
    (RedisErrorKind::Internal, "internal"),
];

/// Why a call was refused before reaching a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated,
    PermissionDenied,
}

/// A snapshot of the Redis connection pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStatus {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

type PoolProbe = Box<dyn Fn() -> PoolStatus + Send + Sync>;

struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// `labels` is `k="v",...`, or empty for a histogram without labels.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let (le, total) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{le}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{le}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{total} {sum}");
        let _ = writeln!(out, "{name}_count{total} {count}");
    }
}

/// Every metric the server exports. One per server; shared through an `Arc`.
pub struct Metrics {
    decisions: [[AtomicU64; SCOPES.len()]; Decision::ALL.len()],
    rpc_latency: [Histogram; RPCS.len()],
    script_latency: [Histogram; SCRIPTS.len()],
    redis_errors: [AtomicU64; REDIS_ERROR_KINDS.len()],
    script_reloads: AtomicU64,
    in_flight: AtomicI64,
    shed: AtomicU64,
    refused: [AtomicU64; 2],
    deadline_exceeded: AtomicU64,
    durability_timeouts: AtomicU64,
    ledger_lost: AtomicU64,
    /// Milliseconds since the epoch when the ledger was found lost, 0 while it is whole.
    ledger_lost_since: AtomicI64,
    unanswered: AtomicU64,
    /// [kind][outcome] of webhook events.
    webhook_events: [[AtomicU64; WEBHOOK_OUTCOMES.len()]; WEBHOOK_KINDS.len()],
    webhook_signature_failures: AtomicU64,
    webhook_relay_failures: AtomicU64,
    webhook_apply: Histogram,
    /// [allowed, denied]
    outage_decisions: [AtomicU64; 2],
    pool: Mutex<Option<PoolProbe>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

fn decision_index(d: Decision) -> usize {
    (d.code() - 1) as usize
}

fn scope_index(s: Scope) -> usize {
    match s {
        Scope::Sender => 0,
        Scope::Portfolio => 1,
    }
}

/// Index of an RPC in [`RPCS`] from a gRPC path (`/package.Service/Method`).
pub fn rpc_index(path: &str) -> usize {
    let method = path.rsplit('/').next().unwrap_or("");
    RPCS[..RPCS.len() - 1]
        .iter()
        .position(|r| *r == method)
        .unwrap_or(RPCS.len() - 1)
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            decisions: std::array::from_fn(|_| counters()),
            rpc_latency: std::array::from_fn(|_| Histogram::new()),
            script_latency: std::array::from_fn(|_| Histogram::new()),
            redis_errors: counters(),
            script_reloads: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            shed: AtomicU64::new(0),
            refused: counters(),
            deadline_exceeded: AtomicU64::new(0),
            durability_timeouts: AtomicU64::new(0),
            ledger_lost: AtomicU64::new(0),
            ledger_lost_since: AtomicI64::new(0),
            unanswered: AtomicU64::new(0),
            webhook_events: std::array::from_fn(|_| counters()),
            webhook_signature_failures: AtomicU64::new(0),
            webhook_relay_failures: AtomicU64::new(0),
            webhook_apply: Histogram::new(),
            outage_decisions: counters(),
            pool: Mutex::new(None),
        }
    }

    pub fn decision(&self, d: Decision, s: Scope) {
        self.decisions[decision_index(d)][scope_index(s)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rpc_latency(&self, rpc: usize, d: Duration) {
        self.rpc_latency[rpc.min(RPCS.len() - 1)].observe(d);
    }

    pub fn script_latency(&self, script: &str, d: Duration) {
        if let Some(i) = SCRIPTS.iter().position(|s| *s == script) {
            self.script_latency[i].observe(d);
        }
    }

    pub fn redis_error(&self, kind: RedisErrorKind) {
        if let Some(i) = REDIS_ERROR_KINDS.iter().position(|(k, _)| *k == kind) {
            self.redis_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn script_reload(&self) {
        self.script_reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, r: Refusal) {
        let i = match r {
            Refusal::Unauthenticated => 0,
            Refusal::PermissionDenied => 1,
        };
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn deadline_exceeded(&self) {
        self.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
    }

    /// A change that fewer replicas than `durability_replicas` acknowledged in time.
    pub fn durability_timeout(&self) {
        self.durability_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// The ledger marker was found gone (a new loss, not one already known).
    pub fn ledger_lost(&self, since_ms: i64) {
        self.ledger_lost.fetch_add(1, Ordering::Relaxed);
        self.ledger_lost_since.store(since_ms, Ordering::Relaxed);
    }

    /// Where the ledger stands: `Some(since)` while it is known lost.
    pub fn set_ledger_lost_since(&self, since_ms: Option<i64>) {
        self.ledger_lost_since
            .store(since_ms.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn ledger_lost_since(&self) -> Option<i64> {
        Some(self.ledger_lost_since.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Recipients admitted by the store whose caller had gone (its deadline passed, it hung
    /// up) before the answer came: consumed but unanswered, the safe side.
    pub fn unanswered(&self, recipients: u64) {
        self.unanswered.fetch_add(recipients, Ordering::Relaxed);
    }

    pub fn webhook_event(&self, kind: &str, outcome: &str) {
        let k = WEBHOOK_KINDS.iter().position(|x| *x == kind);
        let o = WEBHOOK_OUTCOMES.iter().position(|x| *x == outcome);
        if let (Some(k), Some(o)) = (k, o) {
            self.webhook_events[k][o].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn webhook_signature_failure(&self) {
        self.webhook_signature_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook_relay_failure(&self) {
        self.webhook_relay_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Time to apply every event of one POST.
    pub fn webhook_apply_latency(&self, d: Duration) {
        self.webhook_apply.observe(d);
    }

    pub fn outage_decision(&self, allowed: bool) {
        self.outage_decisions[usize::from(!allowed)].fetch_add(1, Ordering::Relaxed);
    }

    /// Reports the Redis pool at each scrape.
    pub fn set_pool_probe(&self, probe: impl Fn() -> PoolStatus + Send + Sync + 'static) {
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(probe));
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        head(
            &mut out,
            "waquota_decisions_total",
            "counter",
            "Acquire/AcquireBatch decisions made by the ledger (one per recipient, dry runs included).",
        );
        for (d, row) in Decision::ALL.iter().zip(&self.decisions) {
            for (s, n) in SCOPES.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "waquota_decisions_total{{decision=\"{}\",scope=\"{}\"}} {}",
                    d.name(),
                    s.name(),
                    load(n)
                );
            }
        }

        head(
            &mut out,
            "waquota_request_duration_seconds",
            "histogram",
            "Time to answer a QuotaService or AdminService call, by RPC.",
        );
        for (rpc, h) in RPCS.iter().zip(&self.rpc_latency) {
            h.render(
                &mut out,
                "waquota_request_duration_seconds",
                &format!("rpc=\"{rpc}\""),
            );
        }

        head(
            &mut out,
            "waquota_requests_in_flight",
            "gauge",
            "QuotaService and AdminService calls being served now.",
        );
        let _ = writeln!(
            out,
            "waquota_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );

        head(
            &mut out,
            "waquota_requests_shed_total",
            "counter",
            "Calls answered RESOURCE_EXHAUSTED because max_in_flight calls were already running.",
        );
        let _ = writeln!(out, "waquota_requests_shed_total {}", load(&self.shed));

        head(
            &mut out,
            "waquota_requests_refused_total",
            "counter",
            "Calls refused by authentication (UNAUTHENTICATED) or authorisation (PERMISSION_DENIED).",
        );
        for (reason, n) in ["unauthenticated", "permission_denied"]
            .iter()
            .zip(&self.refused)
        {
            let _ = writeln!(
                out,
                "waquota_requests_refused_total{{reason=\"{reason}\"}} {}",
                load(n)
            );
        }

        head(
            &mut out,
            "waquota_requests_deadline_exceeded_total",
            "counter",
            "Calls whose client deadline (grpc-timeout) passed before they were answered.",
        );
        let _ = writeln!(
            out,
            "waquota_requests_deadline_exceeded_total {}",
            load(&self.deadline_exceeded)
        );

        for (name, help, n) in [
            (
                "waquota_durability_timeouts_total",
                "Changes answered UNAVAILABLE because fewer replicas than durability_replicas acknowledged them within durability_timeout (the change stands on the primary).",
                &self.durability_timeouts,
            ),
            (
                "waquota_ledger_lost_total",
                "Times the ledger marker was found gone from Redis (a restart without persistence, a failover to an empty replica, FLUSHALL).",
                &self.ledger_lost,
            ),
            (
                "waquota_decisions_unanswered_total",
                "Recipients admitted by the store after their caller had gone (deadline passed or hung up): consumed, never answered.",
                &self.unanswered,
            ),
        ] {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", load(n));
        }
        head(
            &mut out,
            "waquota_webhook_events_total",
            "counter",
            "WhatsApp webhook events by kind and what became of them (applied, duplicate: applied before, ignored, unusable: names a sender, user or reservation the ledger cannot use, store_error: answered 503).",
        );
        for (kind, row) in WEBHOOK_KINDS.iter().zip(&self.webhook_events) {
            for (outcome, n) in WEBHOOK_OUTCOMES.iter().zip(row) {
                let _ = writeln!(
                    out,
                    "waquota_webhook_events_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {}",
                    load(n)
                );
            }
        }
        for (name, help, n) in [
            (
                "waquota_webhook_signature_failures_total",
                "Webhook POSTs refused (401) because X-Hub-Signature-256 was missing or matched no app secret.",
                &self.webhook_signature_failures,
            ),
            (
                "waquota_webhook_relay_failures_total",
                "Webhook POSTs answered 503 because relaying them to webhook_forward failed.",
                &self.webhook_relay_failures,
            ),
        ] {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", load(n));
        }
        head(
            &mut out,
            "waquota_webhook_apply_duration_seconds",
            "histogram",
            "Time to apply every event of one webhook POST.",
        );
        self.webhook_apply
            .render(&mut out, "waquota_webhook_apply_duration_seconds", "");
        head(
            &mut out,
            "waquota_ledger_lost",
            "gauge",
            "1 while the ledger is known lost and new slots follow on_ledger_loss, else 0.",
        );
        let _ = writeln!(
            out,
            "waquota_ledger_lost {}",
            u8::from(self.ledger_lost_since().is_some())
        );

        head(
            &mut out,
            "waquota_store_outage_decisions_total",
            "counter",
            "Acquire/AcquireBatch calls decided by on_store_error while the store could not be reached.",
        );
        for (outcome, n) in ["allowed", "denied"].iter().zip(&self.outage_decisions) {
            let _ = writeln!(
                out,
                "waquota_store_outage_decisions_total{{outcome=\"{outcome}\"}} {}",
                load(n)
            );
        }

        head(
            &mut out,
            "waquota_redis_script_duration_seconds",
            "histogram",
            "Round trip of one Lua script call to Redis, by script.",
        );
        for (script, h) in SCRIPTS.iter().zip(&self.script_latency) {
            h.render(
                &mut out,
                "waquota_redis_script_duration_seconds",
                &format!("script=\"{script}\""),
            );
        }

        head(
            &mut out,
            "waquota_redis_errors_total",
            "counter",
            "Failed Redis calls, by kind.",
        );
        for ((_, kind), n) in REDIS_ERROR_KINDS.iter().zip(&self.redis_errors) {
            let _ = writeln!(
                out,
                "waquota_redis_errors_total{{kind=\"{kind}\"}} {}",
                load(n)
            );
        }

        head(
            &mut out,
            "waquota_redis_script_reloads_total",
            "counter",
            "Scripts sent again after a NOSCRIPT answer (restarted or failed-over Redis).",
        );
        let _ = writeln!(
            out,
            "waquota_redis_script_reloads_total {}",
            load(&self.script_reloads)
        );

        let pool = self
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| p());
        if let Some(p) = pool {
            head(
                &mut out,
                "waquota_redis_pool_connections",
                "gauge",
                "Redis pool connections: in_use (held by the ledger) and idle.",
            );
            let in_use = p.size.saturating_sub(p.available);
            let _ = writeln!(
                out,
                "waquota_redis_pool_connections{{state=\"in_use\"}} {in_use}"
            );
            let _ = writeln!(
                out,
                "waquota_redis_pool_connections{{state=\"idle\"}} {}",
                p.available
            );
            head(
                &mut out,
                "waquota_redis_pool_max_connections",
                "gauge",
                "Most connections the Redis pool may open (redis_pool_size, plus 2 to replace broken ones).",
            );
            let _ = writeln!(out, "waquota_redis_pool_max_connections {}", p.max_size);
            head(
                &mut out,
                "waquota_redis_pool_waiting",
                "gauge",
                "Callers waiting for a Redis pool connection.",
            );
            let _ = writeln!(out, "waquota_redis_pool_waiting {}", p.waiting);
        }
        out
    }
}

/// Decrements the in-flight gauge on drop, however the request ends (answered or cancelled).
pub struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `GET /metrics` (and `/health`) over HTTP/1.1 on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let answer_with = move |req: Request<Incoming>| {
        let metrics = metrics.clone();
        async move { answer(&req, &metrics) }
    };
    serve_http1(listener, "metrics", answer_with, shutdown).await
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves, each request answered by `answer`
/// (the metrics and the webhook listeners). A client that stalls or disconnects only ends its
/// own connection.
pub async fn serve_http1<H, F>(
    listener: TcpListener,
    what: &'static str,
    answer: H,
    shutdown: impl Future<Output = ()> + Send,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reply = answer(req);
                async move { Ok::<_, std::convert::Infallible>(reply.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            Bytes::from(metrics.render()),
        ),
        // The health detail a gRPC health status cannot carry: whether the ledger is known lost.
        // 200 while it is whole, 503 while on_ledger_loss = deny_new holds new slots back.
        (&Method::GET, "/health") => {
            let (status, body) = match metrics.ledger_lost_since() {
                None => (StatusCode::OK, "{\"ledger\":\"whole\"}\n".to_owned()),
                Some(t) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "{{\"ledger\":\"lost\",\"lost_since\":\"{}\",\"hint\":\"new slots follow on_ledger_loss; an operator confirms with: waquota ledger accept-loss\"}}\n",
                        crate::cli::rfc3339(t)
                    ),
                ),
            };
            (status, "application/json", Bytes::from(body))
        }
        (_, "/metrics" | "/health") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"use GET\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"metrics are at /metrics, the ledger's health at /health\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths_map_to_bounded_labels() {
        assert_eq!(
            RPCS[rpc_index("/waquota.v1.QuotaService/Acquire")],
            "Acquire"
        );
        assert_eq!(RPCS[rpc_index("/waquota.v1.AdminService/Reset")], "Reset");
        assert_eq!(RPCS[rpc_index("/x.Y/SomethingElse")], "other");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.rpc_latency(0, Duration::from_micros(300));
        m.rpc_latency(0, Duration::from_millis(3));
        let text = m.render();
        assert!(
            text.contains(
                "waquota_request_duration_seconds_bucket{rpc=\"Acquire\",le=\"0.0005\"} 1"
            )
        );
        assert!(
            text.contains(
                "waquota_request_duration_seconds_bucket{rpc=\"Acquire\",le=\"0.005\"} 2"
            )
        );
        assert!(text.contains("waquota_request_duration_seconds_count{rpc=\"Acquire\"} 2"));
    }
}
