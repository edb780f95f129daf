//! Remembered "not found" answers, per (upstream, key), for `negative_ttl`,
//! so a crash-looping caller cannot hammer an upstream with the same miss.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most entries kept; past this, expired ones are purged and, if still full,
/// nothing new is remembered.
const MAX_ENTRIES: usize = 100_000;

/// Negative entries with expiry.
#[derive(Debug)]
pub struct Negative {
    ttl: Duration,
    entries: Mutex<HashMap<(String, String), Instant>>,
}

impl Negative {
    /// Remembers misses for `ttl` (zero disables).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// True when `upstream` recently answered "not found" for `key`.
    pub fn contains(&self, upstream: &str, key: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(upstream.to_owned(), key.to_owned()))
            .is_some_and(|&until| Instant::now() < until)
    }

    /// Remembers that `upstream` answered "not found" for `key`.
    pub fn insert(&self, upstream: &str, key: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, until| *until > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert((upstream.to_owned(), key.to_owned()), now + self.ttl);
    }

    /// Forgets `key` for `upstream` (it was found after all).
    pub fn remove(&self, upstream: &str, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(upstream.to_owned(), key.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_ttl() {
        let n = Negative::new(Duration::from_secs(30));
        n.insert("a", "k");
        assert!(n.contains("a", "k"));
        assert!(!n.contains("b", "k"));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!n.contains("a", "k"));
        let off = Negative::new(Duration::ZERO);
        off.insert("a", "k");
        assert!(!off.contains("a", "k"));
    }
}
