//! The planner (`AdminService.Plan`, `waquota plan`): when a campaign will have gone out, hour
//! by hour, and when the next tiers come (docs/contract.md, "Planning").
//!
//! It reads one window's live state through the [`Ledger`] trait (policy, slots and their
//! expiries, the projection index, the campaign's service windows), seeds a [`MemoryLedger`]
//! with it and sends the campaign through that ledger's decisions on a simulated clock. The
//! live ledger is only read. Simulating on the memory ledger keeps one engine: the differential
//! test holds it equal to the Redis scripts.

use futures_util::{StreamExt, TryStreamExt};

use crate::ledger::memory::{MemoryLedger, Seed};
use crate::ledger::{Ledger, LedgerError, Result};
use crate::model::{
    AcquireRequest, Category, Decision, Defaults, HOUR_MS, InvalidArgument, MessageKind, Millis,
    RecipientId, SenderId, Target, Tier,
};
use crate::rules::{Rates, upgrade_threshold_met};

/// The longest a plan may look ahead.
pub const MAX_HORIZON_MS: Millis = 90 * crate::model::DAY_MS;
/// Unless asked otherwise, a plan looks this far ahead.
pub const DEFAULT_HORIZON_MS: Millis = 30 * crate::model::DAY_MS;
/// The most messages one user may be planned to get.
pub const MAX_DELIVERIES_PER_USER: u32 = 100;
/// The most new users a campaign may have (a simulation costs about a microsecond each).
pub const MAX_NEW_USERS: u64 = 10_000_000;
/// WhatsApp's highest throughput per phone number.
pub const MAX_RATE: f64 = 1000.0;
/// How many per-recipient reads of service windows run at once.
const READS_IN_FLIGHT: usize = 32;
/// Synthetic recipients of a `new_users` campaign and of the ladder: ids no real user has.
const NEW_USER_PREFIX: &str = "plan-new-";

/// Who a campaign reaches.
#[derive(Debug, Clone)]
pub enum Campaign {
    /// This many users the window has never seen.
    New(u64),
    /// These users, in this order (some may hold a slot or a service window already).
    Recipients(Vec<RecipientId>),
}

#[derive(Debug, Clone)]
pub struct PlanInput {
    pub target: Target,
    pub campaign: Campaign,
    /// When the campaign starts; None = the plan's now.
    pub start: Option<Millis>,
    /// Messages per second; None = the senders' throughput.
    pub rate: Option<f64>,
    pub category: Option<Category>,
    pub deliveries_per_user: u32,
    /// Apply projected tier changes at their moments (else the tier in force is kept).
    pub with_upgrades: bool,
    pub horizon_ms: Millis,
    /// The clock the live state is read at (the trusted client clock); None = now.
    pub at: Option<Millis>,
}

impl PlanInput {
    /// Refuses what cannot be planned, naming the field.
    pub fn validate(&self) -> std::result::Result<(), InvalidArgument> {
        match &self.campaign {
            Campaign::New(0) => {
                return Err(InvalidArgument::new(
                    "new_users",
                    "the campaign is empty: give new_users or recipients",
                ));
            }
            Campaign::New(n) if *n > MAX_NEW_USERS => {
                return Err(InvalidArgument::new(
                    "new_users",
                    format!("at most {MAX_NEW_USERS}"),
                ));
            }
            Campaign::Recipients(r) if r.is_empty() => {
                return Err(InvalidArgument::new(
                    "recipients",
                    "the campaign is empty: give new_users or recipients",
                ));
            }
            _ => {}
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE)
        {
            return Err(InvalidArgument::new(
                "rate",
                format!("messages per second must be above 0 and at most {MAX_RATE}"),
            ));
        }
        if self.deliveries_per_user == 0 || self.deliveries_per_user > MAX_DELIVERIES_PER_USER {
            return Err(InvalidArgument::new(
                "deliveries_per_user",
                format!("1 to {MAX_DELIVERIES_PER_USER}"),
            ));
        }
        if self.horizon_ms <= 0 || self.horizon_ms > MAX_HORIZON_MS {
            return Err(InvalidArgument::new(
                "horizon",
                format!(
                    "above 0 and at most {} days",
                    MAX_HORIZON_MS / crate::model::DAY_MS
                ),
            ));
        }
        Ok(())
    }
}

/// One hour of the plan, from `start` (the plan's start plus whole hours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanHour {
    pub start: Millis,
    /// Campaign messages admitted.
    pub sent: u64,
    /// Of them, to users that got a new slot.
    pub new_users: u64,
    /// Campaign attempts refused for the limit (each retried when a slot frees).
    pub refused_limit: u64,
    /// Other refusals (throughput, pair rate, status), each retried at its retry time.
    pub refused_other: u64,
    /// Slots of the window that end within the hour (the campaign's and others').
    pub freed: u64,
    /// At the hour's end: slots held, what the window still admits, and the tier in force.
    pub used: u64,
    pub remaining: u64,
    pub limit: u64,
    pub tier: Tier,
}

impl PlanHour {
    /// An hour from `start` with nothing counted yet; its end-of-hour figures are filled in
    /// when it closes.
    fn opening(start: Millis, freed: u64, tier: Tier) -> Self {
        PlanHour {
            start,
            sent: 0,
            new_users: 0,
            refused_limit: 0,
            refused_other: 0,
            freed,
            used: 0,
            remaining: 0,
            limit: 0,
            tier,
        }
    }
}

/// A tier change the plan projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedTier {
    pub tier: Tier,
    pub at: Millis,
    /// Ladder only: new users sent for this step.
    pub new_users: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The moment the live state was read at.
    pub now: Millis,
    pub start: Millis,
    pub rate: f64,
    pub owner: Target,
    pub senders: Vec<SenderId>,
    /// When the last message goes out; None when it cannot within the horizon.
    pub completes_at: Option<Millis>,
    /// Why the campaign cannot complete, when it cannot.
    pub stalled: Option<String>,
    /// The campaign's users (all of them, sent or not).
    pub users: u64,
    pub messages: u64,
    /// Users given a new slot.
    pub new_users: u64,
    /// Users that cost nothing: already holding a slot or inside a service window.
    pub free_users: u64,
    /// Users refused with no retry time (a marketing hold, for example): not sent.
    pub skipped_users: u64,
    /// At the start: the window's state before the campaign.
    pub used_at_start: u64,
    pub remaining_at_start: u64,
    pub hours: Vec<PlanHour>,
    /// Projected tier changes while the campaign runs as planned (applied with `with_upgrades`;
    /// otherwise at most the next one, advisory).
    pub upgrades: Vec<PlannedTier>,
    /// The fastest path up the ladder from the start: the fewest new users, each as early as the
    /// rate allows, and when each tier would then land.
    pub ladder: Vec<PlannedTier>,
    /// Why the ladder stops (status or quality, the top reached).
    pub ladder_note: String,
}

/// What the live ledger holds for the campaign, read once.
struct Snapshot {
    now: Millis,
    seed: Seed,
    senders: Vec<SenderId>,
    rate: f64,
}

async fn snapshot<L: Ledger>(
    ledger: &L,
    defaults: &Defaults,
    input: &PlanInput,
) -> Result<Snapshot> {
    let i = ledger.inspect(input.target.clone(), None, input.at).await?;
    if !i.known {
        return Err(LedgerError::FailedPrecondition(format!(
            "{} is unknown: the ledger holds no policy, slot or history for it \
             (set its policy first: waquota policy set)",
            match &input.target {
                Target::Sender(s) => format!("sender {s}"),
                Target::Portfolio(p) => format!("portfolio {p}"),
            }
        )));
    }
    let now = i.now;
    let at = Some(now);
    let owner = match (&input.target, &i.portfolio) {
        (Target::Sender(_), Some(p)) => Target::Portfolio(p.clone()),
        (t, _) => t.clone(),
    };
    let mut members = Vec::new();
    if let Target::Portfolio(p) = &owner {
        let pi = ledger
            .inspect(Target::Portfolio(p.clone()), None, at)
            .await?;
        for s in pi.senders {
            let si = ledger.inspect(Target::Sender(s.clone()), None, at).await?;
            members.push((s, si.sender_policy.unwrap_or(defaults.sender)));
        }
    }
    let senders: Vec<SenderId> = match &input.target {
        Target::Sender(s) => vec![s.clone()],
        Target::Portfolio(p) => {
            if members.is_empty() {
                return Err(LedgerError::FailedPrecondition(format!(
                    "portfolio {p} has no senders to send the campaign from"
                )));
            }
            members.iter().map(|(s, _)| s.clone()).collect()
        }
    };
    let own_policy = |s: &SenderId| match &owner {
        Target::Portfolio(_) => members
            .iter()
            .find(|(m, _)| m == s)
            .map_or(defaults.sender, |(_, p)| *p),
        Target::Sender(_) => i.policy,
    };
    let rate = input.rate.unwrap_or_else(|| {
        senders
            .iter()
            .map(|s| 1e6 / Rates::of(&own_policy(s), defaults).interval_us as f64)
            .sum()
    });
    let mut slots = Vec::new();
    let mut after = None;
    loop {
        let page = ledger.list_window(owner.clone(), 1000, after, at).await?;
        slots.extend(page.entries);
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    let uniques = ledger.uniques(owner.clone(), at).await?;
    let mut service_windows = Vec::new();
    if let Campaign::Recipients(rs) = &input.campaign {
        let mut pairs: Vec<(SenderId, RecipientId)> = rs
            .iter()
            .enumerate()
            .map(|(n, r)| (senders[n % senders.len()].clone(), r.clone()))
            .collect();
        pairs.sort_by(|a, b| (a.0.as_str(), a.1.as_str()).cmp(&(b.0.as_str(), b.1.as_str())));
        pairs.dedup();
        service_windows = futures_util::stream::iter(pairs)
            .map(|(s, r)| async move {
                let i = ledger
                    .inspect(Target::Sender(s.clone()), Some(r.clone()), at)
                    .await?;
                Ok::<_, LedgerError>(i.service_window_until.map(|until| (s, r, until)))
            })
            .buffer_unordered(READS_IN_FLIGHT)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
    }
    let mut policy = i.policy;
    policy.auto_tier = input.with_upgrades;
    Ok(Snapshot {
        now,
        seed: Seed {
            owner,
            policy,
            projection: i.projection,
            senders: members,
            slots,
            uniques,
            service_windows,
        },
        senders,
        rate,
    })
}

/// Plans `input` against the live `ledger`, which it only reads.
pub async fn plan<L: Ledger>(ledger: &L, defaults: &Defaults, input: PlanInput) -> Result<Plan> {
    input.validate()?;
    let snap = snapshot(ledger, defaults, &input).await?;
    let start = input.start.unwrap_or(snap.now).max(snap.now);
    let mut ladder_seed = snap.seed.clone();
    ladder_seed.policy.auto_tier = true;
    let owner = snap.seed.owner.clone();
    let mut sim = Simulation::new(
        MemoryLedger::seeded(*defaults, snap.seed),
        owner.clone(),
        start,
    );
    let mut plan = Plan {
        now: snap.now,
        start,
        rate: snap.rate,
        owner: owner.clone(),
        senders: snap.senders.clone(),
        completes_at: None,
        stalled: None,
        users: match &input.campaign {
            Campaign::New(n) => *n,
            Campaign::Recipients(rs) => rs.len() as u64,
        },
        messages: 0,
        new_users: 0,
        free_users: 0,
        skipped_users: 0,
        used_at_start: 0,
        remaining_at_start: 0,
        hours: Vec::new(),
        upgrades: Vec::new(),
        ladder: Vec::new(),
        ladder_note: String::new(),
    };
    let first = sim.inspect(start).await?;
    plan.used_at_start = first.used;
    plan.remaining_at_start = first.remaining;
    let recipients: Box<dyn Iterator<Item = RecipientId> + Send> = match &input.campaign {
        Campaign::New(n) => Box::new((1..=*n).map(new_user)),
        Campaign::Recipients(rs) => Box::new(rs.clone().into_iter()),
    };
    let mut sender = snap.senders.iter().cycle();
    let worker = Worker {
        interval_ms: 1000.0 / snap.rate,
        category: input.category,
        end: start + input.horizon_ms,
    };
    let mut clock = start as f64;
    'users: for r in recipients {
        let s = sender.next().expect("at least one sender").clone();
        for d in 0..input.deliveries_per_user {
            match worker.send(&mut sim, &s, &r, &mut clock).await? {
                Sent::Admitted(decision, at) => {
                    plan.messages += 1;
                    plan.completes_at = Some(at);
                    if d == 0 {
                        match decision {
                            Decision::AllowedNew => plan.new_users += 1,
                            Decision::AllowedCounted | Decision::AllowedServiceWindow => {
                                plan.free_users += 1
                            }
                            _ => {}
                        }
                    }
                }
                Sent::Skipped => {
                    plan.skipped_users += u64::from(d == 0);
                    continue 'users;
                }
                Sent::Stalled(why) => {
                    plan.stalled = Some(why);
                    plan.completes_at = None;
                    break 'users;
                }
            }
        }
    }
    let end = match plan.completes_at {
        Some(c) => c,
        None => clock.min(worker.end as f64) as Millis,
    };
    sim.close_hours_through(end).await?;
    plan.upgrades = sim.upgrades.clone();
    if !input.with_upgrades {
        plan.upgrades.truncate(1);
    }
    plan.hours = sim.hours;
    let (ladder, note) = ladder(
        MemoryLedger::seeded(*defaults, ladder_seed),
        &owner,
        &snap.senders,
        start,
        snap.rate,
    )
    .await?;
    plan.ladder = ladder;
    plan.ladder_note = note;
    Ok(plan)
}

fn new_user(n: u64) -> RecipientId {
    RecipientId::parse("recipient", &format!("{NEW_USER_PREFIX}{n}"))
        .expect("a synthetic id is a valid token")
}

/// The simulated ledger and the hour-by-hour account kept beside it.
struct Simulation {
    ledger: MemoryLedger,
    owner: Target,
    hours: Vec<PlanHour>,
    /// The hour being counted.
    open: PlanHour,
    upgrades: Vec<PlannedTier>,
}

impl Simulation {
    fn new(ledger: MemoryLedger, owner: Target, start: Millis) -> Self {
        Simulation {
            ledger,
            owner,
            hours: Vec::new(),
            // Its freed count and tier come from the first Inspect (`plan`).
            open: PlanHour::opening(start, 0, Tier::T250),
            upgrades: Vec::new(),
        }
    }

    /// Reads the window at `at`, noting any projected tier change.
    async fn inspect(&mut self, at: Millis) -> Result<crate::model::Inspection> {
        let i = self
            .ledger
            .inspect(self.owner.clone(), None, Some(at))
            .await?;
        if let (Some(tier), Some(up)) = (i.projection.next_tier, i.projection.upgrade_at)
            && !self.upgrades.iter().any(|u| u.tier == tier)
        {
            self.upgrades.push(PlannedTier {
                tier,
                at: up,
                new_users: 0,
            });
        }
        if self.open.start == at {
            self.open.freed = i.slots_freeing_next_hour;
        }
        Ok(i)
    }

    /// Closes every hour that has ended by `t`.
    async fn close_until(&mut self, t: Millis) -> Result<()> {
        while self.open.start + HOUR_MS <= t {
            let end = self.open.start + HOUR_MS;
            let i = self.inspect(end).await?;
            let next = PlanHour::opening(end, i.slots_freeing_next_hour, i.policy.tier);
            let mut h = std::mem::replace(&mut self.open, next);
            h.used = i.used;
            h.remaining = i.remaining;
            h.limit = i.limit;
            h.tier = i.policy.tier;
            self.hours.push(h);
        }
        Ok(())
    }

    /// After the last message at `end`: closes the hour holding it.
    async fn close_hours_through(&mut self, end: Millis) -> Result<()> {
        self.close_until(end).await?;
        self.close_until(self.open.start + HOUR_MS).await
    }

    async fn acquire(
        &mut self,
        sender: &SenderId,
        r: &RecipientId,
        category: Option<Category>,
        at: Millis,
    ) -> Result<crate::model::Outcome> {
        self.close_until(at).await?;
        let mut out = self
            .ledger
            .acquire(AcquireRequest {
                sender: sender.clone(),
                recipients: vec![r.clone()],
                kind: MessageKind::Template,
                category,
                dry_run: false,
                at: Some(at),
            })
            .await?;
        let o = out.pop().ok_or_else(|| {
            LedgerError::Internal("the simulated ledger answered no outcome".into())
        })?;
        match o.decision {
            d if d.allowed() => {
                self.open.sent += 1;
                self.open.new_users += u64::from(d == Decision::AllowedNew);
            }
            Decision::DeniedLimit => self.open.refused_limit += 1,
            _ => self.open.refused_other += 1,
        }
        Ok(o)
    }
}

/// How a campaign's worker sends (docs/contract.md, "Planning"): in order, one message every
/// `interval_ms`; a refusal with a retry time is retried then (the pacing goes on from there),
/// one without is skipped, and a blocked sender with no end stalls the campaign.
struct Worker {
    interval_ms: f64,
    category: Option<Category>,
    end: Millis,
}

enum Sent {
    Admitted(Decision, Millis),
    Skipped,
    Stalled(String),
}

impl Worker {
    async fn send(
        &self,
        sim: &mut Simulation,
        sender: &SenderId,
        r: &RecipientId,
        clock: &mut f64,
    ) -> Result<Sent> {
        loop {
            let at = clock.ceil() as Millis;
            if at >= self.end {
                return Ok(Sent::Stalled(format!(
                    "not complete within the horizon (until {})",
                    crate::cli::rfc3339(self.end)
                )));
            }
            let o = sim.acquire(sender, r, self.category, at).await?;
            if o.decision.allowed() {
                *clock = at as f64 + self.interval_ms;
                return Ok(Sent::Admitted(o.decision, at));
            }
            match o.retry_after_ms {
                Some(wait) => *clock = (at + wait.max(1)) as f64,
                None if o.decision == Decision::DeniedSenderBlocked => {
                    return Ok(Sent::Stalled(format!(
                        "sender {sender} is blocked with no end ({})",
                        o.decision.name()
                    )));
                }
                None => return Ok(Sent::Skipped),
            }
        }
    }
}

/// The fastest path up the ladder: at each tier, as many new users as the bar still needs, at
/// the campaign's rate, then the projected moment the next tier lands; with the tier changes
/// applied, until the top or a tier the rules never project.
async fn ladder(
    ledger: MemoryLedger,
    owner: &Target,
    senders: &[SenderId],
    start: Millis,
    rate: f64,
) -> Result<(Vec<PlannedTier>, String)> {
    let worker = Worker {
        interval_ms: 1000.0 / rate,
        category: None,
        end: start + MAX_HORIZON_MS,
    };
    let mut sim = Simulation::new(ledger, owner.clone(), start);
    let mut steps: Vec<PlannedTier> = Vec::new();
    let mut clock = start as f64;
    let mut next_user = 0u64;
    let mut sender = senders.iter().cycle();
    loop {
        let at = clock.ceil() as Millis;
        let i = sim.ledger.inspect(owner.clone(), None, Some(at)).await?;
        let p = i.policy;
        let Some(next) = p.tier.next(p.rule_set) else {
            return Ok((steps, format!("{} is the top of the ladder", p.tier.name())));
        };
        if !p.eligible_for_upgrade() {
            return Ok((
                steps,
                format!(
                    "no upgrade is projected while status is {} and quality {}",
                    p.status.name(),
                    p.quality.map_or("unknown", |q| q.name())
                ),
            ));
        }
        if let (Some(up), Some(tier)) = (i.projection.upgrade_at, i.projection.next_tier)
            && tier == next
        {
            let sent = next_user - steps.iter().map(|s| s.new_users).sum::<u64>();
            steps.push(PlannedTier {
                tier,
                at: up,
                new_users: sent,
            });
            clock = clock.max(up as f64);
            continue;
        }
        if !upgrade_threshold_met(p.rule_set, p.tier, u64::MAX, u64::MAX) {
            return Ok((
                steps,
                format!(
                    "{} is left by verification only, never projected",
                    p.tier.name()
                ),
            ));
        }
        // Half the limit in 7 days projects the next tier on either rule set.
        let needed = (p.tier.limit() / 2).saturating_sub(i.unique_7d).max(1);
        for _ in 0..needed {
            next_user += 1;
            let s = sender.next().expect("at least one sender").clone();
            let r =
                RecipientId::parse("recipient", &format!("{NEW_USER_PREFIX}ladder-{next_user}"))
                    .expect("a synthetic id is a valid token");
            if let Sent::Stalled(why) = worker.send(&mut sim, &s, &r, &mut clock).await? {
                return Ok((steps, why));
            }
        }
    }
}
