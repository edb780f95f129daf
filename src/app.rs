//! Wiring: builds the engine, the gRPC services (ours, health, reflection v1
//! and v1alpha) and serves them on a bound listener until `shutdown`
//! resolves. Tests run exactly this on `127.0.0.1:0`.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::grpc::UpstreamApi;
use crate::pb;
use crate::upstream::{BuildError, Engine};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The engine could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Reflection could not load the descriptor sets.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves; then health turns NOT_SERVING and the
/// server stops accepting and drains in-flight calls.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let engine = Arc::new(Engine::new(&config)?);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(pb::SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let addr = listener.local_addr()?;
    tracing::info!(%addr, upstreams = config.upstreams.len(), "serving gRPC");
    let drain = async move {
        shutdown.await;
        tracing::info!("shutting down: health NOT_SERVING, draining calls");
        for service in ["", pb::SERVICE_NAME] {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    };
    Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(UpstreamApi::new(engine).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain)
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
