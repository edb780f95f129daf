//! Failover: tries a request's candidate upstreams in priority order,
//! skipping those whose circuit is open or that are remembered as not
//! having the content, hedging when one is slow to answer, and folds every
//! failure into the request's final error.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::EngineCache;
use super::client::Upstream;
use super::error::{Error, Fault, FaultKind, Faults};
use crate::cache::{Absence, NegativeKey};

/// Tries `attempt` on the candidates in order and returns the first success
/// with the upstream that gave it; when all fail, the error their faults add
/// up to. When the candidate asked last has not answered within its
/// `hedge_after`, the next one is asked too, and the first good answer wins.
/// A "not found" (or content that failed verification, see
/// [`remember_corrupt`]) is remembered per (upstream, `key`) for the
/// negative TTL, and a remembered one skips the upstream. An attempt given
/// up before it answered (another won, or the caller left) counts as a
/// failure of its upstream. The upstream that answers is recorded in the
/// current span.
pub(crate) async fn try_in_order<T, F, Fut>(
    cache: &EngineCache,
    candidates: &[Arc<Upstream>],
    key: &NegativeKey,
    attempt: F,
) -> Result<(Arc<Upstream>, T), Error>
where
    F: Fn(Arc<Upstream>) -> Fut,
    Fut: Future<Output = Result<T, Fault>>,
{
    let mut faults = Faults::default();
    let mut next = candidates.iter();
    let mut running = FuturesUnordered::new();
    let mut hedge_after = None;
    loop {
        if running.is_empty() || hedge_after.is_none() {
            // Start the next candidate that may be asked, if any.
            match next_eligible(cache, &mut next, key, &mut faults) {
                Some(upstream) => {
                    hedge_after = Some(upstream.hedge_after());
                    running.push(watched(upstream.clone(), attempt(upstream.clone())));
                }
                None if running.is_empty() => break,
                None => {}
            }
        }
        let hedge_delay = hedge_after.filter(|_| next.len() > 0);
        let hedge = async move {
            match hedge_delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((upstream, outcome)) = running.next() => match outcome {
                Ok(value) => {
                    upstream.circuit().record_success();
                    tracing::Span::current().record("upstream", upstream.name());
                    return Ok((upstream, value));
                }
                Err(fault) => {
                    tracing::debug!(upstream = upstream.name(), %fault, "upstream failed; trying the next");
                    record_fault(&upstream, &fault);
                    match fault.kind() {
                        FaultKind::NotFound => {
                            cache.remember_absence(upstream.name(), key, Absence::NotFound);
                        }
                        FaultKind::Integrity => remember_corrupt(cache, &upstream, key),
                        _ => {}
                    }
                    faults.push(fault);
                    hedge_after = None;
                }
            },
            () = hedge => {
                tracing::debug!("no answer yet; asking the next upstream too");
                hedge_after = None;
            }
        }
    }
    // Logged once, where the request ends (the gRPC edge).
    Err(faults.into_error())
}

/// The next candidate that may be asked; those skipped (circuit open, or
/// remembered as not having `key`) leave their fault in `faults`.
fn next_eligible<'a>(
    cache: &EngineCache,
    candidates: &mut std::slice::Iter<'a, Arc<Upstream>>,
    key: &NegativeKey,
    faults: &mut Faults,
) -> Option<&'a Arc<Upstream>> {
    for upstream in candidates.by_ref() {
        if !upstream.circuit().allow() {
            faults.push(circuit_open(upstream));
            continue;
        }
        if let Some(absence) = cache.absence(upstream.name(), key) {
            let (kind, said) = match absence {
                Absence::NotFound => (FaultKind::NotFound, "answered \"not found\" for"),
                Absence::Corrupt => (
                    FaultKind::Integrity,
                    "sent bytes that failed verification for",
                ),
            };
            faults.push(Fault::new(
                kind,
                format!("upstream `{}` {said} {key} recently", upstream.name()),
            ));
            continue;
        }
        return Some(upstream);
    }
    None
}

/// Runs one attempt; if it is dropped before it answered, its upstream's
/// circuit counts a failure (a hung upstream must not look healthy because
/// its callers keep giving up first).
async fn watched<T>(
    upstream: Arc<Upstream>,
    attempt: impl Future<Output = Result<T, Fault>>,
) -> (Arc<Upstream>, Result<T, Fault>) {
    let mut guard = Unanswered(Some(upstream));
    let outcome = pin!(attempt).await;
    let upstream = guard.0.take().expect("set until the attempt answers");
    (upstream, outcome)
}

/// Held while an attempt runs; dropped with the upstream still in it means
/// the attempt was given up unanswered.
struct Unanswered(Option<Arc<Upstream>>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(upstream) = &self.0 {
            tracing::debug!(
                upstream = upstream.name(),
                "attempt given up before it answered"
            );
            upstream.circuit().record_failure(&format!(
                "upstream `{}` did not answer in time",
                upstream.name()
            ));
        }
    }
}

/// Counts a fault for the upstream's circuit breaker: a failure when the
/// upstream could not answer, a success when it answered "no".
pub(crate) fn record_fault(upstream: &Upstream, fault: &Fault) {
    if fault.is_upstream_failure() {
        upstream.circuit().record_failure(&fault.to_string());
    } else {
        upstream.circuit().record_success();
    }
}

/// Remembers that `upstream` sent bytes for `key` that failed verification,
/// so a retry goes to the next upstream for the negative TTL.
pub(crate) fn remember_corrupt(cache: &EngineCache, upstream: &Upstream, key: &NegativeKey) {
    cache.remember_absence(upstream.name(), key, Absence::Corrupt);
}

/// The fault of an upstream skipped because its circuit is open, carrying
/// the failure that opened it.
pub(crate) fn circuit_open(upstream: &Upstream) -> Fault {
    let last = upstream
        .circuit()
        .last_failure()
        .map(|why| format!(" (last: {why})"))
        .unwrap_or_default();
    Fault::unavailable(format!(
        "upstream `{}` is skipped: its circuit is open after repeated failures{last}",
        upstream.name()
    ))
}
