//! The download task of a blob: reads the upstream body, hands it in
//! batches to a writer thread that publishes, hashes and writes it, resumes
//! with HTTP Range requests (the same upstream first, then the route's
//! others) when a connection breaks or stalls, and commits the file to the
//! store once the digest passed.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::{Method, StatusCode};
use tokio::sync::mpsc;

use super::super::client::Upstream;
use super::super::distribution::{blob_request, fault_from_response};
use super::super::error::Faults;
use super::super::http::{content_length, describe};
use super::super::{EngineCache, Error, Fault};
use crate::cache::{Download, State};
use crate::oci::{Digest, Repository, Verifier};

/// Opens the blob on one upstream: the response (headers read, body not yet)
/// and the blob's size.
pub(crate) async fn open_blob(
    upstream: &Arc<Upstream>,
    repository: &Repository,
    digest: &Digest,
) -> Result<(reqwest::Response, u64), Fault> {
    let request = blob_request(upstream, Method::GET, repository, digest);
    let response = upstream.send(&request).await?;
    if !response.status().is_success() {
        return Err(fault_from_response(upstream, &request.what, response).await);
    }
    let size = content_length(response.headers()).ok_or_else(|| {
        Fault::unavailable(format!(
            "upstream `{}` sent {} without Content-Length",
            upstream.name(),
            request.what
        ))
    })?;
    Ok((response, size))
}

/// The download task: writes the upstream body to the temp file while
/// hashing it, publishes progress, and commits the file once verified.
pub(crate) async fn fill(
    cache: Arc<EngineCache>,
    download: Arc<Download<Error>>,
    response: reqwest::Response,
    file: File,
    upstream: Arc<Upstream>,
    source: Resume,
) {
    let digest = source.digest.clone();
    match write_verified(&download, response, file, upstream, &source).await {
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
pub(crate) struct Resume {
    pub(crate) candidates: Vec<Arc<Upstream>>,
    pub(crate) repository: Repository,
    pub(crate) digest: Digest,
}

/// Bytes gathered from the upstream before they are handed to the writer.
const FLUSH_SIZE: usize = 256 * 1024;
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
    mut upstream: Arc<Upstream>,
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
    let integrity = |upstream: &Upstream, detail: String| {
        tracing::warn!(upstream = upstream.name(), %digest, %detail, "blob failed verification");
        Error::from_fault(Fault::integrity(format!(
            "upstream `{}` sent {what} with {detail}",
            upstream.name()
        )))
    };
    loop {
        match body.pump(size, &mut response, &upstream, &what).await? {
            BodyEnd::Complete if body.received == size => break,
            BodyEnd::Complete => {
                return Err(integrity(
                    &upstream,
                    "fewer bytes than its Content-Length".to_owned(),
                ));
            }
            BodyEnd::TooLong => {
                return Err(integrity(
                    &upstream,
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
                (upstream, response, body.skip) = reopen(&upstream, resume, body.received, size)
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
        return Err(integrity(
            &upstream,
            format!("bytes that hash to {computed}"),
        ));
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
        upstream: &Upstream,
        what: &str,
    ) -> Result<BodyEnd, Error> {
        let mut batch = Batch::default();
        let mut window_start = tokio::time::Instant::now();
        let mut window_bytes: u64 = 0;
        let min_in_window = upstream.min_rate().saturating_mul(RATE_WINDOW.as_secs());
        let end = loop {
            let mut chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break BodyEnd::Complete,
                Err(e) => {
                    break BodyEnd::Broken(Fault::unavailable(format!(
                        "upstream `{}` broke off {what} after {} of {size} bytes: {}",
                        upstream.name(),
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
                        upstream.name(),
                        upstream.min_rate()
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
pub(crate) struct Writer {
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
    current: &Arc<Upstream>,
    resume: &Resume,
    from: u64,
    size: u64,
) -> Result<(Arc<Upstream>, reqwest::Response, u64), Faults> {
    let mut faults = Faults::default();
    let order = std::iter::once(current).chain(
        resume
            .candidates
            .iter()
            .filter(|c| !Arc::ptr_eq(c, current)),
    );
    for upstream in order {
        if !upstream.circuit().allow() {
            continue;
        }
        let mut request = blob_request(upstream, Method::GET, &resume.repository, &resume.digest);
        request.range = Some(from);
        let fault = match upstream.send(&request).await {
            Ok(response) => match response.status() {
                StatusCode::PARTIAL_CONTENT
                    if content_range_start(response.headers(), size) == Some(from) =>
                {
                    upstream.circuit().record_success();
                    return Ok((upstream.clone(), response, 0));
                }
                StatusCode::OK if content_length(response.headers()) == Some(size) => {
                    upstream.circuit().record_success();
                    return Ok((upstream.clone(), response, from));
                }
                status if status.is_success() => Fault::unavailable(format!(
                    "upstream `{}` answered a resume of {} with an unusable range ({})",
                    upstream.name(),
                    request.what,
                    status.as_u16()
                )),
                _ => fault_from_response(upstream, &request.what, response).await,
            },
            Err(fault) => fault,
        };
        if fault.is_upstream_failure() {
            upstream.circuit().record_failure();
        } else {
            upstream.circuit().record_success();
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

#[cfg(test)]
mod tests {
    use super::super::CHANNEL_DEPTH;
    use super::super::reader::read_range;
    use super::*;

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
