//! Per-key async locks: the first caller for a [`LockKey`] does the work
//! while later ones wait, then find the result in the cache. The map holds
//! weak references, swept as it grows, so it stays as small as the number
//! of keys held at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::keys::LockKey;

/// Entries past which the map is swept of keys nobody holds.
const SWEEP_AT: usize = 1024;

/// Async locks by key.
#[derive(Debug, Default)]
pub(crate) struct KeyLocks {
    locks: Mutex<HashMap<LockKey, Weak<AsyncMutex<()>>>>,
}

/// A held lock; dropping it lets the next caller in.
pub(crate) type KeyGuard = OwnedMutexGuard<()>;

impl KeyLocks {
    fn entry(&self, key: &LockKey) -> Arc<AsyncMutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lock) = locks.get(key).and_then(Weak::upgrade) {
            return lock;
        }
        if locks.len() >= SWEEP_AT {
            locks.retain(|_, weak| weak.strong_count() > 0);
        }
        let lock = Arc::new(AsyncMutex::new(()));
        locks.insert(key.clone(), Arc::downgrade(&lock));
        lock
    }

    /// Waits for the lock on `key`.
    pub(crate) async fn lock(&self, key: &LockKey) -> KeyGuard {
        self.entry(key).lock_owned().await
    }

    /// Takes the lock on `key` if nobody holds it.
    pub(crate) fn try_lock(&self, key: &LockKey) -> Option<KeyGuard> {
        self.entry(key).try_lock_owned().ok()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;

    fn key(n: usize) -> LockKey {
        LockKey::Blob(Algorithm::Sha256.digest(n.to_string().as_bytes()))
    }

    #[tokio::test]
    async fn one_holder_per_key() {
        let locks = KeyLocks::default();
        let a = locks.lock(&key(1)).await;
        assert!(locks.try_lock(&key(1)).is_none());
        assert!(locks.try_lock(&key(2)).is_some());
        drop(a);
        assert!(locks.try_lock(&key(1)).is_some());
    }

    #[tokio::test]
    async fn released_keys_are_swept() {
        let locks = KeyLocks::default();
        let held = locks.lock(&key(0)).await;
        for n in 1..10 * SWEEP_AT {
            drop(locks.try_lock(&key(n)));
        }
        assert!(locks.len() <= SWEEP_AT + 1, "{} entries", locks.len());
        assert!(locks.try_lock(&key(0)).is_none(), "a held key survives");
        drop(held);
    }
}
