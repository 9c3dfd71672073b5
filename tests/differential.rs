//! The ledgers must agree: seeded random sequences of every state-changing operation (Acquire,
//! AcquireBatch, Release, Confirm, RecordInbound, ReportFailure, PutPolicy, AssignSender, Reset)
//! run against the memory ledger, a standalone Redis and a Cluster, with clock jumps across the
//! 24 h, 7-day and 30-day boundaries and windows that grow past and shrink below the shard fill
//! (shard splits and merges; a sender's service windows and pair rates split into parts of 4 and
//! merge back). After every step the answers, and `Inspect` of every target, must
//! be identical on all three (docs/contract.md: one semantics, whatever the store).
//!
//! `DIFF_SEEDS=N` runs N seeds (default 6), `DIFF_STEPS=N` steps each (default 150),
//! `DIFF_SEED=S` one seed alone. A divergence is shrunk to the shortest sequence found that
//! still reproduces it, and printed.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::dsl::{Admin, Quota, portfolio, sender, window_only};
use common::{Backend, D, DAY, HOUR, MINUTE, TestServer, ts};
use tonic::Status;
use waquota::bench::Rng;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, AssignSenderRequest, Category,
    ConfirmRequest, InspectRequest, ListWindowRequest, MessageKind, Policy, PutPolicyRequest,
    Quality, RecordInboundRequest, ReleaseRequest, ReportFailureRequest, ResetRequest, RuleSet,
    SenderStatus, Target, Tier,
};

const SENDERS: usize = 3;
const PORTFOLIOS: usize = 2;
const RECIPIENTS: usize = 160;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tgt {
    Sender(usize),
    Portfolio(usize),
}

/// One operation; `at` is the trusted clock of the call.
#[derive(Clone, Debug)]
enum Op {
    Acquire {
        s: usize,
        r: usize,
        free_form: bool,
        dry: bool,
        category: Category,
    },
    Batch {
        s: usize,
        rs: Vec<usize>,
        free_form: bool,
        dry: bool,
        category: Category,
    },
    /// Releases the latest reservation this ledger handed out for (sender, recipient).
    Release {
        s: usize,
        r: usize,
    },
    Confirm {
        s: usize,
        r: usize,
        delivered_ago_ms: Option<i64>,
    },
    Inbound {
        s: usize,
        r: usize,
        fep: bool,
    },
    Failure {
        s: usize,
        r: usize,
        with_reservation: bool,
        code: u32,
    },
    PutPolicy {
        t: Tgt,
        policy: Policy,
    },
    Assign {
        s: usize,
        p: Option<usize>,
    },
    Reset {
        t: Tgt,
    },
}

#[derive(Clone, Debug)]
struct Step {
    at: i64,
    op: Op,
}

fn recipient(r: usize) -> String {
    format!("u{r:03}")
}

fn pick_recipient(rng: &mut Rng) -> usize {
    // A hot few (counted again, pair rate, service windows) and a long tail (new users).
    if rng.chance(40) {
        rng.below(12)
    } else {
        rng.below(RECIPIENTS)
    }
}

fn pick_category(rng: &mut Rng) -> Category {
    match rng.below(6) {
        0 | 1 => Category::Marketing,
        2 => Category::Utility,
        3 => Category::Authentication,
        4 => Category::Service,
        _ => Category::Unspecified,
    }
}

fn random_policy(rng: &mut Rng, now: i64) -> Policy {
    let dur = |ms: i64| prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    };
    let tiers = [
        Tier::Unspecified,
        Tier::Tier50,
        Tier::Tier250,
        Tier::Tier1k,
        Tier::Tier2k,
        Tier::Tier10k,
        Tier::Tier100k,
        Tier::Unlimited,
    ];
    let statuses = [
        SenderStatus::Connected,
        SenderStatus::Connected,
        SenderStatus::Connected,
        SenderStatus::Unspecified,
        SenderStatus::Flagged,
        SenderStatus::Restricted,
        SenderStatus::Paused,
        SenderStatus::Banned,
        SenderStatus::Disconnected,
    ];
    // Mostly connected: a blocked sender answers every call the same way.
    let status = if rng.chance(70) {
        SenderStatus::Connected
    } else {
        statuses[rng.below(statuses.len())]
    };
    Policy {
        tier: tiers[rng.below(tiers.len())] as i32,
        // Small limits so windows fill, split into shards past the fill and merge as they empty.
        custom_limit: if rng.chance(60) {
            rng.range(1, 220) as u64
        } else {
            0
        },
        window_mode: rng.below(3) as i32,
        status: status as i32,
        quality: [
            Quality::Unspecified,
            Quality::Green,
            Quality::Yellow,
            Quality::Red,
        ][rng.below(4)] as i32,
        messages_per_second: if rng.chance(30) {
            rng.range(1, 20) as u32
        } else {
            0
        },
        pair_interval: rng.chance(30).then(|| dur(rng.range(1, 20) * 500)),
        pair_burst: if rng.chance(30) {
            rng.range(1, 6) as u32
        } else {
            0
        },
        headroom_percent: if rng.chance(20) {
            rng.range(1, 40) as u32
        } else {
            0
        },
        sender_cap: if rng.chance(20) {
            rng.range(1, 60) as u64
        } else {
            0
        },
        marketing_cap: if rng.chance(30) {
            rng.range(1, 3) as u32
        } else {
            0
        },
        marketing_cap_period: rng.chance(20).then(|| dur(rng.range(1, 48) * HOUR / 2)),
        rule_set: [RuleSet::Unspecified, RuleSet::Legacy, RuleSet::Portfolio][rng.below(3)] as i32,
        auto_tier: rng.chance(30),
        status_until: (status != SenderStatus::Connected
            && status != SenderStatus::Unspecified
            && rng.chance(50))
        .then(|| ts(now + rng.range(1, 72) * HOUR / 2)),
    }
}

fn random_target(rng: &mut Rng) -> Tgt {
    if rng.chance(65) {
        Tgt::Sender(rng.below(SENDERS))
    } else {
        Tgt::Portfolio(rng.below(PORTFOLIOS))
    }
}

/// The next moment: mostly close together (rates, bursts), sometimes minutes or hours on, and
/// now and then across a day (slots expire to the millisecond around it), a week or a month.
fn advance(rng: &mut Rng, now: i64) -> i64 {
    now + match rng.below(100) {
        0..=49 => rng.range(0, 300),
        50..=74 => rng.range(300, 5_000),
        75..=86 => rng.range(5_000, 20 * MINUTE),
        87..=93 => rng.range(20 * MINUTE, 8 * HOUR),
        94..=96 => DAY + rng.range(-2_000, 2_000),
        97 => rng.range(6, 8) * DAY + rng.range(-HOUR, HOUR),
        _ => rng.range(29, 31) * DAY + rng.range(-HOUR, HOUR),
    }
}

fn generate(seed: u64, steps: usize) -> Vec<Step> {
    let mut rng = Rng(seed);
    let mut now = D + 9 * HOUR + rng.range(0, HOUR);
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        now = advance(&mut rng, now);
        let s = rng.below(SENDERS);
        let op = match rng.below(100) {
            0..=39 => Op::Acquire {
                s,
                r: pick_recipient(&mut rng),
                free_form: rng.chance(10),
                dry: rng.chance(8),
                category: pick_category(&mut rng),
            },
            40..=54 => Op::Batch {
                s,
                rs: (0..rng.range(1, 90))
                    .map(|_| pick_recipient(&mut rng))
                    .collect(),
                free_form: rng.chance(5),
                dry: rng.chance(8),
                category: pick_category(&mut rng),
            },
            55..=61 => Op::Release {
                s,
                r: pick_recipient(&mut rng),
            },
            62..=67 => Op::Confirm {
                s,
                r: pick_recipient(&mut rng),
                delivered_ago_ms: rng.chance(60).then(|| rng.range(0, 10_000)),
            },
            68..=76 => Op::Inbound {
                s,
                r: pick_recipient(&mut rng),
                fep: rng.chance(20),
            },
            77..=81 => Op::Failure {
                s,
                r: pick_recipient(&mut rng),
                with_reservation: rng.chance(70),
                code: [131049, 131026, 131047, 130429][rng.below(4)],
            },
            82..=91 => {
                let t = random_target(&mut rng);
                let mut policy = random_policy(&mut rng, now);
                if let Tgt::Portfolio(_) = t {
                    // A sender's own settings are refused on a portfolio (they have no effect).
                    policy = window_only(policy);
                }
                Op::PutPolicy { t, policy }
            }
            92..=97 => Op::Assign {
                s,
                p: rng.chance(70).then(|| rng.below(PORTFOLIOS)),
            },
            _ => Op::Reset {
                t: random_target(&mut rng),
            },
        };
        out.push(Step { at: now, op });
    }
    out
}

/// One ledger under test, with the names of this replay (every replay uses fresh senders and
/// portfolios, so replays share the servers without sharing state).
struct Runner {
    backend: Backend,
    q: Quota,
    a: Admin,
    /// (sender, recipient) -> the latest reservation this ledger handed out.
    reservations: HashMap<(usize, usize), String>,
}

struct Names(String);

impl Names {
    fn sender(&self, s: usize) -> String {
        format!("{}s{s}", self.0)
    }
    fn portfolio(&self, p: usize) -> String {
        format!("{}P{p}", self.0)
    }
    fn target(&self, t: Tgt) -> Option<Target> {
        match t {
            Tgt::Sender(s) => sender(&self.sender(s)),
            Tgt::Portfolio(p) => portfolio(&self.portfolio(p)),
        }
    }
}

/// What a call answered, in a form compared across ledgers: reservations are signed with a
/// secret of each ledger, so only their presence is compared.
fn answer<T: std::fmt::Debug>(res: Result<T, Status>) -> String {
    match res {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error {:?}: {}", e.code(), e.message()),
    }
}

fn acquire_answer(r: &AcquireResponse) -> String {
    let mut r = r.clone();
    if !r.reservation.is_empty() {
        r.reservation = "<reservation>".into();
    }
    format!("{r:?}")
}

impl Runner {
    async fn new(srv: &TestServer) -> Runner {
        Runner {
            backend: srv.backend,
            q: srv.quota().await,
            a: srv.admin().await,
            reservations: HashMap::new(),
        }
    }

    fn note(&mut self, s: usize, recipients: &[usize], results: &[AcquireResponse]) {
        for (r, res) in recipients.iter().zip(results) {
            if !res.reservation.is_empty() {
                self.reservations.insert((s, *r), res.reservation.clone());
            }
        }
    }

    /// Runs one step; its answer, then Inspect of every target (and of the step's recipient).
    async fn step(&mut self, n: &Names, step: &Step) -> Vec<String> {
        let at = Some(ts(step.at));
        let mut out = vec![match &step.op {
            Op::Acquire {
                s,
                r,
                free_form,
                dry,
                category,
            } => {
                let res = self
                    .q
                    .acquire(AcquireRequest {
                        sender: n.sender(*s),
                        recipient: recipient(*r),
                        kind: kind(*free_form),
                        dry_run: *dry,
                        at,
                        category: *category as i32,
                    })
                    .await
                    .map(|r| r.into_inner());
                if let Ok(res) = &res {
                    self.note(*s, &[*r], std::slice::from_ref(res));
                }
                res.map_or_else(|e| answer::<()>(Err(e)), |r| acquire_answer(&r))
            }
            Op::Batch {
                s,
                rs,
                free_form,
                dry,
                category,
            } => {
                let res = self
                    .q
                    .acquire_batch(AcquireBatchRequest {
                        sender: n.sender(*s),
                        recipients: rs.iter().map(|r| recipient(*r)).collect(),
                        kind: kind(*free_form),
                        dry_run: *dry,
                        at,
                        category: *category as i32,
                    })
                    .await
                    .map(|r| r.into_inner().results);
                match res {
                    Ok(results) => {
                        self.note(*s, rs, &results);
                        results
                            .iter()
                            .map(acquire_answer)
                            .collect::<Vec<_>>()
                            .join("\n  ")
                    }
                    Err(e) => answer::<()>(Err(e)),
                }
            }
            Op::Release { s, r } => match self.reservations.get(&(*s, *r)).cloned() {
                None => "no reservation to release".into(),
                Some(reservation) => answer(
                    self.q
                        .release(ReleaseRequest {
                            sender: n.sender(*s),
                            recipient: recipient(*r),
                            reservation,
                            at,
                        })
                        .await
                        .map(|r| r.into_inner()),
                ),
            },
            Op::Confirm {
                s,
                r,
                delivered_ago_ms,
            } => match self.reservations.get(&(*s, *r)).cloned() {
                None => "no reservation to confirm".into(),
                Some(reservation) => answer(
                    self.q
                        .confirm(ConfirmRequest {
                            sender: n.sender(*s),
                            recipient: recipient(*r),
                            reservation,
                            delivered_at: delivered_ago_ms.map(|ago| ts(step.at - ago)),
                            at,
                        })
                        .await
                        .map(|r| r.into_inner()),
                ),
            },
            Op::Inbound { s, r, fep } => answer(
                self.q
                    .record_inbound(RecordInboundRequest {
                        sender: n.sender(*s),
                        recipient: recipient(*r),
                        free_entry_point: *fep,
                        at,
                    })
                    .await
                    .map(|r| r.into_inner()),
            ),
            Op::Failure {
                s,
                r,
                with_reservation,
                code,
            } => {
                let reservation = if *with_reservation {
                    self.reservations
                        .get(&(*s, *r))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                answer(
                    self.q
                        .report_failure(ReportFailureRequest {
                            sender: n.sender(*s),
                            recipient: recipient(*r),
                            reservation,
                            error_code: *code,
                            at,
                        })
                        .await
                        .map(|r| r.into_inner()),
                )
            }
            Op::PutPolicy { t, policy } => answer(
                self.a
                    .put_policy(PutPolicyRequest {
                        target: n.target(*t),
                        policy: Some(*policy),
                        at,
                    })
                    .await
                    .map(|r| r.into_inner()),
            ),
            Op::Assign { s, p } => answer(
                self.a
                    .assign_sender(AssignSenderRequest {
                        create: true,
                        sender: n.sender(*s),
                        portfolio: p.map(|p| n.portfolio(p)).unwrap_or_default(),
                        at,
                    })
                    .await
                    .map(|r| r.into_inner()),
            ),
            Op::Reset { t } => answer(
                self.a
                    .reset(ResetRequest {
                        target: n.target(*t),
                        at,
                    })
                    .await
                    .map(|r| r.into_inner()),
            ),
        }];
        let probe = match &step.op {
            Op::Acquire { r, .. }
            | Op::Release { r, .. }
            | Op::Confirm { r, .. }
            | Op::Inbound { r, .. }
            | Op::Failure { r, .. } => recipient(*r),
            Op::Batch { rs, .. } => recipient(rs[0]),
            _ => String::new(),
        };
        let targets = (0..SENDERS)
            .map(Tgt::Sender)
            .chain((0..PORTFOLIOS).map(Tgt::Portfolio));
        for t in targets {
            out.push(answer(
                self.a
                    .inspect(InspectRequest {
                        target: n.target(t),
                        recipient: probe.clone(),
                        at,
                    })
                    .await
                    .map(|r| r.into_inner()),
            ));
        }
        out
    }

    /// Every target's window as listed (sorted: the listing order is the store's).
    async fn windows(&mut self, n: &Names, at: i64) -> Vec<String> {
        let mut out = Vec::new();
        let targets = (0..SENDERS)
            .map(Tgt::Sender)
            .chain((0..PORTFOLIOS).map(Tgt::Portfolio));
        for t in targets {
            let mut entries = Vec::new();
            let mut token = String::new();
            loop {
                let page = self
                    .a
                    .list_window(ListWindowRequest {
                        target: n.target(t),
                        page_size: 1000,
                        page_token: token.clone(),
                        at: Some(ts(at)),
                    })
                    .await;
                match page {
                    Ok(p) => {
                        let p = p.into_inner();
                        entries.extend(p.entries.iter().map(|e| format!("{e:?}")));
                        if p.next_page_token.is_empty() {
                            break;
                        }
                        token = p.next_page_token;
                    }
                    Err(e) => {
                        entries.push(answer::<()>(Err(e)));
                        break;
                    }
                }
            }
            entries.sort();
            out.push(format!("{t:?}: {}", entries.join("\n  ")));
        }
        out
    }
}

fn kind(free_form: bool) -> i32 {
    if free_form {
        MessageKind::FreeForm as i32
    } else {
        MessageKind::Template as i32
    }
}

/// Where a run of `steps` first differed between the reference (memory) and another ledger.
struct Divergence {
    step: usize,
    backend: Backend,
    reference: Vec<String>,
    other: Vec<String>,
}

/// What the reference answered over a run, to show the sequences reach every outcome.
#[derive(Default)]
struct Coverage(std::collections::BTreeMap<String, u64>);

impl Coverage {
    fn add(&mut self, answers: &[String]) {
        let outcomes = answers[0]
            .split("decision: ")
            .skip(1)
            .map(|d| d.split(',').next().unwrap_or_default().to_owned());
        for o in outcomes {
            *self.0.entry(o).or_default() += 1;
        }
        if let Some(e) = answers[0].strip_prefix("error ") {
            let code = e.split(':').next().unwrap_or_default();
            *self.0.entry(format!("error {code}")).or_default() += 1;
        }
        for a in &answers[1..] {
            if let Some(u) = a.split("used: ").nth(1) {
                let used: u64 = u.split(',').next().unwrap_or("0").parse().unwrap_or(0);
                let e = self.0.entry("largest window".into()).or_default();
                *e = (*e).max(used);
            }
        }
    }
}

static REPLAY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `steps` on every server (the first is the reference) under fresh names; the first
/// divergence, if any. Windows are also compared every 25 steps and at the end.
async fn run(
    servers: &[TestServer],
    steps: &[Step],
    mut coverage: Option<&mut Coverage>,
) -> Option<Divergence> {
    let id = REPLAY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let names = Names(format!("d{id}-"));
    let mut runners = Vec::new();
    for s in servers {
        runners.push(Runner::new(s).await);
    }
    for (i, step) in steps.iter().enumerate() {
        let mut answers = Vec::new();
        for r in &mut runners {
            let mut a = r.step(&names, step).await;
            if i % 25 == 24 || i + 1 == steps.len() {
                a.extend(r.windows(&names, step.at).await);
            }
            answers.push(a);
        }
        if let Some(c) = coverage.as_deref_mut() {
            c.add(&answers[0]);
        }
        for (r, a) in runners.iter().zip(&answers).skip(1) {
            if *a != answers[0] {
                return Some(Divergence {
                    step: i,
                    backend: r.backend,
                    reference: answers[0].clone(),
                    other: a.clone(),
                });
            }
        }
    }
    None
}

/// The shortest subsequence found (within a bounded number of replays) that still diverges on
/// the same ledger: the prefix up to the divergence, then chunks removed, halving their size.
async fn shrink(servers: &[TestServer], steps: &[Step], first: &Divergence) -> Vec<Step> {
    let mut best: Vec<Step> = steps[..=first.step].to_vec();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut chunk = best.len().div_ceil(2);
    while chunk >= 1 && Instant::now() < deadline {
        let mut start = 0;
        let mut removed = false;
        while start < best.len() && Instant::now() < deadline {
            let end = (start + chunk).min(best.len());
            let candidate: Vec<Step> = best[..start].iter().chain(&best[end..]).cloned().collect();
            if !candidate.is_empty()
                && let Some(d) = run(servers, &candidate, None).await
                && d.backend == first.backend
            {
                best = candidate[..=d.step].to_vec();
                removed = true;
            } else {
                start = end;
            }
        }
        if !removed {
            chunk /= 2;
        }
    }
    best
}

fn report(seed: u64, steps: &[Step], d: &Divergence) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "seed {seed}: memory and {:?} differ at step {} of this sequence:",
        d.backend, d.step
    );
    for (i, st) in steps.iter().enumerate() {
        let _ = writeln!(s, "  {i:3}  at D+{} ms  {:?}", st.at - D, st.op);
    }
    for (i, (a, b)) in d.reference.iter().zip(&d.other).enumerate() {
        if a != b {
            let what = if i == 0 { "answer" } else { "inspect/list" };
            let _ = writeln!(s, "{what}:\n  memory: {a}\n  {:?}: {b}", d.backend);
        }
    }
    s
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_redis_and_cluster_agree_on_random_sequences() {
    let servers = [
        TestServer::start(Backend::Memory).await,
        // Parts of 4 entries: a sender's service windows and pair rates split and merge within
        // a few steps, and move with it in parts.
        TestServer::start_with(Backend::Redis, |s| s.set_part_fill = 4).await,
        TestServer::start_with(Backend::Cluster, |s| s.set_part_fill = 4).await,
    ];
    let steps = env_u64("DIFF_STEPS").unwrap_or(150) as usize;
    let seeds: Vec<u64> = match env_u64("DIFF_SEED") {
        Some(s) => vec![s],
        None => (1..=env_u64("DIFF_SEEDS").unwrap_or(6)).collect(),
    };
    let started = Instant::now();
    let mut coverage = Coverage::default();
    for seed in &seeds {
        let sequence = generate(*seed, steps);
        if let Some(d) = run(&servers, &sequence, Some(&mut coverage)).await {
            let shortest = shrink(&servers, &sequence, &d).await;
            let d = run(&servers, &shortest, None).await.unwrap_or(d);
            panic!("{}", report(*seed, &shortest, &d));
        }
    }
    println!(
        "differential: {} seeds x {steps} steps agreed on memory, Redis and Cluster in {:.1} s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    println!("differential: what memory answered: {:?}", coverage.0);
    // The sets were split into parts (some may have merged back since).
    let mut servers = servers;
    let url = servers[1].redis().expect("the Redis backend").url();
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let parts: Vec<String> = redis::cmd("KEYS")
        .arg("*/*")
        .query_async(&mut conn)
        .await
        .unwrap();
    println!("differential: parts of sets left on Redis: {}", parts.len());
    assert!(!parts.is_empty(), "service windows or pair rates split");
}
