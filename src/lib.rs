//! waquota: a distributed rate limiter for WhatsApp Business messaging limits.
//!
//! Data flows one way, from the wire through the rules into a ledger:
//!
//! - [`grpc`]: tonic services (`QuotaService`, `AdminService`) and proto <-> domain conversion.
//! - [`model`]: domain types and validation (ids, tiers, policies, decisions); pure, no I/O.
//! - [`ledger`]: the [`ledger::Ledger`] trait and its two implementations: in memory (one
//!   process) and Redis (one atomic Lua script per decision, shared by every instance).
//! - [`config`]: settings for the server.
//! - [`server`]: wiring: services, health, reflection, graceful shutdown.
//! - [`bench`]: `waquota bench`, the load generator and measurements behind BENCHMARKS.md.
//!
//! Lua scripts live in `lua/`, one per decision, each documenting its KEYS and ARGV.

pub mod bench;
pub mod config;
pub mod grpc;
pub mod ledger;
pub mod model;
pub mod server;

/// The generated code of the public contract (`proto/waquota/v1/waquota.proto`).
pub mod proto {
    tonic::include_proto!("waquota.v1");

    /// Encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/waquota_descriptor.bin"));
}
