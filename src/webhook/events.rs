//! What a WhatsApp Cloud API webhook body says, as events the bridge applies (docs/contract.md,
//! "The webhook bridge"). Parsing is lenient in what it ignores (unknown fields, kinds and values
//! are skipped, and counted) and strict only about what it acts on: an event it acts on names its
//! sender and user, and its time.

use serde_json::Value;

use crate::model::{Millis, Tier};

/// One thing WhatsApp reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A user wrote to a sender: a service window opens at `at` (72 h from a click-to-WhatsApp
    /// ad referral).
    Inbound {
        waba: String,
        sender: String,
        display: Option<String>,
        user: String,
        message_id: String,
        at: Millis,
        referral: bool,
    },
    /// A status of a message the sender sent.
    Status {
        waba: String,
        sender: String,
        display: Option<String>,
        user: String,
        message_id: String,
        status: Delivery,
        at: Millis,
        /// The reservation the worker put in `biz_opaque_callback_data`.
        reservation: Option<String>,
        error_code: Option<u32>,
    },
    /// `phone_number_quality_update`: a sender known by its display number.
    Quality {
        waba: String,
        display: String,
        event: String,
        current_limit: Option<Tier>,
        business_limit: Option<Tier>,
        at: Millis,
    },
    /// `business_capability_update`: the WABA's limit.
    Capability {
        waba: String,
        business_limit: Option<Tier>,
        phone_limit: Option<Tier>,
        at: Millis,
    },
    /// `account_update`.
    Account {
        waba: String,
        change: AccountChange,
        at: Millis,
    },
    /// A change the bridge does not act on, by its field name.
    Ignored { field: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    Delivered,
    Read,
    Failed,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountChange {
    /// `ACCOUNT_RESTRICTION`: each restriction and when it ends.
    Restricted(Vec<(Restriction, Option<Millis>)>),
    /// `DISABLED_UPDATE`.
    Disabled,
    /// `ACCOUNT_RECONNECTED`.
    Reconnected,
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    /// `RESTRICTED_BIZ_INITIATED_MESSAGING`: no new conversations from the business.
    BusinessInitiated,
    /// `RESTRICTED_CUSTOMER_INITIATED_MESSAGING`: no messages at all.
    CustomerInitiated,
    Other,
}

impl Event {
    /// The metrics label of the event's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Inbound { .. } => "inbound",
            Event::Status { status, .. } => match status {
                Delivery::Sent => "status_sent",
                Delivery::Delivered => "status_delivered",
                Delivery::Read => "status_read",
                Delivery::Failed => "status_failed",
                Delivery::Other => "status_other",
            },
            Event::Quality { .. } => "quality",
            Event::Capability { .. } => "capability",
            Event::Account { .. } => "account",
            Event::Ignored { .. } => "ignored",
        }
    }
}

/// The body is not a webhook: not JSON, or not an object of the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// Every event of a POST body, in order. `now` bounds event times (never later than now).
pub fn parse(body: &[u8], now: Millis) -> Result<Vec<Event>, Malformed> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Malformed(format!("not JSON: {e}")))?;
    let entries = v
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| Malformed("no entry array".into()))?;
    let mut out = Vec::new();
    for entry in entries {
        let waba = text(entry.get("id")).unwrap_or_default();
        let entry_time = seconds(entry.get("time"));
        let Some(changes) = entry.get("changes").and_then(Value::as_array) else {
            continue;
        };
        for change in changes {
            let field = text(change.get("field")).unwrap_or_default();
            let value = change.get("value").unwrap_or(&Value::Null);
            let when = |t: Option<Millis>| t.or(entry_time).unwrap_or(now).min(now);
            match field.as_str() {
                "messages" => messages(&waba, value, now, &mut out),
                "phone_number_quality_update" => match text(value.get("display_phone_number")) {
                    Some(display) => out.push(Event::Quality {
                        waba: waba.clone(),
                        display,
                        event: text(value.get("event")).unwrap_or_default(),
                        current_limit: tier(value.get("current_limit")),
                        business_limit: tier(value.get("max_daily_conversations_per_business")),
                        at: when(None),
                    }),
                    None => out.push(Event::Ignored { field }),
                },
                "business_capability_update" => out.push(Event::Capability {
                    waba: waba.clone(),
                    business_limit: tier(value.get("max_daily_conversations_per_business")),
                    phone_limit: tier(value.get("max_daily_conversation_per_phone")),
                    at: when(None),
                }),
                "account_update" => {
                    let event = text(value.get("event")).unwrap_or_default();
                    let change = match event.as_str() {
                        "ACCOUNT_RESTRICTION" => AccountChange::Restricted(
                            value
                                .get("restriction_info")
                                .and_then(Value::as_array)
                                .map(|rs| {
                                    rs.iter()
                                        .map(|r| {
                                            let kind =
                                                match text(r.get("restriction_type")).as_deref() {
                                                    Some("RESTRICTED_BIZ_INITIATED_MESSAGING") => {
                                                        Restriction::BusinessInitiated
                                                    }
                                                    Some(
                                                        "RESTRICTED_CUSTOMER_INITIATED_MESSAGING",
                                                    ) => Restriction::CustomerInitiated,
                                                    _ => Restriction::Other,
                                                };
                                            (kind, seconds(r.get("expiration")))
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        ),
                        "DISABLED_UPDATE" => AccountChange::Disabled,
                        "ACCOUNT_RECONNECTED" => AccountChange::Reconnected,
                        _ => AccountChange::Other(event),
                    };
                    out.push(Event::Account {
                        waba: waba.clone(),
                        change,
                        at: when(None),
                    });
                }
                _ => out.push(Event::Ignored { field }),
            }
        }
    }
    Ok(out)
}

/// A `messages` change: inbound messages and statuses of one sender.
fn messages(waba: &str, value: &Value, now: Millis, out: &mut Vec<Event>) {
    let metadata = value.get("metadata");
    let Some(sender) = metadata.and_then(|m| text(m.get("phone_number_id"))) else {
        out.push(Event::Ignored {
            field: "messages".into(),
        });
        return;
    };
    let display = metadata.and_then(|m| text(m.get("display_phone_number")));
    let at = |v: &Value| seconds(v.get("timestamp")).unwrap_or(now).min(now);
    for m in value
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(user) = user_of(m, "from") else {
            continue;
        };
        out.push(Event::Inbound {
            waba: waba.to_owned(),
            sender: sender.clone(),
            display: display.clone(),
            user,
            message_id: text(m.get("id")).unwrap_or_default(),
            at: at(m),
            referral: m.get("referral").is_some_and(Value::is_object),
        });
    }
    for s in value
        .get("statuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(user) = user_of(s, "recipient_id") else {
            continue;
        };
        let status = match text(s.get("status")).as_deref() {
            Some("sent") => Delivery::Sent,
            Some("delivered") => Delivery::Delivered,
            Some("read") => Delivery::Read,
            Some("failed") => Delivery::Failed,
            _ => Delivery::Other,
        };
        let error_code = s
            .get("errors")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
            .and_then(|e| e.get("code"))
            .and_then(number)
            .and_then(|c| u32::try_from(c).ok());
        out.push(Event::Status {
            waba: waba.to_owned(),
            sender: sender.clone(),
            display: display.clone(),
            user,
            message_id: text(s.get("id")).unwrap_or_default(),
            status,
            at: at(s),
            reservation: text(s.get("biz_opaque_callback_data"))
                .as_deref()
                .and_then(reservation_in),
            error_code,
        });
    }
}

/// The user of a message or status: `field` (a phone number), or where that is empty the
/// business-scoped `user_id`.
fn user_of(v: &Value, field: &str) -> Option<String> {
    text(v.get(field)).or_else(|| text(v.get("user_id")))
}

/// The reservation in `biz_opaque_callback_data`: the whole value, or the `wq=` item of a
/// `;`-separated list (docs/contract.md, "The webhook bridge").
pub fn reservation_in(data: &str) -> Option<String> {
    let data = data.trim();
    if data.contains('=') || data.contains(';') {
        return data
            .split(';')
            .find_map(|item| item.trim().strip_prefix("wq="))
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned);
    }
    (!data.is_empty()).then(|| data.to_owned())
}

/// A non-empty string, or a number written as one.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Unix seconds (a number or a string of one) as milliseconds.
fn seconds(v: Option<&Value>) -> Option<Millis> {
    number(v?).and_then(|s| s.checked_mul(1000))
}

/// A messaging limit as webhooks write it: `TIER_10K`, an integer (250, 2000, …), or `-1` /
/// `UNLIMITED` for no limit.
pub fn tier(v: Option<&Value>) -> Option<Tier> {
    let v = v?;
    if let Some(n) = number(v) {
        return match n {
            -1 => Some(Tier::Unlimited),
            n => Tier::ALL
                .into_iter()
                .find(|t| t.limit() == n as u64 && n > 0),
        };
    }
    let s = v.as_str()?.trim().to_ascii_uppercase();
    let s = s.strip_prefix("TIER_").unwrap_or(&s);
    match s {
        "UNLIMITED" => Some(Tier::Unlimited),
        s => Tier::from_name(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_alone_or_in_a_list() {
        assert_eq!(reservation_in("r1.2.ab").as_deref(), Some("r1.2.ab"));
        assert_eq!(
            reservation_in("job=42;wq=r1.2.ab;campaign=winter").as_deref(),
            Some("r1.2.ab")
        );
        assert_eq!(reservation_in("job=42;campaign=winter"), None);
        assert_eq!(reservation_in(""), None);
    }

    #[test]
    fn tiers_in_every_form() {
        let t = |v: Value| tier(Some(&v));
        assert_eq!(t(Value::from("TIER_10K")), Some(Tier::T10K));
        assert_eq!(t(Value::from("TIER_UNLIMITED")), Some(Tier::Unlimited));
        assert_eq!(t(Value::from("UNLIMITED")), Some(Tier::Unlimited));
        assert_eq!(t(Value::from(2000)), Some(Tier::T2K));
        assert_eq!(t(Value::from(-1)), Some(Tier::Unlimited));
        assert_eq!(t(Value::from(1234)), None);
        assert_eq!(t(Value::from("TIER_3K")), None);
    }

    #[test]
    fn times_are_clamped_to_now_and_unknown_fields_ignored() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"w","changes":[
            {"field":"messages","value":{"metadata":{"phone_number_id":"1","display_phone_number":"2"},
             "messages":[{"from":"49","id":"m1","timestamp":"9999999999","type":"text","new":1}]}},
            {"field":"message_template_status_update","value":{}}]}]}"#;
        let events = parse(body, 5_000).unwrap();
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[0], Event::Inbound { at: 5_000, user, .. } if user == "49"));
        assert!(
            matches!(&events[1], Event::Ignored { field } if field == "message_template_status_update")
        );
        assert!(parse(b"{", 0).is_err());
        assert!(parse(b"{}", 0).is_err());
    }
}
