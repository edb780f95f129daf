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

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::error::Faults;
use super::registry::{blob_request, fault_from_response};
use super::remote::{Remote, content_length, describe};
use super::{
    Engine, EngineCache, Error, Fault, Source, cache_error, holder_for, known_holder, try_in_order,
};
use crate::cache::download::complete;
use crate::cache::{Download, Progress, State};
use crate::oci::{Digest, Repository, Verifier};

/// Largest data message (the contract allows up to 1 MiB).
pub const CHUNK_SIZE: usize = 128 * 1024;
/// Bytes gathered from the upstream before they are handed to the writer.
const FLUSH_SIZE: usize = 256 * 1024;
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
            if let Some(remote) = known_holder(&candidates, repository, &object.holders) {
                return Ok(Some(BlobMeta {
                    digest: digest.clone(),
                    size: object.size,
                    source: Source::cached(remote.name()),
                }));
            }
        }
        // Verified and on its way into the store.
        if let Some(download) = self.in_flight(digest) {
            let verified = matches!(download.subscribe().borrow().state, State::Verified);
            let holder = std::slice::from_ref(&download.holder);
            if let Some(remote) = known_holder(&candidates, repository, holder).filter(|_| verified)
            {
                return Ok(Some(BlobMeta {
                    digest: digest.clone(),
                    size: download.size,
                    source: Source::cached(remote.name()),
                }));
            }
        }
        match self.head_blob_in(&candidates, repository, digest).await {
            Ok((remote, meta)) => {
                self.cache
                    .store
                    .add_holder(digest, holder_for(&remote, repository))
                    .map_err(cache_error)?;
                Ok(Some(meta))
            }
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn head_blob_in(
        &self,
        candidates: &[Arc<Remote>],
        repository: &Repository,
        digest: &Digest,
    ) -> Result<(Arc<Remote>, BlobMeta), Error> {
        let key = format!("blob `{repository}@{digest}`");
        try_in_order(
            &self.cache.negative,
            candidates,
            &key,
            |remote| async move {
                let request = blob_request(&remote, Method::HEAD, repository, digest);
                let response = remote.send(&request).await?;
                if !response.status().is_success() {
                    return Err(fault_from_response(&remote, &request.what, response).await);
                }
                let size = content_length(response.headers()).ok_or_else(|| {
                    Fault::unavailable(format!(
                        "upstream `{}` answered HEAD for {} without Content-Length",
                        remote.name(),
                        request.what
                    ))
                })?;
                Ok(BlobMeta {
                    digest: digest.clone(),
                    size,
                    source: Source::fetched(&remote),
                })
            },
        )
        .await
    }

    /// The committed object or download this route may read, if any.
    fn known_origin(
        &self,
        candidates: &[Arc<Remote>],
        repository: &Repository,
        digest: &Digest,
    ) -> Option<Origin> {
        if let Some(object) = self.cache.store.lookup(digest) {
            if let Some(remote) = known_holder(candidates, repository, &object.holders) {
                if let Ok(file) = File::open(&object.path) {
                    return Some(Origin::Stored {
                        file,
                        size: object.size,
                        upstream: remote.name().to_owned(),
                    });
                }
            }
        }
        let download = self.in_flight(digest)?;
        let remote = known_holder(
            candidates,
            repository,
            std::slice::from_ref(&download.holder),
        )?;
        let upstream = remote.name().to_owned();
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
        candidates: &[Arc<Remote>],
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
            let (remote, _) = self.head_blob_in(candidates, repository, digest).await?;
            let holder = holder_for(&remote, repository);
            self.cache
                .store
                .add_holder(digest, holder)
                .map_err(cache_error)?;
            if let Some(object) = self.cache.store.lookup(digest) {
                if let Ok(file) = File::open(&object.path) {
                    return Ok(Origin::Stored {
                        file,
                        size: object.size,
                        upstream: remote.name().to_owned(),
                    });
                }
            }
            if let Some(origin) = self
                .in_flight(digest)
                .and_then(|d| self.join(d, remote.name().to_owned()))
            {
                return Ok(origin);
            }
        }
        let key = format!("blob `{repository}@{digest}`");
        let (remote, (response, size)) = try_in_order(
            &self.cache.negative,
            candidates,
            &key,
            |remote| async move { open_blob(&remote, repository, digest).await },
        )
        .await?;
        let (path, file) = self.cache.store.temp_file().map_err(cache_error)?;
        let download = Arc::new(Download::new(path, size, holder_for(&remote, repository)));
        let origin = self
            .join(download.clone(), remote.name().to_owned())
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
            remote,
            source,
        ));
        Ok(origin)
    }
}

/// Opens the blob on one upstream: the response (headers read, body not yet)
/// and the blob's size.
async fn open_blob(
    remote: &Arc<Remote>,
    repository: &Repository,
    digest: &Digest,
) -> Result<(reqwest::Response, u64), Fault> {
    let request = blob_request(remote, Method::GET, repository, digest);
    let response = remote.send(&request).await?;
    if !response.status().is_success() {
        return Err(fault_from_response(remote, &request.what, response).await);
    }
    let size = content_length(response.headers()).ok_or_else(|| {
        Fault::unavailable(format!(
            "upstream `{}` sent {} without Content-Length",
            remote.name(),
            request.what
        ))
    })?;
    Ok((response, size))
}

/// The download task: writes the upstream body to the temp file while
/// hashing it, publishes progress, and commits the file once verified.
async fn fill(
    cache: Arc<EngineCache>,
    download: Arc<Download<Error>>,
    response: reqwest::Response,
    file: File,
    remote: Arc<Remote>,
    source: Resume,
) {
    let digest = source.digest.clone();
    match write_verified(&download, response, file, remote, &source).await {
        Ok(file) => {
            // Readers may send their last bytes now; durability is the
            // store's business and happens after.
            download.finish(State::Verified);
            let store = cache.store.clone();
            let (path, size, holder) = (
                download.path.clone(),
                download.size,
                download.holder.clone(),
            );
            let committed = {
                let digest = digest.clone();
                tokio::task::spawn_blocking(move || {
                    // Durable before it is renamed into the store.
                    file.sync_data()
                        .map_err(|e| crate::cache::CacheError::at(&path, e))?;
                    store.commit(&path, &digest, size, None, holder)
                })
                .await
            };
            match committed {
                Ok(Ok(kept)) => tracing::debug!(%digest, kept, "blob verified"),
                Ok(Err(e)) => {
                    tracing::warn!(%digest, error = %e, "verified blob not cached");
                    let _ = std::fs::remove_file(&download.path);
                }
                Err(e) => tracing::error!(%digest, error = %e, "cache commit task failed"),
            }
            forget(&cache, &download, &digest);
        }
        Err(e) => {
            let _ = std::fs::remove_file(&download.path);
            forget(&cache, &download, &digest);
            download.finish(State::Failed(e));
        }
    }
}

/// Removes a finished download from the in-flight map.
fn forget(cache: &EngineCache, download: &Arc<Download<Error>>, digest: &Digest) {
    let mut downloads = cache.downloads.lock().unwrap_or_else(|e| e.into_inner());
    if downloads
        .get(digest.as_str())
        .is_some_and(|d| Arc::ptr_eq(d, download))
    {
        downloads.remove(digest.as_str());
    }
}

/// What a download needs to resume elsewhere after a broken connection.
struct Resume {
    candidates: Vec<Arc<Remote>>,
    repository: Repository,
    digest: Digest,
}

/// Longest a body may run below the upstream's `min_rate` before it counts
/// as stalled.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Resumes (HTTP Range requests) of one download before giving up.
const MAX_RESUMES: u32 = 3;

/// Writes the blob to `file`, hashing as it goes, resuming with Range
/// requests (same upstream first, then the others) when a connection breaks
/// or stalls, and verifies the digest over the whole blob.
async fn write_verified(
    download: &Arc<Download<Error>>,
    mut response: reqwest::Response,
    file: File,
    mut remote: Arc<Remote>,
    resume: &Resume,
) -> Result<File, Error> {
    let digest = &resume.digest;
    let what = format!("blob `{digest}`");
    let size = download.size;
    let mut body = Body {
        writer: Writer::start(file, digest.algorithm().verifier(), download.clone()),
        received: 0,
        skip: 0,
    };
    let mut resumes = 0;
    let integrity = |remote: &Remote, detail: String| {
        tracing::warn!(upstream = remote.name(), %digest, %detail, "blob failed verification");
        Error::from_fault(Fault::integrity(format!(
            "upstream `{}` sent {what} with {detail}",
            remote.name()
        )))
    };
    loop {
        match body.pump(size, &mut response, &remote, &what).await? {
            BodyEnd::Complete if body.received == size => break,
            BodyEnd::Complete => {
                return Err(integrity(
                    &remote,
                    "fewer bytes than its Content-Length".to_owned(),
                ));
            }
            BodyEnd::TooLong => {
                return Err(integrity(
                    &remote,
                    "more bytes than its Content-Length".to_owned(),
                ));
            }
            BodyEnd::Broken(fault) => {
                if resumes == MAX_RESUMES {
                    return Err(Error::from_fault(fault));
                }
                resumes += 1;
                tracing::info!(%fault, received = body.received, size, "blob transfer broke off; resuming");
                // Frees its connection slot before the resume takes one.
                drop(response);
                (remote, response, body.skip) = reopen(&remote, resume, body.received, size)
                    .await
                    .map_err(|mut faults| {
                        faults.push(fault);
                        faults.into_error()
                    })?;
            }
        }
    }
    let (file, verifier) = body.writer.finish().await?;
    let computed = verifier.finish();
    if computed != *digest {
        return Err(integrity(&remote, format!("bytes that hash to {computed}")));
    }
    Ok(file)
}

/// The running state of a download across connections.
struct Body {
    writer: Writer,
    /// Bytes of the blob handed to the writer.
    received: u64,
    /// Leading bytes of the current response to drop (a resume answered
    /// with the whole blob).
    skip: u64,
}

/// How one connection's body ended.
enum BodyEnd {
    /// The body ended (with all bytes, or fewer: the caller checks).
    Complete,
    /// The upstream sent more bytes than the blob's size.
    TooLong,
    /// The connection broke or stalled after some bytes; resume from there.
    Broken(Fault),
}

impl Body {
    /// Moves one connection's body to the writer in batches. A transport
    /// error, an idle timeout or a rate below `min_rate` over
    /// [`RATE_WINDOW`] ends it as broken.
    async fn pump(
        &mut self,
        size: u64,
        response: &mut reqwest::Response,
        remote: &Remote,
        what: &str,
    ) -> Result<BodyEnd, Error> {
        let mut batch = Batch::default();
        let mut window_start = tokio::time::Instant::now();
        let mut window_bytes: u64 = 0;
        let min_in_window = remote.min_rate().saturating_mul(RATE_WINDOW.as_secs());
        let end = loop {
            let mut chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break BodyEnd::Complete,
                Err(e) => {
                    break BodyEnd::Broken(Fault::unavailable(format!(
                        "upstream `{}` broke off {what} after {} of {size} bytes: {}",
                        remote.name(),
                        self.received + batch.len,
                        describe(&e)
                    )));
                }
            };
            window_bytes += chunk.len() as u64;
            if window_start.elapsed() >= RATE_WINDOW {
                if window_bytes < min_in_window {
                    break BodyEnd::Broken(Fault::unavailable(format!(
                        "upstream `{}` sent blob bytes slower than min_rate ({} B/s)",
                        remote.name(),
                        remote.min_rate()
                    )));
                }
                window_start = tokio::time::Instant::now();
                window_bytes = 0;
            }
            if self.skip > 0 {
                let n = self.skip.min(chunk.len() as u64);
                self.skip -= n;
                let _ = chunk.split_to(n as usize);
            }
            if self.received + batch.len + chunk.len() as u64 > size {
                break BodyEnd::TooLong;
            }
            batch.push(chunk);
            if batch.len >= FLUSH_SIZE as u64 {
                self.received += batch.len;
                self.writer.write(batch.take()).await?;
            }
        };
        if batch.len > 0 && !matches!(end, BodyEnd::TooLong) {
            self.received += batch.len;
            self.writer.write(batch.take()).await?;
        }
        Ok(end)
    }
}

/// Batches the writer may hold before the reading side waits.
const WRITER_DEPTH: usize = 4;

/// Hashes and writes a download on a blocking thread, so the socket keeps
/// being read while earlier bytes are hashed and written. Each batch is
/// published to readers (kept in [`Download`]'s recent batches) before it
/// is hashed and written: a reader only needs the bytes, and the digest
/// check guards the last message, not the first ones. Batches are written
/// in order, so a byte too old to be among the recent batches is in the
/// file.
struct Writer {
    batches: mpsc::Sender<Vec<Bytes>>,
    done: tokio::task::JoinHandle<std::io::Result<(File, Verifier)>>,
}

impl Writer {
    fn start(mut file: File, mut verifier: Verifier, download: Arc<Download<Error>>) -> Self {
        let (batches, mut rx) = mpsc::channel::<Vec<Bytes>>(WRITER_DEPTH);
        let done = tokio::task::spawn_blocking(move || {
            let mut offset = 0;
            while let Some(batch) = rx.blocking_recv() {
                let bytes = contiguous(batch);
                let len = bytes.len() as u64;
                download.append(offset, bytes.clone());
                offset += len;
                verifier.update(&bytes);
                file.write_all(&bytes)?;
            }
            Ok((file, verifier))
        });
        Self { batches, done }
    }

    /// Hands a batch to the writer (waits while it is [`WRITER_DEPTH`]
    /// batches behind).
    async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), Error> {
        if self.batches.send(batch).await.is_err() {
            // The writer stopped on an error; report it.
            return Err(match (&mut self.done).await {
                Ok(Err(e)) => io_error(e),
                Ok(Ok(_)) => Error::Cache("the download writer stopped early".to_owned()),
                Err(e) => Error::Cache(format!("the download writer failed: {e}")),
            });
        }
        Ok(())
    }

    /// Waits for every batch to be hashed and written; the file and the
    /// hash of every byte.
    async fn finish(self) -> Result<(File, Verifier), Error> {
        let Writer { batches, done } = self;
        drop(batches);
        match done.await {
            Ok(Ok(finished)) => Ok(finished),
            Ok(Err(e)) => Err(io_error(e)),
            Err(e) => Err(Error::Cache(format!("the download writer failed: {e}"))),
        }
    }
}

fn io_error(e: std::io::Error) -> Error {
    Error::Cache(format!("download file: {e}"))
}

/// Opens the rest of the blob from byte `from`: the same upstream first,
/// then the route's others. Returns the response and how many leading bytes
/// to skip (an upstream that ignores Range sends the whole blob).
async fn reopen(
    current: &Arc<Remote>,
    resume: &Resume,
    from: u64,
    size: u64,
) -> Result<(Arc<Remote>, reqwest::Response, u64), Faults> {
    let mut faults = Faults::default();
    let order = std::iter::once(current).chain(
        resume
            .candidates
            .iter()
            .filter(|c| !Arc::ptr_eq(c, current)),
    );
    for remote in order {
        if !remote.circuit().allow() {
            continue;
        }
        let mut request = blob_request(remote, Method::GET, &resume.repository, &resume.digest);
        request.range = Some(from);
        let fault = match remote.send(&request).await {
            Ok(response) => match response.status() {
                StatusCode::PARTIAL_CONTENT
                    if content_range_start(response.headers(), size) == Some(from) =>
                {
                    remote.circuit().record_success();
                    return Ok((remote.clone(), response, 0));
                }
                StatusCode::OK if content_length(response.headers()) == Some(size) => {
                    remote.circuit().record_success();
                    return Ok((remote.clone(), response, from));
                }
                status if status.is_success() => Fault::unavailable(format!(
                    "upstream `{}` answered a resume of {} with an unusable range ({})",
                    remote.name(),
                    request.what,
                    status.as_u16()
                )),
                _ => fault_from_response(remote, &request.what, response).await,
            },
            Err(fault) => fault,
        };
        if fault.is_upstream_failure() {
            remote.circuit().record_failure();
        } else {
            remote.circuit().record_success();
        }
        faults.push(fault);
    }
    Err(faults)
}

/// The first byte of a `Content-Range: bytes FIRST-LAST/SIZE` for a blob of
/// `size` bytes.
fn content_range_start(headers: &reqwest::header::HeaderMap, size: u64) -> Option<u64> {
    let value = headers.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.trim().strip_prefix("bytes ")?;
    let (span, total) = range.split_once('/')?;
    if total.trim() != "*" && total.trim().parse::<u64>().ok()? != size {
        return None;
    }
    let (first, last) = span.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (last + 1 == size).then_some(first)
}

/// Chunks received from the upstream and not yet written, kept as they came
/// (no copy into one buffer).
#[derive(Default)]
struct Batch {
    chunks: Vec<Bytes>,
    len: u64,
}

impl Batch {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len() as u64;
        self.chunks.push(chunk);
    }

    fn take(&mut self) -> Vec<Bytes> {
        self.len = 0;
        std::mem::take(&mut self.chunks)
    }
}

/// One buffer for a batch: the chunk itself when there is one, else the
/// chunks copied together (readers then get whole messages from memory).
fn contiguous(mut batch: Vec<Bytes>) -> Bytes {
    if batch.len() == 1 {
        return batch.pop().unwrap_or_default();
    }
    let mut joined = BytesMut::with_capacity(batch.iter().map(Bytes::len).sum());
    for chunk in &batch {
        joined.extend_from_slice(chunk);
    }
    joined.freeze()
}

/// Reads up to `len` bytes at `offset`, handing the file back: straight from
/// the page cache when the bytes are there (no thread hop, the common case
/// for a warm blob), else on the blocking pool.
async fn read_at(file: File, offset: u64, len: usize) -> Result<(File, Bytes), Error> {
    if let Some(cached) = read_cached(&file, offset, len) {
        return Ok((file, cached));
    }
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .map(|()| (file, Bytes::from(buf)))
    })
    .await
    .map_err(|e| Error::Cache(e.to_string()))?
    .map_err(|e| Error::Cache(format!("cannot read a cached blob: {e}")))
}

/// The bytes at `offset` that are in the page cache, up to `len`, read
/// without blocking (`preadv2` with `RWF_NOWAIT`); `None` when the first of
/// them is not (or the kernel cannot tell), so the caller reads on a thread
/// that may block.
#[cfg(target_os = "linux")]
fn read_cached(file: &File, offset: u64, len: usize) -> Option<Bytes> {
    use rustix::io::{ReadWriteFlags, preadv2};
    let mut buf = vec![0; len];
    let read = preadv2(
        file,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    );
    match read {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Some(Bytes::from(buf))
        }
        _ => None,
    }
}

#[cfg(not(target_os = "linux"))]
fn read_cached(_file: &File, _offset: u64, _len: usize) -> Option<Bytes> {
    None
}

/// A reader task: follows `progress` and forwards bytes `[start, end)` of
/// `file`, holding the last message back until the blob is verified.
async fn read_range(
    mut file: File,
    mut progress: watch::Receiver<Progress<Error>>,
    download: Option<Arc<Download<Error>>>,
    start: u64,
    end: u64,
    tx: mpsc::Sender<Result<BlobChunk, Error>>,
) {
    let mut position = start;
    let mut held: Option<BlobChunk> = None;
    let mut closed = false;
    loop {
        let (available, state) = {
            let p = progress.borrow_and_update();
            (p.available, p.state.clone())
        };
        if let State::Failed(e) = state {
            let _ = tx.send(Err(e)).await;
            return;
        }
        let available = available.min(end);
        while position < available {
            let len = usize::try_from(available - position)
                .unwrap_or(CHUNK_SIZE)
                .min(CHUNK_SIZE);
            let data = match download.as_ref().and_then(|d| d.recent(position, len)) {
                Some(data) => data,
                None => {
                    let data;
                    (file, data) = match read_at(file, position, len).await {
                        Ok(read) => read,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    data
                }
            };
            let len = data.len();
            let chunk = BlobChunk {
                offset: position,
                data,
            };
            position += len as u64;
            if let Some(previous) = held.replace(chunk) {
                if tx.send(Ok(previous)).await.is_err() {
                    return; // the caller went away
                }
            }
        }
        if matches!(state, State::Verified) && position >= end {
            break;
        }
        if closed {
            let error = Error::Cache("a download ended without a result".to_owned());
            let _ = tx.send(Err(error)).await;
            return;
        }
        if progress.changed().await.is_err() {
            // The download is gone; its final state is in the last value.
            closed = true;
        }
    }
    if let Some(last) = held {
        let _ = tx.send(Ok(last)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_at_returns_the_bytes_at_the_offset_from_cache_or_disk() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        // Just written, so in the page cache: read without a thread hop.
        #[cfg(target_os = "linux")]
        assert_eq!(
            read_cached(&file, 1000, 5000).as_deref(),
            Some(&data[1000..6000])
        );
        let mut position = 7;
        while position < data.len() {
            let read;
            (file, read) = read_at(file, position as u64, CHUNK_SIZE.min(data.len() - position))
                .await
                .unwrap();
            assert!(!read.is_empty());
            assert_eq!(read[..], data[position..position + read.len()]);
            position += read.len();
        }
        assert!(
            read_cached(&file, data.len() as u64, 10).is_none(),
            "at the end"
        );
    }

    /// The writer publishes each batch before writing it; a reader that falls
    /// far behind (here: its caller reads nothing until the download is
    /// over, so the recent batches in memory have long moved on) must find
    /// every older byte in the file, and the hash must cover every byte.
    #[tokio::test]
    async fn a_reader_far_behind_the_writer_gets_every_byte_from_memory_or_file() {
        const BATCH: usize = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download");
        let data: Vec<u8> = (0..40 * BATCH as u32 + 123)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut expected = crate::oci::Algorithm::Sha256.verifier();
        expected.update(&data);
        let holder = crate::cache::Holder {
            upstream: "a".into(),
            repository: "r".into(),
        };
        let download = Arc::new(Download::new(path.clone(), data.len() as u64, holder));
        let mut writer = Writer::start(
            File::create(&path).unwrap(),
            crate::oci::Algorithm::Sha256.verifier(),
            download.clone(),
        );
        let (tx, mut rx) = mpsc::channel(CHANNEL_DEPTH);
        let reader = tokio::spawn(read_range(
            File::open(&path).unwrap(),
            download.subscribe(),
            Some(download.clone()),
            0,
            data.len() as u64,
            tx,
        ));
        for batch in data.chunks(BATCH) {
            writer
                .write(vec![Bytes::copy_from_slice(batch)])
                .await
                .unwrap();
        }
        let (_file, verifier) = writer.finish().await.unwrap();
        assert_eq!(verifier.finish(), expected.finish());
        download.finish(State::Verified);
        let mut received = Vec::with_capacity(data.len());
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.unwrap();
            assert_eq!(chunk.offset, received.len() as u64);
            received.extend_from_slice(&chunk.data);
        }
        reader.await.unwrap();
        assert!(received == data, "the reader got other bytes than written");
    }
}
