//! Group commit for decisions: Acquires of one sender that arrive while a decision for that
//! sender is under way are decided together, in the next single call of the ledger.
//!
//! Every decision script call pays a fixed cost (the script's set-up, the sender's policy,
//! throughput and window header) before its per-recipient work; under load, a sender's
//! concurrent Acquires then queue on Redis one call each. Here they meet in a queue instead, and
//! the next call decides them all as one batch, in arrival order: exactly as the same requests
//! one after the other, in one atomic step, one round trip for all of them. A request that finds
//! nothing under way goes out at once, so nothing waits for a batch to fill.
//!
//! Only requests that a batch decides identically are combined: the same sender, message kind
//! and category, on the store's clock, not dry runs. Each call carries at most
//! [`MAX_COALESCED`] recipients (a larger request goes alone).
//!
//! Every request answers within the store timeout of its own arrival, however long it queued:
//! a request still waiting at its deadline answers `UNAVAILABLE` and leaves the queue, and a
//! batch never carries a request whose caller has gone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Ledger, LedgerError, Result};
use crate::metrics::Metrics;
use crate::model::{AcquireRequest, Category, MessageKind, Outcome, RecipientId, SenderId};

/// Most recipients decided by one coalesced call (the default `max_batch`).
pub const MAX_COALESCED: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    sender: SenderId,
    kind: MessageKind,
    category: Option<Category>,
}

struct Waiter {
    recipients: Vec<RecipientId>,
    reply: oneshot::Sender<Result<Vec<Outcome>>>,
}

/// A sender's queue exists while a driver task decides its batches; requests join it.
type Queues = Mutex<HashMap<Key, VecDeque<Waiter>>>;

pub struct Coalescer<L> {
    ledger: Arc<L>,
    queues: Arc<Queues>,
    /// From a request's arrival to its answer, queueing included.
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl<L: Ledger> Coalescer<L> {
    pub fn new(ledger: Arc<L>, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Coalescer {
            ledger,
            metrics,
            queues: Arc::default(),
            timeout,
        }
    }

    /// Decides `req` as [`Ledger::acquire`] does, together with the sender's concurrent requests.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<Vec<Outcome>> {
        if req.dry_run || req.at.is_some() {
            // Boxed, here and in `drive`: a ledger call's future is several kilobytes, and held
            // inline it made every request's future (and the driver task, spawned per uncoalesced
            // decision) that large, which the runtime then copies on every move (BENCHMARKS.md,
            // "Where the server's instructions go").
            return Box::pin(self.ledger.acquire(req)).await;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let key = Key {
            sender: req.sender,
            kind: req.kind,
            category: req.category,
        };
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            recipients: req.recipients,
            reply,
        };
        let start = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            match queues.get_mut(&key) {
                Some(queue) => {
                    queue.push_back(waiter);
                    false
                }
                None => {
                    queues.insert(key.clone(), VecDeque::from([waiter]));
                    true
                }
            }
        };
        if start {
            // The driver is a task of its own, so a caller that goes away (a deadline, a client
            // that hung up) never strands the requests queued behind it.
            tokio::spawn(drive(
                self.ledger.clone(),
                self.queues.clone(),
                key,
                self.metrics.clone(),
            ));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(answer) => {
                answer.unwrap_or_else(|_| Err(LedgerError::Internal("decision abandoned".into())))
            }
            // Dropping `answer` closes the channel: a batch not yet sent leaves this request out.
            // One already sent may still be decided by the store: consumed, unanswered, the safe
            // side (docs/contract.md, "Timeouts").
            Err(_) => Err(LedgerError::Unavailable(format!(
                "the store did not answer within {} ms (this request queued behind another decision of its sender)",
                self.timeout.as_millis()
            ))),
        }
    }
}

/// Decides the queue of `key`, a batch at a time, until it is empty.
async fn drive<L: Ledger>(ledger: Arc<L>, queues: Arc<Queues>, key: Key, metrics: Arc<Metrics>) {
    let mut guard = Driving {
        queues: &queues,
        key: &key,
        done: false,
    };
    loop {
        let batch = {
            let mut all = queues.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(queue) = all.get_mut(&key) else {
                break;
            };
            let mut batch: Vec<Waiter> = Vec::new();
            let mut n = 0;
            while let Some(w) = queue.front() {
                if w.reply.is_closed() {
                    // Its caller gave up (its deadline passed): decide nothing for it.
                    queue.pop_front();
                    continue;
                }
                if !batch.is_empty() && n + w.recipients.len() > MAX_COALESCED {
                    break;
                }
                n += w.recipients.len();
                batch.extend(queue.pop_front());
            }
            if batch.is_empty() {
                all.remove(&key);
                guard.done = true;
                break;
            }
            batch
        };
        // The recipients move into the call; each waiter keeps how many are its own.
        let mut recipients = Vec::with_capacity(batch.iter().map(|w| w.recipients.len()).sum());
        let mut replies = Vec::with_capacity(batch.len());
        for w in batch {
            replies.push((w.recipients.len(), w.reply));
            recipients.extend(w.recipients);
        }
        let req = AcquireRequest {
            sender: key.sender.clone(),
            recipients,
            kind: key.kind,
            category: key.category,
            dry_run: false,
            at: None,
        };
        match Box::pin(ledger.acquire(req)).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (n, reply) in replies {
                    let mine: Vec<Outcome> = outcomes.by_ref().take(n).collect();
                    let answer = if mine.len() == n {
                        Ok(mine)
                    } else {
                        Err(LedgerError::Internal(
                            "fewer outcomes than recipients".into(),
                        ))
                    };
                    // A caller that went away no longer wants its answer; what the store admitted
                    // for it stays consumed, and is counted (docs/contract.md, "Timeouts").
                    if let Err(Ok(unanswered)) = reply.send(answer) {
                        let admitted = unanswered.iter().filter(|o| o.decision.allowed()).count();
                        if admitted > 0 {
                            metrics.unanswered(admitted as u64);
                        }
                    }
                }
            }
            Err(e) => {
                for (_, reply) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Removes the queue if its driver ends without emptying it (a panic in the ledger), so the
/// next request starts a new driver; the requests still queued get an INTERNAL error.
struct Driving<'a> {
    queues: &'a Queues,
    key: &'a Key,
    done: bool,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut all = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            all.remove(self.key);
        }
    }
}
