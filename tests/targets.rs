//! Listing what the ledger knows (`ListTargets`, `waquota targets list`) and the audit log of
//! AdminService changes (`ListAudit`, `waquota audit`), on every ledger (docs/contract.md,
//! "Listing targets" and "The audit log").

#[macro_use]
mod common;

use common::dsl::{self, Admin, portfolio, sender};
use common::{Backend, D, DAY, HOUR, TestServer, at, ts};
use tonic::Code;
use waquota::proto::{
    AssignSenderRequest, AssignWabaRequest, ListAuditRequest, ListTargetsRequest,
    ListTargetsResponse, ResetRequest, SenderStatus, TargetKind, TargetSummary, Tier, WindowMode,
    target,
};

async fn page(
    a: &mut Admin,
    kind: TargetKind,
    size: u32,
    token: &str,
    at_ms: i64,
) -> Result<ListTargetsResponse, tonic::Status> {
    a.list_targets(ListTargetsRequest {
        kind: kind as i32,
        page_size: size,
        page_token: token.into(),
        at: Some(ts(at_ms)),
    })
    .await
    .map(|r| r.into_inner())
}

/// Every page, following the tokens.
async fn all(a: &mut Admin, kind: TargetKind, size: u32, at_ms: i64) -> Vec<TargetSummary> {
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let p = page(a, kind, size, &token, at_ms)
            .await
            .expect("list_targets");
        out.extend(p.targets);
        if p.next_page_token.is_empty() {
            return out;
        }
        token = p.next_page_token;
    }
}

/// `p:<id>` / `s:<id>` of each line, in order.
fn ids(ts: &[TargetSummary]) -> Vec<String> {
    ts.iter()
        .map(
            |t| match t.target.as_ref().and_then(|t| t.target.as_ref()) {
                Some(target::Target::Sender(s)) => format!("s:{s}"),
                Some(target::Target::Portfolio(p)) => format!("p:{p}"),
                None => "?".into(),
            },
        )
        .collect()
}

fn line<'a>(ts: &'a [TargetSummary], id: &str) -> &'a TargetSummary {
    let i = ids(ts)
        .iter()
        .position(|x| x == id)
        .unwrap_or_else(|| panic!("{id} not listed: {:?}", ids(ts)));
    &ts[i]
}

async fn listing_shows_known_targets_in_order_with_tier_used_and_status(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(10, 0, 0, 0);
    // s1: a stored policy only; s2: three slots; s3: in portfolio P1; s4: a service window;
    // P2: a policy only. s9 is only inspected: never known, never listed.
    let mut p1k = dsl::policy(Tier::Tier1k, 0, WindowMode::Conversation);
    p1k.status = SenderStatus::Flagged as i32;
    dsl::put_policy_at(&mut a, sender("s1"), p1k, t0).await;
    for u in dsl::users("u", 3) {
        dsl::acquire(&mut q, "s2", &u, t0).await;
    }
    dsl::assign_at(&mut a, "s3", "P1", t0).await;
    dsl::acquire(&mut q, "s3", "u-0000", t0).await;
    dsl::inbound(&mut q, "s4", "u-0000", t0).await;
    let p2k = dsl::policy(Tier::Tier2k, 0, WindowMode::Rolling);
    dsl::put_policy_at(&mut a, portfolio("P2"), p2k, t0).await;
    dsl::inspect(&mut a, sender("s9"), t0).await;

    let listed = all(&mut a, TargetKind::Unspecified, 0, t0 + 1).await;
    assert_eq!(
        ids(&listed),
        ["p:P1", "p:P2", "s:s1", "s:s2", "s:s3", "s:s4"],
        "portfolios first, then by id; s9 is not known"
    );
    let s1 = line(&listed, "s:s1");
    assert_eq!(
        (s1.tier, s1.used, s1.limit, s1.status),
        (Tier::Tier1k as i32, 0, 1000, SenderStatus::Flagged as i32)
    );
    let s2 = line(&listed, "s:s2");
    assert_eq!((s2.used, s2.remaining, s2.limit), (3, 247, 250));
    assert_eq!(s2.status, SenderStatus::Connected as i32);
    let s3 = line(&listed, "s:s3");
    assert_eq!((s3.portfolio.as_str(), s3.used), ("P1", 1));
    assert_eq!(s3.scope, waquota::proto::Scope::Portfolio as i32);
    let p1 = line(&listed, "p:P1");
    assert_eq!((p1.senders, p1.used), (1, 1));
    let p2 = line(&listed, "p:P2");
    assert_eq!((p2.tier, p2.limit, p2.used), (Tier::Tier2k as i32, 2000, 0));

    // Pages of two give the same listing; each token continues after the last line.
    assert_eq!(
        ids(&all(&mut a, TargetKind::Unspecified, 2, t0).await),
        ids(&listed)
    );
    let first = page(&mut a, TargetKind::Unspecified, 2, "", t0)
        .await
        .unwrap();
    assert_eq!(ids(&first.targets), ["p:P1", "p:P2"]);
    assert_eq!(first.next_page_token, "p:P2");
    // A kind lists only its own.
    assert_eq!(
        ids(&all(&mut a, TargetKind::Sender, 3, t0).await),
        ["s:s1", "s:s2", "s:s3", "s:s4"]
    );
    assert_eq!(
        ids(&all(&mut a, TargetKind::Portfolio, 1, t0).await),
        ["p:P1", "p:P2"]
    );
}

async fn a_target_whose_state_has_all_expired_leaves_the_listing(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(10, 0, 0, 0);
    dsl::acquire(&mut q, "s2", "u-0001", t0).await;
    dsl::inbound(&mut q, "s4", "u-0001", t0).await;
    // After a day the slot and the service window are gone, but the 30-day index still
    // remembers s2's user: s2 is known, s4 is not.
    let day_after = all(&mut a, TargetKind::Unspecified, 0, t0 + DAY + HOUR).await;
    assert_eq!(ids(&day_after), ["s:s2"]);
    assert_eq!(line(&day_after, "s:s2").used, 0);
    // After 30 days nothing is left of either.
    assert!(
        all(&mut a, TargetKind::Unspecified, 0, t0 + 31 * DAY)
            .await
            .is_empty()
    );
}

async fn bad_listing_requests_are_refused_naming_the_field(b: Backend) {
    let srv = TestServer::start(b).await;
    let mut a = srv.admin().await;
    dsl::put_policy(
        &mut a,
        sender("s1"),
        dsl::policy(Tier::Tier1k, 0, WindowMode::Rolling),
    )
    .await;
    for token in ["nonsense", "x:s1", "s:"] {
        dsl::assert_invalid(
            page(&mut a, TargetKind::Unspecified, 0, token, D).await,
            "page_token",
        );
    }
    // A sender's position in a portfolio listing.
    dsl::assert_invalid(
        page(&mut a, TargetKind::Portfolio, 0, "s:s1", D).await,
        "page_token",
    );
    let unknown_kind = a
        .list_targets(ListTargetsRequest {
            kind: 7,
            ..Default::default()
        })
        .await;
    dsl::assert_invalid(unknown_kind, "kind");
    let too_many = a
        .list_audit(ListAuditRequest {
            target: sender("s1"),
            limit: 101,
        })
        .await;
    dsl::assert_invalid(too_many, "limit");
}

/// (rpc, change) of each entry, newest first.
async fn audit(
    a: &mut Admin,
    target: Option<waquota::proto::Target>,
    limit: u32,
) -> Vec<(i64, String, String)> {
    a.list_audit(ListAuditRequest { target, limit })
        .await
        .expect("list_audit")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (common::ms_of(e.at.as_ref().expect("at")), e.rpc, e.change))
        .collect()
}

async fn every_admin_change_is_in_the_audit_log_newest_first(b: Backend) {
    let srv = TestServer::start(b).await;
    let (mut q, mut a) = (srv.quota().await, srv.admin().await);
    let t0 = at(9, 0, 0, 0);
    dsl::put_policy_at(
        &mut a,
        sender("s1"),
        dsl::policy(Tier::Tier1k, 0, WindowMode::Conversation),
        t0,
    )
    .await;
    dsl::acquire(&mut q, "s1", "u-0001", t0).await;
    a.reset(ResetRequest {
        target: sender("s1"),
        at: Some(ts(t0 + 1000)),
    })
    .await
    .expect("reset");
    a.assign_sender(AssignSenderRequest {
        sender: "s1".into(),
        portfolio: "P1".into(),
        at: Some(ts(t0 + 2000)),
        create: true,
    })
    .await
    .expect("assign");
    a.assign_waba(AssignWabaRequest {
        waba: "w1".into(),
        portfolio: "P1".into(),
    })
    .await
    .expect("assign waba");
    // Refused changes leave no entry.
    let refused = a
        .assign_sender(AssignSenderRequest {
            sender: "s1".into(),
            portfolio: "p1".into(),
            at: Some(ts(t0 + 3000)),
            create: false,
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::FailedPrecondition);
    let mut bad = dsl::policy(Tier::Tier1k, 0, WindowMode::Conversation);
    bad.headroom_percent = 100;
    dsl::assert_invalid(
        dsl::try_put_policy_at(&mut a, sender("s1"), bad, t0 + 4000).await,
        "headroom",
    );

    let s1 = audit(&mut a, sender("s1"), 0).await;
    assert_eq!(
        s1,
        [
            (
                t0 + 2000,
                "AssignSender".to_owned(),
                "sender s1 assigned to portfolio P1 (create)".to_owned()
            ),
            (
                t0 + 1000,
                "Reset".to_owned(),
                "window reset: every slot freed".to_owned()
            ),
            (
                t0,
                "PutPolicy".to_owned(),
                "policy set: tier 1k, conversation window, status connected, rules legacy"
                    .to_owned()
            ),
        ]
    );
    let p1: Vec<String> = audit(&mut a, portfolio("P1"), 0)
        .await
        .into_iter()
        .map(|(_, rpc, change)| format!("{rpc}: {change}"))
        .collect();
    assert_eq!(
        p1,
        [
            "AssignWaba: WABA w1 assigned to portfolio P1",
            "AssignSender: sender s1 assigned to portfolio P1 (create)"
        ]
    );
    let ledger: Vec<String> = audit(&mut a, None, 0)
        .await
        .into_iter()
        .map(|(_, rpc, _)| rpc)
        .collect();
    assert_eq!(ledger, ["AssignWaba"]);
    // The entry says who: without tokens, an anonymous caller and its address.
    let who = a
        .list_audit(ListAuditRequest {
            target: sender("s1"),
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(who.len(), 1);
    assert!(
        who[0].actor.starts_with("anonymous at 127.0.0.1:"),
        "{:?}",
        who[0].actor
    );
    assert!(audit(&mut a, sender("never-changed"), 0).await.is_empty());
}

async fn the_audit_log_keeps_the_newest_hundred_entries_of_a_target(b: Backend) {
    let srv = TestServer::start(b).await;
    let mut a = srv.admin().await;
    for i in 0..105u64 {
        dsl::put_policy_at(
            &mut a,
            sender("s1"),
            dsl::policy(Tier::Tier1k, 100 + i, WindowMode::Conversation),
            D + i as i64,
        )
        .await;
    }
    let kept = audit(&mut a, sender("s1"), 100).await;
    assert_eq!(kept.len(), 100);
    assert_eq!(kept[0].0, D + 104);
    assert!(kept[0].2.contains("custom limit 204"), "{}", kept[0].2);
    assert_eq!(kept[99].0, D + 5, "the five oldest were dropped");
    assert_eq!(audit(&mut a, sender("s1"), 3).await.len(), 3);
}

on_every_ledger!(
    listing_shows_known_targets_in_order_with_tier_used_and_status,
    a_target_whose_state_has_all_expired_leaves_the_listing,
    bad_listing_requests_are_refused_naming_the_field,
    every_admin_change_is_in_the_audit_log_newest_first,
    the_audit_log_keeps_the_newest_hundred_entries_of_a_target,
);

/// The CLI's words for both, from the real binary (run on a blocking thread of a second worker,
/// so the in-process server keeps answering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_targets_and_prints_the_audit_log() {
    let srv = TestServer::start(Backend::Memory).await;
    let mut a = srv.admin().await;
    let t0 = at(9, 0, 0, 0);
    dsl::put_policy_at(
        &mut a,
        sender("15550100"),
        dsl::policy(Tier::Tier1k, 0, WindowMode::Conversation),
        t0,
    )
    .await;
    dsl::assign_at(&mut a, "15550100", "P1", t0 + 1000).await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_waquota"))
            .arg("--addr")
            .arg(srv.endpoint())
            .args(args)
            .env_remove("WAQUOTA_ADDR")
            .env_remove("WAQUOTA_TOKEN")
            .output()
            .expect("run waquota");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let at_flag = format!("--at={}", waquota::cli::rfc3339(t0 + 2000));
    let listed = run(&["targets", "list", &at_flag]);
    let lines: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec![
                "KIND",
                "ID",
                "TIER",
                "USED",
                "LIMIT",
                "STATUS",
                "PORTFOLIO",
                "SENDERS"
            ],
            vec!["portfolio", "P1", "250", "0", "250", "connected", "-", "1"],
            vec![
                "sender",
                "15550100",
                "250",
                "0",
                "250",
                "connected",
                "P1",
                "-"
            ],
        ],
        "{listed}"
    );
    let audited = run(&["audit", "15550100"]);
    let rows: Vec<&str> = audited.lines().collect();
    assert_eq!(rows.len(), 3, "{audited}");
    assert!(rows[1].starts_with("2026-03-02T09:00:01Z  AssignSender  anonymous at 127.0.0.1:"));
    assert!(rows[1].ends_with("sender 15550100 assigned to portfolio P1 (create)"));
    assert!(rows[2].contains("PutPolicy"), "{audited}");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--json", "audit", "--ledger"])).unwrap();
    assert_eq!(json, serde_json::json!([]));
    let kinds: serde_json::Value =
        serde_json::from_str(&run(&["--json", "targets", "list", "--kind", "portfolio"])).unwrap();
    assert_eq!(kinds["targets"][0]["target"]["portfolio"], "P1");
    assert_eq!(kinds["targets"].as_array().unwrap().len(), 1);
}
