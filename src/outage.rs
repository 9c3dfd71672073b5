//! What `Acquire`/`AcquireBatch` answer when the store cannot be reached.
//!
//! `deny` (the default) answers `UNAVAILABLE`: the quota is never exceeded, and sends stall until
//! the store is back. `allow` admits every recipient without touching the ledger: sending goes
//! on, at the risk of exceeding WhatsApp's limit by whatever is sent during the outage. The
//! choice is global (`on_store_error`) with per-sender overrides (`on_store_error_senders`).
//!
//! Why the overrides live in the configuration and not in stored policies: at decision time the
//! store is exactly what cannot be read, so neither a stored policy nor a sender's portfolio
//! is known; the sender id in the request is the only key available. A portfolio-wide override
//! is written as one entry per sender of that portfolio.
//!
//! Every outage decision is counted in metrics. Logs are rate-limited, not silenced: at most
//! one line per [`LOG_INTERVAL`], carrying the number of outage decisions since the last line;
//! [`OutagePolicy::flush`] writes the pending count once the interval has passed even when no
//! further decision comes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{OnStoreError, Settings};
use crate::metrics::Metrics;

pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Response metadata key set on admissions made while the store was down.
pub const OUTAGE_HEADER: &str = "waquota-store-outage";

#[derive(Debug)]
pub struct OutagePolicy {
    default: OnStoreError,
    senders: BTreeMap<String, OnStoreError>,
    metrics: Arc<Metrics>,
    log: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    last: Option<Instant>,
    allowed: u64,
    denied: u64,
}

impl OutagePolicy {
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Self {
        OutagePolicy {
            default: settings.on_store_error,
            senders: settings.on_store_error_senders.clone(),
            metrics,
            log: Mutex::new(LogState::default()),
        }
    }

    /// Decides for `sender` while the store is down, counts it and logs it (rate-limited).
    /// `true` = admit.
    pub fn decide(&self, sender: &str, recipients: usize, error: &str) -> bool {
        let choice = self.senders.get(sender).copied().unwrap_or(self.default);
        let allowed = choice == OnStoreError::Allow;
        self.metrics.outage_decision(allowed);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if allowed {
            log.allowed += 1;
        } else {
            log.denied += 1;
        }
        let due = log.last.is_none_or(|t| t.elapsed() >= LOG_INTERVAL);
        if due {
            tracing::warn!(
                sender,
                recipients,
                policy = if allowed { "allow" } else { "deny" },
                error,
                allowed_since_last_report = log.allowed,
                denied_since_last_report = log.denied,
                "store unreachable: deciding by on_store_error"
            );
            *log = LogState {
                last: Some(Instant::now()),
                ..LogState::default()
            };
        }
        allowed
    }

    /// Logs outage decisions not yet reported once the interval has passed.
    pub fn flush(&self) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if (log.allowed > 0 || log.denied > 0)
            && log.last.is_none_or(|t| t.elapsed() >= LOG_INTERVAL)
        {
            tracing::warn!(
                allowed_since_last_report = log.allowed,
                denied_since_last_report = log.denied,
                "store unreachable: outage decisions since the last report"
            );
            *log = LogState {
                last: Some(Instant::now()),
                ..LogState::default()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_and_every_decision_is_counted() {
        let settings = Settings {
            on_store_error: OnStoreError::Deny,
            on_store_error_senders: BTreeMap::from([("otp".to_owned(), OnStoreError::Allow)]),
            ..Settings::default()
        };
        let metrics = Arc::new(Metrics::new());
        let policy = OutagePolicy::new(&settings, metrics.clone());
        assert!(policy.decide("otp", 1, "down"));
        assert!(!policy.decide("marketing", 3, "down"));
        assert!(!policy.decide("marketing", 1, "down"));
        policy.flush();
        let text = metrics.render();
        assert!(text.contains("waquota_store_outage_decisions_total{outcome=\"allowed\"} 1"));
        assert!(text.contains("waquota_store_outage_decisions_total{outcome=\"denied\"} 2"));
        // The first decision was reported at once; the two after it wait for the interval.
        let log = policy.log.lock().unwrap();
        assert_eq!((log.allowed, log.denied), (0, 2));
    }
}
