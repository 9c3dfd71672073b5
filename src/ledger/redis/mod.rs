//! The Redis ledger: every decision is one FCALL of one function from `lua/`.
//!
//! Concurrency design: the scripts are the only writers, and Redis runs each one atomically, so
//! any number of waquota instances share one exact ledger without locks of their own. An
//! instance keeps only a cache of which home each sender lives at; every script re-checks
//! residency and answers `moved` when the cache is stale (after an `AssignSender` elsewhere),
//! so a reassignment takes effect on the next request on every instance, at the cost of one
//! extra round trip once.

mod codec;
mod conn;
mod errors;
pub mod keys;
mod moves;
mod registry;
pub mod scripts;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::{RedisError, Value};

use super::{Ledger, LedgerError, Result};
use crate::config::{Durability, OnLedgerLoss, Settings, Store};
use crate::metrics::{Metrics, PoolStatus};
use crate::model::{
    AcquireRequest, AuditEntry, Cursor, Defaults, ERROR_MARKETING_CAP, FREE_ENTRY_POINT_MS,
    FailureOutcome, HOUR_MS, Inspection, MARKETING_HOLD_MS, Millis, Outcome, Policy, PortfolioId,
    Projection, RecipientId, Reservation, SERVICE_WINDOW_MS, SLOT_MS, SenderId, Target, TargetKind,
    WindowEntry, WindowPage, remaining,
};
pub use codec::{AcquireReply, RecipientReply};
use codec::{
    POLICY_FIELDS, bad_reply, int, items, moved, opt_ms, parse_policy, policy_fields, scope_of,
    text, tier_named,
};
use conn::{Conns, Sent};
use errors::{Failure, Trouble, describe};
use keys::{Home, HomeKeys, Keys};
pub use scripts::acquire_cmd;
use scripts::{Call, Scripts, acquire_call, loss_mode, slot_call};

/// Keys outlive their latest expiry by this much, so a key never vanishes while logically live.
const TTL_SLACK_MS: Millis = 3_600_000;
/// A reassignment in flight can bounce a request between homes; give up after this many hops.
const MAX_HOPS: usize = 5;
/// A reassignment journaled longer ago than this was abandoned by its mover (a crashed instance:
/// every step of a live one answers within the Redis timeout), and the next one completes it.
const ABANDONED_MOVE_MS: i64 = 30_000;
/// Shards a Reset clears per script call: about 750 slots, a few milliseconds of Redis at most
/// (BENCHMARKS.md, "Admin scripts on large windows").
const RESET_SHARDS_PER_CALL: usize = 16;
/// Shards Inspect counts slots freeing within the hour over per script call (as inspect.lua).
const COUNT_SHARDS_PER_CALL: usize = 64;
const DAY_MS: Millis = 86_400_000;
/// Ledger-marker commands in flight at once (a Cluster has one marker per hash slot).
const MARKERS_IN_FLIGHT: usize = 256;
/// Senders whose home is cached; past this the cache starts over (it only saves a round trip).
const ROUTE_CACHE_MAX: usize = 100_000;

pub struct RedisLedger {
    conns: Conns,
    /// Which Redis this is, for error messages: an outage names the store and its address.
    store: String,
    scripts: Scripts,
    keys: Keys,
    defaults: Defaults,
    timeout: Duration,
    /// `durability = replicated`: how many replicas must acknowledge a change, and how long
    /// `WAIT` may take; `None` for `async`.
    durability: Option<(u32, Duration)>,
    on_ledger_loss: OnLedgerLoss,
    /// This instance has made sure the ledger marker exists (SET NX): from then on, a marker
    /// that is gone means the ledger was lost.
    marker_ready: std::sync::atomic::AtomicBool,
    routes: RwLock<HashMap<SenderId, Option<PortfolioId>>>,
    metrics: Arc<Metrics>,
    /// This instance's id in the move journal: a move it began and is no longer running (a
    /// store hiccup cut it short) is resumed by its next AssignSender at once, not after
    /// ABANDONED_MOVE_MS.
    instance: String,
    /// Senders this instance is moving right now.
    moving: std::sync::Mutex<std::collections::HashSet<SenderId>>,
    /// Targets this instance has written to the registry of targets.
    registered: registry::Registered,
}

/// The policy of a home without a stored one: the sender default or the portfolio default.
fn defaults_at(defaults: &Defaults, home: &Home) -> Policy {
    match home {
        Home::Sender(_) => defaults.sender,
        Home::Portfolio(_) => defaults.portfolio,
    }
}

impl RedisLedger {
    pub async fn connect(settings: &Settings) -> Result<Self> {
        let conns = Conns::connect(settings)
            .await
            .map_err(|e| LedgerError::Unavailable(format!("redis configuration: {e}")))?;
        let ledger = RedisLedger {
            conns,
            store: describe(&settings.store),
            scripts: Scripts::with_set_part_fill(settings.set_part_fill),
            keys: match settings.store {
                Store::Cluster { .. } => Keys::cluster(&settings.key_prefix),
                _ => Keys::new(&settings.key_prefix),
            },
            on_ledger_loss: settings.on_ledger_loss,
            marker_ready: std::sync::atomic::AtomicBool::new(false),
            defaults: settings.defaults,
            timeout: settings.redis_timeout,
            durability: (settings.durability == Durability::Replicated)
                .then_some((settings.durability_replicas, settings.durability_timeout)),
            routes: RwLock::new(HashMap::new()),
            metrics: Arc::new(Metrics::new()),
            instance: crate::model::hex(&super::random_bytes(8)),
            moving: std::sync::Mutex::new(std::collections::HashSet::new()),
            registered: Default::default(),
        };
        if let Err(e) = ledger.ping().await {
            tracing::warn!(error = %e, "Redis does not answer yet; serving UNAVAILABLE until it does");
        }
        Ok(ledger)
    }

    /// Reports script latency, Redis errors, reloads and the pool to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        let status = self.conns.status();
        metrics.set_pool_probe(move || {
            let s = status();
            PoolStatus {
                max_size: s.max_size,
                size: s.size,
                available: s.available,
                waiting: s.waiting,
            }
        });
        self.metrics = metrics;
        self
    }

    /// One command, within `redis_timeout` all told: waiting for a connection (or opening one)
    /// counts against the same budget as the call itself. With `replicate` and
    /// `durability = replicated`, the command's `WAIT` goes in the same pipeline.
    ///
    /// Answers that say the command did not run ("not now": `READONLY` from a demoted primary,
    /// `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, and on Sentinel a refused connection)
    /// are retried within the budget, so a request follows a failover that completes in time.
    /// Nothing else is: a call that may have run is never sent twice.
    async fn query_raw(
        &self,
        sent: Sent<'_>,
        replicate: bool,
    ) -> std::result::Result<Value, Failure> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let mut used = None;
            let attempt = async {
                let (i, mut conn) = self.conns.get().await?;
                used = Some(i);
                conn.send(sent, self.durability.filter(|_| replicate)).await
            };
            let result = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(r) => r,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("did not answer within {:?}", self.timeout),
                ))),
            };
            match result {
                Ok((v, None)) => return Ok(v),
                Ok((v, Some(acked))) => {
                    let wanted = self.durability.map_or(0, |(n, _)| n);
                    if acked >= i64::from(wanted) {
                        return Ok(v);
                    }
                    self.metrics.durability_timeout();
                    return Err(Failure::NotReplicated { acked, wanted });
                }
                Err(e) => {
                    let trouble = Trouble::of(&e);
                    if !scripts::function_missing(&e) {
                        self.metrics.redis_error(trouble.metric());
                    }
                    if let Some(i) = used {
                        self.conns.failed(i, trouble).await;
                    }
                    let retry = trouble.not_run(self.conns.follows_failover())
                        && tokio::time::Instant::now() + backoff < deadline;
                    if !retry {
                        return Err(Failure::Redis(e));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value> {
        self.query_raw(Sent::Cmd(cmd), false)
            .await
            .map_err(|f| f.into_ledger(&self.store))
    }

    /// A command that changes the ledger: with `durability = replicated`, answered once
    /// replicas have it.
    async fn write(&self, cmd: &redis::Cmd) -> Result<Value> {
        self.query_raw(Sent::Cmd(cmd), true)
            .await
            .map_err(|f| f.into_ledger(&self.store))
    }

    /// A pipeline of writes to one key (so it also runs on a Cluster), in one round trip, as
    /// [`RedisLedger::write`] sends a command.
    async fn write_pipe(&self, pipe: &redis::Pipeline) -> Result<()> {
        self.query_raw(Sent::Pipe(pipe), true)
            .await
            .map(|_| ())
            .map_err(|f| f.into_ledger(&self.store))
    }

    async fn run(&self, call: &Call<'_>) -> Result<Value> {
        let start = Instant::now();
        let replicate = call.script.writes();
        let result = match self.query_raw(Sent::Cmd(&call.cmd), replicate).await {
            Err(Failure::Redis(e)) if scripts::function_missing(&e) => {
                self.metrics.script_reload();
                tracing::info!(
                    function = call.script.function,
                    "function library not loaded on Redis: loading it"
                );
                match self
                    .query_raw(Sent::Cmd(&self.scripts.load_cmd()), false)
                    .await
                {
                    Ok(_) => self
                        .query_raw(Sent::Cmd(&call.cmd), replicate)
                        .await
                        .map_err(|f| f.into_ledger(&self.store)),
                    Err(f) => Err(f.into_ledger(&self.store)),
                }
            }
            r => r.map_err(|f| f.into_ledger(&self.store)),
        };
        self.metrics
            .script_latency(call.script.name, start.elapsed());
        result
    }

    /// Creates the ledger marker(s) where missing, once per process, on first contact
    /// (docs/contract.md, "A lost ledger"). On a Cluster, one per hash slot, in pipelines.
    async fn ensure_marker(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.marker_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        // One command per marker: on a Cluster each lives in a slot of its own, and a pipeline
        // may not cross slots; so many at once instead.
        use futures_util::{StreamExt, TryStreamExt};
        futures_util::stream::iter(self.keys.ledger_markers())
            .map(|m| async move {
                self.query(redis::cmd("SET").arg(m).arg("1").arg("NX"))
                    .await
            })
            .buffer_unordered(MARKERS_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        self.marker_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// What a script said of the ledger marker: a loss it found is reported once (metric,
    /// error log); while new slots are refused, the health detail says since when.
    fn saw_ledger(&self, now: Option<i64>, lost_now: bool, refused_since: Option<Millis>) {
        if lost_now {
            let at = refused_since.or(now).unwrap_or_default();
            self.metrics.ledger_lost(at);
            tracing::error!(
                on_ledger_loss = self.on_ledger_loss.name(),
                lost_at_ms = at,
                "the ledger marker is gone from Redis: the ledger was lost (a restart without persistence, a failover to an empty replica, or FLUSHALL); new slots follow on_ledger_loss until `waquota ledger accept-loss` or one window"
            );
        }
        self.metrics.set_ledger_lost_since(refused_since);
    }

    fn cached_home(&self, sender: &SenderId) -> Home {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        Home::of(routes.get(sender).cloned().flatten(), sender)
    }

    fn learn(&self, sender: &SenderId, portfolio: Option<PortfolioId>) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        if routes.len() >= ROUTE_CACHE_MAX && !routes.contains_key(sender) {
            routes.clear();
        }
        routes.insert(sender.clone(), portfolio);
    }

    /// Runs a sender-scoped script at the sender's home, following `moved` answers.
    async fn at_home<'s>(
        &'s self,
        sender: &SenderId,
        make: impl Fn(&Home, &HomeKeys) -> Call<'s>,
    ) -> Result<(Home, Value)> {
        let mut home = self.cached_home(sender);
        for hop in 0..MAX_HOPS {
            let v = self.run(&make(&home, &self.keys.home(&home))).await?;
            match moved(&v) {
                None => return Ok((home, v)),
                Some(p) => {
                    home = Home::of(p.clone(), sender);
                    self.learn(sender, p);
                    if hop > 0 {
                        // Bounced twice: a reassignment is in flight; let it finish.
                        tokio::time::sleep(Duration::from_millis(2 * hop as u64)).await;
                    }
                }
            }
        }
        Err(LedgerError::Contended(format!(
            "sender {sender} is being reassigned; try again"
        )))
    }

    /// The rest of Inspect's slots_freeing_next_hour on a large window, from listing position
    /// `from` (-1: nothing left), a chunk of shards per call (list.lua, count mode) on the same
    /// clock, so that no call's work grows with the window.
    async fn count_freeing(&self, home: &Home, now: Millis, mut from: i64) -> Result<u64> {
        let k = self.keys.home(home);
        let mut count = 0;
        while from >= 0 {
            let call = Call::new(
                &self.scripts.list,
                vec![k.window(), k.window_index(), k.residency()],
            )
            .clock(Some(now))
            .arg(home.kind())
            .arg("")
            .num(COUNT_SHARDS_PER_CALL)
            .num(from)
            .arg("")
            .num(now + HOUR_MS);
            let f = items(self.run(&call).await?).map_err(|v| bad_reply("list", &v))?;
            match (f.first().and_then(int), f.get(1).and_then(int)) {
                (Some(next), Some(c)) => {
                    count += c as u64;
                    from = next;
                }
                _ => return Err(bad_reply("list", &Value::Array(f))),
            }
        }
        Ok(count)
    }
}

impl Ledger for RedisLedger {
    async fn acquire(&self, req: AcquireRequest) -> Result<Vec<Outcome>> {
        self.ensure_marker().await?;
        if !req.dry_run {
            self.register(Some(&req.sender), None).await;
        }
        let s = &self.scripts.acquire;
        let (home, v) = self
            .at_home(&req.sender, |home, k| {
                acquire_call(s, home, k, &req, &self.defaults, self.on_ledger_loss)
            })
            .await?;
        let reply = AcquireReply::decode(&v, req.recipients.len())
            .ok_or_else(|| bad_reply("acquire", &v))?;
        self.saw_ledger(Some(reply.now), reply.lost_now, reply.lost_since);
        let scope = scope_of(&home);
        Ok(req
            .recipients
            .iter()
            .zip(reply.recipients)
            .map(|(r, f)| Outcome {
                recipient: r.clone(),
                decision: f.decision,
                expires_at: f.expires_at,
                retry_after_ms: f.retry_after_ms,
                decided_at: reply.now,
                limit: reply.limit,
                used: f.used,
                remaining: remaining(reply.limit, reply.effective, f.used),
                tier: reply.tier,
                scope,
                reservation: f.reservation,
            })
            .collect())
    }

    async fn release(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Reservation,
        at: Option<Millis>,
    ) -> Result<bool> {
        let s = &self.scripts.release;
        let (_, v) = self
            .at_home(&sender, |home, k| {
                Call::new(
                    s,
                    vec![
                        k.window(),
                        k.window_index(),
                        k.residency(),
                        k.uniques(),
                        k.window_policy(&sender),
                    ],
                )
                .clock(at)
                .arg(home.kind())
                .arg(sender.as_str())
                .arg(recipient.as_str())
                .arg(reservation.stored())
                .arg(k.sender_slots_prefix())
                .arg(defaults_at(&self.defaults, home).tier.name())
                .arg(defaults_at(&self.defaults, home).rule_set.name())
            })
            .await?;
        let items = items(v).map_err(|v| bad_reply("release", &v))?;
        Ok(items.first().and_then(int) == Some(1))
    }

    async fn record_inbound(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        free_entry_point: bool,
        at: Option<Millis>,
    ) -> Result<Millis> {
        self.register(Some(&sender), None).await;
        let s = &self.scripts.inbound;
        let span = if free_entry_point {
            FREE_ENTRY_POINT_MS
        } else {
            SERVICE_WINDOW_MS
        };
        let (_, v) = self
            .at_home(&sender, |home, k| {
                Call::new(
                    s,
                    vec![
                        k.service_windows(&sender),
                        k.residency(),
                        k.sender_policy(&sender),
                        k.throughput(&sender),
                    ],
                )
                .clock(at)
                .arg(home.kind())
                .arg(sender.as_str())
                .arg(recipient.as_str())
                .num(span)
                .num(TTL_SLACK_MS)
                .num(self.defaults.messages_per_second)
            })
            .await?;
        let items = items(v).map_err(|v| bad_reply("inbound", &v))?;
        items
            .get(1)
            .and_then(int)
            .ok_or_else(|| bad_reply("inbound", &Value::Array(items.clone())))
    }

    async fn confirm(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Reservation,
        delivered_at: Millis,
        at: Option<Millis>,
    ) -> Result<Option<Millis>> {
        let s = &self.scripts.confirm;
        let (_, v) = self
            .at_home(&sender, |home, k| {
                slot_call(s, home, k, at, &sender, &recipient)
                    .arg(reservation.stored())
                    .num(delivered_at)
                    .num(SLOT_MS)
                    .num(TTL_SLACK_MS)
                    .arg(k.sender_slots_prefix())
            })
            .await?;
        let items = items(v).map_err(|v| bad_reply("confirm", &v))?;
        Ok(match items.first().and_then(int) {
            Some(1) => items.get(1).and_then(int),
            _ => None,
        })
    }

    async fn report_failure(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Option<Reservation>,
        error_code: u32,
        at: Option<Millis>,
    ) -> Result<FailureOutcome> {
        let s = &self.scripts.failure;
        let hold = if error_code == ERROR_MARKETING_CAP {
            MARKETING_HOLD_MS
        } else {
            0
        };
        let (_, v) = self
            .at_home(&sender, |home, k| {
                Call::new(
                    s,
                    vec![
                        k.window(),
                        k.window_index(),
                        k.residency(),
                        k.uniques(),
                        k.marketing_holds(),
                        k.window_policy(&sender),
                    ],
                )
                .clock(at)
                .arg(home.kind())
                .arg(sender.as_str())
                .arg(recipient.as_str())
                .arg(reservation.map(|r| r.stored()).unwrap_or_default())
                .arg(k.sender_slots_prefix())
                .num(hold)
                .num(TTL_SLACK_MS)
                .arg(defaults_at(&self.defaults, home).tier.name())
                .arg(defaults_at(&self.defaults, home).rule_set.name())
            })
            .await?;
        let items = items(v).map_err(|v| bad_reply("failure", &v))?;
        Ok(FailureOutcome {
            released: items.first().and_then(int) == Some(1),
            hold_until: items.get(1).and_then(opt_ms),
        })
    }

    async fn put_policy(
        &self,
        target: Target,
        policy: Policy,
        at: Option<Millis>,
    ) -> Result<Policy> {
        match &target {
            Target::Sender(s) => self.register(Some(s), None).await,
            Target::Portfolio(p) => self.register(None, Some(p)).await,
        }
        let s = &self.scripts.policy;
        let make = |home: &Home, key: String, residency: String, sender: &str| {
            let mut call = Call::new(s, vec![key, residency])
                .arg(home.kind())
                .arg(sender)
                .clock(at);
            for (field, value) in policy_fields(&policy) {
                call = call.arg(field).arg(value);
            }
            call
        };
        match target {
            Target::Portfolio(p) => {
                let home = Home::Portfolio(p);
                let k = self.keys.home(&home);
                self.run(&make(&home, k.portfolio_policy(), k.residency(), ""))
                    .await?;
            }
            Target::Sender(sender) => {
                self.at_home(&sender, |home, k| {
                    make(
                        home,
                        k.sender_policy(&sender),
                        k.residency(),
                        sender.as_str(),
                    )
                })
                .await?;
            }
        }
        Ok(policy)
    }

    async fn assign_sender(&self, sender: SenderId, portfolio: Option<PortfolioId>) -> Result<()> {
        self.assign(sender, portfolio).await
    }

    async fn inspect(
        &self,
        target: Target,
        recipient: Option<RecipientId>,
        at: Option<Millis>,
    ) -> Result<Inspection> {
        let s = &self.scripts.inspect;
        let r = recipient
            .as_ref()
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default();
        let make =
            |home: &Home, k: &HomeKeys, sender: &str, policy_key: String, sender_key: String| {
                let w = defaults_at(&self.defaults, home);
                let d = self.defaults.sender;
                Call::new(
                    s,
                    vec![
                        k.window(),
                        policy_key,
                        k.residency(),
                        k.uniques(),
                        sender_key,
                        k.window_index(),
                    ],
                )
                .clock(at)
                .arg(home.kind())
                .arg(sender)
                .arg(&r)
                .arg(w.tier.name())
                .arg(w.window_mode.name())
                .arg(w.rule_set.name())
                .arg(d.tier.name())
                .arg(d.window_mode.name())
                .arg(d.rule_set.name())
                .arg(k.service_windows_prefix())
            };
        let (home, v) = match &target {
            Target::Sender(sender) => {
                self.at_home(sender, |home, k| {
                    make(
                        home,
                        k,
                        sender.as_str(),
                        k.window_policy(sender),
                        k.sender_policy(sender),
                    )
                })
                .await?
            }
            Target::Portfolio(p) => {
                let home = Home::Portfolio(p.clone());
                let k = self.keys.home(&home);
                let v = self
                    .run(&make(
                        &home,
                        &k,
                        "",
                        k.portfolio_policy(),
                        k.portfolio_policy(),
                    ))
                    .await?;
                (home, v)
            }
        };
        let f = items(v).map_err(|v| bad_reply("inspect", &v))?;
        let bad = || bad_reply("inspect", &Value::Array(f.clone()));
        const HEAD: usize = 16;
        if f.len() < HEAD + POLICY_FIELDS {
            return Err(bad());
        }
        let num = |i: usize| int(&f[i]).ok_or_else(bad);
        let used = num(1)? as u64;
        let policy = parse_policy(&f[HEAD..HEAD + POLICY_FIELDS]).ok_or_else(bad)?;
        let (sender_policy, rest) = match &target {
            Target::Sender(_) => {
                let end = HEAD + 2 * POLICY_FIELDS;
                (
                    Some(
                        parse_policy(f.get(HEAD + POLICY_FIELDS..end).ok_or_else(bad)?)
                            .ok_or_else(bad)?,
                    ),
                    end,
                )
            }
            Target::Portfolio(_) => (None, HEAD + POLICY_FIELDS),
        };
        // SMEMBERS order is arbitrary: sort here, as the memory ledger does.
        let mut senders: Vec<SenderId> = f[rest..]
            .iter()
            .filter_map(text)
            .filter_map(|s| SenderId::parse("sender", &s).ok())
            .collect();
        senders.sort();
        let limit = num(9)? as u64;
        let effective = num(10)? as u64;
        let next_tier = text(&f[11]).unwrap_or_default();
        Ok(Inspection {
            now: num(0)?,
            policy,
            sender_policy,
            scope: scope_of(&home),
            limit,
            effective_limit: if limit == 0 { 0 } else { effective },
            unique_7d: num(7)? as u64,
            unique_30d: num(8)? as u64,
            projection: Projection {
                next_tier: if next_tier.is_empty() {
                    None
                } else {
                    Some(tier_named(&next_tier)?)
                },
                upgrade_at: opt_ms(&f[12]),
                downgrade_at: opt_ms(&f[13]),
            },
            used,
            remaining: remaining(limit, effective, used),
            next_slot_free_at: opt_ms(&f[2]),
            slots_freeing_next_hour: num(3)? as u64
                + self.count_freeing(&home, num(0)?, num(14)?).await?,
            open_service_windows: num(4)? as u64,
            portfolio: match (&target, &home) {
                (Target::Sender(_), Home::Portfolio(p)) => Some(p.clone()),
                _ => None,
            },
            senders,
            counted_until: opt_ms(&f[5]),
            service_window_until: opt_ms(&f[6]),
            recipient,
            known: num(15)? == 1,
        })
    }

    async fn uniques(
        &self,
        owner: Target,
        at: Option<Millis>,
    ) -> Result<Vec<(RecipientId, Millis)>> {
        let home = match owner {
            Target::Sender(s) => Home::Sender(s),
            Target::Portfolio(p) => Home::Portfolio(p),
        };
        // Without a trusted clock, this instance's: a read for planning, not a decision.
        let now = crate::model::clock(at);
        let k = self.keys.home(&home);
        let v = self
            .run(&Call::new(&self.scripts.uniques, vec![k.uniques()]).clock(Some(now)))
            .await?;
        let bad = |v: &Value| bad_reply("uniques", v);
        // recipient, time, recipient, time…, part by part.
        let flat = items(v).map_err(|v| bad(&v))?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [m, t] = pair else {
                return Err(bad(&Value::Array(flat.clone())));
            };
            let (Some(r), Some(time)) = (text(m), int(t)) else {
                return Err(bad(&Value::Array(flat.clone())));
            };
            let r = RecipientId::parse("recipient", &r)
                .map_err(|_| bad(&Value::Array(flat.clone())))?;
            out.push((r, time));
        }
        // The memory ledger's order: by time, then recipient.
        out.sort_unstable_by(|a, b| (a.1, a.0.as_str()).cmp(&(b.1, b.0.as_str())));
        Ok(out)
    }

    async fn list_window(
        &self,
        target: Target,
        page_size: usize,
        after: Option<Cursor>,
        at: Option<Millis>,
    ) -> Result<WindowPage> {
        let s = &self.scripts.list;
        let make = |home: &Home, k: &HomeKeys, sender: &str| {
            let call = Call::new(s, vec![k.window(), k.window_index(), k.residency()])
                .clock(at)
                .arg(home.kind())
                .arg(sender)
                .num(page_size);
            match &after {
                Some(c) => call
                    .num(c.position)
                    .arg(c.recipient.as_ref().map_or("", |r| r.as_str())),
                None => call.arg("").arg(""),
            }
            .arg("")
        };
        let v = match &target {
            Target::Sender(sender) => {
                self.at_home(sender, |home, k| make(home, k, sender.as_str()))
                    .await?
                    .1
            }
            Target::Portfolio(p) => {
                let home = Home::Portfolio(p.clone());
                self.run(&make(&home, &self.keys.home(&home), "")).await?
            }
        };
        let f = items(v).map_err(|v| bad_reply("list", &v))?;
        let bad = || bad_reply("list", &Value::Array(f.clone()));
        let next = match f.first().and_then(int) {
            Some(-1) => None,
            Some(p) => Some(Cursor {
                position: u32::try_from(p).map_err(|_| bad())?,
                recipient: match text(f.get(1).ok_or_else(bad)?).unwrap_or_default() {
                    r if r.is_empty() => None,
                    r => Some(RecipientId::parse("recipient", &r).map_err(|_| bad())?),
                },
            }),
            None => return Err(bad()),
        };
        let entries = f
            .get(2..)
            .ok_or_else(bad)?
            .chunks_exact(3)
            .map(|e| {
                Ok(WindowEntry {
                    expires_at: int(&e[0]).ok_or_else(bad)?,
                    recipient: RecipientId::parse("recipient", &text(&e[1]).ok_or_else(bad)?)
                        .map_err(|_| bad())?,
                    sender: SenderId::parse("sender", &text(&e[2]).ok_or_else(bad)?)
                        .map_err(|_| bad())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WindowPage { entries, next })
    }

    async fn reset(&self, target: Target) -> Result<()> {
        let (home, sender) = match &target {
            Target::Sender(s) => (Home::Sender(s.clone()), s.to_string()),
            Target::Portfolio(p) => (Home::Portfolio(p.clone()), String::new()),
        };
        let k = self.keys.home(&home);
        let call = |mode: &str| {
            Call::new(
                &self.scripts.reset,
                vec![k.window(), k.window_index(), k.residency()],
            )
            .arg(home.kind())
            .arg(&sender)
            .arg(k.sender_slots_prefix())
            .arg(mode)
            .num(RESET_SHARDS_PER_CALL)
        };
        let v = self.run(&call("begin")).await?;
        if let Some(Some(p)) = moved(&v) {
            return Err(LedgerError::FailedPrecondition(format!(
                "sender {sender} is assigned to portfolio {p}: its slots are the portfolio's; reset the portfolio or detach the sender first"
            )));
        }
        // One chunk per call: other requests run between them. An interrupted reset is taken
        // up by the next one (a new watermark covers the old).
        loop {
            let v = self.run(&call("sweep")).await?;
            if moved(&v).is_some() {
                return Err(LedgerError::Contended(format!(
                    "sender {sender} was reassigned during the reset; try again"
                )));
            }
            let f = items(v).map_err(|v| bad_reply("reset", &v))?;
            let left = f
                .first()
                .and_then(int)
                .ok_or_else(|| bad_reply("reset", &Value::Array(f.clone())))?;
            if left == 0 {
                return Ok(());
            }
        }
    }

    async fn reservation_secret(&self) -> Result<Vec<u8>> {
        // The first instance to ask stores a random secret; every instance then reads the same
        // one, so a reservation issued by one is accepted by all (docs/contract.md,
        // "Reservations"). Once per process: the services keep the signer.
        let key = self.keys.reservation_secret();
        let fresh = crate::model::hex(&super::random_bytes(32));
        self.write(redis::cmd("SET").arg(&key).arg(&fresh).arg("NX"))
            .await?;
        match self.query(redis::cmd("GET").arg(&key)).await? {
            Value::BulkString(b) if !b.is_empty() => Ok(b),
            v => Err(bad_reply("reservation secret", &v)),
        }
    }

    async fn ping(&self) -> Result<()> {
        self.query(&redis::cmd("PING")).await?;
        self.ensure_marker().await?;
        if let [marker] = &self.keys.ledger_markers()[..] {
            // One marker (not a Cluster): checked here each second, so a loss is found without
            // waiting for a decision. On a Cluster, each slot's marker is checked by the
            // decisions made in it.
            let call = Call::new(&self.scripts.ledger, vec![marker.clone()])
                .arg("")
                .arg(loss_mode(self.on_ledger_loss))
                .num(SLOT_MS);
            let v = items(self.run(&call).await?).map_err(|v| bad_reply("ledger", &v))?;
            match &v[..] {
                [lost_now, since] => self.saw_ledger(None, int(lost_now) == Some(1), opt_ms(since)),
                _ => return Err(bad_reply("ledger", &Value::Array(v))),
            }
        }
        Ok(())
    }

    async fn slot_reservation(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        at: Option<Millis>,
    ) -> Result<Option<Reservation>> {
        let s = &self.scripts.slot;
        let (_, v) = self
            .at_home(&sender, |home, k| {
                slot_call(s, home, k, at, &sender, &recipient).num(SLOT_MS)
            })
            .await?;
        let f = items(v).map_err(|v| bad_reply("slot", &v))?;
        match &f[..] {
            [found] if int(found) == Some(0) => Ok(None),
            [_, stored] => text(stored)
                .as_deref()
                .and_then(Reservation::from_stored)
                .map(Some)
                .ok_or_else(|| bad_reply("slot", &Value::Array(f.clone()))),
            _ => Err(bad_reply("slot", &Value::Array(f.clone()))),
        }
    }

    async fn events_seen(&self, keys: &[(u64, Millis)]) -> Result<Vec<bool>> {
        use futures_util::{StreamExt, TryStreamExt};
        futures_util::stream::iter(keys.iter().copied())
            .map(|(id, at)| async move {
                let key = self.keys.webhook_events(at.div_euclid(DAY_MS), id);
                let v = self
                    .query(redis::cmd("SISMEMBER").arg(key).arg(id as i64))
                    .await?;
                Ok::<_, LedgerError>(int(&v) == Some(1))
            })
            .buffered(MARKERS_IN_FLIGHT)
            .try_collect()
            .await
    }

    async fn remember_events(&self, keys: &[(u64, Millis)]) -> Result<()> {
        use futures_util::{StreamExt, TryStreamExt};
        futures_util::stream::iter(keys.iter().copied())
            .map(|(id, at)| async move {
                let day = at.div_euclid(DAY_MS);
                let key = self.keys.webhook_events(day, id);
                let until = (day + 1) * DAY_MS + crate::webhook::REMEMBER_MS;
                let mut pipe = redis::pipe();
                pipe.cmd("SADD")
                    .arg(&key)
                    .arg(id as i64)
                    .ignore()
                    .cmd("PEXPIREAT")
                    .arg(&key)
                    .arg(until)
                    .ignore();
                self.write_pipe(&pipe).await
            })
            .buffer_unordered(MARKERS_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn put_identity(&self, kind: &str, key: &str, value: &str, add: bool) -> Result<()> {
        let k = self.keys.identity(kind, key);
        let mut pipe = redis::pipe();
        if !add {
            pipe.cmd("DEL").arg(&k).ignore();
        }
        if !value.is_empty() {
            pipe.cmd("SADD").arg(&k).arg(value).ignore();
        }
        self.write_pipe(&pipe).await
    }

    async fn identities(&self, kind: &str, key: &str) -> Result<Vec<String>> {
        let v = self
            .query(redis::cmd("SMEMBERS").arg(self.keys.identity(kind, key)))
            .await?;
        let mut out: Vec<String> = items(v)
            .map_err(|v| bad_reply("identities", &v))?
            .iter()
            .filter_map(text)
            .collect();
        out.sort();
        Ok(out)
    }

    async fn targets(
        &self,
        kind: Option<TargetKind>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Target>, bool)> {
        self.registered_page(kind, after, limit).await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        self.push_audit(&entry).await
    }

    async fn audit(&self, target: Option<Target>, limit: usize) -> Result<Vec<AuditEntry>> {
        self.audit_log(target.as_ref(), limit).await
    }

    async fn accept_ledger_loss(&self) -> Result<Option<Millis>> {
        self.ensure_marker().await?;
        use futures_util::{StreamExt, TryStreamExt};
        let accepted: Vec<Option<Millis>> = futures_util::stream::iter(self.keys.ledger_markers())
            .map(|marker| async move {
                let call = Call::new(&self.scripts.ledger, vec![marker])
                    .arg("")
                    .arg("accept")
                    .num(SLOT_MS);
                let v = items(self.run(&call).await?).map_err(|v| bad_reply("ledger", &v))?;
                match &v[..] {
                    [was, at] => Ok((int(was) == Some(1)).then(|| opt_ms(at).unwrap_or_default())),
                    _ => Err(bad_reply("ledger", &Value::Array(v))),
                }
            })
            .buffer_unordered(MARKERS_IN_FLIGHT)
            .try_collect()
            .await?;
        let since = accepted.into_iter().flatten().min();
        self.metrics.set_ledger_lost_since(None);
        if let Some(t) = since {
            tracing::warn!(
                lost_since_ms = t,
                "an operator accepted the ledger's loss: new slots are admitted again"
            );
        }
        Ok(since)
    }
}
