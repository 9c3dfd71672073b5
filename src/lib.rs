//! waquota: a distributed rate limiter for WhatsApp Business messaging limits.
//!
//! Data flows one way, from the wire through the rules into a ledger (wire -> rules -> ledger):
//!
//! - [`grpc`]: tonic services (`QuotaService`, `AdminService`) and proto <-> domain conversion.
//! - [`model`]: domain types and validation (ids, tiers, policies, decisions); pure, no I/O.
//! - [`rules`]: the policy engine, written once: a decision (and the writes it makes) as a pure
//!   function of a snapshot of the target's state; the ledgers store, the rules decide.
//! - [`ledger`]: the [`ledger::Ledger`] trait and its two implementations: in memory (one
//!   process) and Redis (one atomic Lua script per decision, shared by every instance).
//! - [`config`]: the server's settings, layered: defaults, TOML file, environment, flags.
//! - [`cli`]: the operator commands of the binary, a gRPC client of `AdminService`.
//! - [`plan`]: the planner: a campaign simulated on a copy of one window's live state.
//! - [`outage`]: what decisions answer while the store cannot be reached.
//! - [`metrics`]: Prometheus metrics and their `/metrics` listener.
//! - [`webhook`]: the WhatsApp webhook listener, which keeps the ledger true from WhatsApp's own
//!   reports (docs/contract.md, "The webhook bridge").
//! - [`chart`]: hour-by-hour charts of a window, as terminal bars and as SVG.
//! - [`bench`]: `waquota bench`, the load generator and measurements behind BENCHMARKS.md.
//! - [`server`]: wiring: services, auth, load shedding, TLS, health, reflection, graceful
//!   shutdown.
//!
//! Lua scripts live in `lua/`, one per decision, each documenting its KEYS and ARGV.

pub mod bench;
pub mod chart;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod outage;
pub mod plan;
pub mod rules;
pub mod server;
pub mod webhook;

/// The generated code of the public contract (`proto/waquota/v1/waquota.proto`).
pub mod proto {
    tonic::include_proto!("waquota.v1");

    /// Encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/waquota_descriptor.bin"));
}
