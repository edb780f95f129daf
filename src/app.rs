//! Wiring: builds the engine, the gRPC services (ours, health, reflection v1
//! and v1alpha) and serves them on bound listeners ([`Listeners`]: gRPC, and
//! `/metrics` and the plaintext health port when configured) until
//! `shutdown` resolves. Tests run exactly this on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::access::Access;
use crate::config::Config;
use crate::grpc::{AdminApi, Admission, Limits, MetricsLayer, UpstreamApi, health_reporter};
use crate::metrics::endpoint;
use crate::mirror::{self, Mirror};
use crate::pb;
use crate::tls::{ServerTls, TlsError};
use crate::upstream::{BuildError, Engine};

/// Largest request message accepted (requests are a few strings).
const REQUEST_LIMIT: usize = 64 * 1024;
/// Longest wait at exit for downloads to land in the store. With
/// [`CLOSE_MARGIN`] it keeps the whole exit within `shutdown_grace` + 5 s
/// (Kubernetes' default grace of 30 s fits the default 20 s).
const SETTLE_LIMIT: Duration = Duration::from_secs(2);
/// Time after the grace period for connections to close by themselves.
const CLOSE_MARGIN: Duration = Duration::from_secs(2);

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The engine could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The `[tls]` files cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
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

/// The descriptor sets of every service served: for reflection, and for
/// the method table of the gRPC metrics.
const DESCRIPTOR_SETS: [&[u8]; 4] = [
    pb::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {key} = {addr}: {source}")]
pub struct BindError {
    /// The config key.
    pub key: &'static str,
    /// Its address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The sockets the service serves on, bound before it starts, so a port
/// that is taken stops the start with a message naming its key.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (`listen`).
    pub grpc: TcpListener,
    /// Prometheus `GET /metrics` (`metrics_listen`), when served.
    pub metrics: Option<TcpListener>,
    /// Plaintext `grpc.health.v1` only (`health_listen`), when served.
    pub health: Option<TcpListener>,
    /// The OCI HTTP mirror (`mirror_listen`), when served.
    pub mirror: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &Config) -> Result<Self, BindError> {
        async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { key, addr, source })
        }
        let grpc = bind("listen", config.listen).await?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(bind("metrics_listen", addr).await?),
            None => None,
        };
        let health = match config.health_listen {
            Some(addr) => Some(bind("health_listen", addr).await?),
            None => None,
        };
        let mirror = match config.mirror_listen {
            Some(addr) => Some(bind("mirror_listen", addr).await?),
            None => None,
        };
        Ok(Self {
            grpc,
            metrics,
            health,
            mirror,
        })
    }
}

/// Runs every check `run` would run on `config` before it serves, without
/// binding or opening the cache: what `check-config` reports, and what
/// `serve` checks before it binds (the `[tls]` files included).
pub fn preflight(config: &Config) -> Result<(), AppError> {
    Engine::preflight(config)?;
    if let Some(tls) = &config.tls {
        ServerTls::load(tls)?;
    }
    Ok(())
}

/// Serves until `shutdown` resolves. Then, in order: health turns
/// NOT_SERVING (so load balancers stop sending), new calls are refused with
/// UNAVAILABLE while health still answers, calls in flight get up to
/// `shutdown_grace` to finish, health Watch calls end, and the server stops;
/// streams still running after the grace period are cut. One connection
/// holds at most `max_streams_per_connection` calls at once, and a FetchBlob
/// stream unread for `stream_idle_timeout` is ended. With `[tls]`, gRPC is
/// served over TLS whose certificate is reloaded when its files change.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let tls = config.tls.as_ref().map(ServerTls::load).transpose()?;
    let engine = Arc::new(Engine::new(&config)?);
    tracing::info!(dir = %config.cache.dir.display(), why = %config.cache.dir.describe(), "cache");
    if let Some(s3) = config.cache.shared() {
        tracing::info!(bucket = %s3.describe(), "shared cache tier");
    }
    let admission = Arc::new(Admission::new(config.max_concurrent_rpcs));
    let access = Arc::new(Access::new(&config.callers));
    if !config.callers.is_empty() && config.tls.is_none() {
        tracing::warn!(
            "[[callers]] without [tls]: bearer tokens cross the network in plaintext (fine only where the mesh encrypts)"
        );
    }
    let grace = config.shutdown_grace;
    let (health, health_service) = health_reporter();
    for service in ["", pb::SERVICE_NAME, pb::ADMIN_SERVICE_NAME] {
        health.set_service_status(service, ServingStatus::Serving);
    }
    // Reflection describes itself; it is given the others.
    let reflection = || {
        DESCRIPTOR_SETS[..2]
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, set| {
                b.register_encoded_file_descriptor_set(set)
            })
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Calls are counted only while someone can read the counts.
    let served_sets: &[&[u8]] = if listeners.metrics.is_some() {
        &DESCRIPTOR_SETS
    } else {
        &[]
    };
    let metered = MetricsLayer::new(&engine.metrics().grpc, served_sets);
    // The side ports stop with the main one (at the latest when `run`
    // returns early with an error).
    let side_ports = CancellationToken::new();
    let _stop_side_ports = side_ports.clone().drop_guard();
    let side_tasks = TaskTracker::new();
    if let Some(listener) = listeners.metrics {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics");
        let scraped = engine.clone();
        let render: endpoint::Render = Arc::new(move || {
            scraped.observe();
            scraped.metrics().render()
        });
        let stop = side_ports.clone();
        side_tasks.spawn(async move {
            if let Err(e) = endpoint::serve(listener, render, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the metrics endpoint failed");
            }
        });
    }
    if let Some(listener) = listeners.health {
        tracing::info!(addr = %listener.local_addr()?, "serving health (plaintext)");
        let stop = side_ports.clone();
        let server = Server::builder()
            .layer(metered.clone())
            .add_service(
                health_service
                    .clone()
                    .max_decoding_message_size(REQUEST_LIMIT),
            )
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop.cancelled_owned(),
            );
        side_tasks.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "the health port failed");
            }
        });
    }

    // The mirror stops taking requests when the drain begins; those under
    // way finish (joined with the side ports).
    let mirror_drain = side_ports.child_token();
    if let Some(listener) = listeners.mirror {
        tracing::info!(addr = %listener.local_addr()?, "serving the OCI mirror");
        let mirror = Mirror::new(
            engine.clone(),
            access.clone(),
            admission.clone(),
            config.stream_idle_timeout,
        );
        let stop = mirror_drain.clone();
        side_tasks.spawn(async move {
            if let Err(e) = mirror::serve(listener, mirror, stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the OCI mirror failed");
            }
        });
    }

    let listener = listeners.grpc;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        upstreams = config.upstreams.len(),
        tls = tls.is_some(),
        mtls = tls.as_ref().is_some_and(ServerTls::requires_client_certificate),
        "serving gRPC"
    );
    let (began, mut has_begun) = tokio::sync::watch::channel(false);
    let gate = admission.clone();
    let drain = async move {
        shutdown.await;
        let _ = began.send(true);
        mirror_drain.cancel();
        tracing::info!(
            ?grace,
            "shutting down: health NOT_SERVING, refusing new calls, draining"
        );
        for service in ["", pb::SERVICE_NAME, pb::ADMIN_SERVICE_NAME] {
            health.set_service_status(service, ServingStatus::NotServing);
        }
        gate.start_draining();
        if tokio::time::timeout(grace, gate.drained()).await.is_err() {
            tracing::warn!("grace period over with calls still running");
        }
        // Health Watch calls never end by themselves; end them so their
        // connections can close.
        health.close();
    };
    // One connection cannot hold every admission permit: HTTP/2's
    // SETTINGS_MAX_CONCURRENT_STREAMS caps its calls in flight.
    let router = Server::builder()
        .layer(metered)
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service.max_decoding_message_size(REQUEST_LIMIT))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            UpstreamApi::new(
                engine.clone(),
                admission,
                access.clone(),
                Limits::from(&config),
            )
            .into_server(REQUEST_LIMIT),
        )
        .add_service(AdminApi::new(engine.clone(), access).into_server(REQUEST_LIMIT));
    // Nagle's algorithm would hold small answers (a manifest) for the peer's
    // delayed ACK: ~40 ms per call. The incoming stream sets TCP_NODELAY on
    // each accepted socket (Server::tcp_nodelay does not apply to it).
    let server = match tls {
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, drain).boxed()
        }
        Some(tls) => router
            .serve_with_incoming_shutdown(tls.incoming(listener), drain)
            .boxed(),
    };
    // After the grace period, connections that still hold calls are closed.
    let deadline = async move {
        let _ = has_begun.wait_for(|b| *b).await;
        tokio::time::sleep(grace + CLOSE_MARGIN).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => tracing::warn!("closing connections still open after the grace period"),
    }
    // Verified downloads are synced into the store after their callers are
    // served; let them land so a restart finds them. Meanwhile the side
    // ports close, so their ports are free when `run` returns.
    side_ports.cancel();
    side_tasks.close();
    let (settled, closed) = tokio::join!(
        tokio::time::timeout(SETTLE_LIMIT, engine.settle()),
        tokio::time::timeout(SETTLE_LIMIT, side_tasks.wait()),
    );
    if settled.is_err() {
        tracing::warn!("downloads still running at exit are discarded");
    }
    if closed.is_err() {
        tracing::warn!("the metrics or health port did not close in time");
    }
    tracing::info!("stopped");
    Ok(())
}
