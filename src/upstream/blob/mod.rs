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
mod reader;

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::client::Upstream;
use super::distribution::{blob_request, fault_from_response};
use super::failover::try_in_order;
use super::http::content_length;
use super::routing::{holder_for, known_holder};
use super::{Engine, Error, Fault, Source, cache_error};
use crate::cache::download::complete;
use crate::cache::{Download, Progress, State};
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
    /// Ask only this upstream.
    pub upstream: Option<String>,
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

/// Where a caller's bytes come from.
enum Origin {
    /// A committed object in the store.
    Stored {
        file: File,
        size: u64,
        upstream: String,
    },
    /// A download in flight (started by this caller or joined).
    Download {
        file: File,
        download: Arc<Download<Error>>,
        progress: watch::Receiver<Progress<Error>>,
        upstream: String,
    },
}

impl Engine {
    /// Starts streaming a blob (or a range of it): from the cache when this
    /// route is known to hold it, else from the first upstream that has it
    /// (joining a download of the same blob already under way).
    #[tracing::instrument(skip_all, fields(repository = %req.repository, digest = %req.digest))]
    pub async fn fetch_blob(&self, req: BlobRequest) -> Result<BlobStream, Error> {
        let candidates = self
            .router
            .candidates(&req.repository, req.upstream.as_deref())?;
        let origin = self
            .blob_origin(&candidates, &req.repository, &req.digest)
            .await?;
        let (file, size, progress, download, source) = match origin {
            Origin::Stored {
                file,
                size,
                upstream,
            } => (file, size, complete(size), None, Source::cached(&upstream)),
            Origin::Download {
                file,
                download,
                progress,
                upstream,
            } => {
                // A download that already passed its digest is being synced
                // into the store: its bytes are local, so this is a hit.
                let cache_hit = matches!(progress.borrow().state, State::Verified);
                let source = Source {
                    upstream,
                    cache_hit,
                };
                (file, download.size, progress, Some(download), source)
            }
        };
        let BlobRange { offset, length } = req.range;
        if offset > size {
            return Err(Error::OutOfRange {
                digest: req.digest,
                offset,
                size,
            });
        }
        let end = length.map_or(size, |len| offset.saturating_add(len).min(size));
        tracing::debug!(cache_hit = source.cache_hit, upstream = %source.upstream, size, "streaming blob");
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        tokio::spawn(read_range(file, progress, download, offset, end, tx));
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
    #[tracing::instrument(skip_all, fields(repository = %repository, digest = %digest))]
    pub async fn head_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        upstream: Option<&str>,
    ) -> Result<Option<BlobMeta>, Error> {
        let candidates = self.router.candidates(repository, upstream)?;
        if let Some(object) = self.cache.store.lookup(digest) {
            if let Some(upstream) = known_holder(&candidates, repository, &object.holders) {
                return Ok(Some(BlobMeta {
                    digest: digest.clone(),
                    size: object.size,
                    source: Source::cached(upstream.name()),
                }));
            }
        }
        // Verified and on its way into the store.
        if let Some(download) = self.in_flight(digest) {
            let verified = matches!(download.subscribe().borrow().state, State::Verified);
            let holder = std::slice::from_ref(&download.holder);
            if let Some(upstream) =
                known_holder(&candidates, repository, holder).filter(|_| verified)
            {
                return Ok(Some(BlobMeta {
                    digest: digest.clone(),
                    size: download.size,
                    source: Source::cached(upstream.name()),
                }));
            }
        }
        match self.head_blob_in(&candidates, repository, digest).await {
            Ok((upstream, meta)) => {
                self.cache
                    .store
                    .add_holder(digest, holder_for(&upstream, repository))
                    .map_err(cache_error)?;
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
        let key = format!("blob `{repository}@{digest}`");
        try_in_order(
            &self.cache.negative,
            candidates,
            &key,
            |upstream| async move {
                let request = blob_request(&upstream, Method::HEAD, repository, digest);
                let response = upstream.send(&request).await?;
                if !response.status().is_success() {
                    return Err(fault_from_response(&upstream, &request.what, response).await);
                }
                let size = content_length(response.headers()).ok_or_else(|| {
                    Fault::unavailable(format!(
                        "upstream `{}` answered HEAD for {} without Content-Length",
                        upstream.name(),
                        request.what
                    ))
                })?;
                Ok(BlobMeta {
                    digest: digest.clone(),
                    size,
                    source: Source::fetched(&upstream),
                })
            },
        )
        .await
    }

    /// The committed object or download this route may read, if any.
    fn known_origin(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
    ) -> Option<Origin> {
        if let Some(object) = self.cache.store.lookup(digest) {
            if let Some(upstream) = known_holder(candidates, repository, &object.holders) {
                if let Ok(file) = File::open(&object.path) {
                    return Some(Origin::Stored {
                        file,
                        size: object.size,
                        upstream: upstream.name().to_owned(),
                    });
                }
            }
        }
        let download = self.in_flight(digest)?;
        let upstream = known_holder(
            candidates,
            repository,
            std::slice::from_ref(&download.holder),
        )?;
        let upstream = upstream.name().to_owned();
        self.join(download, upstream)
    }

    /// Waits until no verified download is still on its way into the store,
    /// so a graceful stop does not lose what callers already received.
    /// Downloads still receiving bytes are not waited for.
    pub async fn settle(&self) {
        loop {
            let committing = self
                .cache
                .downloads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .any(|d| matches!(d.subscribe().borrow().state, State::Verified));
            if !committing {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn in_flight(&self, digest: &Digest) -> Option<Arc<Download<Error>>> {
        let downloads = self
            .cache
            .downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        downloads.get(digest.as_str()).cloned()
    }

    /// Opens a download's file for reading. If the download already finished
    /// and was committed, the store's copy is read instead.
    fn join(&self, download: Arc<Download<Error>>, upstream: String) -> Option<Origin> {
        let progress = download.subscribe();
        let file = File::open(&download.path).ok()?;
        Some(Origin::Download {
            file,
            download,
            progress,
            upstream,
        })
    }

    async fn blob_origin(
        &self,
        candidates: &[Arc<Upstream>],
        repository: &Repository,
        digest: &Digest,
    ) -> Result<Origin, Error> {
        if let Some(origin) = self.known_origin(candidates, repository, digest) {
            return Ok(origin);
        }
        // Concurrent misses for one digest wait here for the first caller's
        // download to start, then join it.
        let _guard = self.cache.locks.lock(&format!("blob {digest}")).await;
        if let Some(origin) = self.known_origin(candidates, repository, digest) {
            return Ok(origin);
        }
        let present = self.cache.store.lookup(digest).is_some() || self.in_flight(digest).is_some();
        if present {
            // Cached, but not known to be on this route: an upstream of this
            // route must confirm it has the blob before we serve our copy.
            let (upstream, _) = self.head_blob_in(candidates, repository, digest).await?;
            let holder = holder_for(&upstream, repository);
            self.cache
                .store
                .add_holder(digest, holder)
                .map_err(cache_error)?;
            if let Some(object) = self.cache.store.lookup(digest) {
                if let Ok(file) = File::open(&object.path) {
                    return Ok(Origin::Stored {
                        file,
                        size: object.size,
                        upstream: upstream.name().to_owned(),
                    });
                }
            }
            if let Some(origin) = self
                .in_flight(digest)
                .and_then(|d| self.join(d, upstream.name().to_owned()))
            {
                return Ok(origin);
            }
        }
        let key = format!("blob `{repository}@{digest}`");
        let (upstream, (response, size)) = try_in_order(
            &self.cache.negative,
            candidates,
            &key,
            |upstream| async move { open_blob(&upstream, repository, digest).await },
        )
        .await?;
        let (path, file) = self.cache.store.temp_file().map_err(cache_error)?;
        let download = Arc::new(Download::new(path, size, holder_for(&upstream, repository)));
        let origin = self
            .join(download.clone(), upstream.name().to_owned())
            .ok_or_else(|| Error::Cache("cannot open the download's temp file".to_owned()))?;
        self.cache
            .downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.to_string(), download.clone());
        let source = Resume {
            candidates: candidates.to_vec(),
            repository: repository.clone(),
            digest: digest.clone(),
        };
        tokio::spawn(fill(
            self.cache.clone(),
            download,
            response,
            file,
            upstream,
            source,
        ));
        Ok(origin)
    }
}
