//! Resilience plumbing for upstream requests, protocol-neutral: retry
//! backoff with full jitter and `Retry-After` parsing. The per-upstream
//! circuit breaker is [`crate::circuit`]'s, which the shared cache tier
//! uses too.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

pub use crate::circuit::{Circuit, CircuitPhase, CircuitStatus};

/// First retry's backoff ceiling; doubles with each retry up to the cap.
const BASE_DELAY: Duration = Duration::from_millis(100);

/// How long to wait before retry number `attempt` (0 for the first retry):
/// what the upstream asked for (`Retry-After`), else a random delay up to
/// `BASE_DELAY * 2^attempt` (full jitter); never more than `cap`.
pub fn backoff(attempt: u32, retry_after: Option<Duration>, cap: Duration) -> Duration {
    if let Some(asked) = retry_after {
        return asked.min(cap);
    }
    let ceiling = BASE_DELAY
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(cap);
    ceiling.mul_f64(fastrand::f64())
}

/// `Retry-After` as a delay: seconds, or an HTTP date (a date in the past is
/// zero).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_is_jittered_capped_and_honours_retry_after() {
        for attempt in 0..10 {
            let d = backoff(attempt, None, Duration::from_secs(1));
            assert!(d <= (BASE_DELAY * 2u32.pow(attempt)).min(Duration::from_secs(1)));
        }
        assert_eq!(
            backoff(0, Some(Duration::from_secs(3)), Duration::from_secs(10)),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff(0, Some(Duration::from_secs(30)), Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
