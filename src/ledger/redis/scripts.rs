//! The Lua scripts, loaded once and called with EVALSHA (one round trip per call).
//!
//! Each script is a prelude generated from `model` (tier limits, ladders, projection constants:
//! one source of truth for both ledgers), then `lua/lib.lua`, then its own file. On NOSCRIPT (a restarted or failed-over
//! Redis, a cluster node that never saw the script) the call is repeated once as EVAL, which
//! both answers and caches the script on that node; nothing is sent ahead of time, so a healthy
//! call is always exactly one EVALSHA.

use std::fmt::Write;

use crate::model::{
    FLAGGED_DOWNGRADE_MS, MONTH_MS, PORTFOLIO_ENTRY_UNIQUES, RuleSet, Tier, WEEK_MS, upgrade_delay,
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
         local PORTFOLIO_ENTRY_UNIQUES = {PORTFOLIO_ENTRY_UNIQUES}\n\n",
        upgrade_delay(RuleSet::Legacy),
        upgrade_delay(RuleSet::Portfolio),
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
