//! The Lua scripts, loaded once and called with EVALSHA (one round trip per call).
//!
//! Each script is `lua/lib.lua` followed by its own file. On NOSCRIPT (a restarted or failed-over
//! Redis, a cluster node that never saw the script) the call is repeated once as EVAL, which
//! both answers and caches the script on that node; nothing is sent ahead of time, so a healthy
//! call is always exactly one EVALSHA.

use std::sync::atomic::{AtomicU64, Ordering};

/// A script's source and SHA1, computed at start-up.
pub struct Script {
    pub name: &'static str,
    pub source: &'static str,
    pub sha: String,
}

macro_rules! script {
    ($name:literal) => {
        Script::new(
            $name,
            concat!(
                include_str!("../../../lua/lib.lua"),
                include_str!(concat!("../../../lua/", $name, ".lua"))
            ),
        )
    };
}

impl Script {
    fn new(name: &'static str, source: &'static str) -> Self {
        Script {
            name,
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }
}

pub struct Scripts {
    pub acquire: Script,
    pub release: Script,
    pub inbound: Script,
    pub inspect: Script,
    pub list: Script,
    pub policy: Script,
    pub reset: Script,
    pub move_out: Script,
    pub move_in: Script,
    /// How many times a script had to be sent again (NOSCRIPT).
    pub reloads: AtomicU64,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            acquire: script!("acquire"),
            release: script!("release"),
            inbound: script!("inbound"),
            inspect: script!("inspect"),
            list: script!("list"),
            policy: script!("policy"),
            reset: script!("reset"),
            move_out: script!("move_out"),
            move_in: script!("move_in"),
            reloads: AtomicU64::new(0),
        }
    }

    pub fn count_reload(&self) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
