//! The anchor of `waquota bench --anchor-redis`: the simplest exact sliding-window script, driven
//! with the same workload as the service. It is a fixed yardstick of what one exact decision
//! costs Redis, which does not move when waquota's own script changes (the script-direct run
//! does move with it). It decides nothing in waquota.

use super::{ACTIVE_LIMIT, FULL_LIMIT, Job};
use crate::proto::Decision;

/// The anchor script (its KEYS, ARGV and replies are described in the file). One file, so that
/// `scripts/layout-floor` measures the very same script beside its floor.
pub(super) const SCRIPT: &str = include_str!("anchor.lua");

const WINDOW_MS: u64 = 86_400_000;

pub(super) struct AnchorDriver {
    pub url: String,
    pub conns: Vec<redis::aio::MultiplexedConnection>,
    pub sha: String,
    pub prefix: String,
    /// Calls each worker keeps in flight: 1 unpipelined, `--pipeline` pipelined.
    pub depth: usize,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl AnchorDriver {
    pub async fn connect(
        url: &str,
        connections: usize,
        prefix: &str,
        depth: usize,
    ) -> Result<AnchorDriver, String> {
        let mut conns = super::multiplexed(url, connections).await?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SCRIPT)
            .query_async(&mut conns[0])
            .await
            .map_err(|e| format!("{url}: SCRIPT LOAD: {e}"))?;
        Ok(AnchorDriver {
            url: url.to_owned(),
            conns,
            sha,
            prefix: prefix.to_owned(),
            depth: depth.max(1),
        })
    }

    /// The recipients of one call, one script call each, in one round trip; a full sender's
    /// limit is the workload's FULL_LIMIT (its setup filled it), any other's ACTIVE_LIMIT.
    pub async fn decide(
        &self,
        slot: usize,
        sender: &str,
        full: bool,
        recipients: &[String],
    ) -> Result<Vec<i32>, String> {
        let limit = if full {
            FULL_LIMIT as u64
        } else {
            ACTIVE_LIMIT
        };
        let (key, now) = (format!("{}:anchor:{sender}", self.prefix), now_ms());
        let mut pipe = redis::pipe();
        for r in recipients {
            pipe.cmd("EVALSHA")
                .arg(&self.sha)
                .arg(1)
                .arg(&key)
                .arg(now)
                .arg(WINDOW_MS)
                .arg(limit)
                .arg(r);
        }
        let mut conn = self.conns[slot % self.conns.len()].clone();
        let replies: Vec<Vec<redis::Value>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis {:?}", e.kind()))?;
        replies
            .iter()
            .map(|v| match v.first() {
                Some(redis::Value::Int(1)) => Ok(Decision::AllowedCounted as i32),
                Some(redis::Value::Int(2)) => Ok(Decision::AllowedNew as i32),
                Some(redis::Value::Int(0)) => Ok(Decision::DeniedLimit as i32),
                _ => Err("unexpected reply".to_owned()),
            })
            .collect()
    }

    /// The workload's state: its counted (and service) recipients counted, a full sender's
    /// FULL_LIMIT of them among them (under any limit as high). The anchor has no policies and no
    /// service windows: a "service" recipient is one already counted.
    pub async fn setup(&self, job: &Job) -> Result<(), String> {
        match job {
            Job::Policy { .. } | Job::Barrier => {}
            Job::Fill { sender, recipients } => {
                self.decide(0, sender, false, recipients).await?;
            }
            Job::Inbound { sender, recipient } => {
                self.decide(0, sender, false, std::slice::from_ref(recipient))
                    .await?;
            }
        }
        Ok(())
    }
}
