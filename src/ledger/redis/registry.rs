//! The registry of targets and the audit log: what the listing and `waquota audit` read.
//!
//! Why a registry instead of `SCAN`: a listing by `SCAN` walks every key of the ledger (each
//! window is many keys) on every node, and cannot page in a stable order. The registry is one
//! sorted set written once per target per process (a set of members seen is kept here), so the
//! decision scripts stay as they are and the decision path pays one `ZADD` per new target per
//! instance, nothing after (docs/internals.md, "Listing targets and the audit log").

use std::collections::HashSet;

use super::{RedisLedger, bad_reply, items, text};
use crate::ledger::Result;
use crate::model::{AUDIT_KEEP, AuditEntry, PortfolioId, SenderId, Target, TargetKind};

/// Registered targets this process remembers; past this it starts over (a repeated `ZADD` of
/// a member is harmless, it only costs a round trip).
const REGISTERED_MAX: usize = 1_000_000;

/// Targets this instance has written to the registry, by kind, so that a decision's check is
/// a lookup of the sender id it already holds.
#[derive(Default)]
pub(super) struct Registered(std::sync::Mutex<Seen>);

#[derive(Default)]
struct Seen {
    senders: HashSet<SenderId>,
    portfolios: HashSet<PortfolioId>,
}

impl Seen {
    fn forget(&mut self, t: &Target) {
        match t {
            Target::Sender(s) => self.senders.remove(s),
            Target::Portfolio(p) => self.portfolios.remove(p),
        };
    }
}

impl RedisLedger {
    /// Writes the sender and the portfolio given, where this instance has not registered them
    /// yet (after that, one set lookup and no allocation). A failure is not the caller's: the
    /// call goes on, and the next one tries again.
    pub(super) async fn register(
        &self,
        sender: Option<&SenderId>,
        portfolio: Option<&PortfolioId>,
    ) {
        let new: Vec<Target> = {
            let mut seen = self.registered.0.lock().unwrap_or_else(|e| e.into_inner());
            if seen.senders.len() + seen.portfolios.len() >= REGISTERED_MAX {
                *seen = Seen::default();
            }
            let mut new = Vec::new();
            if let Some(s) = sender
                && !seen.senders.contains(s)
            {
                seen.senders.insert(s.clone());
                new.push(Target::Sender(s.clone()));
            }
            if let Some(p) = portfolio
                && !seen.portfolios.contains(p)
            {
                seen.portfolios.insert(p.clone());
                new.push(Target::Portfolio(p.clone()));
            }
            new
        };
        if new.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.keys.targets());
        for t in &new {
            cmd.arg(0).arg(t.member());
        }
        if let Err(e) = self.write(&cmd).await {
            tracing::debug!(error = %e, "target registry not written; the next call retries");
            let mut seen = self.registered.0.lock().unwrap_or_else(|e| e.into_inner());
            new.iter().for_each(|t| seen.forget(t));
        }
    }

    pub(super) async fn registered_page(
        &self,
        kind: Option<TargetKind>,
        after: Option<String>,
        limit: usize,
    ) -> Result<(Vec<Target>, bool)> {
        // Members sort bytewise ("p:" before "s:"); a kind bounds the range by its tag, the
        // upper bound being the tag with ':' raised to ';'.
        let lower = match (&after, kind) {
            (Some(a), _) => format!("({a}"),
            (None, Some(k)) => format!("[{}", k.tag()),
            (None, None) => "-".to_owned(),
        };
        let upper = match kind {
            Some(k) => format!("({};", &k.tag()[..1]),
            None => "+".to_owned(),
        };
        let v = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(self.keys.targets())
                    .arg(lower)
                    .arg(upper)
                    .arg("BYLEX")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1),
            )
            .await?;
        let mut members: Vec<String> = items(v)
            .map_err(|v| bad_reply("targets", &v))?
            .iter()
            .filter_map(text)
            .collect();
        let more = members.len() > limit;
        members.truncate(limit);
        let targets = members
            .iter()
            .map(|m| Target::from_member("member", m))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((targets, more))
    }

    pub(super) async fn push_audit(&self, entry: &AuditEntry) -> Result<()> {
        let key = self.keys.audit(entry.target.as_ref());
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH").arg(&key).arg(entry.encode()).ignore();
        pipe.cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(AUDIT_KEEP as i64 - 1)
            .ignore();
        self.write_pipe(&pipe).await
    }

    pub(super) async fn audit_log(
        &self,
        target: Option<&Target>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>> {
        let v = self
            .query(
                redis::cmd("LRANGE")
                    .arg(self.keys.audit(target))
                    .arg(0)
                    .arg(limit.max(1) as i64 - 1),
            )
            .await?;
        let lines = items(v).map_err(|v| bad_reply("audit", &v))?;
        Ok(lines
            .iter()
            .filter_map(text)
            .filter_map(|l| AuditEntry::decode(&l))
            .take(limit)
            .collect())
    }
}
