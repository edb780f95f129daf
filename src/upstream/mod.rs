//! The engine: fetches OCI content from upstream registries. It routes a
//! request to the upstreams whose rules admit the repository, serves what
//! the cache holds for that route, tries the upstreams in priority order on
//! a miss, authenticates as each asks, and verifies every byte it hands out
//! against its digest. It knows nothing of gRPC; the service adapter in
//! [`crate::grpc`] translates to and from it.

mod auth;
mod blob;
mod error;
mod glob;
mod manifest;
mod registry;
mod remote;
mod resilience;
mod routing;
mod tags;
mod token_cache;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

pub use auth::{Secret, parse_challenges};
pub use blob::{BlobChunk, BlobInfo, BlobMeta, BlobRange, BlobRequest, BlobStream};
pub use error::{Error, Fault, FaultKind, Faults};
pub use glob::Glob;
pub use manifest::{Manifest, ManifestMeta, ManifestRequest};
pub use tags::{TagPage, TagsRequest};

use crate::cache::{Cache, CacheError, Holder, negative::Negative};
use crate::config::Config;
use crate::oci::{Digest, MediaType, Repository};
use remote::Remote;
use routing::Router;

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
    fn fetched(remote: &Remote) -> Self {
        Self {
            upstream: remote.name().to_owned(),
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
}

/// Why the engine could not be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An upstream's HTTP client could not be built.
    #[error("{0}")]
    Upstream(String),
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl Engine {
    /// Builds the engine from a validated configuration, opening the cache.
    pub fn new(config: &Config) -> Result<Self, BuildError> {
        let remotes = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| Remote::new(u, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildError::Upstream)?;
        Ok(Self {
            router: Router::new(remotes),
            cache: Arc::new(Cache::open(&config.cache)?),
            limits: Limits {
                max_manifest: usize::try_from(config.max_manifest_size.as_u64())
                    .unwrap_or(usize::MAX),
                max_tags: config.max_tags,
            },
        })
    }
}

/// Tries `attempt` on each candidate in order and returns the first success
/// with the upstream that gave it; when all fail, the error their faults add
/// up to. A "not found" is remembered per (upstream, `key`) for the negative
/// TTL, and a remembered one skips the upstream.
async fn try_in_order<T, F, Fut>(
    negative: &Negative,
    candidates: &[Arc<Remote>],
    key: &str,
    attempt: F,
) -> Result<(Arc<Remote>, T), Error>
where
    F: Fn(Arc<Remote>) -> Fut,
    Fut: Future<Output = Result<T, Fault>>,
{
    let mut faults = Faults::default();
    for remote in candidates {
        if !remote.circuit().allow() {
            faults.push(Fault::unavailable(format!(
                "upstream `{}` is skipped: its circuit is open after repeated failures",
                remote.name()
            )));
            continue;
        }
        if negative.contains(remote.name(), key) {
            faults.push(Fault::new(
                FaultKind::NotFound,
                format!(
                    "upstream `{}` answered \"not found\" for {key} recently",
                    remote.name()
                ),
            ));
            continue;
        }
        match attempt(remote.clone()).await {
            Ok(value) => {
                remote.circuit().record_success();
                return Ok((remote.clone(), value));
            }
            Err(fault) => {
                tracing::debug!(upstream = remote.name(), %fault, "upstream failed; trying the next");
                if fault.is_upstream_failure() {
                    remote.circuit().record_failure();
                } else {
                    remote.circuit().record_success();
                }
                if fault.is_not_found() {
                    negative.insert(remote.name(), key);
                }
                faults.push(fault);
            }
        }
    }
    let error = faults.into_error();
    if !matches!(error, Error::NotFound(_)) {
        tracing::warn!(%error, "no upstream could answer");
    }
    Err(error)
}

/// The cache's record that `remote` holds content for `repository`.
fn holder_for(remote: &Remote, repository: &Repository) -> Holder {
    Holder {
        upstream: remote.name().to_owned(),
        repository: remote.remote_name(repository),
    }
}

/// The first candidate known to hold content for `repository`, given the
/// cache's holders of that content.
fn known_holder<'a>(
    candidates: &'a [Arc<Remote>],
    repository: &Repository,
    holders: &[Holder],
) -> Option<&'a Arc<Remote>> {
    candidates
        .iter()
        .find(|c| holders.contains(&holder_for(c, repository)))
}

fn cache_error(e: CacheError) -> Error {
    tracing::error!(error = %e, "cache failure");
    Error::Cache(e.to_string())
}

/// The caller's acceptable media types, or every OCI and Docker v2 type.
fn media_types_or_default(accept: &[MediaType]) -> Vec<MediaType> {
    if accept.is_empty() {
        MediaType::DEFAULT_ACCEPT
            .iter()
            .map(|m| MediaType::known(m))
            .collect()
    } else {
        accept.to_vec()
    }
}

/// Checks `bytes` against `expected`, and against a `Docker-Content-Digest`
/// the upstream sent; returns the digest computed with `expected`'s
/// algorithm (sha256 when there is none).
fn verify_digest(
    remote: &Remote,
    what: &str,
    bytes: &Bytes,
    expected: Option<&Digest>,
    header: Option<&Digest>,
) -> Result<Digest, Fault> {
    let algorithm = expected.map_or(crate::oci::Algorithm::Sha256, Digest::algorithm);
    let computed = algorithm.digest(bytes);
    if let Some(expected) = expected {
        if *expected != computed {
            return Err(Fault::integrity(format!(
                "upstream `{}` sent bytes for {what} that hash to {computed}",
                remote.name()
            )));
        }
    }
    if let Some(header) = header {
        let matches = if header.algorithm() == algorithm {
            *header == computed
        } else {
            header.matches(bytes)
        };
        if !matches {
            return Err(Fault::integrity(format!(
                "upstream `{}` sent {what} with Docker-Content-Digest {header}, but its bytes hash to {computed}",
                remote.name()
            )));
        }
    }
    Ok(computed)
}

/// The `Docker-Content-Digest` header, when present and valid.
fn header_digest(headers: &reqwest::header::HeaderMap) -> Option<Digest> {
    let value = headers.get("Docker-Content-Digest")?.to_str().ok()?;
    Digest::parse(value.trim()).ok()
}

/// The `Content-Type` without parameters, lowercased.
fn content_type(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}
