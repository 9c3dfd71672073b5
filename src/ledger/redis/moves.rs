//! Reassigning a sender: the journaled move of its state between homes (lua/move.lua,
//! move_out.lua, move_in.lua), serialised per sender and resumable from any step.

use redis::Value;

use super::codec::{bad_reply, int, items, text};
use super::keys::{Home, HomeKeys};
use super::scripts::Call;
use super::{ABANDONED_MOVE_MS, RedisLedger};
use crate::ledger::{LedgerError, Result};
use crate::model::{PortfolioId, SenderId};

/// Marks a sender as being moved by this instance while it lives.
pub(super) struct Moving<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<SenderId>>,
    sender: SenderId,
}

impl<'a> Moving<'a> {
    /// None when this instance is already moving the sender.
    fn claim(
        set: &'a std::sync::Mutex<std::collections::HashSet<SenderId>>,
        sender: &SenderId,
    ) -> Option<Moving<'a>> {
        let mut s = set.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(sender.clone()).then(|| Moving {
            set,
            sender: sender.clone(),
        })
    }
}

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        let mut s = self.set.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(&self.sender);
    }
}

impl RedisLedger {
    /// The steps of a journaled move from home `from` to home `to` (portfolio ids, "" = the
    /// sender's own home). Each step is idempotent, so a move can be resumed from any point.
    async fn move_sender(
        &self,
        sender: &SenderId,
        from: &str,
        to: &str,
        entry: &str,
    ) -> Result<()> {
        let home = |p: &str| -> Result<Home> {
            Ok(if p.is_empty() {
                Home::Sender(sender.clone())
            } else {
                Home::Portfolio(PortfolioId::parse("portfolio", p)?)
            })
        };
        let (old_home, new_home) = (home(from)?, home(to)?);
        let (old_keys, new_keys) = (self.keys.home(&old_home), self.keys.home(&new_home));
        let own = self.keys.home(&Home::Sender(sender.clone()));
        if !from.is_empty() && !to.is_empty() {
            // Portfolio to portfolio: point the sender's route at the new home first, so requests
            // that miss the old home are sent on to the new one.
            self.write(redis::cmd("SET").arg(own.residency()).arg(to))
                .await?;
        }
        let scoped = |k: &HomeKeys| {
            let mut keys = vec![k.residency()];
            keys.extend(k.sender_scoped(sender));
            keys
        };
        let out = Call::new(&self.scripts.move_out, scoped(&old_keys))
            .arg(old_home.kind())
            .arg(sender.as_str())
            .arg(to)
            .arg("out");
        let dumped = items(self.run(&out).await?).map_err(|v| bad_reply("move_out", &v))?;
        let mut into = Call::new(&self.scripts.move_in, scoped(&new_keys))
            .arg(new_home.kind())
            .arg(sender.as_str());
        for pair in dumped.get(1..).unwrap_or_default().chunks_exact(2) {
            let payload = match &pair[0] {
                Value::BulkString(b) => b.clone(),
                _ => Vec::new(),
            };
            into = into.arg(payload).num(int(&pair[1]).unwrap_or(-2));
        }
        self.run(&into).await?;
        let drop = Call::new(&self.scripts.move_out, scoped(&old_keys))
            .arg(old_home.kind())
            .arg(sender.as_str())
            .arg(to)
            .arg("drop");
        self.run(&drop).await?;
        let finish = Call::new(
            &self.scripts.move_journal,
            vec![own.move_journal(), own.residency()],
        )
        .arg("finish")
        .arg(entry);
        self.run(&finish).await?;
        Ok(())
    }

    /// `Ledger::assign_sender`: a journaled move of the sender's state to its new home.
    pub(super) async fn assign(
        &self,
        sender: SenderId,
        portfolio: Option<PortfolioId>,
    ) -> Result<()> {
        self.register(Some(&sender), portfolio.as_ref()).await;
        // A journaled move (lua/move.lua): moves of one sender never interleave, no step loses
        // the sender's state, and a move interrupted half-way is completed here first.
        // One reassignment of a sender at a time in this instance, from the journal's first read
        // to its last step: a request that found the sender in place (and restored a missing
        // membership) can then never begin a move that another of this instance's requests is
        // still finishing.
        let Some(_moving) = Moving::claim(&self.moving, &sender) else {
            return Err(LedgerError::Unavailable(format!(
                "sender {sender} is being reassigned; try again"
            )));
        };
        let own = self.keys.home(&Home::Sender(sender.clone()));
        let journal_keys = || vec![own.move_journal(), own.residency()];
        let target = portfolio
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default();
        // A membership this request restored (see "same"), to take back if the sender turns
        // out to be moving elsewhere.
        let mut restored: Option<String> = None;
        for _ in 0..3 {
            let begin = Call::new(&self.scripts.move_journal, journal_keys())
                .arg("begin")
                .arg(&target)
                .arg(&self.instance);
            let v = items(self.run(&begin).await?).map_err(|v| bad_reply("move", &v))?;
            let bad = || bad_reply("move", &Value::Array(v.clone()));
            match text(v.first().ok_or_else(bad)?).as_deref() {
                Some("same") => {
                    // Already there. A missing membership (a members set lost on its own) is
                    // restored, then checked again: a move away that raced this request is
                    // then seen and redone toward this target, so the sender never ends up a
                    // member of two portfolios. Nothing is written when it is a member.
                    if let Some(p) = &portfolio
                        && restored.is_none()
                    {
                        let members = self.keys.home(&Home::Portfolio(p.clone())).residency();
                        let member = self
                            .query(redis::cmd("SISMEMBER").arg(&members).arg(sender.as_str()))
                            .await?;
                        if int(&member) != Some(1) {
                            self.write(redis::cmd("SADD").arg(&members).arg(sender.as_str()))
                                .await?;
                            restored = Some(members);
                            continue;
                        }
                    }
                    self.learn(&sender, portfolio);
                    return Ok(());
                }
                Some("begun") => {
                    let entry = text(v.get(1).ok_or_else(bad)?).ok_or_else(bad)?;
                    let from = entry.split('>').next().unwrap_or_default().to_owned();
                    self.move_sender(&sender, &from, &target, &entry).await?;
                    self.learn(&sender, portfolio);
                    tracing::info!(%sender, from, to = target, "sender reassigned");
                    return Ok(());
                }
                Some("busy") => {
                    let entry = text(v.get(1).ok_or_else(bad)?).ok_or_else(bad)?;
                    let age = v.get(2).and_then(int).unwrap_or(i64::MAX);
                    let mut parts = entry.split('>');
                    let (from, to) = (
                        parts.next().unwrap_or_default(),
                        parts.next().ok_or_else(bad)?,
                    );
                    let mover = parts.nth(1).unwrap_or_default();
                    // The sender is moving elsewhere: the membership restored above is stale.
                    if let Some(members) = restored.take()
                        && to != target
                    {
                        self.write(redis::cmd("SREM").arg(members).arg(sender.as_str()))
                            .await?;
                    }
                    // Another request is moving this sender: wait for it (the caller retries).
                    // Two movers of one sender must never run at once, so a move is completed
                    // here only when nobody can be running it: this instance began it (and,
                    // holding the claim, is not running it now: a store hiccup cut it short),
                    // or it was left unfinished for longer than any live move can take (its
                    // mover crashed).
                    let ours = mover == self.instance;
                    if !ours && age < ABANDONED_MOVE_MS {
                        return Err(LedgerError::Unavailable(format!(
                            "sender {sender} is being reassigned (from {from:?} to {to:?}); try again"
                        )));
                    }
                    if ours {
                        tracing::info!(%sender, from, to, "resuming this instance's interrupted reassignment");
                    } else {
                        tracing::warn!(%sender, from, to, "completing an abandoned reassignment first");
                    }
                    self.move_sender(&sender, from, to, &entry).await?;
                }
                _ => return Err(bad()),
            }
        }
        Err(LedgerError::Unavailable(format!(
            "sender {sender} is being reassigned by another request; try again"
        )))
    }
}
