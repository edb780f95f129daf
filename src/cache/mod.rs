//! The cache: everything the engine keeps between requests, behind one API
//! ([`Cache`]) that a second storage backend can provide as well. Inside:
//! the content-addressable disk store of blobs and manifests ([`store`]),
//! downloads in flight that callers join while the bytes arrive
//! ([`download`], written by [`writer`], read through [`read`]), tag →
//! digest entries with their freshness ([`tags`]), remembered "not found"
//! answers ([`negative`]) and per-key locks that coalesce concurrent misses
//! ([`locks`]), all addressed by typed keys ([`keys`]).
//!
//! The cache knows nothing of HTTP or gRPC: the engine decides what to store
//! and when a cached object may be served. Blocking file work runs on the
//! blocking pool, never on the async threads.

pub(crate) mod download;
mod index;
pub(crate) mod keys;
mod locks;
mod negative;
mod read;
mod scrub;
mod store;
mod tags;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::oci::{Digest, MediaType, Verifier};

pub(crate) use download::{Download, Progress, State, complete};
pub(crate) use keys::{LockKey, NegativeKey, TagKey};
pub(crate) use locks::KeyGuard;
pub(crate) use negative::Absence;
pub(crate) use read::Reader;
pub(crate) use store::{Holder, Object};
pub(crate) use tags::{Freshness, TagEntry};
pub(crate) use writer::{DownloadWriter, Written};

use download::Downloads;
use locks::KeyLocks;
use negative::Negative;
use store::Store;
use tags::Tags;

/// Why the cache could not read or write. Its text names local paths: for
/// logs, never for callers.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file operation failed.
    #[error("cannot {operation} at {path}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Reading an object's bytes failed.
    #[error("cannot read a stored object")]
    Read(#[source] std::io::Error),
    /// A download's writer thread stopped before its download ended.
    #[error("the download writer stopped early")]
    WriterStopped,
    /// A blocking task of the cache panicked or was cancelled.
    #[error("a cache task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl CacheError {
    pub(crate) fn io(operation: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            operation,
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn read(source: std::io::Error) -> Self {
        Self::Read(source)
    }

    pub(crate) fn task(source: tokio::task::JoinError) -> Self {
        Self::Task(source)
    }
}

/// Everything cached, shared by all requests. `E` is the error a failed
/// download hands its readers.
#[derive(Debug)]
pub(crate) struct Cache<E> {
    store: Arc<Store>,
    tags: Arc<Tags>,
    negative: Negative,
    locks: KeyLocks,
    downloads: Downloads<E>,
    metrics: Arc<Metrics>,
}

/// The state of the cache, as the admin API and the gauges show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Committed objects.
    pub(crate) objects: u64,
    /// Their bytes.
    pub(crate) bytes: u64,
    /// The size bound.
    pub(crate) max_bytes: u64,
    /// Tag entries.
    pub(crate) tags: u64,
    /// Downloads under way.
    pub(crate) downloads: u64,
}

impl<E: Clone + Send + Sync + 'static> Cache<E> {
    /// Opens (creating if needed) the cache under `config.dir`. Leftovers of
    /// interrupted downloads are deleted; committed objects are indexed.
    /// Counts into `metrics`.
    pub(crate) fn open(config: &CacheConfig, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        let store = Store::open(
            &config.dir.join("objects"),
            &config.dir.join("tmp"),
            config.max_size.as_u64(),
            metrics.clone(),
        )?;
        let tags = Tags::open(
            &config.dir.join("tags"),
            config.tag_ttl,
            config.stale_if_error,
        )?;
        Ok(Self {
            store: Arc::new(store),
            tags: Arc::new(tags),
            negative: Negative::new(config.negative_ttl),
            locks: KeyLocks::default(),
            downloads: Downloads::default(),
            metrics,
        })
    }

    /// What the cache holds now.
    pub(crate) fn usage(&self) -> Usage {
        let (bytes, objects) = self.store.usage();
        Usage {
            objects,
            bytes,
            max_bytes: self.store.max_size(),
            tags: self.tags.len() as u64,
            downloads: self.downloads.len() as u64,
        }
    }

    /// Counts a failed backend operation, passing the result on.
    fn counted<T>(&self, operation: &str, result: Result<T, CacheError>) -> Result<T, CacheError> {
        if result.is_err() {
            self.metrics.backend_error("disk", operation);
        }
        result
    }

    /// Removes the object `digest` (an operator's request) and the tag
    /// entries that name it; a reader that has it open keeps reading. False
    /// when the object was not stored (tag entries naming it are dropped
    /// all the same).
    pub(crate) async fn evict(&self, digest: &Digest) -> Result<bool, CacheError> {
        let (store, key) = (self.store.clone(), digest.clone());
        let removed = tokio::task::spawn_blocking(move || store.evict(&key))
            .await
            .map_err(CacheError::task)?;
        let dropped = self.counted("tag", self.tags.remove_naming(digest).await)?;
        tracing::info!(%digest, removed, tags = dropped, "evicted on request");
        Ok(removed)
    }

    /// The committed object, marking it used.
    pub(crate) fn object(&self, digest: &Digest) -> Option<Object> {
        self.store.lookup(digest)
    }

    /// The committed object and a reader of its bytes; `None` when it is not
    /// stored (or was evicted a moment ago). An object whose file is not the
    /// size its record says (truncated, or damaged behind the service's
    /// back) is evicted instead, so it is fetched again.
    pub(crate) fn open_object(&self, digest: &Digest) -> Option<(Object, Reader<E>)> {
        let object = self.store.lookup(digest)?;
        let file = std::fs::File::open(&object.path).ok()?;
        let on_disk = file.metadata().ok()?.len();
        if on_disk != object.size {
            self.evict_damaged(digest, object.size, on_disk);
            return None;
        }
        Some((object, Reader::stored(file)))
    }

    /// A small committed object's bytes (a manifest) and media type, from
    /// memory when they are there; a damaged one is evicted, as by
    /// [`Cache::open_object`].
    pub(crate) async fn read_manifest(&self, digest: &Digest) -> Option<(MediaType, Bytes)> {
        let object = self.store.lookup(digest)?;
        let media_type = object.media_type?;
        let bytes = self.store.read_small(digest).await?;
        if bytes.len() as u64 != object.size {
            self.evict_damaged(digest, object.size, bytes.len() as u64);
            return None;
        }
        Some((media_type, bytes))
    }

    fn evict_damaged(&self, digest: &Digest, recorded: u64, found: u64) {
        tracing::warn!(%digest, recorded, found, "stored object has the wrong size; evicting it");
        self.store.evict(digest);
    }

    /// Stores a verified manifest held by `holder`.
    pub(crate) async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &MediaType,
        holder: Holder,
    ) -> Result<(), CacheError> {
        let (store, digest, media_type) = (self.store.clone(), digest.clone(), media_type.clone());
        let put =
            tokio::task::spawn_blocking(move || store.put(&digest, bytes, &media_type, holder))
                .await
                .map_err(CacheError::task)
                .and_then(|r| r.map(drop));
        self.counted("write", put)
    }

    /// Records that `holder` holds the committed object `digest`.
    pub(crate) async fn add_holder(
        &self,
        digest: &Digest,
        holder: Holder,
    ) -> Result<(), CacheError> {
        let (store, digest) = (self.store.clone(), digest.clone());
        let added = tokio::task::spawn_blocking(move || store.add_holder(&digest, holder))
            .await
            .map_err(CacheError::task)
            .and_then(|r| r);
        self.counted("write", added)
    }

    /// The download of `digest` under way, if any.
    pub(crate) fn download(&self, digest: &Digest) -> Option<Arc<Download<E>>> {
        self.downloads.get(digest)
    }

    /// A reader of a download under way.
    pub(crate) fn join(&self, download: &Arc<Download<E>>) -> Result<Reader<E>, CacheError> {
        let file = std::fs::File::open(&download.path)
            .map_err(|e| CacheError::io("open a download", &download.path, e));
        let file = self.counted("read", file)?;
        Ok(Reader::following(file, download.clone()))
    }

    /// Starts a download of `digest` (`size` bytes from `holder`): registers
    /// it so later callers join it, and starts its writer, which hashes
    /// every byte with `verifier`.
    pub(crate) fn start_download(
        &self,
        digest: &Digest,
        size: u64,
        holder: Holder,
        verifier: Verifier,
    ) -> Result<(Arc<Download<E>>, DownloadWriter), CacheError> {
        let (path, file) = self.counted("write", self.store.temp_file())?;
        let download = Arc::new(Download::new(path, size, holder));
        let writer = DownloadWriter::start(file, verifier, download.clone());
        self.downloads.insert(digest.clone(), download.clone());
        Ok((download, writer))
    }

    /// Ends a download whose digest passed: readers may send their last
    /// bytes at once; then the file is synced and moved into the store
    /// (durability is the store's business and happens after).
    pub(crate) async fn commit_download(
        &self,
        digest: &Digest,
        download: &Arc<Download<E>>,
        written: Written,
    ) -> Result<(), CacheError> {
        download.finish(State::Verified);
        let store = self.store.clone();
        let (path, size, holder, key) = (
            download.path.clone(),
            download.size,
            download.holder.clone(),
            digest.clone(),
        );
        let committed = tokio::task::spawn_blocking(move || {
            written
                .file
                .sync_data()
                .map_err(|e| CacheError::io("sync a download", &path, e))?;
            store.commit(&path, &key, size, None, holder)
        })
        .await
        .map_err(CacheError::task)
        .and_then(|r| r);
        if committed.is_err() {
            let _ = tokio::fs::remove_file(&download.path).await;
        }
        self.downloads.remove(digest, download);
        self.counted("commit", committed).map(drop)
    }

    /// Ends a failed download: its readers end with `error`, and its file
    /// is removed.
    pub(crate) async fn fail_download(
        &self,
        digest: &Digest,
        download: &Arc<Download<E>>,
        error: E,
    ) {
        let _ = tokio::fs::remove_file(&download.path).await;
        self.downloads.remove(digest, download);
        download.finish(State::Failed(error));
    }

    /// The tag entry for `key` and its freshness at `now`.
    pub(crate) fn tag(&self, key: &TagKey, now: SystemTime) -> Option<(TagEntry, Freshness)> {
        self.tags.get(key, now)
    }

    /// Records what `key` resolved to.
    pub(crate) async fn put_tag(&self, key: &TagKey, entry: TagEntry) -> Result<(), CacheError> {
        self.counted("tag", self.tags.put(key, entry).await)
    }

    /// Forgets what `key` resolved to (the upstream says the tag is gone).
    pub(crate) async fn drop_tag(&self, key: &TagKey) -> Result<(), CacheError> {
        self.counted("tag", self.tags.remove(key).await)
    }

    /// Why `upstream` is remembered as not having `key` (it answered "not
    /// found", or sent bytes that failed verification), if it is.
    pub(crate) fn absence(&self, upstream: &str, key: &NegativeKey) -> Option<Absence> {
        self.negative.get(upstream, key)
    }

    /// Remembers, for `negative_ttl`, that `upstream` does not have `key`.
    pub(crate) fn remember_absence(&self, upstream: &str, key: &NegativeKey, absence: Absence) {
        self.negative.insert(upstream, key, absence);
    }

    /// Waits for the lock on `key`.
    pub(crate) async fn lock(&self, key: &LockKey) -> KeyGuard {
        self.locks.lock(key).await
    }

    /// Takes the lock on `key` if nobody holds it.
    pub(crate) fn try_lock(&self, key: &LockKey) -> Option<KeyGuard> {
        self.locks.try_lock(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheDir;
    use crate::oci::Algorithm;

    fn open(dir: &Path) -> Cache<()> {
        Cache::open(
            &CacheConfig {
                dir: CacheDir::configured(dir.to_owned()),
                ..CacheConfig::default()
            },
            Arc::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_object_of_the_wrong_size_is_evicted_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path());
        let holder = Holder {
            upstream: "a".into(),
            repository: "r".into(),
        };
        let media_type = MediaType::known(MediaType::OCI_MANIFEST);
        let (blob, manifest) = (b"blob bytes".as_slice(), b"{}".as_slice());
        let (blob_digest, manifest_digest) = (
            Algorithm::Sha256.digest(blob),
            Algorithm::Sha256.digest(manifest),
        );
        for (digest, bytes) in [(&blob_digest, blob), (&manifest_digest, manifest)] {
            cache
                .put_manifest(
                    digest,
                    Bytes::copy_from_slice(bytes),
                    &media_type,
                    holder.clone(),
                )
                .await
                .unwrap();
        }
        assert!(cache.open_object(&blob_digest).is_some());
        let objects = dir.path().join("objects/sha256");
        std::fs::write(objects.join(blob_digest.hex()), b"blob").unwrap();
        assert!(
            cache.open_object(&blob_digest).is_none(),
            "truncated: not served"
        );
        assert!(cache.object(&blob_digest).is_none(), "and evicted");
        assert!(!objects.join(blob_digest.hex()).exists());
        // A small object read from its file (no copy in memory after a
        // restart) is checked too.
        let reopened = open(dir.path());
        std::fs::write(objects.join(manifest_digest.hex()), b"{} ").unwrap();
        assert!(reopened.read_manifest(&manifest_digest).await.is_none());
        assert!(reopened.object(&manifest_digest).is_none());
    }
}
