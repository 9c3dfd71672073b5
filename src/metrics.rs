//! Prometheus metrics: every series the server exports, registered once in a
//! `prometheus_client` registry and rendered in the text exposition format (version 0.0.4), and
//! the HTTP listener that serves it at `/metrics`.
//!
//! Every label set here is known at compile time (RPC names, script names, decisions, scopes,
//! error kinds, webhook kinds and outcomes), so each series is resolved once in [`Metrics::new`]
//! and its handle kept in an array: recording is an atomic add on that handle, with no lock and
//! no label hashing. That also bounds cardinality by construction: there is no call that makes a
//! series at run time, so no sender, recipient or portfolio id can ever become a label.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::model::{Decision, Scope};

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// RPCs that get their own latency series; anything else is `other`.
pub const RPCS: [&str; 17] = [
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
    "ListTargets",
    "ListAudit",
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

/// A latency histogram over [`BUCKETS`]. The crate's own histogram takes a mutex on every
/// observation; this one is a handful of relaxed atomic adds, so the hot path stays lock-free,
/// and the crate still encodes it.
#[derive(Debug, Clone)]
struct Histogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    /// Per bucket, not cumulative: the encoder adds them up.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram(Arc::new(HistogramCells {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }))
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let buckets: [(f64, u64); BUCKETS.len()] =
            std::array::from_fn(|i| (BUCKETS[i], load(&self.0.buckets[i])));
        // Buckets first, count last: an observation landing between the two loads can only
        // make the count larger, so the +Inf bucket never falls below a finite one.
        let count = load(&self.0.count);
        let sum = load(&self.0.sum_micros) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// The fixed series of one labelled metric, in the order they were made. Unlike the crate's
/// `Family` (a map that makes a series for any label set it is asked for), this one cannot
/// grow after start-up, and its series come out in a stable order.
#[derive(Debug)]
struct Series<M>(Vec<(Labels, M)>);

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Series<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (labels, metric) in &self.0 {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// `waquota_ledger_lost`: 1 while the ledger is known lost. Derived from the loss time that
/// `/health` also reports, so the two can never disagree.
#[derive(Debug)]
struct LostFlag(Gauge);

impl EncodeMetric for LostFlag {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_gauge(&i64::from(self.0.get() != 0))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// The Redis pool gauges, read from the ledger's probe at each scrape, and absent until a Redis
/// ledger installs one (the in-memory ledger has no pool).
#[derive(Clone, Default)]
struct PoolGauges(Arc<Mutex<Option<PoolProbe>>>);

impl fmt::Debug for PoolGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolGauges").finish_non_exhaustive()
    }
}

impl Collector for PoolGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let pool = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|p| p());
        let Some(p) = pool else {
            return Ok(());
        };
        let in_use = p.size.saturating_sub(p.available);
        let mut e = encoder.encode_descriptor(
            "waquota_redis_pool_connections",
            "Redis pool connections: in_use (held by the ledger) and idle.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [("in_use", in_use), ("idle", p.available)] {
            e.encode_family(&[("state", state)])?.encode_gauge(&n)?;
        }
        for (name, help, n) in [
            (
                "waquota_redis_pool_max_connections",
                "Most connections the Redis pool may open (redis_pool_size, plus 2 to replace broken ones).",
                p.max_size,
            ),
            (
                "waquota_redis_pool_waiting",
                "Callers waiting for a Redis pool connection.",
                p.waiting,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&n)?;
        }
        Ok(())
    }
}

/// Every metric the server exports. One per server; shared through an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// [decision][scope], flattened.
    decisions: [Counter; Decision::ALL.len() * SCOPES.len()],
    rpc_latency: [Histogram; RPCS.len()],
    script_latency: [Histogram; SCRIPTS.len()],
    redis_errors: [Counter; REDIS_ERROR_KINDS.len()],
    script_reloads: Counter,
    in_flight: Gauge,
    shed: Counter,
    /// [unauthenticated, permission_denied]
    refused: [Counter; 2],
    deadline_exceeded: Counter,
    durability_timeouts: Counter,
    ledger_lost: Counter,
    /// Milliseconds since the epoch when the ledger was found lost, 0 while it is whole.
    ledger_lost_since: Gauge,
    unanswered: Counter,
    /// [kind][outcome] of webhook events, flattened.
    webhook_events: [Counter; WEBHOOK_KINDS.len() * WEBHOOK_OUTCOMES.len()],
    webhook_signature_failures: Counter,
    webhook_relay_failures: Counter,
    webhook_apply: Histogram,
    /// [allowed, denied]
    outage_decisions: [Counter; 2],
    pool: PoolGauges,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
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

/// Registers metrics under the names they are exported with. The crate appends `_total` to a
/// counter's name and a full stop to its help, so both are taken off here first.
struct Builder(Registry);

impl Builder {
    fn add(&mut self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        let help = help.strip_suffix('.').unwrap_or(help);
        let name = match metric.metric_type() {
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.0.register(name, help, metric);
    }

    /// One metric of `N` series, each with the labels `labels(i)`; returns their handles.
    fn series<M, const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        labels: impl Fn(usize) -> Labels,
        make: impl Fn() -> M,
    ) -> [M; N]
    where
        M: EncodeMetric + TypedMetric + Clone + fmt::Debug + Send + Sync + 'static,
    {
        let handles: [M; N] = std::array::from_fn(|_| make());
        let series = handles
            .iter()
            .enumerate()
            .map(|(i, m)| (labels(i), m.clone()));
        self.add(name, help, Series(series.collect()));
        handles
    }

    /// A metric without labels; returns its handle.
    fn one<M>(&mut self, name: &str, help: &str, metric: M) -> M
    where
        M: EncodeMetric + Clone + fmt::Debug + Send + Sync + 'static,
    {
        self.add(name, help, metric.clone());
        metric
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut b = Builder(Registry::default());
        // Registration order is the order of the exposition.
        let decisions = b.series(
            "waquota_decisions_total",
            "Acquire/AcquireBatch decisions made by the ledger (one per recipient, dry runs included).",
            |i| {
                let (d, s) = (i / SCOPES.len(), i % SCOPES.len());
                vec![
                    ("decision", Decision::ALL[d].name()),
                    ("scope", SCOPES[s].name()),
                ]
            },
            Counter::default,
        );
        let rpc_latency = b.series(
            "waquota_request_duration_seconds",
            "Time to answer a QuotaService or AdminService call, by RPC.",
            |i| vec![("rpc", RPCS[i])],
            Histogram::new,
        );
        let in_flight = b.one(
            "waquota_requests_in_flight",
            "QuotaService and AdminService calls being served now.",
            Gauge::default(),
        );
        let shed = b.one(
            "waquota_requests_shed_total",
            "Calls answered RESOURCE_EXHAUSTED because max_in_flight calls were already running.",
            Counter::default(),
        );
        let refused = b.series(
            "waquota_requests_refused_total",
            "Calls refused by authentication (UNAUTHENTICATED) or authorisation (PERMISSION_DENIED).",
            |i| vec![("reason", ["unauthenticated", "permission_denied"][i])],
            Counter::default,
        );
        let deadline_exceeded = b.one(
            "waquota_requests_deadline_exceeded_total",
            "Calls whose client deadline (grpc-timeout) passed before they were answered.",
            Counter::default(),
        );
        let durability_timeouts = b.one(
            "waquota_durability_timeouts_total",
            "Changes answered UNAVAILABLE because fewer replicas than durability_replicas acknowledged them within durability_timeout (the change stands on the primary).",
            Counter::default(),
        );
        let ledger_lost = b.one(
            "waquota_ledger_lost_total",
            "Times the ledger marker was found gone from Redis (a restart without persistence, a failover to an empty replica, FLUSHALL).",
            Counter::default(),
        );
        let unanswered = b.one(
            "waquota_decisions_unanswered_total",
            "Recipients admitted by the store after their caller had gone (deadline passed or hung up): consumed, never answered.",
            Counter::default(),
        );
        let webhook_events = b.series(
            "waquota_webhook_events_total",
            "WhatsApp webhook events by kind and what became of them (applied, duplicate: applied before, ignored, unusable: names a sender, user or reservation the ledger cannot use, store_error: answered 503).",
            |i| {
                let (k, o) = (i / WEBHOOK_OUTCOMES.len(), i % WEBHOOK_OUTCOMES.len());
                vec![("kind", WEBHOOK_KINDS[k]), ("outcome", WEBHOOK_OUTCOMES[o])]
            },
            Counter::default,
        );
        let webhook_signature_failures = b.one(
            "waquota_webhook_signature_failures_total",
            "Webhook POSTs refused (401) because X-Hub-Signature-256 was missing or matched no app secret.",
            Counter::default(),
        );
        let webhook_relay_failures = b.one(
            "waquota_webhook_relay_failures_total",
            "Webhook POSTs answered 503 because relaying them to webhook_forward failed.",
            Counter::default(),
        );
        let webhook_apply = b.one(
            "waquota_webhook_apply_duration_seconds",
            "Time to apply every event of one webhook POST.",
            Histogram::new(),
        );
        let ledger_lost_since = Gauge::default();
        b.add(
            "waquota_ledger_lost",
            "1 while the ledger is known lost and new slots follow on_ledger_loss, else 0.",
            LostFlag(ledger_lost_since.clone()),
        );
        let outage_decisions = b.series(
            "waquota_store_outage_decisions_total",
            "Acquire/AcquireBatch calls decided by on_store_error while the store could not be reached.",
            |i| vec![("outcome", ["allowed", "denied"][i])],
            Counter::default,
        );
        let script_latency = b.series(
            "waquota_redis_script_duration_seconds",
            "Round trip of one Lua script call to Redis, by script.",
            |i| vec![("script", SCRIPTS[i])],
            Histogram::new,
        );
        let redis_errors = b.series(
            "waquota_redis_errors_total",
            "Failed Redis calls, by kind.",
            |i| vec![("kind", REDIS_ERROR_KINDS[i].1)],
            Counter::default,
        );
        let script_reloads = b.one(
            "waquota_redis_script_reloads_total",
            "Loads of the function library after Redis did not know a function (restarted Redis, new node).",
            Counter::default(),
        );
        let pool = PoolGauges::default();
        b.0.register_collector(Box::new(pool.clone()));

        Metrics {
            registry: b.0,
            decisions,
            rpc_latency,
            script_latency,
            redis_errors,
            script_reloads,
            in_flight,
            shed,
            refused,
            deadline_exceeded,
            durability_timeouts,
            ledger_lost,
            ledger_lost_since,
            unanswered,
            webhook_events,
            webhook_signature_failures,
            webhook_relay_failures,
            webhook_apply,
            outage_decisions,
            pool,
        }
    }

    pub fn decision(&self, d: Decision, s: Scope) {
        self.decisions[decision_index(d) * SCOPES.len() + scope_index(s)].inc();
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
            self.redis_errors[i].inc();
        }
    }

    pub fn script_reload(&self) {
        self.script_reloads.inc();
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn shed(&self) {
        self.shed.inc();
    }

    pub fn refused(&self, r: Refusal) {
        let i = match r {
            Refusal::Unauthenticated => 0,
            Refusal::PermissionDenied => 1,
        };
        self.refused[i].inc();
    }

    pub fn deadline_exceeded(&self) {
        self.deadline_exceeded.inc();
    }

    /// A change that fewer replicas than `durability_replicas` acknowledged in time.
    pub fn durability_timeout(&self) {
        self.durability_timeouts.inc();
    }

    /// The ledger marker was found gone (a new loss, not one already known).
    pub fn ledger_lost(&self, since_ms: i64) {
        self.ledger_lost.inc();
        self.ledger_lost_since.set(since_ms);
    }

    /// Where the ledger stands: `Some(since)` while it is known lost.
    pub fn set_ledger_lost_since(&self, since_ms: Option<i64>) {
        self.ledger_lost_since.set(since_ms.unwrap_or(0));
    }

    pub fn ledger_lost_since(&self) -> Option<i64> {
        Some(self.ledger_lost_since.get()).filter(|&t| t != 0)
    }

    /// Recipients admitted by the store whose caller had gone (its deadline passed, it hung
    /// up) before the answer came: consumed but unanswered, the safe side.
    pub fn unanswered(&self, recipients: u64) {
        self.unanswered.inc_by(recipients);
    }

    pub fn webhook_event(&self, kind: &str, outcome: &str) {
        let k = WEBHOOK_KINDS.iter().position(|x| *x == kind);
        let o = WEBHOOK_OUTCOMES.iter().position(|x| *x == outcome);
        if let (Some(k), Some(o)) = (k, o) {
            self.webhook_events[k * WEBHOOK_OUTCOMES.len() + o].inc();
        }
    }

    pub fn webhook_signature_failure(&self) {
        self.webhook_signature_failures.inc();
    }

    pub fn webhook_relay_failure(&self) {
        self.webhook_relay_failures.inc();
    }

    /// Time to apply every event of one POST.
    pub fn webhook_apply_latency(&self, d: Duration) {
        self.webhook_apply.observe(d);
    }

    pub fn outage_decision(&self, allowed: bool) {
        self.outage_decisions[usize::from(!allowed)].inc();
    }

    /// Reports the Redis pool at each scrape.
    pub fn set_pool_probe(&self, probe: impl Fn() -> PoolStatus + Send + Sync + 'static) {
        *self.pool.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(probe));
    }

    /// The text exposition format (version 0.0.4): what Prometheus scrapes with its classic
    /// parser, and what `promtool` and the dashboards in `deploy/` were written against.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(32 * 1024);
        // Writing into a String cannot fail, and every metric here encodes infallibly.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the in-flight gauge on drop, however the request ends (answered or cancelled).
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
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
            prometheus_text::CONTENT_TYPE,
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
