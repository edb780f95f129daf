//! The rate of a blob body over a sliding window, in one-second buckets:
//! whether the bytes of the last [`RATE_WINDOW`] reach `min_rate`. Sliding,
//! so that a fast start cannot hide a trickle for a second window: a body
//! that slows to a trickle is judged about one window after it slowed.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The span a body's rate is judged over.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What the rate says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not a whole window yet.
    Early,
    /// At least `min_rate` over the last window.
    Fast,
    /// Below `min_rate` over the last window.
    Slow,
}

/// Bytes received per second since the body started.
#[derive(Debug)]
pub(crate) struct RateWindow {
    start: Instant,
    /// (second since start, bytes in it), the last window's worth.
    buckets: VecDeque<(u64, u64)>,
    total: u64,
}

impl RateWindow {
    /// A window starting at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            start: now,
            buckets: VecDeque::with_capacity(RATE_WINDOW.as_secs() as usize + 1),
            total: 0,
        }
    }

    /// Counts `bytes` received at `now`.
    pub(crate) fn add(&mut self, now: Instant, bytes: u64) {
        let second = (now - self.start).as_secs();
        match self.buckets.back_mut() {
            Some((s, n)) if *s == second => *n += bytes,
            _ => self.buckets.push_back((second, bytes)),
        }
        self.total += bytes;
        self.forget_before(second);
    }

    fn forget_before(&mut self, second: u64) {
        let oldest = second.saturating_sub(RATE_WINDOW.as_secs());
        while self.buckets.front().is_some_and(|(s, _)| *s < oldest) {
            self.buckets.pop_front();
        }
    }

    /// Whether the last window's bytes reach `min_rate` bytes per second.
    pub(crate) fn verdict(&mut self, now: Instant, min_rate: u64) -> Verdict {
        let elapsed = now - self.start;
        if min_rate == 0 || elapsed < RATE_WINDOW {
            return Verdict::Early;
        }
        let second = elapsed.as_secs();
        self.forget_before(second);
        // The buckets of the last window: the current (partial) second and
        // the whole ones before it.
        let from = second.saturating_sub(RATE_WINDOW.as_secs() - 1);
        let recent: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s >= from)
            .map(|(_, n)| n)
            .sum();
        if recent >= min_rate.saturating_mul(RATE_WINDOW.as_secs()) {
            Verdict::Fast
        } else {
            Verdict::Slow
        }
    }

    /// True when, over at least a second, the body has come in below
    /// `min_rate` on average so far (for judging before a whole window).
    pub(crate) fn slow_so_far(&self, now: Instant, min_rate: u64) -> bool {
        let elapsed = now - self.start;
        elapsed >= Duration::from_secs(1)
            && (self.total as f64) < min_rate as f64 * elapsed.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_trickle_after_a_fast_start_is_slow_one_window_after_it_began() {
        let start = Instant::now();
        let mut rate = RateWindow::new(start);
        let at = |secs: f64| start + Duration::from_secs_f64(secs);
        // 10 MB in the first second, then 1 byte a second.
        rate.add(at(0.5), 10_000_000);
        for s in 1..=10 {
            rate.add(at(f64::from(s)), 1);
        }
        assert_eq!(rate.verdict(at(9.9), 64 * 1024), Verdict::Early);
        assert_eq!(
            rate.verdict(at(10.2), 64 * 1024),
            Verdict::Slow,
            "the burst slid out"
        );
        let mut steady = RateWindow::new(start);
        for s in 0..30 {
            steady.add(at(f64::from(s) + 0.1), 100_000);
        }
        assert_eq!(steady.verdict(at(29.5), 64 * 1024), Verdict::Fast);
        assert_eq!(
            steady.verdict(at(29.5), 0),
            Verdict::Early,
            "min_rate 0: never slow"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_so_far_needs_a_second_and_an_average_below_min_rate() {
        let start = Instant::now();
        let mut rate = RateWindow::new(start);
        rate.add(start + Duration::from_millis(100), 10);
        assert!(!rate.slow_so_far(start + Duration::from_millis(500), 1000));
        assert!(rate.slow_so_far(start + Duration::from_secs(2), 1000));
        rate.add(start + Duration::from_secs(2), 100_000);
        assert!(!rate.slow_so_far(start + Duration::from_secs(2), 1000));
    }
}
