//! A circuit breaker, protocol-neutral: after repeated failures a
//! dependency (an upstream registry, the shared cache tier) is skipped for
//! a cooldown, then probed by one request.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

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
    /// The last failure recorded, so a skipped dependency can say why.
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

    /// True when a request may go to the dependency now.
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

    /// The dependency answered (any answer that is not its own failure).
    pub fn record_success(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = CircuitState::Closed { failures: 0 };
    }

    /// The dependency failed a request (after its retries), as `why` says.
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
