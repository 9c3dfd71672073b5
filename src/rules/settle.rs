//! Tier changes over time (docs/contract.md, "Rule sets and tiers over time"): what `auto_tier`
//! applies once it is due, and what Inspect shows as projected.

use crate::model::{FLAGGED_DOWNGRADE_MS, Millis, Policy, Projection, RuleSet, SenderStatus, Tier};

/// Tier-projection state of a policy's owner (the Redis ledger keeps it in the policy hash:
/// `up_at`, `up_from`, `flagged`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub upgrade_at: Option<Millis>,
    /// The tier the pending upgrade starts from; a projection for another tier is stale.
    pub upgrade_from: Option<Tier>,
    pub flagged_since: Option<Millis>,
}

impl Progress {
    /// An upgrade is pending from `tier` (one projected from another tier no longer counts).
    pub fn upgrade_pending(&self, tier: Tier) -> bool {
        self.upgrade_at.is_some() && self.upgrade_from == Some(tier)
    }

    /// The state behind a projection read from a live ledger (the planner's seed).
    pub fn of_projection(tier: Tier, p: &Projection) -> Progress {
        Progress {
            upgrade_at: p.upgrade_at,
            upgrade_from: p.upgrade_at.map(|_| tier),
            flagged_since: p.downgrade_at.map(|d| d - FLAGGED_DOWNGRADE_MS),
        }
    }
}

/// Applies the tier changes due by `now` to a policy with `auto_tier`; true when the tier changed
/// (the caller stores the policy then). Mirrored by `settle` in lua/lib.lua.
pub fn settle(policy: &mut Policy, prog: &mut Progress, now: Millis) -> bool {
    let mut changed = false;
    while policy.auto_tier {
        if let (Some(at), Some(from)) = (prog.upgrade_at, prog.upgrade_from)
            && from == policy.tier
            && at <= now
            && policy.eligible_for_upgrade()
            && let Some(next) = policy.tier.next(policy.rule_set)
        {
            policy.tier = next;
            prog.upgrade_at = None;
            prog.upgrade_from = None;
            changed = true;
            continue;
        }
        // One tier per 7 flagged days: the clock restarts at the step, not at `now`, so a long
        // silence applies every step it missed.
        if policy.rule_set == RuleSet::Legacy
            && policy.status == SenderStatus::Flagged
            && let Some(since) = prog.flagged_since
            && since + FLAGGED_DOWNGRADE_MS <= now
            && let Some(prev) = policy.tier.previous()
        {
            policy.tier = prev;
            prog.flagged_since = Some(since + FLAGGED_DOWNGRADE_MS);
            changed = true;
            continue;
        }
        break;
    }
    changed
}

/// The pending tier changes, advisory unless the policy has `auto_tier`. Mirrored by the
/// projection block of lua/inspect.lua.
pub fn projection(policy: &Policy, prog: &Progress) -> Projection {
    let mut p = Projection::default();
    if let (Some(at), Some(from)) = (prog.upgrade_at, prog.upgrade_from)
        && from == policy.tier
        && policy.eligible_for_upgrade()
        && let Some(next) = policy.tier.next(policy.rule_set)
    {
        p.upgrade_at = Some(at);
        p.next_tier = Some(next);
    }
    if policy.rule_set == RuleSet::Legacy
        && policy.status == SenderStatus::Flagged
        && let Some(since) = prog.flagged_since
        && let Some(prev) = policy.tier.previous()
    {
        p.downgrade_at = Some(since + FLAGGED_DOWNGRADE_MS);
        p.next_tier.get_or_insert(prev);
    }
    p
}

/// A policy is stored over `old`: setting FLAGGED starts the downgrade clock, staying FLAGGED
/// keeps it, anything else stops it. Mirrored by lua/policy.lua.
pub fn flag(prog: &mut Progress, old: &Policy, new: &Policy, now: Millis) {
    if new.status != SenderStatus::Flagged {
        prog.flagged_since = None;
    } else if old.status != SenderStatus::Flagged || prog.flagged_since.is_none() {
        prog.flagged_since = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DAY_MS, Quality, WindowMode};

    fn legacy(tier: Tier) -> Policy {
        Policy {
            auto_tier: true,
            ..Policy::basic(tier, WindowMode::Conversation, RuleSet::Legacy)
        }
    }

    #[test]
    fn flagged_steps_down_one_tier_per_seven_days_exactly_at_the_boundary() {
        let t0 = 1_000 * DAY_MS;
        let mut policy = Policy {
            status: SenderStatus::Flagged,
            ..legacy(Tier::T10K)
        };
        let mut prog = Progress {
            flagged_since: Some(t0),
            ..Progress::default()
        };
        // One millisecond short of 7 days: nothing yet, and the projection names the step.
        assert!(!settle(&mut policy, &mut prog, t0 + 7 * DAY_MS - 1));
        assert_eq!(policy.tier, Tier::T10K);
        let p = projection(&policy, &prog);
        assert_eq!(p.downgrade_at, Some(t0 + 7 * DAY_MS));
        assert_eq!(p.next_tier, Some(Tier::T1K));
        assert_eq!(p.upgrade_at, None);
        // At 7 days: one step, and the clock restarts from the step.
        assert!(settle(&mut policy, &mut prog, t0 + 7 * DAY_MS));
        assert_eq!(policy.tier, Tier::T1K);
        assert_eq!(prog.flagged_since, Some(t0 + 7 * DAY_MS));
        // 21 days after flagging, seen only now: the three missed steps at once.
        let mut late = Policy {
            status: SenderStatus::Flagged,
            ..legacy(Tier::T10K)
        };
        let mut prog = Progress {
            flagged_since: Some(t0),
            ..Progress::default()
        };
        assert!(settle(&mut late, &mut prog, t0 + 21 * DAY_MS));
        assert_eq!(late.tier, Tier::T50);
        assert_eq!(prog.flagged_since, Some(t0 + 21 * DAY_MS));
        // Without auto_tier nothing is applied, though the projection still shows it.
        let mut manual = Policy {
            auto_tier: false,
            status: SenderStatus::Flagged,
            ..legacy(Tier::T10K)
        };
        let mut prog = Progress {
            flagged_since: Some(t0),
            ..Progress::default()
        };
        assert!(!settle(&mut manual, &mut prog, t0 + 30 * DAY_MS));
        assert_eq!(manual.tier, Tier::T10K);
        assert_eq!(
            projection(&manual, &prog).downgrade_at,
            Some(t0 + 7 * DAY_MS)
        );
    }

    #[test]
    fn a_due_upgrade_applies_only_from_its_own_tier_and_while_eligible() {
        let mut policy = legacy(Tier::T1K);
        let mut prog = Progress {
            upgrade_at: Some(5_000),
            upgrade_from: Some(Tier::T1K),
            flagged_since: None,
        };
        assert!(!settle(&mut policy, &mut prog, 4_999));
        assert_eq!(projection(&policy, &prog).next_tier, Some(Tier::T10K));
        assert!(settle(&mut policy, &mut prog, 5_000));
        assert_eq!(policy.tier, Tier::T10K);
        assert_eq!(prog, Progress::default());
        // Projected from another tier: stale, neither applied nor shown.
        let mut policy = legacy(Tier::T10K);
        let mut prog = Progress {
            upgrade_at: Some(5_000),
            upgrade_from: Some(Tier::T1K),
            flagged_since: None,
        };
        assert!(!settle(&mut policy, &mut prog, 9_000));
        assert!(projection(&policy, &prog).is_empty());
        // Red quality is not eligible: the upgrade waits.
        let mut red = Policy {
            quality: Some(Quality::Red),
            ..legacy(Tier::T1K)
        };
        let mut prog = Progress {
            upgrade_at: Some(5_000),
            upgrade_from: Some(Tier::T1K),
            flagged_since: None,
        };
        assert!(!settle(&mut red, &mut prog, 9_000));
        assert_eq!(red.tier, Tier::T1K);
    }

    #[test]
    fn flagging_starts_the_clock_once() {
        let connected = legacy(Tier::T1K);
        let flagged = Policy {
            status: SenderStatus::Flagged,
            ..connected
        };
        let mut prog = Progress::default();
        flag(&mut prog, &connected, &flagged, 100);
        assert_eq!(prog.flagged_since, Some(100));
        flag(&mut prog, &flagged, &flagged, 200);
        assert_eq!(prog.flagged_since, Some(100));
        flag(&mut prog, &flagged, &connected, 300);
        assert_eq!(prog.flagged_since, None);
    }
}
