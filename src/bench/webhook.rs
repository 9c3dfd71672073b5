//! `waquota bench --webhook-url`: signed webhook POSTs against a running server's listener.
//!
//! Each POST carries `--webhook-events` events, half inbound messages from users never seen
//! (a service window opened each) and half delivery statuses of reservations the setup
//! acquired: each reservation gets `delivered` (a Confirm) and then `read` (the same event
//! identity: answered from the remembered events). Every event is its own entry, with the
//! sender's metadata, as WhatsApp batches them. POSTs/s, events/s, latency per POST and, with a
//! stats Redis, Redis commands per event are reported (BENCHMARKS.md, "Webhook POSTs").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde_json::json;

use super::{
    ACTIVE_LIMIT, BenchArgs, CpuSnapshot, CpuUse, Ctx, GrpcDriver, Job, Latencies, Latency, counts,
    cpu_cell, latency_cell, load_avg, progress_line, redis_counts, round2, round3, run_tag, table,
};
use crate::proto;

/// Recipients per AcquireBatch while acquiring the reservations the statuses name.
const ACQUIRE_CHUNK: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct WebhookReport {
    pub url: String,
    pub concurrency: usize,
    pub senders: usize,
    pub events_per_post: usize,
    pub reservations: usize,
    pub warmup_s: f64,
    pub elapsed_s: f64,
    pub posts: u64,
    pub ok_posts: u64,
    pub posts_per_s: f64,
    pub events_per_s: f64,
    /// Per POST, from send to answer, in milliseconds.
    pub latency_ms: Latency,
    /// Failed POSTs by HTTP status (or transport error).
    pub errors: BTreeMap<String, u64>,
    pub load_avg: Option<[f64; 3]>,
    pub cpu: Vec<CpuUse>,
    /// Redis commands (scripts' included) over the run, per event of the POSTs answered 200.
    pub redis_commands_per_event: Option<f64>,
}

/// A reservation the setup acquired: the status events name it.
struct Sent {
    sender: usize,
    recipient: String,
    reservation: String,
}

struct Load {
    tag: String,
    senders: Vec<String>,
    sent: Vec<Sent>,
    events: usize,
    /// Inbound messages and statuses handed out so far (their ids and users are unique).
    inbound: AtomicU64,
    statuses: AtomicU64,
}

impl Load {
    fn display(i: usize) -> String {
        format!("1555{i:07}")
    }

    fn entry(&self, sender: usize, mut value: serde_json::Value) -> serde_json::Value {
        value["messaging_product"] = json!("whatsapp");
        value["metadata"] = json!({
            "display_phone_number": Self::display(sender),
            "phone_number_id": self.senders[sender],
        });
        json!({
            "id": format!("waba-{}", self.tag),
            "changes": [{"field": "messages", "value": value}],
        })
    }

    /// One POST body: `events` entries, inbound and statuses alternating.
    fn body(&self, now_s: u64) -> Bytes {
        let ts = now_s.to_string();
        let entries: Vec<serde_json::Value> = (0..self.events)
            .map(|i| {
                if i.is_multiple_of(2) {
                    let n = self.inbound.fetch_add(1, Ordering::Relaxed);
                    let sender = (n as usize) % self.senders.len();
                    let from = format!("4918{n:09}");
                    self.entry(
                        sender,
                        json!({
                            "contacts": [{"profile": {"name": "bench"}, "wa_id": from}],
                            "messages": [{
                                "from": from,
                                "id": format!("wamid.{}.in.{n}", self.tag),
                                "timestamp": ts,
                                "type": "text",
                                "text": {"body": "hello"},
                            }],
                        }),
                    )
                } else {
                    let n = self.statuses.fetch_add(1, Ordering::Relaxed);
                    let m = n / 2;
                    let s = &self.sent[(m as usize) % self.sent.len()];
                    self.entry(
                        s.sender,
                        json!({
                            "statuses": [{
                                "id": format!("wamid.{}.out.{m}", self.tag),
                                "status": if n.is_multiple_of(2) { "delivered" } else { "read" },
                                "timestamp": ts,
                                "recipient_id": s.recipient,
                                "biz_opaque_callback_data": s.reservation,
                            }],
                        }),
                    )
                }
            })
            .collect();
        let body = json!({"object": "whatsapp_business_account", "entry": entries});
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Senders with the bench's policy, and `args.webhook_reservations` reservations spread over
/// them, through the gRPC API.
async fn setup(args: &BenchArgs, grpc: &GrpcDriver, tag: &str) -> Result<Load, String> {
    let senders: Vec<String> = (0..args.senders.max(1))
        .map(|i| format!("b{tag}-w{i}"))
        .collect();
    for s in &senders {
        grpc.setup(&Job::Policy {
            sender: s.clone(),
            limit: ACTIVE_LIMIT,
        })
        .await?;
    }
    let mut sent = Vec::new();
    let mut n = 0usize;
    while sent.len() < args.webhook_reservations.max(1) {
        let sender = n % senders.len();
        let recipients: Vec<String> = (0..ACQUIRE_CHUNK)
            .map(|i| format!("4917{:09}", n * ACQUIRE_CHUNK + i))
            .collect();
        n += 1;
        let mut r = tonic::Request::new(proto::AcquireBatchRequest {
            sender: senders[sender].clone(),
            recipients: recipients.clone(),
            ..Default::default()
        });
        grpc.authorize(&mut r);
        let reply = grpc.quota[0]
            .clone()
            .acquire_batch(r)
            .await
            .map_err(|s| format!("setup AcquireBatch: {s}"))?
            .into_inner();
        for (recipient, res) in recipients.into_iter().zip(reply.results) {
            if !res.reservation.is_empty() {
                sent.push(Sent {
                    sender,
                    recipient,
                    reservation: res.reservation,
                });
            }
        }
    }
    Ok(Load {
        tag: tag.to_owned(),
        senders,
        sent,
        events: args.webhook_events.max(1),
        inbound: AtomicU64::new(0),
        statuses: AtomicU64::new(0),
    })
}

#[derive(Default)]
struct Stats {
    latencies: Latencies,
    posts: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

/// Loads the webhook listener at `url` for `args.duration` seconds after `args.warmup`.
pub(super) async fn measure(
    args: &BenchArgs,
    grpc: &GrpcDriver,
    url: &str,
    secret: &str,
    ctx: &Ctx,
) -> Result<WebhookReport, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let tag = run_tag();
    let setup_start = Instant::now();
    let load = Arc::new(setup(args, grpc, &tag).await?);
    if !ctx.quiet {
        eprintln!(
            "webhooks: setup took {:.1} s ({} reservations)",
            setup_start.elapsed().as_secs_f64(),
            load.sent.len()
        );
    }
    // One pooled HTTP/1.1 client: each worker's connection is kept alive between its POSTs.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build_http::<Full<Bytes>>();
    // Without a warm-up every POST is measured, the first ones too.
    let measuring = Arc::new(AtomicBool::new(args.warmup <= 0.0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, load, uri) = (client.clone(), load.clone(), uri.clone());
        let (measuring, stop, secret) = (measuring.clone(), stop.clone(), secret.to_owned());
        let done = done.clone();
        set.spawn(async move {
            let mut st = Stats::default();
            while !stop.load(Ordering::Relaxed) {
                let body = load.body(now_s());
                let signature = crate::webhook::signature(&body, &secret);
                let req = hyper::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", signature)
                    .body(Full::new(body));
                let Ok(req) = req else { break };
                let on = measuring.load(Ordering::Relaxed);
                let start = Instant::now();
                let outcome = match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        // The body is read to the end so the connection is reused.
                        let _ = resp.into_body().collect().await;
                        if status.is_success() {
                            Ok(())
                        } else {
                            Err(status.as_u16().to_string())
                        }
                    }
                    Err(e) => Err(format!("transport: {e}")),
                };
                if !on {
                    continue;
                }
                st.latencies.record(start.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
                st.posts += 1;
                match outcome {
                    Ok(()) => st.ok += 1,
                    Err(e) => *st.errors.entry(e).or_default() += 1,
                }
            }
            st
        });
    }
    if args.warmup > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    }
    let mut stats = ctx.stats.clone();
    let counts_before = match &mut stats {
        Some(c) => redis_counts(c).await,
        None => None,
    };
    let cpu_before = CpuSnapshot::take(&args.watch_pids);
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    let line = progress_line("webhooks", ctx.quiet, "POSTs");
    let ticker = {
        let (line, done) = (line.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                let n = done.load(Ordering::Relaxed);
                line.set_position(n);
                line.set_message(format!(
                    "{:.0}/s",
                    n as f64 / t0.elapsed().as_secs_f64().max(1e-9)
                ));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(args.duration.max(0.0))).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Stats::default();
    while let Some(r) = set.join_next().await {
        let r = r.map_err(|e| format!("load task: {e}"))?;
        total.latencies.merge(&r.latencies)?;
        total.posts += r.posts;
        total.ok += r.ok;
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    ticker.abort();
    line.finish_and_clear();
    let cpu = CpuSnapshot::take(&args.watch_pids).since(&cpu_before, elapsed);
    let counts_after = match &mut stats {
        Some(c) => redis_counts(c).await,
        None => None,
    };
    let events_ok = total.ok * load.events as u64;
    let redis_commands_per_event = counts_before
        .zip(counts_after)
        .map(|(before, after)| round2(after.since(&before).0 as f64 / events_ok.max(1) as f64));
    Ok(WebhookReport {
        url: url.to_owned(),
        concurrency: args.concurrency,
        senders: load.senders.len(),
        events_per_post: load.events,
        reservations: load.sent.len(),
        warmup_s: args.warmup,
        elapsed_s: round3(elapsed),
        posts: total.posts,
        ok_posts: total.ok,
        posts_per_s: round2(total.ok as f64 / elapsed),
        events_per_s: round2(events_ok as f64 / elapsed),
        latency_ms: total.latencies.summary(),
        errors: total.errors,
        load_avg: load_avg(),
        cpu,
        redis_commands_per_event,
    })
}

pub(super) fn print(r: &WebhookReport) {
    println!(
        "webhooks {}  concurrency {}, {} events a POST (half inbound, half statuses of {} \
         reservations), {} senders",
        r.url, r.concurrency, r.events_per_post, r.reservations, r.senders
    );
    let mut t = table(&["", "measured"], 2);
    t.add_row(vec![
        "run".to_owned(),
        format!("{:.2} s, {} POSTs", r.elapsed_s, r.posts),
    ]);
    t.add_row(vec![
        "throughput".to_owned(),
        format!(
            "{:.0} POSTs/s, {:.0} events/s",
            r.posts_per_s, r.events_per_s
        ),
    ]);
    t.add_row(vec!["latency ms".to_owned(), latency_cell(&r.latency_ms)]);
    t.add_row(vec!["errors".to_owned(), counts(&r.errors)]);
    if let Some(cpu) = cpu_cell(&r.cpu) {
        t.add_row(vec!["cpu".to_owned(), cpu]);
    }
    if let Some(x) = r.redis_commands_per_event {
        t.add_row(vec![
            "redis".to_owned(),
            format!("{x:.2} commands/event (scripts' included)"),
        ]);
    }
    if let Some([a, b, c]) = r.load_avg {
        t.add_row(vec!["load avg".to_owned(), format!("{a:.2} {b:.2} {c:.2}")]);
    }
    println!("{t}");
}
