//! Manifest operations: fetch (with platform resolution) and head, through
//! the cache. Manifests by digest are immutable and served from the store
//! when this route is known to hold them. A tag resolves through a tag entry:
//! fresh entries are served as they are; stale ones are served while a
//! background refresh asks the upstream again (stale-while-revalidate), up to
//! `stale_if_error` old; older ones are fetched before answering.

mod fetch;

use std::sync::Arc;

use bytes::Bytes;

use super::client::Upstream;
use super::distribution::{display_ref, media_types_or_default};
use super::failover::try_in_order;
use super::routing::{holder_for, known_holder};
use super::{Engine, EngineCache, Error, Fault, Limits, Source, cache_error};
use crate::cache::TagEntry;
use crate::oci::manifest::select_platform;
use crate::oci::{Digest, MediaType, Platform, Reference, Repository, Tag};
use fetch::{get_manifest, head_manifest_at};

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
    /// Ask only this upstream.
    pub upstream: Option<String>,
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

/// How fresh a tag entry is.
enum Freshness {
    Fresh,
    /// Servable while a refresh runs.
    Stale,
    /// Older than `stale_if_error`: never served.
    Expired,
}

impl Engine {
    /// Fetches a manifest; with a platform, resolves an index to that
    /// platform's manifest (fetched from the upstream that served the index).
    #[tracing::instrument(skip_all, fields(repository = %req.repository, reference = %req.reference))]
    pub async fn fetch_manifest(&self, req: ManifestRequest) -> Result<Manifest, Error> {
        let candidates = self
            .router
            .candidates(&req.repository, req.upstream.as_deref())?;
        let accept = media_types_or_default(&req.accept);
        let manifest = match &req.reference {
            Reference::Digest(digest) => {
                self.manifest_by_digest(&candidates, &req.repository, digest, &accept)
                    .await?
            }
            Reference::Tag(tag) => {
                self.manifest_by_tag(&candidates, &req, tag, &accept)
                    .await?
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
    #[tracing::instrument(skip_all, fields(repository = %req.repository, reference = %req.reference))]
    pub async fn head_manifest(&self, req: ManifestRequest) -> Result<Option<ManifestMeta>, Error> {
        let candidates = self
            .router
            .candidates(&req.repository, req.upstream.as_deref())?;
        let accept = media_types_or_default(&req.accept);
        let mut stale = None;
        match &req.reference {
            Reference::Digest(digest) => {
                if let Some(m) = self
                    .cached_manifest(&candidates, &req.repository, digest)
                    .await
                {
                    return Ok(Some(m.into()));
                }
            }
            Reference::Tag(tag) => {
                let key = tag_key(&req.repository, tag, req.upstream.as_deref(), &accept);
                if let Some((entry, digest, freshness)) = self.tag_entry(&key, &candidates) {
                    let meta = self.cache.store.lookup(&digest).and_then(|object| {
                        Some(ManifestMeta {
                            media_type: MediaType::parse(&entry.media_type).ok()?,
                            digest,
                            size: object.size,
                            source: Source::cached(&entry.upstream),
                        })
                    });
                    match freshness {
                        Freshness::Fresh if meta.is_some() => return Ok(meta),
                        Freshness::Fresh | Freshness::Stale => stale = meta,
                        Freshness::Expired => {}
                    }
                }
            }
        }
        let key = format!(
            "manifest `{}`",
            display_ref(&req.repository, &req.reference)
        );
        let (repository, reference, accept) = (&req.repository, &req.reference, &accept[..]);
        let found = try_in_order(
            &self.cache.negative,
            &candidates,
            &key,
            |upstream| async move {
                head_manifest_at(&upstream, self.limits, repository, reference, accept).await
            },
        )
        .await;
        match found {
            Ok((_, meta)) => Ok(Some(meta)),
            Err(Error::NotFound(_)) => Ok(None),
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
        let object = self.cache.store.lookup(digest)?;
        let upstream = known_holder(candidates, repository, &object.holders)?;
        read_stored(&self.cache, digest, upstream.name()).await
    }

    async fn manifest_by_digest(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
        accept: &[MediaType],
    ) -> Result<Manifest, Error> {
        if let Some(m) = self.cached_manifest(candidates, repository, digest).await {
            return Ok(m);
        }
        let _guard = self.cache.locks.lock(&format!("manifest {digest}")).await;
        if let Some(m) = self.cached_manifest(candidates, repository, digest).await {
            return Ok(m);
        }
        let reference = Reference::Digest(digest.clone());
        let key = format!("manifest `{}`", display_ref(repository, &reference));
        if self.cache.store.lookup(digest).is_some() {
            // Cached, but not known to be on this route: confirm first.
            let reference = &reference;
            let (upstream, _) = try_in_order(
                &self.cache.negative,
                candidates,
                &key,
                |upstream| async move {
                    head_manifest_at(&upstream, self.limits, repository, reference, accept).await
                },
            )
            .await?;
            self.cache
                .store
                .add_holder(digest, holder_for(&upstream, repository))
                .map_err(cache_error)?;
            if let Some(m) = read_stored(&self.cache, digest, upstream.name()).await {
                return Ok(m);
            }
        }
        let reference = &reference;
        let (upstream, manifest) = try_in_order(
            &self.cache.negative,
            candidates,
            &key,
            |upstream| async move {
                get_manifest(&upstream, self.limits, repository, reference, accept).await
            },
        )
        .await?;
        store_manifest(&self.cache, &manifest, &upstream, repository).await;
        Ok(manifest)
    }

    async fn manifest_by_tag(
        &self,
        candidates: &[Arc<Upstream>],
        req: &ManifestRequest,
        tag: &Tag,
        accept: &[MediaType],
    ) -> Result<Manifest, Error> {
        let key = tag_key(&req.repository, tag, req.upstream.as_deref(), accept);
        let refresh = TagRefresh {
            cache: self.cache.clone(),
            limits: self.limits,
            candidates: candidates.to_vec(),
            repository: req.repository.clone(),
            tag: tag.clone(),
            accept: accept.to_vec(),
            key: key.clone(),
        };
        if let Some((entry, digest, freshness)) = self.tag_entry(&key, candidates) {
            let fresh = matches!(freshness, Freshness::Fresh);
            if !matches!(freshness, Freshness::Expired) {
                if let Some(m) = read_stored(&self.cache, &digest, &entry.upstream).await {
                    if !fresh {
                        refresh.spawn();
                    }
                    return Ok(m);
                }
            }
        }
        let _guard = self.cache.locks.lock(&key).await;
        if let Some((entry, digest, Freshness::Fresh)) = self.tag_entry(&key, candidates) {
            if let Some(m) = read_stored(&self.cache, &digest, &entry.upstream).await {
                return Ok(m);
            }
        }
        refresh.run().await
    }

    /// The tag entry for `key`, if it names a digest from one of the
    /// candidates, with its freshness.
    fn tag_entry(
        &self,
        key: &str,
        candidates: &[Arc<Upstream>],
    ) -> Option<(TagEntry, Digest, Freshness)> {
        let entry = self.cache.tags.get(key)?;
        let digest = Digest::parse(&entry.digest).ok()?;
        if !candidates.iter().any(|c| c.name() == entry.upstream) {
            return None;
        }
        let age = entry.age();
        let freshness = if age < self.cache.config.tag_ttl {
            Freshness::Fresh
        } else if age < self.cache.config.stale_if_error {
            Freshness::Stale
        } else {
            Freshness::Expired
        };
        Some((entry, digest, freshness))
    }
}

/// The cache key of a tag entry: what was asked, of which upstreams, with
/// which acceptable types (the answer may depend on them).
fn tag_key(
    repository: &Repository,
    tag: &Tag,
    upstream: Option<&str>,
    accept: &[MediaType],
) -> String {
    let accept: Vec<&str> = accept.iter().map(MediaType::as_str).collect();
    format!(
        "{repository}:{tag} upstream={} accept={}",
        upstream.unwrap_or("*"),
        accept.join(",")
    )
}

/// Everything a tag refresh needs, owned, so it can run in the background.
struct TagRefresh {
    cache: Arc<EngineCache>,
    limits: Limits,
    candidates: Vec<Arc<Upstream>>,
    repository: Repository,
    tag: Tag,
    accept: Vec<MediaType>,
    key: String,
}

impl TagRefresh {
    /// Asks the upstreams for the tag and records the answer.
    async fn run(&self) -> Result<Manifest, Error> {
        let reference = Reference::Tag(self.tag.clone());
        let key = format!("manifest `{}`", display_ref(&self.repository, &reference));
        let (reference, repository, accept, limits) =
            (&reference, &self.repository, &self.accept[..], self.limits);
        let (upstream, manifest) = try_in_order(
            &self.cache.negative,
            &self.candidates,
            &key,
            |upstream| async move {
                get_manifest(&upstream, limits, repository, reference, accept).await
            },
        )
        .await?;
        if store_manifest(&self.cache, &manifest, &upstream, repository).await {
            let entry = TagEntry {
                digest: manifest.digest.to_string(),
                media_type: manifest.media_type.to_string(),
                upstream: upstream.name().to_owned(),
                fetched_at_ms: TagEntry::now_ms(),
            };
            if let Err(e) = self.cache.tags.put(&self.key, entry) {
                tracing::warn!(error = %e, "tag entry not saved");
            }
        }
        Ok(manifest)
    }

    /// Refreshes in the background, unless a refresh of the tag is running.
    fn spawn(self) {
        tokio::spawn(async move {
            let Some(_guard) = self.cache.locks.try_lock(&self.key) else {
                return;
            };
            match self.run().await {
                Ok(m) => tracing::debug!(tag = %self.tag, digest = %m.digest, "tag refreshed"),
                Err(e) => {
                    tracing::info!(tag = %self.tag, error = %e, "tag refresh failed; serving the stale entry")
                }
            }
        });
    }
}

/// Reads a stored manifest; `None` if it is gone (evicted) or unreadable.
async fn read_stored(cache: &EngineCache, digest: &Digest, upstream: &str) -> Option<Manifest> {
    let media_type = cache.store.lookup(digest)?.media_type?;
    let bytes = cache.store.read_small(digest).await?;
    Some(Manifest {
        bytes,
        media_type,
        digest: digest.clone(),
        source: Source::cached(upstream),
    })
}

/// Stores a verified manifest; false (logged) when the store failed.
async fn store_manifest(
    cache: &Arc<EngineCache>,
    manifest: &Manifest,
    upstream: &Upstream,
    repository: &Repository,
) -> bool {
    let store = cache.store.clone();
    let (digest, bytes, media_type, holder) = (
        manifest.digest.clone(),
        manifest.bytes.clone(),
        manifest.media_type.clone(),
        holder_for(upstream, repository),
    );
    let result =
        tokio::task::spawn_blocking(move || store.put(&digest, bytes, &media_type, holder)).await;
    match result {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "manifest not cached");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "cache task failed");
            false
        }
    }
}
