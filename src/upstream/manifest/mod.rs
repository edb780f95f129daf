//! Manifest operations: fetch (with platform resolution) and head, through
//! the cache. Manifests by digest are immutable and served from the store
//! when this route is known to hold them. A tag resolves through a tag entry:
//! fresh entries are served as they are; stale ones are served while a
//! background refresh asks the upstream again (stale-while-revalidate), up to
//! `stale_if_error` old; older ones are fetched before answering.

mod fetch;
mod tag;

use std::sync::Arc;

use bytes::Bytes;

use super::client::Upstream;
use super::distribution::{display_ref, media_types_or_default};
use super::failover::try_in_order;
use super::routing::{Route, holder_for, known_holder};
use super::{Engine, EngineCache, Error, Fault, Source};
use crate::cache::{Freshness, LockKey, NegativeKey, TagKey};
use crate::metrics::{LookupKind, LookupResult};
use crate::oci::manifest::select_platform;
use crate::oci::{Digest, MediaType, Platform, Reference, Repository};
use fetch::{get_manifest, head_manifest_at};
use tag::TagRefresh;

/// A request for a manifest.
#[derive(Debug, Clone)]
pub struct ManifestRequest {
    /// The repository, as the caller named it.
    pub repository: Repository,
    /// Tag or digest.
    pub reference: Reference,
    /// Acceptable media types; empty means every OCI and Docker v2 type.
    pub accept: Vec<MediaType>,
    /// Resolve an index to this platform's manifest.
    pub platform: Option<Platform>,
    /// Which upstreams to ask.
    pub route: Route,
}

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The bytes exactly as the upstream sent them.
    pub bytes: Bytes,
    /// Its media type.
    pub media_type: MediaType,
    /// Its digest, computed over `bytes`.
    pub digest: Digest,
    /// Where it came from.
    pub source: Source,
}

/// What a HEAD learned about a manifest.
#[derive(Debug, Clone)]
pub struct ManifestMeta {
    /// Its media type.
    pub media_type: MediaType,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Where the answer came from.
    pub source: Source,
}

impl From<Manifest> for ManifestMeta {
    fn from(m: Manifest) -> Self {
        Self {
            size: m.bytes.len() as u64,
            media_type: m.media_type,
            digest: m.digest,
            source: m.source,
        }
    }
}

impl Engine {
    /// Fetches a manifest; with a platform, resolves an index to that
    /// platform's manifest (fetched from the upstream that served the index).
    pub async fn fetch_manifest(&self, req: ManifestRequest) -> Result<Manifest, Error> {
        let candidates = self.router.candidates(&req.repository, &req.route)?;
        let accept = media_types_or_default(&req.accept);
        let manifest = match &req.reference {
            Reference::Digest(digest) => {
                self.manifest_by_digest(&candidates, &req.repository, digest, &accept)
                    .await?
            }
            Reference::Tag(tag) => {
                let key = TagKey::new(&req.repository, tag, req.route.key().as_deref(), &accept);
                let refresh = TagRefresh {
                    cache: self.cache.clone(),
                    limits: self.limits,
                    candidates: candidates.clone(),
                    repository: req.repository.clone(),
                    tag: tag.clone(),
                    accept: accept.clone(),
                    key,
                };
                self.manifest_by_tag(refresh).await?
            }
        };
        let Some(platform) = &req.platform else {
            return Ok(manifest);
        };
        if !manifest.media_type.is_index() {
            return Ok(manifest);
        }
        let child = select_platform(&manifest.bytes, platform)
            .map_err(|e| {
                Error::from_fault(Fault::unavailable(format!(
                    "upstream `{}` sent an unusable index for {}: {e}",
                    manifest.source.upstream,
                    display_ref(&req.repository, &req.reference)
                )))
            })?
            .ok_or_else(|| Error::PlatformNotFound {
                reference: display_ref(&req.repository, &req.reference),
                upstream: manifest.source.upstream.clone(),
                platform: platform.clone(),
            })?;
        tracing::debug!(%child, %platform, "resolved index to platform manifest");
        let origin: Vec<_> = candidates
            .iter()
            .filter(|c| c.name() == manifest.source.upstream)
            .cloned()
            .collect();
        let all = media_types_or_default(&[]);
        self.manifest_by_digest(&origin, &req.repository, &child, &all)
            .await
    }

    /// Tells whether a manifest exists, from the cache when it can. `Ok(None)`
    /// only when every eligible upstream answered "not found".
    pub async fn head_manifest(&self, req: ManifestRequest) -> Result<Option<ManifestMeta>, Error> {
        let candidates = self.router.candidates(&req.repository, &req.route)?;
        let accept = media_types_or_default(&req.accept);
        let mut stale = None;
        let mut tag_key = None;
        match &req.reference {
            Reference::Digest(digest) => {
                if let Some(m) = self
                    .cached_manifest(&candidates, &req.repository, digest)
                    .await
                {
                    self.metrics.lookup(LookupKind::Manifest, LookupResult::Hit);
                    return Ok(Some(m.into()));
                }
                self.metrics
                    .lookup(LookupKind::Manifest, LookupResult::Miss);
            }
            Reference::Tag(tag) => {
                let key = TagKey::new(&req.repository, tag, req.route.key().as_deref(), &accept);
                let entry = tag::entry(&self.cache, &key, &candidates);
                tag_key = Some(key);
                if let Some((entry, freshness)) = entry {
                    let meta = self
                        .cache
                        .object(&entry.digest)
                        .await
                        .map(|object| ManifestMeta {
                            media_type: entry.media_type.clone(),
                            digest: entry.digest.clone(),
                            size: object.size,
                            source: Source::cached(&entry.upstream),
                        });
                    match freshness {
                        Freshness::Fresh if meta.is_some() => {
                            self.metrics.lookup(LookupKind::Tag, LookupResult::Hit);
                            return Ok(meta);
                        }
                        Freshness::Fresh | Freshness::Stale => stale = meta,
                        Freshness::Expired => {}
                    }
                }
                self.metrics.lookup(LookupKind::Tag, LookupResult::Miss);
            }
        }
        let key = NegativeKey::Manifest(req.repository.clone(), req.reference.clone());
        let (repository, reference, accept) = (&req.repository, &req.reference, &accept[..]);
        let found = try_in_order(&self.cache, &candidates, &key, |upstream| async move {
            head_manifest_at(&upstream, self.limits, repository, reference, accept).await
        })
        .await;
        match found {
            Ok((_, meta)) => Ok(Some(meta)),
            Err(Error::NotFound(_)) => {
                if let Some(key) = &tag_key {
                    tag::forget(&self.cache, key).await;
                }
                Ok(None)
            }
            Err(e) => match stale {
                Some(meta) => {
                    tracing::warn!(error = %e, "every upstream failed; answering from a stale tag entry");
                    Ok(Some(meta))
                }
                None => Err(e),
            },
        }
    }

    /// The manifest from the store, if this route is known to hold it.
    async fn cached_manifest(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
    ) -> Option<Manifest> {
        let object = self.cache.object(digest).await?;
        let holder = known_holder(candidates, repository, &object.holders)?;
        read_stored(&self.cache, digest, holder.name()).await
    }

    async fn manifest_by_digest(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
        accept: &[MediaType],
    ) -> Result<Manifest, Error> {
        if let Some(m) = self.cached_manifest(candidates, repository, digest).await {
            self.metrics.lookup(LookupKind::Manifest, LookupResult::Hit);
            return Ok(m);
        }
        let _guard = self.cache.lock(&LockKey::Manifest(digest.clone())).await;
        if let Some(m) = self.cached_manifest(candidates, repository, digest).await {
            self.metrics.lookup(LookupKind::Manifest, LookupResult::Hit);
            return Ok(m);
        }
        self.metrics
            .lookup(LookupKind::Manifest, LookupResult::Miss);
        let reference = Reference::Digest(digest.clone());
        let key = NegativeKey::Manifest(repository.clone(), reference.clone());
        let reference = &reference;
        if self.cache.object(digest).await.is_some() {
            // Cached, but not known to be on this route: confirm first.
            let (upstream, _) =
                try_in_order(&self.cache, candidates, &key, |upstream| async move {
                    head_manifest_at(&upstream, self.limits, repository, reference, accept).await
                })
                .await?;
            self.cache
                .add_holder(digest, holder_for(&upstream, repository))
                .await?;
            if let Some(m) = read_stored(&self.cache, digest, upstream.name()).await {
                return Ok(m);
            }
        }
        let (upstream, manifest) =
            try_in_order(&self.cache, candidates, &key, |upstream| async move {
                get_manifest(&upstream, self.limits, repository, reference, accept).await
            })
            .await?;
        store_manifest(&self.cache, &manifest, &upstream, repository).await;
        Ok(manifest)
    }

    /// A manifest by tag: a fresh entry as it is; a stale one at once while
    /// a background refresh asks again; else (or when the stored manifest
    /// is gone) from the upstreams, one caller per tag at a time.
    async fn manifest_by_tag(&self, refresh: TagRefresh) -> Result<Manifest, Error> {
        let candidates = &refresh.candidates;
        if let Some((entry, freshness)) = tag::entry(&self.cache, &refresh.key, candidates) {
            if freshness != Freshness::Expired {
                if let Some(m) = read_stored(&self.cache, &entry.digest, &entry.upstream).await {
                    if freshness == Freshness::Stale {
                        self.metrics.lookup(LookupKind::Tag, LookupResult::Stale);
                        self.spawn_background(refresh.in_background());
                    } else {
                        self.metrics.lookup(LookupKind::Tag, LookupResult::Hit);
                    }
                    return Ok(m);
                }
            }
        }
        let _guard = self.cache.lock(&LockKey::Tag(refresh.key.clone())).await;
        if let Some((entry, Freshness::Fresh)) = tag::entry(&self.cache, &refresh.key, candidates) {
            if let Some(m) = read_stored(&self.cache, &entry.digest, &entry.upstream).await {
                self.metrics.lookup(LookupKind::Tag, LookupResult::Hit);
                return Ok(m);
            }
        }
        self.metrics.lookup(LookupKind::Tag, LookupResult::Miss);
        refresh.run().await
    }
}

/// Reads a stored manifest; `None` if it is gone (evicted) or unreadable.
async fn read_stored(cache: &EngineCache, digest: &Digest, upstream: &str) -> Option<Manifest> {
    let (media_type, bytes) = cache.read_manifest(digest).await?;
    Some(Manifest {
        bytes,
        media_type,
        digest: digest.clone(),
        source: Source::cached(upstream),
    })
}

/// Stores a verified manifest; false (logged) when the store failed.
async fn store_manifest(
    cache: &EngineCache,
    manifest: &Manifest,
    upstream: &Upstream,
    repository: &Repository,
) -> bool {
    let stored = cache
        .put_manifest(
            &manifest.digest,
            manifest.bytes.clone(),
            &manifest.media_type,
            holder_for(upstream, repository),
        )
        .await;
    match stored {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %crate::telemetry::describe(&e), "manifest not cached");
            false
        }
    }
}
