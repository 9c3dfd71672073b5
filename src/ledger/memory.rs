//! The embedded ledger: the same semantics as the Redis ledger, in one process.
//!
//! One mutex guards the whole state, so every operation is atomic, as a Lua script is on Redis.
//! A dry run decides on a copy of the state, so it runs the very same code and changes nothing.
//! Expired entries are trimmed when their target is next touched.
//!
//! What to decide and what to write is the policy engine's (`crate::rules`): this ledger is its
//! storage, reading a snapshot for it and applying its verdict.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use super::{Ledger, LedgerError, Result};
use crate::model::{
    AUDIT_KEEP, AcquireRequest, AuditEntry, Cursor, Defaults, ERROR_MARKETING_CAP,
    FREE_ENTRY_POINT_MS, FailureOutcome, HOUR_MS, Inspection, MONTH_MS, Millis, Outcome, Policy,
    PortfolioId, Projection, RecipientId, Reservation, SERVICE_WINDOW_MS, SLOT_MS, Scope, SenderId,
    Target, TargetKind, WEEK_MS, WindowEntry, WindowPage, clock, listing_position, remaining,
};
use crate::rules::{
    self, Admitted, Overlay, Progress, Rates, Recipient, SlotChange, Standing, count_since,
    decide::{confirmed_until, hold_until, next_seq, service_until},
    projection,
    projections::{project_upgrade, reproject_after_release},
    rates::{inbound_tat, note_marketing},
    settle,
};

pub struct MemoryLedger {
    defaults: Defaults,
    /// Reservations are signed with it; they do not outlive the process, nor does the ledger.
    secret: Vec<u8>,
    state: Mutex<State>,
    /// Webhook events applied: identity -> remembered until.
    events: Mutex<HashMap<u64, Millis>>,
    /// What the webhook bridge learned: (kind, key) -> values.
    identities: Mutex<HashMap<(String, String), Vec<String>>>,
    /// Audit logs by target member ("" = ledger-wide), newest last.
    audit: Mutex<HashMap<String, VecDeque<AuditEntry>>>,
}

#[derive(Clone, Default)]
struct State {
    sender_policy: HashMap<SenderId, Policy>,
    portfolio_policy: HashMap<PortfolioId, Policy>,
    assigned: HashMap<SenderId, PortfolioId>,
    members: HashMap<PortfolioId, BTreeSet<SenderId>>,
    /// Keyed by the window's owner: a sender (its own window) or a portfolio.
    windows: HashMap<Target, Window>,
    service_windows: HashMap<SenderId, HashMap<RecipientId, Millis>>,
    /// Throughput GCRA: theoretical arrival time per sender, in microseconds.
    throughput: HashMap<SenderId, i64>,
    /// Pair-rate GCRA per (sender, recipient), in microseconds.
    pair: HashMap<SenderId, HashMap<RecipientId, i64>>,
    /// Times of recent marketing messages per (sender, recipient).
    marketing: HashMap<SenderId, HashMap<RecipientId, Vec<Millis>>>,
    /// Marketing holds (WhatsApp error 131049) per window owner and recipient.
    holds: HashMap<Target, HashMap<RecipientId, Millis>>,
    /// When each user last got a new (not released) slot, per window owner: tier projections.
    uniques: HashMap<Target, HashMap<RecipientId, Millis>>,
    /// Per window owner, a time no later than its oldest entry in `uniques`.
    uniques_floor: HashMap<Target, Millis>,
    progress: HashMap<Target, Progress>,
}

#[derive(Clone, Default)]
struct Window {
    slots: HashMap<RecipientId, Slot>,
    by_expiry: BTreeSet<(Millis, RecipientId)>,
    /// Reservation sequence; kept when the window empties so tokens are never reused. A slot is
    /// identified by its sequence alone (the Redis ledger stores only that beside the slot).
    seq: u64,
}

#[derive(Clone)]
struct Slot {
    expires_at: Millis,
    /// The sender that opened it (sender caps count it against this sender).
    sender: SenderId,
    reservation: Reservation,
    /// A later counted delivery touched it: its reservation can no longer release it.
    touched: bool,
    /// The user's previous entry in `uniques`, restored if this slot is released.
    prev_unique: Option<Millis>,
}

impl Window {
    fn live(&self, now: Millis) -> impl Iterator<Item = &(Millis, RecipientId)> {
        self.by_expiry.iter().skip_while(move |(e, _)| *e <= now)
    }

    fn used(&self, now: Millis) -> u64 {
        (self.by_expiry.len() - self.by_expiry.iter().take_while(|(e, _)| *e <= now).count()) as u64
    }

    fn held_by(&self, sender: &SenderId, now: Millis) -> u64 {
        self.live(now)
            .filter(|(_, r)| self.slots[r].sender == *sender)
            .count() as u64
    }

    fn slot(&self, r: &RecipientId, now: Millis) -> Option<&Slot> {
        self.slots.get(r).filter(|s| s.expires_at > now)
    }

    fn trim(&mut self, now: Millis) {
        while let Some((e, r)) = self.by_expiry.first().cloned() {
            if e > now {
                break;
            }
            self.by_expiry.pop_first();
            self.slots.remove(&r);
        }
    }

    fn set(&mut self, r: &RecipientId, slot: Slot) {
        if let Some(old) = self.slots.get(r) {
            self.by_expiry.remove(&(old.expires_at, r.clone()));
        }
        self.by_expiry.insert((slot.expires_at, r.clone()));
        self.slots.insert(r.clone(), slot);
    }

    fn remove(&mut self, r: &RecipientId) -> Option<Slot> {
        let old = self.slots.remove(r)?;
        self.by_expiry.remove(&(old.expires_at, r.clone()));
        Some(old)
    }

    /// The expiry after which one more slot fits: the k-th (0-based) earliest live expiry, of
    /// every slot or of one sender's.
    fn frees_at(&self, now: Millis, k: u64, of: Option<&SenderId>) -> Option<Millis> {
        self.live(now)
            .filter(|(_, r)| of.is_none_or(|s| self.slots[r].sender == *s))
            .nth(k as usize)
            .map(|(e, _)| *e)
    }
}

impl State {
    /// The window that decides for a sender: its portfolio's if assigned, else its own.
    fn home(&self, sender: &SenderId) -> Target {
        match self.assigned.get(sender) {
            Some(p) => Target::Portfolio(p.clone()),
            None => Target::Sender(sender.clone()),
        }
    }

    fn deciding(&self, target: &Target) -> Target {
        match target {
            Target::Sender(s) => self.home(s),
            Target::Portfolio(_) => target.clone(),
        }
    }

    fn policy(&self, owner: &Target, defaults: &Defaults) -> Policy {
        match owner {
            Target::Sender(s) => self
                .sender_policy
                .get(s)
                .copied()
                .unwrap_or(defaults.sender),
            Target::Portfolio(p) => self
                .portfolio_policy
                .get(p)
                .copied()
                .unwrap_or(defaults.portfolio),
        }
    }

    fn store_policy(&mut self, owner: &Target, policy: Policy) {
        match owner {
            Target::Sender(s) => self.sender_policy.insert(s.clone(), policy),
            Target::Portfolio(p) => self.portfolio_policy.insert(p.clone(), policy),
        };
    }

    /// The window owner's policy with due tier changes applied (and stored).
    fn settled_policy(&mut self, owner: &Target, defaults: &Defaults, now: Millis) -> Policy {
        let mut policy = self.policy(owner, defaults);
        let prog = self.progress.entry(owner.clone()).or_default();
        if settle(&mut policy, prog, now) {
            self.store_policy(owner, policy);
        }
        policy
    }

    fn service_window(&self, sender: &SenderId, r: &RecipientId, now: Millis) -> Option<Millis> {
        self.service_windows
            .get(sender)?
            .get(r)
            .copied()
            .filter(|e| *e > now)
    }

    /// A user got a new slot: count it for projections, and project an upgrade once the count
    /// first reaches the bar. Returns the user's previous entry (restored if the slot is released).
    /// Mirrored by the uniques block at the end of lua/acquire.lua.
    fn note_unique(
        &mut self,
        home: &Target,
        policy: &Policy,
        r: &RecipientId,
        now: Millis,
    ) -> Option<Millis> {
        let uniques = self.uniques.entry(home.clone()).or_default();
        // Trimming walks the index: only when its oldest entry may have aged out (`floor` is at
        // most the oldest time), so a long simulation (the planner) stays linear.
        let floor = self
            .uniques_floor
            .entry(home.clone())
            .or_insert(Millis::MIN);
        if *floor <= now - MONTH_MS {
            uniques.retain(|_, t| *t > now - MONTH_MS);
            *floor = uniques.values().copied().min().unwrap_or(now);
        }
        *floor = (*floor).min(now);
        let prev = uniques.insert(r.clone(), now);
        let prog = self.progress.entry(home.clone()).or_default();
        let size = uniques.len() as u64;
        let counts = || (count_since(uniques.values(), now - WEEK_MS), size);
        project_upgrade(policy, prog, size, counts, now);
        prev
    }

    /// Mirrored by `release_slot` in lua/lib.lua.
    fn release_slot(
        &mut self,
        home: &Target,
        r: &RecipientId,
        res: Reservation,
        now: Millis,
        defaults: &Defaults,
    ) -> bool {
        let Some(window) = self.windows.get_mut(home) else {
            return false;
        };
        let matches = window
            .slot(r, now)
            .is_some_and(|s| s.reservation.seq == res.seq && !s.touched);
        if !matches {
            return false;
        }
        let slot = window.remove(r).expect("slot checked above");
        if let Some(u) = self.uniques.get_mut(home)
            && u.get(r) == Some(&res.opened_at)
        {
            match slot.prev_unique {
                Some(prev) => {
                    let floor = self.uniques_floor.entry(home.clone()).or_insert(prev);
                    *floor = (*floor).min(prev);
                    u.insert(r.clone(), prev)
                }
                None => u.remove(r),
            };
            // A pending upgrade counted this user: re-derive when the bar was reached without it.
            let times: Vec<Millis> = u.values().copied().collect();
            let policy = self.policy(home, defaults);
            if let Some(prog) = self.progress.get_mut(home) {
                reproject_after_release(&policy, prog, &times, now);
            }
        }
        true
    }

    /// Runs the rules on each recipient (docs/contract.md, "The decision, step by step"), with
    /// the state as the batch's earlier recipients left it, and applies each verdict at once.
    fn acquire(&mut self, req: &AcquireRequest, defaults: &Defaults) -> Vec<Outcome> {
        let now = clock(req.at);
        let sender = &req.sender;
        let home = self.home(sender);
        let scope = match home {
            Target::Sender(_) => Scope::Sender,
            Target::Portfolio(_) => Scope::Portfolio,
        };
        let wpol = self.settled_policy(&home, defaults, now);
        let spol = match home {
            Target::Sender(_) => wpol,
            Target::Portfolio(_) => self.policy(&Target::Sender(sender.clone()), defaults),
        };
        let st =
            rules::decide::standing(&wpol, &spol, scope, defaults, req.kind, req.category, now);

        let window = self.windows.entry(home.clone()).or_default();
        window.trim(now);
        let mut ov = Overlay {
            used: window.used(now),
            held: if st.sender_cap > 0 {
                window.held_by(sender, now)
            } else {
                0
            },
            tat: self.throughput.get(sender).copied(),
            throttled: 0,
        };
        let mut out = Vec::with_capacity(req.recipients.len());
        for r in &req.recipients {
            let verdict = {
                let window = &self.windows[&home];
                let recipient = Recipient {
                    service_until: self
                        .service_windows
                        .get(sender)
                        .and_then(|w| w.get(r))
                        .copied(),
                    slot_until: window.slot(r, now).map(|s| s.expires_at),
                    hold_until: self
                        .holds
                        .get(&home)
                        .and_then(|h| h.get(r))
                        .copied()
                        .filter(|_| st.marketing),
                    marketing_sent: self
                        .marketing
                        .get(sender)
                        .and_then(|m| m.get(r))
                        .filter(|_| st.marketing)
                        .map_or(&[], Vec::as_slice),
                    pair_tat: self.pair.get(sender).and_then(|p| p.get(r)).copied(),
                };
                rules::decide(&st, &mut ov, &recipient, |k, mine| {
                    window.frees_at(now, k, mine.then_some(sender))
                })
            };
            let reservation = verdict
                .admitted
                .and_then(|a| self.admit(&home, &wpol, sender, r, &st, a));
            out.push(Outcome {
                recipient: r.clone(),
                decision: verdict.decision,
                expires_at: verdict.expires_at,
                retry_after_ms: verdict.retry_after_ms,
                decided_at: now,
                limit: st.limit,
                used: ov.used,
                remaining: remaining(st.limit, st.effective, ov.used),
                tier: wpol.tier,
                scope,
                reservation,
            });
        }
        out
    }

    /// Makes an admission's writes, in every place at once; the reservation of a new slot.
    fn admit(
        &mut self,
        home: &Target,
        wpol: &Policy,
        sender: &SenderId,
        r: &RecipientId,
        st: &Standing,
        a: Admitted,
    ) -> Option<Reservation> {
        let now = st.now;
        self.throughput.insert(sender.clone(), a.tat);
        self.pair
            .entry(sender.clone())
            .or_default()
            .insert(r.clone(), a.pair_tat);
        if a.marketing {
            let times = self
                .marketing
                .entry(sender.clone())
                .or_default()
                .entry(r.clone())
                .or_default();
            note_marketing(times, &st.rates, now);
        }
        match a.slot {
            SlotChange::None => None,
            SlotChange::Touch { expires_at } => {
                let window = self.windows.get_mut(home).expect("window exists");
                if let Some(slot) = window.slots.get(r).cloned() {
                    window.set(
                        r,
                        Slot {
                            expires_at,
                            touched: true,
                            ..slot
                        },
                    );
                }
                None
            }
            SlotChange::Open { expires_at } => {
                let prev_unique = self.note_unique(home, wpol, r, now);
                let window = self.windows.get_mut(home).expect("window exists");
                window.seq = next_seq(window.seq, now);
                let res = Reservation {
                    opened_at: now,
                    seq: window.seq,
                };
                window.set(
                    r,
                    Slot {
                        expires_at,
                        sender: sender.clone(),
                        reservation: res,
                        touched: false,
                        prev_unique,
                    },
                );
                Some(res)
            }
        }
    }
}

/// One window's state copied from a live ledger, so that decisions can be simulated on it
/// without touching the original (the planner: docs/contract.md, "Planning"). Short-lived rate
/// state (throughput, pair rates, marketing counts and holds) is not carried.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The window's owner: an unassigned sender, or a portfolio.
    pub owner: Target,
    /// The owner's policy, the tier in force.
    pub policy: Policy,
    /// Its pending tier changes.
    pub projection: Projection,
    /// For a portfolio: its senders with their own policies.
    pub senders: Vec<(SenderId, Policy)>,
    pub slots: Vec<WindowEntry>,
    /// The projection index (`Ledger::uniques`).
    pub uniques: Vec<(RecipientId, Millis)>,
    /// Open service windows: (sender, recipient, until).
    pub service_windows: Vec<(SenderId, RecipientId, Millis)>,
}

impl MemoryLedger {
    /// A ledger holding `seed`'s window and nothing else.
    pub fn seeded(defaults: Defaults, seed: Seed) -> Self {
        let ledger = MemoryLedger::new(defaults);
        {
            let mut st = ledger.lock();
            let owner = seed.owner;
            st.store_policy(&owner, seed.policy);
            if let Target::Portfolio(p) = &owner {
                for (s, policy) in seed.senders {
                    st.sender_policy.insert(s.clone(), policy);
                    st.assigned.insert(s.clone(), p.clone());
                    st.members.entry(p.clone()).or_default().insert(s);
                }
            }
            let uniques: HashMap<RecipientId, Millis> = seed.uniques.into_iter().collect();
            let mut window = Window::default();
            for e in seed.slots {
                window.seq += 1;
                let opened_at = uniques
                    .get(&e.recipient)
                    .copied()
                    .unwrap_or(e.expires_at - SLOT_MS);
                let slot = Slot {
                    expires_at: e.expires_at,
                    sender: e.sender,
                    reservation: Reservation {
                        opened_at,
                        seq: window.seq,
                    },
                    touched: false,
                    prev_unique: None,
                };
                window.set(&e.recipient, slot);
            }
            st.windows.insert(owner.clone(), window);
            st.uniques.insert(owner.clone(), uniques);
            for (s, r, until) in seed.service_windows {
                st.service_windows.entry(s).or_default().insert(r, until);
            }
            st.progress.insert(
                owner,
                Progress::of_projection(seed.policy.tier, &seed.projection),
            );
        }
        ledger
    }

    pub fn new(defaults: Defaults) -> Self {
        MemoryLedger {
            defaults,
            secret: super::random_bytes(32),
            state: Mutex::new(State::default()),
            events: Mutex::new(HashMap::new()),
            identities: Mutex::new(HashMap::new()),
            audit: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every operation computes before it writes, so the state is usable after a poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ledger for MemoryLedger {
    async fn acquire(&self, req: AcquireRequest) -> Result<Vec<Outcome>> {
        let mut st = self.lock();
        if req.dry_run {
            // A dry run opens nothing, so it hands out no reservation.
            let mut out = st.clone().acquire(&req, &self.defaults);
            out.iter_mut().for_each(|o| o.reservation = None);
            return Ok(out);
        }
        Ok(st.acquire(&req, &self.defaults))
    }

    async fn release(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Reservation,
        at: Option<Millis>,
    ) -> Result<bool> {
        let now = clock(at);
        let mut st = self.lock();
        let home = st.home(&sender);
        Ok(st.release_slot(&home, &recipient, reservation, now, &self.defaults))
    }

    async fn record_inbound(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        free_entry_point: bool,
        at: Option<Millis>,
    ) -> Result<Millis> {
        let now = clock(at);
        let span = if free_entry_point {
            FREE_ENTRY_POINT_MS
        } else {
            SERVICE_WINDOW_MS
        };
        let mut st = self.lock();
        // Inbound messages share the sender's throughput (WhatsApp counts both ways); they are
        // never refused, but at most fill the burst.
        let rates = Rates::of(
            &st.policy(&Target::Sender(sender.clone()), &self.defaults),
            &self.defaults,
        );
        let tat = inbound_tat(st.throughput.get(&sender).copied(), now * 1000, &rates);
        st.throughput.insert(sender.clone(), tat);
        let windows = st.service_windows.entry(sender).or_default();
        windows.retain(|_, e| *e > now);
        // A new inbound message restarts the window, but never cuts a longer free entry point short.
        let until = service_until(windows.get(&recipient).copied(), now, span);
        windows.insert(recipient, until);
        Ok(until)
    }

    async fn confirm(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Reservation,
        delivered_at: Millis,
        at: Option<Millis>,
    ) -> Result<Option<Millis>> {
        let now = clock(at);
        let mut st = self.lock();
        let home = st.home(&sender);
        let Some(window) = st.windows.get_mut(&home) else {
            return Ok(None);
        };
        let Some(slot) = window
            .slot(&recipient, now)
            .filter(|s| s.reservation.seq == reservation.seq)
            .cloned()
        else {
            return Ok(None);
        };
        let until = confirmed_until(slot.expires_at, reservation.opened_at, delivered_at, now);
        // A confirmation is a delivery: from now on no reservation can release the slot
        // (docs/contract.md, "Release").
        window.set(
            &recipient,
            Slot {
                expires_at: until,
                touched: true,
                ..slot
            },
        );
        Ok(Some(until))
    }

    async fn report_failure(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Option<Reservation>,
        error_code: u32,
        at: Option<Millis>,
    ) -> Result<FailureOutcome> {
        let now = clock(at);
        let mut st = self.lock();
        let home = st.home(&sender);
        let released = reservation
            .is_some_and(|res| st.release_slot(&home, &recipient, res, now, &self.defaults));
        let hold_until = (error_code == ERROR_MARKETING_CAP).then(|| {
            let holds = st.holds.entry(home).or_default();
            holds.retain(|_, h| *h > now);
            let until = hold_until(holds.get(&recipient).copied(), now);
            holds.insert(recipient, until);
            until
        });
        Ok(FailureOutcome {
            released,
            hold_until,
        })
    }

    async fn put_policy(
        &self,
        target: Target,
        policy: Policy,
        at: Option<Millis>,
    ) -> Result<Policy> {
        let now = clock(at);
        let mut st = self.lock();
        let old = st.policy(&target, &self.defaults);
        let prog = st.progress.entry(target.clone()).or_default();
        rules::settle::flag(prog, &old, &policy, now);
        st.store_policy(&target, policy);
        Ok(policy)
    }

    async fn assign_sender(&self, sender: SenderId, portfolio: Option<PortfolioId>) -> Result<()> {
        let mut st = self.lock();
        if let Some(old) = st.assigned.remove(&sender)
            && let Some(m) = st.members.get_mut(&old)
        {
            m.remove(&sender);
        }
        if let Some(p) = portfolio {
            st.members
                .entry(p.clone())
                .or_default()
                .insert(sender.clone());
            st.assigned.insert(sender, p);
        }
        Ok(())
    }

    async fn inspect(
        &self,
        target: Target,
        recipient: Option<RecipientId>,
        at: Option<Millis>,
    ) -> Result<Inspection> {
        let now = clock(at);
        let st = self.lock();
        let home = st.deciding(&target);
        // Inspection is read-only: due tier changes are shown as applied, not stored.
        let mut policy = st.policy(&home, &self.defaults);
        let mut prog = st.progress.get(&home).copied().unwrap_or_default();
        settle(&mut policy, &mut prog, now);
        let limit = policy.limit();
        let effective = policy.effective_limit();
        let empty = Window::default();
        let window = st.windows.get(&home).unwrap_or(&empty);
        let used = window.used(now);
        let senders: Vec<SenderId> = match &target {
            Target::Sender(s) => vec![s.clone()],
            Target::Portfolio(p) => st
                .members
                .get(p)
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default(),
        };
        let open_service_windows = senders
            .iter()
            .filter_map(|s| st.service_windows.get(s))
            .map(|w| w.values().filter(|e| **e > now).count() as u64)
            .sum();
        let service_window_until = recipient.as_ref().and_then(|r| {
            senders
                .iter()
                .filter_map(|s| st.service_window(s, r, now))
                .max()
        });
        let uniques = st.uniques.get(&home);
        let count = |since| count_since(uniques.iter().flat_map(|u| u.values()), since);
        let unique_30d = count(now - MONTH_MS);
        let projecting = |t: &Target| {
            st.progress
                .get(t)
                .is_some_and(|p| p.upgrade_at.is_some() || p.flagged_since.is_some())
        };
        let known = used > 0
            || unique_30d > 0
            || open_service_windows > 0
            || projecting(&home)
            || match &target {
                Target::Sender(s) => {
                    st.sender_policy.contains_key(s) || st.assigned.contains_key(s)
                }
                Target::Portfolio(p) => st.portfolio_policy.contains_key(p) || !senders.is_empty(),
            };
        Ok(Inspection {
            known,
            now,
            policy,
            // A sender's own policy is the deciding one while it is unassigned (settled above).
            sender_policy: match &target {
                Target::Sender(_) if home == target => Some(policy),
                Target::Sender(s) => Some(st.policy(&Target::Sender(s.clone()), &self.defaults)),
                Target::Portfolio(_) => None,
            },
            scope: match home {
                Target::Sender(_) => Scope::Sender,
                Target::Portfolio(_) => Scope::Portfolio,
            },
            limit,
            effective_limit: if limit == 0 { 0 } else { effective },
            unique_7d: count(now - WEEK_MS),
            unique_30d,
            projection: projection(&policy, &prog),
            used,
            remaining: remaining(limit, effective, used),
            next_slot_free_at: window.live(now).next().map(|(e, _)| *e),
            slots_freeing_next_hour: window
                .live(now)
                .take_while(|(e, _)| *e <= now + HOUR_MS)
                .count() as u64,
            open_service_windows,
            portfolio: match &target {
                Target::Sender(s) => st.assigned.get(s).cloned(),
                Target::Portfolio(_) => None,
            },
            senders: match &target {
                Target::Sender(_) => Vec::new(),
                Target::Portfolio(_) => senders,
            },
            counted_until: recipient
                .as_ref()
                .and_then(|r| window.slot(r, now))
                .map(|s| s.expires_at),
            service_window_until,
            recipient,
        })
    }

    async fn uniques(
        &self,
        owner: Target,
        at: Option<Millis>,
    ) -> Result<Vec<(RecipientId, Millis)>> {
        let since = clock(at) - MONTH_MS;
        let st = self.lock();
        let mut out: Vec<(RecipientId, Millis)> = st
            .uniques
            .get(&owner)
            .map(|u| {
                u.iter()
                    .filter(|(_, t)| **t > since)
                    .map(|(r, t)| (r.clone(), *t))
                    .collect()
            })
            .unwrap_or_default();
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
        let now = clock(at);
        let st = self.lock();
        let home = st.deciding(&target);
        let Some(window) = st.windows.get(&home) else {
            return Ok(WindowPage {
                entries: Vec::new(),
                next: None,
            });
        };
        // In listing order (model::listing_position), as the Redis ledger lists.
        let mut rows: Vec<(u32, &RecipientId, Millis)> = window
            .live(now)
            .map(|(e, r)| (listing_position(r), r, *e))
            .filter(|(p, r, _)| after.as_ref().is_none_or(|c| c.before(*p, r)))
            .collect();
        rows.sort_unstable_by(|a, b| {
            (a.0, a.1.as_str().as_bytes()).cmp(&(b.0, b.1.as_str().as_bytes()))
        });
        let next = (rows.len() > page_size).then(|| Cursor {
            position: rows[page_size - 1].0,
            recipient: Some(rows[page_size - 1].1.clone()),
        });
        let entries = rows
            .into_iter()
            .take(page_size)
            .map(|(_, r, e)| WindowEntry {
                recipient: r.clone(),
                expires_at: e,
                sender: window.slots[r].sender.clone(),
            })
            .collect();
        Ok(WindowPage { entries, next })
    }

    async fn reset(&self, target: Target) -> Result<()> {
        let mut st = self.lock();
        if let Target::Sender(s) = &target
            && let Some(p) = st.assigned.get(s)
        {
            return Err(LedgerError::FailedPrecondition(format!(
                "sender {s} is assigned to portfolio {p}: its slots are the portfolio's; reset the portfolio or detach the sender first"
            )));
        }
        if let Some(w) = st.windows.get_mut(&target) {
            w.slots.clear();
            w.by_expiry.clear();
        }
        Ok(())
    }

    async fn reservation_secret(&self) -> Result<Vec<u8>> {
        Ok(self.secret.clone())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn slot_reservation(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        at: Option<Millis>,
    ) -> Result<Option<Reservation>> {
        let now = clock(at);
        let st = self.lock();
        let home = st.home(&sender);
        let Some(window) = st.windows.get(&home) else {
            return Ok(None);
        };
        Ok(window
            .slot(&recipient, now)
            .filter(|s| !s.touched && s.sender == sender)
            .map(|s| s.reservation))
    }

    async fn events_seen(&self, keys: &[(u64, Millis)]) -> Result<Vec<bool>> {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let now = clock(None);
        ev.retain(|_, until| *until > now);
        Ok(keys.iter().map(|(k, _)| ev.contains_key(k)).collect())
    }

    async fn remember_events(&self, keys: &[(u64, Millis)]) -> Result<()> {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        for (k, at) in keys {
            ev.insert(*k, at + crate::webhook::REMEMBER_MS);
        }
        Ok(())
    }

    async fn put_identity(&self, kind: &str, key: &str, value: &str, add: bool) -> Result<()> {
        let mut ids = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        let values = ids.entry((kind.to_owned(), key.to_owned())).or_default();
        if !add {
            values.clear();
        }
        if !value.is_empty() && !values.iter().any(|v| v == value) {
            values.push(value.to_owned());
        }
        Ok(())
    }

    async fn identities(&self, kind: &str, key: &str) -> Result<Vec<String>> {
        let ids = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        Ok(ids
            .get(&(kind.to_owned(), key.to_owned()))
            .cloned()
            .unwrap_or_default())
    }

    async fn targets(
        &self,
        kind: Option<TargetKind>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Target>, bool)> {
        // Every owner of any state: a superset of the known targets, as the Redis registry is.
        let members: BTreeSet<String> = {
            let st = self.lock();
            let senders = st
                .sender_policy
                .keys()
                .chain(st.assigned.keys())
                .chain(st.service_windows.keys())
                .chain(st.throughput.keys())
                .map(|s| Target::Sender(s.clone()));
            let portfolios = st
                .portfolio_policy
                .keys()
                .chain(st.members.keys())
                .chain(st.assigned.values())
                .map(|p| Target::Portfolio(p.clone()));
            let owners = st
                .windows
                .keys()
                .chain(st.uniques.keys())
                .chain(st.progress.keys())
                .chain(st.holds.keys())
                .cloned();
            senders
                .chain(portfolios)
                .chain(owners)
                .filter(|t| kind.is_none_or(|k| t.kind() == k))
                .map(|t| t.member())
                .collect()
        };
        let mut page = members
            .into_iter()
            .filter(|m| after.as_ref().is_none_or(|a| m > a));
        let targets = page
            .by_ref()
            .take(limit)
            .map(|m| Target::from_member("member", &m))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((targets, page.next().is_some()))
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<()> {
        let key = entry
            .target
            .as_ref()
            .map(Target::member)
            .unwrap_or_default();
        let mut logs = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let log = logs.entry(key).or_default();
        log.push_back(entry);
        while log.len() > AUDIT_KEEP {
            log.pop_front();
        }
        Ok(())
    }

    async fn audit(&self, target: Option<Target>, limit: usize) -> Result<Vec<AuditEntry>> {
        let key = target.as_ref().map(Target::member).unwrap_or_default();
        let logs = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        Ok(logs
            .get(&key)
            .map(|log| log.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    /// A ledger in this process is never lost behind its back.
    async fn accept_ledger_loss(&self) -> Result<Option<Millis>> {
        Ok(None)
    }
}
