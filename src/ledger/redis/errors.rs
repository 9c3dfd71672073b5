//! What a failed Redis call means, decided in one place.
//!
//! Every decision that depends on an error (retry it within the budget, drop the connection,
//! look the primary up again, answer `UNAVAILABLE` or `INTERNAL`, count it in a metric) reads
//! one classification, [`Trouble::of`], so the retry path, the connection pool and the status
//! code can never disagree about an error.

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::config::Store;
use crate::ledger::LedgerError;
use crate::metrics::RedisErrorKind;

/// Why a Redis call failed.
pub(super) enum Failure {
    Redis(RedisError),
    /// `durability = replicated`: the call ran on the primary, but fewer replicas than wanted
    /// acknowledged it in time. Its change stands (the safe side: a slot stays consumed).
    NotReplicated {
        acked: i64,
        wanted: u32,
    },
}

impl From<RedisError> for Failure {
    fn from(e: RedisError) -> Self {
        Failure::Redis(e)
    }
}

impl Failure {
    /// `store`: which Redis answered (or did not), named in the message.
    pub(super) fn into_ledger(self, store: &str) -> LedgerError {
        match self {
            Failure::Redis(e) => store_error(e, store),
            Failure::NotReplicated { acked, wanted } => LedgerError::Unavailable(format!(
                "Redis replicated the change to {acked} of the {wanted} replica(s) durability requires in time; it stands on the primary"
            )),
        }
    }
}

/// The kinds of trouble a Redis call meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trouble {
    /// `READONLY`: the node is no longer the primary (a failover demoted it); the command
    /// did not run.
    Demoted,
    /// The server answered "not now" (`TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`): the
    /// command did not run.
    NotNow,
    /// Another Cluster condition (a redirection the client could not follow): it may have run.
    ClusterBusy,
    /// The connection was refused: nothing was sent.
    Refused,
    /// The connection broke or could not be found: the command may have run.
    Broken,
    /// No answer within the budget: the command may have run.
    Timeout,
    /// Credentials refused or missing (`NOAUTH`, `WRONGPASS`, `NOPERM`): a deployment problem,
    /// and the store is unusable until it is fixed.
    Auth,
    /// Anything else: an unexpected answer, which is a bug (`INTERNAL`).
    Bug,
}

impl Trouble {
    pub(super) fn of(e: &RedisError) -> Trouble {
        if e.is_timeout() {
            Trouble::Timeout
        } else if e.is_connection_refusal() {
            Trouble::Refused
        } else if e.is_io_error() || e.is_connection_dropped() {
            Trouble::Broken
        } else if is_auth_error(e) {
            Trouble::Auth
        } else {
            match e.kind() {
                ErrorKind::Server(ServerErrorKind::ReadOnly) => Trouble::Demoted,
                ErrorKind::Server(
                    ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading,
                ) => Trouble::NotNow,
                ErrorKind::ClusterConnectionNotFound => Trouble::Broken,
                _ if e.is_cluster_error() => Trouble::ClusterBusy,
                _ => Trouble::Bug,
            }
        }
    }

    /// The command surely did not run, so it may be sent again: the server said "not now", or
    /// (where another primary may take over: `refused_counts`, on Sentinel) the connection was
    /// refused before anything was sent.
    pub(super) fn not_run(self, refused_counts: bool) -> bool {
        matches!(self, Trouble::Demoted | Trouble::NotNow)
            || (refused_counts && self == Trouble::Refused)
    }

    /// The connection that met it is no good any more (dropped and replaced on next use).
    pub(super) fn broke_connection(self) -> bool {
        matches!(self, Trouble::Refused | Trouble::Broken | Trouble::Timeout)
    }

    /// Transient trouble (the store is down, failing over, slow or refusing credentials) is
    /// `UNAVAILABLE`; anything else is `INTERNAL`.
    pub(super) fn transient(self) -> bool {
        self != Trouble::Bug
    }

    /// The metrics' coarse kind.
    pub(super) fn metric(self) -> RedisErrorKind {
        match self {
            Trouble::Timeout => RedisErrorKind::Timeout,
            Trouble::Refused | Trouble::Broken => RedisErrorKind::Unavailable,
            Trouble::Auth => RedisErrorKind::Auth,
            Trouble::Demoted | Trouble::NotNow | Trouble::ClusterBusy => RedisErrorKind::Busy,
            Trouble::Bug => RedisErrorKind::Internal,
        }
    }
}

fn store_error(e: RedisError, store: &str) -> LedgerError {
    if Trouble::of(&e).transient() {
        LedgerError::Unavailable(format!("{store}: {e}"))
    } else {
        LedgerError::Internal(format!("{store}: {e}"))
    }
}

/// The store as an error message names it: "Redis at redis://host:6379", credentials left out.
pub(super) fn describe(store: &Store) -> String {
    use crate::config::redact_url;
    match store {
        Store::Redis { url } => format!("Redis at {}", redact_url(url)),
        Store::Cluster { nodes } => {
            let nodes: Vec<String> = nodes.iter().map(|n| redact_url(n)).collect();
            format!("Redis Cluster at {}", nodes.join(","))
        }
        Store::Sentinel { sentinels, master } => {
            let seeds: Vec<String> = sentinels.iter().map(|n| redact_url(n)).collect();
            format!("Redis primary of {master} (Sentinel {})", seeds.join(","))
        }
        Store::Memory => "memory".to_owned(),
    }
}

/// Redis refuses long commands from a connection that has not authenticated with a protocol
/// error ("unauthenticated multibulk length") rather than NOAUTH, so that counts too.
fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || e.detail()
            .is_some_and(|d| d.starts_with("Protocol error: unauthenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(kind: ServerErrorKind, code: &'static str) -> RedisError {
        RedisError::from((ErrorKind::Server(kind), code))
    }

    #[test]
    fn one_classification_decides_retry_status_and_metric() {
        let readonly = Trouble::of(&server(ServerErrorKind::ReadOnly, "READONLY"));
        assert_eq!(readonly, Trouble::Demoted);
        assert!(readonly.not_run(false) && readonly.transient());
        assert_eq!(readonly.metric(), RedisErrorKind::Busy);

        let refused = Trouble::of(&RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(refused, Trouble::Refused);
        assert!(refused.not_run(true), "on Sentinel a refusal is retried");
        assert!(!refused.not_run(false), "elsewhere it is not");
        assert!(refused.broke_connection() && refused.transient());

        let reset = Trouble::of(&RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(reset, Trouble::Broken);
        assert!(
            !reset.not_run(true),
            "a broken call may have run: never sent twice"
        );

        let script_bug = Trouble::of(&RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "ERR",
            "user_script:1: attempt to index a nil value".to_owned(),
        )));
        assert_eq!(script_bug, Trouble::Bug);
        assert!(!script_bug.transient());
        assert_eq!(script_bug.metric(), RedisErrorKind::Internal);

        let wrongpass = Trouble::of(&RedisError::from((
            ErrorKind::AuthenticationFailed,
            "invalid username-password pair",
        )));
        assert_eq!(wrongpass, Trouble::Auth);
        assert!(wrongpass.transient() && !wrongpass.not_run(true));
    }
}
