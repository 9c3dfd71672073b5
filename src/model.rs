//! Domain types and validation: ids, tiers, policies, decisions. Pure, no I/O.
//!
//! Everything that crosses into a ledger has been validated here, so the ledgers (and the key
//! schema) only ever see well-formed ids.

use std::fmt;

/// Milliseconds since the Unix epoch: the ledger's unit of time.
pub type Millis = i64;

/// The request's clock when it gives one (a trusted `at`), else this machine's, in ms since the
/// epoch.
pub fn clock(at: Option<Millis>) -> Millis {
    at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as Millis)
    })
}

pub const HOUR_MS: Millis = 3_600_000;
pub const DAY_MS: Millis = 24 * HOUR_MS;
/// A slot lasts 24 h from the delivery that opened it (or, rolling, the latest counted one).
pub const SLOT_MS: Millis = DAY_MS;
/// A customer service window lasts 24 h from the user's latest inbound message.
pub const SERVICE_WINDOW_MS: Millis = DAY_MS;
/// A free entry point (click-to-WhatsApp ad) lasts 72 h.
pub const FREE_ENTRY_POINT_MS: Millis = 3 * DAY_MS;

pub const MAX_ID_LEN: usize = 128;

/// Largest |time| in ms a request may carry: microseconds of it (the rate limits' GCRA) stay
/// below 2^53, exact in Lua's doubles as in Rust's integers. Times from
/// 1684-07-28T00:12:25.260Z to 2255-06-05T23:47:34.740Z are accepted.
pub const MAX_ABS_MS: Millis = 9_007_199_254_740;

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
    /// Normalises a recipient. An input is either a phone form or an opaque token, never
    /// silently one after failing as the other:
    ///
    /// - **Phone form**: any input with a `+`, a space or a parenthesis, or one made only of
    ///   digits, dashes and dots, with at least one digit and at least one dash or dot. It
    ///   becomes its digits, so `+49 151 1234-5678`, `+49 (151) 1234.5678`,
    ///   `(0049) 151 12345678` and `4915112345678` are one user. It must be a number:
    ///   - an optional `+`, first;
    ///   - a separator (space, dash, dot) stands between digits or parenthesised groups (so
    ///     `+49 (151) 1234.5678` has one separator on each side of `(151)`); none leading or
    ///     trailing, never two in a row;
    ///   - parentheses pair, do not nest, and hold digits only;
    ///   - `00` before the digits (without `+`) is the international prefix and is dropped; the
    ///     number left must not start with `0` (a national number such as `0151 1234567`, or
    ///     `+0…`, is refused: its country is unknown);
    ///   - 7 to 15 digits (E.164).
    ///
    ///   A refusal names the first offending character and its position (1-based, counting
    ///   characters), or the digit count.
    /// - **Opaque token**: everything else, 1 to 128 characters of `[A-Za-z0-9._:-]`, kept as
    ///   given. A plain run of digits is one (a `wa_id`, which is already international and never
    ///   starts with `0`): it is kept as is, whatever its length up to 128 and even with a
    ///   leading `00`, so `004915112345678` is not `4915112345678`.
    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        if is_phone_form(s) {
            return phone_digits(field, s).map(Self);
        }
        check_token(field, s)?;
        Ok(Self(s.to_owned()))
    }
}

/// Phone punctuation (`+`, space, parentheses), or digits grouped by dashes or dots only.
fn is_phone_form(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().any(|c| matches!(c, b'+' | b' ' | b'(' | b')'))
        || (b.iter().any(u8::is_ascii_digit)
            && b.iter().any(|c| matches!(c, b'-' | b'.'))
            && b.iter()
                .all(|c| c.is_ascii_digit() || matches!(c, b'-' | b'.')))
}

/// Shortest and longest phone numbers, in digits (E.164 allows 15).
const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 7..=15;

/// The digits of a phone form, checked against the rules of [`RecipientId::parse`].
fn phone_digits(field: &str, s: &str) -> Result<String, InvalidArgument> {
    #[derive(PartialEq)]
    enum Prev {
        Start,
        Plus,
        Digit,
        Separator,
        Open,
        Close,
    }
    let bad = |c: char, pos: usize, why: &str| {
        InvalidArgument::new(field, format!("{c:?} at position {pos}: {why}"))
    };
    let mut prev = Prev::Start;
    // Each digit with its position, for the leading-zero check.
    let mut digits: Vec<(char, usize)> = Vec::new();
    let mut open: Option<usize> = None;
    let mut last = (' ', 0);
    for (i, c) in s.chars().enumerate() {
        let pos = i + 1;
        last = (c, pos);
        prev = match c {
            '0'..='9' => {
                digits.push((c, pos));
                Prev::Digit
            }
            '+' if prev == Prev::Start => Prev::Plus,
            '+' => return Err(bad(c, pos, "'+' may only start a phone number")),
            ' ' | '-' | '.' => {
                if open.is_some() {
                    return Err(bad(c, pos, "parentheses hold digits only"));
                }
                match prev {
                    Prev::Digit | Prev::Close => Prev::Separator,
                    Prev::Separator => return Err(bad(c, pos, "two separators in a row")),
                    _ => return Err(bad(c, pos, "a separator must stand between digits")),
                }
            }
            '(' => {
                if open.is_some() {
                    return Err(bad(c, pos, "parentheses do not nest"));
                }
                open = Some(pos);
                Prev::Open
            }
            ')' => match (open, &prev) {
                (None, _) => return Err(bad(c, pos, "no '(' to close")),
                (Some(_), Prev::Open) => {
                    return Err(bad(c, pos, "parentheses must hold digits"));
                }
                _ => {
                    open = None;
                    Prev::Close
                }
            },
            _ => {
                return Err(bad(
                    c,
                    pos,
                    "invalid character: ids are made of [A-Za-z0-9._:-], phone numbers of \
                     digits, a leading '+', spaces, dashes, dots and parentheses",
                ));
            }
        };
    }
    if let Some(pos) = open {
        return Err(bad('(', pos, "never closed"));
    }
    if prev == Prev::Separator {
        return Err(bad(last.0, last.1, "a separator must stand between digits"));
    }
    let plus = s.starts_with('+');
    let mut number: &[(char, usize)] = &digits;
    if !plus && number.len() >= 2 && number[0].0 == '0' && number[1].0 == '0' {
        // 00: the international prefix, as `+`.
        number = &number[2..];
    }
    if let Some(&('0', pos)) = number.first() {
        let why = if plus {
            "a country code does not start with 0"
        } else {
            "a national number (leading 0): write it with + or 00 and the country code"
        };
        return Err(bad('0', pos, why));
    }
    if !PHONE_DIGITS.contains(&number.len()) {
        return Err(InvalidArgument::new(
            field,
            format!(
                "a phone number has {} to {} digits (E.164), got {}",
                PHONE_DIGITS.start(),
                PHONE_DIGITS.end(),
                number.len()
            ),
        ));
    }
    Ok(number.iter().map(|(c, _)| c).collect())
}

/// Whose window decides: a sender's own, or its portfolio's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Sender(SenderId),
    Portfolio(PortfolioId),
}

/// Senders or portfolios, for listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    Sender,
    Portfolio,
}

impl TargetKind {
    /// The prefix of its [`Target::member`]s.
    pub fn tag(self) -> &'static str {
        match self {
            TargetKind::Sender => "s:",
            TargetKind::Portfolio => "p:",
        }
    }
}

impl Target {
    pub fn kind(&self) -> TargetKind {
        match self {
            Target::Sender(_) => TargetKind::Sender,
            Target::Portfolio(_) => TargetKind::Portfolio,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Target::Sender(s) => s.as_str(),
            Target::Portfolio(p) => p.as_str(),
        }
    }

    /// `p:<id>` or `s:<id>`: how the registry of targets names it, and the order listings
    /// follow (portfolios first, then by id).
    pub fn member(&self) -> String {
        format!("{}{}", self.kind().tag(), self.id())
    }

    /// The target a [`Target::member`] names; `field` is named when it names none.
    pub fn from_member(field: &str, member: &str) -> Result<Target, InvalidArgument> {
        match member.split_once(':') {
            Some(("s", id)) => Ok(Target::Sender(SenderId::parse(field, id)?)),
            Some(("p", id)) => Ok(Target::Portfolio(PortfolioId::parse(field, id)?)),
            _ => Err(InvalidArgument::new(
                field,
                format!("{member:?} is not a listing position (s:<sender> or p:<portfolio>)"),
            )),
        }
    }
}

/// One AdminService change, as the audit log keeps it (docs/contract.md, "The audit log").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: Millis,
    /// The RPC that made it.
    pub rpc: String,
    /// Who: the caller's role and address.
    pub actor: String,
    /// What changed, in words.
    pub change: String,
    /// `None` for ledger-wide changes.
    pub target: Option<Target>,
}

/// Entries kept per target (and ledger-wide): the newest, the oldest dropped first.
pub const AUDIT_KEEP: usize = 100;

impl AuditEntry {
    /// One line of JSON: how both ledgers store an entry.
    pub fn encode(&self) -> String {
        serde_json::json!({
            "at": self.at,
            "rpc": self.rpc,
            "actor": self.actor,
            "change": self.change,
            "target": self.target.as_ref().map(Target::member),
        })
        .to_string()
    }

    /// An entry [`AuditEntry::encode`] wrote; None for anything else.
    pub fn decode(s: &str) -> Option<AuditEntry> {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        Some(AuditEntry {
            at: v.get("at")?.as_i64()?,
            rpc: text("rpc")?,
            actor: text("actor")?,
            change: text("change")?,
            target: match v.get("target")?.as_str() {
                Some(m) => Some(Target::from_member("target", m).ok()?),
                None => None,
            },
        })
    }
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

    /// The tier above on a rule set's ladder (docs/contract.md, "Rule sets and tiers over
    /// time"); None at the top, and from the legacy trial tier (50), which only verification
    /// lifts.
    pub fn next(self, rules: RuleSet) -> Option<Tier> {
        let ladder: &[Tier] = match rules {
            RuleSet::Legacy => &[
                Tier::T250,
                Tier::T1K,
                Tier::T10K,
                Tier::T100K,
                Tier::Unlimited,
            ],
            RuleSet::Portfolio => &[
                Tier::T250,
                Tier::T2K,
                Tier::T10K,
                Tier::T100K,
                Tier::Unlimited,
            ],
        };
        let i = ladder.iter().position(|t| *t == self)?;
        ladder.get(i + 1).copied()
    }

    /// The tier below on the legacy ladder (portfolios are never downgraded).
    pub fn previous(self) -> Option<Tier> {
        let ladder = [
            Tier::T50,
            Tier::T250,
            Tier::T1K,
            Tier::T10K,
            Tier::T100K,
            Tier::Unlimited,
        ];
        let i = ladder.iter().position(|t| *t == self)?;
        i.checked_sub(1).map(|j| ladder[j])
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

macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The short name used in storage, configuration and the CLI.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }

            pub fn from_name(s: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(s))
            }
        }
    };
}

named_enum!(
    /// What WhatsApp says of a sender (a business phone number), or an operator's stop.
    SenderStatus {
        Connected = "connected",
        Flagged = "flagged",
        Restricted = "restricted",
        Paused = "paused",
        Banned = "banned",
        Disconnected = "disconnected",
    }
);

impl SenderStatus {
    /// May not send at all: `DECISION_DENIED_SENDER_BLOCKED`.
    pub fn blocks(self) -> bool {
        matches!(
            self,
            SenderStatus::Paused | SenderStatus::Banned | SenderStatus::Disconnected
        )
    }
}

named_enum!(
    /// The quality rating WhatsApp gives a number (green = high, yellow = medium, red = low).
    Quality { Green = "green", Yellow = "yellow", Red = "red" }
);

named_enum!(
    /// Which of WhatsApp's messaging-limit rules a window follows (docs/contract.md, "Rule sets
    /// and tiers over time").
    RuleSet { Legacy = "legacy", Portfolio = "portfolio" }
);

named_enum!(
    /// A template's category; the marketing frequency cap applies to `Marketing`.
    Category { Marketing = "marketing", Utility = "utility", Authentication = "authentication", Service = "service" }
);

impl std::str::FromStr for WindowMode {
    type Err = String;

    fn from_str(s: &str) -> Result<WindowMode, String> {
        WindowMode::from_name(s)
            .ok_or_else(|| format!("unknown window mode {s:?}: use conversation or rolling"))
    }
}

/// A policy: of a window (tier, limit, mode, headroom, rules: read from the window's owner) and of
/// a sender (status, quality, rates, caps: read from the sender's own policy); docs/contract.md,
/// "Policies".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub tier: Tier,
    /// Overrides the tier's limit when non-zero.
    pub custom_limit: u64,
    pub window_mode: WindowMode,
    pub status: SenderStatus,
    /// None: unknown, which counts as eligible for upgrades.
    pub quality: Option<Quality>,
    /// 0 = the configured default.
    pub messages_per_second: u32,
    /// 0 = the configured default.
    pub pair_interval_ms: Millis,
    /// 0 = the configured default.
    pub pair_burst: u32,
    /// 0..=99: the effective limit keeps this margin below the limit.
    pub headroom_percent: u32,
    /// On a sender in a portfolio: most of the portfolio's slots it may hold; 0 = no cap.
    pub sender_cap: u64,
    /// Most marketing messages per user per period; 0 = no cap.
    pub marketing_cap: u32,
    /// 0 = 24 h.
    pub marketing_cap_period_ms: Millis,
    pub rule_set: RuleSet,
    pub auto_tier: bool,
    /// When `status` ends (a restriction's expiration, docs/contract.md, "Policies"): from then
    /// on the target decides as CONNECTED. None: until changed.
    pub status_until: Option<Millis>,
}

impl Policy {
    /// The status in force at `now`: `status` until `status_until`, CONNECTED after it.
    pub fn status_at(&self, now: Millis) -> SenderStatus {
        match self.status_until {
            Some(until) if now >= until => SenderStatus::Connected,
            _ => self.status,
        }
    }

    /// A policy with a tier and mode, everything else at its default.
    pub fn basic(tier: Tier, window_mode: WindowMode, rule_set: RuleSet) -> Policy {
        Policy {
            tier,
            custom_limit: 0,
            window_mode,
            status: SenderStatus::Connected,
            quality: None,
            messages_per_second: 0,
            pair_interval_ms: 0,
            pair_burst: 0,
            headroom_percent: 0,
            sender_cap: 0,
            marketing_cap: 0,
            marketing_cap_period_ms: 0,
            rule_set,
            auto_tier: false,
            status_until: None,
        }
    }

    /// The limit this policy enforces; 0 = unlimited.
    pub fn limit(&self) -> u64 {
        if self.custom_limit > 0 {
            self.custom_limit
        } else {
            self.tier.limit()
        }
    }

    /// The limit minus the headroom, rounded down (meaningless when `limit()` is 0 = unlimited).
    pub fn effective_limit(&self) -> u64 {
        effective_limit(self.limit(), self.headroom_percent)
    }

    /// Eligible for an upgrade: connected (not flagged), and quality unknown, green or (legacy)
    /// yellow (docs/contract.md, "Rule sets and tiers over time").
    pub fn eligible_for_upgrade(&self) -> bool {
        self.status == SenderStatus::Connected
            && matches!(
                (self.rule_set, self.quality),
                (_, None | Some(Quality::Green)) | (RuleSet::Legacy, Some(Quality::Yellow))
            )
    }
}

pub fn effective_limit(limit: u64, headroom_percent: u32) -> u64 {
    limit * u64::from(100 - headroom_percent.min(99)) / 100
}

/// Policies for targets that have none stored (docs/contract.md, "Policies"), and the rate
/// defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub sender: Policy,
    pub portfolio: Policy,
    pub messages_per_second: u32,
    pub pair_interval_ms: Millis,
    pub pair_burst: u32,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            sender: Policy::basic(Tier::T250, WindowMode::Conversation, RuleSet::Legacy),
            portfolio: Policy::basic(Tier::T250, WindowMode::Rolling, RuleSet::Portfolio),
            messages_per_second: 80,
            pair_interval_ms: 6_000,
            pair_burst: 45,
        }
    }
}

/// How long a refused WhatsApp marketing message (error 131049) holds marketing to that user.
pub const MARKETING_HOLD_MS: Millis = DAY_MS;
/// The marketing cap's period when a policy sets none.
pub const DEFAULT_MARKETING_PERIOD_MS: Millis = DAY_MS;
/// WhatsApp's error for a user who received too many marketing messages.
pub const ERROR_MARKETING_CAP: u32 = 131_049;

/// A projected tier change (docs/contract.md, "Rule sets and tiers over time"): advisory unless
/// the policy has `auto_tier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Projection {
    pub next_tier: Option<Tier>,
    pub upgrade_at: Option<Millis>,
    pub downgrade_at: Option<Millis>,
}

impl Projection {
    pub fn is_empty(&self) -> bool {
        self.upgrade_at.is_none() && self.downgrade_at.is_none()
    }
}

/// Legacy: an upgrade takes effect 24 h after the 7-day count reached half the limit.
pub const LEGACY_UPGRADE_DELAY_MS: Millis = DAY_MS;
/// Portfolio: within 6 h of reaching half the limit (the latest moment is projected).
pub const PORTFOLIO_UPGRADE_DELAY_MS: Millis = 6 * HOUR_MS;
/// Legacy: flagged for 7 days means one tier down.
pub const FLAGGED_DOWNGRADE_MS: Millis = 7 * DAY_MS;
pub const WEEK_MS: Millis = 7 * DAY_MS;
pub const MONTH_MS: Millis = 30 * DAY_MS;
/// Portfolio 250 → 2K also by 2,000 unique users within 30 days.
pub const PORTFOLIO_ENTRY_UNIQUES: u64 = 2_000;

pub fn upgrade_delay(rules: RuleSet) -> Millis {
    match rules {
        RuleSet::Legacy => LEGACY_UPGRADE_DELAY_MS,
        RuleSet::Portfolio => PORTFOLIO_UPGRADE_DELAY_MS,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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
    DeniedThroughput,
    DeniedPairRate,
    DeniedSenderBlocked,
    DeniedMarketingCap,
    /// The ledger was found lost and `on_ledger_loss = deny_new` holds new slots back
    /// (docs/contract.md, "A lost ledger").
    DeniedLedgerLost,
}

impl Decision {
    /// Every decision, in the order of their codes (`ALL[i].code() == i + 1`).
    pub const ALL: [Decision; 10] = [
        Decision::AllowedNew,
        Decision::AllowedCounted,
        Decision::AllowedServiceWindow,
        Decision::DeniedLimit,
        Decision::DeniedOutsideServiceWindow,
        Decision::DeniedThroughput,
        Decision::DeniedPairRate,
        Decision::DeniedSenderBlocked,
        Decision::DeniedMarketingCap,
        Decision::DeniedLedgerLost,
    ];

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
            Decision::DeniedThroughput => 6,
            Decision::DeniedPairRate => 7,
            Decision::DeniedSenderBlocked => 8,
            Decision::DeniedMarketingCap => 9,
            Decision::DeniedLedgerLost => 10,
        }
    }

    pub fn from_code(code: i64) -> Option<Decision> {
        let i = usize::try_from(code).ok()?.checked_sub(1)?;
        Decision::ALL.get(i).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Decision::AllowedNew => "allowed_new",
            Decision::AllowedCounted => "allowed_counted",
            Decision::AllowedServiceWindow => "allowed_service_window",
            Decision::DeniedLimit => "denied_limit",
            Decision::DeniedOutsideServiceWindow => "denied_outside_service_window",
            Decision::DeniedThroughput => "denied_throughput",
            Decision::DeniedPairRate => "denied_pair_rate",
            Decision::DeniedSenderBlocked => "denied_sender_blocked",
            Decision::DeniedMarketingCap => "denied_marketing_cap",
            Decision::DeniedLedgerLost => "denied_ledger_lost",
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

/// A slot opening: when (`opened_at`) and its per-window sequence, so a release can never free
/// a slot that a later acquire opened for the same recipient. On the wire it travels as a token
/// signed by [`ReservationSigner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub opened_at: Millis,
    pub seq: u64,
}

impl Reservation {
    /// The form stored beside a slot and exchanged with the scripts: `<opened_at>.<seq>`.
    pub fn stored(&self) -> String {
        format!("{}.{}", self.opened_at, self.seq)
    }

    /// Reads the stored form back; None unless it is exactly what [`Reservation::stored`] writes.
    pub fn from_stored(s: &str) -> Option<Reservation> {
        let (at, seq) = s.split_once('.')?;
        let r = Reservation {
            opened_at: at.parse().ok()?,
            seq: seq.parse().ok()?,
        };
        (r.stored() == s && r.opened_at.abs() <= MAX_ABS_MS && r.seq > 0).then_some(r)
    }
}

/// Bytes in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Length of a reservation's MAC: 128 bits, in lowercase hex.
const RESERVATION_MAC_HEX: usize = 32;

/// Issues and checks reservation tokens (docs/contract.md, "Reservations"):
/// `r<opened_at>.<seq>.<mac>`, where `mac` is the first 128 bits of HMAC-SHA256, under a secret
/// that every instance shares, of the sender, the recipient and the slot opening. A token is
/// therefore unguessable and bound to the sender and recipient of the Acquire that opened it:
/// another sender (even of the same portfolio) or a token with any part changed is refused
/// before the ledger is asked. The MAC costs no storage: the ledger keeps only the sequence.
#[derive(Clone)]
pub struct ReservationSigner {
    key: ring::hmac::Key,
}

impl fmt::Debug for ReservationSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReservationSigner(..)")
    }
}

impl ReservationSigner {
    pub fn new(secret: &[u8]) -> Self {
        ReservationSigner {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    /// The MAC of a slot opening `stored` (`Reservation::stored`) for a sender and recipient.
    fn mac(&self, sender: &SenderId, recipient: &RecipientId, stored: &str) -> String {
        // Ids never contain a newline, so the message is unambiguous.
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        for part in [sender.as_str(), "\n", recipient.as_str(), "\n", stored] {
            ctx.update(part.as_bytes());
        }
        hex(&ctx.sign().as_ref()[..RESERVATION_MAC_HEX / 2])
    }

    pub fn encode(&self, sender: &SenderId, recipient: &RecipientId, r: &Reservation) -> String {
        let stored = r.stored();
        let mac = self.mac(sender, recipient, &stored);
        format!("r{stored}.{mac}")
    }

    /// The slot opening a token names, if the token is canonical and was issued to this sender
    /// for this recipient.
    pub fn verify(
        &self,
        field: &str,
        token: &str,
        sender: &SenderId,
        recipient: &RecipientId,
    ) -> Result<Reservation, InvalidArgument> {
        let malformed = || {
            InvalidArgument::new(
                field,
                "not a reservation issued by waquota (the form is r<time>.<sequence>.<32 hex digits>, exactly as Acquire returned it)",
            )
        };
        let body = token.strip_prefix('r').ok_or_else(malformed)?;
        let (stored, mac) = body.rsplit_once('.').ok_or_else(malformed)?;
        let r = Reservation::from_stored(stored).ok_or_else(malformed)?;
        if mac.len() != RESERVATION_MAC_HEX
            || !mac.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(malformed());
        }
        let want = self.mac(sender, recipient, stored);
        // Compared in constant time: how much of a forged MAC is right must not show.
        let diff = want
            .bytes()
            .zip(mac.bytes())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if std::hint::black_box(diff) != 0 {
            return Err(InvalidArgument::new(
                field,
                format!(
                    "was not issued to sender {sender} for recipient {recipient}: a reservation is bound to the sender and recipient of the Acquire that opened it"
                ),
            ));
        }
        Ok(r)
    }
}

/// One decision request: `Acquire` is a batch of one.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub sender: SenderId,
    pub recipients: Vec<RecipientId>,
    pub kind: MessageKind,
    pub category: Option<Category>,
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
    /// The moment the decision was made at (the ledger's clock): `retry_at` is it plus
    /// `retry_after_ms`.
    pub decided_at: Millis,
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
    /// The policy of the deciding window (the tier in force, projections applied with auto_tier).
    pub policy: Policy,
    /// For a sender target: its own policy.
    pub sender_policy: Option<Policy>,
    pub scope: Scope,
    pub limit: u64,
    pub effective_limit: u64,
    pub unique_7d: u64,
    pub unique_30d: u64,
    pub projection: Projection,
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
    /// The ledger holds something of the target: a stored policy or projection state, an
    /// assignment or members, a live slot, a user in the 30-day index or an open service window.
    pub known: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowEntry {
    pub recipient: RecipientId,
    pub expires_at: Millis,
    pub sender: SenderId,
}

/// Where a recipient stands in a window listing: the first 32 bits of its SHA-1 with their
/// bits reversed. A window's shards hold the recipients whose hash ends in the shard's bits, so
/// in this order every shard is one contiguous range: a page reads only the shards it lists,
/// whatever the window holds, and splits and merges never move a slot across a page boundary
/// (docs/contract.md, "Listing a window"; lua/lib.lua `win_pos` computes the same).
pub fn listing_position(r: &RecipientId) -> u32 {
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        r.as_str().as_bytes(),
    );
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]).reverse_bits()
}

/// A position in a window listing: entries strictly after (`position`, `recipient`); an empty
/// recipient stands before every recipient at that position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub position: u32,
    pub recipient: Option<RecipientId>,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!(
            "{:08x}/{}",
            self.position,
            self.recipient.as_ref().map_or("", |r| r.as_str())
        )
    }

    pub fn parse(field: &str, s: &str) -> Result<Self, InvalidArgument> {
        let bad = || InvalidArgument::new(field, "not a page token issued by waquota");
        let (pos, r) = s.split_once('/').ok_or_else(bad)?;
        if pos.len() != 8 || !pos.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        Ok(Cursor {
            position: u32::from_str_radix(pos, 16).map_err(|_| bad())?,
            recipient: if r.is_empty() {
                None
            } else {
                let id = RecipientId::parse(field, r).map_err(|_| bad())?;
                // Only the stored (normalised) form was ever issued.
                if id.as_str() != r {
                    return Err(bad());
                }
                Some(id)
            },
        })
    }

    /// Is (position, recipient) strictly after this cursor?
    pub fn before(&self, position: u32, r: &RecipientId) -> bool {
        match position.cmp(&self.position) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self
                .recipient
                .as_ref()
                .is_none_or(|c| r.as_str().as_bytes() > c.as_str().as_bytes()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPage {
    pub entries: Vec<WindowEntry>,
    /// Where the next page starts; None when the listing is complete. A page may hold fewer
    /// entries than asked (even none) and still have a next one.
    pub next: Option<Cursor>,
}

/// `remaining` against the effective limit (limit 0 = unlimited: remaining is reported as 0).
pub fn remaining(limit: u64, effective: u64, used: u64) -> u64 {
    if limit == 0 {
        0
    } else {
        effective.saturating_sub(used)
    }
}

/// What a failure report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureOutcome {
    pub released: bool,
    pub hold_until: Option<Millis>,
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
    fn phone_forms_that_are_not_numbers_are_refused_naming_the_offending_character() {
        let err = |s: &str| {
            RecipientId::parse("recipient", s)
                .expect_err(&format!("{s:?} must be refused"))
                .reason
        };
        // (input, the character blamed, its position: 1-based, in characters)
        let dots = format!("{}5", ".".repeat(200));
        for (bad, c, pos) in [
            ("1-", '-', 2),
            ("-1", '-', 1),
            ("+-1", '-', 2),
            ("((((1))))", '(', 2),
            (dots.as_str(), '.', 1),
            ("+49\u{a0}151 1234567", '\u{a0}', 4),
            ("+49  151 1234567", ' ', 5),
            ("+49 151 1234567 ", ' ', 16),
            ("+49 -151 1234567", '-', 5),
            ("+49 (15 1) 1234567", ' ', 8),
            ("+49 151 (1234567", '(', 9),
            ("+49 151) 1234567", ')', 8),
            ("+49 () 151 1234567", ')', 6),
            ("49+151 1234567", '+', 3),
            ("+ 49 151 1234567", ' ', 2),
            ("a b", 'a', 1),
        ] {
            let reason = err(bad);
            assert!(
                reason.contains(&format!("{c:?} at position {pos}")),
                "{bad:?}: {reason:?} does not blame {c:?} at position {pos}"
            );
        }
        // Too few or too many digits for E.164, and national numbers (a single leading 0).
        assert!(
            err("+49 151").contains("7 to 15 digits"),
            "{}",
            err("+49 151")
        );
        assert!(err("+49 151 1234 5678 9012").contains("7 to 15 digits"));
        assert!(err("1.5").contains("7 to 15 digits"));
        assert!(
            err("0151 1234567").contains("'0' at position 1"),
            "{}",
            err("0151 1234567")
        );
        assert!(err("+0049 151 1234567").contains("'0' at position 2"));
    }

    #[test]
    fn phone_forms_keep_their_digits_and_00_is_the_international_prefix() {
        let norm = |s: &str| RecipientId::parse("recipient", s).unwrap().0;
        for ok in [
            "+49 151 1234-5678",
            "+49 (151) 1234.5678",
            "(0049) 151 12345678",
            "0049 151 1234 5678",
            "0049-151-1234-5678",
            "4915112345678",
        ] {
            assert_eq!(norm(ok), "4915112345678", "{ok:?}");
        }
        assert_eq!(norm("+1 (555) 010-0123"), "15550100123");
        assert_eq!(norm("+1(555)010-0123"), "15550100123");
        assert_eq!(norm("555-0100"), "5550100");
        // A plain run of digits is a wa_id (or any opaque id): kept as given, 1 to 128 digits,
        // `00` included.
        for digits in ["1", "49151", "004915112345678", "0151", &"4".repeat(128)] {
            assert_eq!(norm(digits), digits);
        }
        // Dashes and dots with letters, or with no digit at all, are opaque tokens.
        assert_eq!(norm("US.1349:ab_c-d"), "US.1349:ab_c-d");
        assert_eq!(norm("u-1"), "u-1");
        assert_eq!(norm("--"), "--");
    }

    #[test]
    fn ladders_and_thresholds() {
        assert_eq!(Tier::T1K.next(RuleSet::Legacy), Some(Tier::T10K));
        assert_eq!(Tier::T250.next(RuleSet::Portfolio), Some(Tier::T2K));
        assert_eq!(Tier::T50.next(RuleSet::Legacy), None);
        assert_eq!(Tier::T10K.previous(), Some(Tier::T1K));
        assert_eq!(effective_limit(250, 10), 225);
        assert_eq!(effective_limit(1000, 33), 670);
    }

    #[test]
    fn decision_codes_round_trip() {
        for (i, d) in Decision::ALL.iter().enumerate() {
            assert_eq!(d.code(), i as i64 + 1);
            assert_eq!(Decision::from_code(d.code()), Some(*d));
        }
        assert_eq!(Decision::from_code(0), None);
        assert_eq!(Decision::from_code(11), None);
    }

    #[test]
    fn reservation_tokens_are_canonical_and_bound_to_sender_and_recipient() {
        let k = ReservationSigner::new(b"secret");
        let (s, x) = (
            SenderId::parse("s", "s1").unwrap(),
            SenderId::parse("s", "s2").unwrap(),
        );
        let u = RecipientId::parse("r", "4915112345678").unwrap();
        let r = Reservation {
            opened_at: 1_700_000_000_123,
            seq: 42,
        };
        let t = k.encode(&s, &u, &r);
        assert_eq!(k.verify("reservation", &t, &s, &u).unwrap(), r);
        assert!(k.verify("reservation", &t, &x, &u).is_err());
        let other = RecipientId::parse("r", "4915112345679").unwrap();
        assert!(k.verify("reservation", &t, &s, &other).is_err());
        assert!(
            ReservationSigner::new(b"other")
                .verify("reservation", &t, &s, &u)
                .is_err()
        );
        let mac = t.rsplit_once('.').unwrap().1;
        for forged in [
            format!("r1.42.{mac}"),
            format!("r01700000000123.42.{mac}"),
            format!("r+1700000000123.42.{mac}"),
            format!("r1700000000123.042.{mac}"),
            format!("r-0.0.{mac}"),
            format!("r1700000000123.42.{}", mac.to_uppercase()),
            format!("r1700000000123.42.{mac}0"),
            "r1700000000123.42".to_owned(),
            "x".to_owned(),
        ] {
            let e = k.verify("reservation", &forged, &s, &u).unwrap_err();
            assert_eq!(e.field, "reservation", "{forged}");
        }
        assert_eq!(Reservation::from_stored(&r.stored()), Some(r));
        assert_eq!(
            Reservation::from_stored("-5.3").map(|r| r.opened_at),
            Some(-5)
        );
        assert_eq!(Reservation::from_stored("-0.3"), None);
        let c = Cursor {
            position: 5,
            recipient: Some(RecipientId::parse("r", "49151").unwrap()),
        };
        assert_eq!(Cursor::parse("page_token", &c.encode()).unwrap(), c);
        let start = Cursor {
            position: 0xffff_0000,
            recipient: None,
        };
        assert_eq!(Cursor::parse("page_token", &start.encode()).unwrap(), start);
        assert!(Cursor::parse("page_token", "5/49151").is_err());
        // The same order as lua/lib.lua's win_pos (SHA-1 of "a" starts 86f7e437).
        let a = RecipientId::parse("r", "a").unwrap();
        assert_eq!(listing_position(&a), 0x86f7_e437u32.reverse_bits());
    }
}
