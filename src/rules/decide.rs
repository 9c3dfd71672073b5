//! One recipient's decision (docs/contract.md, "The decision, step by step"): the checks in the
//! order of "Which refusal is reported", the retry time, and the writes an admission makes.

use super::rates::{Rates, gcra, marketing_cap_until};
use crate::model::{
    Category, Decision, Defaults, MARKETING_HOLD_MS, MessageKind, Millis, Policy, SLOT_MS, Scope,
    SenderStatus, WindowMode,
};

/// What holds for every recipient of one Acquire: the policies in force and what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub now: Millis,
    pub window_mode: WindowMode,
    /// The window's limit (0 = unlimited) and the limit minus the headroom.
    pub limit: u64,
    pub effective: u64,
    /// The sender's cap at a portfolio; 0 = none (and always 0 at the sender's own window).
    pub sender_cap: u64,
    pub rates: Rates,
    pub kind: MessageKind,
    pub marketing: bool,
    /// A blocking status refuses everything; its retry time (None: it has no end).
    pub blocked: bool,
    pub blocked_retry: Option<Millis>,
    /// A restricted sender starts no conversation.
    pub restricted: bool,
    pub restricted_retry: Option<Millis>,
}

/// The standing of a batch: `window` is the window owner's policy (settled), `sender` the
/// sender's own (the same at its own window). Mirrored by the preamble of lua/acquire.lua
/// (`status_at`, `until_of`, `blocked`, `restricted`, the rates).
pub fn standing(
    window: &Policy,
    sender: &Policy,
    scope: Scope,
    defaults: &Defaults,
    kind: MessageKind,
    category: Option<Category>,
    now: Millis,
) -> Standing {
    let restricts = |s: SenderStatus| s == SenderStatus::Restricted;
    let blocked = window.status_at(now).blocks() || sender.status_at(now).blocks();
    let restricted = restricts(window.status_at(now)) || restricts(sender.status_at(now));
    Standing {
        now,
        window_mode: window.window_mode,
        limit: window.limit(),
        effective: window.effective_limit(),
        sender_cap: if scope == Scope::Portfolio {
            sender.sender_cap
        } else {
            0
        },
        rates: Rates::of(sender, defaults),
        kind,
        marketing: category == Some(Category::Marketing),
        blocked,
        blocked_retry: if blocked {
            status_retry([window, sender], SenderStatus::blocks, now)
        } else {
            None
        },
        restricted,
        restricted_retry: if restricted {
            status_retry([window, sender], restricts, now)
        } else {
            None
        },
    }
}

/// A status ends at its status_until; a refusal for it retries then, or never when one of the
/// statuses that refuse has no end. Mirrored by `until_of` in lua/acquire.lua.
fn status_retry(
    policies: [&Policy; 2],
    stops: impl Fn(SenderStatus) -> bool,
    now: Millis,
) -> Option<Millis> {
    let mut at = now;
    for p in policies {
        if stops(p.status_at(now)) {
            at = at.max(p.status_until?);
        }
    }
    Some(at - now)
}

/// What the ledger holds of one recipient, as this batch has left it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recipient<'a> {
    /// The sender's service window with the user (its expiry, possibly past).
    pub service_until: Option<Millis>,
    /// The user's slot in the window (its expiry, possibly past).
    pub slot_until: Option<Millis>,
    /// A marketing hold (WhatsApp error 131049) at this window (possibly past).
    pub hold_until: Option<Millis>,
    /// Times of the sender's marketing messages to the user (of any age).
    pub marketing_sent: &'a [Millis],
    /// The pair-rate TAT (us), None when none is stored.
    pub pair_tat: Option<i64>,
}

/// The batch's running state: what earlier recipients of the same Acquire changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overlay {
    /// Live slots of the window, and those the sender opened (counted only with a sender cap).
    pub used: u64,
    pub held: u64,
    /// The sender's throughput TAT (us), None when none is stored.
    pub tat: Option<i64>,
    /// Throughput refusals so far in this batch.
    pub throttled: i64,
}

/// What to change in the slot of an admitted recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotChange {
    /// Within a service window: no slot is involved.
    None,
    /// A counted delivery into the user's live slot: it is touched (no reservation can release
    /// it any more) and lasts until `expires_at`.
    Touch { expires_at: Millis },
    /// A new slot until `expires_at`, counted for projections.
    Open { expires_at: Millis },
}

/// The writes of an admission, all at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The sender's new throughput TAT and the pair's new TAT (us).
    pub tat: i64,
    pub pair_tat: i64,
    /// Record a marketing message at `now` (rates::note_marketing).
    pub marketing: bool,
    pub slot: SlotChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub expires_at: Option<Millis>,
    pub retry_after_ms: Option<Millis>,
    /// Some for an admission: the writes to make. A refusal writes nothing.
    pub admitted: Option<Admitted>,
}

impl Verdict {
    fn refused(decision: Decision, retry_after_ms: Option<Millis>) -> Verdict {
        Verdict {
            decision,
            expires_at: None,
            retry_after_ms,
            admitted: None,
        }
    }
}

/// Decides one recipient, and updates the batch's overlay (used, held, TAT, throttled) as the
/// verdict does. `frees_at(k, of_sender)` is the k-th (0-based) earliest live slot expiry of the
/// window (as this batch has left it), or of the sender's own slots there: when one more slot
/// fits. Mirrored by `decide` in lua/acquire.lua (which also checks a lost ledger, a state the
/// memory ledger never is in).
pub fn decide(
    st: &Standing,
    ov: &mut Overlay,
    r: &Recipient,
    frees_at: impl Fn(u64, bool) -> Option<Millis>,
) -> Verdict {
    let now = st.now;
    let now_us = now * 1000;
    if st.blocked {
        return Verdict::refused(Decision::DeniedSenderBlocked, st.blocked_retry);
    }
    let service = r.service_until.filter(|e| *e > now);
    let slot = r.slot_until.filter(|e| *e > now);
    let fresh = service.is_none() && slot.is_none();
    // A restricted sender may not start a conversation: a new user outside a service window.
    if fresh && st.restricted {
        return Verdict::refused(Decision::DeniedSenderBlocked, st.restricted_retry);
    }
    if service.is_none() && st.kind == MessageKind::FreeForm {
        return Verdict::refused(Decision::DeniedOutsideServiceWindow, None);
    }
    // The time-bound checks, in the order of docs/contract.md, "Which refusal is reported": the
    // first that refuses is the one reported, and retry_after is when every one of them passes
    // (each passes from some moment on), or none when one never does (an effective limit of 0).
    let mut refused = None;
    let mut passes_at = Some(now);
    let mut refuse = |d: Decision, at: Option<Millis>| {
        refused.get_or_insert(d);
        passes_at = passes_at.zip(at).map(|(p, a)| p.max(a));
    };
    if fresh {
        let over_limit = st.limit > 0 && ov.used >= st.effective;
        let over_cap = st.sender_cap > 0 && ov.held >= st.sender_cap;
        if over_limit || over_cap {
            let w = if over_limit {
                frees_at(ov.used - st.effective, false)
            } else {
                Some(now)
            };
            let c = if over_cap {
                frees_at(ov.held - st.sender_cap, true)
            } else {
                Some(now)
            };
            refuse(Decision::DeniedLimit, w.zip(c).map(|(w, c)| w.max(c)));
        }
    }
    if st.marketing {
        if let Some(h) = r.hold_until.filter(|h| *h > now) {
            refuse(Decision::DeniedMarketingCap, Some(h));
        }
        if let Some(t) = marketing_cap_until(r.marketing_sent, &st.rates, now) {
            refuse(Decision::DeniedMarketingCap, Some(t));
        }
    }
    let rates = &st.rates;
    let new_pair = gcra(
        r.pair_tat.unwrap_or(now_us),
        now_us,
        rates.pair_interval_us,
        rates.pair_burst,
    )
    .inspect_err(|wait| refuse(Decision::DeniedPairRate, Some(now + wait)));
    // Refusals for throughput are staggered in batch order: the k-th one passes when it would
    // after the k before it (docs/contract.md, "Retrying a refusal").
    let queued = ov.tat.unwrap_or(now_us).max(now_us) + ov.throttled * rates.interval_us;
    let new_tat = gcra(queued, now_us, rates.interval_us, rates.burst).inspect_err(|wait| {
        ov.throttled += 1;
        refuse(Decision::DeniedThroughput, Some(now + wait))
    });
    let (Ok(pair_tat), Ok(tat), None) = (new_pair, new_tat, refused) else {
        return Verdict::refused(
            refused.unwrap_or(Decision::DeniedThroughput),
            passes_at.map(|t| t - now),
        );
    };

    // Admitted: consume, in every place at once.
    ov.tat = Some(tat);
    let (decision, expires_at, slot) = if let Some(sw) = service {
        (Decision::AllowedServiceWindow, sw, SlotChange::None)
    } else if let Some(cur) = slot {
        let until = match st.window_mode {
            WindowMode::Conversation => cur,
            WindowMode::Rolling => cur.max(now + SLOT_MS),
        };
        let touch = SlotChange::Touch { expires_at: until };
        (Decision::AllowedCounted, until, touch)
    } else {
        let until = now + SLOT_MS;
        ov.used += 1;
        ov.held += 1;
        let open = SlotChange::Open { expires_at: until };
        (Decision::AllowedNew, until, open)
    };
    Verdict {
        decision,
        expires_at: Some(expires_at),
        retry_after_ms: None,
        admitted: Some(Admitted {
            tat,
            pair_tat,
            marketing: st.marketing,
            slot,
        }),
    }
}

/// The next reservation sequence of a window (0: none handed out yet). A window's first is
/// now x 1000, so a window whose state idled out never hands out a sequence an older token
/// carries. Mirrored by `win_next_seq` in lua/lib.lua.
pub fn next_seq(seq: u64, now: Millis) -> u64 {
    if seq == 0 {
        (u64::try_from(now).unwrap_or(0) * 1000).max(1)
    } else {
        seq + 1
    }
}

/// A confirmed delivery's slot: from delivery (clamped to [the reservation's time, now]) for
/// one slot length, never shorter than it already was. Max then min, since a trusted clock may
/// put now before the reservation. Mirrored by lua/confirm.lua.
pub fn confirmed_until(
    slot_until: Millis,
    opened_at: Millis,
    delivered_at: Millis,
    now: Millis,
) -> Millis {
    let delivered = delivered_at.max(opened_at).min(now);
    slot_until.max(delivered + SLOT_MS)
}

/// A service window opened or restarted by an inbound message, never cut short (a free entry
/// point lasts longer). Mirrored by lua/inbound.lua.
pub fn service_until(current: Option<Millis>, now: Millis, span: Millis) -> Millis {
    current.map_or(now + span, |e| e.max(now + span))
}

/// A marketing hold after WhatsApp error 131049, never cut short. Mirrored by lua/failure.lua.
pub fn hold_until(current: Option<Millis>, now: Millis) -> Millis {
    current.map_or(now + MARKETING_HOLD_MS, |h| h.max(now + MARKETING_HOLD_MS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DAY_MS, RuleSet, Tier};

    const NOW: Millis = 1_000 * DAY_MS;

    fn standing_of(policy: Policy, kind: MessageKind, category: Option<Category>) -> Standing {
        standing(
            &policy,
            &policy,
            Scope::Sender,
            &Defaults::default(),
            kind,
            category,
            NOW,
        )
    }

    fn t250() -> Policy {
        Policy::basic(Tier::T250, WindowMode::Rolling, RuleSet::Legacy)
    }

    #[test]
    fn a_new_user_opens_a_slot_and_a_known_one_is_counted_again() {
        let st = standing_of(t250(), MessageKind::Template, None);
        let mut ov = Overlay::default();
        let v = decide(&st, &mut ov, &Recipient::default(), |_, _| unreachable!());
        assert_eq!(v.decision, Decision::AllowedNew);
        assert_eq!(v.expires_at, Some(NOW + SLOT_MS));
        assert_eq!(
            v.admitted.map(|a| (a.tat, a.pair_tat, a.slot)),
            Some((
                NOW * 1000 + 12_500,
                NOW * 1000 + 6_000_000,
                SlotChange::Open {
                    expires_at: NOW + SLOT_MS
                }
            ))
        );
        assert_eq!((ov.used, ov.tat), (1, Some(NOW * 1000 + 12_500)));
        // Rolling: a counted delivery pushes the slot to a full length from now.
        let known = Recipient {
            slot_until: Some(NOW + 1_000),
            ..Recipient::default()
        };
        let v = decide(&st, &mut ov, &known, |_, _| unreachable!());
        assert_eq!(v.decision, Decision::AllowedCounted);
        assert_eq!(v.expires_at, Some(NOW + SLOT_MS));
        assert_eq!(ov.used, 1);
    }

    #[test]
    fn the_first_refusal_is_reported_and_the_retry_waits_for_every_check() {
        let policy = Policy {
            marketing_cap: 1,
            ..t250()
        };
        let st = standing_of(policy, MessageKind::Template, Some(Category::Marketing));
        // Over the limit (the slot that frees first goes in an hour), and held for two hours.
        let mut ov = Overlay {
            used: 250,
            ..Overlay::default()
        };
        let held = Recipient {
            hold_until: Some(NOW + 2 * 3_600_000),
            ..Recipient::default()
        };
        let v = decide(&st, &mut ov, &held, |k, mine| {
            assert_eq!((k, mine), (0, false));
            Some(NOW + 3_600_000)
        });
        assert_eq!(v.decision, Decision::DeniedLimit);
        assert_eq!(v.retry_after_ms, Some(2 * 3_600_000));
        assert_eq!(v.admitted, None);
        assert_eq!(ov.used, 250);
        // Free-form outside a service window is refused before any limit, with no retry.
        let st = standing_of(t250(), MessageKind::FreeForm, None);
        let v = decide(&st, &mut ov, &Recipient::default(), |_, _| unreachable!());
        assert_eq!(
            (v.decision, v.retry_after_ms),
            (Decision::DeniedOutsideServiceWindow, None)
        );
    }

    #[test]
    fn a_status_refuses_until_it_ends_or_forever() {
        let paused = Policy {
            status: SenderStatus::Paused,
            status_until: Some(NOW + 5_000),
            ..t250()
        };
        let st = standing_of(paused, MessageKind::Template, None);
        let v = decide(
            &st,
            &mut Overlay::default(),
            &Recipient::default(),
            |_, _| None,
        );
        assert_eq!(
            (v.decision, v.retry_after_ms),
            (Decision::DeniedSenderBlocked, Some(5_000))
        );
        let restricted = Policy {
            status: SenderStatus::Restricted,
            ..t250()
        };
        let st = standing_of(restricted, MessageKind::Template, None);
        let v = decide(
            &st,
            &mut Overlay::default(),
            &Recipient::default(),
            |_, _| None,
        );
        assert_eq!(
            (v.decision, v.retry_after_ms),
            (Decision::DeniedSenderBlocked, None)
        );
        // Inside a service window a restricted sender may answer.
        let open = Recipient {
            service_until: Some(NOW + 1),
            ..Recipient::default()
        };
        let v = decide(&st, &mut Overlay::default(), &open, |_, _| None);
        assert_eq!(
            (v.decision, v.expires_at),
            (Decision::AllowedServiceWindow, Some(NOW + 1))
        );
    }

    #[test]
    fn throughput_refusals_are_staggered_in_batch_order() {
        let st = standing_of(t250(), MessageKind::Template, None);
        let full = NOW * 1000 + 80 * 12_500;
        let mut ov = Overlay {
            tat: Some(full),
            ..Overlay::default()
        };
        let service = Recipient {
            service_until: Some(NOW + DAY_MS),
            ..Recipient::default()
        };
        let retries: Vec<_> = (0..3)
            .map(|_| decide(&st, &mut ov, &service, |_, _| None).retry_after_ms)
            .collect();
        assert_eq!(retries, vec![Some(13), Some(25), Some(38)]);
        assert_eq!(ov.throttled, 3);
    }

    #[test]
    fn sequences_confirmations_and_holds() {
        assert_eq!(next_seq(0, 5), 5_000);
        assert_eq!(next_seq(0, 0), 1);
        assert_eq!(next_seq(5_000, 9), 5_001);
        // Delivery reported before the reservation, or after now: clamped.
        assert_eq!(confirmed_until(0, 100, 50, 200), 100 + SLOT_MS);
        assert_eq!(confirmed_until(0, 100, 500, 200), 200 + SLOT_MS);
        assert_eq!(confirmed_until(10 * SLOT_MS, 100, 150, 200), 10 * SLOT_MS);
        assert_eq!(
            service_until(Some(NOW + 3 * DAY_MS), NOW, DAY_MS),
            NOW + 3 * DAY_MS
        );
        assert_eq!(service_until(Some(NOW - 1), NOW, DAY_MS), NOW + DAY_MS);
        assert_eq!(hold_until(None, NOW), NOW + MARKETING_HOLD_MS);
    }
}
