//! Admission of requests, from either front (gRPC and the OCI mirror): at
//! most `max_concurrent_rpcs` at once (the excess is refused at once rather
//! than queued), and none once draining for shutdown has begun (so clients
//! go to another replica). A permit lives as long as its request, for a
//! stream until the stream ends. Each front maps [`Refused`] to its own
//! protocol.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Shutting down.
    #[error("the server is shutting down; retry on another replica")]
    Draining,
    /// At the limit.
    #[error("the server is at its limit of {0} concurrent calls; retry later")]
    Overloaded(u32),
}

/// The gate every request of the service passes.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max: u32,
    draining: AtomicBool,
}

/// Held while a request runs.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    /// A gate for at most `max` concurrent requests.
    pub fn new(max: usize) -> Self {
        let max = u32::try_from(max)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        Self {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
            draining: AtomicBool::new(false),
        }
    }

    /// Admits a request, or refuses it.
    pub fn admit(&self) -> Result<Permit, Refused> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Refused::Draining);
        }
        self.permits
            .clone()
            .try_acquire_owned()
            .map(Permit)
            .map_err(|_| {
                tracing::warn!(max = self.max, "overloaded: refusing a request");
                Refused::Overloaded(self.max)
            })
    }

    /// Refuses new requests from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Resolves when no admitted request is running.
    pub async fn drained(&self) {
        if let Ok(all) = self.permits.acquire_many(self.max).await {
            drop(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sheds_excess_and_drains() {
        let gate = Admission::new(2);
        let a = gate.admit().unwrap();
        let b = gate.admit().unwrap();
        assert_eq!(gate.admit().unwrap_err(), Refused::Overloaded(2));
        drop(a);
        let c = gate.admit().unwrap();
        gate.start_draining();
        assert_eq!(gate.admit().unwrap_err(), Refused::Draining);
        let drained = tokio::spawn(async move {
            gate.drained().await;
        });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop((b, c));
        drained.await.unwrap();
    }
}
