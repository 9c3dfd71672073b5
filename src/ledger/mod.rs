//! The ledger: where slots and service windows live, and where every decision is made atomically.
//!
//! [`Ledger`] is implemented twice with the same semantics: [`memory::MemoryLedger`] (one process)
//! and [`redis::RedisLedger`] (shared by any number of instances). The behaviour test suite runs
//! the same bodies against both so they cannot drift.

pub mod coalesce;
pub mod memory;
pub mod redis;

use std::future::Future;

use crate::model::{
    AcquireRequest, AuditEntry, Cursor, FailureOutcome, Inspection, InvalidArgument, Millis,
    Outcome, Policy, PortfolioId, RecipientId, Reservation, SenderId, Target, TargetKind,
    WindowPage,
};

/// What a ledger can fail with. Transient store trouble is kept apart from bad input. Clone:
/// one failed call answers every request it decided together (`coalesce`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The store cannot be reached or did not answer in time: `UNAVAILABLE`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answers, but the request raced an operation that moves state (a sender being
    /// reassigned): `UNAVAILABLE` too, so clients retry, but not a store outage.
    #[error("{0}")]
    Contended(String),
    #[error(transparent)]
    Invalid(#[from] InvalidArgument),
    /// The request is well-formed but the ledger's state does not allow it: `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A broken invariant (an unexpected reply from a script): `INTERNAL`.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// `n` bytes from the operating system's random generator.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    // The system generator only fails where there is none at all; then nothing can be secret.
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the operating system's random generator");
    b
}

pub trait Ledger: Send + Sync + 'static {
    /// Decides every recipient in order, in one atomic step (`Acquire` is a batch of one).
    fn acquire(&self, req: AcquireRequest) -> impl Future<Output = Result<Vec<Outcome>>> + Send;

    /// Frees the slot `reservation` opened, while no later counted delivery has touched it.
    fn release(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Reservation,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Opens or restarts the (sender, recipient) service window; returns when it ends.
    fn record_inbound(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        free_entry_point: bool,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<Millis>> + Send;

    /// The message of `reservation` was delivered at `delivered_at`: the slot then lasts 24 h from
    /// delivery (never less than it already did). None when that slot is no longer live.
    fn confirm(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Reservation,
        delivered_at: Millis,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<Option<Millis>>> + Send;

    /// WhatsApp refused the message: releases its reservation (if any), and for error 131049
    /// holds marketing to that user for 24 h.
    fn report_failure(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        reservation: Option<Reservation>,
        error_code: u32,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<FailureOutcome>> + Send;

    /// Stores a target's policy. A change of status to FLAGGED starts the legacy downgrade clock.
    fn put_policy(
        &self,
        target: Target,
        policy: Policy,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<Policy>> + Send;

    /// Assigns a sender to a portfolio (`None` detaches). Its service windows and own policy move
    /// with it; its own window is kept for when it is detached again.
    fn assign_sender(
        &self,
        sender: SenderId,
        portfolio: Option<PortfolioId>,
    ) -> impl Future<Output = Result<()>> + Send;

    fn inspect(
        &self,
        target: Target,
        recipient: Option<RecipientId>,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<Inspection>> + Send;

    /// The projection index of a window: each user that got a new (not released) slot in the
    /// trailing 30 days, with when. `owner` is the window's owner (a sender that is not in a
    /// portfolio, or a portfolio). Read by the planner (docs/contract.md, "Planning").
    fn uniques(
        &self,
        owner: Target,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<Vec<(RecipientId, Millis)>>> + Send;

    /// Live slots of the target's deciding window, by expiry then recipient.
    fn list_window(
        &self,
        target: Target,
        page_size: usize,
        after: Option<Cursor>,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<WindowPage>> + Send;

    /// Clears the target's window (its slots; service windows and policy are kept). A sender
    /// assigned to a portfolio is refused: its slots live in the portfolio's window.
    fn reset(&self, target: Target) -> impl Future<Output = Result<()>> + Send;

    /// The secret reservations are signed with, the same on every instance sharing the store.
    fn reservation_secret(&self) -> impl Future<Output = Result<Vec<u8>>> + Send;

    /// Health: can the store answer?
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;

    /// The reservation of the recipient's live slot at the sender's home, if that slot is still
    /// untouched since it was opened and was opened by this sender (the rule of Release): for a
    /// webhook status that carries no reservation (docs/contract.md, "The webhook bridge").
    fn slot_reservation(
        &self,
        sender: SenderId,
        recipient: RecipientId,
        at: Option<Millis>,
    ) -> impl Future<Output = Result<Option<Reservation>>> + Send;

    /// Which of the webhook events `keys` (an event's 64-bit identity and its time) were already
    /// applied, in order (docs/contract.md, "The webhook bridge").
    fn events_seen(&self, keys: &[(u64, Millis)])
    -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Remembers webhook events as applied, for 7 days after their time.
    fn remember_events(&self, keys: &[(u64, Millis)]) -> impl Future<Output = Result<()>> + Send;

    /// Records what the webhook bridge learned of an identity (a display number's sender, a
    /// WABA's senders or portfolio): `add` keeps every value, else `value` replaces the last;
    /// an empty `value` without `add` forgets it.
    fn put_identity(
        &self,
        kind: &str,
        key: &str,
        value: &str,
        add: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The values recorded for an identity.
    fn identities(&self, kind: &str, key: &str)
    -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Targets that may be known, in [`Target::member`] order after `after` (a member), at most
    /// `limit` of them, and whether more follow. A superset of the known ones: the listing keeps
    /// those Inspect calls known (docs/contract.md, "Listing targets").
    fn targets(
        &self,
        kind: Option<TargetKind>,
        after: Option<String>,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<Target>, bool)>> + Send;

    /// Adds an AdminService change to its target's audit log (or the ledger-wide one), keeping
    /// the newest [`crate::model::AUDIT_KEEP`].
    fn append_audit(&self, entry: AuditEntry) -> impl Future<Output = Result<()>> + Send;

    /// The newest `limit` entries of a target's audit log (None: the ledger-wide one), newest
    /// first.
    fn audit(
        &self,
        target: Option<Target>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AuditEntry>>> + Send;

    /// An operator's word that a lost ledger may be trusted again (docs/contract.md, "A lost
    /// ledger"): since when it was lost, or None when it was not.
    fn accept_ledger_loss(&self) -> impl Future<Output = Result<Option<Millis>>> + Send;
}
