//! The writer of a download: a blocking thread that takes batches of bytes
//! in order, publishes each to the download's readers, hashes it and appends
//! it to the temp file, so the upstream socket keeps being read while
//! earlier bytes are hashed and written. A reader only needs the bytes; the
//! digest check guards the last message, not the first ones. Batches are
//! written in order, so a byte too old to be among the recent batches in
//! memory is in the file.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::{CacheError, Download};
use crate::oci::Verifier;

/// Batches the writer may hold before the sending side waits.
const WRITER_DEPTH: usize = 4;

/// Hands a download's bytes to its writer thread.
pub(crate) struct DownloadWriter {
    batches: mpsc::Sender<Vec<Bytes>>,
    done: tokio::task::JoinHandle<std::io::Result<(File, Verifier)>>,
    path: std::path::PathBuf,
}

/// A download's file once every batch was written, with the hash of every
/// byte. Only [`super::Cache::commit_download`] can use it.
pub(crate) struct Written {
    pub(super) file: File,
}

impl DownloadWriter {
    /// Starts the writer thread for `download`, writing `file`.
    pub(super) fn start<E: Clone + Send + Sync + 'static>(
        mut file: File,
        mut verifier: Verifier,
        download: Arc<Download<E>>,
    ) -> Self {
        let path = download.path.clone();
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
        Self {
            batches,
            done,
            path,
        }
    }

    /// Hands a batch to the writer (waits while it is [`WRITER_DEPTH`]
    /// batches behind).
    pub(crate) async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), CacheError> {
        if self.batches.send(batch).await.is_err() {
            // The writer stopped on an error; report it.
            return Err(match (&mut self.done).await {
                Ok(Err(e)) => CacheError::io("write a download", &self.path, e),
                Ok(Ok(_)) => CacheError::WriterStopped,
                Err(e) => CacheError::task(e),
            });
        }
        Ok(())
    }

    /// Waits for every batch to be hashed and written: the file, and the
    /// hash of every byte.
    pub(crate) async fn finish(self) -> Result<(Written, Verifier), CacheError> {
        let DownloadWriter {
            batches,
            done,
            path,
        } = self;
        drop(batches);
        match done.await {
            Ok(Ok((file, verifier))) => Ok((Written { file }, verifier)),
            Ok(Err(e)) => Err(CacheError::io("write a download", &path, e)),
            Err(e) => Err(CacheError::task(e)),
        }
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
