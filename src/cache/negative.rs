//! Remembered "not found" answers (and content that failed verification),
//! per (upstream, [`NegativeKey`]), for `negative_ttl`, so a crash-looping
//! caller cannot hammer an upstream with the same miss, and a retry after
//! bad bytes goes to the next upstream. Bounded: at [`MAX_ENTRIES`], expired entries are swept and,
//! if it is still full, nothing new is remembered until they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::keys::NegativeKey;

/// Most entries kept.
const MAX_ENTRIES: usize = 100_000;

/// Why an upstream is remembered as not having something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Absence {
    /// It answered "not found".
    NotFound,
    /// It sent bytes that did not match the digest.
    Corrupt,
}

/// Negative entries with expiry.
#[derive(Debug)]
pub(crate) struct Negative {
    ttl: Duration,
    entries: Mutex<HashMap<(String, NegativeKey), (Instant, Absence)>>,
}

impl Negative {
    /// Remembers misses for `ttl` (zero disables).
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Why `upstream` is remembered as not having `key`, if it is.
    pub(crate) fn get(&self, upstream: &str, key: &NegativeKey) -> Option<Absence> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(upstream.to_owned(), key.clone()))
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, absence)| *absence)
    }

    #[cfg(test)]
    fn contains(&self, upstream: &str, key: &NegativeKey) -> bool {
        self.get(upstream, key).is_some()
    }

    /// Remembers that `upstream` does not have `key`, as `absence` says.
    pub(crate) fn insert(&self, upstream: &str, key: &NegativeKey, absence: Absence) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            (upstream.to_owned(), key.clone()),
            (now + self.ttl, absence),
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Repository;

    fn key(name: &str) -> NegativeKey {
        NegativeKey::Tags(Repository::parse(name).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl() {
        let n = Negative::new(Duration::from_secs(30));
        n.insert("a", &key("k"), Absence::NotFound);
        assert!(n.contains("a", &key("k")));
        assert!(!n.contains("b", &key("k")));
        assert!(!n.contains("a", &key("other")));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!n.contains("a", &key("k")));
        let off = Negative::new(Duration::ZERO);
        off.insert("a", &key("k"), Absence::NotFound);
        assert!(!off.contains("a", &key("k")));
    }

    #[tokio::test(start_paused = true)]
    async fn stays_bounded_however_many_repositories_are_named() {
        let n = Negative::new(Duration::from_secs(30));
        for i in 0..MAX_ENTRIES + 10 {
            n.insert("a", &key(&format!("r{i}")), Absence::NotFound);
        }
        assert_eq!(n.len(), MAX_ENTRIES, "full: nothing new is remembered");
        tokio::time::advance(Duration::from_secs(31)).await;
        n.insert("a", &key("fresh"), Absence::NotFound);
        assert_eq!(n.len(), 1, "expired entries are swept when full");
        assert!(n.contains("a", &key("fresh")));
    }
}
