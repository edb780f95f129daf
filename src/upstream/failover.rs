//! Failover: tries a request's candidate upstreams in priority order,
//! skipping those whose circuit is open or that recently answered "not
//! found", and folds every failure into the request's final error.

use std::future::Future;
use std::sync::Arc;

use super::client::Upstream;
use super::error::{Error, Fault, FaultKind, Faults};
use crate::cache::negative::Negative;

/// Tries `attempt` on each candidate in order and returns the first success
/// with the upstream that gave it; when all fail, the error their faults add
/// up to. A "not found" is remembered per (upstream, `key`) for the negative
/// TTL, and a remembered one skips the upstream.
pub(crate) async fn try_in_order<T, F, Fut>(
    negative: &Negative,
    candidates: &[Arc<Upstream>],
    key: &str,
    attempt: F,
) -> Result<(Arc<Upstream>, T), Error>
where
    F: Fn(Arc<Upstream>) -> Fut,
    Fut: Future<Output = Result<T, Fault>>,
{
    let mut faults = Faults::default();
    for upstream in candidates {
        if !upstream.circuit().allow() {
            faults.push(Fault::unavailable(format!(
                "upstream `{}` is skipped: its circuit is open after repeated failures",
                upstream.name()
            )));
            continue;
        }
        if negative.contains(upstream.name(), key) {
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
                return Ok((upstream.clone(), value));
            }
            Err(fault) => {
                tracing::debug!(upstream = upstream.name(), %fault, "upstream failed; trying the next");
                if fault.is_upstream_failure() {
                    upstream.circuit().record_failure();
                } else {
                    upstream.circuit().record_success();
                }
                if fault.is_not_found() {
                    negative.insert(upstream.name(), key);
                }
                faults.push(fault);
            }
        }
    }
    let error = faults.into_error();
    if !matches!(error, Error::NotFound(_)) {
        tracing::warn!(%error, "no upstream could answer");
    }
    Err(error)
}
