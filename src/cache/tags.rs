//! Tag → digest entries. Kept in memory and persisted one small JSON file per
//! entry (written atomically), so a restarted service still knows its tags
//! and can serve them stale when every upstream fails.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::CacheError;
use crate::oci::Algorithm;

/// What a tag resolved to, and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagEntry {
    /// The manifest digest.
    pub digest: String,
    /// The manifest media type.
    pub media_type: String,
    /// The upstream that answered.
    pub upstream: String,
    /// When the upstream answered (milliseconds since the Unix epoch).
    pub fetched_at_ms: u64,
}

impl TagEntry {
    /// Milliseconds since the Unix epoch, now.
    pub fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// How old the entry is.
    pub fn age(&self) -> Duration {
        Duration::from_millis(Self::now_ms().saturating_sub(self.fetched_at_ms))
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    entry: TagEntry,
}

/// The tag entries.
#[derive(Debug)]
pub struct Tags {
    dir: PathBuf,
    entries: Mutex<HashMap<String, TagEntry>>,
}

impl Tags {
    /// Loads the persisted entries under `dir`.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        fs::create_dir_all(dir).map_err(|e| CacheError::at(dir, e))?;
        let mut entries = HashMap::new();
        for file in fs::read_dir(dir).map_err(|e| CacheError::at(dir, e))? {
            let path = file.map_err(|e| CacheError::at(dir, e))?.path();
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
            entries: Mutex::new(entries),
        })
    }

    /// The entry for `key`.
    pub fn get(&self, key: &str) -> Option<TagEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Stores the entry for `key` in memory and on disk.
    pub fn put(&self, key: &str, entry: TagEntry) -> Result<(), CacheError> {
        let name = Algorithm::Sha256.digest(key.as_bytes()).hex().to_owned();
        let path = self.dir.join(format!("{name}.json"));
        let temp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let stored = Stored {
            key: key.to_owned(),
            entry: entry.clone(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| CacheError::at(&path, e.into()))?;
        fs::write(&temp, bytes).map_err(|e| CacheError::at(&temp, e))?;
        fs::rename(&temp, &path).map_err(|e| CacheError::at(&path, e))?;
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let tags = Tags::open(dir.path()).unwrap();
        let entry = TagEntry {
            digest: "sha256:x".into(),
            media_type: "m".into(),
            upstream: "a".into(),
            fetched_at_ms: TagEntry::now_ms(),
        };
        tags.put("k", entry.clone()).unwrap();
        assert_eq!(tags.get("k"), Some(entry.clone()));
        std::fs::write(dir.path().join("junk.json"), b"not json").unwrap();
        let reloaded = Tags::open(dir.path()).unwrap();
        assert_eq!(reloaded.get("k"), Some(entry));
        assert!(!dir.path().join("junk.json").exists());
        assert!(reloaded.get("other").is_none());
    }
}
