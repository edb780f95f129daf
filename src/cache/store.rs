//! The content-addressable disk store. Objects (blobs and manifests) are
//! immutable and keyed by digest:
//!
//! ```text
//! objects/sha256/<hex>        the bytes
//! objects/sha256/<hex>.meta   JSON: size, media type, holders
//! tmp/                        downloads in progress (emptied at start)
//! ```
//!
//! An object enters the store only by [`Store::commit`]: its bytes were
//! written to a temp file, hashed, synced, and then renamed into place, so a
//! crash at any point leaves either nothing or a whole verified object. The
//! `.meta` is renamed in before the bytes; bytes without one are never
//! indexed. The store is bounded by `max_size` with least-recently-used
//! eviction; a reader keeps its open file across eviction (unlinking does not
//! disturb open descriptors).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::CacheError;
use super::index::{Entry, Index};
use crate::metrics::Metrics;
use crate::oci::{Digest, MediaType};

/// An upstream and the repository name on it that is known to hold an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct Holder {
    /// The upstream's configured name.
    pub(crate) upstream: String,
    /// The repository's name on that upstream.
    pub(crate) repository: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    size: u64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    holders: Vec<Holder>,
}

/// A committed object.
#[derive(Debug, Clone)]
pub(crate) struct Object {
    /// Its size.
    pub(crate) size: u64,
    /// Its media type, for manifests.
    pub(crate) media_type: Option<MediaType>,
    /// Upstream repositories known to hold it.
    pub(crate) holders: Vec<Holder>,
    /// Where the bytes are.
    pub(crate) place: Place,
}

/// Where a committed object's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    /// In this file of the disk store.
    Disk(PathBuf),
    /// In the shared tier only (read into the disk store when opened).
    Shared,
}

/// Bytes of small objects (manifests) kept in memory as well.
const HOT_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
struct ByLength;

impl quick_cache::Weighter<String, Bytes> for ByLength {
    fn weight(&self, _: &String, bytes: &Bytes) -> u64 {
        bytes.len() as u64 + 64
    }
}

/// The disk store.
#[derive(Debug)]
pub(crate) struct Store {
    objects: PathBuf,
    tmp: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    counter: AtomicU64,
    /// Manifests in memory, so warm manifest requests touch no file.
    hot: quick_cache::sync::Cache<String, Bytes, ByLength>,
    /// Stored bytes and evictions are counted here.
    metrics: Arc<Metrics>,
}

impl Store {
    /// Opens the store: creates the directories, deletes leftovers of
    /// interrupted downloads and indexes committed objects (oldest modified
    /// first, as the best guess at use order).
    pub(crate) fn open(
        objects: &Path,
        tmp: &Path,
        max_size: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CacheError> {
        fs::create_dir_all(objects).map_err(|e| CacheError::io("access the store", objects, e))?;
        if tmp.exists() {
            fs::remove_dir_all(tmp).map_err(|e| CacheError::io("access the store", tmp, e))?;
        }
        fs::create_dir_all(tmp).map_err(|e| CacheError::io("access the store", tmp, e))?;
        let store = Self {
            objects: objects.to_owned(),
            tmp: tmp.to_owned(),
            max_size,
            index: Mutex::new(Index::default()),
            counter: AtomicU64::new(0),
            hot: quick_cache::sync::Cache::with_weighter(4096, HOT_BYTES, ByLength),
            metrics,
        };
        store.scan()?;
        Ok(store)
    }

    fn scan(&self) -> Result<(), CacheError> {
        let mut found = Vec::new();
        for algorithm in fs::read_dir(&self.objects)
            .map_err(|e| CacheError::io("access the store", &self.objects, e))?
        {
            let dir = algorithm
                .map_err(|e| CacheError::io("access the store", &self.objects, e))?
                .path();
            let Some(alg) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            for file in
                fs::read_dir(&dir).map_err(|e| CacheError::io("access the store", &dir, e))?
            {
                let path = file
                    .map_err(|e| CacheError::io("access the store", &dir, e))?
                    .path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some(hex) = name.strip_suffix(".meta") else {
                    continue;
                };
                let Ok(digest) = Digest::parse(&format!("{alg}:{hex}")) else {
                    continue;
                };
                let data = self.path(&digest);
                let meta = fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Meta>(&b).ok());
                let data_len = fs::metadata(&data)
                    .ok()
                    .map(|m| (m.len(), m.modified().ok()));
                match (meta, data_len) {
                    (Some(meta), Some((len, modified))) if len == meta.size => {
                        found.push((modified, digest.to_string(), meta));
                    }
                    // A crash between the two renames, or a damaged pair.
                    _ => {
                        let _ = fs::remove_file(&path);
                        let _ = fs::remove_file(&data);
                    }
                }
            }
        }
        found.sort_by_key(|(modified, _, _)| *modified);
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        for (_, digest, meta) in found {
            index.insert(
                digest,
                Entry {
                    size: meta.size,
                    media_type: Entry::media_type(meta.media_type),
                    holders: meta.holders,
                    tick: 0,
                },
            );
        }
        Ok(())
    }

    /// Where an object's bytes live.
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.objects
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.objects
            .join(digest.algorithm().name())
            .join(format!("{}.meta", digest.hex()))
    }

    /// The committed object, marking it used.
    pub(crate) fn lookup(&self, digest: &Digest) -> Option<Object> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.touch(digest.as_str());
        self.object(&index, digest)
    }

    /// The committed object, without marking it used (the scrubber's
    /// reads must not look like demand to the LRU).
    pub(crate) fn lookup_quietly(&self, digest: &Digest) -> Option<Object> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        self.object(&index, digest)
    }

    fn object(&self, index: &Index, digest: &Digest) -> Option<Object> {
        let entry = index.entries.get(digest.as_str())?;
        Some(Object {
            size: entry.size,
            media_type: entry
                .media_type
                .as_deref()
                .and_then(|m| MediaType::parse(m).ok()),
            holders: entry.holders.clone(),
            place: Place::Disk(self.path(digest)),
        })
    }

    /// The digests of every committed object, oldest use first.
    pub(crate) fn digests(&self) -> Vec<Digest> {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index
            .order
            .values()
            .filter_map(|d| Digest::parse(d).ok())
            .collect()
    }

    /// A new temp file for a download.
    pub(crate) fn temp_file(&self) -> Result<(PathBuf, fs::File), CacheError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}", std::process::id()));
        let file =
            fs::File::create(&path).map_err(|e| CacheError::io("access the store", &path, e))?;
        Ok((path, file))
    }

    /// Moves a verified temp file into the store (blocking I/O). Returns
    /// false when the object is larger than the whole store and was dropped.
    /// Evicts least-recently-used objects to stay under `max_size`.
    pub(crate) fn commit(
        &self,
        temp: &Path,
        digest: &Digest,
        size: u64,
        media_type: Option<&MediaType>,
        holders: Vec<Holder>,
    ) -> Result<bool, CacheError> {
        if size > self.max_size {
            let _ = fs::remove_file(temp);
            return Ok(false);
        }
        if self.lookup(digest).is_some() {
            let _ = fs::remove_file(temp);
            for holder in holders {
                self.add_holder(digest, holder)?;
            }
            return Ok(true);
        }
        // Make room first (space is reserved under the lock, so concurrent
        // commits cannot overshoot together), so the directory never holds
        // more than max_size.
        let evicted = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let mut evicted = Vec::new();
            while index.total + index.reserved + size > self.max_size {
                match index.pop_oldest() {
                    Some(d) => evicted.push(d),
                    None => break,
                }
            }
            index.reserved += size;
            evicted
        };
        self.metrics.evicted(evicted.len() as u64);
        for d in evicted {
            if let Ok(d) = Digest::parse(&d) {
                tracing::debug!(digest = %d, "evicting from cache");
                self.remove_files(&d);
            }
        }
        let meta = Meta {
            size,
            media_type: media_type.map(|m| m.to_string()),
            holders,
        };
        let placed = self.place(temp, digest, &meta);
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        index.reserved -= size;
        placed?;
        self.metrics.stored(size);
        index.insert(
            digest.to_string(),
            Entry {
                size,
                media_type: Entry::media_type(meta.media_type),
                holders: meta.holders,
                tick: 0,
            },
        );
        Ok(true)
    }

    /// Removes a committed object (blocking I/O): it is no longer served,
    /// and a reader that has it open keeps reading. False when it was not
    /// stored.
    pub(crate) fn evict(&self, digest: &Digest) -> bool {
        let removed = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest.as_str());
        if removed {
            self.metrics.evicted(1);
            self.remove_files(digest);
        }
        removed
    }

    /// Deletes an object's files (its `.meta` first, so a crash in between
    /// leaves bytes that are never indexed) and its copy in memory.
    fn remove_files(&self, digest: &Digest) {
        self.hot.remove(digest.as_str());
        let _ = fs::remove_file(self.meta_path(digest));
        let _ = fs::remove_file(self.path(digest));
    }

    /// Renames the `.meta`, then the bytes, into place.
    fn place(&self, temp: &Path, digest: &Digest, meta: &Meta) -> Result<(), CacheError> {
        let dir = self.objects.join(digest.algorithm().name());
        fs::create_dir_all(&dir).map_err(|e| CacheError::io("access the store", &dir, e))?;
        self.write_meta(digest, meta)?;
        let data = self.path(digest);
        fs::rename(temp, &data).map_err(|e| CacheError::io("access the store", &data, e))
    }

    /// Writes a small object (a manifest) straight into the store.
    pub(crate) fn put(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &MediaType,
        holders: Vec<Holder>,
    ) -> Result<bool, CacheError> {
        let (temp, mut file) = self.temp_file()?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(|e| CacheError::io("access the store", &temp, e))?;
        drop(file);
        let kept = self.commit(&temp, digest, bytes.len() as u64, Some(media_type), holders)?;
        if kept {
            self.hot.insert(digest.to_string(), bytes);
        }
        Ok(kept)
    }

    /// The bytes of a small committed object (a manifest), from memory when
    /// they are there.
    pub(crate) async fn read_small(&self, digest: &Digest) -> Option<Bytes> {
        self.lookup(digest)?;
        if let Some(bytes) = self.hot.get(digest.as_str()) {
            return Some(bytes);
        }
        let bytes = Bytes::from(tokio::fs::read(self.path(digest)).await.ok()?);
        self.hot.insert(digest.to_string(), bytes.clone());
        Some(bytes)
    }

    /// Records that `holder` holds the object.
    pub(crate) fn add_holder(&self, digest: &Digest, holder: Holder) -> Result<(), CacheError> {
        let meta = {
            let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = index.entries.get_mut(digest.as_str()) else {
                return Ok(());
            };
            if entry.holders.contains(&holder) {
                return Ok(());
            }
            entry.holders.push(holder);
            Meta {
                size: entry.size,
                media_type: entry.media_type.as_deref().map(str::to_owned),
                holders: entry.holders.clone(),
            }
        };
        self.write_meta(digest, &meta)
    }

    fn write_meta(&self, digest: &Digest, meta: &Meta) -> Result<(), CacheError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let temp = self.tmp.join(format!("{}-{n}.meta", std::process::id()));
        let bytes = serde_json::to_vec(meta)
            .map_err(|e| CacheError::io("access the store", &temp, e.into()))?;
        fs::write(&temp, bytes).map_err(|e| CacheError::io("access the store", &temp, e))?;
        let path = self.meta_path(digest);
        fs::rename(&temp, &path).map_err(|e| CacheError::io("access the store", &path, e))
    }

    /// Bytes and number of committed objects.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        (index.total, index.entries.len() as u64)
    }

    /// The store's size bound.
    pub(crate) fn max_size(&self) -> u64 {
        self.max_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn holder() -> Holder {
        Holder {
            upstream: "a".into(),
            repository: "r".into(),
        }
    }

    fn put(store: &Store, bytes: &[u8]) -> Digest {
        let digest = Algorithm::Sha256.digest(bytes);
        store
            .put(
                &digest,
                Bytes::copy_from_slice(bytes),
                &MediaType::known(MediaType::OCI_MANIFEST),
                vec![holder()],
            )
            .unwrap();
        digest
    }

    #[test]
    fn survives_reopen_and_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let (objects, tmp) = (dir.path().join("objects"), dir.path().join("tmp"));
        let store = Store::open(&objects, &tmp, 1 << 20, Arc::default()).unwrap();
        let digest = put(&store, b"hello");
        let (leftover, _) = store.temp_file().unwrap();
        // A data file with no .meta, as after a crash mid-commit.
        let orphan = Algorithm::Sha256.digest(b"orphan");
        std::fs::write(store.path(&orphan), b"orphan").unwrap();
        drop(store);

        let store = Store::open(&objects, &tmp, 1 << 20, Arc::default()).unwrap();
        let object = store.lookup(&digest).unwrap();
        assert_eq!(object.size, 5);
        assert_eq!(object.holders, [holder()]);
        assert_eq!(object.place, Place::Disk(store.path(&digest)));
        assert_eq!(std::fs::read(store.path(&digest)).unwrap(), b"hello");
        assert!(!leftover.exists());
        assert!(store.lookup(&orphan).is_none());
    }

    #[test]
    fn evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(
            &dir.path().join("o"),
            &dir.path().join("t"),
            10,
            metrics.clone(),
        )
        .unwrap();
        let a = put(&store, b"aaaa");
        let b = put(&store, b"bbbb");
        assert!(store.lookup(&a).is_some()); // a is now newer than b
        let c = put(&store, b"cccc");
        assert!(store.lookup(&b).is_none(), "b was least recently used");
        assert!(!store.path(&b).exists());
        assert!(store.lookup(&a).is_some() && store.lookup(&c).is_some());
        assert!(store.usage().0 <= 10);
        let text = String::from_utf8(metrics.render().1).unwrap();
        assert!(
            text.contains("oci_upstream_cache_evictions_total 1"),
            "{text}"
        );
        assert!(
            text.contains("oci_upstream_cache_stored_bytes_total 12"),
            "{text}"
        );
        // Larger than the whole store: not kept.
        let big = Algorithm::Sha256.digest(&[0u8; 11]);
        assert!(
            !store
                .put(
                    &big,
                    Bytes::from_static(&[0u8; 11]),
                    &MediaType::known(MediaType::OCI_MANIFEST),
                    vec![holder()]
                )
                .unwrap()
        );
        assert!(store.lookup(&big).is_none());
    }

    #[test]
    fn holders_accumulate_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let (objects, tmp) = (dir.path().join("objects"), dir.path().join("tmp"));
        let store = Store::open(&objects, &tmp, 1 << 20, Arc::default()).unwrap();
        let digest = put(&store, b"x");
        let other = Holder {
            upstream: "b".into(),
            repository: "s".into(),
        };
        store.add_holder(&digest, other.clone()).unwrap();
        store.add_holder(&digest, other.clone()).unwrap();
        drop(store);
        let store = Store::open(&objects, &tmp, 1 << 20, Arc::default()).unwrap();
        assert_eq!(store.lookup(&digest).unwrap().holders, [holder(), other]);
    }
}
