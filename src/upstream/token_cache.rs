//! Bearer tokens cached per scope (each upstream has its own cache), held
//! until shortly before they expire. Concurrent requests that need the same
//! token wait for one token request instead of each making their own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::auth::Secret;

/// Longest safety margin taken off a token's lifetime.
const MAX_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Cached {
    token: Secret,
    expires_at: Instant,
}

type Slot = Arc<Mutex<Option<Cached>>>;

/// Tokens by scope.
#[derive(Debug, Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Slot>>,
}

impl TokenCache {
    async fn slot(&self, scope: &str) -> Slot {
        let mut slots = self.slots.lock().await;
        slots.entry(scope.to_owned()).or_default().clone()
    }

    /// The cached, unexpired token for `scope`, if any.
    pub async fn get(&self, scope: &str) -> Option<Secret> {
        let slot = self.slot(scope).await;
        let cached = slot.lock().await;
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.expires_at)
            .map(|c| c.token.clone())
    }

    /// The cached token for `scope`, or a new one from `fetch` (which yields
    /// the token and its lifetime). Concurrent callers for one scope share a
    /// single `fetch`.
    pub async fn get_or_fetch<E, F, Fut>(&self, scope: &str, fetch: F) -> Result<Secret, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Secret, Duration), E>>,
    {
        let slot = self.slot(scope).await;
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.expires_at) {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = fetch().await?;
        let margin = (lifetime / 4).min(MAX_MARGIN);
        *cached = Some(Cached {
            token: token.clone(),
            expires_at: Instant::now() + lifetime.saturating_sub(margin),
        });
        Ok(token)
    }

    /// Drops `token` for `scope` (the upstream refused it), unless another
    /// request already replaced it.
    pub async fn invalidate(&self, scope: &str, token: &Secret) {
        let slot = self.slot(scope).await;
        let mut cached = slot.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == *token) {
            *cached = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn caches_until_shortly_before_expiry() {
        let cache = TokenCache::default();
        let calls = AtomicUsize::new(0);
        let fetch = || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>((Secret::new(format!("t{n}")), Duration::from_secs(60)))
        };
        assert_eq!(cache.get_or_fetch("s", fetch).await.unwrap().expose(), "t0");
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(cache.get_or_fetch("s", fetch).await.unwrap().expose(), "t0");
        assert_eq!(cache.get("s").await.unwrap().expose(), "t0");
        // 60 s lifetime, 15 s margin: stale after 45 s.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(cache.get("s").await.is_none());
        assert_eq!(cache.get_or_fetch("s", fetch).await.unwrap().expose(), "t1");
        assert_eq!(
            cache.get_or_fetch("other", fetch).await.unwrap().expose(),
            "t2"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("s", || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, ()>((Secret::new("t"), Duration::from_secs(60)))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "t");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalidate_drops_only_the_refused_token() {
        let cache = TokenCache::default();
        let t = cache
            .get_or_fetch("s", || async {
                Ok::<_, ()>((Secret::new("a"), Duration::from_secs(60)))
            })
            .await
            .unwrap();
        cache.invalidate("s", &Secret::new("other")).await;
        assert!(cache.get("s").await.is_some());
        cache.invalidate("s", &t).await;
        assert!(cache.get("s").await.is_none());
    }
}
