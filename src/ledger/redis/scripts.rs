//! The Lua scripts, loaded once as one Redis function library and called with FCALL (one round
//! trip per call).
//!
//! The library is a prelude generated from `model` (tier limits, ladders, projection constants,
//! decision codes, blocking statuses, default periods: one source of truth for both ledgers),
//! then `lua/lib.lua`, then each script's file as the body of a function. A library is loaded
//! once and its helpers and tables are built once, where `EVALSHA` rebuilt all of them on every
//! call (BENCHMARKS.md, "Functions instead of scripts"). Names carry the library's hash, so two
//! versions of waquota can share a Redis during an upgrade. When Redis does not know the function
//! (a restarted Redis without persistence, a new Cluster node, `FUNCTION FLUSH`) the library is
//! loaded (`FUNCTION LOAD REPLACE`, on every primary of a Cluster) and the call repeated once;
//! nothing is sent ahead of time, so a healthy call is always exactly one FCALL.

use std::fmt::Write;

use super::keys::{Home, HomeKeys, Keys};
use super::{TTL_SLACK_MS, defaults_at};
use crate::config::{OnLedgerLoss, SET_PART_FILL};
use crate::model::{
    AcquireRequest, Category, DEFAULT_MARKETING_PERIOD_MS, Decision, Defaults,
    FLAGGED_DOWNGRADE_MS, MARKETING_HOLD_MS, MONTH_MS, MessageKind, Millis,
    PORTFOLIO_ENTRY_UNIQUES, RecipientId, RuleSet, SLOT_MS, SenderId, SenderStatus, Tier, WEEK_MS,
    upgrade_delay,
};

/// One function of the library: the script it runs and the name it is called by.
pub struct Script {
    pub name: &'static str,
    /// `waquota_<library hash>_<name>`: what FCALL names.
    pub function: String,
}

impl Script {
    /// Whether the script may change the ledger (all but the read-only Inspect, ListWindow and the planner's read):
    /// with `durability = replicated`, its answer waits for replicas.
    pub fn writes(&self) -> bool {
        !READ_ONLY.contains(&self.name)
    }
}

/// The scripts that never write: their functions carry Redis's `no-writes` flag, and their calls
/// do not wait for replicas.
const READ_ONLY: [&str; 4] = ["inspect", "list", "slot", "uniques"];

/// Every script, in the library's order, with its source.
const SOURCES: [(&str, &str); 15] = [
    ("acquire", include_str!("../../../lua/acquire.lua")),
    ("release", include_str!("../../../lua/release.lua")),
    ("inbound", include_str!("../../../lua/inbound.lua")),
    ("inspect", include_str!("../../../lua/inspect.lua")),
    ("list", include_str!("../../../lua/list.lua")),
    ("policy", include_str!("../../../lua/policy.lua")),
    ("reset", include_str!("../../../lua/reset.lua")),
    ("move", include_str!("../../../lua/move.lua")),
    ("move_out", include_str!("../../../lua/move_out.lua")),
    ("move_in", include_str!("../../../lua/move_in.lua")),
    ("confirm", include_str!("../../../lua/confirm.lua")),
    ("failure", include_str!("../../../lua/failure.lua")),
    ("ledger", include_str!("../../../lua/ledger.lua")),
    ("slot", include_str!("../../../lua/slot.lua")),
    ("uniques", include_str!("../../../lua/uniques.lua")),
];

/// The library's code after its `#!lua name=` line, and the hash that names it.
fn library_code(set_part_fill: usize) -> (String, String) {
    let mut code = prelude(set_part_fill);
    code.push_str(include_str!("../../../lua/lib.lua"));
    for (name, body) in SOURCES {
        // A function's body sees KEYS and ARGV as its parameters, as a script sees its globals.
        let _ = write!(
            code,
            "\nlocal function script_{name}(KEYS, ARGV)\n{body}\nend\n"
        );
    }
    let hash = redis::Script::new(&code).get_hash()[..16].to_owned();
    for (name, _) in SOURCES {
        // Read-only functions say so, so Redis may run them where writes are refused. The clock
        // read from Redis's TIME is per call: the library's state outlives a call.
        let flags = if READ_ONLY.contains(&name) {
            "{ 'no-writes' }"
        } else {
            "{}"
        };
        let _ = writeln!(
            code,
            "redis.register_function{{ function_name = 'waquota_{hash}_{name}', flags = {flags}, \
             callback = function(keys, args) redis_now = nil return script_{name}(keys, args) end }}"
        );
    }
    (code, hash)
}

/// Lua constants generated from `model`, so the scripts and the memory ledger share one ladder.
fn prelude(set_part_fill: usize) -> String {
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
        " }}\nlocal DEFAULT_MARKETING_PERIOD_MS, MARKETING_HOLD_MS = {DEFAULT_MARKETING_PERIOD_MS}, {MARKETING_HOLD_MS}\n"
    );
    // Entries per part of a sender's sets before it splits (lua/lib.lua, sset_write).
    let _ = write!(p, "local SSET_FILL = {set_part_fill}\n\n");
    p
}

pub struct Scripts {
    /// The library's full source, as `FUNCTION LOAD` takes it.
    pub library: String,
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
    pub uniques: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self::with_set_part_fill(SET_PART_FILL)
    }

    /// The library with another part fill for a sender's sets (`Settings::set_part_fill`).
    pub fn with_set_part_fill(set_part_fill: usize) -> Self {
        let (code, hash) = library_code(set_part_fill.max(2));
        let f = |name: &'static str| Script {
            name,
            function: format!("waquota_{hash}_{name}"),
        };
        Scripts {
            library: format!("#!lua name=waquota_{hash}\n{code}"),
            acquire: f("acquire"),
            release: f("release"),
            inbound: f("inbound"),
            inspect: f("inspect"),
            list: f("list"),
            policy: f("policy"),
            reset: f("reset"),
            move_journal: f("move"),
            move_out: f("move_out"),
            move_in: f("move_in"),
            confirm: f("confirm"),
            failure: f("failure"),
            ledger: f("ledger"),
            slot: f("slot"),
            uniques: f("uniques"),
        }
    }

    /// `FUNCTION LOAD REPLACE` of the library (on a Cluster, redis-rs sends it to every primary).
    pub fn load_cmd(&self) -> redis::Cmd {
        let mut c = redis::cmd("FUNCTION");
        c.arg("LOAD").arg("REPLACE").arg(self.library.as_str());
        c
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

// ------------------------------------------------------------------------------ calls

/// One script call: the FCALL command itself, built once as keys and arguments are added
/// (every recipient of a batch is copied into it once, not into a list first).
pub(super) struct Call<'a> {
    pub(super) script: &'a Script,
    pub(super) cmd: redis::Cmd,
}

impl<'a> Call<'a> {
    pub(super) fn new(script: &'a Script, keys: Vec<String>) -> Self {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(script.function.as_str()).arg(keys.len()).arg(keys);
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
}

/// Whether Redis answered that it does not know the function: its library is not loaded there.
/// Read from the message, which is the same whether the call went alone or in a pipeline with
/// `WAIT` (`durability = replicated`), where the error comes wrapped as a pipeline failure.
pub(super) fn function_missing(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
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

/// The very FCALL that [`RedisLedger`] sends for `req` at `home` (the sender's own window or
/// its portfolio's), for tools that drive the decision script without the service (`bench`).
/// The library must already be loaded on the server ([`Scripts::load_cmd`]).
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
