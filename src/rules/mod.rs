//! The policy engine, written once: every rule that turns a target's state into a decision, as
//! plain functions of plain data (docs/contract.md, "The decision, step by step"). Nothing here
//! stores, reads a clock or does I/O: the caller hands in a snapshot (the policies in force, the
//! recipient's slot, service window, hold, pair and marketing state, the window's use, the
//! time) and applies the verdict it gets back. The memory ledger is that caller; the Lua scripts
//! in `lua/` are the same functions for Redis, each marked `-- mirrors rules::<module>::<fn>`,
//! and `tests/differential.rs` holds the two equal (docs/internals.md, "The policy engine,
//! written once").
//!
//! - [`settle`]: tier changes over time (a pending upgrade, the flagged downgrade) and what is
//!   projected.
//! - [`rates`]: the rates a sender decides with, the GCRA behind throughput and pair rates, the
//!   marketing cap.
//! - [`projections`]: unique-user counts and the thresholds that project an upgrade.
//! - [`decide`]: one recipient's decision, its retry time and the writes it makes.

pub mod decide;
pub mod projections;
pub mod rates;
pub mod settle;

pub use decide::{Admitted, Overlay, Recipient, SlotChange, Standing, Verdict, decide};
pub use projections::{count_since, crossing_time, upgrade_threshold_met};
pub use rates::{Rates, gcra};
pub use settle::{Progress, projection, settle};
