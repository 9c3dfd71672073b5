//! Integrity of the ledger against a careless or hostile client: a delivered slot is never
//! released, a reservation cannot be forged, guessed or used by another sender, and only an
//! operator may move the clock. Every body runs against every ledger.

#[macro_use]
mod common;

use common::dsl::Quota;
use common::dsl::*;
use common::ops::with_token;
use common::{Backend, D, DAY, HOUR, MINUTE, TestServer, ts};
use tonic::Code;
use waquota::proto::{
    AcquireRequest, ConfirmRequest, Decision, ReportFailureRequest, Tier, WindowMode,
};

on_every_ledger!(
    a_confirmed_slot_is_a_delivery_and_can_no_longer_be_released,
    forged_or_non_canonical_reservations_are_refused_and_free_nothing,
    a_sender_cannot_confirm_or_release_another_senders_slot_in_its_portfolio,
    reservations_are_not_guessable_from_one_another,
    reset_of_a_window_of_many_shards_clears_every_slot_and_keeps_new_ones_apart,
    listing_a_window_of_many_shards_returns_every_live_slot_once,
    inspect_of_a_window_of_many_shards_counts_exactly_the_slots_freeing_within_the_hour,
);

const T0: i64 = D + 9 * HOUR;

async fn a_confirmed_slot_is_a_delivery_and_can_no_longer_be_released(b: Backend) {
    let server = TestServer::start(b).await;
    room_for(&server, sender("s1"), 1).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);

    let first = acquire(&mut q, "s1", "4915100000001", T0).await;
    assert_decision(&first, Decision::AllowedNew);
    confirm(
        &mut q,
        "s1",
        "4915100000001",
        &first.reservation,
        Some(T0 + 1000),
        T0 + 2000,
    )
    .await
    .expect("confirm");
    // Release and ReportFailure after the delivery: nothing is freed.
    assert!(!release(&mut q, "s1", "4915100000001", &first.reservation, T0 + 3000).await);
    let (released, _) = report_failure(
        &mut q,
        "s1",
        "4915100000001",
        &first.reservation,
        131_026,
        T0 + 4000,
    )
    .await;
    assert!(
        !released,
        "a delivered slot is not released by a failure report"
    );

    let second = acquire(&mut q, "s1", "4915100000002", T0 + 5000).await;
    assert_denied_limit(&second, 1000 + 24 * HOUR - 5000);
    let i = inspect(&mut a, sender("s1"), T0 + 6000).await;
    assert_eq!((i.used, i.unique_7d), (1, 1), "{i:?}");
    let r = inspect_recipient(&mut a, sender("s1"), "4915100000001", T0 + 6000).await;
    assert_eq!(
        r.counted_until.as_ref().map(common::ms_of),
        Some(T0 + 1000 + 24 * HOUR),
        "the slot runs 24 h from delivery"
    );
}

async fn forged_or_non_canonical_reservations_are_refused_and_free_nothing(b: Backend) {
    let server = TestServer::start(b).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    let user = "4915100000001";
    let got = acquire(&mut q, "s1", user, T0).await;
    assert_decision(&got, Decision::AllowedNew);
    let token = got.reservation.clone();
    let body = token.strip_prefix('r').expect("r prefix");
    let (stored, mac) = body.rsplit_once('.').expect("a MAC part");
    let (time, seq) = stored.split_once('.').expect("time and sequence");
    let forged = [
        format!("r1.{seq}.{mac}"),
        format!("r0{time}.{seq}.{mac}"),
        format!("r+{time}.{seq}.{mac}"),
        format!("r{time}.0{seq}.{mac}"),
        format!("r{}.{seq}.{mac}", time.parse::<i64>().unwrap() + 1),
        format!("r{time}.{}.{mac}", seq.parse::<u64>().unwrap() + 1),
        format!("r{time}.{seq}.{}", mac.to_uppercase()),
        format!("r{time}.{seq}.{}0", mac),
        format!("r{time}.{seq}"),
        "r-0.0".to_owned(),
        format!("{token} "),
    ];
    for f in &forged {
        assert_invalid(
            try_release(&mut q, "s1", user, f, T0 + MINUTE).await,
            "reservation",
        );
        let failure = q
            .report_failure(ReportFailureRequest {
                sender: "s1".into(),
                recipient: user.into(),
                reservation: f.clone(),
                error_code: 131_026,
                at: Some(ts(T0 + MINUTE)),
            })
            .await;
        assert_invalid(failure, "reservation");
        let confirm = q
            .confirm(ConfirmRequest {
                sender: "s1".into(),
                recipient: user.into(),
                reservation: f.clone(),
                delivered_at: Some(ts(T0 + MINUTE)),
                at: Some(ts(T0 + MINUTE)),
            })
            .await;
        assert_invalid(confirm, "reservation");
    }
    // A reservation of one recipient does not release another's slot.
    let other = acquire(&mut q, "s1", "4915100000002", T0 + 1).await;
    assert_decision(&other, Decision::AllowedNew);
    assert_invalid(
        try_release(&mut q, "s1", "4915100000002", &token, T0 + MINUTE).await,
        "reservation",
    );

    let i = inspect_recipient(&mut a, sender("s1"), user, T0 + 2 * MINUTE).await;
    assert_eq!(i.used, 2, "nothing was freed: {i:?}");
    assert_eq!(
        i.counted_until.as_ref().map(common::ms_of),
        Some(T0 + 24 * HOUR)
    );
    // The genuine token still works.
    assert!(release(&mut q, "s1", user, &token, T0 + 3 * MINUTE).await);
}

async fn a_sender_cannot_confirm_or_release_another_senders_slot_in_its_portfolio(b: Backend) {
    let server = TestServer::start(b).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    assign(&mut a, "x", "p1").await;
    assign(&mut a, "y", "p1").await;
    let user = "4915100000001";
    let by_y = acquire(&mut q, "y", user, T0).await;
    assert_decision(&by_y, Decision::AllowedNew);

    assert_invalid(
        try_release(&mut q, "x", user, &by_y.reservation, T0 + MINUTE).await,
        "reservation",
    );
    let confirm_by_x = q
        .confirm(ConfirmRequest {
            sender: "x".into(),
            recipient: user.into(),
            reservation: by_y.reservation.clone(),
            delivered_at: Some(ts(T0 + MINUTE)),
            at: Some(ts(T0 + MINUTE)),
        })
        .await;
    assert_invalid(confirm_by_x, "reservation");

    let i = inspect_recipient(&mut a, portfolio("p1"), user, T0 + 2 * MINUTE).await;
    assert_eq!(i.used, 1);
    assert_eq!(
        i.counted_until.as_ref().map(common::ms_of),
        Some(T0 + 24 * HOUR),
        "x's confirm did not move y's slot"
    );
    assert!(release(&mut q, "y", user, &by_y.reservation, T0 + 3 * MINUTE).await);
}

async fn reservations_are_not_guessable_from_one_another(b: Backend) {
    let server = TestServer::start(b).await;
    let mut q = server.quota().await;
    let users = users("49151000", 3);
    let got = batch(&mut q, "s1", &users, T0).await;
    let macs: Vec<&str> = got
        .iter()
        .map(|r| r.reservation.rsplit_once('.').expect("a MAC part").1)
        .collect();
    for m in &macs {
        assert_eq!(m.len(), 32, "128 bits of MAC: {m}");
    }
    // Consecutive reservations share no guessable part beyond the clock and sequence.
    assert_ne!(macs[0], macs[1]);
    assert_ne!(macs[1], macs[2]);
    // The token of user 1 with user 2's sequence is refused.
    let (head0, _) = got[0].reservation.rsplit_once('.').unwrap();
    let (head1, _) = got[1].reservation.rsplit_once('.').unwrap();
    assert_ne!(head0, head1);
    let swapped = format!("{head1}.{}", macs[0]);
    assert_invalid(
        try_release(&mut q, "s1", &users[1], &swapped, T0 + MINUTE).await,
        "reservation",
    );
}

/// Only an operator's `at` is honoured once tokens are configured: a sender token's is refused,
/// so no worker can move the clock of the shared ledger (docs/contract.md, "The clock").
#[tokio::test]
async fn with_tokens_only_an_operator_may_set_the_clock() {
    for b in [Backend::Memory, Backend::Redis] {
        let server = TestServer::start_with(b, |s| {
            s.auth.sender_tokens = vec!["sender-token".into()];
            s.auth.operator_tokens = vec!["operator-token".into()];
        })
        .await;
        let mut q = server.quota().await;
        // The operator's call is on its own sender: the sender token's call ran on the real clock.
        let req = |at: Option<i64>| AcquireRequest {
            sender: if at.is_some() { "s2" } else { "s1" }.into(),
            recipient: "4915100000001".into(),
            at: at.map(ts),
            ..Default::default()
        };
        for later in [0, 25 * HOUR, 50 * HOUR] {
            let r = q
                .acquire(with_token(req(Some(T0 + later)), Some("sender-token")))
                .await;
            let e = r.expect_err("a sender's at is refused");
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().starts_with("at:"), "{e:?}");
        }
        let ok = q
            .acquire(with_token(req(None), Some("sender-token")))
            .await
            .expect("without at, a sender is served");
        assert_eq!(ok.get_ref().decision, Decision::AllowedNew as i32);
        let op = q
            .acquire(with_token(req(Some(T0)), Some("operator-token")))
            .await
            .expect("an operator's at is honoured");
        assert_eq!(op.get_ref().decision, Decision::AllowedNew as i32);
    }
}

/// A sender or portfolio with room for `n` users and no throughput limit to speak of.
async fn room_for(server: &TestServer, target: Option<waquota::proto::Target>, n: u64) {
    let mut a = server.admin().await;
    let mut p = policy(Tier::Tier250, n, WindowMode::Conversation);
    // A rate is a sender's own: a portfolio's policy refuses it.
    if matches!(
        target.as_ref().and_then(|t| t.target.as_ref()),
        Some(waquota::proto::target::Target::Sender(_))
    ) {
        p.messages_per_second = 100_000;
    }
    put_policy(&mut a, target, p).await;
}

async fn fill(q: &mut Quota, s: &str, prefix: &str, n: usize, at_ms: i64) -> Vec<String> {
    let all = users(prefix, n);
    for chunk in all.chunks(1000) {
        for r in batch(q, s, chunk, at_ms).await {
            assert_decision(&r, Decision::AllowedNew);
        }
    }
    all
}

async fn reset_of_a_window_of_many_shards_clears_every_slot_and_keeps_new_ones_apart(b: Backend) {
    let server = TestServer::start(b).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    // 5,000 slots: about a hundred shards, so Redis clears them over several calls.
    room_for(&server, sender("s1"), 5_000).await;
    room_for(&server, sender("s2"), 5_000).await;
    let all = fill(&mut q, "s1", "u", 5_000, T0).await;
    let kept = acquire(&mut q, "s1", &all[0], T0 + MINUTE).await;
    assert_decision(&kept, Decision::AllowedCounted);
    a.reset(waquota::proto::ResetRequest {
        target: sender("s1"),
        at: None,
    })
    .await
    .expect("reset");
    let i = inspect(&mut a, sender("s1"), T0 + 2 * MINUTE).await;
    assert_eq!((i.used, i.next_slot_free_at), (0, None), "{i:?}");
    assert!(
        list_pages(&mut a, sender("s1"), 1000, T0 + 2 * MINUTE)
            .await
            .iter()
            .all(|p| p.is_empty())
    );
    // Every user is new again, and the window grows from nothing, exactly.
    let again = batch(&mut q, "s1", &all[..1000], T0 + 3 * MINUTE).await;
    for (k, r) in again.iter().enumerate() {
        assert_decision(r, Decision::AllowedNew);
        assert_eq!(r.used, k as u64 + 1);
    }
    // Another sender's window is untouched.
    fill(&mut q, "s2", "v", 3, T0).await;
    assert_eq!(inspect(&mut a, sender("s2"), T0 + 4 * MINUTE).await.used, 3);

    // A portfolio: the per-sender slot counts (sender caps) are cleared with the window.
    assign(&mut a, "x", "p1").await;
    assign(&mut a, "y", "p1").await;
    room_for(&server, portfolio("p1"), 6_000).await;
    let mut cap = policy(Tier::Tier250, 0, WindowMode::Conversation);
    cap.messages_per_second = 100_000;
    cap.sender_cap = 3_000;
    put_policy(&mut a, sender("x"), cap).await;
    fill(&mut q, "x", "px", 3_000, T0).await;
    fill(&mut q, "y", "py", 2_000, T0).await;
    let capped = acquire(&mut q, "x", "px-more", T0 + MINUTE).await;
    assert_eq!(capped.decision, Decision::DeniedLimit as i32, "{capped:?}");
    a.reset(waquota::proto::ResetRequest {
        target: portfolio("p1"),
        at: None,
    })
    .await
    .expect("reset");
    assert_eq!(
        inspect(&mut a, portfolio("p1"), T0 + 2 * MINUTE).await.used,
        0
    );
    let after = acquire(&mut q, "x", "px-more", T0 + 2 * MINUTE).await;
    assert_decision(&after, Decision::AllowedNew);
    assert_eq!(after.used, 1);
}

async fn listing_a_window_of_many_shards_returns_every_live_slot_once(b: Backend) {
    let server = TestServer::start(b).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    room_for(&server, sender("s1"), 4_000).await;
    let early = fill(&mut q, "s1", "e", 1_500, T0).await;
    let late = fill(&mut q, "s1", "l", 2_500, T0 + HOUR).await;
    for (when, want) in [(T0 + 2 * HOUR, 4_000), (T0 + DAY + MINUTE, 2_500)] {
        for page_size in [7, 100, 1000] {
            let pages = list_pages(&mut a, sender("s1"), page_size, when).await;
            assert!(pages.iter().all(|p| p.len() <= page_size as usize));
            let listed: Vec<String> = pages
                .iter()
                .flatten()
                .map(|e| e.recipient.clone())
                .collect();
            let mut unique = listed.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                (listed.len(), unique.len()),
                (want, want),
                "page size {page_size}"
            );
            let mut expected: Vec<String> = if want == 4_000 {
                early.iter().chain(late.iter()).cloned().collect()
            } else {
                late.clone()
            };
            expected.sort();
            assert_eq!(unique, expected);
        }
    }
}

async fn inspect_of_a_window_of_many_shards_counts_exactly_the_slots_freeing_within_the_hour(
    b: Backend,
) {
    let server = TestServer::start(b).await;
    let (mut q, mut a) = (server.quota().await, server.admin().await);
    room_for(&server, sender("s1"), 7_000).await;
    // 3,500 slots ending at T0 + 24 h and 2,500 ending two hours later: some 125 shards, nearly
    // all holding a slot that frees within the hour, so Redis counts them over several calls.
    fill(&mut q, "s1", "e", 3_500, T0).await;
    fill(&mut q, "s1", "l", 2_500, T0 + 2 * HOUR).await;
    for (now, freeing) in [
        (T0 + 23 * HOUR + 30 * MINUTE, 3_500),
        (T0 + 23 * HOUR - 1, 0),
        (T0 + 24 * HOUR, 0),
        (T0 + 25 * HOUR, 2_500),
        (T0 + 26 * HOUR, 0),
    ] {
        let i = inspect(&mut a, sender("s1"), now).await;
        assert_eq!(
            i.slots_freeing_next_hour,
            freeing,
            "at T0 + {} ms",
            now - T0
        );
    }
    // And while slots come and go between the counting calls' moments, the figure stays exact
    // for the moment asked.
    let now = T0 + 23 * HOUR + 30 * MINUTE;
    fill(&mut q, "s1", "m", 100, now).await;
    let i = inspect(&mut a, sender("s1"), now).await;
    assert_eq!((i.used, i.slots_freeing_next_hour), (6_100, 3_500));
}
