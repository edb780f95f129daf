//! Tags: the usable entry of a tag for a route, and [`TagRefresh`], which
//! asks the upstreams for a tag and records the answer (in the foreground on
//! a miss, in the background for a stale entry). A background refresh asks
//! with HEAD first and GETs only when the tag's digest changed (or the HEAD
//! could not tell): Docker Hub counts manifest GETs, not HEADs, against its
//! pull limits, and most stale tags have not moved.

use std::sync::Arc;
use std::time::SystemTime;

use super::super::client::Upstream;
use super::super::failover::try_in_order;
use super::super::{EngineCache, Error, Limits};
use super::fetch::head_digest;
use super::{Manifest, get_manifest, store_manifest};
use crate::cache::{Freshness, LockKey, NegativeKey, TagEntry, TagKey};
use crate::oci::{Digest, MediaType, Reference, Repository, Tag};

/// A tag entry, parsed.
pub(super) struct TagHit {
    pub(super) digest: Digest,
    pub(super) media_type: MediaType,
    pub(super) upstream: String,
}

/// The entry for `key` and its freshness now, if it names a manifest from
/// one of the candidates.
pub(super) fn entry(
    cache: &EngineCache,
    key: &TagKey,
    candidates: &[Arc<Upstream>],
) -> Option<(TagHit, Freshness)> {
    let (entry, freshness) = cache.tag(key, SystemTime::now())?;
    if !candidates.iter().any(|c| c.name() == entry.upstream) {
        return None;
    }
    let hit = TagHit {
        digest: Digest::parse(&entry.digest).ok()?,
        media_type: MediaType::parse(&entry.media_type).ok()?,
        upstream: entry.upstream,
    };
    Some((hit, freshness))
}

/// Drops the entry of a tag every candidate says is gone: its old digest
/// must not be served again, not even as stale.
pub(super) async fn forget(cache: &EngineCache, key: &TagKey) {
    if let Err(e) = cache.drop_tag(key).await {
        tracing::warn!(error = %crate::telemetry::describe(&e), "tag entry not dropped");
    }
}

/// Everything a tag refresh needs, owned, so it can run in the background.
pub(super) struct TagRefresh {
    pub(super) cache: Arc<EngineCache>,
    pub(super) limits: Limits,
    pub(super) candidates: Vec<Arc<Upstream>>,
    pub(super) repository: Repository,
    pub(super) tag: Tag,
    pub(super) accept: Vec<MediaType>,
    pub(super) key: TagKey,
}

impl TagRefresh {
    /// Asks the upstreams for the tag and records the answer.
    pub(super) async fn run(&self) -> Result<Manifest, Error> {
        let reference = Reference::Tag(self.tag.clone());
        let key = NegativeKey::Manifest(self.repository.clone(), reference.clone());
        let (reference, repository, accept, limits) =
            (&reference, &self.repository, &self.accept[..], self.limits);
        let found = try_in_order(&self.cache, &self.candidates, &key, |upstream| async move {
            get_manifest(&upstream, limits, repository, reference, accept).await
        })
        .await;
        let (upstream, manifest) = match found {
            Ok(found) => found,
            Err(e) => {
                if matches!(e, Error::NotFound(_)) {
                    forget(&self.cache, &self.key).await;
                }
                return Err(e);
            }
        };
        if store_manifest(&self.cache, &manifest, &upstream, repository).await {
            let entry = TagEntry {
                digest: manifest.digest.to_string(),
                media_type: manifest.media_type.to_string(),
                upstream: upstream.name().to_owned(),
                fetched_at_ms: TagEntry::millis(SystemTime::now()),
            };
            if let Err(e) = self.cache.put_tag(&self.key, entry).await {
                tracing::warn!(error = %crate::telemetry::describe(&e), "tag entry not saved");
            }
        }
        Ok(manifest)
    }

    /// The refresh as background work, skipped when a refresh (or a fetch)
    /// of the tag is already running: a HEAD, then a GET only if the tag
    /// moved.
    pub(super) async fn in_background(self) {
        let Some(_guard) = self.cache.try_lock(&LockKey::Tag(self.key.clone())) else {
            return;
        };
        let outcome = match self.revalidate().await {
            Ok(true) => {
                tracing::debug!(tag = %self.tag, "tag unchanged (HEAD); entry renewed");
                return;
            }
            Ok(false) => self.run().await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(m) => tracing::debug!(tag = %self.tag, digest = %m.digest, "tag refreshed"),
            Err(e) => {
                tracing::info!(tag = %self.tag, error = %e, "tag refresh failed; serving the stale entry")
            }
        }
    }

    /// Asks the candidates with HEAD whether the tag still names the
    /// entry's digest on the entry's upstream, and if so renews the entry
    /// (same digest and media type, fetched now): true. False when a GET
    /// must tell: the digest changed, another upstream answered, or the
    /// HEAD gave no usable digest or failed. An error when every upstream
    /// says the tag is gone (its entry is dropped) or rate-limits us (a GET
    /// would be refused too).
    async fn revalidate(&self) -> Result<bool, Error> {
        let Some((hit, _)) = entry(&self.cache, &self.key, &self.candidates) else {
            return Ok(false);
        };
        let reference = Reference::Tag(self.tag.clone());
        let key = NegativeKey::Manifest(self.repository.clone(), reference.clone());
        let (reference, repository, accept) = (&reference, &self.repository, &self.accept[..]);
        let found = try_in_order(&self.cache, &self.candidates, &key, |upstream| async move {
            head_digest(&upstream, repository, reference, accept).await
        })
        .await;
        let (upstream, digest) = match found {
            Ok(found) => found,
            Err(e @ Error::NotFound(_)) => {
                forget(&self.cache, &self.key).await;
                return Err(e);
            }
            Err(e @ Error::RateLimited { .. }) => return Err(e),
            Err(e) => {
                tracing::debug!(tag = %self.tag, error = %e, "HEAD refresh failed; asking with GET");
                return Ok(false);
            }
        };
        if digest.as_ref() != Some(&hit.digest) || upstream.name() != hit.upstream {
            return Ok(false);
        }
        let entry = TagEntry {
            digest: hit.digest.to_string(),
            media_type: hit.media_type.to_string(),
            upstream: hit.upstream,
            fetched_at_ms: TagEntry::millis(SystemTime::now()),
        };
        if let Err(e) = self.cache.put_tag(&self.key, entry).await {
            tracing::warn!(error = %crate::telemetry::describe(&e), "tag entry not renewed");
        }
        Ok(true)
    }
}
