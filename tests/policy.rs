//! The policy engine (docs/contract.md: "Rule sets and tiers over time", "Policies", "Which refusal
//! is reported"): sender status and quality, throughput, pair rate, marketing caps and holds, the
//! delivery clock, headroom, sender caps, tier projections and auto tier. Every body runs against
//! every ledger (in memory, Redis, Redis Cluster) through the public gRPC contract, on the trusted
//! clock; decisions, counts, expiry times and retry_after are checked to the millisecond.

#[macro_use]
mod common;

use common::dsl::*;
use common::{Backend, DAY, HOUR, MINUTE, TestServer, at, ts};
use prost_types::Duration;
use tonic::Code;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, Category, ConfirmRequest, Decision,
    InspectResponse, Policy, Quality, RuleSet, Scope, SenderStatus, Tier,
};

on_every_ledger!(
    blocked_status_refuses_everything_and_restricted_sender_keeps_service_windows_and_its_slots,
    throughput_admits_one_seconds_worth_at_once_then_one_message_per_interval,
    two_hundred_acquires_within_one_second_at_80_per_second_admit_at_most_80_plus_80,
    inbound_messages_share_the_throughput_and_refused_messages_consume_none_of_it,
    pair_rate_admits_45_to_one_user_then_one_per_6_seconds_and_leaves_other_users_alone,
    marketing_cap_limits_marketing_per_user_per_rolling_period,
    error_131049_holds_marketing_to_that_user_for_24_hours_across_the_portfolio,
    confirm_moves_the_slot_clock_to_delivery_and_unconfirmed_slots_keep_counting,
    headroom_keeps_the_effective_limit_below_the_tier_limit,
    effective_limit_of_zero_refuses_every_new_user_without_a_retry_after,
    sender_cap_limits_one_senders_share_of_the_portfolio_window,
    legacy_upgrade_is_projected_24_hours_after_the_7_day_count_first_reaches_half_the_limit,
    flagged_sender_gets_no_upgrade_and_is_projected_one_tier_down_after_7_days,
    portfolio_upgrade_needs_green_quality_and_is_projected_6_hours_after_the_crossing,
    released_reservations_do_not_count_toward_tier_projections,
    a_released_reservation_does_not_make_the_count_cross_the_upgrade_threshold,
    unique_counts_are_exact_to_the_millisecond_across_hours_releases_and_a_clock_behind,
    auto_tier_applies_the_projected_upgrade_at_its_moment_and_not_before,
    auto_tier_drops_a_flagged_legacy_sender_one_tier_every_7_days,
    bad_policy_fields_are_refused_naming_the_field_and_change_nothing,
    resetting_a_portfolio_frees_the_caps_of_senders_that_left_it,
    confirm_with_a_clock_behind_the_reservation_keeps_the_slot,
    retry_after_waits_for_every_refusal_not_only_the_reported_one,
    pair_rates_and_service_windows_of_hundreds_of_users_hold_across_assignments,
);

const NEW: Decision = Decision::AllowedNew;
const COUNTED: Decision = Decision::AllowedCounted;
const SERVICE: Decision = Decision::AllowedServiceWindow;
const OUTSIDE: Decision = Decision::DeniedOutsideServiceWindow;
const LIMIT: Decision = Decision::DeniedLimit;
const THROUGHPUT: Decision = Decision::DeniedThroughput;
const PAIR: Decision = Decision::DeniedPairRate;
const BLOCKED: Decision = Decision::DeniedSenderBlocked;
const MARKETING: Decision = Decision::DeniedMarketingCap;

/// Day `n` (day 1 = the test day D) at `h`:`m`.
fn day(n: i64, h: i64, m: i64) -> i64 {
    at(h, m, 0, 0) + (n - 1) * DAY
}

fn tier(t: Tier) -> Policy {
    Policy {
        tier: t as i32,
        ..Default::default()
    }
}

fn status(t: Tier, s: SenderStatus) -> Policy {
    Policy {
        status: s as i32,
        ..tier(t)
    }
}

fn mps(n: u32) -> Policy {
    Policy {
        messages_per_second: n,
        ..tier(Tier::Unlimited)
    }
}

fn secs(s: i64) -> Option<Duration> {
    Some(Duration {
        seconds: s,
        nanos: 0,
    })
}

/// `n` copies of each of `rs`, in turn: `[a, b, a, b, ...]`.
fn repeated(rs: &[String], n: usize) -> Vec<String> {
    (0..n).flat_map(|_| rs.iter().cloned()).collect()
}

/// The projection of an inspection: `(next_tier, upgrade_at, downgrade_at)`, None when unset.
fn projection(i: &InspectResponse) -> Option<(Tier, Option<i64>, Option<i64>)> {
    i.projection.as_ref().map(|p| {
        (
            p.next_tier(),
            opt_ms(&p.upgrade_at),
            opt_ms(&p.downgrade_at),
        )
    })
}

#[track_caller]
fn assert_all(rs: &[AcquireResponse], d: Decision) {
    for r in rs {
        assert_decision(r, d);
    }
}

// ------------------------------------------------------------------ 1. status and quality

async fn blocked_status_refuses_everything_and_restricted_sender_keeps_service_windows_and_its_slots(
    b: Backend,
) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t = at(9, 0, 0, 0);

    // PAUSED, BANNED, DISCONNECTED: nothing goes out, not even inside a service window, and the
    // status is reported before the service-window rules (a free-form message too).
    for (i, st) in [
        SenderStatus::Paused,
        SenderStatus::Banned,
        SenderStatus::Disconnected,
    ]
    .into_iter()
    .enumerate()
    {
        let s = format!("blocked-{i}");
        inbound(&mut q, &s, "talker", t).await;
        put_policy_at(&mut a, sender(&s), status(Tier::Tier250, st), t).await;
        for r in [
            acquire(&mut q, &s, "stranger", t + 1).await,
            acquire(&mut q, &s, "talker", t + 1).await,
            free_form(&mut q, &s, "stranger", t + 1).await,
            free_form(&mut q, &s, "talker", t + 1).await,
        ] {
            assert_denied_for_good(&r, BLOCKED);
            assert_eq!((r.used, r.remaining, r.limit), (0, 250, 250), "{r:?}");
        }
        let rs = batch(&mut q, &s, &users("b", 3), t + 2).await;
        for r in &rs {
            assert_denied_for_good(r, BLOCKED);
        }
        let i = inspect(&mut a, sender(&s), t + 3).await;
        assert_eq!((i.used, i.unique_7d), (0, 0), "a refusal consumes nothing");
        // Reconnected: it sends again.
        put_policy_at(
            &mut a,
            sender(&s),
            status(Tier::Tier250, SenderStatus::Connected),
            t + 4,
        )
        .await;
        assert_answer(&acquire(&mut q, &s, "stranger", t + 5).await, NEW, 1, 249);
    }

    // A blocking status on the portfolio blocks its members; on the member's own policy, too.
    assign_at(&mut a, "member", "pf", t).await;
    put_policy_at(
        &mut a,
        portfolio("pf"),
        status(Tier::Tier250, SenderStatus::Paused),
        t,
    )
    .await;
    let r = acquire(&mut q, "member", "u", t + 1).await;
    assert_denied_for_good(&r, BLOCKED);
    assert_eq!(r.scope(), Scope::Portfolio);
    put_policy_at(
        &mut a,
        portfolio("pf"),
        status(Tier::Tier250, SenderStatus::Connected),
        t + 2,
    )
    .await;
    put_policy_at(
        &mut a,
        sender("member"),
        status(Tier::Tier250, SenderStatus::Banned),
        t + 2,
    )
    .await;
    assert_denied_for_good(&acquire(&mut q, "member", "u", t + 3).await, BLOCKED);
    put_policy_at(
        &mut a,
        sender("member"),
        status(Tier::Tier250, SenderStatus::Connected),
        t + 4,
    )
    .await;
    let r = acquire(&mut q, "member", "u", t + 5).await;
    assert_answer(&r, NEW, 1, 249);
    assert_eq!(r.scope(), Scope::Portfolio);

    // RESTRICTED: only users inside a service window, and users already holding a slot. The
    // service-window rule comes before the messaging limit (this window of 1 is full).
    let s = "restricted";
    let one = Policy {
        custom_limit: 1,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), one, t).await;
    let held = acquire(&mut q, s, "held", t).await;
    assert_answer(&held, NEW, 1, 0);
    assert_eq!(inbound(&mut q, s, "talker", t).await, t + DAY);
    let restricted = Policy {
        status: SenderStatus::Restricted as i32,
        ..one
    };
    put_policy_at(&mut a, sender(s), restricted, at(9, 30, 0, 0)).await;
    let now = at(10, 0, 0, 0);
    let r = acquire(&mut q, s, "held", now).await;
    assert_answer(&r, COUNTED, 1, 0);
    assert_eq!(expires(&r), t + DAY);
    let r = acquire(&mut q, s, "talker", now).await;
    assert_answer(&r, SERVICE, 1, 0);
    assert_eq!(expires(&r), t + DAY);
    assert_decision(&free_form(&mut q, s, "talker", now).await, SERVICE);
    // A new user is a conversation the restriction forbids: the sender is blocked for it, with
    // no retry while the restriction has no end (docs/contract.md, "Policies").
    let r = acquire(&mut q, s, "stranger", now).await;
    assert_denied_for_good(&r, BLOCKED);
    assert_eq!((r.used, r.remaining), (1, 0));
    assert_denied_for_good(&free_form(&mut q, s, "held", now).await, OUTSIDE);
    let rs = batch(&mut q, s, &["stranger", "talker", "held"], now).await;
    assert_eq!(decisions(&rs), vec![BLOCKED, SERVICE, COUNTED]);
    assert_eq!(inspect(&mut a, sender(s), now).await.used, 1);
    // A restriction with an end (status_until): retry then; from then on the sender decides as
    // connected, and the stranger meets the full window instead.
    let until = now + 2 * HOUR;
    let ending = Policy {
        status_until: Some(ts(until)),
        ..restricted
    };
    put_policy_at(&mut a, sender(s), ending, now).await;
    let r = acquire(&mut q, s, "stranger", now).await;
    assert_eq!((r.decision(), retry_after(&r)), (BLOCKED, 2 * HOUR));
    assert_denied_limit(&acquire(&mut q, s, "stranger", until).await, 21 * HOUR);
    // Connected again, the stranger meets the full window too.
    put_policy_at(&mut a, sender(s), one, now).await;
    assert_denied_limit(&acquire(&mut q, s, "stranger", now).await, 23 * HOUR);

    // A RESTRICTED portfolio restricts its members.
    assign_at(&mut a, "rmember", "rp", t).await;
    put_policy_at(
        &mut a,
        portfolio("rp"),
        status(Tier::Tier250, SenderStatus::Restricted),
        t,
    )
    .await;
    assert_denied_for_good(&acquire(&mut q, "rmember", "x", t).await, BLOCKED);
    inbound(&mut q, "rmember", "x", t).await;
    assert_decision(&acquire(&mut q, "rmember", "x", t).await, SERVICE);

    // FLAGGED and a RED quality do not stop sending (they only affect tiers).
    put_policy_at(
        &mut a,
        sender("flagged"),
        status(Tier::Tier250, SenderStatus::Flagged),
        t,
    )
    .await;
    assert_answer(&acquire(&mut q, "flagged", "u", t).await, NEW, 1, 249);
    let red = Policy {
        quality: Quality::Red as i32,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender("red"), red, t).await;
    assert_answer(&acquire(&mut q, "red", "u", t).await, NEW, 1, 249);
}

// ------------------------------------------------------------------ 2. throughput

async fn throughput_admits_one_seconds_worth_at_once_then_one_message_per_interval(b: Backend) {
    // The configured default (80 per second) applies to senders whose policy says 0.
    let srv = TestServer::start_with(b, |s| s.defaults.messages_per_second = 80).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(9, 0, 0, 0);

    // 80 per second: 80 at once, then one every 12.5 ms; a refusal says when (rounded up).
    let s = "default-rate";
    put_policy_at(&mut a, sender(s), mps(0), t0).await;
    // A dry run answers the same and consumes nothing.
    let dry = dry_batch(&mut q, s, &users("a", 100), t0).await;
    assert_all(&dry[..80], NEW);
    // The refusals are staggered by position: the k-th passes after the k before it, 12.5 ms
    // apart (rounded up), and retry_at is that moment on the ledger's clock.
    let staggered = |k: usize| (12_500 * (k as i64 + 1) + 999) / 1000;
    for (k, r) in dry[80..].iter().enumerate() {
        assert_denied(r, THROUGHPUT, staggered(k));
        assert_eq!(opt_ms(&r.retry_at), Some(t0 + staggered(k)), "{r:?}");
    }
    let rs = batch(&mut q, s, &users("a", 100), t0).await;
    assert_all(&rs[..80], NEW);
    for (i, r) in rs[..80].iter().enumerate() {
        assert_eq!(r.used, i as u64 + 1);
    }
    for (k, r) in rs[80..].iter().enumerate() {
        assert_denied(r, THROUGHPUT, staggered(k));
        assert_eq!(r.used, 80, "a refusal opens no slot: {r:?}");
    }
    assert_eq!(
        staggered(19),
        250,
        "the 20th refusal waits for 20 intervals"
    );
    assert_denied(&acquire(&mut q, s, "b", t0 + 12).await, THROUGHPUT, 1);
    assert_answer(&acquire(&mut q, s, "b", t0 + 13).await, NEW, 81, 0);
    assert_denied(&acquire(&mut q, s, "c", t0 + 13).await, THROUGHPUT, 12);
    assert_decision(&acquire(&mut q, s, "c", t0 + 25).await, NEW);
    // Idle for a while, the whole burst is back (and no more).
    let rs = batch(&mut q, s, &users("d", 81), t0 + 10_000).await;
    assert_all(&rs[..80], NEW);
    assert_denied(&rs[80], THROUGHPUT, 13);
    assert_eq!(inspect(&mut a, sender(s), t0 + 10_000).await.used, 162);

    // A per-policy rate: 20 per second (a number also used in the Business app): 50 ms apart.
    let s = "twenty";
    put_policy_at(&mut a, sender(s), mps(20), t0).await;
    let rs = batch(&mut q, s, &users("a", 21), t0).await;
    assert_all(&rs[..20], NEW);
    assert_denied(&rs[20], THROUGHPUT, 50);
    assert_denied(&acquire(&mut q, s, "b", t0 + 49).await, THROUGHPUT, 1);
    assert_decision(&acquire(&mut q, s, "b", t0 + 50).await, NEW);

    // 1,000 per second: 1,000 at once, then one per millisecond.
    let s = "thousand";
    put_policy_at(&mut a, sender(s), mps(1000), t0).await;
    let rs = batch(&mut q, s, &users("a", 1000), t0).await;
    assert_all(&rs, NEW);
    assert_denied(&acquire(&mut q, s, "b", t0).await, THROUGHPUT, 1);
    assert_decision(&acquire(&mut q, s, "b", t0 + 1).await, NEW);
    assert_denied(&acquire(&mut q, s, "c", t0 + 1).await, THROUGHPUT, 1);

    // An interval that is not a whole number of microseconds is rounded down (3 per second:
    // 333,333 us), and the wait up to the next millisecond.
    let s = "three";
    put_policy_at(&mut a, sender(s), mps(3), t0).await;
    let rs = batch(&mut q, s, &users("a", 4), t0).await;
    assert_all(&rs[..3], NEW);
    assert_denied(&rs[3], THROUGHPUT, 334);
    assert_denied(&acquire(&mut q, s, "b", t0 + 333).await, THROUGHPUT, 1);
    assert_decision(&acquire(&mut q, s, "b", t0 + 334).await, NEW);

    // Throughput is the sender's: another sender is unaffected.
    assert_decision(&acquire(&mut q, "other", "a-0000", t0).await, NEW);

    // In a portfolio the member's own rate decides, or the configured default: a portfolio's
    // policy has no say, so a rate given to it is refused.
    let slow = Policy {
        messages_per_second: 5,
        ..tier(Tier::Unlimited)
    };
    assert_invalid(
        try_put_policy_at(&mut a, portfolio("tp"), slow, t0).await,
        "policy.messages_per_second",
    );
    put_policy_at(&mut a, portfolio("tp"), tier(Tier::Unlimited), t0).await;
    assign_at(&mut a, "tm", "tp", t0).await;
    assign_at(&mut a, "tn", "tp", t0).await;
    put_policy_at(&mut a, sender("tm"), mps(20), t0).await;
    let rs = batch(&mut q, "tm", &users("m", 21), t0).await;
    assert_all(&rs[..20], NEW);
    assert_denied(&rs[20], THROUGHPUT, 50);
    let rs = batch(&mut q, "tn", &users("n", 81), t0).await;
    assert_all(&rs[..80], NEW);
    assert_denied(&rs[80], THROUGHPUT, 13);
    // The sender's rate state goes with it when it is assigned elsewhere.
    put_policy_at(&mut a, sender("mover"), mps(20), t0).await;
    assert_all(&batch(&mut q, "mover", &users("v", 20), t0).await, NEW);
    assign_at(&mut a, "mover", "tp", t0).await;
    assert_denied(&acquire(&mut q, "mover", "w", t0).await, THROUGHPUT, 50);
    assign_at(&mut a, "mover", "", t0).await;
    assert_denied(
        &acquire(&mut q, "mover", "w", t0 + 10).await,
        THROUGHPUT,
        40,
    );
}

async fn two_hundred_acquires_within_one_second_at_80_per_second_admit_at_most_80_plus_80(
    b: Backend,
) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(9, 0, 0, 0);
    let s = "eighty";
    put_policy_at(&mut a, sender(s), mps(80), t0).await;

    // The expected answers, from the GCRA of the contract: interval floor(1e6 / 80) = 12,500 us,
    // burst 80 (one second's worth); a refusal's retry_after is the wait rounded up to 1 ms.
    let (interval, burst) = (12_500_i64, 80_i64);
    let mut tat = 0_i64;
    let mut allowed = 0;
    for i in 0..200_i64 {
        let now = t0 + i * 5; // 200 requests, 5 ms apart: all within one second
        let now_us = (now - t0) * 1000;
        let new_tat = tat.max(now_us) + interval;
        let over = new_tat - now_us - burst * interval;
        let r = acquire(&mut q, s, &format!("u{i:03}"), now).await;
        if over > 0 {
            assert_denied(&r, THROUGHPUT, (over + 999) / 1000);
        } else {
            tat = new_tat;
            allowed += 1;
            assert_answer(&r, NEW, allowed, 0);
        }
    }
    assert_eq!(allowed, 159, "the burst, then one per 12.5 ms");
    assert!(allowed <= 80 + 80);
    let i = inspect(&mut a, sender(s), t0 + 999).await;
    assert_eq!((i.used, i.unique_7d), (159, 159));
}

async fn inbound_messages_share_the_throughput_and_refused_messages_consume_none_of_it(b: Backend) {
    let srv = TestServer::start_with(b, |s| s.defaults.messages_per_second = 80).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(9, 0, 0, 0);

    // 80 inbound messages at one instant use up the burst: the next outbound one waits 13 ms.
    let s = "inbound";
    for u in users("in", 80) {
        assert_eq!(inbound(&mut q, s, &u, t0).await, t0 + DAY);
    }
    assert_denied(&acquire(&mut q, s, "out", t0).await, THROUGHPUT, 13);
    // Inbound messages are never refused, and fill the burst at most.
    for u in users("more", 200) {
        assert_eq!(inbound(&mut q, s, &u, t0 + 1).await, t0 + 1 + DAY);
    }
    // Throughput applies inside service windows too.
    assert_denied(&acquire(&mut q, s, "in-0000", t0 + 13).await, THROUGHPUT, 1);
    assert_denied(
        &free_form(&mut q, s, "in-0000", t0 + 13).await,
        THROUGHPUT,
        1,
    );
    let r = acquire(&mut q, s, "in-0000", t0 + 14).await;
    assert_answer(&r, SERVICE, 0, 250);
    assert_eq!(expires(&r), t0 + DAY);
    assert_denied(&acquire(&mut q, s, "out", t0 + 14).await, THROUGHPUT, 12);

    // A DENIED_LIMIT answer uses no throughput: after 100 of them, exactly the whole burst of 80
    // is still there for users who hold a slot (ALLOWED_COUNTED takes throughput too).
    let s = "full";
    let ten = Policy {
        custom_limit: 10,
        messages_per_second: 80,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), ten, t0).await;
    let held = users("held", 10);
    assert_all(&batch(&mut q, s, &held, t0).await, NEW);
    let now = at(10, 0, 0, 0);
    let rs = batch(&mut q, s, &users("new", 100), now).await;
    for r in &rs {
        assert_denied_limit(r, 23 * HOUR);
    }
    let rs = batch(&mut q, s, &repeated(&held, 8), now).await;
    assert_all(&rs, COUNTED);
    assert_denied(&acquire(&mut q, s, "held-0000", now).await, THROUGHPUT, 13);
    // ... and the throughput refusals used none either: one more after 12.5 ms, then 12 ms.
    assert_decision(&acquire(&mut q, s, "held-0001", now + 13).await, COUNTED);
    assert_denied(
        &acquire(&mut q, s, "held-0002", now + 13).await,
        THROUGHPUT,
        12,
    );

    // A message refused for throughput opens no slot and counts no marketing send.
    let s = "marketer";
    let capped = Policy {
        marketing_cap: 1,
        ..mps(80)
    };
    put_policy_at(&mut a, sender(s), capped, t0).await;
    let rs = batch_category(&mut q, s, &users("m", 80), Category::Marketing, t0).await;
    assert_all(&rs, NEW);
    let r = acquire_category(&mut q, s, "x", Category::Marketing, t0).await;
    assert_denied(&r, THROUGHPUT, 13);
    let i = inspect_recipient(&mut a, sender(s), "x", t0).await;
    assert_eq!((i.used, i.counted_until), (80, None));
    let r = acquire_category(&mut q, s, "x", Category::Marketing, t0 + 13).await;
    assert_answer(&r, NEW, 81, 0);
}

// ------------------------------------------------------------------ 3. pair rate

async fn pair_rate_admits_45_to_one_user_then_one_per_6_seconds_and_leaves_other_users_alone(
    b: Backend,
) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(9, 0, 0, 0);

    // 46 messages to one user within 6 s (100 ms apart): the 46th is refused; the burst is paid
    // back at one message per 6 s.
    let s = "pair";
    for i in 0..45 {
        let r = acquire(&mut q, s, "u", t0 + i * 100).await;
        assert_answer(&r, if i == 0 { NEW } else { COUNTED }, 1, 249);
    }
    let r = acquire(&mut q, s, "u", t0 + 4_500).await;
    assert_denied(&r, PAIR, 1_500);
    assert_eq!((r.used, r.remaining), (1, 249));
    assert_answer(&acquire(&mut q, s, "v", t0 + 4_500).await, NEW, 2, 248);
    assert_decision(&acquire(&mut q, "pair2", "u", t0 + 4_500).await, NEW);
    assert_denied(&acquire(&mut q, s, "u", t0 + 5_999).await, PAIR, 1);
    assert_decision(&acquire(&mut q, s, "u", t0 + 6_000).await, COUNTED);
    assert_denied(&acquire(&mut q, s, "u", t0 + 6_000).await, PAIR, 6_000);
    assert_decision(&acquire(&mut q, s, "u", t0 + 12_000).await, COUNTED);

    // In a batch each recipient is one message.
    let s = "pair-batch";
    let rs = batch(&mut q, s, &vec!["u"; 46], t0).await;
    assert_decision(&rs[0], NEW);
    assert_all(&rs[1..45], COUNTED);
    assert_denied(&rs[45], PAIR, 6_000);

    // Configured: 1 per second, bursts of 3; it applies inside service windows too.
    let s = "pair-custom";
    let p = Policy {
        pair_interval: secs(1),
        pair_burst: 3,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, t0).await;
    let rs = batch(&mut q, s, &["w", "w", "w", "w"], t0).await;
    assert_eq!(decisions(&rs[..3]), vec![NEW, COUNTED, COUNTED]);
    assert_denied(&rs[3], PAIR, 1_000);
    assert_decision(&acquire(&mut q, s, "w", t0 + 1_000).await, COUNTED);
    let t1 = t0 + 2_000;
    inbound(&mut q, s, "talker", t1).await;
    let rs = batch(&mut q, s, &["talker", "talker", "talker", "talker"], t1).await;
    assert_all(&rs[..3], SERVICE);
    assert_denied(&rs[3], PAIR, 1_000);
    assert_denied(&free_form(&mut q, s, "talker", t1 + 999).await, PAIR, 1);
    assert_decision(&free_form(&mut q, s, "talker", t1 + 1_000).await, SERVICE);

    // A pair-rate refusal opens no slot: a released user who comes back too soon stays out.
    let s = "pair-one";
    let p = Policy {
        pair_burst: 1,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, t0).await;
    let r = acquire(&mut q, s, "z", t0).await;
    assert_answer(&r, NEW, 1, 249);
    assert!(release(&mut q, s, "z", &r.reservation, t0).await);
    let r = acquire(&mut q, s, "z", t0 + 1).await;
    assert_denied(&r, PAIR, 5_999);
    assert_eq!(r.used, 0);
    let i = inspect_recipient(&mut a, sender(s), "z", t0 + 1).await;
    assert_eq!((i.used, i.unique_7d, i.counted_until), (0, 0, None));
    assert_answer(&acquire(&mut q, s, "z", t0 + 6_000).await, NEW, 1, 249);

    // ... and uses no throughput: 45 to one user, a refusal, then exactly 35 more of the 80.
    let s = "pair-throughput";
    put_policy_at(&mut a, sender(s), mps(80), t0).await;
    let mut rs: Vec<String> = vec!["u".into(); 46];
    rs.extend(users("n", 36));
    let rs = batch(&mut q, s, &rs, t0).await;
    assert_decision(&rs[0], NEW);
    assert_all(&rs[1..45], COUNTED);
    assert_denied(&rs[45], PAIR, 6_000);
    assert_all(&rs[46..81], NEW);
    assert_denied(&rs[81], THROUGHPUT, 13);
}

// ------------------------------------------------------------------ 4. marketing

async fn marketing_cap_limits_marketing_per_user_per_rolling_period(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let mk = Category::Marketing;

    // At most 2 marketing messages per user per 24 h (the default period), per sender.
    let s = "capped";
    let p = Policy {
        marketing_cap: 2,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, at(8, 0, 0, 0)).await;
    assert_answer(
        &acquire_category(&mut q, s, "u", mk, at(9, 0, 0, 0)).await,
        NEW,
        1,
        249,
    );
    assert_answer(
        &acquire_category(&mut q, s, "u", mk, at(10, 0, 0, 0)).await,
        COUNTED,
        1,
        249,
    );
    let r = acquire_category(&mut q, s, "u", mk, at(11, 0, 0, 0)).await;
    assert_denied(&r, MARKETING, 22 * HOUR);
    assert_eq!((r.used, r.remaining), (1, 249));
    // Other categories (and none) are not capped, and are not counted as marketing.
    for c in [
        Category::Utility,
        Category::Authentication,
        Category::Service,
        Category::Unspecified,
    ] {
        assert_decision(
            &acquire_category(&mut q, s, "u", c, at(11, 0, 0, 0)).await,
            COUNTED,
        );
    }
    // The cap is per (sender, recipient): another user, and another sender, are unaffected.
    assert_decision(
        &acquire_category(&mut q, s, "v", mk, at(11, 0, 0, 0)).await,
        NEW,
    );
    assert_decision(
        &acquire_category(&mut q, "uncapped", "u", mk, at(11, 0, 0, 0)).await,
        NEW,
    );
    // A rolling period: the 09:00 send ages out at D+1 09:00 exactly.
    let r = acquire_category(&mut q, s, "u", mk, at(9, 0, 0, 0) + DAY - 1).await;
    assert_denied(&r, MARKETING, 1);
    let r = acquire_category(&mut q, s, "u", mk, at(9, 0, 0, 0) + DAY).await;
    assert_answer(&r, NEW, 2, 248);
    let r = acquire_category(&mut q, s, "u", mk, at(9, 0, 0, 0) + DAY).await;
    assert_denied(&r, MARKETING, HOUR);

    // A configured period; a batch counts each message in turn.
    let s = "hourly";
    let p = Policy {
        marketing_cap: 1,
        marketing_cap_period: secs(3600),
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, at(8, 0, 0, 0)).await;
    let rs = batch_category(&mut q, s, &["u", "u", "v"], mk, at(9, 0, 0, 0)).await;
    assert_decision(&rs[0], NEW);
    assert_denied(&rs[1], MARKETING, HOUR);
    assert_answer(&rs[2], NEW, 2, 248);
    let r = acquire_category(&mut q, s, "u", mk, at(9, 59, 59, 999)).await;
    assert_denied(&r, MARKETING, 1);
    assert_decision(
        &acquire_category(&mut q, s, "u", mk, at(10, 0, 0, 0)).await,
        COUNTED,
    );

    // The cap is checked after the messaging limit and before the pair rate; a refusal for the
    // cap uses no pair token and no throughput.
    let s = "ordered";
    let p = Policy {
        custom_limit: 1,
        marketing_cap: 1,
        pair_burst: 2,
        messages_per_second: 2,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, at(8, 0, 0, 0)).await;
    let now = at(9, 0, 0, 0);
    assert_decision(&acquire_category(&mut q, s, "u", mk, now).await, NEW);
    assert_denied_limit(&acquire_category(&mut q, s, "v", mk, now).await, DAY);
    for _ in 0..3 {
        assert_denied(
            &acquire_category(&mut q, s, "u", mk, now).await,
            MARKETING,
            DAY,
        );
    }
    // Pair burst 2 and 2 per second: exactly one more message to u fits.
    assert_decision(
        &acquire_category(&mut q, s, "u", Category::Utility, now).await,
        COUNTED,
    );
    assert_denied(
        &acquire_category(&mut q, s, "u", Category::Utility, now).await,
        PAIR,
        6_000,
    );
}

async fn error_131049_holds_marketing_to_that_user_for_24_hours_across_the_portfolio(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let mk = Category::Marketing;
    let s = "holder";

    // The failed marketing message's slot is released, and marketing to that user is held.
    let r = acquire_category(&mut q, s, "v", mk, at(9, 0, 0, 0)).await;
    assert_answer(&r, NEW, 1, 249);
    let (released, hold) =
        report_failure(&mut q, s, "v", &r.reservation, 131049, at(9, 5, 0, 0)).await;
    assert!(released);
    assert_eq!(hold, Some(at(9, 5, 0, 0) + DAY));
    let i = inspect_recipient(&mut a, sender(s), "v", at(9, 5, 0, 0)).await;
    assert_eq!((i.used, i.unique_7d, i.counted_until), (0, 0, None));
    let r = acquire_category(&mut q, s, "v", mk, at(10, 0, 0, 0)).await;
    assert_denied(&r, MARKETING, 23 * HOUR + 5 * MINUTE);
    assert_eq!(r.used, 0, "a held user gets no slot");
    // Other categories are not held.
    let r = acquire_category(&mut q, s, "v", Category::Utility, at(10, 0, 0, 0)).await;
    assert_answer(&r, NEW, 1, 249);

    // A hold is never shortened (a report with an earlier clock), and a later one extends it. No
    // reservation: nothing is released, the hold applies.
    assert_eq!(
        report_failure(&mut q, s, "w", "", 131049, at(12, 0, 0, 0)).await,
        (false, Some(at(12, 0, 0, 0) + DAY))
    );
    assert_eq!(
        report_failure(&mut q, s, "w", "", 131049, at(11, 0, 0, 0)).await,
        (false, Some(at(12, 0, 0, 0) + DAY))
    );
    assert_eq!(
        report_failure(&mut q, s, "w", "", 131049, at(13, 0, 0, 0)).await,
        (false, Some(at(13, 0, 0, 0) + DAY))
    );
    assert_denied(
        &acquire_category(&mut q, s, "w", mk, at(13, 0, 0, 0)).await,
        MARKETING,
        DAY,
    );

    // Any other error releases the slot but holds nothing.
    let r = acquire_category(&mut q, s, "x", mk, at(14, 0, 0, 0)).await;
    assert_eq!(
        report_failure(&mut q, s, "x", &r.reservation, 131026, at(14, 0, 0, 0)).await,
        (true, None)
    );
    assert_eq!(
        report_failure(&mut q, s, "x", &r.reservation, 131026, at(14, 0, 0, 0)).await,
        (false, None),
        "released once"
    );
    let r = acquire_category(&mut q, s, "x", mk, at(14, 0, 0, 1)).await;
    assert_answer(&r, NEW, 2, 248);

    // A slot that a later counted delivery touched is not released; the hold still applies.
    let first = acquire_category(&mut q, s, "y", Category::Utility, at(15, 0, 0, 0)).await;
    assert_decision(&first, NEW);
    assert_decision(&acquire(&mut q, s, "y", at(15, 1, 0, 0)).await, COUNTED);
    assert_eq!(
        report_failure(&mut q, s, "y", &first.reservation, 131049, at(15, 2, 0, 0)).await,
        (false, Some(at(15, 2, 0, 0) + DAY))
    );
    let r = acquire_category(&mut q, s, "y", mk, at(15, 3, 0, 0)).await;
    assert_denied(&r, MARKETING, DAY - MINUTE);
    assert_eq!(r.used, 3);
    // The hold ends 24 h after the report, to the millisecond.
    assert_denied(
        &acquire_category(&mut q, s, "v", mk, at(9, 5, 0, 0) + DAY - 1).await,
        MARKETING,
        1,
    );
    assert_decision(
        &acquire_category(&mut q, s, "v", mk, at(9, 5, 0, 0) + DAY).await,
        COUNTED,
    );

    // In a portfolio the hold is portfolio-wide; the marketing cap stays per sender.
    assign_at(&mut a, "pa", "mp", at(8, 0, 0, 0)).await;
    assign_at(&mut a, "pb", "mp", at(8, 0, 0, 0)).await;
    let capped = Policy {
        marketing_cap: 1,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender("pa"), capped, at(8, 0, 0, 0)).await;
    put_policy_at(&mut a, sender("pb"), capped, at(8, 0, 0, 0)).await;
    assert_eq!(
        report_failure(&mut q, "pa", "held", "", 131049, at(9, 0, 0, 0)).await,
        (false, Some(at(9, 0, 0, 0) + DAY))
    );
    let r = acquire_category(&mut q, "pb", "held", mk, at(10, 0, 0, 0)).await;
    assert_denied(&r, MARKETING, 23 * HOUR);
    assert_eq!(r.scope(), Scope::Portfolio);
    assert_decision(
        &acquire_category(&mut q, "pb", "held", Category::Utility, at(10, 0, 0, 0)).await,
        NEW,
    );
    assert_decision(
        &acquire_category(&mut q, "pa", "fan", mk, at(10, 0, 0, 0)).await,
        NEW,
    );
    assert_denied(
        &acquire_category(&mut q, "pa", "fan", mk, at(11, 0, 0, 0)).await,
        MARKETING,
        23 * HOUR,
    );
    assert_decision(
        &acquire_category(&mut q, "pb", "fan", mk, at(11, 0, 0, 0)).await,
        COUNTED,
    );
    // A hold at the portfolio does not reach a sender outside it.
    assert_decision(
        &acquire_category(&mut q, "outsider", "held", mk, at(10, 0, 0, 0)).await,
        NEW,
    );
}

// ------------------------------------------------------------------ 5. delivery clock

async fn confirm_moves_the_slot_clock_to_delivery_and_unconfirmed_slots_keep_counting(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "confirmer";

    let r = acquire(&mut q, s, "u", at(9, 0, 0, 0)).await;
    assert_eq!(expires(&r), at(9, 0, 0, 0) + DAY);
    let ru = r.reservation.clone();
    assert_decision(&acquire(&mut q, s, "v", at(9, 0, 0, 0)).await, NEW);
    // Delivered 5 s after the reservation: the slot lasts until delivery + 24 h.
    let until = confirm(&mut q, s, "u", &ru, Some(at(9, 0, 5, 0)), at(9, 1, 0, 0)).await;
    assert_eq!(until.unwrap(), at(9, 0, 5, 0) + DAY);
    let i = inspect_recipient(&mut a, sender(s), "u", at(9, 1, 0, 0)).await;
    assert_eq!(opt_ms(&i.counted_until), Some(at(9, 0, 5, 0) + DAY));
    let page = list_page(&mut a, sender(s), 10, "", at(9, 1, 0, 0)).await;
    // By expiry: the listing itself comes in listing order (docs/contract.md).
    let mut listed = entries(&page.entries);
    listed.sort_by_key(|e| e.1);
    assert_eq!(
        listed,
        vec![
            ("v".into(), at(9, 0, 0, 0) + DAY, s.into()),
            ("u".into(), at(9, 0, 5, 0) + DAY, s.into()),
        ]
    );
    // A later counted delivery sees the moved clock (conversation: not extended).
    let r = acquire(&mut q, s, "u", at(10, 0, 0, 0)).await;
    assert_answer(&r, COUNTED, 2, 248);
    assert_eq!(expires(&r), at(9, 0, 5, 0) + DAY);
    // Never shorter: an earlier delivery time changes nothing.
    let until = confirm(&mut q, s, "u", &ru, Some(at(9, 0, 2, 0)), at(10, 0, 0, 0)).await;
    assert_eq!(until.unwrap(), at(9, 0, 5, 0) + DAY);
    // The delivery time is clamped to now, and the touched slot is still found by its reservation.
    let until = confirm(&mut q, s, "u", &ru, Some(at(11, 0, 0, 0)), at(10, 30, 0, 0)).await;
    assert_eq!(until.unwrap(), at(10, 30, 0, 0) + DAY);
    // ... and to the reservation's time.
    let rw = acquire(&mut q, s, "w", at(12, 0, 0, 0)).await.reservation;
    let until = confirm(&mut q, s, "w", &rw, Some(at(11, 0, 0, 0)), at(12, 5, 0, 0)).await;
    assert_eq!(until.unwrap(), at(12, 0, 0, 0) + DAY);

    // Unconfirmed, v keeps counting until its acquire time + 24 h; u until its confirmed clock.
    let i = inspect_recipient(&mut a, sender(s), "v", at(9, 0, 0, 0) + DAY - 1).await;
    assert_eq!(opt_ms(&i.counted_until), Some(at(9, 0, 0, 0) + DAY));
    assert_eq!(i.used, 3);
    let i = inspect_recipient(&mut a, sender(s), "u", at(9, 0, 0, 0) + DAY).await;
    assert_eq!(i.used, 2);
    assert_eq!(opt_ms(&i.counted_until), Some(at(10, 30, 0, 0) + DAY));
    assert_eq!(opt_ms(&i.next_slot_free_at), Some(at(10, 30, 0, 0) + DAY));
    let i = inspect(&mut a, sender(s), at(10, 30, 0, 0) + DAY).await;
    assert_eq!(i.used, 1);

    // No live slot for the reservation: NOT_FOUND (released, expired); another recipient's
    // reservation is not this one's at all: INVALID_ARGUMENT.
    let rx = acquire(&mut q, s, "x", at(13, 0, 0, 0)).await.reservation;
    assert!(release(&mut q, s, "x", &rx, at(13, 0, 0, 0)).await);
    for (r, res, now, code) in [
        ("x", &rx, at(13, 1, 0, 0), Code::NotFound),
        ("w", &rw, at(12, 0, 0, 0) + DAY, Code::NotFound),
        ("w", &ru, at(13, 1, 0, 0), Code::InvalidArgument),
    ] {
        let e = confirm(&mut q, s, r, res, Some(now), now)
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{r} {res}: {e:?}");
    }
    // delivered_at is required.
    let res = q
        .confirm(ConfirmRequest {
            sender: s.into(),
            recipient: "w".into(),
            reservation: rw.clone(),
            delivered_at: None,
            at: Some(ts(at(13, 0, 0, 0))),
        })
        .await;
    assert_invalid(res, "delivered_at");

    // In a portfolio, a confirmed slot frees later for the sender cap too.
    assign_at(&mut a, "capped", "cfp", at(8, 0, 0, 0)).await;
    let cap1 = Policy {
        sender_cap: 1,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender("capped"), cap1, at(8, 0, 0, 0)).await;
    let r = acquire(&mut q, "capped", "y", at(9, 0, 0, 0)).await;
    let until = confirm(
        &mut q,
        "capped",
        "y",
        &r.reservation,
        Some(at(9, 30, 0, 0)),
        at(9, 45, 0, 0),
    )
    .await;
    assert_eq!(until.unwrap(), at(9, 30, 0, 0) + DAY);
    let r = acquire(&mut q, "capped", "z", at(10, 0, 0, 0)).await;
    assert_denied_limit(&r, 23 * HOUR + 30 * MINUTE);
    let i = inspect_recipient(&mut a, portfolio("cfp"), "y", at(10, 0, 0, 0)).await;
    assert_eq!(opt_ms(&i.counted_until), Some(at(9, 30, 0, 0) + DAY));
}

// ------------------------------------------------------------------ 6. headroom

async fn headroom_keeps_the_effective_limit_below_the_tier_limit(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "margin";
    let p = |h: u32| Policy {
        headroom_percent: h,
        ..tier(Tier::Tier250)
    };
    let stored = put_policy_at(&mut a, sender(s), p(10), at(7, 0, 0, 0)).await;
    assert_eq!(stored.headroom_percent, 10);
    let i = inspect(&mut a, sender(s), at(7, 0, 0, 0)).await;
    assert_eq!(
        (i.limit, i.effective_limit, i.used, i.remaining),
        (250, 225, 0, 225)
    );

    // 225 users in nine batches of 25, ten minutes apart from 08:00.
    for k in 0..9_i64 {
        let now = at(8, 10 * k, 0, 0);
        let rs = batch(&mut q, s, &users(&format!("b{k}"), 25), now).await;
        for (j, r) in rs.iter().enumerate() {
            let used = (k as u64) * 25 + j as u64 + 1;
            assert_answer(r, NEW, used, 225 - used);
            assert_eq!(r.limit, 250, "limit is the nominal limit: {r:?}");
        }
    }
    // The 226th new user waits for the earliest slot.
    let r = acquire(&mut q, s, "late", at(10, 0, 0, 0)).await;
    assert_denied_limit(&r, at(8, 0, 0, 0) + DAY - at(10, 0, 0, 0));
    assert_eq!((r.used, r.remaining, r.limit), (225, 0, 250));
    let i = inspect(&mut a, sender(s), at(10, 0, 0, 0)).await;
    assert_eq!(
        (i.limit, i.effective_limit, i.used, i.remaining),
        (250, 225, 225, 0)
    );

    // More headroom after filling: used is above the effective limit, so the retry waits for
    // enough slots to free (the 26th earliest, the first of the 08:10 batch).
    put_policy_at(&mut a, sender(s), p(20), at(10, 0, 0, 0)).await;
    let r = acquire(&mut q, s, "late", at(10, 0, 0, 0)).await;
    assert_denied_limit(&r, at(8, 10, 0, 0) + DAY - at(10, 0, 0, 0));
    let i = inspect(&mut a, sender(s), at(10, 0, 0, 0)).await;
    assert_eq!(
        (i.limit, i.effective_limit, i.used, i.remaining),
        (250, 200, 225, 0)
    );
    assert_denied_limit(
        &acquire(&mut q, s, "late", at(8, 10, 0, 0) + DAY - 1).await,
        1,
    );
    let r = acquire(&mut q, s, "late", at(8, 10, 0, 0) + DAY).await;
    assert_answer(&r, NEW, 176, 24);

    // Rounded down; with a custom limit too.
    let s = "custom";
    let p = Policy {
        custom_limit: 10,
        headroom_percent: 33,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, at(7, 0, 0, 0)).await;
    let i = inspect(&mut a, sender(s), at(7, 0, 0, 0)).await;
    assert_eq!((i.limit, i.effective_limit, i.remaining), (10, 6, 6));
    let rs = batch(&mut q, s, &users("c", 7), at(9, 0, 0, 0)).await;
    assert_all(&rs[..6], NEW);
    assert_denied_limit(&rs[6], DAY);
    assert_eq!((rs[6].used, rs[6].remaining, rs[6].limit), (6, 0, 10));

    // A portfolio's headroom decides for its members.
    assign_at(&mut a, "member", "hp", at(7, 0, 0, 0)).await;
    let p = Policy {
        custom_limit: 4,
        headroom_percent: 50,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, portfolio("hp"), p, at(7, 0, 0, 0)).await;
    let own = Policy {
        headroom_percent: 90,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender("member"), own, at(7, 0, 0, 0)).await;
    let rs = batch(&mut q, "member", &users("m", 3), at(9, 0, 0, 0)).await;
    assert_eq!(decisions(&rs), vec![NEW, NEW, LIMIT]);
    let i = inspect(&mut a, sender("member"), at(9, 0, 0, 0)).await;
    assert_eq!(
        (i.limit, i.effective_limit, i.used, i.remaining),
        (4, 2, 2, 0)
    );

    // Unlimited stays unlimited whatever the headroom.
    let p = Policy {
        headroom_percent: 50,
        ..tier(Tier::Unlimited)
    };
    put_policy_at(&mut a, sender("unlimited"), p, at(7, 0, 0, 0)).await;
    let rs = batch(&mut q, "unlimited", &users("u", 300), at(9, 0, 0, 0)).await;
    assert_all(&rs, NEW);
    assert_eq!(
        (rs[299].limit, rs[299].used, rs[299].remaining),
        (0, 300, 0)
    );
    let i = inspect(&mut a, sender("unlimited"), at(9, 0, 0, 0)).await;
    assert_eq!((i.limit, i.effective_limit, i.remaining), (0, 0, 0));
}

async fn effective_limit_of_zero_refuses_every_new_user_without_a_retry_after(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    // An effective limit of 0 admits no new user, and no slot will ever free to change that.
    let s = "nothing";
    let p = Policy {
        custom_limit: 1,
        headroom_percent: 99,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, at(7, 0, 0, 0)).await;
    let r = acquire(&mut q, s, "u", at(9, 0, 0, 0)).await;
    assert_denied_for_good(&r, LIMIT);
    assert_eq!((r.limit, r.used, r.remaining), (1, 0, 0));
    inbound(&mut q, s, "talker", at(9, 0, 0, 0)).await;
    assert_decision(&acquire(&mut q, s, "talker", at(9, 0, 0, 0)).await, SERVICE);
}

// ------------------------------------------------------------------ 7. sender caps

async fn sender_cap_limits_one_senders_share_of_the_portfolio_window(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t = at(8, 0, 0, 0);
    let cap = |n: u64| Policy {
        sender_cap: n,
        messages_per_second: 500,
        ..tier(Tier::Tier250)
    };
    assign_at(&mut a, "ca", "cp", t).await;
    assign_at(&mut a, "cb", "cp", t).await;
    put_policy_at(&mut a, sender("ca"), cap(3), t).await;

    // ca may hold 3 of the portfolio's slots.
    let mut res = Vec::new();
    for (k, u) in ["u1", "u2", "u3"].into_iter().enumerate() {
        let r = acquire(&mut q, "ca", u, at(9, 10 * k as i64, 0, 0)).await;
        assert_answer(&r, NEW, k as u64 + 1, 249 - k as u64);
        assert_eq!(r.scope(), Scope::Portfolio);
        res.push(r.reservation);
    }
    let r = acquire(&mut q, "ca", "u4", at(10, 0, 0, 0)).await;
    assert_denied_limit(&r, 23 * HOUR);
    assert_eq!((r.used, r.remaining), (3, 247));
    // Other senders of the portfolio are unaffected ...
    let rs = batch(&mut q, "cb", &users("b", 5), at(10, 0, 0, 0)).await;
    assert_all(&rs, NEW);
    // ... and a user another sender counted is ALLOWED_COUNTED for the capped sender.
    assert_decision(
        &acquire(&mut q, "ca", "b-0000", at(10, 0, 0, 0)).await,
        COUNTED,
    );
    // cb's counted delivery extends (rolling) a slot ca opened: ca's slot frees later.
    let r = acquire(&mut q, "cb", "u1", at(10, 30, 0, 0)).await;
    assert_decision(&r, COUNTED);
    assert_eq!(expires(&r), at(10, 30, 0, 0) + DAY);
    let r = acquire(&mut q, "ca", "u4", at(10, 30, 0, 0)).await;
    assert_denied_limit(&r, at(9, 10, 0, 0) + DAY - at(10, 30, 0, 0));
    // A lower cap than held: the retry waits for enough of ca's slots (u2, u3, then u1).
    put_policy_at(&mut a, sender("ca"), cap(1), at(10, 30, 0, 0)).await;
    assert_denied_limit(&acquire(&mut q, "ca", "u4", at(10, 30, 0, 0)).await, DAY);
    // Releasing one of ca's slots gives room back.
    assert!(release(&mut q, "ca", "u2", &res[1], at(10, 40, 0, 0)).await);
    put_policy_at(&mut a, sender("ca"), cap(3), at(10, 40, 0, 0)).await;
    let r = acquire(&mut q, "ca", "u4", at(10, 40, 0, 0)).await;
    assert_answer(&r, NEW, 8, 242);
    // The cap is atomic with the window inside a batch.
    put_policy_at(&mut a, sender("ca"), cap(4), at(10, 50, 0, 0)).await;
    let rs = batch(&mut q, "ca", &["u5", "u6"], at(10, 50, 0, 0)).await;
    assert_decision(&rs[0], NEW);
    assert_denied_limit(&rs[1], at(9, 20, 0, 0) + DAY - at(10, 50, 0, 0));

    // The deciding policy is the portfolio's; the sender's own is shown beside it.
    let i = inspect(&mut a, sender("ca"), at(11, 0, 0, 0)).await;
    assert_eq!(i.scope(), Scope::Portfolio);
    assert_eq!(i.portfolio, "cp");
    let own = i.sender_policy.expect("sender_policy");
    assert_eq!((own.sender_cap, own.messages_per_second), (4, 500));
    assert_eq!(i.policy.expect("policy").sender_cap, 0);
    let i = inspect(&mut a, portfolio("cp"), at(11, 0, 0, 0)).await;
    assert_eq!(i.sender_policy, None);
    assert_eq!(i.senders, vec!["ca".to_string(), "cb".to_string()]);

    // Both the window and the cap full: the later of the two moments.
    assign_at(&mut a, "qa", "cq", t).await;
    assign_at(&mut a, "qb", "cq", t).await;
    let four = Policy {
        custom_limit: 4,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, portfolio("cq"), four, t).await;
    put_policy_at(&mut a, sender("qa"), cap(2), t).await;
    assert_decision(&acquire(&mut q, "qb", "b1", at(8, 0, 0, 0)).await, NEW);
    assert_decision(&acquire(&mut q, "qa", "a1", at(9, 0, 0, 0)).await, NEW);
    assert_decision(&acquire(&mut q, "qa", "a2", at(9, 30, 0, 0)).await, NEW);
    assert_decision(&acquire(&mut q, "qb", "b2", at(10, 0, 0, 0)).await, NEW);
    assert_denied_limit(
        &acquire(&mut q, "qa", "a3", at(11, 0, 0, 0)).await,
        22 * HOUR,
    );
    assert_denied_limit(
        &acquire(&mut q, "qb", "b3", at(11, 0, 0, 0)).await,
        21 * HOUR,
    );

    // A sender outside any portfolio has no cap to apply.
    put_policy_at(&mut a, sender("solo"), cap(1), t).await;
    let rs = batch(&mut q, "solo", &["x", "y"], at(9, 0, 0, 0)).await;
    assert_eq!(decisions(&rs), vec![NEW, NEW]);
}

// ------------------------------------------------------------------ 8. tier projections

async fn legacy_upgrade_is_projected_24_hours_after_the_7_day_count_first_reaches_half_the_limit(
    b: Backend,
) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);

    // A 1K sender with 500 new conversations on day 1, the 500th at 15:00: 10K from day 2 15:00.
    let s = "one-day";
    put_policy_at(&mut a, sender(s), tier(Tier::Tier1k), day(1, 0, 0)).await;
    assert_all(&batch(&mut q, s, &users("a", 100), day(1, 8, 0)).await, NEW);
    assert_all(
        &batch(&mut q, s, &users("b", 200), day(1, 10, 0)).await,
        NEW,
    );
    assert_all(
        &batch(&mut q, s, &users("c", 199), day(1, 12, 0)).await,
        NEW,
    );
    let i = inspect(&mut a, sender(s), day(1, 15, 0) - 1).await;
    assert_eq!(
        (i.unique_7d, i.unique_30d, projection(&i)),
        (499, 499, None)
    );
    assert_decision(&acquire(&mut q, s, "d", day(1, 15, 0)).await, NEW);
    let i = inspect(&mut a, sender(s), day(1, 15, 0)).await;
    assert_eq!((i.unique_7d, i.unique_30d), (500, 500));
    assert_eq!(
        projection(&i),
        Some((Tier::Tier10k, Some(day(2, 15, 0)), None))
    );
    // Advisory without auto_tier: the tier stays until an operator sets it; the projection
    // stays while the tier is the one it was counted at.
    let r = acquire(&mut q, s, "e", day(2, 15, 0)).await;
    assert_eq!((r.tier(), r.limit), (Tier::Tier1k, 1000));
    let i = inspect(&mut a, sender(s), day(2, 15, 0)).await;
    assert_eq!(i.policy.as_ref().unwrap().tier(), Tier::Tier1k);
    assert_eq!(
        projection(&i),
        Some((Tier::Tier10k, Some(day(2, 15, 0)), None))
    );
    put_policy_at(&mut a, sender(s), tier(Tier::Tier10k), day(2, 15, 0)).await;
    let i = inspect(&mut a, sender(s), day(2, 15, 0)).await;
    assert_eq!((i.limit, projection(&i)), (10_000, None));

    // 100, 200, 200, 300 on days 1 to 4, the 500th on day 3 at 19:00: 10K from day 4 19:00.
    let s = "four-days";
    put_policy_at(&mut a, sender(s), tier(Tier::Tier1k), day(1, 0, 0)).await;
    assert_all(
        &batch(&mut q, s, &users("d1", 100), day(1, 10, 0)).await,
        NEW,
    );
    assert_all(
        &batch(&mut q, s, &users("d2", 200), day(2, 10, 0)).await,
        NEW,
    );
    assert_all(
        &batch(&mut q, s, &users("d3a", 50), day(3, 9, 0)).await,
        NEW,
    );
    // The earlier check: 350 counted, nothing projected yet.
    let i = inspect(&mut a, sender(s), day(3, 10, 0)).await;
    assert_eq!(
        (i.unique_7d, i.unique_30d, projection(&i)),
        (350, 350, None)
    );
    assert_all(
        &batch(&mut q, s, &users("d3b", 149), day(3, 15, 0)).await,
        NEW,
    );
    let i = inspect(&mut a, sender(s), day(3, 19, 0) - 1).await;
    assert_eq!((i.unique_7d, projection(&i)), (499, None));
    assert_decision(&acquire(&mut q, s, "d3c", day(3, 19, 0)).await, NEW);
    let i = inspect(&mut a, sender(s), day(3, 19, 0)).await;
    assert_eq!(i.unique_7d, 500);
    assert_eq!(
        projection(&i),
        Some((Tier::Tier10k, Some(day(4, 19, 0)), None))
    );
    assert_all(
        &batch(&mut q, s, &users("d4", 300), day(4, 10, 0)).await,
        NEW,
    );
    let i = inspect(&mut a, sender(s), day(4, 19, 0)).await;
    assert_eq!((i.unique_7d, i.unique_30d), (800, 800));
    assert_eq!(
        projection(&i),
        Some((Tier::Tier10k, Some(day(4, 19, 0)), None))
    );
    // Trailing windows: a user counts strictly after now - 7 d (and 30 d).
    let i = inspect(&mut a, sender(s), day(8, 10, 0) - 1).await;
    assert_eq!((i.unique_7d, i.unique_30d), (800, 800));
    let i = inspect(&mut a, sender(s), day(8, 10, 0)).await;
    assert_eq!((i.unique_7d, i.unique_30d), (700, 800));
    let i = inspect(&mut a, sender(s), day(31, 10, 0)).await;
    assert_eq!((i.unique_7d, i.unique_30d), (0, 700));

    // Quality: YELLOW is eligible under the legacy rules, RED is not; the 50 tier is lifted by
    // verification only.
    for (s, t, quality, n, want) in [
        (
            "yellow",
            Tier::Tier250,
            Quality::Yellow,
            125,
            Some((Tier::Tier1k, Some(day(2, 9, 0)), None)),
        ),
        ("red", Tier::Tier250, Quality::Red, 125, None),
        (
            "green",
            Tier::Tier10k,
            Quality::Green,
            5000,
            Some((Tier::Tier100k, Some(day(2, 9, 0)), None)),
        ),
        ("trial", Tier::Tier50, Quality::Green, 25, None),
    ] {
        let p = Policy {
            quality: quality as i32,
            ..tier(t)
        };
        put_policy_at(&mut a, sender(s), p, day(1, 0, 0)).await;
        for chunk in users("u", n).chunks(1000) {
            assert_all(&batch(&mut q, s, chunk, day(1, 9, 0)).await, NEW);
        }
        let i = inspect(&mut a, sender(s), day(1, 9, 0)).await;
        assert_eq!(i.unique_7d, n as u64, "{s}");
        assert_eq!(projection(&i), want, "{s}");
    }
}

async fn flagged_sender_gets_no_upgrade_and_is_projected_one_tier_down_after_7_days(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "flagged";
    let flagged = status(Tier::Tier1k, SenderStatus::Flagged);
    put_policy_at(&mut a, sender(s), flagged, day(1, 8, 0)).await;

    // The threshold is met (500 by 15:00) but a flagged sender gets no upgrade.
    assert_all(&batch(&mut q, s, &users("a", 499), day(1, 9, 0)).await, NEW);
    assert_decision(&acquire(&mut q, s, "b", day(1, 15, 0)).await, NEW);
    let i = inspect(&mut a, sender(s), day(1, 15, 0)).await;
    assert_eq!(i.unique_7d, 500);
    assert_eq!(
        projection(&i),
        Some((Tier::Tier250, None, Some(day(8, 8, 0))))
    );
    // Flagged again: the clock keeps its start.
    put_policy_at(&mut a, sender(s), flagged, day(3, 8, 0)).await;
    let i = inspect(&mut a, sender(s), day(3, 8, 0)).await;
    assert_eq!(
        projection(&i),
        Some((Tier::Tier250, None, Some(day(8, 8, 0))))
    );
    // Advisory without auto_tier: at the projected moment the tier is unchanged.
    let r = acquire(&mut q, s, "c", day(8, 8, 0)).await;
    assert_eq!((r.tier(), r.limit), (Tier::Tier1k, 1000));
    // Another status clears the downgrade; the crossing while flagged projected no upgrade.
    put_policy_at(
        &mut a,
        sender(s),
        status(Tier::Tier1k, SenderStatus::Connected),
        day(8, 9, 0),
    )
    .await;
    let i = inspect(&mut a, sender(s), day(8, 9, 0)).await;
    assert_eq!(projection(&i), None);
    // Flagged anew: a new clock.
    put_policy_at(&mut a, sender(s), flagged, day(9, 0, 0)).await;
    let i = inspect(&mut a, sender(s), day(9, 0, 0)).await;
    assert_eq!(
        projection(&i),
        Some((Tier::Tier250, None, Some(day(16, 0, 0))))
    );
}

async fn portfolio_upgrade_needs_green_quality_and_is_projected_6_hours_after_the_crossing(
    b: Backend,
) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    for (p, t, quality, n, want) in [
        // The portfolio ladder: 250 -> 2K (not 1K), 2K -> 10K.
        (
            "green",
            Tier::Tier250,
            Quality::Green,
            125,
            Some((Tier::Tier2k, Some(day(1, 15, 0)), None)),
        ),
        (
            "unset",
            Tier::Tier2k,
            Quality::Unspecified,
            1000,
            Some((Tier::Tier10k, Some(day(1, 15, 0)), None)),
        ),
        ("yellow", Tier::Tier250, Quality::Yellow, 125, None),
        ("short", Tier::Tier250, Quality::Green, 124, None),
    ] {
        let member = format!("{p}-member");
        assign_at(&mut a, &member, p, day(1, 0, 0)).await;
        let pol = Policy {
            quality: quality as i32,
            ..tier(t)
        };
        let stored = put_policy_at(&mut a, portfolio(p), pol, day(1, 0, 0)).await;
        assert_eq!(
            stored.rule_set(),
            RuleSet::Portfolio,
            "the default for portfolios"
        );
        let us = users("u", n);
        let (early, last) = us.split_at(n - 1);
        assert_all(&batch(&mut q, &member, early, day(1, 8, 0)).await, NEW);
        assert_decision(&acquire(&mut q, &member, &last[0], day(1, 9, 0)).await, NEW);
        for target in [portfolio(p), sender(&member)] {
            let i = inspect(&mut a, target, day(1, 9, 0)).await;
            assert_eq!((i.unique_7d, i.unique_30d), (n as u64, n as u64), "{p}");
            assert_eq!(projection(&i), want, "{p}");
        }
    }

    // Portfolio 250 -> 2K also by 2,000 unique users within 30 days, whatever the 7-day count;
    // the legacy rules know no such route. 1,999 users on days 1 and 2 (at 10K, far from the bar),
    // then at 250 on day 10 (7-day count 0) one more user makes 2,000.
    for (p, rules, want) in [
        (
            "entry",
            RuleSet::Portfolio,
            Some((Tier::Tier2k, Some(day(10, 15, 0)), None)),
        ),
        ("entry-legacy", RuleSet::Legacy, None),
    ] {
        let member = format!("{p}-member");
        assign_at(&mut a, &member, p, day(1, 0, 0)).await;
        let pol = |t: Tier| Policy {
            rule_set: rules as i32,
            ..tier(t)
        };
        put_policy_at(&mut a, portfolio(p), pol(Tier::Tier10k), day(1, 0, 0)).await;
        let us = users("e", 1999);
        assert_all(
            &batch(&mut q, &member, &us[..1000], day(1, 9, 0)).await,
            NEW,
        );
        assert_all(
            &batch(&mut q, &member, &us[1000..], day(2, 9, 0)).await,
            NEW,
        );
        put_policy_at(&mut a, portfolio(p), pol(Tier::Tier250), day(10, 0, 0)).await;
        let i = inspect(&mut a, portfolio(p), day(10, 9, 0)).await;
        assert_eq!(
            (i.unique_7d, i.unique_30d, projection(&i)),
            (0, 1999, None),
            "{p}"
        );
        assert_decision(
            &acquire(&mut q, &member, "one-more", day(10, 9, 0)).await,
            NEW,
        );
        let i = inspect(&mut a, portfolio(p), day(10, 9, 0)).await;
        assert_eq!((i.unique_7d, i.unique_30d), (1, 2000), "{p}");
        assert_eq!(projection(&i), want, "{p}");
    }

    // The rule set is a policy field: a sender may follow the portfolio rules on its own window.
    let s = "modern";
    let p = Policy {
        rule_set: RuleSet::Portfolio as i32,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), p, day(1, 0, 0)).await;
    assert_all(&batch(&mut q, s, &users("u", 125), day(1, 9, 0)).await, NEW);
    let i = inspect(&mut a, sender(s), day(1, 9, 0)).await;
    assert_eq!(
        projection(&i),
        Some((Tier::Tier2k, Some(day(1, 15, 0)), None))
    );
}

async fn released_reservations_do_not_count_toward_tier_projections(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "releaser";

    // u is new on day 1 09:00 and again on day 2 10:00; the second one is released, so u's
    // count goes back to day 1 09:00 and leaves the 7-day window on day 8 09:00.
    assert_decision(&acquire(&mut q, s, "u", day(1, 9, 0)).await, NEW);
    let r = acquire(&mut q, s, "u", day(2, 10, 0)).await;
    assert_decision(&r, NEW);
    assert!(release(&mut q, s, "u", &r.reservation, day(2, 10, 0)).await);
    let r = acquire(&mut q, s, "v", day(2, 10, 0)).await;
    assert!(release(&mut q, s, "v", &r.reservation, day(2, 10, 0)).await);
    let i = inspect(&mut a, sender(s), day(2, 10, 0)).await;
    assert_eq!((i.used, i.unique_7d, i.unique_30d), (0, 1, 1));
    let i = inspect(&mut a, sender(s), day(8, 9, 0)).await;
    assert_eq!((i.unique_7d, i.unique_30d), (0, 1));
}

/// The trailing counts, at every moment probed, are the users whose last new slot lies strictly
/// inside the 7 (30) days before it: across many users a bucket (the index keeps its times in
/// two-hour buckets), several at one millisecond, a release, a returning user, and a clock a few
/// milliseconds behind the last (another worker's).
async fn unique_counts_are_exact_to_the_millisecond_across_hours_releases_and_a_clock_behind(
    b: Backend,
) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "many";
    // 10K: far from its bar (5,000 users in 7 days), so every new user moves the cursors.
    let p = Policy {
        messages_per_second: 1000,
        ..tier(Tier::Tier10k)
    };
    put_policy_at(&mut a, sender(s), p, day(1, 0, 0)).await;
    // The model: each user's last new slot.
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let t0 = day(1, 9, 0);
    let mut groups = Vec::new();
    for k in 0..12 {
        let t = t0 + k * 20 * MINUTE + k;
        let rs = users(&format!("h{k}"), 30);
        let got = batch(&mut q, s, &rs, t).await;
        assert_all(&got, NEW);
        for r in &rs {
            last.insert(r.clone(), t);
        }
        groups.push((t, rs, got));
    }
    // A clock 7 ms behind the last call, then one 3 ms ahead of it.
    let latest = groups.last().unwrap().0;
    for (r, t) in [("behind", latest - 7), ("ahead", latest + 3)] {
        assert_eq!(acquire(&mut q, s, r, t).await.decision(), NEW);
        last.insert(r.to_owned(), t);
    }
    // A release gives the user back (it had no earlier slot).
    let (t3, rs3, got3) = &groups[3];
    assert!(release(&mut q, s, &rs3[7], &got3[7].reservation, t3 + 1).await);
    last.remove(&rs3[7]);
    // A user of the first group comes back two days later: it counts once, from then.
    let back = day(3, 9, 30);
    assert_eq!(
        acquire(&mut q, s, &groups[0].1[0], back).await.decision(),
        NEW
    );
    last.insert(groups[0].1[0].clone(), back);

    let count = |last: &std::collections::HashMap<String, i64>, since: i64| {
        last.values().filter(|t| **t > since).count() as u64
    };
    let mut probes = vec![back, back + 1];
    for (t, _, _) in &groups {
        for span in [7 * DAY, 30 * DAY] {
            probes.extend([t + span - 1, t + span, t + span + 1]);
        }
    }
    probes.extend([
        latest - 7 + 7 * DAY,
        latest + 3 + 7 * DAY,
        back + 7 * DAY,
        back + 30 * DAY,
    ]);
    probes.sort();
    for (n, now) in probes.into_iter().enumerate() {
        let i = inspect(&mut a, sender(s), now).await;
        assert_eq!(
            (i.unique_7d, i.unique_30d),
            (count(&last, now - 7 * DAY), count(&last, now - 30 * DAY)),
            "at {now}"
        );
        // Every third probe also writes: a new user moves the stored cursors to it, and another
        // 1 ms behind moves them back (a worker whose clock is behind).
        if n % 3 == 0 {
            for (r, t) in [
                (format!("probe-{n}"), now),
                (format!("behind-{n}"), now - 1),
            ] {
                assert_eq!(acquire(&mut q, s, &r, t).await.decision(), NEW, "{r}");
                last.insert(r, t);
            }
            // The 7-day count there: the 30-day one may have lost users trimmed at `now`.
            let i = inspect(&mut a, sender(s), now - 1).await;
            assert_eq!(i.unique_7d, count(&last, now - 1 - 7 * DAY), "behind {now}");
        }
    }
}

async fn a_released_reservation_does_not_make_the_count_cross_the_upgrade_threshold(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    // At a 250 sender, x is the 125th user: its slot projects 1K from day 2 10:00. Released, it
    // no longer counts, and the projection goes with it; y, kept, is the 125th again.
    let s = "threshold";
    assert_all(&batch(&mut q, s, &users("a", 124), day(1, 9, 0)).await, NEW);
    let r = acquire(&mut q, s, "x", day(1, 10, 0)).await;
    let i = inspect(&mut a, sender(s), day(1, 10, 0)).await;
    assert_eq!(
        (i.unique_7d, projection(&i)),
        (125, Some((Tier::Tier1k, Some(day(2, 10, 0)), None)))
    );
    assert!(release(&mut q, s, "x", &r.reservation, day(1, 10, 30)).await);
    let i = inspect(&mut a, sender(s), day(1, 10, 30)).await;
    assert_eq!((i.unique_7d, projection(&i)), (124, None));
    let y = acquire(&mut q, s, "y", day(1, 11, 0)).await;
    assert_decision(&y, NEW);
    let i = inspect(&mut a, sender(s), day(1, 11, 0)).await;
    assert_eq!(
        projection(&i),
        Some((Tier::Tier1k, Some(day(2, 11, 0)), None))
    );
    // With the bar already passed, releasing the user that crossed it moves the crossing to the
    // moment the bar was reached without it (z at 12:00). ReportFailure releases the same way.
    assert_decision(&acquire(&mut q, s, "z", day(1, 12, 0)).await, NEW);
    let i = inspect(&mut a, sender(s), day(1, 12, 0)).await;
    assert_eq!(
        (i.unique_7d, projection(&i)),
        (126, Some((Tier::Tier1k, Some(day(2, 11, 0)), None)))
    );
    let (released, hold) =
        report_failure(&mut q, s, "y", &y.reservation, 131026, day(1, 12, 30)).await;
    assert_eq!((released, hold), (true, None));
    let i = inspect(&mut a, sender(s), day(1, 12, 30)).await;
    assert_eq!(
        (i.unique_7d, projection(&i)),
        (125, Some((Tier::Tier1k, Some(day(2, 12, 0)), None)))
    );
}

// ------------------------------------------------------------------ 9. auto tier

async fn auto_tier_applies_the_projected_upgrade_at_its_moment_and_not_before(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "auto";
    let p = Policy {
        auto_tier: true,
        ..tier(Tier::Tier1k)
    };
    put_policy_at(&mut a, sender(s), p, day(1, 0, 0)).await;

    // Day 1: 499 at 09:00, the 500th at 15:00: 10K from day 2 15:00.
    assert_all(&batch(&mut q, s, &users("a", 499), day(1, 9, 0)).await, NEW);
    assert_decision(&acquire(&mut q, s, "a-500", day(1, 15, 0)).await, NEW);
    // Day 2 08:00: 500 more fill the 1K window.
    let rs = batch(&mut q, s, &users("b", 500), day(2, 8, 0)).await;
    assert_all(&rs, NEW);
    assert_eq!((rs[499].used, rs[499].remaining), (1000, 0));
    // Day 2 10:00: the 499 09:00 slots are gone; 499 more fit, the 500th does not.
    let rs = batch(&mut q, s, &users("c", 500), day(2, 10, 0)).await;
    assert_all(&rs[..499], NEW);
    assert_denied_limit(&rs[499], 5 * HOUR);
    assert_eq!((rs[499].used, rs[499].tier()), (1000, Tier::Tier1k));
    // Just before the upgrade: still 1K, full.
    let before = day(2, 15, 0) - 1;
    let i = inspect(&mut a, sender(s), before).await;
    assert_eq!(
        (i.policy.as_ref().unwrap().tier(), i.limit, i.used),
        (Tier::Tier1k, 1000, 1000)
    );
    assert_eq!(
        projection(&i),
        Some((Tier::Tier10k, Some(day(2, 15, 0)), None))
    );
    let r = acquire(&mut q, s, "late", before).await;
    assert_denied_limit(&r, 1);
    assert_eq!((r.tier(), r.limit, r.used), (Tier::Tier1k, 1000, 1000));
    // From day 2 15:00 the tier is 10K: after the day-1 15:00 slot frees (999 live), two new
    // users make 1,001 live slots.
    let rs = batch(&mut q, s, &["late", "later"], day(2, 15, 0)).await;
    assert_answer(&rs[0], NEW, 1000, 9000);
    assert_answer(&rs[1], NEW, 1001, 8999);
    for r in &rs {
        assert_eq!((r.tier(), r.limit), (Tier::Tier10k, 10_000));
    }
    let i = inspect(&mut a, sender(s), day(2, 15, 0)).await;
    assert_eq!(i.policy.as_ref().unwrap().tier(), Tier::Tier10k);
    assert_eq!(
        i.sender_policy, i.policy,
        "an unassigned sender's own policy decides"
    );
    assert_eq!((i.limit, i.used, projection(&i)), (10_000, 1001, None));

    // A portfolio with auto_tier: 6 h after the crossing, for every member.
    assign_at(&mut a, "pm", "ap", day(1, 0, 0)).await;
    let p = Policy {
        auto_tier: true,
        quality: Quality::Green as i32,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, portfolio("ap"), p, day(1, 0, 0)).await;
    assert_all(
        &batch(&mut q, "pm", &users("p", 125), day(1, 9, 0)).await,
        NEW,
    );
    let r = acquire(&mut q, "pm", "q1", day(1, 15, 0) - 1).await;
    assert_eq!((r.tier(), r.limit), (Tier::Tier250, 250));
    let r = acquire(&mut q, "pm", "q2", day(1, 15, 0)).await;
    assert_eq!(
        (r.tier(), r.limit, r.scope()),
        (Tier::Tier2k, 2000, Scope::Portfolio)
    );
    let i = inspect(&mut a, portfolio("ap"), day(1, 15, 0)).await;
    assert_eq!((i.policy.unwrap().tier(), i.limit), (Tier::Tier2k, 2000));
}

async fn auto_tier_drops_a_flagged_legacy_sender_one_tier_every_7_days(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "sinking";
    let p = Policy {
        auto_tier: true,
        ..status(Tier::Tier10k, SenderStatus::Flagged)
    };
    put_policy_at(&mut a, sender(s), p, day(1, 8, 0)).await;
    let i = inspect(&mut a, sender(s), day(1, 8, 0)).await;
    assert_eq!(
        projection(&i),
        Some((Tier::Tier1k, None, Some(day(8, 8, 0))))
    );
    let r = acquire(&mut q, s, "a", day(8, 8, 0) - 1).await;
    assert_eq!((r.tier(), r.limit), (Tier::Tier10k, 10_000));
    let r = acquire(&mut q, s, "b", day(8, 8, 0)).await;
    assert_eq!((r.tier(), r.limit), (Tier::Tier1k, 1000));
    let i = inspect(&mut a, sender(s), day(8, 8, 0)).await;
    assert_eq!(i.policy.as_ref().unwrap().tier(), Tier::Tier1k);
    assert_eq!(
        projection(&i),
        Some((Tier::Tier250, None, Some(day(15, 8, 0))))
    );
    // Still flagged 7 days later: down again.
    let r = acquire(&mut q, s, "c", day(15, 8, 0)).await;
    assert_eq!((r.tier(), r.limit), (Tier::Tier250, 250));
    let i = inspect(&mut a, sender(s), day(15, 8, 0)).await;
    assert_eq!(
        projection(&i),
        Some((Tier::Tier50, None, Some(day(22, 8, 0))))
    );
}

// ------------------------------------------------------------------ validation

async fn bad_policy_fields_are_refused_naming_the_field_and_change_nothing(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t = at(9, 0, 0, 0);
    let s = "valid";

    // Every field at its largest accepted value round-trips.
    let good = Policy {
        tier: Tier::Tier1k as i32,
        status: SenderStatus::Restricted as i32,
        quality: Quality::Yellow as i32,
        messages_per_second: 100_000,
        pair_interval: secs(86_400),
        pair_burst: 10_000,
        headroom_percent: 99,
        sender_cap: 7,
        marketing_cap: 10_000,
        marketing_cap_period: secs(90 * 86_400),
        rule_set: RuleSet::Portfolio as i32,
        auto_tier: true,
        ..Default::default()
    };
    let stored = put_policy_at(&mut a, sender(s), good, t).await;
    assert_eq!(
        Policy {
            window_mode: 0,
            ..stored
        },
        good
    );
    let i = inspect(&mut a, sender(s), t).await;
    assert_eq!(i.sender_policy.as_ref(), Some(&stored));
    assert_eq!(i.policy.as_ref(), Some(&stored));

    let bad: Vec<(&str, Policy)> = vec![
        ("policy.status", Policy { status: 99, ..good }),
        (
            "policy.quality",
            Policy {
                quality: 99,
                ..good
            },
        ),
        (
            "policy.rule_set",
            Policy {
                rule_set: 99,
                ..good
            },
        ),
        (
            "policy.messages_per_second",
            Policy {
                messages_per_second: 100_001,
                ..good
            },
        ),
        (
            "policy.pair_burst",
            Policy {
                pair_burst: 10_001,
                ..good
            },
        ),
        (
            "policy.headroom_percent",
            Policy {
                headroom_percent: 100,
                ..good
            },
        ),
        (
            "policy.marketing_cap",
            Policy {
                marketing_cap: 10_001,
                ..good
            },
        ),
        (
            "policy.pair_interval",
            Policy {
                pair_interval: secs(0),
                ..good
            },
        ),
        (
            "policy.pair_interval",
            Policy {
                pair_interval: secs(-1),
                ..good
            },
        ),
        (
            "policy.pair_interval",
            Policy {
                pair_interval: secs(86_401),
                ..good
            },
        ),
        (
            "policy.marketing_cap_period",
            Policy {
                marketing_cap_period: secs(0),
                ..good
            },
        ),
        (
            "policy.marketing_cap_period",
            Policy {
                marketing_cap_period: secs(-60),
                ..good
            },
        ),
        (
            "policy.marketing_cap_period",
            Policy {
                marketing_cap_period: secs(90 * 86_400 + 1),
                ..good
            },
        ),
    ];
    // On a portfolio, a sender's own settings are refused: they would never be read.
    let sender_only = [
        "policy.messages_per_second",
        "policy.pair_burst",
        "policy.marketing_cap",
        "policy.pair_interval",
        "policy.marketing_cap_period",
    ];
    for (field, p) in bad {
        assert_invalid(try_put_policy_at(&mut a, sender(s), p, t).await, field);
        if !sender_only.contains(&field) {
            assert_invalid(
                try_put_policy_at(&mut a, portfolio("pf"), window_only(p), t).await,
                field,
            );
        }
    }
    let base = window_only(good);
    for (field, p) in [
        (
            "policy.messages_per_second",
            Policy {
                messages_per_second: 5,
                ..base
            },
        ),
        (
            "policy.pair_interval",
            Policy {
                pair_interval: secs(60),
                ..base
            },
        ),
        (
            "policy.pair_burst",
            Policy {
                pair_burst: 3,
                ..base
            },
        ),
        (
            "policy.sender_cap",
            Policy {
                sender_cap: 10,
                ..base
            },
        ),
        (
            "policy.marketing_cap",
            Policy {
                marketing_cap: 2,
                ..base
            },
        ),
        (
            "policy.marketing_cap_period",
            Policy {
                marketing_cap_period: secs(3600),
                ..base
            },
        ),
    ] {
        let err = try_put_policy_at(&mut a, portfolio("pf"), p, t)
            .await
            .unwrap_err();
        assert!(
            err.message().contains("has no effect on a portfolio"),
            "{err:?}"
        );
        assert_invalid(Err::<(), _>(err), field);
    }
    put_policy_at(&mut a, portfolio("pf-ok"), base, t).await;
    let i = inspect(&mut a, sender(s), t + 1).await;
    assert_eq!(i.sender_policy.as_ref(), Some(&stored), "nothing changed");
    let i = inspect(&mut a, portfolio("pf"), t + 1).await;
    assert_eq!(i.policy.unwrap().tier(), Tier::Tier250, "nothing stored");

    // An unknown category.
    let res = q
        .acquire(AcquireRequest {
            sender: "x".into(),
            recipient: "u".into(),
            category: 99,
            at: Some(ts(t)),
            ..Default::default()
        })
        .await;
    assert_invalid(res, "category");
    let res = q
        .acquire_batch(AcquireBatchRequest {
            sender: "x".into(),
            recipients: vec!["u".into()],
            category: 99,
            at: Some(ts(t)),
            ..Default::default()
        })
        .await;
    assert_invalid(res, "category");
    assert_eq!(inspect(&mut a, sender("x"), t).await.used, 0);

    // A reservation that waquota did not issue.
    let res = q
        .confirm(ConfirmRequest {
            sender: "x".into(),
            recipient: "u".into(),
            reservation: "nonsense".into(),
            delivered_at: Some(ts(t)),
            at: Some(ts(t)),
        })
        .await;
    assert_invalid(res, "reservation");
    let res = q
        .report_failure(waquota::proto::ReportFailureRequest {
            sender: "x".into(),
            recipient: "u".into(),
            reservation: "nonsense".into(),
            error_code: 131049,
            at: Some(ts(t)),
        })
        .await;
    assert_invalid(res, "reservation");
    // ... which held nothing.
    assert_decision(
        &acquire_category(&mut q, "x", "u", Category::Marketing, t).await,
        NEW,
    );
}

// ------------------------------------------------------------------ regressions

async fn resetting_a_portfolio_frees_the_caps_of_senders_that_left_it(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    // A opens a slot in P under a cap of 1, leaves, P is reset, A comes back: its share is empty.
    let t = at(9, 0, 0, 0);
    assign(&mut a, "A", "P").await;
    put_policy_at(
        &mut a,
        sender("A"),
        Policy {
            sender_cap: 1,
            ..tier(Tier::Tier250)
        },
        t,
    )
    .await;
    assert_decision(&acquire(&mut q, "A", "u1", t).await, NEW);
    assign(&mut a, "A", "").await;
    reset(&mut a, portfolio("P"), t).await.expect("reset");
    assign(&mut a, "A", "P").await;
    let r = acquire(&mut q, "A", "u2", t).await;
    assert_decision(&r, NEW);
    assert_eq!(r.used, 1);
}

async fn confirm_with_a_clock_behind_the_reservation_keeps_the_slot(b: Backend) {
    let srv = TestServer::start(b).await;
    let mut q = srv.quota().await;
    // A trusted clock may ask about a moment before the reservation: delivery clamps to the
    // reservation's time and the slot keeps its expiry (no failure, no shorter slot).
    let t = at(9, 0, 0, 0);
    let r = acquire(&mut q, "s", "u", t).await;
    let until = confirm(&mut q, "s", "u", &r.reservation, Some(t), t - 1000)
        .await
        .expect("confirm");
    assert_eq!(until, t + DAY);
}

async fn retry_after_waits_for_every_refusal_not_only_the_reported_one(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    // A user whose marketing is held until D+1 12:00, behind a window whose slot frees at D+1
    // 09:00: the limit is reported (first in the order), but a retry at 09:00 would meet the
    // hold, so retry_after runs to the end of the hold (docs/contract.md, "Which refusal is
    // reported": when the same request would be admitted).
    let s = "both";
    let mk = Category::Marketing;
    let one = Policy {
        custom_limit: 1,
        ..tier(Tier::Tier250)
    };
    put_policy_at(&mut a, sender(s), one, at(8, 0, 0, 0)).await;
    assert_decision(&acquire(&mut q, s, "w", at(9, 0, 0, 0)).await, NEW);
    let (released, hold) = report_failure(&mut q, s, "u", "", 131049, at(12, 0, 0, 0)).await;
    assert!(!released);
    assert_eq!(hold, Some(at(12, 0, 0, 0) + DAY));
    // 13:00: the window frees in 20 h, the hold ends in 23 h.
    let r = acquire_category(&mut q, s, "u", mk, at(13, 0, 0, 0)).await;
    assert_denied(&r, LIMIT, 23 * HOUR);
    // A utility message to u is not held: only the window's 20 h.
    let r = acquire_category(&mut q, s, "u", Category::Utility, at(13, 0, 0, 0)).await;
    assert_denied(&r, LIMIT, 20 * HOUR);
}

/// A sender that keeps pair-rate state and service windows for hundreds of users at once (the
/// Redis ledger splits each of those sets into parts as it grows): every user's state is found
/// by every decision and by Inspect, and moves with the sender to a portfolio and back.
async fn pair_rates_and_service_windows_of_hundreds_of_users_hold_across_assignments(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "many";
    let t0 = at(9, 0, 0, 0);
    // One message per user per hour; throughput and the window out of the way.
    let p = Policy {
        pair_interval: secs(3_600),
        pair_burst: 1,
        messages_per_second: 1_000,
        ..tier(Tier::Unlimited)
    };
    put_policy_at(&mut a, sender(s), p, t0 - HOUR).await;
    put_policy_at(&mut a, portfolio("P"), tier(Tier::Unlimited), t0 - HOUR).await;
    let counted = users("u", 600);
    let talkers = users("c", 600);
    // 600 users write in, 10 ms apart from 08:00: 600 service windows.
    let wrote = |k: usize| t0 - HOUR + k as i64 * 10;
    for (k, c) in talkers.iter().enumerate() {
        assert_eq!(inbound(&mut q, s, c, wrote(k)).await, wrote(k) + DAY);
    }
    // 600 other users get a template, 100 a second from 09:00: 600 pair states.
    let sent = |k: usize| t0 + (k / 100) as i64 * 1_000;
    for k in (0..600).step_by(100) {
        let rs = batch(&mut q, s, &counted[k..k + 100], sent(k)).await;
        assert_all(&rs, NEW);
    }
    // Each talker once at 09:00:10: free, in its service window (and now in the pair state too).
    let t1 = t0 + 10_000;
    for k in (0..600).step_by(100) {
        assert_all(&batch(&mut q, s, &talkers[k..k + 100], t1).await, SERVICE);
    }

    // The same state, found from the sender's own home, then from P's, then from its own again.
    let check = |home: &'static str, now: i64| {
        let (counted, talkers) = (counted.clone(), talkers.clone());
        let srv = &srv;
        async move {
            let (mut q, mut a) = (srv.quota().await, srv.admin().await);
            for k in (0..600).step_by(100) {
                let rs = batch(&mut q, s, &counted[k..k + 100], now).await;
                for (j, r) in rs.iter().enumerate() {
                    assert_denied(r, PAIR, sent(k + j) + HOUR - now);
                }
                let rs = batch(&mut q, s, &talkers[k..k + 100], now).await;
                for r in &rs {
                    assert_denied(r, PAIR, t1 + HOUR - now);
                }
            }
            for (k, c) in talkers.iter().enumerate() {
                let i = inspect_recipient(&mut a, sender(s), c, now).await;
                assert_eq!(
                    opt_ms(&i.service_window_until),
                    Some(wrote(k) + DAY),
                    "{home}: {c}"
                );
            }
            let i = inspect(&mut a, sender(s), now).await;
            assert_eq!(i.open_service_windows, 600, "{home}");
        }
    };
    check("own home", t1 + 1_000).await;
    assign(&mut a, s, "P").await;
    check("portfolio", t1 + 2_000).await;
    assign(&mut a, s, "").await;
    check("own home again", t1 + 3_000).await;

    // An hour after each user's message, each may have the next (a second's worth of throughput
    // for each half).
    let later = t1 + HOUR;
    for k in (0..600).step_by(100) {
        assert_all(
            &batch(&mut q, s, &counted[k..k + 100], later).await,
            COUNTED,
        );
    }
    for k in (0..600).step_by(100) {
        let rs = batch(&mut q, s, &talkers[k..k + 100], later + 1_000).await;
        assert_all(&rs, SERVICE);
    }
    // Those writes dropped the dead entries as they went (and the Redis ledger merged parts
    // back as they emptied): the new pair states are all found.
    let now = later + 2_000;
    for k in (0..600).step_by(100) {
        for r in batch(&mut q, s, &counted[k..k + 100], now).await {
            assert_denied(&r, PAIR, later + HOUR - now);
        }
        for r in batch(&mut q, s, &talkers[k..k + 100], now).await {
            assert_denied(&r, PAIR, later + 1_000 + HOUR - now);
        }
    }
    // An hour on, all of that is dead. 40 new users, one message each 100 ms apart: each write
    // drops dead entries (and the Redis ledger's set shrinks back to fewer parts); every one of
    // the 40 is then still found.
    let end = later + 1_000 + HOUR;
    let fresh = users("z", 40);
    for (k, z) in fresh.iter().enumerate() {
        assert_decision(&acquire(&mut q, s, z, end + k as i64 * 100).await, NEW);
    }
    let now = end + 5_000;
    for (k, z) in fresh.iter().enumerate() {
        let r = acquire(&mut q, s, z, now).await;
        assert_denied(&r, PAIR, end + k as i64 * 100 + HOUR - now);
    }
}
