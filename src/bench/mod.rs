//! `waquota bench`: measures the decision path and prints what it measured and on what.
//!
//! Four measurements, all with one workload model:
//!
//! - **service**: gRPC load against a running `waquota serve` (`--addr`): `concurrency` workers,
//!   each with one `Acquire` (or `AcquireBatch`) in flight at a time.
//! - **ceiling**: the very same decision script driven straight on Redis (`--ceiling-redis`),
//!   with the same senders, recipients and mix, and no waquota service in between: each of the
//!   `concurrency` workers keeps `pipeline` FCALL calls in flight on shared multiplexed
//!   connections, so this is as fast as one client can make Redis decide. The ratio service /
//!   ceiling is what the service costs on top of Redis.
//! - **memory** (`--memory-redis`): Redis bytes per slot and per open service window.
//! - **growth** (`--growth`): latency as the window fills up, throughput as senders multiply.
//!
//! The workload: `senders` active senders with a limit far above what a run can use, each with a
//! pool of `recipients` recipients already counted (occupied slots) and `service-recipients`
//! recipients that wrote in (open service windows); plus a few *full* senders whose small
//! limit is used up. Every request draws what it asks for from `--mix`: a new recipient (never
//! seen: `allowed_new`), a counted one (`allowed_counted`), one inside a service window
//! (`allowed_service_window`), or a new recipient of a full sender (`denied_limit`). Ids carry a
//! per-run tag, so runs never see each other's state.
//!
//! Setup goes through the same paths as the run: AdminService and QuotaService for the service,
//! the Redis ledger (the same scripts) for the ceiling and memory measurements.

mod anchor;
mod webhook;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use comfy_table::{CellAlignment, Table, presets};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tonic::transport::Channel;

use crate::config::{Settings, Store};
use crate::ledger::Ledger;
use crate::ledger::redis::keys::{Home, Keys};
use crate::ledger::redis::scripts::{Script, Scripts};
use crate::ledger::redis::{RedisLedger, acquire_cmd};
use crate::model::{
    self, AcquireRequest, Defaults, MessageKind, RecipientId, RuleSet, SenderId, Tier, WindowMode,
};
use crate::proto::{self, admin_service_client::AdminServiceClient};
use crate::proto::{quota_service_client::QuotaServiceClient, target};

const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";
/// Limit of the active senders: far above what any run can open.
const ACTIVE_LIMIT: u64 = 1_000_000_000;
/// Limit of the full senders (filled up during setup, so their new recipients are denied).
const FULL_LIMIT: usize = 10;
/// Recipients per AcquireBatch while filling windows during setup.
const SETUP_BATCH: usize = 500;
/// Window sizes of the memory measurement, and service-window counts.
const MEMORY_SLOTS: [usize; 4] = [250, 1_000, 10_000, 100_000];
const MEMORY_SERVICE_WINDOWS: [usize; 2] = [250, 10_000];
/// Growth: occupied slots (latency) and active senders (throughput).
const GROWTH_SLOTS: [usize; 3] = [250, 10_000, 100_000];
const GROWTH_SENDERS: [usize; 3] = [1, 100, 10_000];
/// Growth with many senders: at most this many pre-counted slots and service windows in all.
const GROWTH_SLOT_BUDGET: usize = 100_000;
const GROWTH_SERVICE_BUDGET: usize = 10_000;
/// Latencies are recorded in nanoseconds from 1 ns to an hour (longer ones count as an hour),
/// to 3 significant digits: finer than the microseconds the report shows.
const LATENCY_MAX_NS: u64 = 3_600_000_000_000;
const LATENCY_DIGITS: u8 = 3;
/// Linux reports process CPU times in USER_HZ ticks, 100 per second on every mainstream arch.
const TICKS_PER_S: f64 = 100.0;

/// Load generator and measurements for waquota (see BENCHMARKS.md).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// gRPC endpoint of a running `waquota serve` to load: the global --addr. Without it, the
    /// service run happens only when neither --ceiling-redis nor --memory-redis is given
    /// (then at http://127.0.0.1:50051).
    #[arg(skip)]
    pub addr: Option<String>,
    /// Workers sending at once (service: one call in flight each; ceiling: --pipeline each).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of measurement (after the warm-up); ignored with --requests.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Measure exactly this many calls instead of a fixed duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Seconds of load before measuring starts (not counted).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Active senders (each with its own window) the load is spread over, uniformly.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Recipient pool per sender: recipients counted during setup (occupied slots), which the
    /// "counted" share of the mix messages again.
    #[arg(long, default_value_t = 1_000)]
    pub recipients: usize,
    /// Recipients per sender with an open service window (RecordInbound during setup), which
    /// the "service" share of the mix messages.
    #[arg(long, default_value_t = 100)]
    pub service_recipients: usize,
    /// Percentages of what requests ask for: new recipients, already counted ones, ones inside
    /// a service window, and new ones of a sender whose limit is used up (denied).
    #[arg(long, default_value = "new=60,counted=30,service=5,denied=5")]
    pub mix: Mix,
    /// Recipients per call: 1 = Acquire, more = AcquireBatch of that many (one sender each).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Print one JSON object on stdout instead of the text summary: the global --json.
    #[arg(skip)]
    pub json: bool,
    /// Bearer token sent as `authorization` metadata on every gRPC call: the global --token.
    #[arg(skip)]
    pub token: Option<String>,
    /// Ceiling: also drive the decision script straight on this Redis (redis:// URL), with the
    /// same workload and no waquota in between; prints service / ceiling when both run.
    #[arg(long)]
    pub ceiling_redis: Option<String>,
    /// Ceiling: FCALL calls each worker keeps in flight (pipelined on multiplexed connections).
    #[arg(long, default_value_t = 8)]
    pub pipeline: usize,
    /// Connections the load uses: HTTP/2 channels to the service, multiplexed ones to Redis.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Memory: fill windows of 250, 1K, 10K and 100K slots and open service windows on this
    /// Redis (redis:// URL; use one of its own: used_memory deltas count everything on it) and
    /// report bytes per slot and per service window.
    #[arg(long)]
    pub memory_redis: Option<String>,
    /// Growth: latency with 250, 10K and 100K occupied slots, throughput with 1, 100 and 10,000
    /// active senders (on the service, and on the ceiling when --ceiling-redis is given).
    #[arg(long)]
    pub growth: bool,
    /// Cost: what a decision costs, in one invocation: single Acquires and batches of 10 and
    /// 100, each uncoalesced (each worker its own sender) and coalesced (over --senders), each
    /// for every outcome alone (new, counted, service window, denied) and for --mix; prints
    /// one table.
    #[arg(long)]
    pub cost: bool,
    /// Key prefix of the Redis ledger the ceiling and memory runs write (as `serve --key-prefix`).
    #[arg(long, default_value = "wq")]
    pub key_prefix: String,
    /// Report the CPU time of another process over each measured run, as NAME=PID (repeatable),
    /// e.g. --watch-pid redis=1234 --watch-pid server=5678. Linux only.
    #[arg(long = "watch-pid", value_parser = parse_watch)]
    pub watch_pids: Vec<(String, u32)>,
    /// Read `INFO stats` and `INFO commandstats` of this Redis (the server's) around each
    /// measured run and report Redis commands and script calls per decision. Defaults to
    /// --ceiling-redis, which should then be the server's Redis.
    #[arg(long)]
    pub stats_redis: Option<String>,
    /// Anchor: also drive the simplest exact sliding-window script (one sorted set per sender)
    /// on this Redis (redis:// URL), with the same workload, unpipelined and with --pipeline
    /// calls per worker: a yardstick that does not move with waquota's script.
    #[arg(long)]
    pub anchor_redis: Option<String>,
    /// Webhooks: POST signed webhook bodies to this listener URL
    /// (http://HOST:PORT/webhooks/whatsapp of a server started with --webhook-listen); the
    /// setup goes through the gRPC API at --addr.
    #[arg(long)]
    pub webhook_url: Option<String>,
    /// Webhooks: the app secret the server checks signatures with (one of its
    /// --webhook-app-secret).
    #[arg(long)]
    pub webhook_secret: Option<String>,
    /// Webhooks: events in each POST, half inbound messages and half delivery statuses.
    #[arg(long, default_value_t = 10)]
    pub webhook_events: usize,
    /// Webhooks: reservations acquired during setup for the statuses to name (each gets
    /// `delivered`, then `read`).
    #[arg(long, default_value_t = 20_000)]
    pub webhook_reservations: usize,
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{s:?}: PID must be a number"))?;
    Ok((name.to_owned(), pid))
}

/// Shares of the workload, in percent (they add up to 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mix {
    pub new: u32,
    pub counted: u32,
    pub service: u32,
    pub denied: u32,
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut m = Mix {
            new: 0,
            counted: 0,
            service: 0,
            denied: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=PERCENT"))?;
            let v: u32 = v
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: the percentage must be a whole number"))?;
            match k.trim() {
                "new" => m.new = v,
                "counted" => m.counted = v,
                "service" => m.service = v,
                "denied" => m.denied = v,
                other => {
                    return Err(format!(
                        "unknown share {other:?}: use new, counted, service and denied"
                    ));
                }
            }
        }
        if m.new + m.counted + m.service + m.denied != 100 {
            return Err(format!(
                "the shares add up to {}, not 100",
                m.new + m.counted + m.service + m.denied
            ));
        }
        Ok(m)
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "new={},counted={},service={},denied={}",
            self.new, self.counted, self.service, self.denied
        )
    }
}

// ------------------------------------------------------------------ workload

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    New,
    Counted,
    Service,
    Denied,
}

const WANTS: [(Want, &str); 4] = [
    (Want::New, "new"),
    (Want::Counted, "counted"),
    (Want::Service, "service"),
    (Want::Denied, "denied"),
];

/// splitmix64: fast, good enough to spread load, and no dependency; seeded, so a sequence is
/// the seed's on every machine (the differential test replays its seeds with it).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as usize) as i64
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// Recipient ids look like real `wa_id`s (13 digits), so memory figures are realistic; the
/// second two digits tell the pools apart.
fn counted_recipient(i: usize) -> String {
    format!("4915{i:09}")
}
fn fresh_recipient(n: u64) -> String {
    format!("4916{n:09}")
}
fn service_recipient(i: usize) -> String {
    format!("4917{i:09}")
}
fn filler_recipient(i: usize) -> String {
    format!("4919{i:09}")
}

/// The shape of one run's load.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub senders: usize,
    pub full_senders: usize,
    pub recipients: usize,
    pub service_recipients: usize,
    pub mix: Mix,
    pub batch: usize,
    /// Each worker asks its own sender (worker i: sender i), so no two requests of one sender
    /// are ever in flight together and nothing is coalesced: needs as many senders (and full
    /// senders) as workers.
    pub pinned: bool,
}

struct Workload {
    shape: Shape,
    active: Vec<String>,
    full: Vec<String>,
    fresh: AtomicU64,
}

/// One call of the load: a sender and the recipients it asks about, with what each asks for.
struct Req {
    sender: usize,
    full: bool,
    recipients: Vec<String>,
    wants: Vec<Want>,
}

impl Workload {
    fn new(shape: Shape) -> Workload {
        let tag = run_tag();
        Workload {
            active: (0..shape.senders).map(|i| format!("b{tag}-{i}")).collect(),
            full: (0..shape.full_senders)
                .map(|i| format!("b{tag}-full-{i}"))
                .collect(),
            shape,
            fresh: AtomicU64::new(0),
        }
    }

    fn pick(&self, rng: &mut Rng, with_denied: bool) -> Want {
        let m = &self.shape.mix;
        let total = m.new + m.counted + m.service + if with_denied { m.denied } else { 0 };
        if total == 0 {
            return if with_denied { Want::Denied } else { Want::New };
        }
        let mut x = rng.below(total as usize) as u32;
        for (w, share) in [
            (Want::New, m.new),
            (Want::Counted, m.counted),
            (Want::Service, m.service),
        ] {
            if x < share {
                return w;
            }
            x -= share;
        }
        Want::Denied
    }

    /// A batch goes to one sender: if its first draw is a denial, the whole batch asks a full
    /// sender; otherwise the rest draws from the allowed shares only.
    fn next(&self, rng: &mut Rng, worker: usize) -> Req {
        let n = self.shape.batch.max(1);
        let first = self.pick(rng, true);
        let mut req = Req {
            sender: 0,
            full: first == Want::Denied,
            recipients: Vec::with_capacity(n),
            wants: Vec::with_capacity(n),
        };
        let pick = |rng: &mut Rng, n: usize| {
            if self.shape.pinned {
                worker % n.max(1)
            } else {
                rng.below(n)
            }
        };
        if req.full {
            req.sender = pick(rng, self.full.len());
            for _ in 0..n {
                req.recipients.push(fresh_recipient(self.fresh_id()));
                req.wants.push(Want::Denied);
            }
            return req;
        }
        req.sender = pick(rng, self.active.len());
        for i in 0..n {
            let w = if i == 0 { first } else { self.pick(rng, false) };
            let r = match w {
                Want::Counted if self.shape.recipients > 0 => {
                    counted_recipient(rng.below(self.shape.recipients))
                }
                Want::Service if self.shape.service_recipients > 0 => {
                    service_recipient(rng.below(self.shape.service_recipients))
                }
                _ => fresh_recipient(self.fresh_id()),
            };
            req.recipients.push(r);
            req.wants.push(w);
        }
        req
    }

    fn fresh_id(&self) -> u64 {
        self.fresh.fetch_add(1, Ordering::Relaxed)
    }

    fn sender(&self, req: &Req) -> &str {
        if req.full {
            &self.full[req.sender]
        } else {
            &self.active[req.sender]
        }
    }

    /// Everything the run needs in place before it starts.
    fn setup_jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        for s in &self.active {
            jobs.push(Job::Policy {
                sender: s.clone(),
                limit: ACTIVE_LIMIT,
            });
        }
        for s in &self.full {
            jobs.push(Job::Policy {
                sender: s.clone(),
                limit: FULL_LIMIT as u64,
            });
        }
        // Policies first: fills and inbound messages must run under them.
        jobs.push(Job::Barrier);
        for s in &self.full {
            jobs.push(Job::Fill {
                sender: s.clone(),
                recipients: (0..FULL_LIMIT).map(filler_recipient).collect(),
            });
        }
        for s in &self.active {
            let pool: Vec<usize> = (0..self.shape.recipients).collect();
            for chunk in pool.chunks(SETUP_BATCH) {
                jobs.push(Job::Fill {
                    sender: s.clone(),
                    recipients: chunk.iter().map(|i| counted_recipient(*i)).collect(),
                });
            }
            for i in 0..self.shape.service_recipients {
                jobs.push(Job::Inbound {
                    sender: s.clone(),
                    recipient: service_recipient(i),
                });
            }
        }
        jobs
    }
}

/// A tag unique to this run (and process), so ids never meet state left by an earlier run.
fn run_tag() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{:x}{:x}{}",
        ms,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

enum Job {
    Policy {
        sender: String,
        limit: u64,
    },
    Fill {
        sender: String,
        recipients: Vec<String>,
    },
    Inbound {
        sender: String,
        recipient: String,
    },
    /// Every job before it finishes before any job after it starts.
    Barrier,
}

// ------------------------------------------------------------------ what the load talks to

/// The service over gRPC, or the decision script straight on Redis.
#[derive(Clone)]
enum Driver {
    Grpc(Arc<GrpcDriver>),
    Redis(Arc<RedisDriver>),
    /// The anchor script (`anchor.rs`), unpipelined or pipelined.
    Anchor(Arc<anchor::AnchorDriver>),
}

struct GrpcDriver {
    endpoint: String,
    quota: Vec<QuotaServiceClient<Channel>>,
    admin: AdminServiceClient<Channel>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

struct RedisDriver {
    url: String,
    conns: Vec<redis::aio::MultiplexedConnection>,
    ledger: RedisLedger,
    script: Script,
    keys: Keys,
    defaults: Defaults,
}

type CallResult = Result<Vec<i32>, String>;

impl Driver {
    async fn grpc(addr: &str, connections: usize, token: Option<&str>) -> Result<Driver, String> {
        let g = GrpcDriver::connect(addr, connections, token).await?;
        Ok(Driver::Grpc(Arc::new(g)))
    }

    async fn redis(url: &str, connections: usize, prefix: &str) -> Result<Driver, String> {
        let settings = Settings {
            store: Store::Redis {
                url: url.to_owned(),
            },
            key_prefix: prefix.to_owned(),
            redis_pool_size: connections.max(1),
            redis_timeout: Duration::from_secs(30),
            ..Settings::default()
        };
        let ledger = RedisLedger::connect(&settings)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        // The ledger checks a connection out per slot on first use; concurrent first uses can
        // all wait on a pool whose objects the other slots keep. Fill every slot one by one.
        for _ in 0..settings.redis_pool_size {
            ledger.ping().await.map_err(|e| format!("{url}: {e}"))?;
        }
        let mut conns = multiplexed(url, connections).await?;
        let scripts = Scripts::new();
        let _: String = scripts
            .load_cmd()
            .query_async(&mut conns[0])
            .await
            .map_err(|e| format!("{url}: FUNCTION LOAD: {e}"))?;
        let script = scripts.acquire;
        Ok(Driver::Redis(Arc::new(RedisDriver {
            url: url.to_owned(),
            conns,
            ledger,
            script,
            keys: Keys::new(prefix),
            defaults: settings.defaults,
        })))
    }

    fn label(&self) -> &'static str {
        match self {
            Driver::Grpc(_) => "service",
            Driver::Redis(_) => "ceiling",
            Driver::Anchor(a) if a.depth == 1 => "anchor",
            Driver::Anchor(_) => "anchor pipelined",
        }
    }

    fn target(&self) -> &str {
        match self {
            Driver::Grpc(g) => &g.endpoint,
            Driver::Redis(r) => &r.url,
            Driver::Anchor(a) => &a.url,
        }
    }

    /// Connections and calls in flight per worker.
    fn fan_out(&self, args: &BenchArgs) -> (usize, usize) {
        match self {
            Driver::Grpc(g) => (g.quota.len(), 1),
            Driver::Redis(r) => (r.conns.len(), args.pipeline.max(1)),
            Driver::Anchor(a) => (a.conns.len(), a.depth),
        }
    }

    /// One measured call: the decision code of every recipient, or what went wrong.
    async fn call(&self, slot: usize, w: &Workload, req: &Req) -> CallResult {
        let sender = w.sender(req);
        match self {
            Driver::Grpc(g) => {
                let mut q = g.quota[slot % g.quota.len()].clone();
                if req.recipients.len() == 1 {
                    let mut r = tonic::Request::new(proto::AcquireRequest {
                        sender: sender.to_owned(),
                        recipient: req.recipients[0].clone(),
                        ..Default::default()
                    });
                    g.authorize(&mut r);
                    q.acquire(r)
                        .await
                        .map(|r| vec![r.into_inner().decision])
                        .map_err(|s| code_name(s.code()))
                } else {
                    let mut r = tonic::Request::new(proto::AcquireBatchRequest {
                        sender: sender.to_owned(),
                        recipients: req.recipients.clone(),
                        ..Default::default()
                    });
                    g.authorize(&mut r);
                    q.acquire_batch(r)
                        .await
                        .map(|r| r.into_inner().results.iter().map(|o| o.decision).collect())
                        .map_err(|s| code_name(s.code()))
                }
            }
            Driver::Redis(d) => {
                let sender = SenderId::parse("sender", sender).map_err(|e| e.to_string())?;
                let recipients = req
                    .recipients
                    .iter()
                    .map(|r| RecipientId::parse("recipient", r))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let home = Home::Sender(sender.clone());
                let areq = AcquireRequest {
                    sender,
                    recipients,
                    kind: MessageKind::Template,
                    category: None,
                    dry_run: false,
                    at: None,
                };
                let cmd = acquire_cmd(&d.script, &d.keys, &home, &areq, &d.defaults);
                let mut conn = d.conns[slot % d.conns.len()].clone();
                let v: redis::Value = cmd
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| format!("redis {:?}", e.kind()))?;
                script_decisions(&v, areq.recipients.len())
            }
            Driver::Anchor(a) => a.decide(slot, sender, req.full, &req.recipients).await,
        }
    }

    async fn setup(&self, job: &Job) -> Result<(), String> {
        match self {
            Driver::Grpc(g) => g.setup(job).await,
            Driver::Redis(d) => d.setup(job).await,
            Driver::Anchor(a) => a.setup(job).await,
        }
    }
}

/// `connections` multiplexed connections to the Redis at `url` for a script-direct load.
async fn multiplexed(
    url: &str,
    connections: usize,
) -> Result<Vec<redis::aio::MultiplexedConnection>, String> {
    let client = redis::Client::open(url).map_err(|e| format!("{url}: {e}"))?;
    // No response timeout: with hundreds of pipelined batch calls queued on Redis, the
    // client's 500 ms default would cut off calls that are only waiting their turn.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conns = Vec::new();
    for _ in 0..connections.max(1) {
        conns.push(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| format!("cannot connect to {url}: {e}"))?,
        );
    }
    Ok(conns)
}

/// The decision codes in an acquire script reply (`ledger::redis::AcquireReply`).
fn script_decisions(v: &redis::Value, n: usize) -> CallResult {
    crate::ledger::redis::AcquireReply::decode(v, n)
        .map(|r| {
            r.recipients
                .iter()
                .map(|f| f.decision.code() as i32)
                .collect()
        })
        .ok_or_else(|| "unexpected reply".to_owned())
}

/// Sequential calls made before any concurrent ones (see [`GrpcDriver::prime`]).
const PRIME_CALLS: usize = 16;

impl GrpcDriver {
    /// Channels to the gRPC API at `addr`, primed (see [`GrpcDriver::prime`]).
    async fn connect(
        addr: &str,
        connections: usize,
        token: Option<&str>,
    ) -> Result<GrpcDriver, String> {
        let endpoint = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            let ch = Channel::from_shared(endpoint.clone())
                .map_err(|e| format!("{endpoint}: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
            channels.push(ch);
        }
        let token = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "--token: not valid in gRPC metadata".to_owned())?,
            ),
            None => None,
        };
        let g = GrpcDriver {
            endpoint,
            admin: AdminServiceClient::new(channels[0].clone()),
            quota: channels.into_iter().map(QuotaServiceClient::new).collect(),
            token,
        };
        g.prime().await?;
        Ok(g)
    }

    /// A Redis-backed server opens its pooled connections on first use. Some sequential calls
    /// first open every slot of a pool of up to PRIME_CALLS connections, so the measurement
    /// includes nothing of that cold start.
    async fn prime(&self) -> Result<(), String> {
        let target = Some(proto::Target {
            target: Some(target::Target::Sender(format!("b{}-prime", run_tag()))),
        });
        for _ in 0..PRIME_CALLS {
            let mut r = tonic::Request::new(proto::InspectRequest {
                target: target.clone(),
                ..Default::default()
            });
            self.authorize(&mut r);
            self.admin
                .clone()
                .inspect(r)
                .await
                .map_err(|s| format!("{}: Inspect: {s}", self.endpoint))?;
        }
        Ok(())
    }

    fn authorize<T>(&self, r: &mut tonic::Request<T>) {
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
    }

    async fn setup(&self, job: &Job) -> Result<(), String> {
        let fail = |what: &str, s: tonic::Status| format!("setup {what}: {s}");
        match job {
            Job::Policy { sender, limit } => {
                let mut r = tonic::Request::new(proto::PutPolicyRequest {
                    target: Some(proto::Target {
                        target: Some(target::Target::Sender(sender.clone())),
                    }),
                    // The highest per-sender rate: the load measures decisions, not the 80/s
                    // default throughput limit (whose GCRA still runs on every decision).
                    policy: Some(proto::Policy {
                        tier: proto::Tier::Tier100k as i32,
                        custom_limit: *limit,
                        window_mode: proto::WindowMode::Conversation as i32,
                        messages_per_second: 100_000,
                        ..Default::default()
                    }),
                    at: None,
                });
                self.authorize(&mut r);
                self.admin
                    .clone()
                    .put_policy(r)
                    .await
                    .map_err(|s| fail("PutPolicy", s))?;
            }
            Job::Fill { sender, recipients } => {
                let mut r = tonic::Request::new(proto::AcquireBatchRequest {
                    sender: sender.clone(),
                    recipients: recipients.clone(),
                    ..Default::default()
                });
                self.authorize(&mut r);
                self.quota[0]
                    .clone()
                    .acquire_batch(r)
                    .await
                    .map_err(|s| fail("AcquireBatch", s))?;
            }
            Job::Inbound { sender, recipient } => {
                let mut r = tonic::Request::new(proto::RecordInboundRequest {
                    sender: sender.clone(),
                    recipient: recipient.clone(),
                    ..Default::default()
                });
                self.authorize(&mut r);
                self.quota[0]
                    .clone()
                    .record_inbound(r)
                    .await
                    .map_err(|s| fail("RecordInbound", s))?;
            }
            Job::Barrier => {}
        }
        Ok(())
    }
}

impl RedisDriver {
    async fn setup(&self, job: &Job) -> Result<(), String> {
        let id = |s: &str| SenderId::parse("sender", s).map_err(|e| e.to_string());
        let rid = |s: &str| RecipientId::parse("recipient", s).map_err(|e| e.to_string());
        let fail = |what: &str, e: crate::ledger::LedgerError| format!("setup {what}: {e}");
        match job {
            Job::Policy { sender, limit } => {
                let policy = model::Policy {
                    custom_limit: *limit,
                    messages_per_second: 100_000,
                    ..model::Policy::basic(Tier::T100K, WindowMode::Conversation, RuleSet::Legacy)
                };
                self.ledger
                    .put_policy(model::Target::Sender(id(sender)?), policy, None)
                    .await
                    .map_err(|e| fail("policy", e))?;
            }
            Job::Fill { sender, recipients } => {
                let req = AcquireRequest {
                    sender: id(sender)?,
                    recipients: recipients
                        .iter()
                        .map(|r| rid(r))
                        .collect::<Result<_, _>>()?,
                    kind: MessageKind::Template,
                    category: None,
                    dry_run: false,
                    at: None,
                };
                self.ledger
                    .acquire(req)
                    .await
                    .map_err(|e| fail("acquire", e))?;
            }
            Job::Inbound { sender, recipient } => {
                self.ledger
                    .record_inbound(id(sender)?, rid(recipient)?, false, None)
                    .await
                    .map_err(|e| fail("inbound", e))?;
            }
            Job::Barrier => {}
        }
        Ok(())
    }
}

/// `Unavailable` -> `UNAVAILABLE`: the names gRPC documents.
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// `1` -> `allowed_new`: the proto's decision names without their prefix (the script's codes
/// are the proto's numbers).
fn decision_name(code: i32) -> String {
    match proto::Decision::try_from(code) {
        Ok(d) => d
            .as_str_name()
            .trim_start_matches("DECISION_")
            .to_ascii_lowercase(),
        Err(_) => format!("unknown_{code}"),
    }
}

/// Runs `jobs` with `concurrency` at once, in order between barriers; stops at the first error.
async fn run_jobs(driver: &Driver, jobs: Vec<Job>, concurrency: usize) -> Result<(), String> {
    let mut phase = Vec::new();
    let mut phases = Vec::new();
    for j in jobs {
        if matches!(j, Job::Barrier) {
            phases.push(std::mem::take(&mut phase));
        } else {
            phase.push(j);
        }
    }
    phases.push(phase);
    for phase in phases {
        let jobs = Arc::new(phase);
        let next = Arc::new(AtomicUsize::new(0));
        let mut set: tokio::task::JoinSet<Result<(), String>> = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1).min(jobs.len().max(1)) {
            let (jobs, next, driver) = (jobs.clone(), next.clone(), driver.clone());
            set.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else {
                        return Ok(());
                    };
                    driver.setup(job).await?;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| format!("setup task: {e}"))??;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ measuring

#[derive(Default)]
struct WorkerStats {
    latencies: Latencies,
    calls: u64,
    ok: u64,
    recipients: u64,
    asked: [u64; 4],
    decisions: BTreeMap<i32, u64>,
    errors: BTreeMap<String, u64>,
    error_recipients: u64,
}

impl WorkerStats {
    fn merge(&mut self, o: WorkerStats) -> Result<(), String> {
        self.latencies.merge(&o.latencies)?;
        self.calls += o.calls;
        self.ok += o.ok;
        self.recipients += o.recipients;
        for i in 0..4 {
            self.asked[i] += o.asked[i];
        }
        for (k, v) in o.decisions {
            *self.decisions.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.error_recipients += o.error_recipients;
        Ok(())
    }
}

struct Progress {
    measuring: AtomicBool,
    stop: AtomicBool,
    claimed: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

/// Per-call latencies of one worker (or of all, merged), in nanoseconds.
pub(crate) struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // Fixed bounds: recording never resizes (nor allocates) in the measured loop.
        Latencies(
            Histogram::new_with_bounds(1, LATENCY_MAX_NS, LATENCY_DIGITS)
                .expect("1 ns to an hour at 3 significant digits is a valid histogram"),
        )
    }
}

impl Latencies {
    fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.saturating_record(ns.max(1));
    }

    fn merge(&mut self, other: &Latencies) -> Result<(), String> {
        self.0
            .add(&other.0)
            .map_err(|e| format!("merging latencies: {e:?}"))
    }

    /// Percentiles by nearest rank, in milliseconds rounded to the microsecond.
    fn summary(&self) -> Latency {
        let h = &self.0;
        let ms = |ns: u64| (ns as f64 / 1e3).round() / 1000.0;
        let pct = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(q))
            }
        };
        Latency {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            p99_9: pct(0.999),
            max: if h.is_empty() { 0.0 } else { ms(h.max()) },
            mean: if h.is_empty() {
                0.0
            } else {
                (h.mean() / 1e3).round() / 1000.0
            },
        }
    }
}

/// The live line on stderr while a run is measured (calls or POSTs so far, then the message:
/// their rate and errors), drawn only on a terminal: CI logs, pipes and `--json` output never
/// see it.
pub(crate) fn progress_line(label: &str, quiet: bool, unit: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let template = format!("{{spinner}} {{prefix}}: {{elapsed}}  {{human_pos}} {unit}  {{msg}}");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let line = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(label.to_owned());
    line.enable_steady_tick(Duration::from_millis(250));
    line
}

/// CPU time of one process over a measured run.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    pub name: String,
    pub pid: u32,
    pub cpu_s: f64,
    /// Of one core: 100 = one core busy all the run.
    pub percent: f64,
}

/// What one measured run did, and on what.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// "service" (gRPC) or "ceiling" (FCALL straight on Redis), with the growth step if any.
    pub label: String,
    pub target: String,
    pub concurrency: usize,
    /// Calls each worker keeps in flight.
    pub in_flight_per_worker: usize,
    pub connections: usize,
    #[serde(flatten)]
    pub shape: Shape,
    pub warmup_s: f64,
    pub elapsed_s: f64,
    /// Calls measured (one Acquire or AcquireBatch = one decision = one script run).
    pub calls: u64,
    pub ok_calls: u64,
    /// Recipients decided by the calls that succeeded.
    pub recipients_decided: u64,
    pub decisions_per_s: f64,
    pub recipients_per_s: f64,
    /// Per call, from send to answer, in milliseconds.
    pub latency_ms: Latency,
    /// Failed calls by gRPC status code (or Redis error kind).
    pub errors: BTreeMap<String, u64>,
    /// Recipients of failed calls (they have no decision).
    pub error_recipients: u64,
    /// What the answers decided, per recipient.
    pub decisions: BTreeMap<String, u64>,
    /// What the workload asked for, per recipient.
    pub asked: BTreeMap<String, u64>,
    /// Load averages (1, 5, 15 min) when the run ended.
    pub load_avg: Option<[f64; 3]>,
    /// CPU time over the measured run: this load generator, watched processes, the machine.
    pub cpu: Vec<CpuUse>,
    /// The same CPU time per decision made (a call that succeeded), in microseconds.
    pub cpu_us_per_decision: BTreeMap<String, f64>,
    /// From the stats Redis, when one is given (see `--stats-redis`).
    pub redis: Option<RedisCounts>,
}

/// What Redis executed over a measured run, per decision.
#[derive(Debug, Clone, Serialize)]
pub struct RedisCounts {
    /// `total_commands_processed` delta: client commands and the commands scripts ran.
    pub commands: u64,
    pub commands_per_decision: f64,
    /// `cmdstat_fcall` + `cmdstat_evalsha` calls delta: round trips that ran the decision script
    /// (the service's and the script-direct run's FCALL, the anchor's EVALSHA).
    pub script_calls: u64,
    pub script_calls_per_decision: f64,
    /// Redis's own time in one such call (`usec` over `calls`), in µs.
    pub script_us_per_call: f64,
    /// Where that time went, per decision, in µs: each command the scripts ran (their own
    /// `usec` in commandstats), and `lua`, the rest of the call's time (the script's logic and
    /// the marshalling of every call's arguments and replies).
    pub us_per_decision: BTreeMap<String, f64>,
}

/// What a Redis reported at one moment: `total_commands_processed`, and (calls, usec) of each
/// command in `INFO commandstats`.
pub(crate) struct RedisReading {
    total: u64,
    commands: BTreeMap<String, (u64, u64)>,
}

impl RedisReading {
    /// `(total commands, script calls)` since `before`, less the two INFO calls of `before`.
    fn since(&self, before: &RedisReading) -> (u64, u64) {
        let calls = |r: &RedisReading| {
            SCRIPT_CALLS
                .iter()
                .map(|n| r.commands.get(*n).map_or(0, |c| c.0))
                .sum::<u64>()
        };
        (
            self.total.saturating_sub(before.total + 2),
            calls(self).saturating_sub(calls(before)),
        )
    }

    /// The counts of a run that made `decisions` decisions.
    fn counts(&self, before: &RedisReading, decisions: u64) -> RedisCounts {
        let per = |n: f64| round2(n / decisions.max(1) as f64);
        let (commands, script_calls) = self.since(before);
        let delta = |name: &str| {
            let (c0, u0) = before.commands.get(name).copied().unwrap_or((0, 0));
            let (c1, u1) = self.commands.get(name).copied().unwrap_or((0, 0));
            (c1.saturating_sub(c0), u1.saturating_sub(u0))
        };
        let script_us: u64 = SCRIPT_CALLS.iter().map(|n| delta(n).1).sum();
        let mut us_per_decision = BTreeMap::new();
        let mut inner = 0;
        for name in self.commands.keys() {
            if matches!(
                name.as_str(),
                "evalsha" | "eval" | "fcall" | "function" | "function|load" | "info" | "script"
            ) {
                continue;
            }
            let (calls, us) = delta(name);
            if calls > 0 {
                inner += us;
                us_per_decision.insert(name.clone(), per(us as f64));
            }
        }
        if script_calls > 0 {
            us_per_decision.insert("lua".into(), per(script_us.saturating_sub(inner) as f64));
        }
        RedisCounts {
            commands,
            commands_per_decision: per(commands as f64),
            script_calls,
            script_calls_per_decision: per(script_calls as f64),
            script_us_per_call: round2(script_us as f64 / script_calls.max(1) as f64),
            us_per_decision,
        }
    }
}

/// The commandstats entries of calls that run a script: the service's FCALL, the anchor's EVALSHA.
const SCRIPT_CALLS: [&str; 2] = ["fcall", "evalsha"];

/// What a Redis reports of its commands now.
async fn redis_counts(conn: &mut redis::aio::MultiplexedConnection) -> Option<RedisReading> {
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .ok()?;
    let cmds: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .ok()?;
    let total = info_field(&stats, "total_commands_processed")?
        .parse()
        .ok()?;
    // cmdstat_<name>:calls=N,usec=N,usec_per_call=...
    let commands = cmds
        .lines()
        .filter_map(|l| {
            let (name, fields) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.parse::<u64>().ok())
            };
            Some((name.to_owned(), (field("calls=")?, field("usec=")?)))
        })
        .collect();
    Some(RedisReading { total, commands })
}

/// What every run of one invocation shares.
struct Ctx {
    quiet: bool,
    stats: Option<redis::aio::MultiplexedConnection>,
}

/// Utime + stime of a process, in seconds (Linux).
fn process_cpu_s(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / TICKS_PER_S)
}

/// Busy CPU seconds of the whole machine, all cores (Linux).
fn machine_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: f64 = v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4).unwrap_or(&0.0);
    Some(busy / TICKS_PER_S)
}

fn load_avg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let v: Vec<f64> = s
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some([*v.first()?, *v.get(1)?, *v.get(2)?])
}

struct CpuSnapshot(Vec<(String, u32, Option<f64>)>);

impl CpuSnapshot {
    fn take(watch: &[(String, u32)]) -> CpuSnapshot {
        let mut v = vec![("bench".to_owned(), std::process::id(), process_cpu_s(None))];
        v.extend(
            watch
                .iter()
                .map(|(n, p)| (n.clone(), *p, process_cpu_s(Some(*p)))),
        );
        v.push(("machine".to_owned(), 0, machine_cpu_s()));
        CpuSnapshot(v)
    }

    fn since(&self, before: &CpuSnapshot, elapsed: f64) -> Vec<CpuUse> {
        let mut out: Vec<CpuUse> = self
            .0
            .iter()
            .zip(&before.0)
            .filter_map(|((name, pid, after), (_, _, before))| {
                let cpu_s = after.zip(*before).map(|(a, b)| a - b)?;
                Some(CpuUse {
                    name: name.clone(),
                    pid: *pid,
                    cpu_s: round2(cpu_s),
                    percent: round2(cpu_s / elapsed.max(1e-9) * 100.0),
                })
            })
            .collect();
        // Whatever the machine did besides the processes named: builds, tests, other services.
        if let Some(m) = out.iter().find(|c| c.name == "machine") {
            let named: f64 = out
                .iter()
                .filter(|c| c.name != "machine")
                .map(|c| c.cpu_s)
                .sum();
            let other = (m.cpu_s - named).max(0.0);
            out.push(CpuUse {
                name: "other".to_owned(),
                pid: 0,
                cpu_s: round2(other),
                percent: round2(other / elapsed.max(1e-9) * 100.0),
            });
        }
        out
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Prepares the workload's state, then loads `driver` and measures.
async fn measure(
    driver: &Driver,
    args: &BenchArgs,
    shape: Shape,
    label: String,
    ctx: &Ctx,
) -> Result<RunReport, String> {
    let quiet = ctx.quiet;
    let mut stats = ctx.stats.clone();
    let workload = Arc::new(Workload::new(shape.clone()));
    let setup_start = Instant::now();
    run_jobs(driver, workload.setup_jobs(), args.concurrency.max(16)).await?;
    if !quiet {
        eprintln!(
            "{label}: setup took {:.1} s",
            setup_start.elapsed().as_secs_f64()
        );
    }

    let (connections, depth) = driver.fan_out(args);
    let workers = args.concurrency.max(1) * depth;
    let progress = Arc::new(Progress {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        claimed: AtomicU64::new(0),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let limit = args.requests;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (driver, workload, progress) = (driver.clone(), workload.clone(), progress.clone());
        let seed = (w as u64) ^ ((std::process::id() as u64) << 32);
        set.spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66);
            let mut st = WorkerStats::default();
            loop {
                if progress.stop.load(Ordering::Relaxed) {
                    break;
                }
                let measuring = progress.measuring.load(Ordering::Relaxed);
                if measuring
                    && let Some(lim) = limit
                    && progress.claimed.fetch_add(1, Ordering::Relaxed) >= lim
                {
                    break;
                }
                let req = workload.next(&mut rng, w);
                let start = Instant::now();
                let res = driver.call(w, &workload, &req).await;
                let elapsed = start.elapsed();
                if !measuring {
                    continue;
                }
                st.latencies.record(elapsed);
                st.calls += 1;
                for want in &req.wants {
                    st.asked[*want as usize] += 1;
                }
                match res {
                    Ok(codes) => {
                        st.ok += 1;
                        st.recipients += codes.len() as u64;
                        for c in codes {
                            *st.decisions.entry(c).or_default() += 1;
                        }
                    }
                    Err(e) => {
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                        *st.errors.entry(e).or_default() += 1;
                        st.error_recipients += req.recipients.len() as u64;
                    }
                }
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            st
        });
    }

    if args.warmup > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    }
    let counts_before = match &mut stats {
        Some(c) => redis_counts(c).await,
        None => None,
    };
    let cpu_before = CpuSnapshot::take(&args.watch_pids);
    let t0 = Instant::now();
    progress.measuring.store(true, Ordering::Relaxed);
    let line = progress_line(&label, quiet, "calls");
    if let Some(lim) = limit {
        line.set_length(lim);
    }
    let ticker = {
        let (line, progress) = (line.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                let done = progress.done.load(Ordering::Relaxed);
                line.set_position(done);
                line.set_message(format!(
                    "{:.0}/s  {} errors",
                    done as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                    progress.errors.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    if limit.is_none() {
        tokio::time::sleep(Duration::from_secs_f64(args.duration.max(0.0))).await;
        progress.stop.store(true, Ordering::Relaxed);
    }
    let mut total = WorkerStats::default();
    while let Some(r) = set.join_next().await {
        total.merge(r.map_err(|e| format!("load task: {e}"))?)?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = CpuSnapshot::take(&args.watch_pids).since(&cpu_before, elapsed);
    let counts_after = match &mut stats {
        Some(c) => redis_counts(c).await,
        None => None,
    };
    let redis = counts_before
        .zip(counts_after)
        .map(|(before, after)| after.counts(&before, total.ok));
    ticker.abort();
    line.finish_and_clear();
    Ok(RunReport {
        label,
        target: driver.target().to_owned(),
        concurrency: args.concurrency,
        in_flight_per_worker: depth,
        connections,
        shape,
        warmup_s: args.warmup,
        elapsed_s: round3(elapsed),
        calls: total.calls,
        ok_calls: total.ok,
        recipients_decided: total.recipients,
        decisions_per_s: round2(total.ok as f64 / elapsed),
        recipients_per_s: round2(total.recipients as f64 / elapsed),
        latency_ms: total.latencies.summary(),
        errors: total.errors,
        error_recipients: total.error_recipients,
        decisions: total
            .decisions
            .into_iter()
            .map(|(c, n)| (decision_name(c), n))
            .collect(),
        asked: WANTS
            .iter()
            .map(|(w, name)| ((*name).to_owned(), total.asked[*w as usize]))
            .collect(),
        load_avg: load_avg(),
        cpu_us_per_decision: cpu
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    round2(c.cpu_s * 1e6 / total.ok.max(1) as f64),
                )
            })
            .collect(),
        cpu,
        redis,
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ------------------------------------------------------------------ memory

#[derive(Debug, Clone, Serialize)]
pub struct WindowMemory {
    pub slots: usize,
    /// Shards of the window (each a zset and a hash).
    pub shards: usize,
    /// `MEMORY USAGE <key> SAMPLES 0` summed over every key of the window: its shards, header
    /// and index.
    pub window_bytes: u64,
    /// Of which the shards (the slots themselves).
    pub shard_bytes: u64,
    /// window_bytes / slots.
    pub bytes_per_slot: f64,
    /// `used_memory` after minus before filling this window (everything the fill wrote).
    pub used_memory_delta: i64,
    pub used_memory_delta_per_slot: f64,
    /// Of the delta, outside the window: the projection index (one entry per user for 30
    /// days) and the pair-rate state (one per recent recipient).
    pub projection_bytes: u64,
    pub pair_rate_bytes: u64,
    /// Entries in the pair-rate state when measured: the fill runs on the real clock, so those
    /// past their pair time (6 s at the default pair rate) may already be trimmed.
    pub pair_rate_entries: u64,
    pub pair_rate_bytes_per_entry: f64,
    /// The pair-rate set's parts by encoding, e.g. "listpack x512".
    pub pair_rate_encodings: String,
    /// Encodings of the shard keys, with how many keys have each ("zset listpack x4, ...").
    pub encodings: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceWindowMemory {
    pub windows: usize,
    pub key_bytes: u64,
    pub bytes_per_window: f64,
    pub used_memory_delta: i64,
    pub used_memory_delta_per_window: f64,
    pub encoding: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub redis: String,
    pub redis_version: String,
    /// Length of every recipient id stored (13-digit `wa_id`s).
    pub recipient_len: usize,
    /// The server's compact-encoding thresholds (`CONFIG GET zset-max-*`, `hash-max-*`).
    pub encoding_config: BTreeMap<String, String>,
    pub windows: Vec<WindowMemory>,
    pub service_windows: Vec<ServiceWindowMemory>,
}

fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Result<i64, String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| format!("INFO memory: {e}"))?;
    info_field(&info, "used_memory")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "INFO memory has no used_memory".to_owned())
}

async fn key_memory(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (u64, String) {
    let bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(conn)
        .await
        .unwrap_or(None);
    let enc: Option<String> = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap_or(None);
    (bytes.unwrap_or(0), enc.unwrap_or_else(|| "-".into()))
}

/// A sender's sorted set with its further parts (`<key>/<i>`, once it is split:
/// docs/internals.md, "Redis key schema"): `MEMORY USAGE` summed over the parts, the members
/// (the shape member `~` not counted), and the parts' encodings with how many of each.
async fn set_memory(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (u64, u64, String) {
    let mut keys = vec![key.to_owned()];
    keys.extend(
        scan_keys(conn, &format!("{key}/*"))
            .await
            .unwrap_or_default(),
    );
    let (mut bytes, mut members) = (0, 0u64);
    let mut encodings: BTreeMap<String, usize> = BTreeMap::new();
    for k in &keys {
        let (b, enc) = key_memory(conn, k).await;
        bytes += b;
        members += redis::cmd("ZCARD")
            .arg(k)
            .query_async::<u64>(conn)
            .await
            .unwrap_or(0);
        *encodings.entry(enc).or_default() += 1;
    }
    let shape: Option<f64> = redis::cmd("ZSCORE")
        .arg(key)
        .arg("~")
        .query_async(conn)
        .await
        .unwrap_or(None);
    let members = members - u64::from(shape.is_some());
    let enc = encodings
        .iter()
        .map(|(e, n)| format!("{e} x{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    (bytes, members, enc)
}

async fn scan_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, String> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(|e| format!("SCAN: {e}"))?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

async fn measure_memory(args: &BenchArgs, url: &str) -> Result<MemoryReport, String> {
    let driver = Driver::redis(url, args.connections, &args.key_prefix).await?;
    let Driver::Redis(d) = &driver else {
        unreachable!("a Redis driver")
    };
    let mut conn = d.conns[0].clone();
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("INFO server: {e}"))?;
    let tag = run_tag();
    // One throw-away pass first, so one-time costs (scripts cached, Lua state, client buffers)
    // do not land in the first measured delta.
    let warm = format!("m{tag}-warm");
    let mut jobs = vec![
        Job::Policy {
            sender: warm.clone(),
            limit: 1_000,
        },
        Job::Barrier,
        Job::Fill {
            sender: warm.clone(),
            recipients: (0..SETUP_BATCH).map(counted_recipient).collect(),
        },
    ];
    jobs.extend((0..100).map(|i| Job::Inbound {
        sender: warm.clone(),
        recipient: service_recipient(i),
    }));
    run_jobs(&driver, jobs, args.concurrency.max(16)).await?;
    let mut windows = Vec::new();
    for slots in MEMORY_SLOTS {
        let sender = format!("m{tag}-w{slots}");
        let before = used_memory(&mut conn).await?;
        let mut jobs = vec![
            Job::Policy {
                sender: sender.clone(),
                limit: slots as u64,
            },
            Job::Barrier,
        ];
        let all: Vec<usize> = (0..slots).collect();
        for chunk in all.chunks(SETUP_BATCH) {
            jobs.push(Job::Fill {
                sender: sender.clone(),
                recipients: chunk.iter().map(|i| counted_recipient(*i)).collect(),
            });
        }
        run_jobs(&driver, jobs, 1).await?;
        let after = used_memory(&mut conn).await?;
        let k = d.keys.home(&Home::Sender(
            SenderId::parse("sender", &sender).map_err(|e| e.to_string())?,
        ));
        let (header, _) = key_memory(&mut conn, &k.window()).await;
        let (index, _) = key_memory(&mut conn, &k.window_index()).await;
        let mut shard_bytes = 0;
        let mut shards = 0;
        let mut encodings: BTreeMap<String, usize> = BTreeMap::new();
        let [zsets, hashes] = k.window_shard_patterns();
        for (pattern, kind) in [(zsets, "zset"), (hashes, "hash")] {
            for key in scan_keys(&mut conn, &pattern).await? {
                let (bytes, enc) = key_memory(&mut conn, &key).await;
                shard_bytes += bytes;
                if kind == "zset" {
                    shards += 1;
                }
                *encodings.entry(format!("{kind} {enc}")).or_default() += 1;
            }
        }
        // The projection index is its by-user parts, its two-hour buckets and its hash, all
        // named from the `uq` key.
        let mut projection_bytes = 0;
        for key in scan_keys(&mut conn, &format!("{}*", k.uniques())).await? {
            projection_bytes += key_memory(&mut conn, &key).await.0;
        }
        let id = SenderId::parse("sender", &sender).map_err(|e| e.to_string())?;
        let (pair_rate_bytes, pair_rate_entries, pair_rate_encodings) =
            set_memory(&mut conn, &k.pair_rates(&id)).await;
        let window_bytes = header + index + shard_bytes;
        windows.push(WindowMemory {
            slots,
            shards,
            window_bytes,
            shard_bytes,
            bytes_per_slot: round2(window_bytes as f64 / slots as f64),
            used_memory_delta: after - before,
            used_memory_delta_per_slot: round2((after - before) as f64 / slots as f64),
            projection_bytes,
            pair_rate_bytes,
            pair_rate_entries,
            pair_rate_bytes_per_entry: round2(
                pair_rate_bytes as f64 / pair_rate_entries.max(1) as f64,
            ),
            pair_rate_encodings,
            encodings: encodings
                .iter()
                .map(|(e, n)| format!("{e} x{n}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let mut service_windows = Vec::new();
    for n in MEMORY_SERVICE_WINDOWS {
        let sender = format!("m{tag}-c{n}");
        let id = SenderId::parse("sender", &sender).map_err(|e| e.to_string())?;
        let before = used_memory(&mut conn).await?;
        let jobs = (0..n)
            .map(|i| Job::Inbound {
                sender: sender.clone(),
                recipient: service_recipient(i),
            })
            .collect();
        run_jobs(&driver, jobs, args.concurrency.max(16)).await?;
        let after = used_memory(&mut conn).await?;
        let key = d.keys.home(&Home::Sender(id.clone())).service_windows(&id);
        let (bytes, _, enc) = set_memory(&mut conn, &key).await;
        service_windows.push(ServiceWindowMemory {
            windows: n,
            key_bytes: bytes,
            bytes_per_window: round2(bytes as f64 / n as f64),
            used_memory_delta: after - before,
            used_memory_delta_per_window: round2((after - before) as f64 / n as f64),
            encoding: enc,
        });
    }
    let mut encoding_config = BTreeMap::new();
    for pattern in ["zset-max-*", "hash-max-*"] {
        let pairs: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for kv in pairs.chunks_exact(2) {
            encoding_config.insert(kv[0].clone(), kv[1].clone());
        }
    }
    Ok(MemoryReport {
        redis: url.to_owned(),
        encoding_config,
        redis_version: info_field(&info, "redis_version").unwrap_or_default(),
        recipient_len: counted_recipient(0).len(),
        windows,
        service_windows,
    })
}

// ------------------------------------------------------------------ reports

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub load_avg_at_start: Option<[f64; 3]>,
}

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model,
        load_avg_at_start: load_avg(),
    }
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub service: Option<RunReport>,
    pub ceiling: Option<RunReport>,
    /// service decisions/s over ceiling decisions/s, when both ran.
    pub service_to_ceiling: Option<f64>,
    pub anchor: Option<RunReport>,
    pub anchor_pipelined: Option<RunReport>,
    /// service decisions/s over the unpipelined anchor's, when both ran.
    pub service_to_anchor: Option<f64>,
    pub memory: Option<MemoryReport>,
    pub growth: Vec<RunReport>,
    pub cost: Vec<RunReport>,
    pub webhooks: Option<webhook::WebhookReport>,
}

/// `name count, ...`, or `none`.
fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A table in Markdown layout, so a report pastes straight into BENCHMARKS.md; columns from
/// `right_from` on hold figures and are right-aligned.
pub(crate) fn table(header: &[&str], right_from: usize) -> Table {
    let mut t = Table::new();
    t.load_style(presets::ASCII_MARKDOWN)
        .set_header(header.to_vec());
    for i in right_from..header.len() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

pub(crate) fn latency_cell(l: &Latency) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
        l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
    )
}

/// `name N%, ...` of one core, or `None` when nothing was read.
pub(crate) fn cpu_cell(cpu: &[CpuUse]) -> Option<String> {
    (!cpu.is_empty()).then(|| {
        let each: Vec<String> = cpu
            .iter()
            .map(|c| format!("{} {:.0}%", c.name, c.percent))
            .collect();
        format!("{}  (% of one core)", each.join(", "))
    })
}

fn per_decision_cell(m: &BTreeMap<String, f64>) -> String {
    let each: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    each.join(", ")
}

fn load_avg_cell([a, b, c]: [f64; 3]) -> String {
    format!("{a:.2} {b:.2} {c:.2}")
}

fn print_run(r: &RunReport) {
    println!(
        "{} {}  concurrency {} x {} in flight, {} connections, batch {}, {} senders (+{} full), \
         {} counted + {} service recipients each, mix {}",
        r.label,
        r.target,
        r.concurrency,
        r.in_flight_per_worker,
        r.connections,
        r.shape.batch,
        r.shape.senders,
        r.shape.full_senders,
        r.shape.recipients,
        r.shape.service_recipients,
        r.shape.mix
    );
    let mut t = table(&["", "measured"], 2);
    t.add_row(vec![
        "run".to_owned(),
        format!("{:.2} s, {} calls", r.elapsed_s, r.calls),
    ]);
    t.add_row(vec![
        "throughput".to_owned(),
        format!(
            "{:.0} decisions/s, {:.0} recipients/s",
            r.decisions_per_s, r.recipients_per_s
        ),
    ]);
    t.add_row(vec!["latency ms".to_owned(), latency_cell(&r.latency_ms)]);
    t.add_row(vec!["decisions".to_owned(), counts(&r.decisions)]);
    t.add_row(vec!["asked".to_owned(), counts(&r.asked)]);
    t.add_row(vec!["errors".to_owned(), counts(&r.errors)]);
    if let Some(cpu) = cpu_cell(&r.cpu) {
        t.add_row(vec!["cpu".to_owned(), cpu]);
    }
    if !r.cpu_us_per_decision.is_empty() {
        t.add_row(vec![
            "cpu µs/decision".to_owned(),
            per_decision_cell(&r.cpu_us_per_decision),
        ]);
    }
    if let Some(x) = &r.redis {
        t.add_row(vec![
            "redis".to_owned(),
            format!(
                "{:.2} commands/decision (scripts' included), {:.2} script calls/decision, \
                 {:.1} µs/call",
                x.commands_per_decision, x.script_calls_per_decision, x.script_us_per_call
            ),
        ]);
        t.add_row(vec![
            "redis µs/decision".to_owned(),
            per_decision_cell(&x.us_per_decision),
        ]);
    }
    if let Some(l) = r.load_avg {
        t.add_row(vec!["load avg".to_owned(), load_avg_cell(l)]);
    }
    println!("{t}");
}

fn print_memory(m: &MemoryReport) {
    println!(
        "memory {} (Redis {}), recipients of {} characters",
        m.redis, m.redis_version, m.recipient_len
    );
    println!(
        "{}",
        m.encoding_config
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut t = table(
        &[
            "slots",
            "shards",
            "window B",
            "shards B",
            "B/slot",
            "used_memory",
            "Δ B/slot",
            "projection",
            "pair rate",
            "entries",
            "B/entry",
            "shard encodings",
        ],
        0,
    );
    if let Some(c) = t.column_mut(11) {
        c.set_cell_alignment(CellAlignment::Left);
    }
    for w in &m.windows {
        t.add_row(vec![
            w.slots.to_string(),
            w.shards.to_string(),
            w.window_bytes.to_string(),
            w.shard_bytes.to_string(),
            format!("{:.1}", w.bytes_per_slot),
            w.used_memory_delta.to_string(),
            format!("{:.1}", w.used_memory_delta_per_slot),
            w.projection_bytes.to_string(),
            w.pair_rate_bytes.to_string(),
            w.pair_rate_entries.to_string(),
            format!("{:.1}", w.pair_rate_bytes_per_entry),
            w.encodings.clone(),
        ]);
    }
    println!("{t}");
    let mut t = table(
        &[
            "windows",
            "key B",
            "B/window",
            "used_memory",
            "Δ B/window",
            "encoding",
        ],
        0,
    );
    if let Some(c) = t.column_mut(5) {
        c.set_cell_alignment(CellAlignment::Left);
    }
    for s in &m.service_windows {
        t.add_row(vec![
            s.windows.to_string(),
            s.key_bytes.to_string(),
            format!("{:.1}", s.bytes_per_window),
            s.used_memory_delta.to_string(),
            format!("{:.1}", s.used_memory_delta_per_window),
            s.encoding.clone(),
        ]);
    }
    println!("{t}");
}

fn print_report(r: &Report) {
    let m = &r.machine;
    println!(
        "machine: {} cpus, {}{}",
        m.cpus,
        m.cpu_model.as_deref().unwrap_or("unknown cpu"),
        m.load_avg_at_start
            .map(|[a, b, c]| format!(", load avg at start {a:.2} {b:.2} {c:.2}"))
            .unwrap_or_default()
    );
    for run in [&r.service, &r.ceiling, &r.anchor, &r.anchor_pipelined]
        .into_iter()
        .flatten()
    {
        print_run(run);
    }
    if let Some(x) = r.service_to_anchor {
        println!(
            "service / anchor: {x:.3} (end-to-end decisions/s over the unpipelined anchor script's)"
        );
    }
    if let Some(x) = r.service_to_ceiling {
        println!(
            "service / ceiling: {:.3} (end-to-end decisions/s over the script's own)",
            x
        );
    }
    for run in &r.growth {
        print_run(run);
    }
    if !r.growth.is_empty() {
        println!("growth summary");
        let mut t = table(&["run", "decisions/s", "p50 ms", "p99 ms"], 1);
        for run in &r.growth {
            t.add_row(vec![
                run.label.clone(),
                format!("{:.0}", run.decisions_per_s),
                format!("{:.3}", run.latency_ms.p50),
                format!("{:.3}", run.latency_ms.p99),
            ]);
        }
        println!("{t}");
    }
    if !r.cost.is_empty() {
        print_cost(&r.cost);
    }
    if let Some(mem) = &r.memory {
        print_memory(mem);
    }
    if let Some(w) = &r.webhooks {
        webhook::print(w);
    }
}

fn base_shape(args: &BenchArgs) -> Shape {
    Shape {
        senders: args.senders.max(1),
        full_senders: (args.senders / 10).clamp(1, 100),
        recipients: args.recipients,
        service_recipients: args.service_recipients,
        mix: args.mix,
        batch: args.batch.max(1),
        pinned: false,
    }
}

/// The loads of `--cost`: (name, batch, pinned).
const COST_LOADS: [(&str, usize, bool); 6] = [
    ("single uncoalesced", 1, true),
    ("single coalesced", 1, false),
    ("batch 10 uncoalesced", 10, true),
    ("batch 10 coalesced", 10, false),
    ("batch 100 uncoalesced", 100, true),
    ("batch 100 coalesced", 100, false),
];

/// Every outcome alone, then the given mix.
fn cost_mixes(mix: Mix) -> [(&'static str, Mix); 5] {
    let only = |new, counted, service, denied| Mix {
        new,
        counted,
        service,
        denied,
    };
    [
        ("new", only(100, 0, 0, 0)),
        ("counted", only(0, 100, 0, 0)),
        ("service", only(0, 0, 100, 0)),
        ("denied", only(0, 0, 0, 100)),
        ("mix", mix),
    ]
}

async fn cost(driver: &Driver, args: &BenchArgs, ctx: &Ctx) -> Result<Vec<RunReport>, String> {
    let mut out = Vec::new();
    for (load, batch, pinned) in COST_LOADS {
        // Uncoalesced: a sender per worker, a full sender per worker too.
        let senders = if pinned {
            args.concurrency.max(1)
        } else {
            args.senders.max(1)
        };
        for (outcome, mix) in cost_mixes(args.mix) {
            let shape = Shape {
                senders,
                full_senders: if pinned {
                    senders
                } else {
                    (senders / 10).clamp(1, 100)
                },
                mix,
                batch,
                pinned,
                ..base_shape(args)
            };
            let label = format!("{} {load} {outcome}", driver.label());
            out.push(measure(driver, args, shape, label, ctx).await?);
        }
    }
    Ok(out)
}

/// The `--cost` table: one line per run.
fn print_cost(runs: &[RunReport]) {
    println!("cost (µs per decision; a batch is one decision)");
    let mut t = table(
        &[
            "run",
            "dec/s",
            "recip/s",
            "p50 ms",
            "p99 ms",
            "p99.9",
            "redis µs",
            "redis/rcpt",
            "server",
            "bench",
            "µs/call",
            "calls/d",
        ],
        1,
    );
    for r in runs {
        let cpu = |name: &str| r.cpu_us_per_decision.get(name).copied();
        let show = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let batch = r.shape.batch.max(1) as f64;
        let (call_us, calls_per) = r.redis.as_ref().map_or((None, None), |x| {
            (
                Some(x.script_us_per_call),
                Some(x.script_calls_per_decision),
            )
        });
        t.add_row(vec![
            r.label.clone(),
            format!("{:.0}", r.decisions_per_s),
            format!("{:.0}", r.recipients_per_s),
            format!("{:.3}", r.latency_ms.p50),
            format!("{:.3}", r.latency_ms.p99),
            format!("{:.3}", r.latency_ms.p99_9),
            show(cpu("redis")),
            show(cpu("redis").map(|v| v / batch)),
            show(cpu("server")),
            show(cpu("bench")),
            show(call_us),
            calls_per.map_or("-".to_owned(), |v| format!("{v:.2}")),
        ]);
    }
    println!("{t}");
}

async fn growth(driver: &Driver, args: &BenchArgs, ctx: &Ctx) -> Result<Vec<RunReport>, String> {
    let mut out = Vec::new();
    for slots in GROWTH_SLOTS {
        let shape = Shape {
            senders: 1,
            full_senders: 1,
            recipients: slots,
            ..base_shape(args)
        };
        let label = format!("{} slots={slots}", driver.label());
        out.push(measure(driver, args, shape, label, ctx).await?);
    }
    for senders in GROWTH_SENDERS {
        let shape = Shape {
            senders,
            full_senders: (senders / 10).clamp(1, 100),
            recipients: args.recipients.min(GROWTH_SLOT_BUDGET / senders).max(1),
            service_recipients: args
                .service_recipients
                .min(GROWTH_SERVICE_BUDGET / senders)
                .max(1),
            ..base_shape(args)
        };
        let label = format!("{} senders={senders}", driver.label());
        out.push(measure(driver, args, shape, label, ctx).await?);
    }
    Ok(out)
}

/// Runs whose new slots the server refused as a lost ledger: their figures measure refusals.
fn lost_ledger_runs(r: &Report) -> Vec<&str> {
    let runs = [&r.service, &r.ceiling, &r.anchor, &r.anchor_pipelined];
    (runs.into_iter().flatten())
        .chain(&r.growth)
        .chain(&r.cost)
        .filter(|run| run.decisions.contains_key("denied_ledger_lost"))
        .map(|run| run.label.as_str())
        .collect()
}

/// `waquota bench`: runs what the arguments ask for and prints the report.
pub async fn run(args: BenchArgs) -> ExitCode {
    match run_report(&args).await {
        Ok(report) => {
            let lost = lost_ledger_runs(&report);
            if !lost.is_empty() {
                eprintln!(
                    "waquota bench: warning: the server refused new slots as a lost ledger \
                     (DENIED_LEDGER_LOST) in {}: their figures measure refusals. Was Redis \
                     emptied under a running server? Run `waquota ledger accept-loss`, or \
                     restart the server on an empty Redis.",
                    lost.join(", ")
                );
            }
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("waquota bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("waquota bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the measurements `args` ask for.
pub async fn run_report(args: &BenchArgs) -> Result<Report, String> {
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let quiet = !std::io::stderr().is_terminal();
    let stats_url = (args.stats_redis.as_ref())
        .or(args.ceiling_redis.as_ref())
        .or(args.anchor_redis.as_ref());
    let stats = match stats_url {
        Some(url) => Some(
            redis::Client::open(url.as_str())
                .map_err(|e| format!("{url}: {e}"))?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("cannot connect to {url}: {e}"))?,
        ),
        None => None,
    };
    let ctx = Ctx { quiet, stats };
    let mut report = Report {
        machine: machine(),
        service: None,
        ceiling: None,
        service_to_ceiling: None,
        anchor: None,
        anchor_pipelined: None,
        service_to_anchor: None,
        memory: None,
        growth: Vec::new(),
        cost: Vec::new(),
        webhooks: None,
    };
    if let Some(url) = &args.webhook_url {
        // The webhook run alone: its setup uses the gRPC API, its load the webhook listener.
        let secret = args
            .webhook_secret
            .as_deref()
            .ok_or("--webhook-url needs --webhook-secret")?;
        let addr = args.addr.as_deref().unwrap_or(DEFAULT_ADDR);
        let grpc = GrpcDriver::connect(addr, 1, args.token.as_deref()).await?;
        report.webhooks = Some(webhook::measure(args, &grpc, url, secret, &ctx).await?);
        return Ok(report);
    }
    let addr = match (
        &args.addr,
        &args.ceiling_redis,
        &args.memory_redis,
        &args.anchor_redis,
    ) {
        (Some(a), _, _, _) => Some(a.clone()),
        (None, None, None, None) => Some(DEFAULT_ADDR.to_owned()),
        _ => None,
    };
    let mut drivers = Vec::new();
    if let Some(addr) = &addr {
        drivers.push(Driver::grpc(addr, args.connections, args.token.as_deref()).await?);
    }
    if let Some(url) = &args.ceiling_redis {
        drivers.push(Driver::redis(url, args.connections, &args.key_prefix).await?);
    }
    if let Some(url) = &args.anchor_redis {
        for depth in [1, args.pipeline.max(1)] {
            let a = anchor::AnchorDriver::connect(url, args.connections, &args.key_prefix, depth);
            drivers.push(Driver::Anchor(Arc::new(a.await?)));
        }
    }
    for d in &drivers {
        if args.cost {
            report.cost.extend(cost(d, args, &ctx).await?);
        } else if args.growth {
            report.growth.extend(growth(d, args, &ctx).await?);
        } else {
            let r = measure(d, args, base_shape(args), d.label().to_owned(), &ctx).await?;
            match d {
                Driver::Grpc(_) => report.service = Some(r),
                Driver::Redis(_) => report.ceiling = Some(r),
                Driver::Anchor(a) if a.depth == 1 => report.anchor = Some(r),
                Driver::Anchor(_) => report.anchor_pipelined = Some(r),
            }
        }
    }
    if let (Some(s), Some(c)) = (&report.service, &report.ceiling)
        && c.decisions_per_s > 0.0
    {
        report.service_to_ceiling =
            Some((s.decisions_per_s / c.decisions_per_s * 1000.0).round() / 1000.0);
    }
    if let (Some(s), Some(a)) = (&report.service, &report.anchor)
        && a.decisions_per_s > 0.0
    {
        report.service_to_anchor =
            Some((s.decisions_per_s / a.decisions_per_s * 1000.0).round() / 1000.0);
    }
    if let Some(url) = &args.memory_redis {
        report.memory = Some(measure_memory(args, url).await?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two workers' histograms merged give the percentiles by nearest rank of all their calls,
    /// to the microsecond the report shows (the histogram keeps 3 significant digits).
    #[test]
    fn merged_latencies_give_nearest_rank_percentiles() {
        let (mut a, mut b) = (Latencies::default(), Latencies::default());
        for us in 1..=1000u64 {
            let w = if us % 2 == 0 { &mut a } else { &mut b };
            w.record(Duration::from_micros(us));
        }
        a.merge(&b).unwrap();
        let l = a.summary();
        let near = |got: f64, want: f64| (got - want).abs() <= 0.001 + want * 1e-3;
        for (got, want) in [
            (l.p50, 0.5),
            (l.p90, 0.9),
            (l.p99, 0.99),
            (l.p99_9, 0.999),
            (l.max, 1.0),
            (l.mean, 0.5005),
        ] {
            assert!(near(got, want), "{got} for {want}: {l:?}");
        }
        let empty = Latencies::default().summary();
        assert_eq!((empty.p50, empty.max, empty.mean), (0.0, 0.0, 0.0));
    }

    #[test]
    fn a_call_longer_than_the_histogram_counts_as_its_top() {
        let mut l = Latencies::default();
        l.record(Duration::from_secs(7200));
        assert!((l.summary().max - 3_600_000.0).abs() / 3_600_000.0 < 1e-3);
    }
}
