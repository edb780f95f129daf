//! A caller's reader task: follows a committed object or a download in
//! flight and forwards the requested range in messages of at most
//! [`CHUNK_SIZE`] bytes, holding the last one back until the blob is
//! verified, so a caller never holds a complete-looking range of a wrong
//! blob.

use prometheus::IntCounter;
use tokio::sync::{mpsc, watch};

use super::super::error::Internal;
use super::{BlobChunk, CHUNK_SIZE};
use crate::cache::{Progress, Reader, State};
use crate::upstream::Error;

/// A reader task: follows `progress` and forwards bytes `[start, end)` from
/// `reader`, holding the last message back until the blob is verified, and
/// counting what it hands on into `served`.
pub(crate) async fn read_range(
    mut reader: Reader<Error>,
    mut progress: watch::Receiver<Progress<Error>>,
    (start, end): (u64, u64),
    tx: mpsc::Sender<Result<BlobChunk, Error>>,
    served: IntCounter,
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
            let data = match reader.read(position, len).await {
                Ok(data) => data,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let len = data.len();
            let chunk = BlobChunk {
                offset: position,
                data,
            };
            position += len as u64;
            if let Some(previous) = held.replace(chunk) {
                let len = previous.data.len() as u64;
                if tx.send(Ok(previous)).await.is_err() {
                    return; // the caller went away
                }
                served.inc_by(len);
            }
        }
        if matches!(state, State::Verified) && position >= end {
            break;
        }
        if closed {
            let _ = tx.send(Err(Internal::LostDownload.into())).await;
            return;
        }
        tokio::select! {
            changed = progress.changed() => {
                if changed.is_err() {
                    // The download is gone; its final state is in the last value.
                    closed = true;
                }
            }
            // The caller went away while waiting for bytes: stop reading,
            // so the download knows nobody waits for it.
            () = tx.closed() => return,
        }
    }
    if let Some(last) = held {
        let len = last.data.len() as u64;
        if tx.send(Ok(last)).await.is_ok() {
            served.inc_by(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Cache, Holder};
    use crate::config::CacheConfig;
    use crate::oci::Algorithm;
    use bytes::Bytes;

    /// The writer publishes each batch before writing it; a reader that falls
    /// far behind (here: its caller reads nothing until the download is
    /// over, so the recent batches in memory have long moved on) must find
    /// every older byte in the file, and the hash must cover every byte.
    #[tokio::test]
    async fn a_reader_far_behind_the_writer_gets_every_byte_from_memory_or_file() {
        const BATCH: usize = 64 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let cache: Cache<Error> = Cache::open(
            &CacheConfig {
                dir: crate::config::CacheDir::configured(dir.path().to_owned()),
                ..CacheConfig::default()
            },
            Default::default(),
        )
        .unwrap();
        let data: Vec<u8> = (0..40 * BATCH as u32 + 123)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let digest = Algorithm::Sha256.digest(&data);
        let holder = Holder {
            upstream: "a".into(),
            repository: "r".into(),
        };
        let (download, mut writer) = cache
            .start_download(
                &digest,
                data.len() as u64,
                holder,
                digest.algorithm().verifier(),
            )
            .unwrap();
        let (tx, mut rx) = mpsc::channel(2);
        let reader = tokio::spawn(read_range(
            cache.join(&download).unwrap(),
            download.subscribe(),
            (0, data.len() as u64),
            tx,
            IntCounter::new("served", "bytes").unwrap(),
        ));
        for batch in data.chunks(BATCH) {
            writer
                .write(vec![Bytes::copy_from_slice(batch)])
                .await
                .unwrap();
        }
        let (written, verifier) = writer.finish().await.unwrap();
        assert_eq!(verifier.finish(), digest);
        cache
            .commit_download(&digest, &download, written)
            .await
            .unwrap();
        let mut received = Vec::with_capacity(data.len());
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.unwrap();
            assert_eq!(chunk.offset, received.len() as u64);
            received.extend_from_slice(&chunk.data);
        }
        reader.await.unwrap();
        assert!(received == data, "the reader got other bytes than written");
        assert!(
            cache.object(&digest).await.is_some(),
            "committed to the store"
        );
        assert!(cache.download(&digest).is_none(), "no longer in flight");
    }
}
