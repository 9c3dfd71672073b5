//! Server settings: one typed struct, with the defaults the README documents.

use std::{net::SocketAddr, time::Duration};

use crate::model::Defaults;

/// Where the ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// In this process only: for trying waquota out and for tests.
    Memory,
    /// A standalone Redis (or a primary behind a proxy): `redis://` or `rediss://` URL.
    Redis { url: String },
    /// A Redis Cluster, through the cluster client: one or more seed node URLs.
    Cluster { nodes: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub store: Store,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Honour the `at` field of requests (tests, replays, simulations).
    pub trust_client_clock: bool,
    /// Policies of targets that have none stored.
    pub defaults: Defaults,
    /// Most recipients in one `AcquireBatch`.
    pub max_batch: usize,
    /// Connections kept to Redis (each one multiplexed).
    pub redis_pool_size: usize,
    /// Longest wait for one Redis call before answering `UNAVAILABLE`.
    pub redis_timeout: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            store: Store::Memory,
            key_prefix: "wq".into(),
            trust_client_clock: false,
            defaults: Defaults::default(),
            max_batch: 1000,
            redis_pool_size: 4,
            redis_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
