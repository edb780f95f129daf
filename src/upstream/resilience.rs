//! Resilience plumbing for upstream requests, protocol-neutral: retry
//! backoff with full jitter, `Retry-After` parsing, and the per-upstream
//! circuit breaker.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use tokio::time::Instant;

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

#[derive(Debug)]
enum CircuitState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; the rest are refused until it reports, or
    /// until another cooldown has passed (its caller may have gone away
    /// without a verdict).
    HalfOpen {
        probe_until: Instant,
    },
}

/// The phase of a circuit, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitPhase {
    /// Requests flow.
    Closed,
    /// One probe may go (or is out).
    HalfOpen,
    /// Requests are refused until the cooldown ends.
    Open,
}

impl CircuitPhase {
    /// The value of `oci_upstream_circuit_state`: 0 closed, 1 half-open,
    /// 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// A circuit's state and history, for the admin API and the gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitStatus {
    /// Its phase.
    pub phase: CircuitPhase,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    /// The last failure and when it was recorded.
    pub last_failure: Option<(String, SystemTime)>,
    /// Requests whose outcome was recorded.
    pub requests: u64,
    /// Of those, the failures.
    pub failures: u64,
}

/// A circuit breaker: opens after `threshold` consecutive failures, refuses
/// requests for `cooldown`, then lets one probe through; the probe's success
/// closes it, its failure opens it again, and a probe that never reports
/// (its caller went away) is replaced by another after a further cooldown.
#[derive(Debug)]
pub struct Circuit {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<CircuitState>,
    /// The last failure recorded, so a skipped upstream can say why.
    last_failure: Mutex<Option<(String, SystemTime)>>,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Failures since the last success.
    streak: AtomicU64,
}

impl Circuit {
    /// A closed circuit.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(CircuitState::Closed { failures: 0 }),
            last_failure: Mutex::new(None),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            streak: AtomicU64::new(0),
        }
    }

    /// The phase, the failure streak and the counts, now.
    pub fn status(&self) -> CircuitStatus {
        let phase = match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            CircuitState::Closed { .. } => CircuitPhase::Closed,
            // Its next request is the probe.
            CircuitState::Open { until } if Instant::now() >= until => CircuitPhase::HalfOpen,
            CircuitState::Open { .. } => CircuitPhase::Open,
            CircuitState::HalfOpen { .. } => CircuitPhase::HalfOpen,
        };
        CircuitStatus {
            phase,
            consecutive_failures: self.streak.load(Ordering::Relaxed),
            last_failure: self
                .last_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// True when a request may go to the upstream now.
    pub fn allow(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match *state {
            CircuitState::Closed { .. } => true,
            CircuitState::Open { until } | CircuitState::HalfOpen { probe_until: until }
                if now >= until =>
            {
                *state = CircuitState::HalfOpen {
                    probe_until: now + self.cooldown,
                };
                true
            }
            CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => false,
        }
    }

    /// The last failure recorded (what opened an open circuit).
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(why, _)| why.clone())
    }

    /// The upstream answered (any answer that is not its own failure).
    pub fn record_success(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = CircuitState::Closed { failures: 0 };
    }

    /// The upstream failed a request (after its retries), as `why` says.
    pub fn record_failure(&self, why: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.streak.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((why.to_owned(), SystemTime::now()));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let open = CircuitState::Open {
            until: Instant::now() + self.cooldown,
        };
        *state = match *state {
            CircuitState::Closed { failures } if failures + 1 >= self.threshold => open,
            CircuitState::Closed { failures } => CircuitState::Closed {
                failures: failures + 1,
            },
            CircuitState::HalfOpen { .. } | CircuitState::Open { .. } => open,
        };
    }
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

    #[tokio::test(start_paused = true)]
    async fn circuit_opens_probes_and_closes() {
        let c = Circuit::new(3, Duration::from_secs(30));
        c.record_failure("failed");
        c.record_failure("failed");
        assert!(c.allow());
        c.record_failure("failed");
        assert!(!c.allow(), "open after 3 failures");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(c.allow(), "one probe after the cooldown");
        assert!(!c.allow(), "only one probe at a time");
        c.record_failure("failed");
        assert!(!c.allow(), "a failed probe opens it again");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(c.allow());
        c.record_success();
        assert!(c.allow() && c.allow(), "closed after a successful probe");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_replaced() {
        let c = Circuit::new(1, Duration::from_secs(5));
        c.record_failure("failed");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(c.allow(), "the probe");
        assert!(!c.allow());
        // The probe's caller went away: no verdict.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(c.allow(), "another probe after a further cooldown");
    }

    #[test]
    fn an_open_circuit_remembers_what_opened_it() {
        let c = Circuit::new(2, Duration::from_secs(30));
        assert_eq!(c.last_failure(), None);
        c.record_failure("connection refused");
        c.record_failure("dns error: no such host");
        assert!(!c.allow());
        assert_eq!(c.last_failure().as_deref(), Some("dns error: no such host"));
    }
}
