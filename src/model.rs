//! Domain types and validation: ids, tiers, policies, decisions. Pure, no I/O.
//!
//! Everything that crosses into a ledger has been validated here, so the ledgers (and the key
//! schema) only ever see well-formed ids.

use std::fmt;

/// Milliseconds since the Unix epoch: the ledger's unit of time.
pub type Millis = i64;

pub const HOUR_MS: Millis = 3_600_000;
pub const DAY_MS: Millis = 24 * HOUR_MS;
/// A slot lasts 24 h from the delivery that opened it (or, rolling, the latest counted one).
pub const SLOT_MS: Millis = DAY_MS;
/// A customer service window lasts 24 h from the user's latest inbound message.
pub const SERVICE_WINDOW_MS: Millis = DAY_MS;
/// A free entry point (click-to-WhatsApp ad) lasts 72 h.
pub const FREE_ENTRY_POINT_MS: Millis = 3 * DAY_MS;

pub const MAX_ID_LEN: usize = 128;

/// Bad input: which field, and why. Maps to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidArgument {
    pub field: String,
    pub reason: String,
}

impl InvalidArgument {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Checks an opaque id: 1 to 128 characters of `[A-Za-z0-9._:-]`. The character set excludes
/// `{` and `}`, so no id can change the hash tag of a Redis key built from it.
fn check_token(field: &str, s: &str) -> Result<(), InvalidArgument> {
    if s.is_empty() {
        return Err(InvalidArgument::new(field, "must not be empty"));
    }
    if s.len() > MAX_ID_LEN {
        return Err(InvalidArgument::new(
            field,
            format!("must be at most {MAX_ID_LEN} characters, got {}", s.len()),
        ));
    }
    if let Some(c) = s.chars().find(|c| !is_token_char(*c)) {
        return Err(InvalidArgument::new(
            field,
            format!("invalid character {c:?}: ids are made of [A-Za-z0-9._:-]"),
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A business phone number id (`phone_number_id` or a display number), as given.
    SenderId
);
id_type!(
    /// A business portfolio id.
    PortfolioId
);
id_type!(
    /// A WhatsApp user: `wa_id` digits, or an opaque business-scoped user id.
    RecipientId
);

impl SenderId {
    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        check_token(field, s)?;
        Ok(Self(s.to_owned()))
    }
}

impl PortfolioId {
    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        check_token(field, s)?;
        Ok(Self(s.to_owned()))
    }
}

impl RecipientId {
    /// Normalises a recipient (PRODUCT.md §1.5): a phone form (digits with an optional leading
    /// '+', spaces, dashes, dots and parentheses) becomes its digits, so `+49 151 1234-5678` and
    /// `4915112345678` are one user; anything else must be an opaque token.
    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        let phone_like = s.chars().any(|c| c.is_ascii_digit())
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_digit()
                    || matches!(c, ' ' | '-' | '.' | '(' | ')')
                    || (c == '+' && i == 0)
            });
        if phone_like {
            let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
            check_token(field, &digits)?;
            return Ok(Self(digits));
        }
        check_token(field, s)?;
        Ok(Self(s.to_owned()))
    }
}

/// Whose window decides: a sender's own, or its portfolio's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Sender(SenderId),
    Portfolio(PortfolioId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Sender(s) => write!(f, "sender {s}"),
            Target::Portfolio(p) => write!(f, "portfolio {p}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    T50,
    T250,
    T1K,
    T2K,
    T10K,
    T100K,
    Unlimited,
}

impl Tier {
    pub const ALL: [Tier; 7] = [
        Tier::T50,
        Tier::T250,
        Tier::T1K,
        Tier::T2K,
        Tier::T10K,
        Tier::T100K,
        Tier::Unlimited,
    ];

    /// Distinct users per 24 h; 0 = unlimited.
    pub fn limit(self) -> u64 {
        match self {
            Tier::T50 => 50,
            Tier::T250 => 250,
            Tier::T1K => 1_000,
            Tier::T2K => 2_000,
            Tier::T10K => 10_000,
            Tier::T100K => 100_000,
            Tier::Unlimited => 0,
        }
    }

    /// The short name used in storage, configuration and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Tier::T50 => "50",
            Tier::T250 => "250",
            Tier::T1K => "1k",
            Tier::T2K => "2k",
            Tier::T10K => "10k",
            Tier::T100K => "100k",
            Tier::Unlimited => "unlimited",
        }
    }

    pub fn from_name(s: &str) -> Option<Tier> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }
}

/// Parses a tier name (configuration, flags, the CLI); the error lists the names.
impl std::str::FromStr for Tier {
    type Err = String;

    fn from_str(s: &str) -> Result<Tier, String> {
        Tier::from_name(s).ok_or_else(|| {
            format!("unknown tier {s:?}: use 50, 250, 1k, 2k, 10k, 100k or unlimited")
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowMode {
    /// Legacy: a slot lasts 24 h from the first counted delivery and is not extended.
    Conversation,
    /// Portfolio: every counted delivery extends the recipient's slot to now + 24 h.
    Rolling,
}

impl WindowMode {
    pub fn name(self) -> &'static str {
        match self {
            WindowMode::Conversation => "conversation",
            WindowMode::Rolling => "rolling",
        }
    }

    pub fn from_name(s: &str) -> Option<WindowMode> {
        match s.to_ascii_lowercase().as_str() {
            "conversation" => Some(WindowMode::Conversation),
            "rolling" => Some(WindowMode::Rolling),
            _ => None,
        }
    }
}

impl std::str::FromStr for WindowMode {
    type Err = String;

    fn from_str(s: &str) -> Result<WindowMode, String> {
        WindowMode::from_name(s)
            .ok_or_else(|| format!("unknown window mode {s:?}: use conversation or rolling"))
    }
}

/// The policy of one window (a sender's own, or a portfolio's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub tier: Tier,
    /// Overrides the tier's limit when non-zero.
    pub custom_limit: u64,
    pub window_mode: WindowMode,
}

impl Policy {
    /// The limit this policy enforces; 0 = unlimited.
    pub fn limit(&self) -> u64 {
        if self.custom_limit > 0 {
            self.custom_limit
        } else {
            self.tier.limit()
        }
    }
}

/// Policies for targets that have none stored (PRODUCT.md §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub sender: Policy,
    pub portfolio: Policy,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            sender: Policy {
                tier: Tier::T250,
                custom_limit: 0,
                window_mode: WindowMode::Conversation,
            },
            portfolio: Policy {
                tier: Tier::T250,
                custom_limit: 0,
                window_mode: WindowMode::Rolling,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageKind {
    #[default]
    Template,
    FreeForm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    AllowedNew,
    AllowedCounted,
    AllowedServiceWindow,
    DeniedLimit,
    DeniedOutsideServiceWindow,
}

impl Decision {
    pub fn allowed(self) -> bool {
        matches!(
            self,
            Decision::AllowedNew | Decision::AllowedCounted | Decision::AllowedServiceWindow
        )
    }

    /// The code the ledgers exchange (the Lua script returns it).
    pub fn code(self) -> i64 {
        match self {
            Decision::AllowedNew => 1,
            Decision::AllowedCounted => 2,
            Decision::AllowedServiceWindow => 3,
            Decision::DeniedLimit => 4,
            Decision::DeniedOutsideServiceWindow => 5,
        }
    }

    pub fn from_code(code: i64) -> Option<Decision> {
        Some(match code {
            1 => Decision::AllowedNew,
            2 => Decision::AllowedCounted,
            3 => Decision::AllowedServiceWindow,
            4 => Decision::DeniedLimit,
            5 => Decision::DeniedOutsideServiceWindow,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Decision::AllowedNew => "allowed_new",
            Decision::AllowedCounted => "allowed_counted",
            Decision::AllowedServiceWindow => "allowed_service_window",
            Decision::DeniedLimit => "denied_limit",
            Decision::DeniedOutsideServiceWindow => "denied_outside_service_window",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Sender,
    Portfolio,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Sender => "sender",
            Scope::Portfolio => "portfolio",
        }
    }
}

/// A reservation token: which slot opening it was (`opened_at` and a per-window sequence), so a
/// release can never free a slot that a later acquire opened for the same recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub opened_at: Millis,
    pub seq: u64,
}

impl Reservation {
    pub fn encode(&self) -> String {
        format!("r{}.{}", self.opened_at, self.seq)
    }

    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        let bad = || InvalidArgument::new(field, "not a reservation issued by waquota");
        let body = s.strip_prefix('r').ok_or_else(bad)?;
        let (at, seq) = body.split_once('.').ok_or_else(bad)?;
        Ok(Reservation {
            opened_at: at.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }

    /// The form stored beside a slot (the ledger compares it on release).
    pub fn stored(&self) -> String {
        format!("{}.{}", self.opened_at, self.seq)
    }
}

/// One decision request: `Acquire` is a batch of one.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub sender: SenderId,
    pub recipients: Vec<RecipientId>,
    pub kind: MessageKind,
    pub dry_run: bool,
    /// The trusted client clock, when the server honours it.
    pub at: Option<Millis>,
}

/// The outcome for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub recipient: RecipientId,
    pub decision: Decision,
    pub expires_at: Option<Millis>,
    pub retry_after_ms: Option<Millis>,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub tier: Tier,
    pub scope: Scope,
    pub reservation: Option<Reservation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub now: Millis,
    pub policy: Policy,
    pub scope: Scope,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub next_slot_free_at: Option<Millis>,
    pub slots_freeing_next_hour: u64,
    pub open_service_windows: u64,
    pub portfolio: Option<PortfolioId>,
    pub senders: Vec<SenderId>,
    pub recipient: Option<RecipientId>,
    pub counted_until: Option<Millis>,
    pub service_window_until: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowEntry {
    pub recipient: RecipientId,
    pub expires_at: Millis,
    pub sender: SenderId,
}

/// A position in a window listing: entries strictly after (expires_at, recipient).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub expires_at: Millis,
    pub recipient: RecipientId,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}/{}", self.expires_at, self.recipient)
    }

    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        let bad = || InvalidArgument::new(field, "not a page token issued by waquota");
        let (at, r) = s.split_once('/').ok_or_else(bad)?;
        Ok(Cursor {
            expires_at: at.parse().map_err(|_| bad())?,
            recipient: RecipientId::parse(field, r).map_err(|_| bad())?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPage {
    pub entries: Vec<WindowEntry>,
    pub next: Option<Cursor>,
}

/// `used`/`remaining` against a limit (0 = unlimited: remaining is reported as 0).
pub fn remaining(limit: u64, used: u64) -> u64 {
    if limit == 0 {
        0
    } else {
        limit.saturating_sub(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_forms_normalise_to_one_user() {
        let a = RecipientId::parse("recipient", "+49 151 1234-5678").unwrap();
        let b = RecipientId::parse("recipient", "4915112345678").unwrap();
        let c = RecipientId::parse("recipient", "+49 (151) 1234.5678").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
    }

    #[test]
    fn opaque_ids_are_kept_and_checked() {
        assert_eq!(
            RecipientId::parse("recipient", "US.1349:ab_c-d")
                .unwrap()
                .as_str(),
            "US.1349:ab_c-d"
        );
        assert!(RecipientId::parse("recipient", "").is_err());
        assert!(RecipientId::parse("recipient", "a b").is_err());
        assert!(RecipientId::parse("recipient", "49+151").is_err());
        assert!(RecipientId::parse("recipient", "{x}").is_err());
        assert!(RecipientId::parse("recipient", "+ - ()").is_err());
        assert!(RecipientId::parse("recipient", &"a".repeat(129)).is_err());
        assert!(SenderId::parse("sender", "a}b").is_err());
        assert!(PortfolioId::parse("portfolio", "ü").is_err());
    }

    #[test]
    fn reservation_and_cursor_round_trip() {
        let r = Reservation {
            opened_at: 1_700_000_000_123,
            seq: 42,
        };
        assert_eq!(Reservation::parse("reservation", &r.encode()).unwrap(), r);
        assert!(Reservation::parse("reservation", "x").is_err());
        let c = Cursor {
            expires_at: 5,
            recipient: RecipientId::parse("r", "49151").unwrap(),
        };
        assert_eq!(Cursor::parse("page_token", &c.encode()).unwrap(), c);
    }
}
