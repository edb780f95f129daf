//! The cache: everything the engine keeps between requests, behind one API
//! ([`Cache`]). Inside: the content-addressable disk store of blobs and
//! manifests ([`store`]), with `cache.backend = "s3"` the bucket that
//! replicas share behind it ([`shared`]: a disk miss asks it, a hit there
//! is read into the disk store as it streams, and what the disk store
//! gains is published there),
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
mod shared;
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

pub(crate) use download::{Download, Progress, State};
pub(crate) use keys::{LockKey, NegativeKey, TagKey};
pub(crate) use locks::KeyGuard;
pub(crate) use negative::Absence;
pub(crate) use read::Reader;
pub(crate) use store::{Holder, Object, Place};
pub(crate) use tags::{Freshness, TagEntry};
pub(crate) use writer::{DownloadWriter, Written};

use download::Downloads;
use locks::KeyLocks;
use negative::Negative;
use shared::Shared;
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
    /// The shared tier (S3) could not be set up, or failed a read that
    /// callers were following.
    #[error("the shared cache cannot {operation}")]
    Shared {
        /// What was being done.
        operation: &'static str,
        /// The failure.
        #[source]
        source: object_store::Error,
    },
    /// The shared tier stopped answering in the middle of a read.
    #[error("the shared cache broke off a read")]
    SharedLost,
    /// The shared tier sent bytes that do not hash to their key (the
    /// object is deleted there).
    #[error("the shared cache holds a damaged copy of {0}")]
    SharedDamaged(Digest),
    /// The service is stopping.
    #[error("the cache is closing")]
    Closing,
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

    pub(crate) fn shared(operation: &'static str, source: object_store::Error) -> Self {
        Self::Shared { operation, source }
    }
}

/// Checks that the shared tier's client builds from `config` (nothing is
/// sent): for `check-config`.
pub(crate) fn check_shared(config: &CacheConfig) -> Result<(), CacheError> {
    match config.shared() {
        Some(s3) => Shared::connect(s3, Arc::default()).map(drop),
        None => Ok(()),
    }
}

/// What a failed download hands its readers in the cache's own tests.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct Failed;

#[cfg(test)]
impl From<CacheError> for Failed {
    fn from(_: CacheError) -> Self {
        Self
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
    /// The bucket behind the disk store, with `cache.backend = "s3"`.
    shared: Option<Arc<Shared>>,
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

impl<E: Clone + Send + Sync + From<CacheError> + 'static> Cache<E> {
    /// Opens (creating if needed) the cache under `config.dir`. Leftovers of
    /// interrupted downloads are deleted; committed objects are indexed.
    /// With `backend = "s3"`, the bucket is set up (not contacted: a probe
    /// in the background logs whether it answers). Counts into `metrics`.
    pub(crate) fn open(config: &CacheConfig, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        let shared = match config.shared() {
            Some(s3) => Some(Arc::new(Shared::connect(s3, metrics.clone())?)),
            None => None,
        };
        Self::open_with(config, metrics, shared)
    }

    fn open_with(
        config: &CacheConfig,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> Result<Self, CacheError> {
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
        if let Some(shared) = &shared {
            if tokio::runtime::Handle::try_current().is_ok() {
                shared.probe();
            }
        }
        Ok(Self {
            store: Arc::new(store),
            tags: Arc::new(tags),
            negative: Negative::new(config.negative_ttl),
            locks: KeyLocks::default(),
            downloads: Downloads::default(),
            metrics,
            shared,
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
        let mut removed = tokio::task::spawn_blocking(move || store.evict(&key))
            .await
            .map_err(CacheError::task)?;
        if let Some(shared) = &self.shared {
            removed |= shared.evict(digest).await;
        }
        let dropped = self.counted("tag", self.tags.remove_naming(digest).await)?;
        tracing::info!(%digest, removed, tags = dropped, "evicted on request");
        Ok(removed)
    }

    /// The committed object, marking it used: from the disk store, else
    /// from the shared tier (its size and holders only; [`Cache::open_object`]
    /// reads it).
    pub(crate) async fn object(&self, digest: &Digest) -> Option<Object> {
        if let Some(object) = self.store.lookup(digest) {
            return Some(object);
        }
        let found = self.shared.as_ref()?.lookup(digest).await?;
        Some(Object {
            size: found.size,
            media_type: None,
            holders: found.holders,
            place: Place::Shared,
        })
    }

    /// A reader of `object`'s bytes; `None` when it is gone (evicted a
    /// moment ago) or the shared tier does not answer. An object whose
    /// file is not the size its record says (truncated, or damaged behind
    /// the service's back) is evicted instead, so it is fetched again. An
    /// object in the shared tier only is read into the disk store as it
    /// streams (its digest checked on the way), and the reader follows
    /// that, as a reader of a download does.
    pub(crate) async fn open_object(
        self: &Arc<Self>,
        digest: &Digest,
        object: &Object,
    ) -> Option<Reader<E>> {
        match &object.place {
            Place::Disk(path) => self.open_stored(digest, path, object.size),
            Place::Shared => {
                if let Some(download) = self.downloads.get(digest) {
                    return self.join_or_stored(digest, &download);
                }
                self.fill_from_shared(digest, object).await
            }
        }
    }

    /// A reader of the stored file of `digest`, unless it is not `size`
    /// bytes (then it is evicted).
    fn open_stored(&self, digest: &Digest, path: &Path, size: u64) -> Option<Reader<E>> {
        let file = std::fs::File::open(path).ok()?;
        let on_disk = file.metadata().ok()?.len();
        if on_disk != size {
            self.evict_damaged(digest, size, on_disk);
            return None;
        }
        Some(Reader::stored(file, size))
    }

    /// A reader of `download`, or, when it was committed a moment ago (its
    /// temp file already renamed into the store), of the stored object.
    fn join_or_stored(&self, digest: &Digest, download: &Arc<Download<E>>) -> Option<Reader<E>> {
        if let Ok(reader) = self.join(download) {
            return Some(reader);
        }
        let stored = self.store.lookup(digest)?;
        match &stored.place {
            Place::Disk(path) => self.open_stored(digest, path, stored.size),
            Place::Shared => None,
        }
    }

    /// A small committed object's bytes (a manifest) and media type, from
    /// memory when they are there, else from the disk store, else from the
    /// shared tier (checked against its digest, then kept in the disk
    /// store); a damaged one on disk is evicted, as by [`Cache::open_object`].
    pub(crate) async fn read_manifest(&self, digest: &Digest) -> Option<(MediaType, Bytes)> {
        let Some(object) = self.store.lookup(digest) else {
            return self.read_shared_manifest(digest).await;
        };
        let media_type = object.media_type?;
        let bytes = self.store.read_small(digest).await?;
        if bytes.len() as u64 != object.size {
            self.evict_damaged(digest, object.size, bytes.len() as u64);
            return None;
        }
        Some((media_type, bytes))
    }

    async fn read_shared_manifest(&self, digest: &Digest) -> Option<(MediaType, Bytes)> {
        let shared = self.shared.as_ref()?;
        let found = shared.lookup(digest).await?;
        let (media_type, bytes) = shared.read_small(digest).await?;
        if digest.algorithm().digest(&bytes) != *digest {
            self.shared_damaged(digest);
            return None;
        }
        let media_type = MediaType::parse(&media_type).ok()?;
        let (store, key, kept, kept_type) = (
            self.store.clone(),
            digest.clone(),
            bytes.clone(),
            media_type.clone(),
        );
        let put =
            tokio::task::spawn_blocking(move || store.put(&key, kept, &kept_type, found.holders))
                .await
                .map_err(CacheError::task)
                .and_then(|r| r.map(drop));
        let _ = self.counted("write", put);
        Some((media_type, bytes))
    }

    /// The shared tier sent bytes that are not what their key says: they
    /// are deleted there, so the next request fetches the object again.
    fn shared_damaged(&self, digest: &Digest) {
        tracing::warn!(%digest, "the shared cache's copy does not match its digest; deleting it");
        self.metrics.backend_error("s3", "verify");
        if let Some(shared) = &self.shared {
            shared.evict_damaged(digest);
        }
    }

    fn evict_damaged(&self, digest: &Digest, recorded: u64, found: u64) {
        tracing::warn!(%digest, recorded, found, "stored object has the wrong size; evicting it");
        self.store.evict(digest);
    }

    /// Stores a verified manifest held by `holder` (and publishes it to
    /// the shared tier in the background).
    pub(crate) async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &MediaType,
        holder: Holder,
    ) -> Result<(), CacheError> {
        if let Some(shared) = &self.shared {
            shared.publish(digest, bytes.clone(), media_type, vec![holder.clone()]);
        }
        let (store, digest, media_type) = (self.store.clone(), digest.clone(), media_type.clone());
        let put = tokio::task::spawn_blocking(move || {
            store.put(&digest, bytes, &media_type, vec![holder])
        })
        .await
        .map_err(CacheError::task)
        .and_then(|r| r.map(drop));
        self.counted("write", put)
    }

    /// Records that `holder` holds the committed object `digest` (in the
    /// shared tier too, in the background, when the object is there).
    pub(crate) async fn add_holder(
        &self,
        digest: &Digest,
        holder: Holder,
    ) -> Result<(), CacheError> {
        if let Some(shared) = &self.shared {
            shared.add_holder(digest, holder.clone());
        }
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
        let download = Arc::new(Download::new(path, size, vec![holder.clone()]));
        let writer = DownloadWriter::start(file, verifier, download.clone());
        self.downloads.insert(digest.clone(), download.clone());
        if let Some(shared) = &self.shared {
            match std::fs::File::open(&download.path) {
                Ok(file) => {
                    let reader = Reader::quiet(file, download.clone());
                    shared.upload(digest, size, holder, reader, download.subscribe());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a download back for the shared cache")
                }
            }
        }
        Ok((download, writer))
    }

    /// Starts reading `object` from the shared tier into the disk store:
    /// a download like one from an upstream (joined by later callers,
    /// hashed as it goes, committed once its digest passed), fed by ranged
    /// GETs. `None` when the bucket does not answer.
    async fn fill_from_shared(
        self: &Arc<Self>,
        digest: &Digest,
        object: &Object,
    ) -> Option<Reader<E>> {
        let shared = self.shared.clone()?;
        let body = shared.read(digest, 0, object.size).await?;
        let (path, file) = self.counted("write", self.store.temp_file()).ok()?;
        let download = Arc::new(Download::new(path, object.size, object.holders.clone()));
        if let Err(existing) = self.downloads.insert_new(digest.clone(), download.clone()) {
            let _ = std::fs::remove_file(&download.path);
            return self.join_or_stored(digest, &existing);
        }
        let writer = DownloadWriter::start(file, digest.algorithm().verifier(), download.clone());
        let reader = self.join(&download);
        let (cache, key, filling, bucket) = (
            self.clone(),
            digest.clone(),
            download.clone(),
            shared.clone(),
        );
        shared.spawn(move |stop| async move {
            let filled = tokio::select! {
                filled = shared::fill_from_bucket(&bucket, &key, &filling, writer, body) => filled,
                () = stop.cancelled() => Err(CacheError::Closing),
            };
            match filled {
                Ok(written) => {
                    if let Err(e) = cache.commit_download(&key, &filling, written).await {
                        tracing::warn!(digest = %key, error = %e, "verified object from the shared cache not kept");
                    }
                }
                Err(e) => {
                    if matches!(e, CacheError::SharedDamaged(_)) {
                        cache.shared_damaged(&key);
                    }
                    cache.fail_download(&key, &filling, E::from(e)).await;
                }
            }
        });
        reader.ok()
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
        let (path, size, holders, key) = (
            download.path.clone(),
            download.size,
            download.holders.clone(),
            digest.clone(),
        );
        let committed = tokio::task::spawn_blocking(move || {
            written
                .file
                .sync_data()
                .map_err(|e| CacheError::io("sync a download", &path, e))?;
            store.commit(&path, &key, size, None, holders)
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

    /// Waits for the shared tier's background work: uploads under way are
    /// aborted (never completed half-way), reads into the disk store end.
    pub(crate) async fn settle(&self) {
        if let Some(shared) = &self.shared {
            shared.settle().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheDir;
    use crate::oci::Algorithm;

    fn open(dir: &Path) -> Arc<Cache<Failed>> {
        Arc::new(
            Cache::open(
                &CacheConfig {
                    dir: CacheDir::configured(dir.to_owned()),
                    ..CacheConfig::default()
                },
                Arc::default(),
            )
            .unwrap(),
        )
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
        let object = cache.object(&blob_digest).await.unwrap();
        assert!(cache.open_object(&blob_digest, &object).await.is_some());
        let objects = dir.path().join("objects/sha256");
        std::fs::write(objects.join(blob_digest.hex()), b"blob").unwrap();
        assert!(
            cache.open_object(&blob_digest, &object).await.is_none(),
            "truncated: not served"
        );
        assert!(cache.object(&blob_digest).await.is_none(), "and evicted");
        assert!(!objects.join(blob_digest.hex()).exists());
        // A small object read from its file (no copy in memory after a
        // restart) is checked too.
        let reopened = open(dir.path());
        std::fs::write(objects.join(manifest_digest.hex()), b"{} ").unwrap();
        assert!(reopened.read_manifest(&manifest_digest).await.is_none());
        assert!(reopened.object(&manifest_digest).await.is_none());
    }

    mod shared_tier {
        use super::*;
        use object_store::memory::InMemory;
        use object_store::path::Path as Key;
        use object_store::{ObjectStore, ObjectStoreExt};

        fn holder(repository: &str) -> Holder {
            Holder {
                upstream: "hub".into(),
                repository: repository.into(),
            }
        }

        fn replica(dir: &Path, bucket: &Arc<InMemory>) -> Arc<Cache<Failed>> {
            let shared = Shared::new(bucket.clone(), Key::from("cache"), Arc::default());
            let config = CacheConfig {
                dir: CacheDir::configured(dir.to_owned()),
                ..CacheConfig::default()
            };
            Arc::new(Cache::open_with(&config, Arc::default(), Some(Arc::new(shared))).unwrap())
        }

        async fn keys(bucket: &InMemory) -> Vec<String> {
            use futures::TryStreamExt;
            let mut keys: Vec<String> = bucket
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap();
            keys.sort();
            keys
        }

        async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
            for _ in 0..500 {
                if check().await {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("never: {what}");
        }

        fn bytes_of(len: usize, seed: u8) -> Bytes {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        }

        /// Streams `bytes` through a download of `cache` as the engine
        /// does; the digest passes when `digest` is theirs.
        async fn download(
            cache: &Arc<Cache<Failed>>,
            digest: &Digest,
            bytes: &Bytes,
            holder: Holder,
        ) {
            let (download, mut writer) = cache
                .start_download(
                    digest,
                    bytes.len() as u64,
                    holder,
                    digest.algorithm().verifier(),
                )
                .unwrap();
            for chunk in bytes.chunks(1024 * 1024) {
                writer.write(vec![bytes.slice_ref(chunk)]).await.unwrap();
            }
            let (written, verifier) = writer.finish().await.unwrap();
            if verifier.finish() == *digest {
                cache
                    .commit_download(digest, &download, written)
                    .await
                    .unwrap();
            } else {
                cache.fail_download(digest, &download, Failed).await;
            }
        }

        async fn read_all(cache: &Arc<Cache<Failed>>, digest: &Digest) -> Result<Bytes, String> {
            let object = cache.object(digest).await.ok_or("not found")?;
            let mut reader = cache
                .open_object(digest, &object)
                .await
                .ok_or("cannot open")?;
            let mut progress = reader.progress();
            let mut out = bytes::BytesMut::new();
            while (out.len() as u64) < object.size {
                let available = progress.borrow_and_update().available;
                if (out.len() as u64) < available {
                    let len = (available - out.len() as u64).min(128 * 1024) as usize;
                    out.extend_from_slice(&reader.read(out.len() as u64, len).await.unwrap());
                    continue;
                }
                if matches!(progress.borrow().state, State::Failed(_)) {
                    return Err("failed".into());
                }
                progress.changed().await.map_err(|_| "ended")?;
            }
            loop {
                match progress.borrow().state {
                    State::Verified => return Ok(out.freeze()),
                    State::Failed(_) => return Err("failed".into()),
                    State::Running => {}
                }
                progress.changed().await.map_err(|_| "ended")?;
            }
        }

        #[tokio::test]
        async fn a_large_blob_is_published_in_parts_after_its_digest_passed_and_read_by_another_replica()
         {
            let bucket = Arc::new(InMemory::new());
            let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let a = replica(dir_a.path(), &bucket);
            let blob = bytes_of(2 * shared::PART_SIZE + 12_345, 7);
            let digest = Algorithm::Sha256.digest(&blob);
            download(&a, &digest, &blob, holder("library/app")).await;
            let data = format!("cache/sha256/{}/data", digest.hex());
            let record = format!("cache/sha256/{}/holders/hub/library/app", digest.hex());
            until("published", async || keys(&bucket).await.contains(&record)).await;
            assert_eq!(keys(&bucket).await, [data.clone(), record]);
            let stored = bucket
                .get(&Key::from(data.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(stored, blob);

            let b = replica(dir_b.path(), &bucket);
            let object = b.object(&digest).await.unwrap();
            assert_eq!(object.place, Place::Shared);
            assert_eq!(object.size, blob.len() as u64);
            assert_eq!(object.holders, [holder("library/app")]);
            assert_eq!(read_all(&b, &digest).await.unwrap(), blob);
            until("in B's disk store", async || {
                b.store.lookup(&digest).is_some()
            })
            .await;
            assert_eq!(
                b.store.lookup(&digest).unwrap().holders,
                [holder("library/app")]
            );
        }

        #[tokio::test]
        async fn a_download_that_fails_its_digest_leaves_nothing_in_the_bucket() {
            let bucket = Arc::new(InMemory::new());
            let dir = tempfile::tempdir().unwrap();
            let a = replica(dir.path(), &bucket);
            for size in [1000, 2 * shared::PART_SIZE + 1] {
                let blob = bytes_of(size, 1);
                let claimed = Algorithm::Sha256.digest(&bytes_of(size, 2));
                download(&a, &claimed, &blob, holder("r")).await;
            }
            // The uploads saw the failures and aborted; give them the time a
            // success would take to show.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert_eq!(keys(&bucket).await, Vec::<String>::new());
            a.settle().await;
            assert_eq!(keys(&bucket).await, Vec::<String>::new());
        }

        #[tokio::test]
        async fn a_damaged_copy_in_the_bucket_is_not_served_and_is_deleted() {
            let bucket = Arc::new(InMemory::new());
            let dir = tempfile::tempdir().unwrap();
            let blob = bytes_of(300_000, 3);
            let digest = Algorithm::Sha256.digest(&blob);
            let dir_key = format!("cache/sha256/{}", digest.hex());
            let mut damaged = blob.to_vec();
            damaged[1234] ^= 1;
            bucket
                .put(&Key::from(format!("{dir_key}/data")), damaged.into())
                .await
                .unwrap();
            bucket
                .put(
                    &Key::from(format!("{dir_key}/holders/hub/r")),
                    Bytes::new().into(),
                )
                .await
                .unwrap();
            let b = replica(dir.path(), &bucket);
            assert!(read_all(&b, &digest).await.is_err());
            until("deleted", async || keys(&bucket).await.is_empty()).await;
            assert!(b.store.lookup(&digest).is_none(), "not kept on disk either");
        }

        #[tokio::test]
        async fn manifests_go_create_only_with_their_media_type_and_holders_add_up() {
            let bucket = Arc::new(InMemory::new());
            let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let a = replica(dir_a.path(), &bucket);
            let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
            let digest = Algorithm::Sha256.digest(&manifest);
            let media_type = MediaType::known(MediaType::OCI_MANIFEST);
            a.put_manifest(&digest, manifest.clone(), &media_type, holder("team/app"))
                .await
                .unwrap();
            let record = format!("cache/sha256/{}/holders/hub/team/app", digest.hex());
            until("published", async || keys(&bucket).await.contains(&record)).await;
            // A second replica storing the same bytes: "already exists" is
            // success, and its holder is added beside the first.
            let b = replica(dir_b.path(), &bucket);
            b.put_manifest(&digest, manifest.clone(), &media_type, holder("other/app"))
                .await
                .unwrap();
            let other = format!("cache/sha256/{}/holders/hub/other/app", digest.hex());
            until("second holder", async || {
                keys(&bucket).await.contains(&other)
            })
            .await;
            assert_eq!(keys(&bucket).await.len(), 3, "{:?}", keys(&bucket).await);

            let dir_c = tempfile::tempdir().unwrap();
            let c = replica(dir_c.path(), &bucket);
            let object = c.object(&digest).await.unwrap();
            assert_eq!(object.holders.len(), 2);
            let (read_type, bytes) = c.read_manifest(&digest).await.unwrap();
            assert_eq!((read_type, bytes), (media_type, manifest));
            assert!(c.store.lookup(&digest).is_some(), "kept in C's disk store");
        }

        #[tokio::test]
        async fn an_empty_blob_comes_from_the_bucket_and_no_blob_reads_as_a_manifest() {
            let bucket = Arc::new(InMemory::new());
            let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let a = replica(dir_a.path(), &bucket);
            let empty = Bytes::new();
            let digest = Algorithm::Sha256.digest(&empty);
            download(&a, &digest, &empty, holder("r")).await;
            until("published", async || keys(&bucket).await.len() == 2).await;
            let b = replica(dir_b.path(), &bucket);
            assert_eq!(read_all(&b, &digest).await.unwrap(), empty);
            assert!(
                b.read_manifest(&digest).await.is_none(),
                "a blob has no media type: never served as a manifest"
            );
            for _ in 0..4 {
                read_all(&b, &digest).await.unwrap();
            }
            let other = bytes_of(100, 4);
            let other_digest = Algorithm::Sha256.digest(&other);
            download(&a, &other_digest, &other, holder("r")).await;
            until("the second published", async || {
                keys(&bucket).await.len() == 4
            })
            .await;
            let dir_c = tempfile::tempdir().unwrap();
            let c = replica(dir_c.path(), &bucket);
            assert_eq!(
                read_all(&c, &other_digest).await.unwrap(),
                other,
                "the bucket is still in use after the empty blob's reads"
            );
        }

        #[tokio::test]
        async fn an_eviction_removes_the_object_from_the_bucket() {
            let bucket = Arc::new(InMemory::new());
            let dir = tempfile::tempdir().unwrap();
            let a = replica(dir.path(), &bucket);
            let blob = bytes_of(5000, 9);
            let digest = Algorithm::Sha256.digest(&blob);
            download(&a, &digest, &blob, holder("r")).await;
            until("published", async || keys(&bucket).await.len() == 2).await;
            assert!(a.evict(&digest).await.unwrap());
            assert_eq!(keys(&bucket).await, Vec::<String>::new());
            assert!(a.object(&digest).await.is_none());
        }
    }
}
