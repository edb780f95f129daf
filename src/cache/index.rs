//! The disk store's index in memory: each committed object's size, media
//! type and holders, the use order for least-recently-used eviction, and
//! the bytes stored and reserved by commits under way.

use std::collections::{BTreeMap, HashMap};

use super::store::Holder;

/// One committed object.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) size: u64,
    pub(super) media_type: Option<String>,
    pub(super) holders: Vec<Holder>,
    pub(super) tick: u64,
}

/// Every committed object, and their use order.
#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<String, Entry>,
    /// Use order: tick → digest, oldest first.
    pub(super) order: BTreeMap<u64, String>,
    pub(super) tick: u64,
    pub(super) total: u64,
    /// Bytes of commits under way (room made, not yet indexed).
    pub(super) reserved: u64,
}

impl Index {
    pub(super) fn touch(&mut self, digest: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(digest) {
            self.order.remove(&entry.tick);
            entry.tick = tick;
            self.order.insert(tick, digest.to_owned());
        }
    }

    pub(super) fn insert(&mut self, digest: String, mut entry: Entry) {
        self.tick += 1;
        entry.tick = self.tick;
        self.total += entry.size;
        self.order.insert(entry.tick, digest.clone());
        if let Some(old) = self.entries.insert(digest, entry) {
            self.order.remove(&old.tick);
            self.total -= old.size;
        }
    }

    pub(super) fn remove(&mut self, digest: &str) -> bool {
        let Some(entry) = self.entries.remove(digest) else {
            return false;
        };
        self.order.remove(&entry.tick);
        self.total -= entry.size;
        true
    }

    pub(super) fn pop_oldest(&mut self) -> Option<String> {
        let (_, digest) = self.order.pop_first()?;
        if let Some(entry) = self.entries.remove(&digest) {
            self.total -= entry.size;
        }
        Some(digest)
    }
}
