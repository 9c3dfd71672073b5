//! Replies and stored values: decoding what the scripts answer, and a policy as the hash
//! fields the scripts read (`read_policy` in lua/lib.lua) and write back (`policy_out`).

use redis::Value;

use super::keys::Home;
use crate::ledger::{LedgerError, Result};
use crate::model::{
    Decision, Millis, Policy, PortfolioId, Quality, Reservation, RuleSet, Scope, SenderStatus,
    Tier, WindowMode,
};

pub(super) fn bad_reply(what: &str, v: &Value) -> LedgerError {
    LedgerError::Internal(format!("unexpected reply from the {what} script: {v:?}"))
}

pub(super) fn items(v: Value) -> std::result::Result<Vec<Value>, Value> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(other),
    }
}

pub(super) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A time the scripts report as -1 when there is none.
pub(super) fn opt_ms(v: &Value) -> Option<Millis> {
    int(v).filter(|ms| *ms != -1)
}

/// `{"moved", portfolio}`: the sender lives elsewhere (portfolio "" = its own home).
pub(super) fn moved(v: &Value) -> Option<Option<PortfolioId>> {
    let Value::Array(items) = v else { return None };
    match items.first() {
        Some(Value::BulkString(b)) if b == b"moved" => {
            let p = items.get(1).and_then(text).unwrap_or_default();
            Some(if p.is_empty() {
                None
            } else {
                PortfolioId::parse("portfolio", &p).ok()
            })
        }
        _ => None,
    }
}

/// A policy as the hash fields the scripts read (`read_policy` in lua/lib.lua).
pub(super) fn policy_fields(p: &Policy) -> [(&'static str, String); 15] {
    [
        ("tier", p.tier.name().to_owned()),
        ("custom", p.custom_limit.to_string()),
        ("mode", p.window_mode.name().to_owned()),
        ("status", p.status.name().to_owned()),
        (
            "quality",
            p.quality.map(|q| q.name()).unwrap_or_default().to_owned(),
        ),
        ("mps", p.messages_per_second.to_string()),
        ("pint", p.pair_interval_ms.to_string()),
        ("pburst", p.pair_burst.to_string()),
        ("head", p.headroom_percent.to_string()),
        ("scap", p.sender_cap.to_string()),
        ("mcap", p.marketing_cap.to_string()),
        ("mper", p.marketing_cap_period_ms.to_string()),
        ("rules", p.rule_set.name().to_owned()),
        ("auto", if p.auto_tier { "1" } else { "0" }.to_owned()),
        (
            "su",
            p.status_until.map(|t| t.to_string()).unwrap_or_default(),
        ),
    ]
}

/// How many values `policy_out` (lua/lib.lua) returns for one policy.
pub(super) const POLICY_FIELDS: usize = 15;

/// A policy from the values `policy_out` returned, in `policy_fields` order.
pub(super) fn parse_policy(f: &[Value]) -> Option<Policy> {
    let t = |i: usize| text(&f[i]);
    let n = |i: usize| int(&f[i]);
    let quality = t(4)?;
    Some(Policy {
        tier: Tier::from_name(&t(0)?)?,
        custom_limit: n(1)? as u64,
        window_mode: WindowMode::from_name(&t(2)?)?,
        status: SenderStatus::from_name(&t(3)?)?,
        quality: if quality.is_empty() {
            None
        } else {
            Some(Quality::from_name(&quality)?)
        },
        messages_per_second: n(5)? as u32,
        pair_interval_ms: n(6)?,
        pair_burst: n(7)? as u32,
        headroom_percent: n(8)? as u32,
        sender_cap: n(9)? as u64,
        marketing_cap: n(10)? as u32,
        marketing_cap_period_ms: n(11)?,
        rule_set: RuleSet::from_name(&t(12)?)?,
        auto_tier: n(13)? == 1,
        status_until: t(14).filter(|s| !s.is_empty()).and_then(|s| s.parse().ok()),
    })
}

pub(super) fn scope_of(home: &Home) -> Scope {
    match home {
        Home::Sender(_) => Scope::Sender,
        Home::Portfolio(_) => Scope::Portfolio,
    }
}

pub(super) fn tier_named(s: &str) -> Result<Tier> {
    Tier::from_name(s)
        .ok_or_else(|| LedgerError::Internal(format!("unknown tier {s:?} stored in Redis")))
}

/// The acquire script's reply (lua/acquire.lua), by name: a head, then one part per recipient
/// in the order asked. The one place that knows its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireReply {
    /// The decision's clock.
    pub now: Millis,
    /// The window's limit (0 = unlimited), its tier in force and its limit less the headroom.
    pub limit: u64,
    pub tier: Tier,
    pub effective: u64,
    /// This call found the ledger lost, and since when new slots are refused for it.
    pub lost_now: bool,
    pub lost_since: Option<Millis>,
    pub recipients: Vec<RecipientReply>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientReply {
    pub decision: Decision,
    pub expires_at: Option<Millis>,
    pub retry_after_ms: Option<Millis>,
    /// The window's used slots after this recipient.
    pub used: u64,
    pub reservation: Option<Reservation>,
}

/// Head values: now, limit, tier, effective limit, lost by this call (1/0), refused since|-1.
const ACQUIRE_HEAD: usize = 6;
/// Per recipient: decision code, expires_at|-1, retry_after|-1, used, reservation|"".
const ACQUIRE_FIELDS: usize = 5;

impl AcquireReply {
    /// Decodes the reply for `n` recipients; `None` when it is not one.
    pub fn decode(v: &Value, n: usize) -> Option<AcquireReply> {
        let Value::Array(items) = v else { return None };
        if items.len() != ACQUIRE_HEAD + ACQUIRE_FIELDS * n {
            return None;
        }
        let recipients = items[ACQUIRE_HEAD..]
            .chunks_exact(ACQUIRE_FIELDS)
            .map(|f| {
                let resv = text(&f[4]).unwrap_or_default();
                Some(RecipientReply {
                    decision: int(&f[0]).and_then(Decision::from_code)?,
                    expires_at: opt_ms(&f[1]),
                    retry_after_ms: opt_ms(&f[2]),
                    used: u64::try_from(int(&f[3])?).ok()?,
                    reservation: if resv.is_empty() {
                        None
                    } else {
                        Some(Reservation::from_stored(&resv)?)
                    },
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(AcquireReply {
            now: int(&items[0])?,
            limit: u64::try_from(int(&items[1])?).ok()?,
            tier: Tier::from_name(&text(&items[2])?)?,
            effective: u64::try_from(int(&items[3])?).ok()?,
            lost_now: int(&items[4]) == Some(1),
            lost_since: opt_ms(&items[5]),
            recipients,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn an_acquire_reply_is_read_by_name_and_a_malformed_one_is_refused() {
        let head = vec![
            Value::Int(1_000),
            Value::Int(250),
            bulk("1k"),
            Value::Int(225),
            Value::Int(0),
            Value::Int(-1),
        ];
        let admitted = [
            Value::Int(1),
            Value::Int(86_401_000),
            Value::Int(-1),
            Value::Int(7),
            bulk(""),
        ];
        let refused = [
            Value::Int(4),
            Value::Int(-1),
            Value::Int(3_600_000),
            Value::Int(7),
            bulk(""),
        ];
        let v = Value::Array([head.clone(), admitted.to_vec(), refused.to_vec()].concat());
        let r = AcquireReply::decode(&v, 2).expect("a reply for two recipients");
        assert_eq!(
            (r.now, r.limit, r.tier, r.effective),
            (1_000, 250, Tier::T1K, 225)
        );
        assert_eq!((r.lost_now, r.lost_since), (false, None));
        assert_eq!(r.recipients[0].decision, Decision::AllowedNew);
        assert_eq!(r.recipients[0].expires_at, Some(86_401_000));
        assert_eq!(r.recipients[1].decision, Decision::DeniedLimit);
        assert_eq!(r.recipients[1].retry_after_ms, Some(3_600_000));
        assert_eq!(r.recipients[1].used, 7);
        assert_eq!(AcquireReply::decode(&v, 3), None, "a part missing");
        let mut unknown = refused.to_vec();
        unknown[0] = Value::Int(99);
        let v = Value::Array([head, unknown].concat());
        assert_eq!(AcquireReply::decode(&v, 1), None, "no such decision");
    }
}
