//! What operators ask of the engine: each upstream's configuration and
//! circuit, the cache's state and lookup counts, and evicting one object.

use super::resilience::CircuitStatus;
use super::{Engine, Error};
use crate::oci::Digest;

/// One upstream as operators see it: configuration (never credentials) and
/// circuit.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    /// The configured name.
    pub name: String,
    /// The base URL.
    pub url: String,
    /// Routing priority (lower first).
    pub priority: i64,
    /// Whether it is asked at all.
    pub enabled: bool,
    /// Include globs.
    pub repositories: Vec<String>,
    /// Exclude globs.
    pub exclude: Vec<String>,
    /// The auth `type`.
    pub auth_type: &'static str,
    /// Its circuit breaker.
    pub circuit: CircuitStatus,
}

/// The cache's state and its lookups since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Objects stored.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The size bound.
    pub max_bytes: u64,
    /// Tag entries.
    pub tags: u64,
    /// Downloads under way.
    pub downloads_in_flight: u64,
    /// Lookups answered from the cache (stale tag entries included).
    pub hits: u64,
    /// Lookups that asked an upstream.
    pub misses: u64,
}

impl Engine {
    /// Every upstream, in routing order.
    pub fn upstreams(&self) -> Vec<UpstreamStatus> {
        self.router
            .upstreams()
            .iter()
            .map(|u| UpstreamStatus {
                name: u.name().to_owned(),
                url: u.base().to_string(),
                priority: u.priority(),
                enabled: u.enabled(),
                repositories: u
                    .rules()
                    .include()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                exclude: u
                    .rules()
                    .exclude()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                auth_type: u.auth_type(),
                circuit: u.circuit().status(),
            })
            .collect()
    }

    /// The cache's state and lookup counts.
    pub fn cache_stats(&self) -> CacheStats {
        let usage = self.cache.usage();
        let (hits, misses) = self.metrics.lookup_totals();
        CacheStats {
            objects: usage.objects,
            bytes: usage.bytes,
            max_bytes: usage.max_bytes,
            tags: usage.tags,
            downloads_in_flight: usage.downloads,
            hits,
            misses,
        }
    }

    /// Removes the object `digest` and the tag entries naming it; false
    /// when the object was not stored.
    pub async fn evict(&self, digest: &Digest) -> Result<bool, Error> {
        Ok(self.cache.evict(digest).await?)
    }
}
