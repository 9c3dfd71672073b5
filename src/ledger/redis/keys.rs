//! The key schema, in one place (documented in docs/internals.md, "Redis key schema").
//!
//! Every key of one *home* shares the hash tag `{s:<sender>}` (a sender's own home) or
//! `{p:<portfolio>}` (a portfolio's home), so each script touches a single cluster slot. A
//! sender's own state (its policy, its service windows) lives at its current home: its own while
//! unassigned, its portfolio's while assigned, because the decision script needs it in the same
//! slot as the window that decides. Ids never contain `{` or `}` (see `model`), so no id can
//! change a tag.

use crate::model::{PortfolioId, SenderId, Target};

/// Where a sender's state lives, and whose window decides for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Home {
    Sender(SenderId),
    Portfolio(PortfolioId),
}

impl Home {
    /// "s" or "p": what the scripts' residency checks expect.
    pub fn kind(&self) -> &'static str {
        match self {
            Home::Sender(_) => "s",
            Home::Portfolio(_) => "p",
        }
    }

    pub fn of(portfolio: Option<PortfolioId>, sender: &SenderId) -> Home {
        match portfolio {
            Some(p) => Home::Portfolio(p),
            None => Home::Sender(sender.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// On a Cluster, one ledger marker per hash slot (a script may only read keys of its own
    /// slot); elsewhere one for the whole ledger.
    slotted: bool,
}

/// The keys of one home; built once per request.
#[derive(Debug, Clone)]
pub struct HomeKeys {
    /// `<prefix>:{s:<sender>}` or `<prefix>:{p:<portfolio>}`
    base: String,
    kind: &'static str,
    marker: String,
}

/// Sets per day of remembered webhook events: a set stays an intset (8 bytes a member) up to
/// Redis's `set-max-intset-entries` (512), so up to some 500K events a day are kept at 9-23 bytes
/// each (BENCHMARKS.md, "Webhook events remembered").
pub const EVENT_SHARDS: u64 = 1024;

/// Cluster hash slots.
const SLOTS: usize = 16384;

/// The Cluster hash slot of a hash tag (CRC16/XMODEM, as Redis computes it).
fn slot_of(tag: &str) -> usize {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) as usize % SLOTS
}

/// For each hash slot, a short tag that hashes to it (the first decimal number that does):
/// a marker key `<prefix>:ledger:{<tag>}` lands in the slot of any home.
fn slot_tags() -> &'static [String] {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS];
        let (mut left, mut n) = (SLOTS, 0u64);
        while left > 0 {
            let tag = n.to_string();
            let slot = slot_of(&tag);
            if tags[slot].is_empty() {
                tags[slot] = tag;
                left -= 1;
            }
            n += 1;
        }
        tags
    })
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            slotted: false,
        }
    }

    /// The keys on a Redis Cluster: a ledger marker per hash slot.
    pub fn cluster(prefix: &str) -> Self {
        Keys {
            slotted: true,
            ..Keys::new(prefix)
        }
    }

    /// string: the ledger marker, "1" while the ledger is whole, "lost <ms>" once it was found
    /// gone (lua/lib.lua, `ledger_check`; docs/contract.md, "A lost ledger"). Every instance
    /// creates it on first contact. Persistent. On a Cluster, `<prefix>:ledger:{<tag>}` for each
    /// hash slot, the tag chosen to land in that slot ([`Keys::ledger_markers`]).
    fn ledger_marker_of(&self, tag: &str) -> String {
        if self.slotted {
            format!("{}:ledger:{{{}}}", self.prefix, slot_tags()[slot_of(tag)])
        } else {
            format!("{}:ledger", self.prefix)
        }
    }

    /// Every ledger marker: one, or one per Cluster hash slot.
    pub fn ledger_markers(&self) -> Vec<String> {
        if self.slotted {
            slot_tags()
                .iter()
                .map(|t| format!("{}:ledger:{{{t}}}", self.prefix))
                .collect()
        } else {
            vec![format!("{}:ledger", self.prefix)]
        }
    }

    /// string: the secret under which every instance signs reservations (`model::
    /// ReservationSigner`); written once, by the first instance that finds none. Persistent.
    /// set of 64-bit event identities (as integers, so Redis keeps small sets as compact
    /// intsets): the webhook events applied whose time falls on `day` (days since 1970), one of
    /// [`EVENT_SHARDS`] per day by identity. Expires 7 days after its day's end.
    pub fn webhook_events(&self, day: i64, identity: u64) -> String {
        format!("{}:wh:{day}:{}", self.prefix, identity % EVENT_SHARDS)
    }

    /// set (or string with one value): what the webhook bridge learned of an identity: `display`
    /// number -> its sender, `waba` -> its senders, `wabaportfolio` -> its portfolio.
    /// Persistent (configuration learned from WhatsApp).
    pub fn identity(&self, kind: &str, key: &str) -> String {
        format!("{}:id:{kind}:{key}", self.prefix)
    }

    /// zset of every target some call wrote state for, as [`Target::member`] (`p:<id>`,
    /// `s:<id>`) with score 0, so `ZRANGE BYLEX` pages it in listing order. Each instance adds
    /// a target once per process lifetime (redis::registry); persistent. A superset of the
    /// known targets: the listing keeps those Inspect calls known.
    pub fn targets(&self) -> String {
        format!("{}:targets", self.prefix)
    }

    /// list of a target's audit entries (JSON), newest first, trimmed to `model::AUDIT_KEEP`:
    /// at the target's own hash tag, `<prefix>:{s:<id>}:audit` (it stays there when a sender
    /// moves), or `<prefix>:audit` for the ledger-wide log. Persistent.
    pub fn audit(&self, target: Option<&Target>) -> String {
        match target {
            Some(Target::Sender(s)) => format!("{}:{{s:{s}}}:audit", self.prefix),
            Some(Target::Portfolio(p)) => format!("{}:{{p:{p}}}:audit", self.prefix),
            None => format!("{}:audit", self.prefix),
        }
    }

    pub fn reservation_secret(&self) -> String {
        format!("{}:secret", self.prefix)
    }

    pub fn home(&self, home: &Home) -> HomeKeys {
        let tag = match home {
            Home::Sender(s) => format!("s:{s}"),
            Home::Portfolio(p) => format!("p:{p}"),
        };
        HomeKeys {
            base: format!("{}:{{{tag}}}", self.prefix),
            kind: home.kind(),
            marker: self.ledger_marker_of(&tag),
        }
    }
}

impl HomeKeys {
    /// The ledger marker in this home's hash slot.
    pub fn ledger_marker(&self) -> String {
        self.marker.clone()
    }

    fn key(&self, suffix: &str) -> String {
        let mut k = String::with_capacity(self.base.len() + 1 + suffix.len());
        k.push_str(&self.base);
        k.push(':');
        k.push_str(suffix);
        k
    }

    /// hash: the header of the sharded window (`n` live slots, `lvl`/`sp` linear-hashing level
    /// and split pointer, `seq`/`sb` last and first reservation sequence, `last` latest expiry,
    /// `tr` when the window's TTLs run out). Its shards, `<window>:<i>` (zset recipient ->
    /// expiry) and `<base>:wm:<i>` (hash recipient -> slot value), are named by the scripts
    /// (lua/lib.lua, `win_open`) and share the hash tag; sharding keeps every piece in Redis's
    /// compact listpack encoding (docs/internals.md, "Redis key schema"). TTL: latest expiry +
    /// slack, renewed for every key of the window at once.
    pub fn window(&self) -> String {
        self.key("w")
    }

    /// `SCAN` patterns of the window's shard keys: `<window>:<i>` (zsets) and `<base>:wm:<i>`
    /// (hashes), as lua/lib.lua (`win_open`) names them.
    pub fn window_shard_patterns(&self) -> [String; 2] {
        [self.key("w:*"), self.key("wm:*")]
    }

    /// zset shard -> the earliest slot expiry in it: trimming, counting and retry_after walk the
    /// shards in this order. TTL: as the window.
    pub fn window_index(&self) -> String {
        self.key("wx")
    }

    /// hash of the policy fields (`policy_fields` in mod.rs) and projection state (flagged,
    /// up_at, up_from): a portfolio's policy. Persistent (configuration).
    pub fn portfolio_policy(&self) -> String {
        self.key("pol")
    }

    /// hash of the policy fields and projection state: a sender's own policy, kept at its
    /// current home. Persistent (configuration).
    pub fn sender_policy(&self, sender: &SenderId) -> String {
        self.key(&format!("sp:{sender}"))
    }

    /// zset recipient -> service window expiry (ms) of one sender. TTL: latest expiry + slack.
    pub fn service_windows(&self, sender: &SenderId) -> String {
        self.key(&format!("csw:{sender}"))
    }

    /// Portfolio home: zset recipient -> expiry of the slots one sender opened there (sender
    /// caps). TTL: latest expiry + slack.
    pub fn sender_slots(&self, sender: &SenderId) -> String {
        self.key(&format!("ws:{sender}"))
    }

    /// Prefix of the per-sender slot indexes (scripts append the opener); "" at a sender home,
    /// which keeps none (its window holds one sender's slots only).
    pub fn sender_slots_prefix(&self) -> String {
        if self.kind == "p" {
            self.key("ws:")
        } else {
            String::new()
        }
    }

    /// string: the sender's throughput GCRA theoretical arrival time (us). TTL: until it.
    pub fn throughput(&self, sender: &SenderId) -> String {
        self.key(&format!("tp:{sender}"))
    }

    /// zset recipient -> pair-rate GCRA theoretical arrival time (us). TTL: latest + slack.
    pub fn pair_rates(&self, sender: &SenderId) -> String {
        self.key(&format!("pr:{sender}"))
    }

    /// hash recipient -> "t1,t2,..." recent marketing sends (ms). TTL: cap period + slack.
    pub fn marketing_log(&self, sender: &SenderId) -> String {
        self.key(&format!("mk:{sender}"))
    }

    /// zset recipient -> marketing held until (ms), after WhatsApp error 131049. TTL: latest + slack.
    pub fn marketing_holds(&self) -> String {
        self.key("mh")
    }

    /// The projection index (tier projections, 30 days): zset recipient -> when the user last got
    /// a new slot (ms), in parts (`uq/<i>`); beside it, named from this key in lua/lib.lua
    /// (`ut_open`), the same times by two-hour bucket (`uq:t:<bucket>`) and their counts and
    /// cursors (`uq:t`).
    pub fn uniques(&self) -> String {
        self.key("uq")
    }

    /// Prefix of the service-window keys of this home (the inspect script appends a sender).
    pub fn service_windows_prefix(&self) -> String {
        self.key("csw:")
    }

    /// Sender home: string "away" = the portfolio it is assigned to (absent when unassigned).
    /// Portfolio home: set "m" of the senders assigned to it. Both persistent (configuration).
    pub fn residency(&self) -> String {
        self.key(if self.kind == "s" { "away" } else { "m" })
    }

    /// Sender home: string "<from>><to>><started>><mover>" while the sender is being
    /// reassigned (the journal that serialises and completes moves; `mover` is the instance
    /// running it). Present only during a move.
    pub fn move_journal(&self) -> String {
        self.key("mv")
    }

    /// The policy of the window that decides at this home.
    pub fn window_policy(&self, sender: &SenderId) -> String {
        if self.kind == "s" {
            self.sender_policy(sender)
        } else {
            self.portfolio_policy()
        }
    }

    /// The keys that move with a sender when it is assigned elsewhere.
    pub fn sender_scoped(&self, sender: &SenderId) -> [String; 5] {
        [
            self.sender_policy(sender),
            self.service_windows(sender),
            self.throughput(sender),
            self.pair_rates(sender),
            self.marketing_log(sender),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_home_share_a_hash_tag() {
        let keys = Keys::new("wq");
        let s = SenderId::parse("sender", "1555:0100").unwrap();
        let h = keys.home(&Home::Sender(s.clone()));
        assert_eq!(h.window(), "wq:{s:1555:0100}:w");
        assert_eq!(
            h.window_shard_patterns(),
            ["wq:{s:1555:0100}:w:*", "wq:{s:1555:0100}:wm:*"]
        );
        assert_eq!(h.residency(), "wq:{s:1555:0100}:away");
        assert_eq!(h.service_windows(&s), "wq:{s:1555:0100}:csw:1555:0100");
        let p = keys.home(&Home::Portfolio(
            PortfolioId::parse("portfolio", "P1").unwrap(),
        ));
        assert_eq!(p.window_policy(&s), "wq:{p:P1}:pol");
        assert_eq!(p.sender_policy(&s), "wq:{p:P1}:sp:1555:0100");
        assert_eq!(p.residency(), "wq:{p:P1}:m");
    }
}
