//! The disk store's index in memory: each committed object's size, media
//! type and holders, the use order for least-recently-used eviction, and
//! the bytes stored and reserved by commits under way.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::store::Holder;
use crate::oci::MediaType;

/// One committed object.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) size: u64,
    /// The known manifest types are not stored once per object.
    pub(super) media_type: Option<Cow<'static, str>>,
    pub(super) holders: Vec<Holder>,
    pub(super) tick: u64,
}

impl Entry {
    /// A media type as an entry keeps it: a known one borrowed, any other
    /// owned.
    pub(super) fn media_type(media_type: Option<String>) -> Option<Cow<'static, str>> {
        media_type.map(|m| match MediaType::KNOWN.iter().find(|k| **k == m) {
            Some(known) => Cow::Borrowed(*known),
            None => Cow::Owned(m),
        })
    }
}

/// Every committed object, and their use order. Each digest is kept once,
/// shared by the map and the use order (100,000 objects must fit in well
/// under 64 MiB).
#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<Arc<str>, Entry>,
    /// Use order: tick → digest, oldest first.
    pub(super) order: BTreeMap<u64, Arc<str>>,
    pub(super) tick: u64,
    pub(super) total: u64,
    /// Bytes of commits under way (room made, not yet indexed).
    pub(super) reserved: u64,
}

impl Index {
    pub(super) fn touch(&mut self, digest: &str) {
        self.tick += 1;
        let tick = self.tick;
        let Some(key) = self.entries.get_key_value(digest).map(|(k, _)| k.clone()) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(digest) {
            self.order.remove(&entry.tick);
            entry.tick = tick;
            self.order.insert(tick, key);
        }
    }

    pub(super) fn insert(&mut self, digest: String, mut entry: Entry) {
        self.tick += 1;
        entry.tick = self.tick;
        self.total += entry.size;
        let digest: Arc<str> = Arc::from(digest);
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
        if let Some(entry) = self.entries.remove(&*digest) {
            self.total -= entry.size;
        }
        Some(digest.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_media_types_are_not_stored_per_object() {
        let known = Entry::media_type(Some(MediaType::OCI_MANIFEST.to_owned()));
        assert!(matches!(
            known,
            Some(Cow::Borrowed(MediaType::OCI_MANIFEST))
        ));
        let other = Entry::media_type(Some("application/vnd.example+json".to_owned()));
        assert!(matches!(other, Some(Cow::Owned(_))));
        assert!(Entry::media_type(None).is_none());
    }

    #[test]
    fn the_use_order_shares_each_digest_with_the_map() {
        let mut index = Index::default();
        let entry = || Entry {
            size: 1,
            media_type: None,
            holders: Vec::new(),
            tick: 0,
        };
        index.insert("sha256:a".to_owned(), entry());
        index.insert("sha256:b".to_owned(), entry());
        index.touch("sha256:a");
        let (key, _) = index.entries.get_key_value("sha256:a").unwrap();
        let in_order = index.order.values().find(|d| &***d == "sha256:a").unwrap();
        assert!(Arc::ptr_eq(key, in_order), "one allocation per digest");
        assert_eq!(
            index.pop_oldest().as_deref(),
            Some("sha256:b"),
            "b is least recently used"
        );
        assert_eq!(index.total, 1);
    }
}
