//! Blob downloads in flight: [`Downloads`], the map of them by digest, and
//! [`Download`], one of them, shared by every caller that wants the blob.
//! The downloader publishes each batch of bytes (keeping the last few in
//! memory) and then appends it to a temp file, in order; readers follow the
//! progress, taking bytes from those batches while they keep up and from the
//! file when they are behind (a batch too old to be in memory has been
//! written), so a caller that joins late gets the bytes already written and
//! then the live ones. The final state tells readers
//! whether the digest passed.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use super::Holder;
use crate::oci::Digest;

/// Where a download stands.
#[derive(Debug, Clone)]
pub(crate) enum State<E> {
    /// Bytes are still arriving.
    Running,
    /// All bytes arrived and matched the digest.
    Verified,
    /// The download failed; readers must end with this error.
    Failed(E),
}

/// Bytes available so far and the state.
#[derive(Debug, Clone)]
pub(crate) struct Progress<E> {
    /// Bytes of the blob available to readers: the recent batches in
    /// memory, and every byte before them in the file.
    pub(crate) available: u64,
    /// The state.
    pub(crate) state: State<E>,
}

/// A download in flight.
#[derive(Debug)]
pub(crate) struct Download<E> {
    /// The temp file the bytes go to (renamed into the store once verified).
    pub(super) path: PathBuf,
    /// Size of the whole blob.
    pub(crate) size: u64,
    /// The routes known to hold it: the upstream and repository it comes
    /// from, or, read from the shared tier, every route known there.
    pub(crate) holders: Vec<Holder>,
    progress: watch::Sender<Progress<E>>,
    /// How many callers are reading it (see [`Download::readers`]).
    readers: watch::Sender<usize>,
    /// The last batches published, with their offsets, so readers keeping up
    /// with the download take them from memory instead of the file.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
}

/// Batches kept in memory per download.
const RECENT_BATCHES: usize = 8;

impl<E: Clone> Download<E> {
    /// A download of `size` bytes into `path`, held by `holders`.
    pub(crate) fn new(path: PathBuf, size: u64, holders: Vec<Holder>) -> Self {
        let (progress, _) = watch::channel(Progress {
            available: 0,
            state: State::Running,
        });
        Self {
            path,
            size,
            holders,
            progress,
            readers: watch::Sender::new(0),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_BATCHES)),
        }
    }

    /// Follows the progress.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Progress<E>> {
        self.progress.subscribe()
    }

    /// Publishes `bytes` at `offset` (right after the bytes published
    /// before). The caller must have written every earlier batch to the file
    /// (and write this one next): readers read the file for bytes older than
    /// the recent batches.
    pub(crate) fn append(&self, offset: u64, bytes: Bytes) {
        let available = offset + bytes.len() as u64;
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_BATCHES {
                recent.pop_front();
            }
            recent.push_back((offset, bytes));
        }
        self.progress.send_modify(|p| p.available = available);
    }

    /// Up to `max` bytes at `position` from the recent batches, if they are
    /// still there (no copy: a slice of the batch).
    pub(crate) fn recent(&self, position: u64, max: usize) -> Option<Bytes> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (offset, bytes) = recent.iter().find(|(offset, bytes)| {
            *offset <= position && position < offset + bytes.len() as u64
        })?;
        let from = usize::try_from(position - offset).ok()?;
        let to = bytes.len().min(from.saturating_add(max));
        Some(bytes.slice(from..to))
    }

    /// Publishes the final state.
    pub(crate) fn finish(&self, state: State<E>) {
        self.progress.send_modify(|p| p.state = state);
    }

    /// True once every byte arrived and the digest passed.
    pub(crate) fn is_verified(&self) -> bool {
        matches!(self.progress.borrow().state, State::Verified)
    }
}

impl<E> Download<E> {
    /// Follows how many callers are reading the download, so the download
    /// can tell when nobody waits for it any more.
    pub(crate) fn readers(&self) -> watch::Receiver<usize> {
        self.readers.subscribe()
    }

    /// A caller started reading.
    pub(super) fn add_reader(&self) {
        self.readers.send_modify(|n| *n += 1);
    }

    /// A caller stopped reading.
    pub(super) fn remove_reader(&self) {
        self.readers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The downloads in flight, by digest: one per blob, however many callers
/// read it. An entry lives from the download's start until it is committed
/// or has failed.
#[derive(Debug)]
pub(crate) struct Downloads<E> {
    map: Mutex<HashMap<Digest, Arc<Download<E>>>>,
}

impl<E> Default for Downloads<E> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<E> Downloads<E> {
    /// The download of `digest` under way, if any.
    pub(crate) fn get(&self, digest: &Digest) -> Option<Arc<Download<E>>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .cloned()
    }

    /// Downloads under way.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Registers a download of `digest`.
    pub(super) fn insert(&self, digest: Digest, download: Arc<Download<E>>) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest, download);
    }

    /// Registers a download of `digest` unless one is under way: then
    /// that one comes back.
    pub(super) fn insert_new(
        &self,
        digest: Digest,
        download: Arc<Download<E>>,
    ) -> Result<(), Arc<Download<E>>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&digest) {
            Some(existing) => Err(existing.clone()),
            None => {
                map.insert(digest, download);
                Ok(())
            }
        }
    }

    /// Removes `download`, unless a newer one of the same digest replaced it.
    pub(super) fn remove(&self, digest: &Digest, download: &Arc<Download<E>>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(digest).is_some_and(|d| Arc::ptr_eq(d, download)) {
            map.remove(digest);
        }
    }
}

/// A progress that is already complete, for reading a committed object with
/// the same code that follows a download.
pub(crate) fn complete<E: Clone>(size: u64) -> watch::Receiver<Progress<E>> {
    let (tx, rx) = watch::channel(Progress {
        available: size,
        state: State::Verified,
    });
    drop(tx);
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_batches_are_sliced_without_copies() {
        let holder = Holder {
            upstream: "a".into(),
            repository: "r".into(),
        };
        let d: Download<()> = Download::new(PathBuf::from("/nonexistent"), 100, vec![holder]);
        let rx = d.subscribe();
        d.append(0, Bytes::from_static(b"0123456789"));
        d.append(10, Bytes::from_static(b"abcdefghij"));
        assert_eq!(rx.borrow().available, 20);
        assert_eq!(d.recent(3, 4).unwrap(), Bytes::from_static(b"3456"));
        assert_eq!(d.recent(8, 100).unwrap(), Bytes::from_static(b"89"));
        assert_eq!(d.recent(12, 100).unwrap(), Bytes::from_static(b"cdefghij"));
        assert!(d.recent(20, 1).is_none());
        for i in 2..(2 + RECENT_BATCHES as u64) {
            d.append(i * 10, Bytes::from_static(b"xxxxxxxxxx"));
        }
        assert!(d.recent(0, 1).is_none(), "the oldest batches are dropped");
    }
}
