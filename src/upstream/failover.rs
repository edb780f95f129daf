//! Failover: tries a request's candidate upstreams in priority order,
//! skipping those whose circuit is open or that recently answered "not
//! found", and folds every failure into the request's final error.

use std::future::Future;
use std::sync::Arc;

use super::EngineCache;
use super::client::Upstream;
use super::error::{Error, Fault, FaultKind, Faults};
use crate::cache::NegativeKey;

/// Tries `attempt` on each candidate in order and returns the first success
/// with the upstream that gave it; when all fail, the error their faults add
/// up to. A "not found" is remembered per (upstream, `key`) for the negative
/// TTL, and a remembered one skips the upstream. The upstream that answers
/// is recorded in the current span.
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
    for upstream in candidates {
        if !upstream.circuit().allow() {
            faults.push(circuit_open(upstream));
            continue;
        }
        if cache.is_not_found(upstream.name(), key) {
            faults.push(Fault::new(
                FaultKind::NotFound,
                format!(
                    "upstream `{}` answered \"not found\" for {key} recently",
                    upstream.name()
                ),
            ));
            continue;
        }
        match attempt(upstream.clone()).await {
            Ok(value) => {
                upstream.circuit().record_success();
                tracing::Span::current().record("upstream", upstream.name());
                return Ok((upstream.clone(), value));
            }
            Err(fault) => {
                tracing::debug!(upstream = upstream.name(), %fault, "upstream failed; trying the next");
                record_fault(upstream, &fault);
                if fault.is_not_found() {
                    cache.remember_not_found(upstream.name(), key);
                }
                faults.push(fault);
            }
        }
    }
    // Logged once, where the request ends (the gRPC edge).
    Err(faults.into_error())
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
