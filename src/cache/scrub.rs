//! The scrubber: goes round the store re-hashing every object at a bounded
//! rate (`cache.scrub_rate`), and evicts any whose bytes no longer match
//! their digest (a flipped bit on disk, a file changed behind the service's
//! back), so the next request fetches it again. It reads through the
//! blocking pool one piece at a time and sleeps between pieces, so it never
//! holds more than a piece in memory nor more than its share of the disk.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Cache;
use crate::oci::Digest;

/// Bytes read and hashed at a time.
const PIECE: usize = 1024 * 1024;
/// Delay before the first pass, so start-up (and the first requests, on a
/// cold page cache) is not slowed.
pub(crate) const FIRST_PASS_AFTER: Duration = Duration::from_secs(8);
/// Shortest time between the starts of two passes (a small store is not
/// re-read in a tight loop).
const MIN_PASS: Duration = Duration::from_secs(10);

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pass {
    /// Objects whose bytes matched.
    pub(crate) verified: u64,
    /// Objects evicted because their bytes did not match.
    pub(crate) evicted: u64,
}

impl<E: Clone + Send + Sync + 'static> Cache<E> {
    /// Scrubs the store until `stop`, at `rate` bytes per second.
    pub(crate) async fn scrub(self: Arc<Self>, rate: u64, stop: CancellationToken) {
        let mut wait = FIRST_PASS_AFTER;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
            let started = tokio::time::Instant::now();
            let pass = self.scrub_pass(rate, &stop).await;
            if pass.evicted > 0 {
                tracing::warn!(
                    evicted = pass.evicted,
                    verified = pass.verified,
                    "scrub pass evicted damaged objects"
                );
            } else {
                tracing::debug!(verified = pass.verified, "scrub pass done");
            }
            wait = MIN_PASS.saturating_sub(started.elapsed());
        }
    }

    /// One pass over every object stored when it starts.
    pub(crate) async fn scrub_pass(&self, rate: u64, stop: &CancellationToken) -> Pass {
        let mut pass = Pass::default();
        for digest in self.store.digests() {
            if stop.is_cancelled() {
                break;
            }
            match self.scrub_one(&digest, rate, stop).await {
                Some(true) => pass.verified += 1,
                Some(false) => {
                    tracing::warn!(%digest, "stored object fails its digest; evicting it");
                    self.store.evict(&digest);
                    pass.evicted += 1;
                }
                None => {}
            }
        }
        pass
    }

    /// Whether the stored bytes of `digest` hash to it; `None` when it is
    /// gone (evicted meanwhile), unreadable, or the scrub was stopped.
    async fn scrub_one(
        &self,
        digest: &Digest,
        rate: u64,
        stop: &CancellationToken,
    ) -> Option<bool> {
        let object = self.store.lookup_quietly(digest)?;
        let mut file = File::open(self.store.path(digest)).ok()?;
        let mut verifier = digest.algorithm().verifier();
        let mut left = object.size;
        while left > 0 {
            let len = usize::try_from(left).unwrap_or(PIECE).min(PIECE);
            let started = tokio::time::Instant::now();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len];
                file.read_exact(&mut buf).map(|()| {
                    verifier.update(&buf);
                    (file, verifier)
                })
            })
            .await
            .ok()?;
            (file, verifier) = match read {
                Ok(state) => state,
                // Shorter than its record: damaged.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Some(false),
                Err(_) => return None,
            };
            left -= len as u64;
            // Paced: `len` bytes take len / rate seconds.
            let budget = Duration::from_secs_f64(len as f64 / rate as f64);
            tokio::select! {
                () = tokio::time::sleep(budget.saturating_sub(started.elapsed())) => {}
                () = stop.cancelled() => return None,
            }
        }
        let longer = file.read(&mut [0u8; 1]).ok()? > 0;
        Some(!longer && verifier.finish() == *digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Holder;
    use crate::config::{CacheConfig, CacheDir};
    use crate::oci::{Algorithm, MediaType};
    use bytes::Bytes;

    #[tokio::test]
    async fn a_pass_evicts_objects_whose_bytes_changed_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cache: Cache<super::super::Failed> = Cache::open(
            &CacheConfig {
                dir: CacheDir::configured(dir.path().to_owned()),
                ..CacheConfig::default()
            },
            Default::default(),
        )
        .unwrap();
        let holder = Holder {
            upstream: "a".into(),
            repository: "r".into(),
        };
        let media_type = MediaType::known(MediaType::OCI_MANIFEST);
        let big: Vec<u8> = (0..3 * PIECE + 17).map(|i| (i % 251) as u8).collect();
        let mut digests = Vec::new();
        for bytes in [b"intact".to_vec(), b"flipped".to_vec(), big] {
            let digest = Algorithm::Sha256.digest(&bytes);
            cache
                .put_manifest(&digest, Bytes::from(bytes), &media_type, holder.clone())
                .await
                .unwrap();
            digests.push(digest);
        }
        let flipped = dir.path().join("objects/sha256").join(digests[1].hex());
        std::fs::write(&flipped, b"flapped").unwrap();
        let stop = CancellationToken::new();
        let pass = cache.scrub_pass(64 << 20, &stop).await;
        assert_eq!(
            pass,
            Pass {
                verified: 2,
                evicted: 1
            }
        );
        assert!(
            cache.object(&digests[1]).await.is_none(),
            "the damaged one is gone"
        );
        assert!(!flipped.exists());
        assert!(
            cache.object(&digests[0]).await.is_some() && cache.object(&digests[2]).await.is_some()
        );
    }
}
