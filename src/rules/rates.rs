//! Rates: a sender's throughput and the pair rate to each user (both GCRA), and the marketing
//! cap per user (docs/contract.md, "Policies").

use crate::model::{DEFAULT_MARKETING_PERIOD_MS, Defaults, Millis, Policy};

/// The rates and caps a sender decides with, defaults resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// GCRA emission interval of the sender's throughput, in microseconds.
    pub interval_us: i64,
    /// Messages that may go out at once (one second's worth).
    pub burst: i64,
    pub pair_interval_us: i64,
    pub pair_burst: i64,
    pub marketing_cap: u32,
    pub marketing_period_ms: Millis,
}

impl Rates {
    /// Mirrored by the rates block at the top of lua/acquire.lua (mps, pair_interval, mper).
    pub fn of(p: &Policy, d: &Defaults) -> Rates {
        let mps = if p.messages_per_second == 0 {
            d.messages_per_second
        } else {
            p.messages_per_second
        }
        .max(1);
        let pair_ms = if p.pair_interval_ms == 0 {
            d.pair_interval_ms
        } else {
            p.pair_interval_ms
        };
        let pair_burst = if p.pair_burst == 0 {
            d.pair_burst
        } else {
            p.pair_burst
        };
        Rates {
            interval_us: 1_000_000 / i64::from(mps),
            burst: i64::from(mps),
            pair_interval_us: pair_ms * 1000,
            pair_burst: i64::from(pair_burst.max(1)),
            marketing_cap: p.marketing_cap,
            marketing_period_ms: if p.marketing_cap_period_ms == 0 {
                DEFAULT_MARKETING_PERIOD_MS
            } else {
                p.marketing_cap_period_ms
            },
        }
    }
}

/// GCRA (the generic cell rate algorithm): a message at `now_us` conforms when the theoretical
/// arrival time it would push to stays within `burst` intervals of now. Returns the new TAT, or
/// the wait in milliseconds (rounded up) until it would conform. Mirrored by `gcra` in
/// lua/lib.lua, so both ledgers refuse exactly the same messages.
pub fn gcra(tat_us: i64, now_us: i64, interval_us: i64, burst: i64) -> Result<i64, Millis> {
    let new_tat = tat_us.max(now_us) + interval_us;
    let over = new_tat - now_us - burst * interval_us;
    if over > 0 {
        Err((over + 999) / 1000)
    } else {
        Ok(new_tat)
    }
}

/// The sender's TAT after an inbound message: inbound shares the throughput (WhatsApp counts
/// both ways) but is never refused, so it fills the burst at most. Mirrored by lua/inbound.lua.
pub fn inbound_tat(tat_us: Option<i64>, now_us: i64, rates: &Rates) -> i64 {
    let tat = tat_us.unwrap_or(now_us);
    (tat.max(now_us) + rates.interval_us).min(now_us + rates.burst * rates.interval_us)
}

/// When the marketing cap lets one more marketing message to this user through, given the times
/// of those sent (of any age); None when the cap does not refuse. Mirrored by `marketing_times`
/// and the cap check in lua/acquire.lua.
pub fn marketing_cap_until(sent: &[Millis], rates: &Rates, now: Millis) -> Option<Millis> {
    if rates.marketing_cap == 0 {
        return None;
    }
    let since = now - rates.marketing_period_ms;
    let mut times: Vec<Millis> = sent.iter().copied().filter(|t| *t > since).collect();
    times.sort_unstable();
    let cap = rates.marketing_cap as usize;
    (times.len() >= cap).then(|| times[times.len() - cap] + rates.marketing_period_ms)
}

/// Records a marketing message sent at `now`, dropping the times that no longer count.
/// Mirrored by the admitted branch of `decide` in lua/acquire.lua.
pub fn note_marketing(sent: &mut Vec<Millis>, rates: &Rates, now: Millis) {
    sent.retain(|t| *t > now - rates.marketing_period_ms);
    sent.push(now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RuleSet, Tier, WindowMode};

    #[test]
    fn gcra_admits_a_burst_then_one_per_interval() {
        // 80 per second: 12,500 us apart, 80 at once.
        let (t, b) = (12_500, 80);
        let mut tat = 0;
        for _ in 0..80 {
            tat = gcra(tat, 1_000_000, t, b).unwrap();
        }
        assert_eq!(tat, 2_000_000);
        // The 81st waits for one interval, rounded up to the millisecond.
        assert_eq!(gcra(tat, 1_000_000, t, b), Err(13));
        assert_eq!(gcra(tat, 1_012_500, t, b), Ok(2_012_500));
        // A TAT in the past counts from now: an idle sender has its whole burst again.
        assert_eq!(gcra(0, 5_000_000, t, b), Ok(5_012_500));
    }

    #[test]
    fn pair_rate_gcra_spaces_messages_to_one_user() {
        // One every 6 s after a burst of 2.
        let (t, b) = (6_000_000, 2);
        let now = 1_000_000_000;
        let a = gcra(now, now, t, b).unwrap();
        let c = gcra(a, now, t, b).unwrap();
        assert_eq!(c, now + 12_000_000);
        assert_eq!(gcra(c, now, t, b), Err(6_000));
        assert_eq!(gcra(c, now + 5_999_000, t, b), Err(1));
    }

    fn policy() -> Policy {
        Policy::basic(Tier::T1K, WindowMode::Conversation, RuleSet::Legacy)
    }

    #[test]
    fn defaults_fill_what_the_policy_leaves_at_zero() {
        let d = Defaults::default();
        let r = Rates::of(&policy(), &d);
        assert_eq!((r.interval_us, r.burst), (12_500, 80));
        assert_eq!((r.pair_interval_us, r.pair_burst), (6_000_000, 45));
        assert_eq!(r.marketing_period_ms, crate::model::DAY_MS);
        let own = Rates::of(
            &Policy {
                messages_per_second: 3,
                pair_interval_ms: 10,
                pair_burst: 1,
                ..policy()
            },
            &d,
        );
        assert_eq!((own.interval_us, own.burst), (333_333, 3));
        assert_eq!((own.pair_interval_us, own.pair_burst), (10_000, 1));
    }

    #[test]
    fn inbound_fills_the_burst_but_never_past_it() {
        let r = Rates::of(&policy(), &Defaults::default());
        let now_us = 1_000_000;
        assert_eq!(inbound_tat(None, now_us, &r), now_us + 12_500);
        let full = now_us + 80 * 12_500;
        assert_eq!(inbound_tat(Some(full), now_us, &r), full);
    }

    #[test]
    fn the_marketing_cap_frees_when_the_oldest_counted_send_ages_out() {
        let r = Rates {
            marketing_cap: 2,
            marketing_period_ms: 1_000,
            ..Rates::of(&policy(), &Defaults::default())
        };
        let now = 10_000;
        assert_eq!(marketing_cap_until(&[9_500], &r, now), None);
        // Two within the period: the older one (9,200) ages out at 10,200.
        assert_eq!(marketing_cap_until(&[9_800, 9_200], &r, now), Some(10_200));
        // 9,000 is exactly one period old: no longer counted.
        assert_eq!(marketing_cap_until(&[9_000, 9_800], &r, now), None);
        let mut sent = vec![8_000, 9_800];
        note_marketing(&mut sent, &r, now);
        assert_eq!(sent, vec![9_800, 10_000]);
        let uncapped = Rates {
            marketing_cap: 0,
            ..r
        };
        assert_eq!(marketing_cap_until(&[9_900, 9_950], &uncapped, now), None);
    }
}
