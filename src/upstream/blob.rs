//! Blob operations: a verifying stream of a blob or a range of it, and head.
//!
//! The stream is produced by a task that reads the upstream body, hashes every
//! byte of the whole blob, and forwards the requested range in messages of at
//! most [`CHUNK_SIZE`] bytes through a small bounded channel. The last data
//! message is held back until the digest has passed, so a caller never holds
//! a complete-looking range of a wrong blob: a mismatch ends the stream with
//! [`Error::DataLoss`] instead. Memory per stream is a few chunks, whatever
//! the blob's size. The task stops when the caller goes away.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use reqwest::Method;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::registry::{blob_request, fault_from_response};
use super::remote::{Remote, content_length, describe};
use super::{Engine, Error, Fault, Source};
use crate::oci::{Digest, Repository};

/// Largest data message (the contract allows up to 1 MiB).
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Messages buffered between the producer and the caller.
const CHANNEL_DEPTH: usize = 4;

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

impl Engine {
    /// Starts streaming a blob (or a range of it) from the first upstream
    /// that has it.
    #[tracing::instrument(skip_all, fields(repository = %req.repository, digest = %req.digest))]
    pub async fn fetch_blob(&self, req: BlobRequest) -> Result<BlobStream, Error> {
        let (remote, (response, size)) = {
            let req = &req;
            self.first_success(
                &req.repository,
                req.upstream.as_deref(),
                move |remote| async move { open_blob(&remote, &req.repository, &req.digest).await },
            )
            .await?
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
        let info = BlobInfo {
            digest: req.digest.clone(),
            size,
            source: Source::fetched(&remote),
        };
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let producer = Producer {
            remote,
            digest: req.digest,
            size,
            start: offset,
            end,
            tx,
        };
        tokio::spawn(producer.run(response));
        Ok(BlobStream {
            info,
            chunks: ReceiverStream::new(rx),
        })
    }

    /// Tells whether a blob exists. `Ok(None)` only when every eligible
    /// upstream answered "not found".
    #[tracing::instrument(skip_all, fields(repository = %repository, digest = %digest))]
    pub async fn head_blob(
        &self,
        repository: &Repository,
        digest: &Digest,
        upstream: Option<&str>,
    ) -> Result<Option<BlobMeta>, Error> {
        let found = self
            .first_success(repository, upstream, move |remote| async move {
                let remote = &remote;
                let request = blob_request(remote, Method::HEAD, repository, digest);
                let response = remote.send(&request).await?;
                if !response.status().is_success() {
                    return Err(fault_from_response(remote, &request.what, response).await);
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
                    source: Source::fetched(remote),
                })
            })
            .await;
        match found {
            Ok((_, meta)) => Ok(Some(meta)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
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

/// The task that reads, hashes and forwards one blob.
struct Producer {
    remote: Arc<Remote>,
    digest: Digest,
    size: u64,
    /// Requested range `[start, end)`.
    start: u64,
    end: u64,
    tx: mpsc::Sender<Result<BlobChunk, Error>>,
}

impl Producer {
    async fn run(self, mut response: reqwest::Response) {
        let what = format!("blob `{}`", self.digest);
        let mut verifier = self.digest.algorithm().verifier();
        let mut position: u64 = 0;
        // The range bytes not yet sent, and the last full message held back.
        let mut pending = BytesMut::new();
        let mut pending_offset = self.start;
        let mut held: Option<BlobChunk> = None;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    let fault = Fault::unavailable(format!(
                        "upstream `{}` broke off {what} after {position} of {} bytes: {}",
                        self.remote.name(),
                        self.size,
                        describe(&e)
                    ));
                    let _ = self.tx.send(Err(Error::from_fault(fault))).await;
                    return;
                }
            };
            let chunk_start = position;
            position += chunk.len() as u64;
            if position > self.size {
                let _ = self
                    .tx
                    .send(Err(
                        self.integrity(&what, "more bytes than its Content-Length")
                    ))
                    .await;
                return;
            }
            verifier.update(&chunk);
            // The part of this chunk inside the requested range.
            let from = self.start.max(chunk_start);
            let to = self.end.min(position);
            if from < to {
                let mut slice =
                    chunk.slice((from - chunk_start) as usize..(to - chunk_start) as usize);
                while !slice.is_empty() {
                    let take = slice.len().min(CHUNK_SIZE - pending.len());
                    pending.extend_from_slice(&slice.split_to(take));
                    if pending.len() == CHUNK_SIZE {
                        let full = BlobChunk {
                            offset: pending_offset,
                            data: pending.split().freeze(),
                        };
                        pending_offset += CHUNK_SIZE as u64;
                        if let Some(previous) = held.replace(full) {
                            if self.tx.send(Ok(previous)).await.is_err() {
                                return; // the caller went away
                            }
                        }
                    }
                }
            }
        }
        if position != self.size {
            let _ = self
                .tx
                .send(Err(
                    self.integrity(&what, "fewer bytes than its Content-Length")
                ))
                .await;
            return;
        }
        if !pending.is_empty() {
            let last = BlobChunk {
                offset: pending_offset,
                data: pending.split().freeze(),
            };
            if let Some(previous) = held.replace(last) {
                if self.tx.send(Ok(previous)).await.is_err() {
                    return;
                }
            }
        }
        let computed = verifier.finish();
        if computed != self.digest {
            let detail = format!("bytes that hash to {computed}");
            let _ = self.tx.send(Err(self.integrity(&what, &detail))).await;
            return;
        }
        if let Some(last) = held {
            let _ = self.tx.send(Ok(last)).await;
        }
    }

    fn integrity(&self, what: &str, detail: &str) -> Error {
        tracing::warn!(upstream = self.remote.name(), digest = %self.digest, detail, "blob failed verification");
        Error::from_fault(Fault::integrity(format!(
            "upstream `{}` sent {what} with {detail}",
            self.remote.name()
        )))
    }
}
