//! The one place that converts between the proto and the domain types, and maps errors to
//! gRPC status codes.

use prost_types::{Duration, Timestamp};
use tonic::Status;

use super::guard::Refused;
use crate::ledger::LedgerError;
use crate::model::{
    Decision, Defaults, Inspection, InvalidArgument, MessageKind, Millis, Outcome, Policy,
    PortfolioId, RecipientId, Scope, SenderId, Target, Tier, WindowEntry, WindowMode,
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

/// Largest |time| accepted: year ±10000 in ms, far inside i64 and f64-exact in Lua.
const MAX_ABS_MS: i64 = 253_402_300_800_000;

pub fn ms_from_timestamp(field: &str, t: &Timestamp) -> Result<Millis, InvalidArgument> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(InvalidArgument::new(field, "nanos must be within 0..1e9"));
    }
    let ms = t
        .seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1_000_000)))
        .filter(|ms| ms.abs() <= MAX_ABS_MS)
        .ok_or_else(|| InvalidArgument::new(field, "out of range (years 0 to 9999)"))?;
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
    let tier = match proto::Tier::try_from(p.tier) {
        Ok(t) => tier_from_proto(t).unwrap_or(base.tier),
        Err(_) => {
            return Err(InvalidArgument::new(
                "policy.tier",
                format!("unknown Tier {}", p.tier),
            ));
        }
    };
    let window_mode = match proto::WindowMode::try_from(p.window_mode) {
        Ok(m) => mode_from_proto(m).unwrap_or(base.window_mode),
        Err(_) => {
            return Err(InvalidArgument::new(
                "policy.window_mode",
                format!("unknown WindowMode {}", p.window_mode),
            ));
        }
    };
    if p.custom_limit > 1_000_000_000 {
        return Err(InvalidArgument::new(
            "policy.custom_limit",
            "must be at most 1,000,000,000",
        ));
    }
    Ok(Policy {
        tier,
        custom_limit: p.custom_limit,
        window_mode,
    })
}

pub fn policy_to_proto(p: &Policy) -> proto::Policy {
    proto::Policy {
        tier: tier_to_proto(p.tier) as i32,
        custom_limit: p.custom_limit,
        window_mode: mode_to_proto(p.window_mode) as i32,
    }
}

pub fn decision_to_proto(d: Decision) -> proto::Decision {
    match d {
        Decision::AllowedNew => proto::Decision::AllowedNew,
        Decision::AllowedCounted => proto::Decision::AllowedCounted,
        Decision::AllowedServiceWindow => proto::Decision::AllowedServiceWindow,
        Decision::DeniedLimit => proto::Decision::DeniedLimit,
        Decision::DeniedOutsideServiceWindow => proto::Decision::DeniedOutsideServiceWindow,
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

pub fn outcome(o: Outcome) -> proto::AcquireResponse {
    proto::AcquireResponse {
        decision: decision_to_proto(o.decision) as i32,
        allowed: o.decision.allowed(),
        expires_at: o.expires_at.map(timestamp),
        retry_after: o.retry_after_ms.map(duration),
        limit: o.limit,
        used: o.used,
        remaining: o.remaining,
        tier: tier_to_proto(o.tier) as i32,
        scope: scope_to_proto(o.scope) as i32,
        reservation: o.reservation.map(|r| r.encode()).unwrap_or_default(),
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
    }
}

pub fn window_entry(e: WindowEntry) -> proto::WindowEntry {
    proto::WindowEntry {
        recipient: e.recipient.to_string(),
        expires_at: Some(timestamp(e.expires_at)),
        sender: e.sender.to_string(),
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
    fn untrusted_clock_refuses_at() {
        let t = timestamp(5);
        assert_eq!(clock(Some(&t), false).unwrap_err().field, "at");
        assert_eq!(clock(Some(&t), true).unwrap(), Some(5));
        assert_eq!(clock(None, false).unwrap(), None);
    }
}
