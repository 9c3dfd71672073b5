//! The conformance suite: every behaviour of the core (docs/contract.md, "Semantics"),
//! written once and run against every ledger (in memory, Redis, Redis Cluster) through the public
//! gRPC contract, on the trusted clock. Times are on the test day D; every decision, count, expiry
//! and retry_after is checked to the millisecond.

#[macro_use]
mod common;

use common::dsl::*;
use common::{Backend, DAY, HOUR, MINUTE, TestServer, at, ms_of, ts};
use tonic::Code;
use waquota::model::MAX_ABS_MS;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, AssignSenderRequest, Decision,
    InspectRequest, ListWindowRequest, MessageKind, Policy, PutPolicyRequest, RecordInboundRequest,
    ReleaseRequest, ResetRequest, Scope, Tier, WindowMode,
};

on_every_ledger!(
    tier_250_refuses_the_251st_user_until_the_earliest_slot_frees,
    counted_delivery_keeps_a_conversation_slot_and_extends_a_rolling_one,
    service_window_admits_any_message_uncounted_even_when_the_window_is_full,
    free_form_needs_an_open_service_window_of_that_sender,
    free_entry_point_lasts_72_hours_and_is_never_shortened,
    portfolio_window_is_shared_by_its_senders,
    release_frees_only_the_slot_its_reservation_opened,
    bad_quota_requests_are_refused_naming_the_field_and_change_nothing,
    bad_admin_requests_are_refused_naming_the_field_and_change_nothing,
    untrusted_clock_refuses_at_and_decides_on_the_real_clock,
    phone_forms_of_one_number_are_one_user,
    batch_decides_in_order_and_admits_as_many_new_users_as_fit,
    dry_run_answers_what_the_real_call_answers_and_changes_nothing,
    tier_and_custom_limit_set_the_limit,
    unknown_sender_gets_the_configured_default_policy,
    policy_change_applies_to_the_next_request_and_keeps_the_window,
    assignment_keeps_own_slots_and_moves_service_windows,
    sender_moves_from_one_portfolio_to_another,
    slot_expires_exactly_at_expires_at,
    inspect_reports_usage_next_free_slot_and_recipient_state,
    list_window_pages_in_listing_order_without_repeats,
    reset_clears_a_window_but_refuses_an_assigned_sender,
    replayed_clocks_far_in_the_past_or_future_keep_state,
    a_large_window_counts_lists_and_frees_exactly_as_it_grows_and_shrinks,
    numbers_beyond_their_bounds_are_refused_and_change_nothing,
    durations_finer_than_a_millisecond_are_refused_and_change_nothing,
    at_is_accepted_to_its_first_and_last_millisecond_and_refused_beyond,
    phone_forms_that_are_not_numbers_are_refused_naming_the_offending_character,
);

const NEW: Decision = Decision::AllowedNew;
const COUNTED: Decision = Decision::AllowedCounted;
const SERVICE: Decision = Decision::AllowedServiceWindow;
const OUTSIDE: Decision = Decision::DeniedOutsideServiceWindow;

fn conversation(tier: Tier, custom_limit: u64) -> Policy {
    policy(tier, custom_limit, WindowMode::Conversation)
}

fn rolling(tier: Tier, custom_limit: u64) -> Policy {
    policy(tier, custom_limit, WindowMode::Rolling)
}

/// Checks a run of fresh admissions: NEW, running used/remaining from `used_before`, slot of 24 h.
#[track_caller]
fn assert_all_new(rs: &[AcquireResponse], used_before: u64, limit: u64, now: i64) {
    for (i, r) in rs.iter().enumerate() {
        let used = used_before + i as u64 + 1;
        assert_answer(r, NEW, used, limit.saturating_sub(used));
        assert_eq!(r.limit, limit);
        assert_eq!(expires(r), now + DAY, "{r:?}");
        assert!(
            !r.reservation.is_empty(),
            "a new slot comes with a reservation: {r:?}"
        );
    }
}

// ------------------------------------------------------------------ §1.1 the messaging limit

async fn tier_250_refuses_the_251st_user_until_the_earliest_slot_frees(b: Backend) {
    let srv = TestServer::start(b).await;
    let mut q = srv.quota().await;
    let s = "15550001";

    let r = batch(&mut q, s, &users("nine", 100), at(9, 0, 0, 0)).await;
    assert_all_new(&r, 0, 250, at(9, 0, 0, 0));
    for x in &r {
        assert_eq!(x.tier(), Tier::Tier250);
        assert_eq!(x.scope(), Scope::Sender);
    }
    let r = batch(&mut q, s, &users("ten", 100), at(10, 0, 0, 0)).await;
    assert_all_new(&r, 100, 250, at(10, 0, 0, 0));
    let r = batch(&mut q, s, &users("eleven", 50), at(11, 0, 0, 0)).await;
    assert_all_new(&r, 200, 250, at(11, 0, 0, 0));

    // Full: the next user waits for the 09:00 slots, which free at D+1 09:00.
    let r = acquire(&mut q, s, "noon", at(12, 0, 0, 0)).await;
    assert_denied_limit(&r, 21 * HOUR);
    assert_eq!((r.used, r.remaining, r.limit), (250, 0, 250));

    // A moving window, not a calendar day: just after D+1 09:00 exactly 100 slots are free.
    let now = at(9, 0, 0, 1) + DAY;
    let r = batch(&mut q, s, &users("next", 101), now).await;
    assert_all_new(&r[..100], 150, 250, now);
    assert_denied_limit(&r[100], at(10, 0, 0, 0) + DAY - now);
    assert_eq!((r[100].used, r[100].remaining), (250, 0));
}

async fn counted_delivery_keeps_a_conversation_slot_and_extends_a_rolling_one(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);

    // Conversation (the default for senders): the slot ends 24 h after the first delivery.
    let s = "conv";
    assert_answer(&acquire(&mut q, s, "u", at(9, 0, 0, 0)).await, NEW, 1, 249);
    assert_answer(&acquire(&mut q, s, "v", at(10, 0, 0, 0)).await, NEW, 2, 248);
    let r = acquire(&mut q, s, "u", at(20, 0, 0, 0)).await;
    assert_answer(&r, COUNTED, 2, 248);
    assert_eq!(expires(&r), at(9, 0, 0, 0) + DAY);
    assert!(r.reservation.is_empty(), "nothing new was reserved: {r:?}");
    let i = inspect_recipient(&mut a, sender(s), "u", at(20, 0, 0, 0)).await;
    assert_eq!(opt_ms(&i.counted_until), Some(at(9, 0, 0, 0) + DAY));
    assert_answer(
        &acquire(&mut q, s, "u", at(9, 0, 0, 0) + DAY).await,
        NEW,
        2,
        248,
    );

    // Rolling: every counted delivery moves the slot to + 24 h.
    let s = "roll";
    let stored = put_policy(&mut a, sender(s), rolling(Tier::Tier250, 0)).await;
    assert_eq!(window_part(&stored), rolling(Tier::Tier250, 0));
    assert_answer(&acquire(&mut q, s, "u", at(9, 0, 0, 0)).await, NEW, 1, 249);
    assert_answer(&acquire(&mut q, s, "v", at(10, 0, 0, 0)).await, NEW, 2, 248);
    let r = acquire(&mut q, s, "u", at(20, 0, 0, 0)).await;
    assert_answer(&r, COUNTED, 2, 248);
    assert_eq!(expires(&r), at(20, 0, 0, 0) + DAY);
    let i = inspect_recipient(&mut a, sender(s), "u", at(20, 0, 0, 0)).await;
    assert_eq!(opt_ms(&i.counted_until), Some(at(20, 0, 0, 0) + DAY));
    // A message inside a service window is not a counted delivery: it does not extend the slot.
    inbound(&mut q, s, "v", at(20, 30, 0, 0)).await;
    assert_decision(&acquire(&mut q, s, "v", at(21, 0, 0, 0)).await, SERVICE);
    let i = inspect_recipient(&mut a, sender(s), "v", at(21, 0, 0, 0)).await;
    assert_eq!(opt_ms(&i.counted_until), Some(at(10, 0, 0, 0) + DAY));
    // Still held after its first 24 h; extended again.
    let later = at(19, 59, 59, 999) + DAY;
    let r = acquire(&mut q, s, "u", later).await;
    assert_answer(&r, COUNTED, 1, 249); // v's slot ended at D+1 10:00
    assert_eq!(expires(&r), later + DAY);

    // Rolling and full: once the earliest slot is extended, a refusal waits for the next one.
    let s = "roll2";
    put_policy(&mut a, sender(s), rolling(Tier::Tier250, 2)).await;
    acquire(&mut q, s, "a", at(9, 0, 0, 0)).await;
    acquire(&mut q, s, "b", at(10, 0, 0, 0)).await;
    let r = batch(&mut q, s, &["a", "c"], at(11, 0, 0, 0)).await;
    assert_answer(&r[0], COUNTED, 2, 0);
    assert_eq!(expires(&r[0]), at(11, 0, 0, 0) + DAY);
    assert_denied_limit(&r[1], at(10, 0, 0, 0) + DAY - at(11, 0, 0, 0));
}

// ------------------------------------------------------------------ §1.2 service windows

async fn service_window_admits_any_message_uncounted_even_when_the_window_is_full(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "csw";
    let r = batch(&mut q, s, &users("full", 250), at(9, 0, 0, 0)).await;
    assert_eq!(r[249].used, 250);

    assert_eq!(
        inbound(&mut q, s, "u", at(13, 0, 0, 0)).await,
        at(13, 0, 0, 0) + DAY
    );
    let r = free_form(&mut q, s, "u", at(13, 5, 0, 0)).await;
    assert_answer(&r, SERVICE, 250, 0);
    assert_eq!(expires(&r), at(13, 0, 0, 0) + DAY);
    assert!(r.reservation.is_empty());
    let r = acquire(&mut q, s, "u", at(14, 0, 0, 0)).await;
    assert_answer(&r, SERVICE, 250, 0);
    assert_eq!(expires(&r), at(13, 0, 0, 0) + DAY);

    let i = inspect_recipient(&mut a, sender(s), "u", at(14, 0, 0, 0)).await;
    assert_eq!((i.used, i.remaining, i.open_service_windows), (250, 0, 1));
    assert_eq!(
        opt_ms(&i.counted_until),
        None,
        "a service-window message counts nothing"
    );
    assert_eq!(opt_ms(&i.service_window_until), Some(at(13, 0, 0, 0) + DAY));

    // The window is closed at exactly its end, and after.
    assert_decision(
        &free_form(&mut q, s, "u", at(13, 0, 0, 0) + DAY).await,
        OUTSIDE,
    );
    let r = free_form(&mut q, s, "u", at(13, 0, 1, 0) + DAY).await;
    assert_decision(&r, OUTSIDE);
    assert!(r.reservation.is_empty());

    // Had the user written again at D+1 12:00, the window would run to D+2 12:00.
    inbound(&mut q, s, "w", at(13, 0, 0, 0)).await;
    assert_eq!(
        inbound(&mut q, s, "w", at(12, 0, 0, 0) + DAY).await,
        at(12, 0, 0, 0) + 2 * DAY
    );
    let r = free_form(&mut q, s, "w", at(13, 0, 1, 0) + DAY).await;
    assert_decision(&r, SERVICE);
    assert_eq!(expires(&r), at(12, 0, 0, 0) + 2 * DAY);
}

async fn free_form_needs_an_open_service_window_of_that_sender(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);

    // No window at all: refused, and the refusal consumed nothing.
    let r = free_form(&mut q, "s1", "x", at(9, 0, 0, 0)).await;
    assert_answer(&r, OUTSIDE, 0, 250);
    assert!(r.reservation.is_empty());
    assert_eq!(inspect(&mut a, sender("s1"), at(9, 0, 0, 0)).await.used, 0);
    assert_answer(
        &acquire(&mut q, "s1", "x", at(9, 1, 0, 0)).await,
        NEW,
        1,
        249,
    );

    // Holding a slot does not allow free-form: only a service window does.
    assert_answer(
        &free_form(&mut q, "s1", "x", at(9, 2, 0, 0)).await,
        OUTSIDE,
        1,
        249,
    );

    // A service window is the (sender, user) pair's: the user wrote to s1, not to s2.
    inbound(&mut q, "s1", "y", at(10, 0, 0, 0)).await;
    assert_decision(
        &free_form(&mut q, "s1", "y", at(10, 1, 0, 0)).await,
        SERVICE,
    );
    assert_decision(
        &free_form(&mut q, "s2", "y", at(10, 1, 0, 0)).await,
        OUTSIDE,
    );
    assert_answer(
        &acquire(&mut q, "s2", "y", at(10, 2, 0, 0)).await,
        NEW,
        1,
        249,
    );

    // A free-form batch: only recipients with an open service window pass; nothing is counted.
    let r = q
        .acquire_batch(AcquireBatchRequest {
            sender: "s1".into(),
            recipients: vec!["y".into(), "x".into(), "z".into()],
            kind: MessageKind::FreeForm as i32,
            dry_run: false,
            at: Some(ts(at(10, 3, 0, 0))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(decisions(&r), [SERVICE, OUTSIDE, OUTSIDE]);
    assert!(r.iter().all(|x| x.used == 1 && x.reservation.is_empty()));
    assert_eq!(inspect(&mut a, sender("s1"), at(10, 3, 0, 0)).await.used, 1);
}

async fn free_entry_point_lasts_72_hours_and_is_never_shortened(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "ads";

    assert_eq!(
        inbound_fep(&mut q, s, "u", at(10, 0, 0, 0)).await,
        at(10, 0, 0, 0) + 3 * DAY
    );
    // A normal message inside the longer free entry point does not cut it to 24 h.
    assert_eq!(
        inbound(&mut q, s, "u", at(11, 0, 0, 0)).await,
        at(10, 0, 0, 0) + 3 * DAY
    );
    let i = inspect_recipient(&mut a, sender(s), "u", at(11, 0, 0, 0)).await;
    assert_eq!(
        opt_ms(&i.service_window_until),
        Some(at(10, 0, 0, 0) + 3 * DAY)
    );

    let r = free_form(&mut q, s, "u", at(9, 59, 59, 999) + 3 * DAY).await;
    assert_answer(&r, SERVICE, 0, 250);
    assert_eq!(expires(&r), at(10, 0, 0, 0) + 3 * DAY);
    assert_decision(
        &free_form(&mut q, s, "u", at(10, 0, 0, 0) + 3 * DAY).await,
        OUTSIDE,
    );

    // A normal message near the end of a free entry point restarts a full 24 h.
    inbound_fep(&mut q, s, "v", at(10, 0, 0, 0)).await;
    assert_eq!(
        inbound(&mut q, s, "v", at(11, 0, 0, 0) + 2 * DAY).await,
        at(11, 0, 0, 0) + 3 * DAY
    );
    // And a free entry point opened inside a normal window lengthens it.
    inbound(&mut q, s, "w", at(10, 0, 0, 0)).await;
    assert_eq!(
        inbound_fep(&mut q, s, "w", at(11, 0, 0, 0)).await,
        at(11, 0, 0, 0) + 3 * DAY
    );
}

// ------------------------------------------------------------------ portfolios

async fn portfolio_window_is_shared_by_its_senders(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);

    // An unspecified window mode on a portfolio is rolling.
    let stored = put_policy(
        &mut a,
        portfolio("P"),
        policy(Tier::Tier250, 0, WindowMode::Unspecified),
    )
    .await;
    assert_eq!(window_part(&stored), rolling(Tier::Tier250, 0));
    assign(&mut a, "A", "P").await;
    assign(&mut a, "B", "P").await;

    let r = batch(&mut q, "A", &users("a", 200), at(9, 0, 0, 0)).await;
    assert_all_new(&r, 0, 250, at(9, 0, 0, 0));
    assert!(r.iter().all(|x| x.scope() == Scope::Portfolio));

    let r = batch(&mut q, "B", &users("b", 60), at(10, 0, 0, 0)).await;
    assert_all_new(&r[..50], 200, 250, at(10, 0, 0, 0));
    for x in &r[50..] {
        assert_denied_limit(x, at(9, 0, 0, 0) + DAY - at(10, 0, 0, 0));
        assert_eq!((x.used, x.remaining), (250, 0));
    }
    assert!(
        r.iter()
            .all(|x| x.scope() == Scope::Portfolio && x.tier() == Tier::Tier250)
    );

    // A user messaged by A and then by B holds one slot (rolling: B's delivery extends it).
    let r = acquire(&mut q, "B", "a-0000", at(10, 30, 0, 0)).await;
    assert_answer(&r, COUNTED, 250, 0);
    assert_eq!(expires(&r), at(10, 30, 0, 0) + DAY);
    assert_eq!(r.scope(), Scope::Portfolio);

    let i = inspect(&mut a, portfolio("P"), at(11, 0, 0, 0)).await;
    assert_eq!(i.scope(), Scope::Portfolio);
    assert_eq!((i.limit, i.used, i.remaining), (250, 250, 0));
    assert_eq!(i.senders, ["A", "B"]);
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(rolling(Tier::Tier250, 0))
    );
    assert_eq!(opt_ms(&i.next_slot_free_at), Some(at(9, 0, 0, 0) + DAY));

    let i = inspect(&mut a, sender("A"), at(11, 0, 0, 0)).await;
    assert_eq!(i.scope(), Scope::Portfolio);
    assert_eq!(i.portfolio, "P");
    assert_eq!((i.limit, i.used, i.remaining), (250, 250, 0));
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(rolling(Tier::Tier250, 0))
    );
    let i = inspect_recipient(&mut a, sender("B"), "a-0001", at(11, 0, 0, 0)).await;
    assert_eq!(
        (i.scope(), i.portfolio.as_str(), i.used),
        (Scope::Portfolio, "P", 250)
    );
    assert_eq!(
        opt_ms(&i.counted_until),
        Some(at(9, 0, 0, 0) + DAY),
        "A's slot, seen through B"
    );
}

// ------------------------------------------------------------------ release

async fn release_frees_only_the_slot_its_reservation_opened(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "rel";
    let used = |i: &waquota::proto::InspectResponse| (i.used, opt_ms(&i.counted_until));

    let r1 = acquire(&mut q, s, "u", at(9, 0, 0, 0)).await;
    assert_decision(&r1, NEW);
    let r1 = r1.reservation;
    let other = acquire(&mut q, s, "v", at(9, 0, 0, 0)).await.reservation;
    assert_ne!(r1, other, "every slot opening has its own reservation");

    // Not the reservation of this recipient's slot: refused, and nothing is freed.
    assert_invalid(
        try_release(&mut q, s, "v", &r1, at(9, 0, 30, 0)).await,
        "reservation",
    );
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "v", at(9, 0, 30, 0)).await),
        (2, Some(at(9, 0, 0, 0) + DAY))
    );

    // The send failed: the slot is freed and the user is new again.
    assert!(release(&mut q, s, "u", &r1, at(9, 1, 0, 0)).await);
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "u", at(9, 1, 0, 0)).await),
        (1, None)
    );
    // Idempotent: a second release finds nothing and changes nothing.
    assert!(!release(&mut q, s, "u", &r1, at(9, 2, 0, 0)).await);
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "u", at(9, 2, 0, 0)).await),
        (1, None)
    );

    let r2 = acquire(&mut q, s, "u", at(9, 3, 0, 0)).await;
    assert_answer(&r2, NEW, 2, 248);
    assert_eq!(expires(&r2), at(9, 3, 0, 0) + DAY);
    let r2 = r2.reservation;
    assert_ne!(r1, r2);
    // The old reservation cannot free the new slot.
    assert!(!release(&mut q, s, "u", &r1, at(9, 4, 0, 0)).await);
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "u", at(9, 4, 0, 0)).await),
        (2, Some(at(9, 3, 0, 0) + DAY))
    );

    // A later counted delivery touched the slot: the reservation can no longer free it.
    assert_answer(
        &acquire(&mut q, s, "u", at(9, 5, 0, 0)).await,
        COUNTED,
        2,
        248,
    );
    assert!(!release(&mut q, s, "u", &r2, at(9, 6, 0, 0)).await);
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "u", at(9, 6, 0, 0)).await),
        (2, Some(at(9, 3, 0, 0) + DAY))
    );

    // A message inside a service window is not a counted delivery: the reservation still frees.
    let r3 = acquire(&mut q, s, "y", at(9, 10, 0, 0)).await.reservation;
    inbound(&mut q, s, "y", at(9, 11, 0, 0)).await;
    assert_decision(&acquire(&mut q, s, "y", at(9, 12, 0, 0)).await, SERVICE);
    assert!(release(&mut q, s, "y", &r3, at(9, 13, 0, 0)).await);
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "y", at(9, 13, 0, 0)).await),
        (2, None)
    );

    // A slot that has already ended is not released.
    assert!(!release(&mut q, s, "v", &other, at(9, 0, 0, 0) + DAY).await);

    // A reservation waquota never issued is bad input.
    for bogus in ["", "not-a-reservation", "r", "r12", "x1.2", "r1.x"] {
        let res = q
            .release(ReleaseRequest {
                sender: s.into(),
                recipient: "u".into(),
                reservation: bogus.into(),
                at: Some(ts(at(9, 7, 0, 0))),
            })
            .await;
        assert_invalid(res, "reservation");
    }
    assert_eq!(
        used(&inspect_recipient(&mut a, sender(s), "u", at(9, 7, 0, 0)).await),
        (2, Some(at(9, 3, 0, 0) + DAY))
    );
}

// ------------------------------------------------------------------ §2.5 bad input

async fn bad_quota_requests_are_refused_naming_the_field_and_change_nothing(b: Backend) {
    let srv = TestServer::start_with(b, |s| s.max_batch = 5).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "good";
    let t = at(12, 0, 0, 0);
    acquire(&mut q, s, "held", at(9, 0, 0, 0)).await;
    inbound(&mut q, s, "wrote", at(10, 0, 0, 0)).await;
    let before = inspect(&mut a, sender(s), t).await;
    assert_eq!((before.used, before.open_service_windows), (1, 1));

    let long = "a".repeat(129);
    let long_digits = "4".repeat(129);
    let acq = |sender: &str, recipient: &str, kind: i32| AcquireRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        kind,
        dry_run: false,
        at: Some(ts(t)),
        ..Default::default()
    };
    let template = MessageKind::Template as i32;
    for bad in ["", "a{b", "a}b", "{good}", "a b", long.as_str(), "ü"] {
        assert_invalid(q.acquire(acq(bad, "fresh", template)).await, "sender");
    }
    for bad in [
        "",
        "a b",
        "49+151",
        "{x}",
        "+ - ()",
        long.as_str(),
        long_digits.as_str(),
    ] {
        assert_invalid(q.acquire(acq(s, bad, template)).await, "recipient");
    }
    assert_invalid(q.acquire(acq(s, "fresh", 99)).await, "kind");
    for bad_at in [
        prost_types::Timestamp {
            seconds: 1,
            nanos: 1_000_000_000,
        },
        prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        },
        prost_types::Timestamp {
            seconds: i64::MAX / 1000,
            nanos: 0,
        },
        // Year 9999: beyond 2255, microseconds would no longer be exact.
        prost_types::Timestamp {
            seconds: 253_402_041_600,
            nanos: 0,
        },
    ] {
        let req = AcquireRequest {
            at: Some(bad_at),
            ..acq(s, "fresh", template)
        };
        assert_invalid(q.acquire(req).await, "at");
    }
    assert_invalid(q.acquire(acq(s, "fresh", -1)).await, "kind");

    let bat = |sender: &str, recipients: &[&str], kind: i32| AcquireBatchRequest {
        sender: sender.into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        kind,
        dry_run: false,
        at: Some(ts(t)),
        ..Default::default()
    };
    assert_invalid(q.acquire_batch(bat(s, &[], template)).await, "recipients");
    // More than the configured maximum (5).
    assert_invalid(
        q.acquire_batch(bat(s, &["n1", "n2", "n3", "n4", "n5", "n6"], template))
            .await,
        "recipients",
    );
    // One bad recipient refuses the whole batch: nothing before it was admitted.
    assert_invalid(
        q.acquire_batch(bat(s, &["n1", "n2", "a b"], template))
            .await,
        "recipients",
    );
    assert_invalid(q.acquire_batch(bat(s, &["n1", "n2"], 99)).await, "kind");
    assert_invalid(
        q.acquire_batch(bat("a b", &["n1"], template)).await,
        "sender",
    );

    let rel = |sender: &str, recipient: &str| ReleaseRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        reservation: "r1.1".into(),
        at: Some(ts(t)),
    };
    assert_invalid(q.release(rel("", "held")).await, "sender");
    assert_invalid(q.release(rel(s, "{x}")).await, "recipient");

    let inb = |sender: &str, recipient: &str| RecordInboundRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        free_entry_point: false,
        at: Some(ts(t)),
    };
    assert_invalid(q.record_inbound(inb(s, "")).await, "recipient");
    assert_invalid(q.record_inbound(inb(s, "49+151")).await, "recipient");
    assert_invalid(q.record_inbound(inb("a}b", "fresh")).await, "sender");

    assert_eq!(
        inspect(&mut a, sender(s), t).await,
        before,
        "refused requests change nothing"
    );

    // The configured maximum itself is fine.
    let r = batch(&mut q, s, &["n1", "n2", "n3", "n4", "n5"], t).await;
    assert_all_new(&r, 1, 250, t);
}

async fn bad_admin_requests_are_refused_naming_the_field_and_change_nothing(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "good";
    let t = at(12, 0, 0, 0);
    put_policy(&mut a, sender(s), conversation(Tier::Tier1k, 7)).await;
    acquire(&mut q, s, "held", at(9, 0, 0, 0)).await;
    inbound(&mut q, s, "wrote", at(10, 0, 0, 0)).await;
    let before = inspect(&mut a, sender(s), t).await;
    assert_eq!(
        (before.used, before.open_service_windows, before.limit),
        (1, 1, 7)
    );

    let put = |target, policy| PutPolicyRequest {
        target,
        policy,
        at: None,
    };
    let raw = |tier: i32, window_mode: i32| {
        Some(Policy {
            tier,
            custom_limit: 0,
            window_mode,
            ..Default::default()
        })
    };
    assert_invalid(a.put_policy(put(sender(s), raw(99, 1))).await, "tier");
    assert_invalid(a.put_policy(put(sender(s), raw(-3, 1))).await, "tier");
    assert_invalid(
        a.put_policy(put(sender(s), raw(2, 99))).await,
        "window_mode",
    );
    assert_invalid(a.put_policy(put(None, raw(2, 1))).await, "target");
    let huge = Some(conversation(Tier::Tier250, 1_000_000_001));
    assert_invalid(a.put_policy(put(sender(s), huge)).await, "custom_limit");
    assert_invalid(a.put_policy(put(sender(s), None)).await, "policy");
    assert_invalid(a.put_policy(put(sender("a b"), raw(2, 1))).await, "sender");
    assert_invalid(
        a.put_policy(put(portfolio("{P}"), raw(2, 1))).await,
        "portfolio",
    );

    let assign_req = |sender: &str, portfolio: &str| AssignSenderRequest {
        create: true,
        sender: sender.into(),
        portfolio: portfolio.into(),
        at: None,
    };
    assert_invalid(a.assign_sender(assign_req("", "P")).await, "sender");
    assert_invalid(a.assign_sender(assign_req(s, "{P}")).await, "portfolio");
    assert_invalid(a.assign_sender(assign_req(s, "P Q")).await, "portfolio");

    let insp = |target, recipient: &str| InspectRequest {
        target,
        recipient: recipient.into(),
        at: Some(ts(t)),
    };
    assert_invalid(a.inspect(insp(None, "")).await, "target");
    assert_invalid(a.inspect(insp(sender(s), "a b")).await, "recipient");
    assert_invalid(a.inspect(insp(sender(""), "")).await, "sender");

    let list = |target, page_token: &str| ListWindowRequest {
        target,
        page_size: 7,
        page_token: page_token.into(),
        at: Some(ts(t)),
    };
    assert_invalid(a.list_window(list(None, "")).await, "target");
    for bad in [
        "garbage",
        "12",
        "x/held",
        "12/{x}",
        "/held",
        "12/",
        "9223372036854775807/zz",
    ] {
        assert_invalid(a.list_window(list(sender(s), bad)).await, "page_token");
    }

    assert_invalid(
        a.reset(ResetRequest {
            target: None,
            at: Some(ts(t)),
        })
        .await,
        "target",
    );
    assert_invalid(
        a.reset(ResetRequest {
            target: sender("a{b"),
            at: Some(ts(t)),
        })
        .await,
        "sender",
    );

    assert_eq!(
        inspect(&mut a, sender(s), t).await,
        before,
        "refused requests change nothing"
    );
    assert_eq!(inspect(&mut a, sender(s), t).await.portfolio, "");
}

async fn untrusted_clock_refuses_at_and_decides_on_the_real_clock(b: Backend) {
    let srv = TestServer::start_with(b, |s| s.trust_client_clock = false).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "live";
    let when = || Some(ts(at(9, 0, 0, 0)));

    let acq = |at| AcquireRequest {
        sender: s.into(),
        recipient: "u".into(),
        kind: 0,
        dry_run: false,
        at,
        ..Default::default()
    };
    assert_invalid(q.acquire(acq(when())).await, "at");
    let bat = AcquireBatchRequest {
        sender: s.into(),
        recipients: vec!["u".into()],
        kind: 0,
        dry_run: false,
        at: when(),
        ..Default::default()
    };
    assert_invalid(q.acquire_batch(bat).await, "at");
    let inb = |at| RecordInboundRequest {
        sender: s.into(),
        recipient: "w".into(),
        free_entry_point: false,
        at,
    };
    assert_invalid(q.record_inbound(inb(when())).await, "at");
    let rel = |reservation: &str, at| ReleaseRequest {
        sender: s.into(),
        recipient: "u".into(),
        reservation: reservation.into(),
        at,
    };
    assert_invalid(q.release(rel("r1.1", when())).await, "at");
    let insp = |at| InspectRequest {
        target: sender(s),
        recipient: "u".into(),
        at,
    };
    assert_invalid(a.inspect(insp(when())).await, "at");
    let put = PutPolicyRequest {
        target: sender(s),
        policy: Some(conversation(Tier::Tier50, 0)),
        at: when(),
    };
    assert_invalid(a.put_policy(put).await, "at");
    let asg = AssignSenderRequest {
        create: true,
        sender: s.into(),
        portfolio: "P".into(),
        at: when(),
    };
    assert_invalid(a.assign_sender(asg).await, "at");
    let list = ListWindowRequest {
        target: sender(s),
        page_size: 0,
        page_token: String::new(),
        at: when(),
    };
    assert_invalid(a.list_window(list).await, "at");
    assert_invalid(
        a.reset(ResetRequest {
            target: sender(s),
            at: when(),
        })
        .await,
        "at",
    );

    // Nothing above took effect.
    let i = a.inspect(insp(None)).await.unwrap().into_inner();
    assert_eq!(
        (
            i.used,
            i.open_service_windows,
            i.limit,
            i.portfolio.as_str()
        ),
        (0, 0, 250, "")
    );

    // Without `at`, the server's (Redis's) clock decides.
    let real_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let slack = 5_000;
    let t0 = real_now();
    let r = q.acquire(acq(None)).await.unwrap().into_inner();
    let t1 = real_now();
    assert_decision(&r, NEW);
    assert!(
        (t0 - slack..=t1 + slack).contains(&(expires(&r) - DAY)),
        "expires_at {} not 24 h after now {t0}",
        expires(&r)
    );
    let until = ms_of(
        &q.record_inbound(inb(None))
            .await
            .unwrap()
            .into_inner()
            .service_window_expires_at
            .unwrap(),
    );
    assert!((t0 - slack..=real_now() + slack).contains(&(until - DAY)));
    let i = a.inspect(insp(None)).await.unwrap().into_inner();
    assert_eq!((i.used, i.open_service_windows), (1, 1));
    let now = ms_of(i.now.as_ref().unwrap());
    assert!((t0 - slack..=real_now() + slack).contains(&now));
    assert!(
        q.release(rel(&r.reservation, None))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert_eq!(a.inspect(insp(None)).await.unwrap().into_inner().used, 0);
}

// ------------------------------------------------------------------ §1.5 identities

async fn phone_forms_of_one_number_are_one_user(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "norm";

    let r = acquire(&mut q, s, "+49 151 1234-5678", at(9, 0, 0, 0)).await;
    assert_answer(&r, NEW, 1, 249);
    assert_eq!(r.recipient, "4915112345678");
    let r = acquire(&mut q, s, "4915112345678", at(9, 1, 0, 0)).await;
    assert_answer(&r, COUNTED, 1, 249);
    assert_eq!(r.recipient, "4915112345678");
    let r = acquire(&mut q, s, "+49 (151) 1234.5678", at(9, 2, 0, 0)).await;
    assert_answer(&r, COUNTED, 1, 249);
    assert_eq!(r.recipient, "4915112345678");
    assert_eq!(expires(&r), at(9, 0, 0, 0) + DAY);

    // In a batch, two forms of one number are one user.
    let r = batch(
        &mut q,
        s,
        &["+1 (555) 010-0200", "15550100200"],
        at(9, 3, 0, 0),
    )
    .await;
    assert_eq!(decisions(&r), [NEW, COUNTED]);
    assert_eq!(
        (r[0].recipient.as_str(), r[1].recipient.as_str(), r[1].used),
        ("15550100200", "15550100200", 2)
    );

    // Service windows, inspection and release take any form too.
    inbound(&mut q, s, "+49 151 1234 5678", at(10, 0, 0, 0)).await;
    assert_decision(
        &free_form(&mut q, s, "4915112345678", at(10, 1, 0, 0)).await,
        SERVICE,
    );
    let i = inspect_recipient(&mut a, sender(s), "+49-151-1234-5678", at(10, 1, 0, 0)).await;
    assert_eq!(i.recipient, "4915112345678");
    assert_eq!(opt_ms(&i.counted_until), Some(at(9, 0, 0, 0) + DAY));
    assert_eq!(opt_ms(&i.service_window_until), Some(at(10, 0, 0, 0) + DAY));

    let fresh = acquire(&mut q, s, "+44 7700 900123", at(11, 0, 0, 0)).await;
    assert!(
        release(
            &mut q,
            s,
            "447700900123",
            &fresh.reservation,
            at(11, 1, 0, 0)
        )
        .await
    );
    assert_eq!(inspect(&mut a, sender(s), at(11, 1, 0, 0)).await.used, 2);

    // Opaque (business-scoped) ids are kept as given.
    let r = acquire(&mut q, s, "US.1349:ab_c-d", at(12, 0, 0, 0)).await;
    assert_eq!(
        (r.decision(), r.recipient.as_str()),
        (NEW, "US.1349:ab_c-d")
    );
}

// ------------------------------------------------------------------ AcquireBatch and dry runs

async fn batch_decides_in_order_and_admits_as_many_new_users_as_fit(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "bat";
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, 5)).await;
    acquire(&mut q, s, "c1", at(9, 0, 0, 0)).await;
    inbound(&mut q, s, "s1", at(9, 30, 0, 0)).await;

    let now = at(10, 0, 0, 0);
    let r = batch(
        &mut q,
        s,
        &[
            "n1", "c1", "n2", "s1", "n1", "n3", "n4", "n5", "c1", "n6", "s1",
        ],
        now,
    )
    .await;
    let expect = [
        (NEW, 2, 3),
        (COUNTED, 2, 3),
        (NEW, 3, 2),
        (SERVICE, 3, 2),
        (COUNTED, 3, 2), // the repeat holds the slot its first mention opened
        (NEW, 4, 1),
        (NEW, 5, 0),
        (Decision::DeniedLimit, 5, 0),
        (COUNTED, 5, 0), // counted recipients pass after refusals
        (Decision::DeniedLimit, 5, 0),
        (SERVICE, 5, 0),
    ];
    for (x, (d, used, remaining)) in r.iter().zip(expect) {
        assert_answer(x, d, used, remaining);
        assert_eq!((x.limit, x.scope()), (5, Scope::Sender));
    }
    for i in [0, 2, 5, 6] {
        assert_eq!(expires(&r[i]), now + DAY);
        assert!(!r[i].reservation.is_empty());
    }
    assert_eq!(expires(&r[1]), at(9, 0, 0, 0) + DAY);
    assert_eq!(expires(&r[4]), now + DAY);
    assert!(r[4].reservation.is_empty());
    assert_eq!(expires(&r[3]), at(9, 30, 0, 0) + DAY);
    assert_denied_limit(&r[7], at(9, 0, 0, 0) + DAY - now);
    assert_denied_limit(&r[9], at(9, 0, 0, 0) + DAY - now);
    let recipients: Vec<&str> = r.iter().map(|x| x.recipient.as_str()).collect();
    assert_eq!(
        recipients,
        [
            "n1", "c1", "n2", "s1", "n1", "n3", "n4", "n5", "c1", "n6", "s1"
        ]
    );
    assert_eq!(inspect(&mut a, sender(s), now).await.used, 5);

    // Refusals that only this batch's own slots can end wait for them.
    let s = "bat2";
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, 2)).await;
    let r = batch(&mut q, s, &["a", "b", "c", "a"], now).await;
    assert_eq!(decisions(&r), [NEW, NEW, Decision::DeniedLimit, COUNTED]);
    assert_denied_limit(&r[2], DAY);
}

async fn dry_run_answers_what_the_real_call_answers_and_changes_nothing(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "dry";
    put_policy(&mut a, sender(s), rolling(Tier::Tier250, 3)).await;
    acquire(&mut q, s, "c1", at(9, 0, 0, 0)).await;
    acquire(&mut q, s, "c2", at(10, 0, 0, 0)).await;
    inbound(&mut q, s, "s1", at(9, 30, 0, 0)).await;
    let now = at(12, 0, 0, 0);
    let before = inspect_recipient(&mut a, sender(s), "c1", now).await;
    let listing = list_pages(&mut a, sender(s), 0, now).await;

    let strip = |mut rs: Vec<AcquireResponse>| {
        rs.iter_mut().for_each(|r| r.reservation.clear());
        rs
    };
    let recipients = ["n1", "c1", "n2", "s1", "n1", "n3"];
    let dry = strip(dry_batch(&mut q, s, &recipients, now).await);
    assert_eq!(
        decisions(&dry),
        [
            NEW,
            COUNTED,
            Decision::DeniedLimit,
            SERVICE,
            COUNTED,
            Decision::DeniedLimit
        ]
    );
    assert_eq!(
        expires(&dry[1]),
        now + DAY,
        "rolling: the dry run extends c1 in its answer"
    );
    // c1 was extended by this batch, so the earliest slot is c2's.
    assert_denied_limit(&dry[2], at(10, 0, 0, 0) + DAY - now);
    let one = dry_acquire(&mut q, s, "n1", now).await;
    assert_answer(&one, NEW, 3, 0);

    assert_eq!(
        inspect_recipient(&mut a, sender(s), "c1", now).await,
        before,
        "a dry run changes nothing"
    );
    assert_eq!(list_pages(&mut a, sender(s), 0, now).await, listing);

    let real = strip(batch(&mut q, s, &recipients, now).await);
    assert_eq!(real, dry, "the real call answers what the dry run did");
    let after = inspect_recipient(&mut a, sender(s), "c1", now).await;
    assert_eq!(
        (after.used, opt_ms(&after.counted_until)),
        (3, Some(now + DAY))
    );

    // A dry run on a full window, then the real call.
    let dry = dry_acquire(&mut q, s, "n9", at(13, 0, 0, 0)).await;
    let real = acquire(&mut q, s, "n9", at(13, 0, 0, 0)).await;
    assert_eq!(dry, real);
    assert_denied_limit(&real, at(10, 0, 0, 0) + DAY - at(13, 0, 0, 0));
}

// ------------------------------------------------------------------ tiers and policy

async fn tier_and_custom_limit_set_the_limit(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let now = at(9, 0, 0, 0);

    put_policy(&mut a, sender("t50"), conversation(Tier::Tier50, 0)).await;
    let r = batch(&mut q, "t50", &users("u", 51), now).await;
    assert_all_new(&r[..50], 0, 50, now);
    assert_denied_limit(&r[50], DAY);
    assert!(r.iter().all(|x| x.tier() == Tier::Tier50 && x.limit == 50));

    // custom_limit overrides the tier's limit; the tier is still reported.
    let stored = put_policy(&mut a, sender("c3"), conversation(Tier::Tier250, 3)).await;
    assert_eq!(window_part(&stored), conversation(Tier::Tier250, 3));
    let r = batch(&mut q, "c3", &users("u", 5), now).await;
    assert_all_new(&r[..3], 0, 3, now);
    assert_denied_limit(&r[3], DAY);
    assert_denied_limit(&r[4], DAY);
    assert!(r.iter().all(|x| x.tier() == Tier::Tier250 && x.limit == 3));
    let i = inspect(&mut a, sender("c3"), now).await;
    assert_eq!((i.limit, i.used, i.remaining), (3, 3, 0));
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(conversation(Tier::Tier250, 3))
    );

    // Unlimited: limit 0, nothing is ever refused.
    put_policy(&mut a, sender("inf"), conversation(Tier::Unlimited, 0)).await;
    let r = batch(&mut q, "inf", &users("u", 1000), now).await;
    for (i, x) in r.iter().enumerate() {
        assert_answer(x, NEW, i as u64 + 1, 0);
        assert_eq!((x.limit, x.tier()), (0, Tier::Unlimited));
    }
    let i = inspect(&mut a, sender("inf"), now).await;
    assert_eq!((i.limit, i.used, i.remaining), (0, 1000, 0));

    // An unknown sender gets the default: TIER_250, conversation mode, its own window.
    let r = acquire(&mut q, "nobody", "u", now).await;
    assert_answer(&r, NEW, 1, 249);
    assert_eq!(
        (r.limit, r.tier(), r.scope()),
        (250, Tier::Tier250, Scope::Sender)
    );
    let i = inspect(&mut a, sender("nobody"), now).await;
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(conversation(Tier::Tier250, 0))
    );
    assert_eq!((i.scope(), i.limit), (Scope::Sender, 250));
    // An unknown portfolio's default: TIER_250, rolling.
    let i = inspect(&mut a, portfolio("nowhere"), now).await;
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(rolling(Tier::Tier250, 0))
    );
    assert_eq!((i.scope(), i.limit, i.used), (Scope::Portfolio, 250, 0));
}

async fn unknown_sender_gets_the_configured_default_policy(b: Backend) {
    let srv =
        TestServer::start_with(b, |s| s.defaults.sender.tier = waquota::model::Tier::T1K).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let r = acquire(&mut q, "nobody", "u", at(9, 0, 0, 0)).await;
    assert_answer(&r, NEW, 1, 999);
    assert_eq!((r.limit, r.tier()), (1000, Tier::Tier1k));
    let i = inspect(&mut a, sender("nobody"), at(9, 0, 0, 0)).await;
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(conversation(Tier::Tier1k, 0))
    );

    // TIER_UNSPECIFIED in PutPolicy is the configured default tier.
    let stored = put_policy(
        &mut a,
        sender("set"),
        policy(Tier::Unspecified, 0, WindowMode::Unspecified),
    )
    .await;
    assert_eq!(window_part(&stored), conversation(Tier::Tier1k, 0));
    assert_eq!(
        acquire(&mut q, "set", "u", at(9, 0, 0, 0)).await.limit,
        1000
    );
}

async fn policy_change_applies_to_the_next_request_and_keeps_the_window(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "pc";
    // Ten slots, ten minutes apart: u0 at 09:00 ... u9 at 10:30.
    for i in 0..10 {
        let r = acquire(&mut q, s, &format!("u{i}"), at(9, 10 * i, 0, 0)).await;
        assert_answer(&r, NEW, i as u64 + 1, 250 - i as u64 - 1);
    }

    // Down to 5 with 10 held: six slots must free first; the sixth frees at D+1 09:50.
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, 5)).await;
    let now = at(12, 0, 0, 0);
    let r = acquire(&mut q, s, "x", now).await;
    assert_denied_limit(&r, at(9, 50, 0, 0) + DAY - now);
    assert_eq!((r.limit, r.used, r.remaining), (5, 10, 0));
    assert_answer(&acquire(&mut q, s, "u3", now).await, COUNTED, 10, 0);
    let i = inspect(&mut a, sender(s), now).await;
    assert_eq!((i.limit, i.used, i.remaining), (5, 10, 0));
    // retry_after is exact: a millisecond earlier it is still refused.
    let r = acquire(&mut q, s, "x", at(9, 49, 59, 999) + DAY).await;
    assert_denied_limit(&r, 1);
    assert_eq!(r.used, 5);
    assert_answer(
        &acquire(&mut q, s, "x", at(9, 50, 0, 0) + DAY).await,
        NEW,
        5,
        0,
    );

    // Raised to 20: admitted at once, the held slots still held.
    let s = "pc2";
    for i in 0..10 {
        acquire(&mut q, s, &format!("u{i}"), at(9, 10 * i, 0, 0)).await;
    }
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, 5)).await;
    assert_decision(&acquire(&mut q, s, "x", now).await, Decision::DeniedLimit);
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, 20)).await;
    let r = acquire(&mut q, s, "x", now).await;
    assert_answer(&r, NEW, 11, 9);
    assert_eq!(r.limit, 20);
}

// ------------------------------------------------------------------ assignment

async fn assignment_keeps_own_slots_and_moves_service_windows(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "A";
    batch(&mut q, s, &["o1", "o2", "o3"], at(8, 0, 0, 0)).await;
    inbound(&mut q, s, "w", at(8, 30, 0, 0)).await;

    assign(&mut a, s, "P").await;
    let i = inspect(&mut a, sender(s), at(9, 0, 0, 0)).await;
    assert_eq!(
        (i.scope(), i.portfolio.as_str(), i.used),
        (Scope::Portfolio, "P", 0)
    );
    // The user who wrote to A before A joined P still has the service window.
    let r = free_form(&mut q, s, "w", at(9, 0, 0, 0)).await;
    assert_answer(&r, SERVICE, 0, 250);
    assert_eq!(
        (expires(&r), r.scope()),
        (at(8, 30, 0, 0) + DAY, Scope::Portfolio)
    );
    let i = inspect_recipient(&mut a, portfolio("P"), "w", at(9, 0, 0, 0)).await;
    assert_eq!(
        (i.open_service_windows, opt_ms(&i.service_window_until)),
        (1, Some(at(8, 30, 0, 0) + DAY))
    );
    // P's window decides now: A's own slots do not count there.
    let r = acquire(&mut q, s, "o1", at(9, 0, 0, 0)).await;
    assert_answer(&r, NEW, 1, 249);
    assert_eq!(r.scope(), Scope::Portfolio);
    // A portfolio without a stored policy is rolling: a counted delivery extends the slot.
    let r = acquire(&mut q, s, "o1", at(9, 30, 0, 0)).await;
    assert_answer(&r, COUNTED, 1, 249);
    assert_eq!(expires(&r), at(9, 30, 0, 0) + DAY);
    inbound(&mut q, s, "w2", at(9, 30, 0, 0)).await;
    // Assigning again to the same portfolio changes nothing.
    assign(&mut a, s, "P").await;
    let i = inspect(&mut a, portfolio("P"), at(9, 40, 0, 0)).await;
    assert_eq!(
        (i.senders.as_slice(), i.used, i.open_service_windows),
        (&["A".to_string()][..], 1, 2)
    );

    // Detached: A's own window comes back as it was, with every service window.
    assign(&mut a, s, "").await;
    let i = inspect(&mut a, sender(s), at(10, 0, 0, 0)).await;
    assert_eq!(
        (
            i.scope(),
            i.portfolio.as_str(),
            i.used,
            i.open_service_windows
        ),
        (Scope::Sender, "", 3, 2)
    );
    assert_eq!(opt_ms(&i.next_slot_free_at), Some(at(8, 0, 0, 0) + DAY));
    let r = acquire(&mut q, s, "o2", at(10, 0, 0, 0)).await;
    assert_answer(&r, COUNTED, 3, 247);
    assert_eq!(
        (expires(&r), r.scope()),
        (at(8, 0, 0, 0) + DAY, Scope::Sender)
    );
    assert_decision(&free_form(&mut q, s, "w2", at(10, 0, 0, 0)).await, SERVICE);
    // P keeps its slot, and no longer lists A.
    let i = inspect(&mut a, portfolio("P"), at(10, 0, 0, 0)).await;
    assert_eq!(i.used, 1);
    assert!(i.senders.is_empty(), "{:?}", i.senders);
    assert_eq!(i.open_service_windows, 0);

    // A sender's own policy is kept while it is away, and one set while away applies on return.
    let s = "B";
    put_policy(&mut a, sender(s), conversation(Tier::Tier50, 0)).await;
    assign(&mut a, s, "P").await;
    assert_eq!(acquire(&mut q, s, "x", at(11, 0, 0, 0)).await.limit, 250);
    assign(&mut a, s, "").await;
    assert_eq!(acquire(&mut q, s, "x", at(11, 0, 0, 0)).await.limit, 50);
    assign(&mut a, s, "P").await;
    put_policy(&mut a, sender(s), conversation(Tier::Tier1k, 0)).await;
    assert_eq!(
        acquire(&mut q, s, "x", at(11, 1, 0, 0)).await.limit,
        250,
        "P decides while assigned"
    );
    assign(&mut a, s, "").await;
    let r = acquire(&mut q, s, "x", at(11, 2, 0, 0)).await;
    assert_eq!(
        (r.limit, r.tier(), r.scope()),
        (1000, Tier::Tier1k, Scope::Sender)
    );

    // Detaching a sender that is not assigned is harmless.
    assign(&mut a, "C", "").await;
    assert_answer(
        &acquire(&mut q, "C", "x", at(11, 0, 0, 0)).await,
        NEW,
        1,
        249,
    );
    // A sender and a portfolio with the same id are different windows.
    assert_eq!(
        inspect(&mut a, portfolio("C"), at(11, 0, 0, 0)).await.used,
        0
    );
}

async fn sender_moves_from_one_portfolio_to_another(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    put_policy(&mut a, portfolio("acme:P1"), rolling(Tier::Tier250, 10)).await;
    put_policy(
        &mut a,
        portfolio("acme.P-2_b"),
        conversation(Tier::Tier250, 20),
    )
    .await;
    assign(&mut a, "A", "acme:P1").await;
    assign(&mut a, "B", "acme:P1").await;
    assert_answer(&acquire(&mut q, "A", "u1", at(9, 0, 0, 0)).await, NEW, 1, 9);
    inbound(&mut q, "A", "w", at(9, 0, 0, 0)).await;

    assign(&mut a, "A", "acme.P-2_b").await;
    let i = inspect(&mut a, sender("A"), at(10, 0, 0, 0)).await;
    assert_eq!(
        (i.scope(), i.portfolio.as_str(), i.limit, i.used),
        (Scope::Portfolio, "acme.P-2_b", 20, 0)
    );
    let i = inspect(&mut a, portfolio("acme:P1"), at(10, 0, 0, 0)).await;
    assert_eq!(
        (i.senders.as_slice(), i.used, i.open_service_windows),
        (&["B".to_string()][..], 1, 0)
    );
    let i = inspect(&mut a, portfolio("acme.P-2_b"), at(10, 0, 0, 0)).await;
    assert_eq!(
        (i.senders.as_slice(), i.used, i.open_service_windows),
        (&["A".to_string()][..], 0, 1)
    );

    let r = acquire(&mut q, "A", "u1", at(10, 0, 0, 0)).await;
    assert_answer(&r, NEW, 1, 19);
    assert_eq!(r.limit, 20);
    assert_decision(&free_form(&mut q, "A", "w", at(10, 0, 0, 0)).await, SERVICE);
    // B stays in P1, where u1 still holds its slot.
    assert_answer(
        &acquire(&mut q, "B", "u1", at(10, 0, 0, 0)).await,
        COUNTED,
        1,
        9,
    );
}

// ------------------------------------------------------------------ exact expiry, Inspect, ListWindow

async fn slot_expires_exactly_at_expires_at(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "exp";
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, 1)).await;
    let r = acquire(&mut q, s, "u", at(9, 0, 0, 0)).await;
    assert_eq!(expires(&r), at(9, 0, 0, 0) + DAY);

    let end = at(9, 0, 0, 0) + DAY;
    let r = acquire(&mut q, s, "u", end - 1).await;
    assert_answer(&r, COUNTED, 1, 0);
    assert_eq!(expires(&r), end);
    assert_denied_limit(&acquire(&mut q, s, "v", end - 1).await, 1);
    let i = inspect_recipient(&mut a, sender(s), "u", end - 1).await;
    assert_eq!((i.used, opt_ms(&i.counted_until)), (1, Some(end)));

    let i = inspect_recipient(&mut a, sender(s), "u", end).await;
    assert_eq!(
        (
            i.used,
            opt_ms(&i.counted_until),
            opt_ms(&i.next_slot_free_at)
        ),
        (0, None, None)
    );
    let r = acquire(&mut q, s, "u", end).await;
    assert_answer(&r, NEW, 1, 0);
    assert_eq!(expires(&r), end + DAY);
}

async fn inspect_reports_usage_next_free_slot_and_recipient_state(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "ins";
    let empty = inspect(&mut a, sender(s), at(8, 0, 0, 0)).await;
    assert_eq!(
        (
            empty.limit,
            empty.used,
            empty.remaining,
            empty.slots_freeing_next_hour,
            empty.open_service_windows
        ),
        (250, 0, 250, 0, 0)
    );
    assert_eq!(
        (opt_ms(&empty.next_slot_free_at), empty.scope()),
        (None, Scope::Sender)
    );
    assert_eq!(ms_of(empty.now.as_ref().unwrap()), at(8, 0, 0, 0));

    acquire(&mut q, s, "a", at(9, 0, 0, 0)).await;
    acquire(&mut q, s, "b", at(9, 30, 0, 0)).await;
    acquire(&mut q, s, "c", at(10, 0, 0, 0)).await;
    acquire(&mut q, s, "d", at(10, 0, 0, 1)).await;
    inbound(&mut q, s, "w1", at(8, 0, 0, 0)).await;
    inbound(&mut q, s, "w2", at(12, 0, 0, 0)).await;

    let i = inspect(&mut a, sender(s), at(23, 0, 0, 0)).await;
    assert_eq!((i.limit, i.used, i.remaining), (250, 4, 246));
    assert_eq!(opt_ms(&i.next_slot_free_at), Some(at(9, 0, 0, 0) + DAY));
    assert_eq!((i.slots_freeing_next_hour, i.open_service_windows), (0, 2));
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(conversation(Tier::Tier250, 0))
    );
    assert_eq!(ms_of(i.now.as_ref().unwrap()), at(23, 0, 0, 0));

    // At D+1 09:00 a's slot has ended; b (09:30) and c (10:00) end within (now, now + 1 h],
    // d (10:00:00.001) just after; w1's service window has closed.
    let now = at(9, 0, 0, 0) + DAY;
    let i = inspect(&mut a, sender(s), now).await;
    assert_eq!((i.used, i.remaining), (3, 247));
    assert_eq!(opt_ms(&i.next_slot_free_at), Some(at(9, 30, 0, 0) + DAY));
    assert_eq!((i.slots_freeing_next_hour, i.open_service_windows), (2, 1));
    assert_eq!(
        (
            i.counted_until,
            i.service_window_until,
            i.recipient.as_str()
        ),
        (None, None, "")
    );

    let i = inspect_recipient(&mut a, sender(s), "b", now).await;
    assert_eq!(
        (
            i.recipient.as_str(),
            opt_ms(&i.counted_until),
            opt_ms(&i.service_window_until)
        ),
        ("b", Some(at(9, 30, 0, 0) + DAY), None)
    );
    let i = inspect_recipient(&mut a, sender(s), "w2", now).await;
    assert_eq!(
        (opt_ms(&i.counted_until), opt_ms(&i.service_window_until)),
        (None, Some(at(12, 0, 0, 0) + DAY))
    );
    let i = inspect_recipient(&mut a, sender(s), "a", now).await;
    assert_eq!(
        (opt_ms(&i.counted_until), opt_ms(&i.service_window_until)),
        (None, None)
    );
    let i = inspect_recipient(&mut a, sender(s), "w1", now).await;
    assert_eq!(opt_ms(&i.service_window_until), None);
    // Inspecting changes nothing.
    assert_eq!(inspect(&mut a, sender(s), at(23, 0, 0, 0)).await.used, 4);
}

async fn list_window_pages_in_listing_order_without_repeats(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    assign(&mut a, "A", "P").await;
    assign(&mut a, "B", "P").await;

    // 20 entries: 2 at 08:00 (A), 15 sharing 09:00 (one batch of B), 3 at 10:00 (A).
    acquire(&mut q, "A", "zz", at(8, 0, 0, 0)).await;
    acquire(&mut q, "A", "aa", at(8, 0, 0, 0)).await;
    let shared: Vec<String> = (1..=15).map(|i| format!("u{i}")).collect();
    batch(&mut q, "B", &shared, at(9, 0, 0, 0)).await;
    batch(&mut q, "A", &["m2", "m10", "m1"], at(10, 0, 0, 0)).await;

    let mut expected: Vec<(String, i64, String)> = Vec::new();
    for r in ["aa", "zz"] {
        expected.push((r.into(), at(8, 0, 0, 0) + DAY, "A".into()));
    }
    for r in shared {
        expected.push((r, at(9, 0, 0, 0) + DAY, "B".into()));
    }
    for r in ["m1", "m10", "m2"] {
        expected.push((r.into(), at(10, 0, 0, 0) + DAY, "A".into()));
    }
    // Listing order: the recipient's listing position, then its bytes (docs/contract.md).
    let position = |r: &str| {
        waquota::model::listing_position(&waquota::model::RecipientId::parse("r", r).unwrap())
    };
    expected.sort_by(|x, y| (position(&x.0), &x.0).cmp(&(position(&y.0), &y.0)));

    let now = at(11, 0, 0, 0);
    for target in [sender("A"), sender("B"), portfolio("P")] {
        let pages = list_pages(&mut a, target.clone(), 7, now).await;
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(sizes, [7, 7, 6], "{target:?}");
        let all: Vec<_> = pages.iter().flat_map(|p| entries(p)).collect();
        assert_eq!(all, expected, "{target:?}");
    }
    // One page of everything (page_size 0 = 100): no next page.
    let page = list_page(&mut a, portfolio("P"), 0, "", now).await;
    assert_eq!(
        (entries(&page.entries), page.next_page_token.as_str()),
        (expected.clone(), "")
    );
    // Exactly one page's worth: the token is empty too.
    let page = list_page(&mut a, portfolio("P"), 20, "", now).await;
    assert_eq!(
        (page.entries.len(), page.next_page_token.as_str()),
        (20, "")
    );

    // Ended slots are not listed: at D+1 08:00 the first two have ended.
    let pages = list_pages(&mut a, portfolio("P"), 7, at(8, 0, 0, 0) + DAY).await;
    let all: Vec<_> = pages.iter().flat_map(|p| entries(p)).collect();
    let later: Vec<_> = expected
        .iter()
        .filter(|e| e.1 > at(8, 0, 0, 0) + DAY)
        .cloned()
        .collect();
    assert_eq!(all, later);

    // A sender on its own lists its own window; an empty one lists nothing.
    acquire(&mut q, "C", "k", at(9, 0, 0, 0)).await;
    let page = list_page(&mut a, sender("C"), 7, "", now).await;
    assert_eq!(
        entries(&page.entries),
        [("k".to_string(), at(9, 0, 0, 0) + DAY, "C".to_string())]
    );
    assert_eq!(page.next_page_token, "");
    let page = list_page(&mut a, sender("D"), 7, "", now).await;
    assert!(page.entries.is_empty() && page.next_page_token.is_empty());
}

// ------------------------------------------------------------------ Reset

async fn reset_clears_a_window_but_refuses_an_assigned_sender(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t = at(9, 0, 0, 0);

    let s = "own";
    put_policy(&mut a, sender(s), conversation(Tier::Tier50, 0)).await;
    let r1 = acquire(&mut q, s, "u", t).await.reservation;
    acquire(&mut q, s, "v", t).await;
    inbound(&mut q, s, "w", t).await;
    reset(&mut a, sender(s), t).await.expect("reset");
    let i = inspect(&mut a, sender(s), t).await;
    assert_eq!(
        (i.used, i.next_slot_free_at, i.open_service_windows),
        (0, None, 1),
        "slots go, service windows stay"
    );
    assert_eq!(
        i.policy.as_ref().map(window_part),
        Some(conversation(Tier::Tier50, 0)),
        "the policy stays"
    );
    let r = acquire(&mut q, s, "u", t).await;
    assert_answer(&r, NEW, 1, 49);
    // A reservation from before the reset never matches a slot opened after it.
    assert_ne!(r.reservation, r1);
    assert!(!release(&mut q, s, "u", &r1, t).await);
    assert_eq!(inspect(&mut a, sender(s), t).await.used, 1);

    // A portfolio's window.
    assign(&mut a, "A", "P").await;
    batch(&mut q, "A", &["x", "y", "z"], t).await;
    let err = reset(&mut a, sender("A"), t)
        .await
        .expect_err("an assigned sender cannot be reset");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        inspect(&mut a, portfolio("P"), t).await.used,
        3,
        "a refused reset changes nothing"
    );
    assert_answer(&acquire(&mut q, "A", "x", t).await, COUNTED, 3, 247);

    reset(&mut a, portfolio("P"), t).await.expect("reset");
    assert_eq!(inspect(&mut a, portfolio("P"), t).await.used, 0);
    assert_eq!(inspect(&mut a, sender("A"), t).await.used, 0);
    assert_answer(&acquire(&mut q, "A", "x", t).await, NEW, 1, 249);
    // Resetting an unknown target is harmless.
    reset(&mut a, sender("nobody"), t).await.expect("reset");
    reset(&mut a, portfolio("nowhere"), t).await.expect("reset");
}

// ------------------------------------------------------------------ §2.1 replays

async fn replayed_clocks_far_in_the_past_or_future_keep_state(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    // 1969-12-30, 2001-01-01, 2101-01-01 and 2250-01-01 (UTC; times up to 2255 are accepted, so
    // that microseconds stay exact for the rate limits), against D in 2026.
    let days = [
        ("epoch", -2 * DAY),
        ("past", 978_307_200_000_i64),
        ("future", 4_133_980_800_000),
        ("far", 8_835_955_200_000),
    ];
    for (s, day) in days {
        let t = day + 9 * HOUR;
        assert_eq!(expires(&acquire(&mut q, s, "u", t).await), t + DAY);
        assert_eq!(inbound(&mut q, s, "w", t).await, t + DAY);
        let later = t + DAY - MINUTE;
        let r = acquire(&mut q, s, "u", later).await;
        assert_answer(&r, COUNTED, 1, 249);
        assert_eq!(expires(&r), t + DAY);
        assert_decision(&free_form(&mut q, s, "w", later).await, SERVICE);
        let i = inspect(&mut a, sender(s), later).await;
        assert_eq!((i.used, i.open_service_windows), (1, 1));
        assert_answer(&acquire(&mut q, s, "u", t + DAY).await, NEW, 1, 249);
    }
}

// ------------------------------------------------------------------ a window of thousands

/// A window large enough to be stored in many pieces (the Redis ledger shards it), grown in
/// batches, partly released, partly expired, emptied and grown again: every count, expiry,
/// retry_after and listing stays exact throughout.
async fn a_large_window_counts_lists_and_frees_exactly_as_it_grows_and_shrinks(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "big";
    let limit = 3_000;
    put_policy(&mut a, sender(s), conversation(Tier::Tier250, limit)).await;
    let all = users("b", 3_001);
    // 30 batches of 100, one minute apart from D 08:00.
    let minute = |k: usize| at(8, 0, 0, 0) + k as i64 * MINUTE;
    let mut reservations = Vec::new();
    for k in 0..30 {
        let rs = batch(&mut q, s, &all[k * 100..(k + 1) * 100], minute(k)).await;
        assert_all_new(&rs, k as u64 * 100, limit, minute(k));
        reservations.extend(rs.into_iter().map(|r| r.reservation));
    }
    let now = at(9, 0, 0, 0);
    // Full: the next user waits for the earliest slot (D+1 08:00), dry run or not.
    for r in [
        dry_acquire(&mut q, s, &all[3_000], now).await,
        acquire(&mut q, s, &all[3_000], now).await,
    ] {
        assert_denied_limit(&r, minute(0) + DAY - now);
    }
    // Users already counted keep their slots.
    for k in [0, 777, 2_999] {
        let r = acquire(&mut q, s, &all[k], now).await;
        assert_answer(&r, COUNTED, limit, 0);
        assert_eq!(expires(&r), minute(k / 100) + DAY);
    }
    let i = inspect(&mut a, sender(s), now).await;
    assert_eq!(
        (i.used, opt_ms(&i.next_slot_free_at)),
        (limit, Some(minute(0) + DAY))
    );
    // Every slot listed once, in listing order (position, then recipient), across the shards.
    let pages = list_pages(&mut a, sender(s), 250, now).await;
    let listed: Vec<_> = pages.iter().flat_map(|p| entries(p)).collect();
    let mut expected: Vec<_> = (0..3_000)
        .map(|k| (all[k].clone(), minute(k / 100) + DAY, s.to_string()))
        .collect();
    let position = |r: &str| {
        waquota::model::listing_position(&waquota::model::RecipientId::parse("r", r).unwrap())
    };
    expected.sort_by(|x, y| (position(&x.0), &x.0).cmp(&(position(&y.0), &y.0)));
    assert_eq!(listed.len(), 3_000);
    assert!(
        listed == expected,
        "the listing is every slot once, in order"
    );

    // Releasing one slot (of the 11th batch, untouched) frees room for exactly one new user.
    assert!(release(&mut q, s, &all[1_050], &reservations[1_050], now).await);
    assert!(!release(&mut q, s, &all[1_050], &reservations[1_050], now).await);
    assert_answer(&acquire(&mut q, s, &all[3_000], now).await, NEW, limit, 0);
    assert_denied_limit(
        &acquire(&mut q, s, "late", now).await,
        minute(0) + DAY - now,
    );

    // D+1 08:15: the slots of the first 16 batches have ended (one of them was released).
    let later = minute(15) + DAY;
    let used = 3_000 - 1_599;
    let i = inspect(&mut a, sender(s), later).await;
    assert_eq!(
        (i.used, opt_ms(&i.next_slot_free_at)),
        (used, Some(minute(16) + DAY))
    );
    assert_answer(
        &acquire(&mut q, s, "late", later).await,
        NEW,
        used + 1,
        limit - used - 1,
    );
    assert_answer(
        &acquire(&mut q, s, &all[0], later).await,
        NEW,
        used + 2,
        limit - used - 2,
    );
    let pages = list_pages(&mut a, sender(s), 500, later).await;
    assert_eq!(pages.iter().map(Vec::len).sum::<usize>(), used as usize + 2);

    // D+1 10:00: only the two opened at D+1 08:15 remain.
    let empty = at(10, 0, 0, 0) + DAY;
    let r = acquire(&mut q, s, "again", empty).await;
    assert_answer(&r, NEW, 3, limit - 3);
    let listed: Vec<_> = list_pages(&mut a, sender(s), 100, empty)
        .await
        .iter()
        .flat_map(|p| entries(p))
        .collect();
    let position = |r: &str| {
        waquota::model::listing_position(&waquota::model::RecipientId::parse("r", r).unwrap())
    };
    let mut expected = [
        (all[0].clone(), later + DAY, s.to_string()),
        ("late".to_string(), later + DAY, s.to_string()),
        ("again".to_string(), empty + DAY, s.to_string()),
    ];
    expected.sort_by(|x, y| (position(&x.0), &x.0).cmp(&(position(&y.0), &y.0)));
    assert_eq!(listed, expected, "in listing order");
    // And it grows again, exactly.
    let rs = batch(&mut q, s, &all[1..1_001], empty).await;
    assert_all_new(&rs, 3, limit, empty);
    assert_eq!(inspect(&mut a, sender(s), empty).await.used, 1_003);
}

// ------------------------------------------------------------------ bounds of numbers and ids

/// Numbers a ledger could not keep exactly (Lua numbers are doubles: 2^53 + 1 comes back as 2^53)
/// are refused before any ledger sees them, and a refused request stores nothing.
async fn numbers_beyond_their_bounds_are_refused_and_change_nothing(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "capped";
    let t = at(9, 0, 0, 0);
    let p = Policy {
        sender_cap: 7,
        ..conversation(Tier::Tier1k, 0)
    };
    let stored = put_policy_at(&mut a, sender(s), p, t).await;
    assert_eq!(stored.sender_cap, 7);

    for cap in [1_000_000_001, (1 << 53) + 1, 1 << 63, u64::MAX] {
        let bad = Policy {
            sender_cap: cap,
            ..p
        };
        assert_invalid(
            try_put_policy_at(&mut a, sender(s), bad, t).await,
            "policy.sender_cap",
        );
        assert_eq!(
            inspect(&mut a, sender(s), t).await.sender_policy.as_ref(),
            Some(&stored),
            "a refused PutPolicy (sender_cap {cap}) leaves the stored policy"
        );
    }
    // The bound itself is kept exactly, as custom_limit's.
    let top = Policy {
        sender_cap: 1_000_000_000,
        custom_limit: 1_000_000_000,
        ..p
    };
    let kept = put_policy_at(&mut a, sender(s), top, t).await;
    assert_eq!(
        (kept.sender_cap, kept.custom_limit),
        (1_000_000_000, 1_000_000_000)
    );
    let read = inspect(&mut a, sender(s), t)
        .await
        .sender_policy
        .expect("sender policy");
    assert_eq!(
        (read.sender_cap, read.custom_limit),
        (1_000_000_000, 1_000_000_000)
    );

    // A reservation token carries a time: one beyond the accepted range was never issued.
    let r = acquire(&mut q, s, "held", t).await;
    let seq = r.reservation.split_once('.').expect("r<opened_at>.<seq>").1;
    for opened in [MAX_ABS_MS + 1, i64::MAX, -MAX_ABS_MS - 1] {
        let forged = format!("r{opened}.{seq}");
        assert_invalid(
            q.release(ReleaseRequest {
                sender: s.into(),
                recipient: "held".into(),
                reservation: forged,
                at: Some(ts(t)),
            })
            .await,
            "reservation",
        );
    }
    assert_eq!(inspect(&mut a, sender(s), t).await.used, 1);
    assert!(release(&mut q, s, "held", &r.reservation, t).await);
}

async fn durations_finer_than_a_millisecond_are_refused_and_change_nothing(b: Backend) {
    let srv = TestServer::start(b).await;
    let mut a = srv.admin().await;
    let s = "paced";
    let t = at(9, 0, 0, 0);
    let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
    let p = Policy {
        pair_interval: d(1, 5_000_000),
        marketing_cap: 2,
        marketing_cap_period: d(86_400, 0),
        ..conversation(Tier::Tier1k, 0)
    };
    let stored = put_policy_at(&mut a, sender(s), p, t).await;
    assert_eq!(stored.pair_interval, d(1, 5_000_000), "1.005 s is kept");

    for (field, bad) in [
        (
            "policy.pair_interval",
            Policy {
                pair_interval: d(0, 1_000_500),
                ..p
            },
        ),
        (
            "policy.pair_interval",
            Policy {
                pair_interval: d(2, 1),
                ..p
            },
        ),
        (
            "policy.marketing_cap_period",
            Policy {
                marketing_cap_period: d(86_400, 500_000),
                ..p
            },
        ),
    ] {
        let e = try_put_policy_at(&mut a, sender(s), bad, t)
            .await
            .expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains("whole number of milliseconds"),
            "{:?}",
            e.message()
        );
        assert_eq!(
            inspect(&mut a, sender(s), t).await.sender_policy.as_ref(),
            Some(&stored)
        );
    }
}

/// `at` is exact to the millisecond from 1684-07-28T00:12:25.260Z to 2255-06-05T23:47:34.740Z
/// (|ms| <= 9,007,199,254,740: microseconds stay below 2^53), and the refusal says so.
async fn at_is_accepted_to_its_first_and_last_millisecond_and_refused_beyond(b: Backend) {
    let srv = TestServer::start(b).await;
    let mut q = srv.quota().await;
    for (s, edge, beyond) in [
        ("last", MAX_ABS_MS, MAX_ABS_MS + 1),
        ("first", -MAX_ABS_MS, -MAX_ABS_MS - 1),
    ] {
        let r = acquire(&mut q, s, "u", edge).await;
        assert_answer(&r, NEW, 1, 249);
        assert_eq!(expires(&r), edge + DAY);
        let e = q
            .acquire(AcquireRequest {
                sender: s.into(),
                recipient: "v".into(),
                at: Some(ts(beyond)),
                ..Default::default()
            })
            .await
            .expect_err("one millisecond beyond");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .contains("1684-07-28T00:12:25.260Z to 2255-06-05T23:47:34.740Z"),
            "{:?}",
            e.message()
        );
        let r = acquire(&mut q, s, "u", edge).await;
        assert_answer(&r, COUNTED, 1, 249);
    }
}

async fn phone_forms_that_are_not_numbers_are_refused_naming_the_offending_character(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let s = "phones";
    let t = at(9, 0, 0, 0);
    let acq = |recipient: &str| AcquireRequest {
        sender: s.into(),
        recipient: recipient.into(),
        at: Some(ts(t)),
        ..Default::default()
    };
    let dots = format!("{}5", ".".repeat(200));
    for bad in [
        "1-",
        "-1",
        "+-1",
        "((((1))))",
        dots.as_str(),
        "+49 151",
        "0151 1234567",
        "+49 151 1234--5678",
    ] {
        assert_invalid(q.acquire(acq(bad)).await, "recipient");
        assert_invalid(
            q.record_inbound(RecordInboundRequest {
                sender: s.into(),
                recipient: bad.into(),
                free_entry_point: false,
                at: Some(ts(t)),
            })
            .await,
            "recipient",
        );
    }
    let e = q
        .acquire(acq("+49\u{a0}151 1234567"))
        .await
        .expect_err("a no-break space");
    assert!(
        e.message().contains("'\\u{a0}' at position 4"),
        "{:?}",
        e.message()
    );
    assert_invalid(
        q.acquire_batch(AcquireBatchRequest {
            sender: s.into(),
            recipients: vec!["+49 151 1234-5678".into(), "1-".into()],
            at: Some(ts(t)),
            ..Default::default()
        })
        .await,
        "recipients[1]",
    );
    let i = inspect(&mut a, sender(s), t).await;
    assert_eq!(
        (i.used, i.open_service_windows),
        (0, 0),
        "nothing was recorded"
    );

    // Numbers in any accepted form are one user; `00` is the international prefix.
    let r = acquire(&mut q, s, "+49 151 1234-5678", t).await;
    assert_answer(&r, NEW, 1, 249);
    for form in ["(0049) 151 12345678", "0049 151 1234.5678", "4915112345678"] {
        let r = acquire(&mut q, s, form, t).await;
        assert_answer(&r, COUNTED, 1, 249);
        assert_eq!(r.recipient, "4915112345678", "{form}");
    }
    // A plain run of digits is a wa_id or opaque id, kept as given (a leading 00 included).
    let r = acquire(&mut q, s, "004915112345678", t).await;
    assert_eq!(
        (r.decision(), r.recipient.as_str()),
        (NEW, "004915112345678")
    );
    let r = acquire(&mut q, s, "1", t).await;
    assert_eq!((r.decision(), r.recipient.as_str()), (NEW, "1"));
}
