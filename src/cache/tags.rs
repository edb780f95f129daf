//! Tag → digest entries. Kept in memory and persisted one small JSON file per
//! entry (written atomically, off the async threads), so a restarted service
//! still knows its tags and can serve them stale when every upstream fails.
//! The store decides an entry's [`Freshness`] from its age and the TTLs.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::CacheError;
use super::keys::TagKey;
use crate::oci::{Algorithm, Digest};

/// Most tag entries kept (one per repository, tag and `Accept` asked),
/// however many names callers try.
const MAX_ENTRIES: usize = 50_000;

/// What a tag resolved to, and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct TagEntry {
    /// The manifest digest.
    pub(crate) digest: String,
    /// The manifest media type.
    pub(crate) media_type: String,
    /// The upstream that answered.
    pub(crate) upstream: String,
    /// When the upstream answered (milliseconds since the Unix epoch).
    pub(crate) fetched_at_ms: u64,
}

impl TagEntry {
    /// Milliseconds since the Unix epoch at `time`.
    pub(crate) fn millis(time: SystemTime) -> u64 {
        time.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// How old the entry is at `now`.
    fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(Self::millis(now).saturating_sub(self.fetched_at_ms))
    }
}

/// How usable a tag entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// Younger than `tag_ttl`: served as it is.
    Fresh,
    /// Older, but younger than `stale_if_error`: served while a refresh runs,
    /// and when every upstream fails.
    Stale,
    /// Older than `stale_if_error`: never served.
    Expired,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    entry: TagEntry,
}

/// The tag entries.
#[derive(Debug)]
pub(crate) struct Tags {
    dir: PathBuf,
    ttl: Duration,
    stale_if_error: Duration,
    /// Most entries kept; the oldest go first.
    max_entries: usize,
    /// By the key's text, which is also what the file name is derived from.
    entries: Mutex<HashMap<String, TagEntry>>,
}

impl Tags {
    /// Loads the persisted entries under `dir` (blocking; at start).
    pub(crate) fn open(
        dir: &Path,
        ttl: Duration,
        stale_if_error: Duration,
    ) -> Result<Self, CacheError> {
        fs::create_dir_all(dir).map_err(|e| CacheError::io("create the tag directory", dir, e))?;
        let mut entries = HashMap::new();
        let listing = fs::read_dir(dir).map_err(|e| CacheError::io("list tags", dir, e))?;
        for file in listing {
            let path = file
                .map_err(|e| CacheError::io("list tags", dir, e))?
                .path();
            match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Stored>(&b).ok())
            {
                Some(stored) => {
                    entries.insert(stored.key, stored.entry);
                }
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            ttl,
            stale_if_error,
            max_entries: MAX_ENTRIES,
            entries: Mutex::new(entries),
        })
    }

    /// The entry for `key` and how fresh it is at `now`.
    pub(crate) fn get(&self, key: &TagKey, now: SystemTime) -> Option<(TagEntry, Freshness)> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key.to_string())
            .cloned()?;
        let freshness = self.freshness(&entry, now);
        Some((entry, freshness))
    }

    fn freshness(&self, entry: &TagEntry, now: SystemTime) -> Freshness {
        let age = entry.age(now);
        if age < self.ttl {
            Freshness::Fresh
        } else if age < self.stale_if_error {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Stores the entry for `key` on disk (on a blocking thread), then in
    /// memory.
    pub(crate) async fn put(
        self: &Arc<Self>,
        key: &TagKey,
        entry: TagEntry,
    ) -> Result<(), CacheError> {
        let key = key.to_string();
        let stored = Stored {
            key: key.clone(),
            entry: entry.clone(),
        };
        let evicted = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let evicted = if entries.contains_key(&key) {
                Vec::new()
            } else {
                make_room(&mut entries, self.max_entries)
            };
            entries.insert(key, entry);
            evicted
        };
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            for key in &evicted {
                let _ = fs::remove_file(entry_path(&dir, key));
            }
            write_entry(&dir, &stored)
        })
        .await
        .map_err(CacheError::task)?
    }
}

/// Entries evicted at once when the store is full: a slice of the oldest,
/// so one scan pays for many inserts.
const EVICT_FRACTION: usize = 100;

/// When `entries` holds `max` already, removes the oldest hundredth (by
/// when they were fetched) and returns their keys.
fn make_room(entries: &mut HashMap<String, TagEntry>, max: usize) -> Vec<String> {
    if entries.len() < max {
        return Vec::new();
    }
    let count = (max / EVICT_FRACTION).max(1);
    let mut by_age: Vec<(u64, &String)> =
        entries.iter().map(|(k, e)| (e.fetched_at_ms, k)).collect();
    by_age.select_nth_unstable(count - 1);
    let oldest: Vec<String> = by_age[..count].iter().map(|(_, k)| (*k).clone()).collect();
    for key in &oldest {
        entries.remove(key);
    }
    oldest
}

impl Tags {
    /// Drops the entry for `key` (the tag is gone upstream), on disk and in
    /// memory.
    pub(crate) async fn remove(&self, key: &TagKey) -> Result<(), CacheError> {
        let key = key.to_string();
        let removed = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if removed.is_none() {
            return Ok(());
        }
        let path = entry_path(&self.dir, &key);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CacheError::io("remove a tag entry", &path, e))
            }
            _ => Ok(()),
        }
    }

    /// Drops every entry that names `digest`, on disk and in memory; how
    /// many there were.
    pub(crate) async fn remove_naming(&self, digest: &Digest) -> Result<usize, CacheError> {
        let keys: Vec<String> = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<String> = entries
                .iter()
                .filter(|(_, e)| e.digest == digest.as_str())
                .map(|(k, _)| k.clone())
                .collect();
            for key in &keys {
                entries.remove(key);
            }
            keys
        };
        let (dir, count) = (self.dir.clone(), keys.len());
        tokio::task::spawn_blocking(move || {
            for key in &keys {
                let path = entry_path(&dir, key);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(CacheError::io("remove a tag entry", &path, e));
                    }
                    _ => {}
                }
            }
            Ok(count)
        })
        .await
        .map_err(CacheError::task)?
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The file of the entry for a key's text.
fn entry_path(dir: &Path, key: &str) -> PathBuf {
    let name = Algorithm::Sha256.digest(key.as_bytes()).hex().to_owned();
    dir.join(format!("{name}.json"))
}

/// Writes one entry atomically: a temp file renamed over the entry's file.
fn write_entry(dir: &Path, stored: &Stored) -> Result<(), CacheError> {
    let path = entry_path(dir, &stored.key);
    let temp = path.with_extension(format!("{}.tmp", std::process::id()));
    let bytes = serde_json::to_vec(stored)
        .map_err(|e| CacheError::io("encode a tag entry", &path, e.into()))?;
    fs::write(&temp, bytes).map_err(|e| CacheError::io("write a tag entry", &temp, e))?;
    fs::rename(&temp, &path).map_err(|e| CacheError::io("write a tag entry", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Repository, Tag};

    fn key(tag: &str) -> TagKey {
        TagKey::new(
            &Repository::parse("r").unwrap(),
            &Tag::parse(tag).unwrap(),
            None,
            &[],
        )
    }

    fn entry(fetched_at: SystemTime) -> TagEntry {
        TagEntry {
            digest: "sha256:x".into(),
            media_type: "m".into(),
            upstream: "a".into(),
            fetched_at_ms: TagEntry::millis(fetched_at),
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn persist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let tags = Arc::new(Tags::open(dir.path(), MINUTE, 10 * MINUTE).unwrap());
        let now = SystemTime::now();
        tags.put(&key("k"), entry(now)).await.unwrap();
        assert_eq!(
            tags.get(&key("k"), now),
            Some((entry(now), Freshness::Fresh))
        );
        std::fs::write(dir.path().join("junk.json"), b"not json").unwrap();
        let reloaded = Tags::open(dir.path(), MINUTE, 10 * MINUTE).unwrap();
        assert_eq!(
            reloaded.get(&key("k"), now),
            Some((entry(now), Freshness::Fresh))
        );
        assert!(!dir.path().join("junk.json").exists());
        assert!(reloaded.get(&key("other"), now).is_none());
    }

    #[tokio::test]
    async fn freshness_follows_age_and_ttls() {
        let dir = tempfile::tempdir().unwrap();
        let tags = Arc::new(Tags::open(dir.path(), MINUTE, 10 * MINUTE).unwrap());
        let fetched = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        tags.put(&key("k"), entry(fetched)).await.unwrap();
        let at = |secs| {
            tags.get(&key("k"), fetched + Duration::from_secs(secs))
                .map(|(_, f)| f)
        };
        assert_eq!(at(0), Some(Freshness::Fresh));
        assert_eq!(at(59), Some(Freshness::Fresh));
        assert_eq!(at(60), Some(Freshness::Stale));
        assert_eq!(at(599), Some(Freshness::Stale));
        assert_eq!(at(600), Some(Freshness::Expired));
        // A clock that went back counts as age zero.
        assert_eq!(
            tags.get(&key("k"), fetched - MINUTE).map(|(_, f)| f),
            Some(Freshness::Fresh)
        );
    }

    #[tokio::test]
    async fn a_removed_entry_is_gone_after_a_reload_too() {
        let dir = tempfile::tempdir().unwrap();
        let tags = Arc::new(Tags::open(dir.path(), MINUTE, 10 * MINUTE).unwrap());
        let now = SystemTime::now();
        tags.put(&key("k"), entry(now)).await.unwrap();
        tags.put(&key("other"), entry(now)).await.unwrap();
        tags.remove(&key("k")).await.unwrap();
        tags.remove(&key("never")).await.unwrap();
        assert!(tags.get(&key("k"), now).is_none());
        let reloaded = Tags::open(dir.path(), MINUTE, 10 * MINUTE).unwrap();
        assert!(reloaded.get(&key("k"), now).is_none());
        assert!(reloaded.get(&key("other"), now).is_some());
    }

    #[tokio::test]
    async fn entries_stay_bounded_and_the_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut tags = Tags::open(dir.path(), MINUTE, 10 * MINUTE).unwrap();
        tags.max_entries = 200;
        let tags = Arc::new(tags);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..1000u64 {
            let key = key(&format!("t{i}"));
            tags.put(&key, entry(start + Duration::from_secs(i)))
                .await
                .unwrap();
        }
        let now = start + Duration::from_secs(1000);
        let kept = (0..1000)
            .filter(|i| tags.get(&key(&format!("t{i}")), now).is_some())
            .count();
        assert!(kept <= 200, "{kept} entries kept");
        assert!(tags.get(&key("t999"), now).is_some(), "the newest stays");
        assert!(tags.get(&key("t0"), now).is_none(), "the oldest went");
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files <= 200, "{files} files on disk");
        // Rewriting an existing key evicts nothing.
        tags.put(&key("t999"), entry(now)).await.unwrap();
        assert!(tags.get(&key("t998"), now).is_some());
    }
}
