//! A caller's reader task: follows a committed object or a download in
//! flight and forwards the requested range in messages of at most
//! [`CHUNK_SIZE`] bytes, holding the last one back until the blob is
//! verified.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{BlobChunk, CHUNK_SIZE};
use crate::cache::{Download, Progress, State};
use crate::upstream::Error;

/// Reads up to `len` bytes at `offset`, handing the file back: straight from
/// the page cache when the bytes are there (no thread hop, the common case
/// for a warm blob), else on the blocking pool.
pub(crate) async fn read_at(file: File, offset: u64, len: usize) -> Result<(File, Bytes), Error> {
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
pub(crate) async fn read_range(
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
    use std::io::Write;

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
}
