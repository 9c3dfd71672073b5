//! Wiring: the ledger chosen by the settings, both services, gRPC health and reflection, and
//! graceful shutdown.
//!
//! Health reports SERVING while the ledger answers a ping (checked every second), so a load
//! balancer stops sending to an instance that lost its store. On shutdown, health turns
//! NOT_SERVING first, then the server stops accepting and lets in-flight calls finish.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::{Settings, Store};
use crate::grpc::{AdminApi, ApiOptions, QuotaApi};
use crate::ledger::{Ledger, memory::MemoryLedger, redis::RedisLedger};
use crate::proto::{
    admin_service_server::AdminServiceServer, quota_service_server::QuotaServiceServer,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to the store: {0}")]
    Store(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

const HEALTH_SERVICES: [&str; 3] = ["", "waquota.v1.QuotaService", "waquota.v1.AdminService"];

/// Runs the server on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    match &settings.store {
        Store::Memory => {
            serve_with(
                Arc::new(MemoryLedger::new(settings.defaults)),
                settings,
                listener,
                shutdown,
            )
            .await
        }
        Store::Redis { .. } | Store::Cluster { .. } => {
            let ledger = RedisLedger::connect(&settings)
                .await
                .map_err(|e| ServeError::Store(e.to_string()))?;
            serve_with(Arc::new(ledger), settings, listener, shutdown).await
        }
    }
}

pub async fn serve_with<L: Ledger>(
    ledger: Arc<L>,
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let opts = ApiOptions {
        trust_client_clock: settings.trust_client_clock,
        defaults: settings.defaults,
        max_batch: settings.max_batch,
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    // Both reflection versions: v1 for current tools, v1alpha for older grpcurl, grpcui, Postman.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;

    let (stop_health, mut health_stopped) = tokio::sync::watch::channel(false);
    let probe = {
        let (ledger, reporter) = (ledger.clone(), reporter.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = if ledger.ping().await.is_ok() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                if last != Some(now) {
                    if now == ServingStatus::NotServing {
                        tracing::warn!("store does not answer: health is NOT_SERVING");
                    }
                    for s in HEALTH_SERVICES {
                        reporter.set_service_status(s, now).await;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = health_stopped.changed() => return,
                }
            }
        })
    };

    let drain = {
        let reporter = reporter.clone();
        async move {
            shutdown.await;
            let _ = stop_health.send(true);
            let _ = probe.await;
            for s in HEALTH_SERVICES {
                reporter
                    .set_service_status(s, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!("shutting down: health is NOT_SERVING, draining in-flight requests");
        }
    };

    let addr = listener.local_addr().ok();
    tracing::info!(?addr, store = ?settings.store, trust_client_clock = settings.trust_client_clock, "waquota serving");
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(QuotaServiceServer::new(QuotaApi::new(
            ledger.clone(),
            opts.clone(),
        )))
        .add_service(AdminServiceServer::new(AdminApi::new(ledger, opts)))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), drain);
    server.await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
