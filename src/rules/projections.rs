//! Unique-user counts and the thresholds that project an upgrade (docs/contract.md, "Rule sets
//! and tiers over time").

use super::settle::Progress;
use crate::model::{
    MONTH_MS, Millis, PORTFOLIO_ENTRY_UNIQUES, Policy, RuleSet, Tier, WEEK_MS, upgrade_delay,
};

/// How many of `times` fall after `since`. The scripts count the same with ZCOUNT over the
/// uniques zset (`(since` to `+inf`).
pub fn count_since<'a>(times: impl IntoIterator<Item = &'a Millis>, since: Millis) -> u64 {
    times.into_iter().filter(|t| **t > since).count() as u64
}

/// Does the count of unique users cross the bar for the next tier? Mirrored by
/// `upgrade_threshold_met` in lua/lib.lua.
pub fn upgrade_threshold_met(rules: RuleSet, tier: Tier, unique_7d: u64, unique_30d: u64) -> bool {
    if tier.limit() == 0 {
        return false;
    }
    let half = tier.limit() / 2;
    match rules {
        RuleSet::Legacy => tier != Tier::T50 && unique_7d >= half,
        RuleSet::Portfolio => {
            unique_7d >= half || (tier == Tier::T250 && unique_30d >= PORTFOLIO_ENTRY_UNIQUES)
        }
    }
}

/// When the count of unique users reached the bar for the next tier, re-derived from the times
/// users got new slots (used when a release takes one back: the threshold-th user still counted
/// in the trailing window is when the bar was reached without it). None: the bar is not reached.
/// Mirrored by `crossing_time` in lua/lib.lua.
pub fn crossing_time(rules: RuleSet, tier: Tier, times: &[Millis], now: Millis) -> Option<Millis> {
    let nth_since = |since: Millis, n: u64| {
        let mut t: Vec<Millis> = times.iter().copied().filter(|t| *t > since).collect();
        t.sort_unstable();
        usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| t.get(i).copied())
    };
    if tier.limit() == 0 {
        return None;
    }
    let by_week = match (rules, tier) {
        (RuleSet::Legacy, Tier::T50) => None,
        _ => nth_since(now - WEEK_MS, tier.limit() / 2),
    };
    let by_month = match (rules, tier) {
        (RuleSet::Portfolio, Tier::T250) => nth_since(now - MONTH_MS, PORTFOLIO_ENTRY_UNIQUES),
        _ => None,
    };
    match (by_week, by_month) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A user got a new slot at `now`, and the index of users counted for projections now holds
/// `size` of them: projects an upgrade the first time the trailing counts reach the bar.
/// `counts` gives (unique_7d, unique_30d); it is only called when `size` itself reaches the bar,
/// as the counts are at most the index's size. Mirrored by the projection at the end of
/// lua/acquire.lua.
pub fn project_upgrade(
    policy: &Policy,
    prog: &mut Progress,
    size: u64,
    counts: impl FnOnce() -> (u64, u64),
    now: Millis,
) {
    if prog.upgrade_pending(policy.tier)
        || !policy.eligible_for_upgrade()
        || policy.tier.next(policy.rule_set).is_none()
        || !upgrade_threshold_met(policy.rule_set, policy.tier, size, size)
    {
        return;
    }
    let (u7, u30) = counts();
    if upgrade_threshold_met(policy.rule_set, policy.tier, u7, u30) {
        prog.upgrade_at = Some(now + upgrade_delay(policy.rule_set));
        prog.upgrade_from = Some(policy.tier);
    }
}

/// A released slot took its user out of the count (`times`: those still counted): a pending
/// upgrade moves to when the bar was reached without that user, or is dropped when it no longer
/// is. Mirrored by the tail of `release_slot` in lua/lib.lua.
pub fn reproject_after_release(
    policy: &Policy,
    prog: &mut Progress,
    times: &[Millis],
    now: Millis,
) {
    if !prog.upgrade_pending(policy.tier) {
        return;
    }
    match crossing_time(policy.rule_set, policy.tier, times, now) {
        Some(t) => prog.upgrade_at = Some(t + upgrade_delay(policy.rule_set)),
        None => {
            prog.upgrade_at = None;
            prog.upgrade_from = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DAY_MS, HOUR_MS, WindowMode};

    #[test]
    fn thresholds_are_half_the_limit_and_portfolio_entry_by_2000_in_30_days() {
        assert!(upgrade_threshold_met(RuleSet::Legacy, Tier::T1K, 500, 500));
        assert!(!upgrade_threshold_met(
            RuleSet::Legacy,
            Tier::T1K,
            499,
            2000
        ));
        assert!(upgrade_threshold_met(RuleSet::Legacy, Tier::T250, 125, 0));
        assert!(!upgrade_threshold_met(RuleSet::Legacy, Tier::T250, 124, 0));
        // Legacy 50 leaves by verification, not by counts; unlimited has nowhere to go.
        assert!(!upgrade_threshold_met(
            RuleSet::Legacy,
            Tier::T50,
            1_000,
            1_000
        ));
        assert!(!upgrade_threshold_met(
            RuleSet::Legacy,
            Tier::Unlimited,
            u64::MAX,
            u64::MAX
        ));
        assert!(upgrade_threshold_met(
            RuleSet::Portfolio,
            Tier::T250,
            10,
            2000
        ));
        assert!(!upgrade_threshold_met(
            RuleSet::Portfolio,
            Tier::T250,
            10,
            1999
        ));
        assert!(upgrade_threshold_met(
            RuleSet::Portfolio,
            Tier::T250,
            125,
            125
        ));
        // The 30-day entry only counts from 250.
        assert!(!upgrade_threshold_met(
            RuleSet::Portfolio,
            Tier::T2K,
            999,
            5_000
        ));
        assert!(upgrade_threshold_met(
            RuleSet::Portfolio,
            Tier::T2K,
            1_000,
            1_000
        ));
    }

    #[test]
    fn the_bar_is_crossed_at_the_threshold_th_user_in_the_trailing_window() {
        let now = 100 * DAY_MS;
        // Legacy 250 needs 125 in 7 days: one too old, then 125 an hour apart.
        let mut times = vec![now - 8 * DAY_MS];
        times.extend((0..125).map(|i| now - 6 * DAY_MS + i * HOUR_MS));
        assert_eq!(
            crossing_time(RuleSet::Legacy, Tier::T250, &times, now),
            Some(now - 6 * DAY_MS + 124 * HOUR_MS)
        );
        times.pop();
        assert_eq!(
            crossing_time(RuleSet::Legacy, Tier::T250, &times, now),
            None
        );
        assert_eq!(count_since(&times, now - WEEK_MS), 124);
        assert_eq!(count_since(&times, now - MONTH_MS), 125);
    }

    #[test]
    fn an_upgrade_is_projected_once_and_moved_by_a_release() {
        let policy = Policy::basic(Tier::T250, WindowMode::Conversation, RuleSet::Legacy);
        let now = 100 * DAY_MS;
        let mut prog = Progress::default();
        // The index is too small to reach the bar: the counts are not even asked for.
        project_upgrade(&policy, &mut prog, 124, || unreachable!(), now);
        assert_eq!(prog, Progress::default());
        project_upgrade(&policy, &mut prog, 125, || (124, 125), now);
        assert_eq!(prog, Progress::default());
        project_upgrade(&policy, &mut prog, 125, || (125, 125), now);
        assert_eq!(prog.upgrade_at, Some(now + DAY_MS));
        assert_eq!(prog.upgrade_from, Some(Tier::T250));
        // Already pending: the first crossing stands.
        project_upgrade(&policy, &mut prog, 126, || (126, 126), now + HOUR_MS);
        assert_eq!(prog.upgrade_at, Some(now + DAY_MS));
        // A release leaves 125 users, the last counted an hour earlier: the upgrade moves there.
        let times: Vec<Millis> = (0..125)
            .map(|i| now - 125 * HOUR_MS + i * HOUR_MS)
            .collect();
        reproject_after_release(&policy, &mut prog, &times, now);
        assert_eq!(prog.upgrade_at, Some(now - HOUR_MS + DAY_MS));
        // One user fewer: the bar is no longer reached, the projection goes.
        reproject_after_release(&policy, &mut prog, &times[1..], now);
        assert_eq!(prog, Progress::default());
    }
}
