//! The engine: fetches OCI content from upstream registries. It knows
//! nothing of gRPC; the service adapter in [`crate::grpc`] translates to and
//! from it. One [`Engine`] serves every request:
//!
//! - [`Engine::fetch_manifest`] and [`Engine::head_manifest`] (in
//!   [`manifest`]): a manifest by tag or digest, through the tag entries and
//!   the store, with platform resolution of an index.
//! - [`Engine::fetch_blob`] and [`Engine::head_blob`] (in [`blob`]): a
//!   verifying stream of a blob or a range of it, joining a download of the
//!   same blob already under way.
//! - [`Engine::fetch_tags`] (in [`tags`]): a page of a repository's tags.
//!
//! Each operation routes the repository to its candidate upstreams
//! ([`routing`]), serves what the cache holds for that route, and on a miss
//! tries the candidates in priority order ([`failover`]). Talking to one
//! upstream is [`client`] (HTTP, connection cap, retries) with [`auth`],
//! [`token`], [`challenge`] and [`realm`] for authentication,
//! [`resilience`] for backoff and circuit breaking, and [`distribution`]
//! for the OCI URLs, headers and error envelope.

mod admin;
mod auth;
mod blob;
mod challenge;
mod client;
mod distribution;
mod egress;
mod error;
mod failover;
mod http;
mod manifest;
mod realm;
mod resilience;
mod routing;
mod setup;
mod tags;
mod token;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admin::{CacheStats, UpstreamStatus};
pub use blob::{BlobInfo, BlobMeta, BlobRange, BlobRequest};
#[cfg(not(test))]
use error::Fault;
pub use error::{Error, Internal};
#[cfg(test)]
pub(crate) use error::{Fault, FaultKind, Faults};
pub use manifest::{Manifest, ManifestMeta, ManifestRequest};
pub use resilience::CircuitPhase;
pub use routing::Route;
pub use tags::{TagPage, TagsRequest};

use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::metrics::Metrics;
use client::Upstream;
use routing::Router;
use setup::ClientError;

/// The cache as the engine uses it: downloads fail with engine errors.
type EngineCache = Cache<Error>;

/// Where an answer came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The upstream that served the content (on a cache hit, the one that
    /// filled the cache for this route).
    pub upstream: String,
    /// True when served from cache.
    pub cache_hit: bool,
}

impl Source {
    fn fetched(upstream: &Upstream) -> Self {
        Self {
            upstream: upstream.name().to_owned(),
            cache_hit: false,
        }
    }

    fn cached(upstream: &str) -> Self {
        Self {
            upstream: upstream.to_owned(),
            cache_hit: true,
        }
    }
}

/// Limits on what the engine reads from upstreams.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_manifest: usize,
    max_tags: usize,
}

/// The OCI upstream engine. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Engine {
    router: Router,
    cache: Arc<EngineCache>,
    limits: Limits,
    /// Background work: downloads that go on for other callers, tag
    /// refreshes. Waited for by [`Engine::settle`].
    tasks: TaskTracker,
    /// Stops background work that has not reached a result yet.
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

/// Why the engine could not be built from a configuration.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BuildError(#[from] BuildFailure);

#[derive(Debug, thiserror::Error)]
enum BuildFailure {
    #[error(transparent)]
    Upstream(#[from] ClientError),
    #[error("cannot open the cache")]
    Cache(#[from] CacheError),
    #[error("cache.dir {}: cannot be created or written", .0.display())]
    CacheDir(std::path::PathBuf),
}

impl Engine {
    /// Builds the engine from a validated configuration, opening the cache.
    /// It counts into a [`Metrics`] registry of its own ([`Engine::metrics`]).
    pub fn new(config: &Config) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let upstreams = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| Upstream::new(u, i, metrics.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildFailure::from)?;
        let cache =
            Arc::new(Cache::open(&config.cache, metrics.clone()).map_err(BuildFailure::from)?);
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let scrub_rate = config.cache.scrub_rate.0;
        match tokio::runtime::Handle::try_current() {
            Ok(_) if scrub_rate > 0 => {
                tasks.spawn(cache.clone().scrub(scrub_rate, stop.clone()));
            }
            _ => tracing::debug!("the store is not scrubbed (scrub_rate 0, or no runtime)"),
        }
        Ok(Self {
            router: Router::new(upstreams),
            cache,
            limits: Limits {
                max_manifest: usize::try_from(config.max_manifest_size.as_u64())
                    .unwrap_or(usize::MAX),
                max_tags: config.max_tags,
            },
            tasks,
            stop,
            metrics,
        })
    }

    /// The engine's metrics, for the gRPC layer and the `/metrics` endpoint.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets the gauges that mirror state (cache size and objects, downloads
    /// in flight, each upstream's circuit); run before each scrape.
    pub fn observe(&self) {
        let usage = self.cache.usage();
        self.metrics
            .cache_state(usage.bytes, usage.objects, usage.downloads as usize);
        for upstream in self.router.upstreams() {
            self.metrics
                .circuit(upstream.name(), upstream.circuit().status().phase.gauge());
        }
    }

    /// Checks what [`Engine::new`] needs from outside the config (each
    /// upstream's client builds and its `ca_file` reads as PEM; the cache
    /// directory can be created and written; the S3 client of the shared
    /// tier builds, without a request) without opening the cache,
    /// whose start-up cleans up after a previous process.
    pub fn preflight(config: &Config) -> Result<(), BuildError> {
        for (i, upstream) in config.upstreams.iter().enumerate() {
            Upstream::new(upstream, i, Arc::default()).map_err(BuildFailure::from)?;
        }
        if !crate::config::dir_is_usable(&config.cache.dir) {
            return Err(BuildFailure::CacheDir(config.cache.dir.to_path_buf()).into());
        }
        crate::cache::check_shared(&config.cache).map_err(BuildFailure::from)?;
        Ok(())
    }

    /// Runs `work` in the background, tracked for [`Engine::settle`]; it is
    /// dropped unfinished if the engine stops first.
    fn spawn_background(&self, work: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = work => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Stops background work and waits for what must finish: downloads
    /// still receiving bytes are abandoned (their temp files removed), and
    /// verified downloads on their way into the store land there, so a
    /// graceful stop does not lose what callers already received.
    pub async fn settle(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.cache.settle().await;
    }
}
