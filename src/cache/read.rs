//! Reading an object's bytes: a [`Reader`] of a committed object or of a
//! download in flight (from its recent batches in memory while the caller
//! keeps up, else from its file). File reads come straight from the page
//! cache when the bytes are there (no thread hop: the common case for a warm
//! blob), else from the blocking pool.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::download::complete;
use super::{CacheError, Download, Progress};

/// Reads one object's bytes by position.
pub(crate) struct Reader<E> {
    file: Arc<File>,
    size: u64,
    download: Option<Arc<Download<E>>>,
    /// Counted among the download's readers (a caller, not the uploader to
    /// the shared tier).
    counted: bool,
}

impl<E: Clone> Reader<E> {
    /// A reader of a committed object's file of `size` bytes.
    pub(super) fn stored(file: File, size: u64) -> Self {
        Self {
            file: Arc::new(file),
            size,
            download: None,
            counted: false,
        }
    }

    /// A reader of a download's temp file and recent batches; counted among
    /// the download's readers until dropped.
    pub(super) fn following(file: File, download: Arc<Download<E>>) -> Self {
        download.add_reader();
        Self {
            file: Arc::new(file),
            size: download.size,
            download: Some(download),
            counted: true,
        }
    }

    /// A reader of a download that is not counted as a caller (a download
    /// nobody waits for may still be abandoned).
    pub(super) fn quiet(file: File, download: Arc<Download<E>>) -> Self {
        Self {
            file: Arc::new(file),
            size: download.size,
            download: Some(download),
            counted: false,
        }
    }

    /// How many of the object's bytes are there to read, and whether they
    /// are verified: complete for a committed object, else the download's
    /// progress.
    pub(crate) fn progress(&self) -> watch::Receiver<Progress<E>> {
        match &self.download {
            Some(download) => download.subscribe(),
            None => complete(self.size),
        }
    }

    /// Up to `len` bytes at `position`, which the caller knows are
    /// available (at least one byte comes back).
    pub(crate) async fn read(&mut self, position: u64, len: usize) -> Result<Bytes, CacheError> {
        if let Some(recent) = self.download.as_ref().and_then(|d| d.recent(position, len)) {
            return Ok(recent);
        }
        read_at(&self.file, position, len).await
    }
}

impl<E> Drop for Reader<E> {
    fn drop(&mut self) {
        if let Some(download) = self.download.as_ref().filter(|_| self.counted) {
            download.remove_reader();
        }
    }
}

/// Reads up to `len` bytes at `offset`: from the page cache without a
/// thread hop when they are there, else on the blocking pool.
async fn read_at(file: &Arc<File>, offset: u64, len: usize) -> Result<Bytes, CacheError> {
    if let Some(cached) = read_cached(file, offset, len) {
        return Ok(cached);
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .map(|()| Bytes::from(buf))
    })
    .await
    .map_err(CacheError::task)?
    .map_err(CacheError::read)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn reads_the_bytes_at_the_offset_from_the_page_cache_or_disk() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        // Just written, so in the page cache: read without a thread hop.
        #[cfg(target_os = "linux")]
        assert_eq!(
            read_cached(&file, 1000, 5000).as_deref(),
            Some(&data[1000..6000])
        );
        assert!(
            read_cached(&file, data.len() as u64, 10).is_none(),
            "at the end"
        );
        let mut reader: Reader<()> = Reader::stored(file, data.len() as u64);
        let mut position = 7;
        while position < data.len() {
            let read = reader
                .read(position as u64, (128 * 1024).min(data.len() - position))
                .await
                .unwrap();
            assert!(!read.is_empty());
            assert_eq!(read[..], data[position..position + read.len()]);
            position += read.len();
        }
    }
}
