//! The anchor of `waquota bench --anchor-redis`: the simplest exact sliding-window script, driven
//! with the same workload as the service. It is a fixed yardstick of what one exact decision
//! costs Redis, which does not move when waquota's own script changes (the script-direct run
//! does move with it). It decides nothing in waquota.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{FULL_LIMIT, Job};
use crate::proto::Decision;

/// KEYS[1] a sorted set of the sender's recipients, scored by when each was counted;
/// ARGV now (ms), window (ms), limit, recipient. {1} already counted, {2} newly counted,
/// {0, oldest score} refused.
pub(super) const SCRIPT: &str = r#"
local key, now, window, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZSCORE', key, member) then return {1} end
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, member); redis.call('PEXPIRE', key, window); return {2}
end
return {0, redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]}
"#;

const WINDOW_MS: u64 = 86_400_000;

pub(super) struct AnchorDriver {
    pub url: String,
    pub conns: Vec<redis::aio::MultiplexedConnection>,
    pub sha: String,
    pub prefix: String,
    /// Calls each worker keeps in flight: 1 unpipelined, `--pipeline` pipelined.
    pub depth: usize,
    /// Each sender's limit, from the workload's policies.
    limits: Mutex<HashMap<String, u64>>,
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
            limits: Mutex::new(HashMap::new()),
        })
    }

    fn limit(&self, sender: &str) -> u64 {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.get(sender).copied().unwrap_or(FULL_LIMIT as u64)
    }

    /// The recipients of one call, one script call each, in one round trip.
    pub async fn decide(
        &self,
        slot: usize,
        sender: &str,
        recipients: &[String],
    ) -> Result<Vec<i32>, String> {
        let (key, limit, now) = (
            format!("{}:anchor:{sender}", self.prefix),
            self.limit(sender),
            now_ms(),
        );
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

    /// The workload's state: its limits, and its counted (and service) recipients counted. The
    /// anchor has no service windows: a "service" recipient is one already counted.
    pub async fn setup(&self, job: &Job) -> Result<(), String> {
        match job {
            Job::Policy { sender, limit } => {
                let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
                limits.insert(sender.clone(), *limit);
            }
            Job::Fill { sender, recipients } => {
                self.decide(0, sender, recipients).await?;
            }
            Job::Inbound { sender, recipient } => {
                self.decide(0, sender, std::slice::from_ref(recipient))
                    .await?;
            }
            Job::Barrier => {}
        }
        Ok(())
    }
}
