//! The download task of a blob: reads the upstream body, hands it in
//! batches to a writer thread that publishes, hashes and writes it, resumes
//! with HTTP Range requests (the same upstream first, then the route's
//! others) when a connection breaks or stalls, and commits the file to the
//! store once the digest passed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::client::Upstream;
use super::super::distribution::{blob_request, fault_from_response};
use super::super::error::{Faults, Internal};
use super::super::failover::{circuit_open, record_fault, remember_corrupt};
use super::super::http::{content_length, describe};
use super::super::{EngineCache, Error, Fault};
use super::rate::{RateWindow, Verdict};
use crate::cache::{Download, DownloadWriter, NegativeKey, Written};
use crate::oci::{Digest, Repository};

/// Asks one upstream for the blob (`GET`, or `HEAD` to learn whether it
/// has it): the response (headers read, body not yet) and the blob's size.
pub(crate) async fn open_blob(
    upstream: &Arc<Upstream>,
    method: Method,
    repository: &Repository,
    digest: &Digest,
) -> Result<(reqwest::Response, u64), Fault> {
    let request = blob_request(upstream, method.clone(), repository, digest);
    let response = upstream.send(&request).await?;
    if !response.status().is_success() {
        return Err(fault_from_response(upstream, &request.what, response).await);
    }
    let size = content_length(response.headers()).ok_or_else(|| {
        Fault::unavailable(format!(
            "upstream `{}` answered {method} for {} without Content-Length",
            upstream.name(),
            request.what
        ))
    })?;
    Ok((response, size))
}

/// The download task: moves the upstream body to the writer, then commits
/// the file once the digest passed, or fails the download (its readers end
/// with the error). `stop` abandons a download still receiving bytes.
pub(crate) async fn fill(
    cache: Arc<EngineCache>,
    download: Arc<Download<Error>>,
    writer: DownloadWriter,
    response: reqwest::Response,
    upstream: Arc<Upstream>,
    resume: Resume,
    stop: CancellationToken,
) {
    let digest = &resume.digest;
    let received = tokio::select! {
        received = write_verified(&cache, &download, writer, response, upstream, &resume) => received,
        () = stop.cancelled() => Err(Error::from(Internal::ShuttingDown)),
    };
    match received {
        Ok(written) => match cache.commit_download(digest, &download, written).await {
            Ok(()) => tracing::debug!(%digest, "blob verified and stored"),
            Err(e) => tracing::warn!(%digest, error = %describe(&e), "verified blob not cached"),
        },
        Err(e) => cache.fail_download(digest, &download, e).await,
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
/// Resumes (HTTP Range requests) of one download before giving up.
const MAX_RESUMES: u32 = 3;
/// How often a body's rate is judged while no bytes arrive.
const RATE_TICK: Duration = Duration::from_secs(1);

/// Hands the blob to `writer`, which hashes it as it goes, resuming with
/// Range requests when a connection breaks or stalls, and verifies the
/// digest over the whole blob. An upstream whose bytes fail verification is
/// remembered as not holding the blob, so a retry goes elsewhere.
async fn write_verified(
    cache: &EngineCache,
    download: &Download<Error>,
    writer: DownloadWriter,
    mut response: reqwest::Response,
    mut upstream: Arc<Upstream>,
    resume: &Resume,
) -> Result<Written, Error> {
    let digest = &resume.digest;
    let what = format!("blob `{digest}`");
    let size = download.size;
    let mut body = Body {
        writer,
        received: 0,
        skip: 0,
    };
    let mut resumes = 0;
    let integrity = |upstream: &Upstream, detail: String| {
        remember_corrupt(
            cache,
            upstream,
            &NegativeKey::Blob(resume.repository.clone(), digest.clone()),
        );
        Error::from_fault(Fault::integrity(format!(
            "upstream `{}` sent {what} with {detail}",
            upstream.name()
        )))
    };
    loop {
        let (fault, elsewhere_first) = match body
            .pump(download, &mut response, &upstream, &what)
            .await?
        {
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
            // Nobody waits for these bytes and they come too slowly: no work
            // for nobody, and no resume.
            BodyEnd::Abandoned(fault) => {
                tracing::info!(%fault, received = body.received, size, "blob download abandoned: no caller left");
                return Err(Error::from_fault(fault));
            }
            BodyEnd::Broken(fault) => (fault, false),
            // A slow upstream stays slow: ask the others first.
            BodyEnd::Stalled(fault) => (fault, true),
        };
        if resumes == MAX_RESUMES {
            return Err(Error::from_fault(fault));
        }
        resumes += 1;
        tracing::info!(%fault, received = body.received, size, "blob transfer broke off; resuming");
        // Frees its connection slot before the resume takes one.
        drop(response);
        (upstream, response, body.skip) =
            reopen(&upstream, elsewhere_first, resume, body.received, size)
                .await
                .map_err(|mut faults| {
                    faults.push(fault);
                    faults.into_error()
                })?;
    }
    let (written, verifier) = body.writer.finish().await?;
    let computed = verifier.finish();
    if computed != *digest {
        return Err(integrity(
            &upstream,
            format!("bytes that hash to {computed}"),
        ));
    }
    Ok(written)
}

/// The running state of a download across connections.
struct Body {
    writer: DownloadWriter,
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
    /// The connection broke after some bytes; resume from there, on the
    /// same upstream first.
    Broken(Fault),
    /// The body came slower than `min_rate`; resume elsewhere first.
    Stalled(Fault),
    /// Nobody reads the download any more, and the body is slower than
    /// `min_rate`: give it up.
    Abandoned(Fault),
}

impl Body {
    /// Moves one connection's body to the writer in batches. A transport
    /// error or an idle timeout ends it as broken; a rate below `min_rate`
    /// over the last [`super::rate::RATE_WINDOW`] as stalled, or, when no caller reads
    /// the download any more, as abandoned (at once if it is already below
    /// `min_rate` when the last caller leaves).
    async fn pump(
        &mut self,
        download: &Download<Error>,
        response: &mut reqwest::Response,
        upstream: &Upstream,
        what: &str,
    ) -> Result<BodyEnd, Error> {
        let size = download.size;
        let min_rate = upstream.min_rate();
        let slow = || {
            Fault::unavailable(format!(
                "upstream `{}` sent {what} slower than min_rate ({min_rate} B/s)",
                upstream.name(),
            ))
        };
        let mut batch = Batch::default();
        let mut rate = RateWindow::new(Instant::now());
        let mut readers = download.readers();
        let mut tick = tokio::time::interval(RATE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            let now = Instant::now();
            let nobody = *readers.borrow_and_update() == 0;
            match rate.verdict(now, min_rate) {
                Verdict::Slow if nobody => break BodyEnd::Abandoned(slow()),
                Verdict::Slow => break BodyEnd::Stalled(slow()),
                Verdict::Early if nobody && rate.slow_so_far(now, min_rate) => {
                    break BodyEnd::Abandoned(slow());
                }
                Verdict::Early | Verdict::Fast => {}
            }
            let next = tokio::select! {
                next = response.chunk() => next,
                _ = tick.tick() => continue,
                _ = readers.changed() => continue,
            };
            let mut chunk = match next {
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
            rate.add(Instant::now(), chunk.len() as u64);
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

/// Opens the rest of the blob from byte `from` on the route's upstreams:
/// the current one first, or last when `elsewhere_first` (it was too slow).
/// Returns the response and how many leading bytes to skip (an upstream
/// that ignores Range sends the whole blob).
async fn reopen(
    current: &Arc<Upstream>,
    elsewhere_first: bool,
    resume: &Resume,
    from: u64,
    size: u64,
) -> Result<(Arc<Upstream>, reqwest::Response, u64), Faults> {
    let mut faults = Faults::default();
    let others = resume
        .candidates
        .iter()
        .filter(|c| !Arc::ptr_eq(c, current));
    let order: Vec<&Arc<Upstream>> = if elsewhere_first {
        others.chain(std::iter::once(current)).collect()
    } else {
        std::iter::once(current).chain(others).collect()
    };
    for upstream in order {
        if !upstream.circuit().allow() {
            faults.push(circuit_open(upstream));
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
        record_fault(upstream, &fault);
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
