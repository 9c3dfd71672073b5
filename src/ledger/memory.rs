//! The embedded ledger: the same semantics as the Redis ledger, in one process.
//!
//! One mutex guards the whole state, so every operation is atomic, as a Lua script is on Redis.
//! Expired slots and service windows are trimmed when their target is next touched.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::{Ledger, LedgerError, Result};
use crate::model::{
    AcquireRequest, Cursor, Decision, Defaults, FREE_ENTRY_POINT_MS, HOUR_MS, Inspection,
    MessageKind, Millis, Outcome, Policy, PortfolioId, RecipientId, Reservation, SERVICE_WINDOW_MS,
    SLOT_MS, Scope, SenderId, Target, WindowEntry, WindowMode, WindowPage, remaining,
};

pub struct MemoryLedger {
    defaults: Defaults,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sender_policy: HashMap<SenderId, Policy>,
    portfolio_policy: HashMap<PortfolioId, Policy>,
    assigned: HashMap<SenderId, PortfolioId>,
    members: HashMap<PortfolioId, BTreeSet<SenderId>>,
    /// Keyed by the window's owner: a sender (its own window) or a portfolio.
    windows: HashMap<Target, Window>,
    service_windows: HashMap<SenderId, HashMap<RecipientId, Millis>>,
}

#[derive(Clone, Default)]
struct Window {
    slots: HashMap<RecipientId, Slot>,
    by_expiry: BTreeSet<(Millis, RecipientId)>,
    /// Reservation sequence; kept when the window empties so tokens are never reused.
    seq: u64,
}

#[derive(Clone)]
struct Slot {
    expires_at: Millis,
    sender: SenderId,
    /// The reservation that opened the slot; cleared once a later counted delivery touches it.
    reservation: Option<Reservation>,
}

impl Window {
    fn live(&self, now: Millis) -> impl Iterator<Item = &(Millis, RecipientId)> {
        self.by_expiry.iter().skip_while(move |(e, _)| *e <= now)
    }

    fn used(&self, now: Millis) -> u64 {
        (self.by_expiry.len() - self.by_expiry.iter().take_while(|(e, _)| *e <= now).count()) as u64
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

    fn remove(&mut self, r: &RecipientId) {
        if let Some(old) = self.slots.remove(r) {
            self.by_expiry.remove(&(old.expires_at, r.clone()));
        }
    }

    /// The expiry after which a new slot fits: the (used - limit)-th earliest live expiry.
    fn frees_at(&self, now: Millis, used: u64, limit: u64) -> Option<Millis> {
        let k = used.checked_sub(limit)? as usize;
        self.live(now).nth(k).map(|(e, _)| *e)
    }
}

fn clock(at: Option<Millis>) -> Millis {
    at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    })
}

impl State {
    /// The window that decides for a sender: its portfolio's if assigned, else its own.
    fn home(&self, sender: &SenderId) -> Target {
        match self.assigned.get(sender) {
            Some(p) => Target::Portfolio(p.clone()),
            None => Target::Sender(sender.clone()),
        }
    }

    /// The deciding window of a target (a sender in a portfolio decides in the portfolio's).
    fn deciding(&self, target: &Target) -> Target {
        match target {
            Target::Sender(s) => self.home(s),
            Target::Portfolio(_) => target.clone(),
        }
    }

    fn policy(&self, home: &Target, defaults: &Defaults) -> Policy {
        match home {
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

    fn service_window(&self, sender: &SenderId, r: &RecipientId, now: Millis) -> Option<Millis> {
        self.service_windows
            .get(sender)?
            .get(r)
            .copied()
            .filter(|e| *e > now)
    }
}

fn scope_of(home: &Target) -> Scope {
    match home {
        Target::Sender(_) => Scope::Sender,
        Target::Portfolio(_) => Scope::Portfolio,
    }
}

impl MemoryLedger {
    pub fn new(defaults: Defaults) -> Self {
        MemoryLedger {
            defaults,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-made decision behind: every
        // operation computes before it writes, so the state is usable after poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ledger for MemoryLedger {
    async fn acquire(&self, req: AcquireRequest) -> Result<Vec<Outcome>> {
        let now = clock(req.at);
        let mut st = self.lock();
        let home = st.home(&req.sender);
        let policy = st.policy(&home, &self.defaults);
        let limit = policy.limit();
        let scope = scope_of(&home);
        let service: Vec<Option<Millis>> = req
            .recipients
            .iter()
            .map(|r| st.service_window(&req.sender, r, now))
            .collect();

        // A dry run decides on a scratch copy, so it answers exactly what the real run would.
        let mut scratch;
        let window: &mut Window = if req.dry_run {
            scratch = st.windows.get(&home).cloned().unwrap_or_default();
            &mut scratch
        } else {
            let w = st.windows.entry(home.clone()).or_default();
            w.trim(now);
            w
        };

        let mut used = window.used(now);
        let mut out = Vec::with_capacity(req.recipients.len());
        for (r, sw) in req.recipients.iter().zip(service) {
            let mut expires_at = None;
            let mut retry_after_ms = None;
            let mut reservation = None;
            let decision = if let Some(sw) = sw {
                expires_at = Some(sw);
                Decision::AllowedServiceWindow
            } else if req.kind == MessageKind::FreeForm {
                Decision::DeniedOutsideServiceWindow
            } else if let Some(slot) = window.slot(r, now).cloned() {
                let until = match policy.window_mode {
                    WindowMode::Conversation => slot.expires_at,
                    WindowMode::Rolling => slot.expires_at.max(now + SLOT_MS),
                };
                window.set(
                    r,
                    Slot {
                        expires_at: until,
                        reservation: None,
                        ..slot
                    },
                );
                expires_at = Some(until);
                Decision::AllowedCounted
            } else if limit == 0 || used < limit {
                window.seq += 1;
                let res = Reservation {
                    opened_at: now,
                    seq: window.seq,
                };
                let until = now + SLOT_MS;
                window.set(
                    r,
                    Slot {
                        expires_at: until,
                        sender: req.sender.clone(),
                        reservation: Some(res),
                    },
                );
                used += 1;
                expires_at = Some(until);
                reservation = Some(res);
                Decision::AllowedNew
            } else {
                retry_after_ms = window.frees_at(now, used, limit).map(|e| e - now);
                Decision::DeniedLimit
            };
            out.push(Outcome {
                recipient: r.clone(),
                decision,
                expires_at,
                retry_after_ms,
                limit,
                used,
                remaining: remaining(limit, used),
                tier: policy.tier,
                scope,
                reservation,
            });
        }
        Ok(out)
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
        let Some(window) = st.windows.get_mut(&home) else {
            return Ok(false);
        };
        let matches = window
            .slot(&recipient, now)
            .is_some_and(|s| s.reservation == Some(reservation));
        if matches {
            window.remove(&recipient);
        }
        Ok(matches)
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
        let windows = st.service_windows.entry(sender).or_default();
        windows.retain(|_, e| *e > now);
        // A new inbound message restarts the window, but never cuts a longer free entry point short.
        let until = windows
            .get(&recipient)
            .map_or(now + span, |e| (*e).max(now + span));
        windows.insert(recipient, until);
        Ok(until)
    }

    async fn put_policy(&self, target: Target, policy: Policy) -> Result<Policy> {
        let mut st = self.lock();
        match target {
            Target::Sender(s) => st.sender_policy.insert(s, policy),
            Target::Portfolio(p) => st.portfolio_policy.insert(p, policy),
        };
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
        let policy = st.policy(&home, &self.defaults);
        let limit = policy.limit();
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
        Ok(Inspection {
            now,
            policy,
            scope: scope_of(&home),
            limit,
            used,
            remaining: remaining(limit, used),
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
        let mut entries: Vec<WindowEntry> = window
            .live(now)
            .filter(|(e, r)| {
                after
                    .as_ref()
                    .is_none_or(|c| (*e, r) > (c.expires_at, &c.recipient))
            })
            .take(page_size + 1)
            .map(|(e, r)| WindowEntry {
                recipient: r.clone(),
                expires_at: *e,
                sender: window.slots[r].sender.clone(),
            })
            .collect();
        let next = if entries.len() > page_size {
            entries.truncate(page_size);
            entries.last().map(|e| Cursor {
                expires_at: e.expires_at,
                recipient: e.recipient.clone(),
            })
        } else {
            None
        };
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

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}
