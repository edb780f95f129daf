//! Blob operations: a verifying stream of a blob or a range of it, and head.
//!
//! Every blob reaches callers through the cache. On a miss, one download
//! task per digest reads the upstream body, hashes every byte and appends it
//! to a temp file; when the digest passes, the file is committed to the
//! store. Each caller (the first and any that join while the download runs)
//! has a reader task that follows the file as it grows and forwards the
//! requested range in messages of at most [`CHUNK_SIZE`] bytes through a
//! small bounded channel. A reader holds its last data message back until
//! the download is verified, so a caller never holds a complete-looking range
//! of a wrong blob: a mismatch ends the stream with [`Error::DataLoss`]
//! instead. Memory per stream is a few chunks, whatever the blob's size; a
//! reader stops when its caller goes away, and the download goes on to fill
//! the cache for the others.

mod download;
mod rate;
mod reader;

use std::sync::Arc;

use bytes::Bytes;
use reqwest::Method;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::client::Upstream;
use super::failover::try_in_order;
use super::routing::{Route, holder_for, known_holder};
use super::{Engine, Error, Source};
use crate::cache::{Download, LockKey, NegativeKey, Progress, Reader};
use crate::metrics::{ByteSource, LookupKind, LookupResult};
use crate::oci::{Digest, Repository};
use download::{Resume, fill, open_blob};
use reader::read_range;

/// Largest data message (the contract allows up to 1 MiB).
pub const CHUNK_SIZE: usize = 128 * 1024;
/// Messages buffered between a reader and its caller.
const CHANNEL_DEPTH: usize = 2;

/// A byte range of a blob: from `offset`, at most `length` bytes (`None`:
/// to the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobRange {
    /// First byte.
    pub offset: u64,
    /// Maximum length; `None` means to the end.
    pub length: Option<u64>,
}

/// A request for a blob.
#[derive(Debug, Clone)]
pub struct BlobRequest {
    /// The repository, as the caller named it.
    pub repository: Repository,
    /// The blob's digest.
    pub digest: Digest,
    /// The range wanted.
    pub range: BlobRange,
    /// Which upstreams to ask.
    pub route: Route,
}

/// Facts about a blob, known before its bytes.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    /// The digest.
    pub digest: Digest,
    /// Size of the whole blob.
    pub size: u64,
    /// Where it comes from.
    pub source: Source,
}

/// Bytes of a blob, starting at `offset`.
#[derive(Debug, Clone)]
pub struct BlobChunk {
    /// Position of `data[0]` in the blob.
    pub offset: u64,
    /// The bytes (at most [`CHUNK_SIZE`]).
    pub data: Bytes,
}

/// A blob being streamed: its info, then verified chunks. An `Err` item ends
/// the stream; the caller must discard what it received.
#[derive(Debug)]
pub struct BlobStream {
    /// Facts about the blob.
    pub info: BlobInfo,
    /// The requested range, in order.
    pub chunks: ReceiverStream<Result<BlobChunk, Error>>,
}

/// What a HEAD learned about a blob.
#[derive(Debug, Clone)]
pub struct BlobMeta {
    /// The digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Where the answer came from.
    pub source: Source,
}

/// Where a caller's bytes come from: a committed object, or a download in
/// flight (started by this caller or joined), with its progress.
struct Origin {
    reader: Reader<Error>,
    size: u64,
    progress: watch::Receiver<Progress<Error>>,
    upstream: String,
    /// True when the bytes are local already (a committed object, or a
    /// verified download on its way into the store).
    cache_hit: bool,
}

impl Origin {
    /// Bytes from the cache: a committed object, or one on its way from
    /// the shared tier into the disk store.
    fn stored(reader: Reader<Error>, size: u64, upstream: &str) -> Self {
        Self {
            progress: reader.progress(),
            reader,
            size,
            upstream: upstream.to_owned(),
            cache_hit: true,
        }
    }

    fn following(reader: Reader<Error>, download: &Download<Error>, upstream: &str) -> Self {
        Self {
            reader,
            size: download.size,
            progress: download.subscribe(),
            upstream: upstream.to_owned(),
            cache_hit: download.is_verified(),
        }
    }
}

impl Engine {
    /// Starts streaming a blob (or a range of it): from the cache when this
    /// route is known to hold it, else from the first upstream that has it
    /// (joining a download of the same blob already under way).
    pub async fn fetch_blob(&self, req: BlobRequest) -> Result<BlobStream, Error> {
        let candidates = self.router.candidates(&req.repository, &req.route)?;
        let origin = self
            .blob_origin(&candidates, &req.repository, &req.digest)
            .await;
        let hit = origin.as_ref().is_ok_and(|o| o.cache_hit);
        self.metrics.lookup(
            LookupKind::Blob,
            if hit {
                LookupResult::Hit
            } else {
                LookupResult::Miss
            },
        );
        let origin = origin?;
        let size = origin.size;
        let BlobRange { offset, length } = req.range;
        if offset > size {
            return Err(Error::OutOfRange {
                digest: req.digest,
                offset,
                size,
            });
        }
        let end = length.map_or(size, |len| offset.saturating_add(len).min(size));
        let source = Source {
            upstream: origin.upstream,
            cache_hit: origin.cache_hit,
        };
        tracing::debug!(cache_hit = source.cache_hit, upstream = %source.upstream, size, "streaming blob");
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let served = self.metrics.bytes_served(if source.cache_hit {
            ByteSource::Cache
        } else {
            ByteSource::Upstream
        });
        tokio::spawn(read_range(
            origin.reader,
            origin.progress,
            (offset, end),
            tx,
            served,
        ));
        Ok(BlobStream {
            info: BlobInfo {
                digest: req.digest,
                size,
                source,
            },
            chunks: ReceiverStream::new(rx),
        })
    }

    /// Tells whether a blob exists, from the cache when this route is known
    /// to hold it. `Ok(None)` only when every eligible upstream answered "not
    /// found".
    pub async fn head_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        route: &Route,
    ) -> Result<Option<BlobMeta>, Error> {
        let candidates = self.router.candidates(repository, route)?;
        let cached = |size, holder: &Upstream| BlobMeta {
            digest: digest.clone(),
            size,
            source: Source::cached(holder.name()),
        };
        let hit = |meta| {
            self.metrics.lookup(LookupKind::Blob, LookupResult::Hit);
            Ok(Some(meta))
        };
        if let Some(object) = self.cache.object(digest).await {
            if let Some(holder) = known_holder(&candidates, repository, &object.holders) {
                return hit(cached(object.size, holder));
            }
        }
        // Verified and on its way into the store.
        if let Some(download) = self.cache.download(digest).filter(|d| d.is_verified()) {
            if let Some(holder) = known_holder(&candidates, repository, &download.holders) {
                return hit(cached(download.size, holder));
            }
        }
        self.metrics.lookup(LookupKind::Blob, LookupResult::Miss);
        match self.head_blob_in(&candidates, repository, digest).await {
            Ok((upstream, meta)) => {
                self.cache
                    .add_holder(digest, holder_for(&upstream, repository))
                    .await?;
                Ok(Some(meta))
            }
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn head_blob_in(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
    ) -> Result<(Arc<Upstream>, BlobMeta), Error> {
        let key = NegativeKey::Blob(repository.clone(), digest.clone());
        try_in_order(&self.cache, candidates, &key, |upstream| async move {
            let (_, size) = open_blob(&upstream, Method::HEAD, repository, digest).await?;
            Ok(BlobMeta {
                digest: digest.clone(),
                size,
                source: Source::fetched(&upstream),
            })
        })
        .await
    }

    /// The committed object or download this route may read, if any.
    async fn known_origin(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
    ) -> Option<Origin> {
        if let Some(object) = self.cache.object(digest).await {
            if let Some(holder) = known_holder(candidates, repository, &object.holders) {
                if let Some(reader) = self.cache.open_object(digest, &object).await {
                    return Some(Origin::stored(reader, object.size, holder.name()));
                }
            }
        }
        let download = self.cache.download(digest)?;
        let holder = known_holder(candidates, repository, &download.holders)?;
        self.join(&download, holder.name())
    }

    /// Reads a download's bytes as they arrive.
    fn join(&self, download: &Arc<Download<Error>>, upstream: &str) -> Option<Origin> {
        let reader = self.cache.join(download).ok()?;
        self.metrics.download_joined();
        Some(Origin::following(reader, download, upstream))
    }

    async fn blob_origin(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
    ) -> Result<Origin, Error> {
        if let Some(origin) = self.known_origin(candidates, repository, digest).await {
            return Ok(origin);
        }
        // Concurrent misses for one digest wait here for the first caller's
        // download to start, then join it.
        let _guard = self.cache.lock(&LockKey::Blob(digest.clone())).await;
        if let Some(origin) = self.known_origin(candidates, repository, digest).await {
            return Ok(origin);
        }
        let present = self.cache.object(digest).await.is_some();
        if present || self.cache.download(digest).is_some() {
            // Cached, but not known to be on this route: an upstream of this
            // route must confirm it has the blob before we serve our copy.
            let (upstream, _) = self.head_blob_in(candidates, repository, digest).await?;
            self.cache
                .add_holder(digest, holder_for(&upstream, repository))
                .await?;
            // Read again: its holders now include this route.
            if let Some(object) = self.cache.object(digest).await {
                if let Some(reader) = self.cache.open_object(digest, &object).await {
                    return Ok(Origin::stored(reader, object.size, upstream.name()));
                }
            }
            if let Some(origin) = self
                .cache
                .download(digest)
                .and_then(|d| self.join(&d, upstream.name()))
            {
                return Ok(origin);
            }
        }
        let key = NegativeKey::Blob(repository.clone(), digest.clone());
        let (upstream, (response, size)) =
            try_in_order(&self.cache, candidates, &key, |upstream| async move {
                open_blob(&upstream, Method::GET, repository, digest).await
            })
            .await?;
        let (download, writer) = self.cache.start_download(
            digest,
            size,
            holder_for(&upstream, repository),
            digest.algorithm().verifier(),
        )?;
        let reader = self.cache.join(&download)?;
        let origin = Origin::following(reader, &download, upstream.name());
        let resume = Resume {
            candidates: candidates.to_vec(),
            repository: repository.clone(),
            digest: digest.clone(),
        };
        self.tasks.spawn(fill(
            self.cache.clone(),
            download,
            writer,
            response,
            upstream,
            resume,
            self.stop.clone(),
        ));
        Ok(origin)
    }
}
