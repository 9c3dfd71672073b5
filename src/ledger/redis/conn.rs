//! Connections to the three topologies: a standalone Redis, a primary found through Sentinel,
//! and a Cluster. The rest of the Redis ledger sees one thing, [`Conns`]: a handle to send a
//! command (or a command and its `WAIT`) on, and a way to say the handle failed.
//!
//! Standalone connections come from deadpool-redis; a Cluster connection (one per slot, each
//! multiplexed over every node) from the cluster client. A Sentinel primary is found by
//! asking the seed sentinels (`SENTINEL get-master-addr-by-name`) and checking that the address
//! answers `ROLE master`; it is looked up again after a connection error, a `READONLY` answer
//! (the old primary, demoted), or a `+switch-master` event from any sentinel, so a failover is
//! followed without a restart. Each change of primary bumps a generation, and every held handle
//! of an older generation is dropped on its next use.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use deadpool_redis::{Runtime, Timeouts};
use futures_util::StreamExt;
use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult, Value};

use super::errors::Trouble;
use crate::config::{Settings, Store};

/// Retries of one command inside the cluster client (MOVED, ASK, TRYAGAIN, ...); the command's
/// whole budget is `redis_timeout` all the same.
const CLUSTER_RETRIES: u32 = 16;

enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(Box<redis::cluster::ClusterClient>),
    Sentinel(Arc<Sentinel>),
}

/// A checked-out connection, kept: the hot path clones its multiplexed handle.
enum Held {
    Single(deadpool_redis::Connection),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(redis::aio::MultiplexedConnection),
}

#[derive(Clone)]
pub(super) enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// What goes to Redis in one network round trip: a command, or a pipeline of writes whose
/// replies are not needed (every command in it marked `ignore`).
#[derive(Clone, Copy)]
pub(super) enum Sent<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

impl Conn {
    async fn replies(&mut self, pipe: &redis::Pipeline) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => pipe.query_async(c).await,
            Conn::Cluster(c) => pipe.query_async(c).await,
        }
    }

    /// Sends `sent`; with `wait`, `WAIT replicas timeout` goes last in the same pipeline (still
    /// one round trip). The command's reply (`Nil` for a pipeline) and, with `wait`, how many
    /// replicas acknowledged it.
    pub(super) async fn send(
        &mut self,
        sent: Sent<'_>,
        wait: Option<(u32, Duration)>,
    ) -> RedisResult<(Value, Option<i64>)> {
        let Some((replicas, timeout)) = wait else {
            return match sent {
                Sent::Cmd(cmd) => match self {
                    Conn::Single(c) => cmd.query_async(c).await,
                    Conn::Cluster(c) => cmd.query_async(c).await,
                }
                .map(|v| (v, None)),
                Sent::Pipe(pipe) => self.replies(pipe).await.map(|_| (Value::Nil, None)),
            };
        };
        let mut pipe = match sent {
            Sent::Cmd(cmd) => {
                let mut p = redis::pipe();
                p.add_command(cmd.clone());
                p
            }
            Sent::Pipe(p) => p.clone(),
        };
        pipe.cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis() as u64);
        let mut replies = self.replies(&pipe).await?;
        // WAIT's reply is last; a command's own reply comes before it.
        let acked = match replies.pop() {
            Some(Value::Int(n)) => n,
            other => {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "unexpected reply to WAIT",
                    format!("{other:?}"),
                )));
            }
        };
        let value = match sent {
            Sent::Cmd(_) => replies.pop().unwrap_or(Value::Nil),
            Sent::Pipe(_) => Value::Nil,
        };
        Ok((value, Some(acked)))
    }
}

/// Connections through deadpool-redis (or the Sentinel primary). deadpool health-checks a
/// connection (PING) each time it is checked out, which would double the round trips of a
/// decision; so each slot here checks one out once and reuses its multiplexed handle (many
/// requests pipelined on one socket) until a connection error, when it is dropped and replaced.
pub(super) struct Conns {
    pool: Pool,
    /// Async locks: a request that finds its slot empty connects while holding the slot, so a
    /// burst on a cold start waits for that one connection instead of opening one per request.
    held: Vec<tokio::sync::Mutex<Option<(u64, Held)>>>,
    next: AtomicUsize,
    /// Bumped when the primary changes: handles of an older generation are dropped.
    generation: Arc<AtomicU64>,
}

impl Conns {
    pub(super) async fn connect(settings: &Settings) -> Result<Conns, String> {
        let pool_cfg = deadpool_redis::PoolConfig {
            // One object per slot, plus room to replace a discarded one while it is re-checked.
            max_size: settings.redis_pool_size.max(1) + 2,
            timeouts: Timeouts {
                wait: Some(settings.redis_timeout),
                create: Some(settings.redis_timeout),
                recycle: Some(settings.redis_timeout),
            },
            ..Default::default()
        };
        // The redis crate answers "timed out" after 500 ms by default; a paused or busy Redis
        // must get the whole of `redis_timeout`, the one budget operators set.
        let conn_cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.redis_timeout))
            .set_response_timeout(Some(settings.redis_timeout));
        let generation = Arc::new(AtomicU64::new(0));
        let pool = match &settings.store {
            Store::Redis { url } => {
                let info = connection_info(url, settings)?;
                let manager = deadpool_redis::Manager::new_with_config(info, conn_cfg)
                    .map_err(|e| e.to_string())?;
                Pool::Single(
                    deadpool_redis::Pool::builder(manager)
                        .config(pool_cfg)
                        .runtime(Runtime::Tokio1)
                        .build()
                        .map_err(|e| e.to_string())?,
                )
            }
            Store::Cluster { .. } if settings.redis_ca.is_some() => {
                return Err("redis_ca is supported with a standalone Redis or Sentinel only; a cluster verifies rediss:// against the built-in roots".into());
            }
            Store::Cluster { nodes } => {
                // The cluster client follows MOVED and ASK and retries TRYAGAIN, CLUSTERDOWN and
                // MASTERDOWN itself; its default first wait before such a retry (1.28 s) is longer
                // than a slot migration takes and than most request budgets, so it starts at
                // 10 ms and doubles up to 200 ms, the whole bounded by `redis_timeout`.
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .retry_wait_formula(10, 2)
                    .connection_timeout(settings.redis_timeout)
                    .response_timeout(settings.redis_timeout)
                    .build()
                    .map_err(|e| e.to_string())?;
                Pool::Cluster(Box::new(client))
            }
            Store::Sentinel { sentinels, master } => {
                let seeds = sentinels
                    .iter()
                    .map(|u| connection_info(u, settings))
                    .collect::<Result<Vec<_>, _>>()?;
                let sentinel = Arc::new(Sentinel {
                    seeds,
                    master: master.clone(),
                    conn_cfg,
                    timeout: settings.redis_timeout,
                    primary: tokio::sync::Mutex::new(None),
                    first: AtomicUsize::new(0),
                    generation: generation.clone(),
                    watchers: StdMutex::new(Vec::new()),
                });
                sentinel.watch();
                Pool::Sentinel(sentinel)
            }
            Store::Memory => return Err("the Redis ledger needs a Redis store".into()),
        };
        Ok(Conns {
            pool,
            held: (0..settings.redis_pool_size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            generation,
        })
    }

    /// A handle, and the slot it came from (for [`Conns::failed`]).
    pub(super) async fn get(&self) -> RedisResult<(usize, Conn)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.held.len();
        let mut slot = self.held[i].lock().await;
        if let Some((g, h)) = slot.as_ref() {
            if *g == self.generation.load(Ordering::Acquire) {
                return Ok((i, clone_handle(h)));
            }
            if let Some((_, h)) = slot.take() {
                detach(h);
            }
        }
        let held = match &self.pool {
            Pool::Single(p) => Held::Single(p.get().await.map_err(pool_error)?),
            Pool::Cluster(c) => Held::Cluster(c.get_async_connection().await?),
            Pool::Sentinel(s) => Held::Sentinel(s.connect().await?),
        };
        // Read after connecting: finding a new primary bumps it.
        let generation = self.generation.load(Ordering::Acquire);
        let (_, h) = slot.insert((generation, held));
        Ok((i, clone_handle(h)))
    }

    /// The handle of slot `i` failed with `e`: on a connection error it is dropped (and replaced
    /// on next use); on Sentinel, a connection error or `READONLY` also looks the primary up
    /// again.
    pub(super) async fn failed(&self, i: usize, trouble: Trouble) {
        let broken = trouble.broke_connection();
        let demoted = trouble == Trouble::Demoted;
        if let Pool::Sentinel(s) = &self.pool
            && (broken || demoted)
        {
            s.forget_primary().await;
        }
        if (broken || demoted)
            && let Some((_, h)) = self.held[i].lock().await.take()
        {
            detach(h);
        }
    }

    /// Whether another primary may take over behind the same configuration (Sentinel), so a
    /// refused connection is worth retrying within the budget.
    pub(super) fn follows_failover(&self) -> bool {
        matches!(self.pool, Pool::Sentinel(_))
    }

    /// deadpool's size, checked-out and waiting counts (Cluster and Sentinel handles are not
    /// pooled: one per slot).
    pub(super) fn status(&self) -> Box<dyn Fn() -> deadpool_redis::Status + Send + Sync> {
        match &self.pool {
            Pool::Single(p) => {
                let p = p.clone();
                Box::new(move || p.status())
            }
            Pool::Cluster(_) | Pool::Sentinel(_) => {
                let slots = self.held.len();
                Box::new(move || deadpool_redis::Status {
                    max_size: slots,
                    size: slots,
                    available: slots,
                    waiting: 0,
                })
            }
        }
    }
}

fn clone_handle(h: &Held) -> Conn {
    match h {
        Held::Single(c) => Conn::Single((**c).clone()),
        Held::Cluster(c) => Conn::Cluster(c.clone()),
        Held::Sentinel(c) => Conn::Single(c.clone()),
    }
}

/// Drops a failed connection for good: back in the pool, a connection to a demoted primary
/// would pass deadpool's PING check and be handed out again.
fn detach(h: Held) {
    match h {
        Held::Single(c) => drop(deadpool_redis::Connection::take(c)),
        Held::Cluster(c) => drop(c),
        Held::Sentinel(c) => drop(c),
    }
}

fn pool_error(e: deadpool_redis::PoolError) -> RedisError {
    match e {
        deadpool_redis::PoolError::Backend(e) => e,
        other => RedisError::from(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            other.to_string(),
        )),
    }
}

/// A URL's connection settings, with `redis_ca` as the roots a `rediss://` server must chain to.
fn connection_info(url: &str, settings: &Settings) -> Result<ConnectionInfo, String> {
    match &settings.redis_ca {
        None => redis::IntoConnectionInfo::into_connection_info(url),
        Some(ca) => {
            let root_cert = std::fs::read(ca)
                .map_err(|e| format!("cannot read redis_ca {}: {e}", ca.display()))?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(url, certs).map(|c| c.get_connection_info().clone())
        }
    }
    .map_err(|e| e.to_string())
}

/// The Sentinel client: the seeds, and the primary they last named.
struct Sentinel {
    /// The seed sentinels; their credentials and TLS settings are the data nodes' too.
    seeds: Vec<ConnectionInfo>,
    master: String,
    conn_cfg: redis::AsyncConnectionConfig,
    timeout: Duration,
    /// The primary's connection settings, once found and confirmed.
    primary: tokio::sync::Mutex<Option<ConnectionInfo>>,
    /// The sentinel that answered last: asked first next time.
    first: AtomicUsize,
    generation: Arc<AtomicU64>,
    watchers: StdMutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        for w in self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            w.abort();
        }
    }
}

fn not_found(what: String) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, what))
}

impl Sentinel {
    /// A new connection to the primary, looking it up when it is not known.
    async fn connect(&self) -> RedisResult<redis::aio::MultiplexedConnection> {
        let mut primary = self.primary.lock().await;
        if let Some(info) = primary.as_ref() {
            match self.open(info).await {
                Ok(c) => return Ok(c),
                Err(_) => *primary = None,
            }
        }
        let (info, conn) = self.discover().await?;
        *primary = Some(info);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(conn)
    }

    async fn open(&self, info: &ConnectionInfo) -> RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(info.clone())?
            .get_multiplexed_async_connection_with_config(&self.conn_cfg)
            .await
    }

    /// Asks the sentinels in turn for the primary, and keeps the first answer that a node
    /// confirms with `ROLE master` (a sentinel that has not yet seen a failover names the old
    /// primary, which now says `slave`).
    async fn discover(&self) -> RedisResult<(ConnectionInfo, redis::aio::MultiplexedConnection)> {
        let n = self.seeds.len();
        let start = self.first.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let i = (start + k) % n;
            match self.ask(&self.seeds[i]).await {
                Ok(found) => {
                    self.first.store(i, Ordering::Relaxed);
                    return Ok(found);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| not_found("no sentinel configured".into())))
    }

    async fn ask(
        &self,
        seed: &ConnectionInfo,
    ) -> RedisResult<(ConnectionInfo, redis::aio::MultiplexedConnection)> {
        let mut s = self.open(seed).await?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut s)
            .await?;
        let Some((host, port)) = addr else {
            return Err(not_found(format!(
                "sentinel {} does not know the master {:?}",
                seed.addr(),
                self.master
            )));
        };
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        let info = seed.clone().set_addr(addr);
        let mut conn = self.open(&info).await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        match role.first() {
            Some(Value::BulkString(r)) if r == b"master" => Ok((info, conn)),
            _ => Err(not_found(format!(
                "{} named by sentinel {} is not a primary (yet)",
                info.addr(),
                seed.addr()
            ))),
        }
    }

    /// The primary failed: the next connection asks the sentinels again.
    async fn forget_primary(&self) {
        if self.primary.lock().await.take().is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// One task per seed sentinel, subscribed to `+switch-master`: a failover is followed as
    /// soon as any sentinel announces it, before a request meets the old primary.
    fn watch(self: &Arc<Self>) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for seed in self.seeds.clone() {
            let me = Arc::downgrade(self);
            watchers.push(tokio::spawn(async move {
                loop {
                    let Some(s) = me.upgrade() else { return };
                    let (master, timeout) = (s.master.clone(), s.timeout);
                    drop(s);
                    let events = async {
                        let mut sub = redis::Client::open(seed.clone())?
                            .get_async_pubsub()
                            .await?;
                        sub.subscribe("+switch-master").await?;
                        let mut messages = sub.on_message();
                        while let Some(m) = messages.next().await {
                            let payload: String = m.get_payload().unwrap_or_default();
                            // "<master name> <old ip> <old port> <new ip> <new port>"
                            if payload.split(' ').next() == Some(master.as_str()) {
                                let Some(s) = me.upgrade() else { break };
                                tracing::info!(%payload, "sentinel announced a new primary");
                                s.forget_primary().await;
                            }
                        }
                        RedisResult::Ok(())
                    };
                    let _ = events.await;
                    tokio::time::sleep(timeout.min(Duration::from_secs(1))).await;
                }
            }));
        }
    }
}
