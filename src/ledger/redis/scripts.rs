//! The Lua scripts, loaded once and called with EVALSHA (one round trip per call).
//!
//! Each script is a prelude generated from `model` (tier limits, ladders, projection constants,
//! decision codes, blocking statuses, default periods: one source of truth for both ledgers),
//! then `lua/lib.lua`, then its own file. On NOSCRIPT (a restarted or failed-over
//! Redis, a cluster node that never saw the script) the call is repeated once as EVAL, which
//! both answers and caches the script on that node; nothing is sent ahead of time, so a healthy
//! call is always exactly one EVALSHA.

use std::fmt::Write;

use super::keys::{Home, HomeKeys, Keys};
use super::{TTL_SLACK_MS, defaults_at};
use crate::config::OnLedgerLoss;
use crate::model::{
    AcquireRequest, Category, DEFAULT_MARKETING_PERIOD_MS, Decision, Defaults,
    FLAGGED_DOWNGRADE_MS, MARKETING_HOLD_MS, MONTH_MS, MessageKind, Millis,
    PORTFOLIO_ENTRY_UNIQUES, RecipientId, RuleSet, SLOT_MS, SenderId, SenderStatus, Tier, WEEK_MS,
    upgrade_delay,
};

/// A script's source and SHA1, computed at start-up.
pub struct Script {
    pub name: &'static str,
    pub source: String,
    pub sha: String,
}

macro_rules! script {
    ($prelude:expr, $name:literal) => {
        Script::new(
            $name,
            format!(
                "{}{}{}",
                $prelude,
                include_str!("../../../lua/lib.lua"),
                include_str!(concat!("../../../lua/", $name, ".lua"))
            ),
        )
    };
}

impl Script {
    /// Whether the script may change the ledger (all but the read-only Inspect and ListWindow):
    /// with `durability = replicated`, its answer waits for replicas.
    pub fn writes(&self) -> bool {
        !matches!(self.name, "inspect" | "list" | "slot")
    }

    fn new(name: &'static str, source: String) -> Self {
        let sha = redis::Script::new(&source).get_hash().to_owned();
        Script { name, source, sha }
    }
}

/// Lua constants generated from `model`, so the scripts and the memory ledger share one ladder.
fn prelude() -> String {
    let mut p =
        String::from("-- Generated from waquota's model at start-up.\nlocal TIER_LIMIT = {");
    for t in Tier::ALL {
        let _ = write!(p, " ['{}'] = {},", t.name(), t.limit());
    }
    p.push_str(" }\nlocal TIER_NEXT = {");
    for rules in RuleSet::ALL {
        let _ = write!(p, " {} = {{", rules.name());
        for t in Tier::ALL {
            if let Some(n) = t.next(*rules) {
                let _ = write!(p, " ['{}'] = '{}',", t.name(), n.name());
            }
        }
        p.push_str(" },");
    }
    p.push_str(" }\nlocal TIER_PREV = {");
    for t in Tier::ALL {
        if let Some(prev) = t.previous() {
            let _ = write!(p, " ['{}'] = '{}',", t.name(), prev.name());
        }
    }
    let _ = write!(
        p,
        " }}\nlocal UPGRADE_DELAY_MS = {{ legacy = {}, portfolio = {} }}\n\
         local FLAGGED_DOWNGRADE_MS, WEEK_MS, MONTH_MS = {FLAGGED_DOWNGRADE_MS}, {WEEK_MS}, {MONTH_MS}\n\
         local PORTFOLIO_ENTRY_UNIQUES = {PORTFOLIO_ENTRY_UNIQUES}\n",
        upgrade_delay(RuleSet::Legacy),
        upgrade_delay(RuleSet::Portfolio),
    );
    // The decision codes the replies carry (`Decision::code`), by name: `D.denied_limit`.
    p.push_str("local D = {");
    for d in Decision::ALL {
        let _ = write!(p, " {} = {},", d.name(), d.code());
    }
    // The statuses that refuse every message (`SenderStatus::blocks`).
    p.push_str(" }\nlocal BLOCKING = {");
    for s in SenderStatus::ALL.iter().filter(|s| s.blocks()) {
        let _ = write!(p, " {} = true,", s.name());
    }
    let _ = write!(
        p,
        " }}\nlocal DEFAULT_MARKETING_PERIOD_MS, MARKETING_HOLD_MS = {DEFAULT_MARKETING_PERIOD_MS}, {MARKETING_HOLD_MS}\n\n"
    );
    p
}

pub struct Scripts {
    pub acquire: Script,
    pub release: Script,
    pub inbound: Script,
    pub inspect: Script,
    pub list: Script,
    pub policy: Script,
    pub reset: Script,
    pub move_journal: Script,
    pub move_out: Script,
    pub move_in: Script,
    pub confirm: Script,
    pub failure: Script,
    pub ledger: Script,
    pub slot: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let p = prelude();
        Scripts {
            acquire: script!(p, "acquire"),
            release: script!(p, "release"),
            inbound: script!(p, "inbound"),
            inspect: script!(p, "inspect"),
            list: script!(p, "list"),
            policy: script!(p, "policy"),
            reset: script!(p, "reset"),
            move_journal: script!(p, "move"),
            move_out: script!(p, "move_out"),
            move_in: script!(p, "move_in"),
            confirm: script!(p, "confirm"),
            failure: script!(p, "failure"),
            ledger: script!(p, "ledger"),
            slot: script!(p, "slot"),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

// ------------------------------------------------------------------------------ calls

/// One script call: the EVALSHA command itself, built once as keys and arguments are added
/// (every recipient of a batch is copied into it once, not into a list first).
pub(super) struct Call<'a> {
    pub(super) script: &'a Script,
    pub(super) cmd: redis::Cmd,
}

impl<'a> Call<'a> {
    pub(super) fn new(script: &'a Script, keys: Vec<String>) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.sha.as_str()).arg(keys.len()).arg(keys);
        Call { script, cmd }
    }

    pub(super) fn arg(mut self, a: impl AsRef<[u8]>) -> Self {
        self.cmd.arg(a.as_ref());
        self
    }

    pub(super) fn num(mut self, n: impl redis::ToRedisArgs) -> Self {
        self.cmd.arg(n);
        self
    }

    pub(super) fn clock(self, at: Option<Millis>) -> Self {
        match at {
            Some(ms) => self.num(ms),
            None => self.arg(""),
        }
    }

    /// The same call sending the script's source (EVAL), for when Redis answered NOSCRIPT: the
    /// command name and the SHA give way to EVAL and the source, the rest is copied.
    pub(super) fn by_source(&self) -> redis::Cmd {
        let mut c = redis::cmd("EVAL");
        c.arg(self.script.source.as_str());
        for a in self.cmd.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = a {
                c.arg(bytes);
            }
        }
        c
    }
}

/// The acquire script's call (KEYS and ARGV as documented in `lua/acquire.lua`) for `req` at
/// `home`.
pub(super) fn acquire_call<'a>(
    s: &'a Script,
    home: &Home,
    k: &HomeKeys,
    req: &AcquireRequest,
    defaults: &Defaults,
    on_loss: OnLedgerLoss,
) -> Call<'a> {
    let w = defaults_at(defaults, home);
    let mut call = Call::new(
        s,
        vec![
            k.window(),
            k.window_index(),
            k.window_policy(&req.sender),
            k.service_windows(&req.sender),
            k.residency(),
            k.sender_policy(&req.sender),
            k.sender_slots(&req.sender),
            k.throughput(&req.sender),
            k.pair_rates(&req.sender),
            k.marketing_log(&req.sender),
            k.marketing_holds(),
            k.uniques(),
            k.ledger_marker(),
        ],
    )
    .clock(req.at)
    .arg(home.kind())
    .arg(req.sender.as_str())
    .arg(if req.kind == MessageKind::FreeForm {
        "f"
    } else {
        "t"
    })
    .arg(if req.dry_run { "1" } else { "0" })
    .arg(if req.category == Some(Category::Marketing) {
        "1"
    } else {
        "0"
    })
    .arg(w.tier.name())
    .arg(w.window_mode.name())
    .arg(w.rule_set.name())
    .num(defaults.messages_per_second)
    .num(defaults.pair_interval_ms)
    .num(defaults.pair_burst)
    .num(SLOT_MS)
    .num(TTL_SLACK_MS)
    .arg(loss_mode(on_loss));
    for r in &req.recipients {
        call = call.arg(r.as_str());
    }
    call
}

/// The head shared by the scripts that act on one recipient's slot (`confirm.lua`, `slot.lua`):
/// the window's keys and residency, then the clock, home kind, sender and recipient.
pub(super) fn slot_call<'a>(
    s: &'a Script,
    home: &Home,
    k: &HomeKeys,
    at: Option<Millis>,
    sender: &SenderId,
    recipient: &RecipientId,
) -> Call<'a> {
    Call::new(s, vec![k.window(), k.window_index(), k.residency()])
        .clock(at)
        .arg(home.kind())
        .arg(sender.as_str())
        .arg(recipient.as_str())
}

/// The ledger scripts' name for an `on_ledger_loss` choice.
pub(super) fn loss_mode(on_loss: OnLedgerLoss) -> &'static str {
    match on_loss {
        OnLedgerLoss::DenyNew => "d",
        OnLedgerLoss::Allow => "a",
    }
}

/// The very EVALSHA that [`RedisLedger`] sends for `req` at `home` (the sender's own window or
/// its portfolio's), for tools that drive the decision script without the service (`bench`).
/// The script must already be cached on the server (`SCRIPT LOAD` of `script.source`).
/// A lost ledger is only reported (`allow`): such a tool starts on a Redis without a marker.
pub fn acquire_cmd(
    script: &Script,
    keys: &Keys,
    home: &Home,
    req: &AcquireRequest,
    defaults: &Defaults,
) -> redis::Cmd {
    acquire_call(
        script,
        home,
        &keys.home(home),
        req,
        defaults,
        OnLedgerLoss::Allow,
    )
    .cmd
}
