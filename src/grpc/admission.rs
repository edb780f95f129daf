//! Admission of RPCs: at most `max_concurrent_rpcs` at once (the excess is
//! refused at once with RESOURCE_EXHAUSTED rather than queued), and none
//! once draining for shutdown has begun (UNAVAILABLE, so clients go to
//! another replica). A permit lives as long as its RPC, for a stream until
//! the stream ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The gate every RPC of the service passes.
#[derive(Debug)]
pub struct Admission {
    permits: Arc<Semaphore>,
    max: u32,
    draining: AtomicBool,
}

/// Held while an RPC runs.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    /// A gate for at most `max` concurrent RPCs.
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

    /// Admits an RPC, or refuses it.
    pub fn admit(&self) -> Result<Permit, Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable(
                "the server is shutting down; retry on another replica",
            ));
        }
        self.permits
            .clone()
            .try_acquire_owned()
            .map(Permit)
            .map_err(|_| {
                tracing::warn!(max = self.max, "overloaded: refusing an RPC");
                Status::resource_exhausted(format!(
                    "the server is at its limit of {} concurrent calls; retry later",
                    self.max
                ))
            })
    }

    /// Refuses new RPCs from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Resolves when no admitted RPC is running.
    pub async fn drained(&self) {
        if let Ok(all) = self.permits.acquire_many(self.max).await {
            drop(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[tokio::test]
    async fn sheds_excess_and_drains() {
        let gate = Admission::new(2);
        let a = gate.admit().unwrap();
        let b = gate.admit().unwrap();
        assert_eq!(gate.admit().unwrap_err().code(), Code::ResourceExhausted);
        drop(a);
        let c = gate.admit().unwrap();
        gate.start_draining();
        assert_eq!(gate.admit().unwrap_err().code(), Code::Unavailable);
        let drained = tokio::spawn(async move {
            gate.drained().await;
        });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        drop((b, c));
        drained.await.unwrap();
    }
}
