//! The cache: a content-addressable disk store for blobs and manifests
//! ([`store`]), tag → digest entries with a TTL ([`tags`]), remembered "not
//! found" answers ([`negative`]), per-key locks that coalesce concurrent
//! misses ([`locks`]), and the shared state of downloads in flight that
//! callers join while the bytes arrive ([`download`]).
//!
//! The cache knows nothing of HTTP or gRPC: the engine decides what to store
//! and when a cached object may be served.

pub mod download;
pub mod locks;
pub mod negative;
pub mod store;
pub mod tags;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::CacheConfig;

pub use download::{Download, Progress, State};
pub use store::{Holder, Object, Store};
pub use tags::{TagEntry, Tags};

/// Why the cache could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("cache at {path}: {source}")]
pub struct CacheError {
    /// The file or directory involved.
    pub path: String,
    /// The I/O failure.
    pub source: std::io::Error,
}

impl CacheError {
    pub(crate) fn at(path: &std::path::Path, source: std::io::Error) -> Self {
        Self {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Everything cached, shared by all requests.
#[derive(Debug)]
pub struct Cache<E> {
    /// Blobs and manifests by digest.
    pub store: Arc<Store>,
    /// Tag → digest entries.
    pub tags: Tags,
    /// Remembered "not found" answers.
    pub negative: negative::Negative,
    /// Per-key locks for coalescing.
    pub locks: locks::KeyLocks,
    /// Blob downloads in flight, by digest.
    pub downloads: Mutex<HashMap<String, Arc<Download<E>>>>,
    /// The settings.
    pub config: CacheConfig,
}

impl<E: Clone> Cache<E> {
    /// Opens (creating if needed) the cache under `config.dir`. Leftovers of
    /// interrupted downloads are deleted; committed objects are indexed.
    pub fn open(config: &CacheConfig) -> Result<Self, CacheError> {
        let store = Store::open(
            &config.dir.join("objects"),
            &config.dir.join("tmp"),
            config.max_size.as_u64(),
        )?;
        let tags = Tags::open(&config.dir.join("tags"))?;
        Ok(Self {
            store: Arc::new(store),
            tags,
            negative: negative::Negative::new(config.negative_ttl),
            locks: locks::KeyLocks::default(),
            downloads: Mutex::new(HashMap::new()),
            config: config.clone(),
        })
    }
}
