//! Request builders and assertions shared by the behaviour tests.
//!
//! Every call passes a trusted `at` (ms since the epoch) and unwraps the answer; tests that expect
//! an error build the request themselves and check it with [`assert_invalid`].

#![allow(dead_code)]

use tonic::transport::Channel;
use tonic::{Code, Status};
use waquota::proto::admin_service_client::AdminServiceClient;
use waquota::proto::quota_service_client::QuotaServiceClient;
use waquota::proto::{
    AcquireBatchRequest, AcquireRequest, AcquireResponse, AssignSenderRequest, Category,
    ConfirmRequest, Decision, InspectRequest, InspectResponse, ListWindowRequest,
    ListWindowResponse, MessageKind, Policy, PutPolicyRequest, RecordInboundRequest,
    ReleaseRequest, ReportFailureRequest, ResetRequest, Target, Tier, WindowEntry, WindowMode,
    target,
};

use super::{duration_ms, ms_of, ts};

pub type Quota = QuotaServiceClient<Channel>;
pub type Admin = AdminServiceClient<Channel>;

// ------------------------------------------------------------------ targets and ids

pub fn sender(id: &str) -> Option<Target> {
    Some(Target {
        target: Some(target::Target::Sender(id.into())),
    })
}

pub fn portfolio(id: &str) -> Option<Target> {
    Some(Target {
        target: Some(target::Target::Portfolio(id.into())),
    })
}

/// `n` distinct opaque recipient ids: `<prefix>-0000`, `<prefix>-0001`, ...
pub fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

// ------------------------------------------------------------------ QuotaService

pub async fn acquire(q: &mut Quota, sender: &str, recipient: &str, at_ms: i64) -> AcquireResponse {
    acquire_kind(q, sender, recipient, MessageKind::Template, at_ms).await
}

pub async fn free_form(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    at_ms: i64,
) -> AcquireResponse {
    acquire_kind(q, sender, recipient, MessageKind::FreeForm, at_ms).await
}

pub async fn acquire_kind(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    kind: MessageKind,
    at_ms: i64,
) -> AcquireResponse {
    acquire_req(q, sender, recipient, kind, false, at_ms).await
}

pub async fn dry_acquire(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    at_ms: i64,
) -> AcquireResponse {
    acquire_req(q, sender, recipient, MessageKind::Template, true, at_ms).await
}

async fn acquire_req(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    kind: MessageKind,
    dry_run: bool,
    at_ms: i64,
) -> AcquireResponse {
    q.acquire(AcquireRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        kind: kind as i32,
        dry_run,
        at: Some(ts(at_ms)),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("acquire {sender} -> {recipient}: {e}"))
    .into_inner()
}

pub async fn batch<S: AsRef<str>>(
    q: &mut Quota,
    sender: &str,
    recipients: &[S],
    at_ms: i64,
) -> Vec<AcquireResponse> {
    batch_req(q, sender, recipients, false, at_ms).await
}

pub async fn dry_batch<S: AsRef<str>>(
    q: &mut Quota,
    sender: &str,
    recipients: &[S],
    at_ms: i64,
) -> Vec<AcquireResponse> {
    batch_req(q, sender, recipients, true, at_ms).await
}

async fn batch_req<S: AsRef<str>>(
    q: &mut Quota,
    sender: &str,
    recipients: &[S],
    dry_run: bool,
    at_ms: i64,
) -> Vec<AcquireResponse> {
    let results = q
        .acquire_batch(AcquireBatchRequest {
            sender: sender.into(),
            recipients: recipients.iter().map(|r| r.as_ref().to_owned()).collect(),
            kind: MessageKind::Template as i32,
            dry_run,
            at: Some(ts(at_ms)),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("acquire_batch {sender}: {e}"))
        .into_inner()
        .results;
    assert_eq!(results.len(), recipients.len(), "one result per recipient");
    results
}

pub async fn release(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    reservation: &str,
    at_ms: i64,
) -> bool {
    try_release(q, sender, recipient, reservation, at_ms)
        .await
        .unwrap_or_else(|e| panic!("release {sender} -> {recipient}: {e}"))
}

/// A Release that may be refused: `released`, or the status.
pub async fn try_release(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    reservation: &str,
    at_ms: i64,
) -> Result<bool, Status> {
    q.release(ReleaseRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        reservation: reservation.into(),
        at: Some(ts(at_ms)),
    })
    .await
    .map(|r| r.into_inner().released)
}

/// The recipient wrote to the sender; returns when the service window ends (ms).
pub async fn inbound(q: &mut Quota, sender: &str, recipient: &str, at_ms: i64) -> i64 {
    inbound_req(q, sender, recipient, false, at_ms).await
}

/// The recipient came from a click-to-WhatsApp ad (free entry point).
pub async fn inbound_fep(q: &mut Quota, sender: &str, recipient: &str, at_ms: i64) -> i64 {
    inbound_req(q, sender, recipient, true, at_ms).await
}

async fn inbound_req(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    free_entry_point: bool,
    at_ms: i64,
) -> i64 {
    let r = q
        .record_inbound(RecordInboundRequest {
            sender: sender.into(),
            recipient: recipient.into(),
            free_entry_point,
            at: Some(ts(at_ms)),
        })
        .await
        .unwrap_or_else(|e| panic!("record_inbound {sender} <- {recipient}: {e}"))
        .into_inner();
    ms_of(
        r.service_window_expires_at
            .as_ref()
            .expect("service_window_expires_at"),
    )
}

// ------------------------------------------------------------------ AdminService

pub fn policy(tier: Tier, custom_limit: u64, window_mode: WindowMode) -> Policy {
    Policy {
        tier: tier as i32,
        custom_limit,
        window_mode: window_mode as i32,
        ..Default::default()
    }
}

/// The window part of a policy (tier, custom limit, mode): what the quota scenarios set and read
/// back; the sender fields (status, rates, caps) are the policy engine's tests' business.
pub fn window_part(p: &Policy) -> Policy {
    Policy {
        tier: p.tier,
        custom_limit: p.custom_limit,
        window_mode: p.window_mode,
        ..Default::default()
    }
}

pub async fn put_policy(a: &mut Admin, target: Option<Target>, p: Policy) -> Policy {
    a.put_policy(PutPolicyRequest {
        target,
        policy: Some(p),
        at: None,
    })
    .await
    .unwrap_or_else(|e| panic!("put_policy: {e}"))
    .into_inner()
    .policy
    .expect("stored policy")
}

/// Assigns `sender` to `portfolio` ("" detaches).
pub async fn assign(a: &mut Admin, sender: &str, portfolio: &str) {
    a.assign_sender(AssignSenderRequest {
        create: true,
        sender: sender.into(),
        portfolio: portfolio.into(),
        at: None,
    })
    .await
    .unwrap_or_else(|e| panic!("assign_sender {sender} -> {portfolio:?}: {e}"));
}

pub async fn inspect(a: &mut Admin, target: Option<Target>, at_ms: i64) -> InspectResponse {
    inspect_recipient(a, target, "", at_ms).await
}

pub async fn inspect_recipient(
    a: &mut Admin,
    target: Option<Target>,
    recipient: &str,
    at_ms: i64,
) -> InspectResponse {
    a.inspect(InspectRequest {
        target,
        recipient: recipient.into(),
        at: Some(ts(at_ms)),
    })
    .await
    .unwrap_or_else(|e| panic!("inspect: {e}"))
    .into_inner()
}

pub async fn list_page(
    a: &mut Admin,
    target: Option<Target>,
    page_size: u32,
    token: &str,
    at_ms: i64,
) -> ListWindowResponse {
    a.list_window(ListWindowRequest {
        target,
        page_size,
        page_token: token.into(),
        at: Some(ts(at_ms)),
    })
    .await
    .unwrap_or_else(|e| panic!("list_window: {e}"))
    .into_inner()
}

/// Every page of a listing, following `next_page_token` until it is empty.
pub async fn list_pages(
    a: &mut Admin,
    target: Option<Target>,
    page_size: u32,
    at_ms: i64,
) -> Vec<Vec<WindowEntry>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list_page(a, target.clone(), page_size, &token, at_ms).await;
        pages.push(page.entries);
        if page.next_page_token.is_empty() {
            return pages;
        }
        assert!(pages.len() < 1000, "listing does not end");
        token = page.next_page_token;
    }
}

pub async fn reset(a: &mut Admin, target: Option<Target>, at_ms: i64) -> Result<(), Status> {
    a.reset(ResetRequest {
        target,
        at: Some(ts(at_ms)),
    })
    .await
    .map(|_| ())
}

// ------------------------------------------------------------------ reading answers

/// `(recipient, expires_at ms, sender)` of listing entries.
pub fn entries(e: &[WindowEntry]) -> Vec<(String, i64, String)> {
    e.iter()
        .map(|e| {
            (
                e.recipient.clone(),
                ms_of(e.expires_at.as_ref().expect("expires_at")),
                e.sender.clone(),
            )
        })
        .collect()
}

pub fn expires(r: &AcquireResponse) -> i64 {
    ms_of(
        r.expires_at
            .as_ref()
            .unwrap_or_else(|| panic!("no expires_at in {r:?}")),
    )
}

pub fn retry_after(r: &AcquireResponse) -> i64 {
    duration_ms(
        r.retry_after
            .as_ref()
            .unwrap_or_else(|| panic!("no retry_after in {r:?}")),
    )
}

pub fn opt_ms(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref().map(ms_of)
}

pub fn decisions(rs: &[AcquireResponse]) -> Vec<Decision> {
    rs.iter().map(|r| r.decision()).collect()
}

// ------------------------------------------------------------------ assertions

pub fn is_allowed(d: Decision) -> bool {
    matches!(
        d,
        Decision::AllowedNew | Decision::AllowedCounted | Decision::AllowedServiceWindow
    )
}

/// The decision, `allowed` agreeing with it, and no `retry_after` on an admission.
#[track_caller]
pub fn assert_decision(r: &AcquireResponse, d: Decision) {
    assert_eq!(r.decision(), d, "decision of {r:?}");
    assert_eq!(r.allowed, is_allowed(d), "allowed of {r:?}");
    if r.allowed {
        assert_eq!(
            r.retry_after, None,
            "an admission has no retry_after: {r:?}"
        );
    }
}

/// Decision, `used` and `remaining` at once.
#[track_caller]
pub fn assert_answer(r: &AcquireResponse, d: Decision, used: u64, remaining: u64) {
    assert_decision(r, d);
    assert_eq!(
        (r.used, r.remaining),
        (used, remaining),
        "used/remaining of {r:?}"
    );
}

/// A denial for the messaging limit, retryable in exactly `retry_ms`.
#[track_caller]
pub fn assert_denied_limit(r: &AcquireResponse, retry_ms: i64) {
    assert_decision(r, Decision::DeniedLimit);
    assert_eq!(retry_after(r), retry_ms, "retry_after of {r:?}");
    assert!(r.reservation.is_empty(), "a denial reserves nothing: {r:?}");
}

/// `INVALID_ARGUMENT` whose message names `field`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(res: Result<T, Status>, field: &str) {
    let status = res.expect_err(&format!("expected INVALID_ARGUMENT naming {field}"));
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} does not name {field:?}",
        status.message()
    );
}

// ------------------------------------------------------------------ policy engine
// (docs/contract.md, "Policies")

/// `p` without the sender-only fields (rates and caps), which a portfolio's policy refuses.
pub fn window_only(p: Policy) -> Policy {
    Policy {
        messages_per_second: 0,
        pair_interval: None,
        pair_burst: 0,
        sender_cap: 0,
        marketing_cap: 0,
        marketing_cap_period: None,
        ..p
    }
}

/// Stores a policy on the trusted clock (`at` matters: setting FLAGGED starts the downgrade clock).
pub async fn put_policy_at(a: &mut Admin, target: Option<Target>, p: Policy, at_ms: i64) -> Policy {
    try_put_policy_at(a, target, p, at_ms)
        .await
        .unwrap_or_else(|e| panic!("put_policy: {e}"))
}

pub async fn try_put_policy_at(
    a: &mut Admin,
    target: Option<Target>,
    p: Policy,
    at_ms: i64,
) -> Result<Policy, Status> {
    a.put_policy(PutPolicyRequest {
        target,
        policy: Some(p),
        at: Some(ts(at_ms)),
    })
    .await
    .map(|r| r.into_inner().policy.expect("stored policy"))
}

/// Assigns `sender` to `portfolio` ("" detaches) on the trusted clock.
pub async fn assign_at(a: &mut Admin, sender: &str, portfolio: &str, at_ms: i64) {
    a.assign_sender(AssignSenderRequest {
        create: true,
        sender: sender.into(),
        portfolio: portfolio.into(),
        at: Some(ts(at_ms)),
    })
    .await
    .unwrap_or_else(|e| panic!("assign_sender {sender} -> {portfolio:?}: {e}"));
}

/// A template message of a category.
pub async fn acquire_category(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    category: Category,
    at_ms: i64,
) -> AcquireResponse {
    q.acquire(AcquireRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        kind: MessageKind::Template as i32,
        category: category as i32,
        at: Some(ts(at_ms)),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("acquire {sender} -> {recipient}: {e}"))
    .into_inner()
}

/// A batch of template messages of a category.
pub async fn batch_category<S: AsRef<str>>(
    q: &mut Quota,
    sender: &str,
    recipients: &[S],
    category: Category,
    at_ms: i64,
) -> Vec<AcquireResponse> {
    let results = q
        .acquire_batch(AcquireBatchRequest {
            sender: sender.into(),
            recipients: recipients.iter().map(|r| r.as_ref().to_owned()).collect(),
            kind: MessageKind::Template as i32,
            category: category as i32,
            at: Some(ts(at_ms)),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("acquire_batch {sender}: {e}"))
        .into_inner()
        .results;
    assert_eq!(results.len(), recipients.len(), "one result per recipient");
    results
}

/// Confirms the delivery of a reservation's message; the slot's new expiry (ms), or the status.
pub async fn confirm(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    reservation: &str,
    delivered_at_ms: Option<i64>,
    at_ms: i64,
) -> Result<i64, Status> {
    q.confirm(ConfirmRequest {
        sender: sender.into(),
        recipient: recipient.into(),
        reservation: reservation.into(),
        delivered_at: delivered_at_ms.map(ts),
        at: Some(ts(at_ms)),
    })
    .await
    .map(|r| ms_of(r.into_inner().expires_at.as_ref().expect("expires_at")))
}

/// Reports WhatsApp's refusal of a message: `(released, hold_until ms)`.
pub async fn report_failure(
    q: &mut Quota,
    sender: &str,
    recipient: &str,
    reservation: &str,
    error_code: u32,
    at_ms: i64,
) -> (bool, Option<i64>) {
    let r = q
        .report_failure(ReportFailureRequest {
            sender: sender.into(),
            recipient: recipient.into(),
            reservation: reservation.into(),
            error_code,
            at: Some(ts(at_ms)),
        })
        .await
        .unwrap_or_else(|e| panic!("report_failure {sender} -> {recipient}: {e}"))
        .into_inner();
    (r.released, r.hold_until.as_ref().map(ms_of))
}

/// A denial with exactly this decision and `retry_after`, reserving nothing.
#[track_caller]
pub fn assert_denied(r: &AcquireResponse, d: Decision, retry_ms: i64) {
    assert_decision(r, d);
    assert_eq!(retry_after(r), retry_ms, "retry_after of {r:?}");
    assert!(r.reservation.is_empty(), "a denial reserves nothing: {r:?}");
}

/// A denial with this decision and no `retry_after` (waiting does not help).
#[track_caller]
pub fn assert_denied_for_good(r: &AcquireResponse, d: Decision) {
    assert_decision(r, d);
    assert_eq!(r.retry_after, None, "no retry_after in {r:?}");
    assert!(r.reservation.is_empty(), "a denial reserves nothing: {r:?}");
}
