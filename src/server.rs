//! Wiring: the ledger chosen by the settings, both services behind the guard layer (auth, load
//! shedding, deadlines, metrics), TLS, gRPC health and reflection, the metrics listener, and
//! graceful shutdown.
//!
//! Health reports SERVING while the ledger answers a ping (checked every second), so a load
//! balancer stops sending to an instance that lost its store (except QuotaService under
//! `on_store_error = allow`, which still answers). On shutdown, health turns
//! NOT_SERVING first and stays so for `shutdown_delay` while calls are still served, then the
//! listener closes and in-flight calls get `shutdown_grace` to finish; past it the server
//! returns anyway, so the process exits in bounded time.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::config::{OnStoreError, Settings, Store, TlsSettings};
use crate::grpc::{AdminApi, ApiOptions, QuotaApi, guard::GuardLayer};
use crate::ledger::{Ledger, memory::MemoryLedger, redis::RedisLedger};
use crate::metrics::Metrics;
use crate::outage::OutagePolicy;
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
    #[error("TLS: cannot read {path}: {error}")]
    TlsFile {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("metrics listener on {addr}: {error}")]
    Metrics {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("webhook listener on {addr}: {error}")]
    Webhook {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// The sockets a server answers on, bound before it starts: a bind error is reported before
/// anything serves, and a caller that binds port 0 learns the port without a race.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    pub webhook: Option<TcpListener>,
}

impl Listeners {
    /// Binds `listen`, and `metrics_listen` and `webhook_listen` where they are set.
    pub async fn bind(settings: &Settings) -> Result<Listeners, ServeError> {
        let addr = settings.listen;
        let grpc = TcpListener::bind(addr)
            .await
            .map_err(|error| ServeError::Listen { addr, error })?;
        Ok(Listeners {
            grpc,
            metrics: bind_optional(settings.metrics_listen, |addr, error| ServeError::Metrics {
                addr,
                error,
            })
            .await?,
            webhook: bind_optional(settings.webhook_listen, |addr, error| ServeError::Webhook {
                addr,
                error,
            })
            .await?,
        })
    }
}

async fn bind_optional(
    addr: Option<std::net::SocketAddr>,
    error: impl Fn(std::net::SocketAddr, std::io::Error) -> ServeError,
) -> Result<Option<TcpListener>, ServeError> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|e| error(a, e)),
    }
}

const HEALTH_SERVICES: [&str; 3] = ["", "waquota.v1.QuotaService", "waquota.v1.AdminService"];

/// Runs the server on `listeners` until `shutdown` resolves, then drains.
pub async fn serve(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    match &settings.store {
        Store::Memory => {
            serve_instrumented(
                Arc::new(MemoryLedger::new(settings.defaults)),
                metrics,
                settings,
                listeners,
                shutdown,
            )
            .await
        }
        Store::Redis { .. } | Store::Cluster { .. } | Store::Sentinel { .. } => {
            let ledger = RedisLedger::connect(&settings)
                .await
                .map_err(|e| ServeError::Store(e.to_string()))?
                .with_metrics(metrics.clone());
            serve_instrumented(Arc::new(ledger), metrics, settings, listeners, shutdown).await
        }
    }
}

pub async fn serve_with<L: Ledger>(
    ledger: Arc<L>,
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_instrumented(
        ledger,
        Arc::new(Metrics::new()),
        settings,
        listeners,
        shutdown,
    )
    .await
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|error| ServeError::TlsFile {
        path: path.to_owned(),
        error,
    })
}

fn tls_config(tls: &TlsSettings) -> Result<ServerTlsConfig, ServeError> {
    let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        // With a client CA, a client without a certificate signed by it is refused.
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

/// Serves with `metrics` (which a Redis ledger may already report to).
pub async fn serve_instrumented<L: Ledger>(
    ledger: Arc<L>,
    metrics: Arc<Metrics>,
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
        webhook: webhook_listener,
    } = listeners;
    let outage = Arc::new(OutagePolicy::new(&settings, metrics.clone()));
    let opts = ApiOptions {
        trust_client_clock: settings.trust_client_clock,
        defaults: settings.defaults,
        max_batch: settings.max_batch,
        metrics: metrics.clone(),
        outage: outage.clone(),
        auth_enabled: settings.auth.enabled(),
        store_timeout: settings.redis_timeout,
    };
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(l) = metrics_listener {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "metrics at /metrics");
        }
        tokio::spawn(crate::metrics::serve(l, metrics.clone(), async {
            let _ = metrics_stopped.await;
        }));
    }
    let (webhook_stop, webhook_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(l) = webhook_listener {
        let bridge = Arc::new(crate::webhook::Bridge::new(
            ledger.clone(),
            crate::webhook::BridgeSettings {
                verify_token: settings.webhook_verify_token.clone(),
                app_secrets: settings.webhook_app_secrets.clone(),
                max_body_bytes: settings.webhook_max_body_bytes,
                wabas: settings.webhook_wabas.clone(),
                displays: settings.webhook_displays.clone(),
                forward: settings.webhook_forward.clone(),
            },
            metrics.clone(),
        ));
        if let Ok(a) = l.local_addr() {
            tracing::info!(url = %crate::webhook::describe(a), "WhatsApp webhooks");
        }
        tokio::spawn(crate::webhook::serve(l, bridge, async {
            let _ = webhook_stopped.await;
        }));
    }
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
    // Why QuotaService may stay SERVING without its store: with `on_store_error = allow` the
    // instance still answers every Acquire (admitting), and a balancer that drained it would
    // turn that policy into refusals. The overall status ("") and AdminService always follow
    // the store.
    let quota_survives_outage = settings.on_store_error == OnStoreError::Allow;
    let probe = {
        let (ledger, reporter) = (ledger.clone(), reporter.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let store_ok = ledger.ping().await.is_ok();
                outage.flush();
                if last != Some(store_ok) {
                    if !store_ok {
                        tracing::warn!(
                            quota_service_serving = quota_survives_outage,
                            "store does not answer: health is NOT_SERVING"
                        );
                    }
                    for s in HEALTH_SERVICES {
                        let serving =
                            store_ok || (quota_survives_outage && s == "waquota.v1.QuotaService");
                        let status = if serving {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        reporter.set_service_status(s, status).await;
                    }
                    last = Some(store_ok);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = health_stopped.changed() => return,
                }
            }
        })
    };

    let (closing, closed) = tokio::sync::oneshot::channel::<()>();
    let drain = {
        let reporter = reporter.clone();
        let delay = settings.shutdown_delay;
        async move {
            shutdown.await;
            let _ = stop_health.send(true);
            let _ = probe.await;
            for s in HEALTH_SERVICES {
                reporter
                    .set_service_status(s, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(delay = %millis_text(delay), "shutting down: health is NOT_SERVING");
            tokio::time::sleep(delay).await;
            tracing::info!("closing the listener, draining in-flight requests");
            let _ = closing.send(());
        }
    };

    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    tracing::info!(
        %addr,
        store = %store_name(&settings.store),
        tls = settings.tls.is_some(),
        mutual_tls = settings.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        auth = settings.auth.enabled(),
        max_in_flight = settings.max_in_flight,
        on_store_error = %settings.on_store_error.name(),
        trust_client_clock = settings.trust_client_clock,
        "waquota serving"
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &settings.tls {
        builder = builder.tls_config(tls_config(tls)?)?;
    }
    let max = settings.max_message_bytes;
    let quota = QuotaServiceServer::new(QuotaApi::new(ledger.clone(), opts.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin = AdminServiceServer::new(AdminApi::new(ledger, opts))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let server = builder
        .layer(GuardLayer::new(
            &settings.auth,
            settings.max_in_flight,
            metrics,
        ))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(quota)
        .add_service(admin)
        // TCP_NODELAY: a multi-segment answer (a batch) must not wait for the client's delayed
        // ACK under Nagle's algorithm; measured in BENCHMARKS.md (batch p50 44 ms -> 5 ms).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), drain);
    let grace = settings.shutdown_grace;
    let result = tokio::select! {
        r = server => r.map_err(ServeError::from),
        _ = async {
            if closed.await.is_err() {
                // The server ended on its own before any shutdown began.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace = %millis_text(grace), "shutdown grace elapsed with requests still in flight: stopping anyway");
            Ok(())
        }
    };
    let _ = metrics_stop.send(());
    let _ = webhook_stop.send(());
    result
}

/// The store's kind for logs: never its URL, which may hold a password.
/// A duration in a log line as the settings give it: `10s`, `50ms`.
fn millis_text(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

fn store_name(store: &Store) -> &'static str {
    match store {
        Store::Memory => "memory",
        Store::Redis { .. } => "redis",
        Store::Cluster { .. } => "cluster",
        Store::Sentinel { .. } => "sentinel",
    }
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
