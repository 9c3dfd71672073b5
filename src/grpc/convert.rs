//! The one place that converts between the proto and the domain types, and maps errors to
//! gRPC status codes.

use prost_types::{Duration, Timestamp};
use tonic::Status;

use super::guard::Refused;
use crate::ledger::LedgerError;
use crate::model::{
    AuditEntry, Category, DAY_MS, Decision, Defaults, Inspection, InvalidArgument, MAX_ABS_MS,
    MessageKind, Millis, Outcome, Policy, PortfolioId, Projection, Quality, RecipientId,
    ReservationSigner, RuleSet, Scope, SenderId, SenderStatus, Target, TargetKind, Tier,
    WindowEntry, WindowMode,
};
use crate::proto;

/// Every ledger error becomes one status code here, and nowhere else.
pub fn status(e: LedgerError) -> Status {
    match e {
        LedgerError::Invalid(e) => invalid(e),
        LedgerError::Unavailable(m) | LedgerError::Contended(m) => Status::unavailable(m),
        LedgerError::FailedPrecondition(m) => Status::failed_precondition(m),
        LedgerError::Internal(m) => Status::internal(m),
    }
}

/// Calls the guard answers itself, before any service runs.
pub fn refused(r: Refused) -> Status {
    let m = r.to_string();
    match r {
        Refused::Unauthenticated => Status::unauthenticated(m),
        Refused::PermissionDenied => Status::permission_denied(m),
        Refused::Overloaded => Status::resource_exhausted(m),
        Refused::DeadlineExceeded => Status::deadline_exceeded(m),
    }
}

pub fn invalid(e: InvalidArgument) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The range of `MAX_ABS_MS`, to the millisecond: ±9,007,199,254,740 ms from the epoch.
const AT_RANGE: &str =
    "out of range: accepted from 1684-07-28T00:12:25.260Z to 2255-06-05T23:47:34.740Z";

pub fn ms_from_timestamp(field: &str, t: &Timestamp) -> Result<Millis, InvalidArgument> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(InvalidArgument::new(field, "nanos must be within 0..1e9"));
    }
    let ms = t
        .seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1_000_000)))
        .filter(|ms| ms.abs() <= MAX_ABS_MS)
        .ok_or_else(|| InvalidArgument::new(field, AT_RANGE))?;
    Ok(ms)
}

pub fn timestamp(ms: Millis) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn duration(ms: Millis) -> Duration {
    Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The request's clock: `at` when the server trusts client clocks, refused otherwise.
pub fn clock(at: Option<&Timestamp>, trusted: bool) -> Result<Option<Millis>, InvalidArgument> {
    match at {
        None => Ok(None),
        Some(_) if !trusted => Err(InvalidArgument::new(
            "at",
            "this server does not trust client clocks (start it with --trust-client-clock)",
        )),
        Some(t) => ms_from_timestamp("at", t).map(Some),
    }
}

pub fn kind(v: i32) -> Result<MessageKind, InvalidArgument> {
    match proto::MessageKind::try_from(v) {
        Ok(proto::MessageKind::Unspecified | proto::MessageKind::Template) => {
            Ok(MessageKind::Template)
        }
        Ok(proto::MessageKind::FreeForm) => Ok(MessageKind::FreeForm),
        Err(_) => Err(InvalidArgument::new(
            "kind",
            format!("unknown MessageKind {v}"),
        )),
    }
}

pub fn category(v: i32) -> Result<Option<Category>, InvalidArgument> {
    Ok(match proto::Category::try_from(v) {
        Ok(proto::Category::Unspecified) => None,
        Ok(proto::Category::Marketing) => Some(Category::Marketing),
        Ok(proto::Category::Utility) => Some(Category::Utility),
        Ok(proto::Category::Authentication) => Some(Category::Authentication),
        Ok(proto::Category::Service) => Some(Category::Service),
        Err(_) => {
            return Err(InvalidArgument::new(
                "category",
                format!("unknown Category {v}"),
            ));
        }
    })
}

/// A duration field in milliseconds: unset = 0 (the default), else a whole number of
/// milliseconds within 1 ms ..= `max` (a finer one is refused, not cut to the millisecond).
fn duration_ms(field: &str, d: Option<&Duration>, max: Millis) -> Result<Millis, InvalidArgument> {
    let Some(d) = d else { return Ok(0) };
    if !(0..1_000_000_000).contains(&d.nanos) || d.seconds < 0 {
        return Err(InvalidArgument::new(field, "must be a positive duration"));
    }
    if d.nanos % 1_000_000 != 0 {
        return Err(InvalidArgument::new(
            field,
            format!(
                "must be a whole number of milliseconds, got {} ns over",
                d.nanos % 1_000_000
            ),
        ));
    }
    let ms = d
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(d.nanos / 1_000_000));
    if ms < 1 || ms > max {
        return Err(InvalidArgument::new(
            field,
            format!("must be between 1 ms and {} h", max / 3_600_000),
        ));
    }
    Ok(ms)
}

pub fn target(t: Option<&proto::Target>) -> Result<Target, InvalidArgument> {
    match t.and_then(|t| t.target.as_ref()) {
        Some(proto::target::Target::Sender(s)) => {
            Ok(Target::Sender(SenderId::parse("target.sender", s)?))
        }
        Some(proto::target::Target::Portfolio(p)) => Ok(Target::Portfolio(PortfolioId::parse(
            "target.portfolio",
            p,
        )?)),
        None => Err(InvalidArgument::new(
            "target",
            "set either sender or portfolio",
        )),
    }
}

pub fn optional_recipient(field: &str, s: &str) -> Result<Option<RecipientId>, InvalidArgument> {
    if s.is_empty() {
        Ok(None)
    } else {
        RecipientId::parse(field, s).map(Some)
    }
}

pub fn tier_from_proto(t: proto::Tier) -> Option<Tier> {
    Some(match t {
        proto::Tier::Unspecified => return None,
        proto::Tier::Tier50 => Tier::T50,
        proto::Tier::Tier250 => Tier::T250,
        proto::Tier::Tier1k => Tier::T1K,
        proto::Tier::Tier2k => Tier::T2K,
        proto::Tier::Tier10k => Tier::T10K,
        proto::Tier::Tier100k => Tier::T100K,
        proto::Tier::Unlimited => Tier::Unlimited,
    })
}

pub fn tier_to_proto(t: Tier) -> proto::Tier {
    match t {
        Tier::T50 => proto::Tier::Tier50,
        Tier::T250 => proto::Tier::Tier250,
        Tier::T1K => proto::Tier::Tier1k,
        Tier::T2K => proto::Tier::Tier2k,
        Tier::T10K => proto::Tier::Tier10k,
        Tier::T100K => proto::Tier::Tier100k,
        Tier::Unlimited => proto::Tier::Unlimited,
    }
}

pub fn mode_to_proto(m: WindowMode) -> proto::WindowMode {
    match m {
        WindowMode::Conversation => proto::WindowMode::Conversation,
        WindowMode::Rolling => proto::WindowMode::Rolling,
    }
}

pub fn mode_from_proto(m: proto::WindowMode) -> Option<WindowMode> {
    match m {
        proto::WindowMode::Unspecified => None,
        proto::WindowMode::Conversation => Some(WindowMode::Conversation),
        proto::WindowMode::Rolling => Some(WindowMode::Rolling),
    }
}

/// A policy from the wire; unspecified fields take the target kind's configured default.
pub fn policy(
    p: Option<&proto::Policy>,
    target: &Target,
    defaults: &Defaults,
) -> Result<Policy, InvalidArgument> {
    let p = p.ok_or_else(|| InvalidArgument::new("policy", "required"))?;
    let base = match target {
        Target::Sender(_) => defaults.sender,
        Target::Portfolio(_) => defaults.portfolio,
    };
    let unknown = |field: &str, what: &str, v: i32| {
        InvalidArgument::new(field, format!("unknown {what} {v}"))
    };
    let tier = match proto::Tier::try_from(p.tier) {
        Ok(t) => tier_from_proto(t).unwrap_or(base.tier),
        Err(_) => return Err(unknown("policy.tier", "Tier", p.tier)),
    };
    let window_mode = match proto::WindowMode::try_from(p.window_mode) {
        Ok(m) => mode_from_proto(m).unwrap_or(base.window_mode),
        Err(_) => return Err(unknown("policy.window_mode", "WindowMode", p.window_mode)),
    };
    let status = match proto::SenderStatus::try_from(p.status) {
        Ok(s) => status_from_proto(s).unwrap_or(SenderStatus::Connected),
        Err(_) => return Err(unknown("policy.status", "SenderStatus", p.status)),
    };
    let quality = match proto::Quality::try_from(p.quality) {
        Ok(proto::Quality::Unspecified) => None,
        Ok(proto::Quality::Green) => Some(Quality::Green),
        Ok(proto::Quality::Yellow) => Some(Quality::Yellow),
        Ok(proto::Quality::Red) => Some(Quality::Red),
        Err(_) => return Err(unknown("policy.quality", "Quality", p.quality)),
    };
    let rule_set = match proto::RuleSet::try_from(p.rule_set) {
        Ok(proto::RuleSet::Unspecified) => base.rule_set,
        Ok(proto::RuleSet::Legacy) => RuleSet::Legacy,
        Ok(proto::RuleSet::Portfolio) => RuleSet::Portfolio,
        Err(_) => return Err(unknown("policy.rule_set", "RuleSet", p.rule_set)),
    };
    // A sender's own settings decide per sender, from the sender's policy, wherever its window
    // is (docs/contract.md, "Policies"): on a portfolio they would be stored and never used.
    if let Target::Portfolio(_) = target {
        let set = [
            ("messages_per_second", p.messages_per_second != 0),
            ("pair_interval", p.pair_interval.is_some()),
            ("pair_burst", p.pair_burst != 0),
            ("sender_cap", p.sender_cap != 0),
            ("marketing_cap", p.marketing_cap != 0),
            ("marketing_cap_period", p.marketing_cap_period.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, given)| *given) {
            return Err(InvalidArgument::new(
                format!("policy.{field}"),
                "has no effect on a portfolio: it is a sender's own setting; set it on each \
                 sender (waquota policy set <sender>)",
            ));
        }
    }
    if p.custom_limit > 1_000_000_000 {
        return Err(InvalidArgument::new(
            "policy.custom_limit",
            "must be at most 1,000,000,000",
        ));
    }
    // Like custom_limit: a count of slots, which the Redis ledger keeps as a Lua number (a
    // double: exact only up to 2^53).
    if p.sender_cap > 1_000_000_000 {
        return Err(InvalidArgument::new(
            "policy.sender_cap",
            "must be at most 1,000,000,000 (0 = no cap)",
        ));
    }
    if p.messages_per_second > 100_000 {
        return Err(InvalidArgument::new(
            "policy.messages_per_second",
            "must be 1 to 100,000 (0 = the default)",
        ));
    }
    if p.pair_burst > 10_000 {
        return Err(InvalidArgument::new(
            "policy.pair_burst",
            "must be at most 10,000 (0 = the default)",
        ));
    }
    if p.headroom_percent > 99 {
        return Err(InvalidArgument::new(
            "policy.headroom_percent",
            "must be 0 to 99",
        ));
    }
    if p.marketing_cap > 10_000 {
        return Err(InvalidArgument::new(
            "policy.marketing_cap",
            "must be at most 10,000 (0 = no cap)",
        ));
    }
    Ok(Policy {
        tier,
        custom_limit: p.custom_limit,
        window_mode,
        status,
        quality,
        messages_per_second: p.messages_per_second,
        pair_interval_ms: duration_ms("policy.pair_interval", p.pair_interval.as_ref(), DAY_MS)?,
        pair_burst: p.pair_burst,
        headroom_percent: p.headroom_percent,
        sender_cap: p.sender_cap,
        marketing_cap: p.marketing_cap,
        marketing_cap_period_ms: duration_ms(
            "policy.marketing_cap_period",
            p.marketing_cap_period.as_ref(),
            90 * DAY_MS,
        )?,
        rule_set,
        auto_tier: p.auto_tier,
        status_until: p
            .status_until
            .as_ref()
            .map(|t| ms_from_timestamp("policy.status_until", t))
            .transpose()?,
    })
}

/// `None` for UNSPECIFIED (a policy reads it as CONNECTED).
pub fn status_from_proto(s: proto::SenderStatus) -> Option<SenderStatus> {
    Some(match s {
        proto::SenderStatus::Unspecified => return None,
        proto::SenderStatus::Connected => SenderStatus::Connected,
        proto::SenderStatus::Flagged => SenderStatus::Flagged,
        proto::SenderStatus::Restricted => SenderStatus::Restricted,
        proto::SenderStatus::Paused => SenderStatus::Paused,
        proto::SenderStatus::Banned => SenderStatus::Banned,
        proto::SenderStatus::Disconnected => SenderStatus::Disconnected,
    })
}

pub fn status_to_proto(s: SenderStatus) -> proto::SenderStatus {
    match s {
        SenderStatus::Connected => proto::SenderStatus::Connected,
        SenderStatus::Flagged => proto::SenderStatus::Flagged,
        SenderStatus::Restricted => proto::SenderStatus::Restricted,
        SenderStatus::Paused => proto::SenderStatus::Paused,
        SenderStatus::Banned => proto::SenderStatus::Banned,
        SenderStatus::Disconnected => proto::SenderStatus::Disconnected,
    }
}

pub fn policy_to_proto(p: &Policy) -> proto::Policy {
    proto::Policy {
        tier: tier_to_proto(p.tier) as i32,
        custom_limit: p.custom_limit,
        window_mode: mode_to_proto(p.window_mode) as i32,
        status: status_to_proto(p.status) as i32,
        quality: match p.quality {
            None => proto::Quality::Unspecified,
            Some(Quality::Green) => proto::Quality::Green,
            Some(Quality::Yellow) => proto::Quality::Yellow,
            Some(Quality::Red) => proto::Quality::Red,
        } as i32,
        messages_per_second: p.messages_per_second,
        pair_interval: (p.pair_interval_ms > 0).then(|| duration(p.pair_interval_ms)),
        pair_burst: p.pair_burst,
        headroom_percent: p.headroom_percent,
        sender_cap: p.sender_cap,
        marketing_cap: p.marketing_cap,
        marketing_cap_period: (p.marketing_cap_period_ms > 0)
            .then(|| duration(p.marketing_cap_period_ms)),
        rule_set: match p.rule_set {
            RuleSet::Legacy => proto::RuleSet::Legacy,
            RuleSet::Portfolio => proto::RuleSet::Portfolio,
        } as i32,
        auto_tier: p.auto_tier,
        status_until: p.status_until.map(timestamp),
    }
}

fn projection_to_proto(p: &Projection) -> Option<proto::Projection> {
    (!p.is_empty()).then(|| proto::Projection {
        next_tier: p.next_tier.map_or(proto::Tier::Unspecified, tier_to_proto) as i32,
        upgrade_at: p.upgrade_at.map(timestamp),
        downgrade_at: p.downgrade_at.map(timestamp),
    })
}

pub fn decision_to_proto(d: Decision) -> proto::Decision {
    match d {
        Decision::AllowedNew => proto::Decision::AllowedNew,
        Decision::AllowedCounted => proto::Decision::AllowedCounted,
        Decision::AllowedServiceWindow => proto::Decision::AllowedServiceWindow,
        Decision::DeniedLimit => proto::Decision::DeniedLimit,
        Decision::DeniedOutsideServiceWindow => proto::Decision::DeniedOutsideServiceWindow,
        Decision::DeniedThroughput => proto::Decision::DeniedThroughput,
        Decision::DeniedPairRate => proto::Decision::DeniedPairRate,
        Decision::DeniedSenderBlocked => proto::Decision::DeniedSenderBlocked,
        Decision::DeniedMarketingCap => proto::Decision::DeniedMarketingCap,
        Decision::DeniedLedgerLost => proto::Decision::DeniedLedgerLost,
    }
}

pub fn scope_to_proto(s: Scope) -> proto::Scope {
    match s {
        Scope::Sender => proto::Scope::Sender,
        Scope::Portfolio => proto::Scope::Portfolio,
    }
}

pub fn scope_from_proto(s: proto::Scope) -> Option<Scope> {
    match s {
        proto::Scope::Unspecified => None,
        proto::Scope::Sender => Some(Scope::Sender),
        proto::Scope::Portfolio => Some(Scope::Portfolio),
    }
}

/// An outcome on the wire; its reservation is signed for the sender and recipient (`signer` is
/// given whenever an outcome carries one).
pub fn outcome(
    o: Outcome,
    sender: &SenderId,
    signer: Option<&ReservationSigner>,
) -> proto::AcquireResponse {
    proto::AcquireResponse {
        decision: decision_to_proto(o.decision) as i32,
        allowed: o.decision.allowed(),
        expires_at: o.expires_at.map(timestamp),
        retry_after: o.retry_after_ms.map(duration),
        retry_at: o.retry_after_ms.map(|w| timestamp(o.decided_at + w)),
        limit: o.limit,
        used: o.used,
        remaining: o.remaining,
        tier: tier_to_proto(o.tier) as i32,
        scope: scope_to_proto(o.scope) as i32,
        reservation: o
            .reservation
            .zip(signer)
            .map(|(r, k)| k.encode(sender, &o.recipient, &r))
            .unwrap_or_default(),
        recipient: o.recipient.to_string(),
        store_outage: false,
    }
}

/// The answer of `on_store_error = allow`: admitted, but nothing is known and nothing recorded.
pub fn outage_admission(recipient: &RecipientId) -> proto::AcquireResponse {
    proto::AcquireResponse {
        decision: proto::Decision::AllowedNew as i32,
        allowed: true,
        recipient: recipient.to_string(),
        store_outage: true,
        ..Default::default()
    }
}

pub fn inspection(i: Inspection) -> proto::InspectResponse {
    proto::InspectResponse {
        policy: Some(policy_to_proto(&i.policy)),
        scope: scope_to_proto(i.scope) as i32,
        limit: i.limit,
        used: i.used,
        remaining: i.remaining,
        next_slot_free_at: i.next_slot_free_at.map(timestamp),
        slots_freeing_next_hour: i.slots_freeing_next_hour,
        open_service_windows: i.open_service_windows,
        portfolio: i.portfolio.map(|p| p.to_string()).unwrap_or_default(),
        counted_until: i.counted_until.map(timestamp),
        service_window_until: i.service_window_until.map(timestamp),
        recipient: i.recipient.map(|r| r.to_string()).unwrap_or_default(),
        now: Some(timestamp(i.now)),
        senders: i.senders.into_iter().map(|s| s.to_string()).collect(),
        effective_limit: i.effective_limit,
        unique_7d: i.unique_7d,
        unique_30d: i.unique_30d,
        projection: projection_to_proto(&i.projection),
        sender_policy: i.sender_policy.as_ref().map(policy_to_proto),
        known: i.known,
    }
}

pub fn target_to_proto(t: &Target) -> proto::Target {
    proto::Target {
        target: Some(match t {
            Target::Sender(s) => proto::target::Target::Sender(s.to_string()),
            Target::Portfolio(p) => proto::target::Target::Portfolio(p.to_string()),
        }),
    }
}

/// `ListTargetsRequest.kind`: None for both.
pub fn target_kind(kind: i32) -> Result<Option<TargetKind>, InvalidArgument> {
    match proto::TargetKind::try_from(kind) {
        Ok(proto::TargetKind::Unspecified) => Ok(None),
        Ok(proto::TargetKind::Sender) => Ok(Some(TargetKind::Sender)),
        Ok(proto::TargetKind::Portfolio) => Ok(Some(TargetKind::Portfolio)),
        Err(_) => Err(InvalidArgument::new(
            "kind",
            format!("unknown target kind {kind}"),
        )),
    }
}

/// One line of a target listing, from its Inspect: the status is the one in force (a status
/// whose `status_until` passed reads CONNECTED).
pub fn target_summary(t: &Target, i: &Inspection) -> proto::TargetSummary {
    let own = i.sender_policy.as_ref().unwrap_or(&i.policy);
    proto::TargetSummary {
        target: Some(target_to_proto(t)),
        scope: scope_to_proto(i.scope) as i32,
        tier: tier_to_proto(i.policy.tier) as i32,
        limit: i.limit,
        used: i.used,
        remaining: i.remaining,
        status: status_to_proto(own.status_at(i.now)) as i32,
        portfolio: i
            .portfolio
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        senders: i.senders.len() as u64,
    }
}

/// A stored policy in words, for the audit log: what always matters, and each other field
/// that is set.
pub fn policy_summary(p: &Policy) -> String {
    let mut out = format!(
        "tier {}, {} window, status {}",
        p.tier.name(),
        p.window_mode.name(),
        p.status.name()
    );
    let mut add = |what: &str, value: String| out.push_str(&format!(", {what} {value}"));
    if p.custom_limit > 0 {
        add("custom limit", p.custom_limit.to_string());
    }
    if let Some(q) = p.quality {
        add("quality", q.name().to_owned());
    }
    if let Some(until) = p.status_until {
        add("status until", crate::cli::rfc3339(until));
    }
    if p.messages_per_second > 0 {
        add("messages per second", p.messages_per_second.to_string());
    }
    if p.pair_interval_ms > 0 {
        add("pair interval", format!("{} ms", p.pair_interval_ms));
    }
    if p.pair_burst > 0 {
        add("pair burst", p.pair_burst.to_string());
    }
    if p.headroom_percent > 0 {
        add("headroom", format!("{}%", p.headroom_percent));
    }
    if p.sender_cap > 0 {
        add("sender cap", p.sender_cap.to_string());
    }
    if p.marketing_cap > 0 {
        add("marketing cap", p.marketing_cap.to_string());
    }
    if p.marketing_cap_period_ms > 0 {
        add(
            "marketing period",
            format!("{} ms", p.marketing_cap_period_ms),
        );
    }
    if p.auto_tier {
        add("auto tier", "on".to_owned());
    }
    out.push_str(&format!(", rules {}", p.rule_set.name()));
    out
}

pub fn audit_entry(e: AuditEntry) -> proto::AuditEntry {
    proto::AuditEntry {
        at: Some(timestamp(e.at)),
        rpc: e.rpc,
        actor: e.actor,
        change: e.change,
        target: e.target.as_ref().map(target_to_proto),
    }
}

pub fn window_entry(e: WindowEntry) -> proto::WindowEntry {
    proto::WindowEntry {
        recipient: e.recipient.to_string(),
        expires_at: Some(timestamp(e.expires_at)),
        sender: e.sender.to_string(),
    }
}

/// A plan request in domain terms; `at` is the clock already resolved (trusted or not).
pub fn plan_input(
    r: proto::PlanRequest,
    at: Option<Millis>,
) -> Result<crate::plan::PlanInput, InvalidArgument> {
    use crate::plan::{Campaign, DEFAULT_HORIZON_MS, MAX_HORIZON_MS, PlanInput};
    let target = target(r.target.as_ref())?;
    let campaign = match (r.new_users, r.recipients.is_empty()) {
        (0, false) => Campaign::Recipients(
            r.recipients
                .iter()
                .enumerate()
                .map(|(i, s)| RecipientId::parse(&format!("recipients[{i}]"), s))
                .collect::<Result<_, _>>()?,
        ),
        (n, true) => Campaign::New(n),
        (_, false) => {
            return Err(InvalidArgument::new(
                "recipients",
                "give new_users or recipients, not both",
            ));
        }
    };
    let horizon_ms = match r.horizon.as_ref() {
        None => DEFAULT_HORIZON_MS,
        d => duration_ms("horizon", d, MAX_HORIZON_MS)?,
    };
    let input = PlanInput {
        target,
        campaign,
        start: r
            .start
            .as_ref()
            .map(|t| ms_from_timestamp("start", t))
            .transpose()?,
        rate: (r.rate != 0.0).then_some(r.rate),
        category: category(r.category)?,
        deliveries_per_user: r.deliveries_per_user.max(1),
        with_upgrades: r.with_upgrades,
        horizon_ms,
        at,
    };
    // A negative or NaN rate is Some and refused there, naming `rate`.
    input.validate()?;
    Ok(input)
}

fn planned_tier(t: &crate::plan::PlannedTier) -> proto::PlannedTier {
    proto::PlannedTier {
        tier: tier_to_proto(t.tier) as i32,
        at: Some(timestamp(t.at)),
        new_users: t.new_users,
    }
}

pub fn plan(p: crate::plan::Plan) -> proto::PlanResponse {
    proto::PlanResponse {
        now: Some(timestamp(p.now)),
        start: Some(timestamp(p.start)),
        rate: p.rate,
        completes_at: p.completes_at.map(timestamp),
        stalled: p.stalled.unwrap_or_default(),
        users: p.users,
        messages: p.messages,
        new_users: p.new_users,
        free_users: p.free_users,
        skipped_users: p.skipped_users,
        used_at_start: p.used_at_start,
        remaining_at_start: p.remaining_at_start,
        hours: p
            .hours
            .iter()
            .map(|h| proto::PlanHour {
                start: Some(timestamp(h.start)),
                sent: h.sent,
                new_users: h.new_users,
                refused_limit: h.refused_limit,
                refused_other: h.refused_other,
                freed: h.freed,
                used: h.used,
                remaining: h.remaining,
                limit: h.limit,
                tier: tier_to_proto(h.tier) as i32,
            })
            .collect(),
        upgrades: p.upgrades.iter().map(planned_tier).collect(),
        ladder: p.ladder.iter().map(planned_tier).collect(),
        ladder_note: p.ladder_note,
        senders: p.senders.iter().map(|s| s.to_string()).collect(),
        scope: scope_to_proto(match p.owner {
            Target::Sender(_) => Scope::Sender,
            Target::Portfolio(_) => Scope::Portfolio,
        }) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_to_the_millisecond() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            assert_eq!(ms_from_timestamp("at", &timestamp(ms)).unwrap(), ms);
        }
        assert!(
            ms_from_timestamp(
                "at",
                &Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                }
            )
            .is_err()
        );
        assert!(
            ms_from_timestamp(
                "at",
                &Timestamp {
                    seconds: 0,
                    nanos: -1
                }
            )
            .is_err()
        );
    }

    #[test]
    fn at_is_accepted_from_its_first_to_its_last_millisecond() {
        for ms in [-MAX_ABS_MS, MAX_ABS_MS] {
            assert_eq!(ms_from_timestamp("at", &timestamp(ms)).unwrap(), ms);
        }
        // The last nanosecond of the last millisecond is still that millisecond.
        let last = Timestamp {
            nanos: timestamp(MAX_ABS_MS).nanos + 999_999,
            ..timestamp(MAX_ABS_MS)
        };
        assert_eq!(ms_from_timestamp("at", &last).unwrap(), MAX_ABS_MS);
        for ms in [-MAX_ABS_MS - 1, MAX_ABS_MS + 1] {
            let e = ms_from_timestamp("at", &timestamp(ms)).unwrap_err();
            assert!(
                e.reason
                    .contains("1684-07-28T00:12:25.260Z to 2255-06-05T23:47:34.740Z"),
                "{e}"
            );
        }
    }

    #[test]
    fn durations_must_be_whole_milliseconds() {
        let d = |seconds, nanos| Duration { seconds, nanos };
        assert_eq!(duration_ms("f", Some(&d(1, 5_000_000)), DAY_MS), Ok(1_005));
        for bad in [d(0, 1_000_500), d(0, 1), d(86_399, 999_999_999)] {
            let e = duration_ms("policy.pair_interval", Some(&bad), DAY_MS).unwrap_err();
            assert_eq!(e.field, "policy.pair_interval");
            assert!(e.reason.contains("whole number of milliseconds"), "{e}");
        }
    }

    #[test]
    fn sender_cap_is_bounded_like_custom_limit() {
        let target = Target::Sender(SenderId::parse("s", "s").unwrap());
        let d = Defaults::default();
        let with_cap = |sender_cap| proto::Policy {
            sender_cap,
            ..Default::default()
        };
        let ok = policy(Some(&with_cap(1_000_000_000)), &target, &d).unwrap();
        assert_eq!(ok.sender_cap, 1_000_000_000);
        for cap in [1_000_000_001, (1 << 53) + 1, 1 << 63, u64::MAX] {
            let e = policy(Some(&with_cap(cap)), &target, &d).unwrap_err();
            assert_eq!(e.field, "policy.sender_cap", "{cap}");
        }
    }

    #[test]
    fn untrusted_clock_refuses_at() {
        let t = timestamp(5);
        assert_eq!(clock(Some(&t), false).unwrap_err().field, "at");
        assert_eq!(clock(Some(&t), true).unwrap(), Some(5));
        assert_eq!(clock(None, false).unwrap(), None);
    }
}
