//! A circuit breaker per delivery endpoint (webhooks), as an explicit state
//! machine with time passed in, and retry backoff with jitter.
//!
//! `CLOSED` counts consecutive failures; at `failure_threshold` it opens.
//! `OPEN` refuses attempts until `reset_timeout_ms` has passed, then turns
//! `HALF_OPEN`, where at most `probe_count` attempts may be in flight; a
//! failure re-opens it, `success_threshold` successes close it. Every
//! transition is returned to the caller, which turns it into an event and
//! a metric. What counts as a failure is pluggable ([`Classify`]).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub reset_timeout_ms: i64,
    pub probe_count: u32,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            success_threshold: 2,
            reset_timeout_ms: 30_000,
            probe_count: 1,
        }
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The endpoint answered with this status after `latency_ms`.
    Answered {
        status: u16,
        latency_ms: f64,
    },
    /// No answer within the timeout, or the connection failed.
    TimedOut,
    ConnectionFailed,
}

/// Decides whether an outcome is a failure (for the breaker).
pub trait Classify {
    fn is_failure(&self, outcome: &Outcome) -> bool;
}

/// The usual classification: 5xx and 429 answers, timeouts, connection
/// failures, and (optionally) answers slower than a latency bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusTimeoutLatency {
    pub fail_on_5xx: bool,
    pub fail_on_429: bool,
    pub slow_ms: Option<f64>,
}

impl Default for StatusTimeoutLatency {
    fn default() -> Self {
        Self {
            fail_on_5xx: true,
            fail_on_429: true,
            slow_ms: None,
        }
    }
}

impl Classify for StatusTimeoutLatency {
    fn is_failure(&self, outcome: &Outcome) -> bool {
        match *outcome {
            Outcome::TimedOut | Outcome::ConnectionFailed => true,
            Outcome::Answered { status, latency_ms } => {
                (self.fail_on_5xx && status >= 500)
                    || (self.fail_on_429 && status == 429)
                    || self.slow_ms.is_some_and(|slow| latency_ms > slow)
            }
        }
    }
}

/// A state change, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: CircuitState,
    pub to: CircuitState,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Circuit {
    state: CircuitState,
    failures: u32,
    successes: u32,
    opened_at_ms: i64,
    probes_in_flight: u32,
}

impl Default for Circuit {
    fn default() -> Self {
        Self {
            state: CircuitState::Closed,
            failures: 0,
            successes: 0,
            opened_at_ms: 0,
            probes_in_flight: 0,
        }
    }
}

impl Circuit {
    pub fn state(&self) -> CircuitState {
        self.state
    }

    fn go(&mut self, to: CircuitState, now_ms: i64) -> Transition {
        let from = self.state;
        self.state = to;
        self.failures = 0;
        self.successes = 0;
        self.probes_in_flight = 0;
        if to == CircuitState::Open {
            self.opened_at_ms = now_ms;
        }
        Transition {
            from,
            to,
            at_ms: now_ms,
        }
    }

    /// May an attempt start now? Returns the permission and a transition
    /// (OPEN -> HALF_OPEN once the reset timeout has passed).
    pub fn try_acquire(&mut self, cfg: &CircuitConfig, now_ms: i64) -> (bool, Option<Transition>) {
        let mut transition = None;
        if self.state == CircuitState::Open
            && now_ms.saturating_sub(self.opened_at_ms) >= cfg.reset_timeout_ms
        {
            transition = Some(self.go(CircuitState::HalfOpen, now_ms));
        }
        let allowed = match self.state {
            CircuitState::Closed => true,
            CircuitState::Open => false,
            CircuitState::HalfOpen => {
                if self.probes_in_flight < cfg.probe_count.max(1) {
                    self.probes_in_flight += 1;
                    true
                } else {
                    false
                }
            }
        };
        (allowed, transition)
    }

    /// When the next attempt may start (for scheduling retries).
    pub fn next_attempt_ms(&self, cfg: &CircuitConfig, now_ms: i64) -> i64 {
        match self.state {
            CircuitState::Open => self
                .opened_at_ms
                .saturating_add(cfg.reset_timeout_ms)
                .max(now_ms),
            _ => now_ms,
        }
    }

    /// Records how an acquired attempt ended.
    pub fn record(
        &mut self,
        cfg: &CircuitConfig,
        classify: &impl Classify,
        outcome: &Outcome,
        now_ms: i64,
    ) -> Option<Transition> {
        let failed = classify.is_failure(outcome);
        match self.state {
            CircuitState::Closed => {
                if failed {
                    self.failures += 1;
                    if self.failures >= cfg.failure_threshold.max(1) {
                        return Some(self.go(CircuitState::Open, now_ms));
                    }
                } else {
                    self.failures = 0;
                }
                None
            }
            CircuitState::HalfOpen => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                if failed {
                    return Some(self.go(CircuitState::Open, now_ms));
                }
                self.successes += 1;
                if self.successes >= cfg.success_threshold.max(1) {
                    return Some(self.go(CircuitState::Closed, now_ms));
                }
                None
            }
            // A late answer to an attempt started before the circuit opened.
            CircuitState::Open => None,
        }
    }
}

/// Exponential backoff with full jitter: a wait in `[0, min(max, base *
/// 2^attempt)]`, chosen by `unit` in `[0, 1)` (passed in, so deterministic
/// in tests and replays).
pub fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64, unit: f64) -> u64 {
    let cap = base_ms
        .saturating_mul(1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX))
        .min(max_ms);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    (cap as f64 * unit) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: Outcome = Outcome::Answered {
        status: 503,
        latency_ms: 5.0,
    };
    const OK: Outcome = Outcome::Answered {
        status: 200,
        latency_ms: 5.0,
    };

    fn cfg() -> CircuitConfig {
        CircuitConfig {
            failure_threshold: 3,
            success_threshold: 2,
            reset_timeout_ms: 10_000,
            probe_count: 1,
        }
    }

    #[test]
    fn opens_probes_and_closes_as_worked_by_hand() {
        let (c, k) = (cfg(), StatusTimeoutLatency::default());
        let mut b = Circuit::default();
        let mut transitions = Vec::new();
        // t=0..2: three failures in a row open it at t=2 (a success in
        // between would have reset the count).
        for (t, outcome) in [
            (0, FAIL),
            (1, OK),
            (2, FAIL),
            (3, FAIL),
            (4, Outcome::TimedOut),
        ] {
            assert!(b.try_acquire(&c, t).0, "closed allows at {t}");
            transitions.extend(b.record(&c, &k, &outcome, t));
        }
        assert_eq!(b.state(), CircuitState::Open);
        // Refused until t = 4 + 10 s.
        assert_eq!(b.try_acquire(&c, 10_003), (false, None));
        assert_eq!(b.next_attempt_ms(&c, 5_000), 10_004);
        // Half-open at 10 004: one probe, a second is refused; it fails and
        // re-opens; 10 s later two probes succeed and close it.
        let (allowed, t) = b.try_acquire(&c, 10_004);
        assert!(allowed);
        transitions.extend(t);
        assert!(!b.try_acquire(&c, 10_005).0, "probe_count = 1");
        transitions.extend(b.record(&c, &k, &FAIL, 10_006));
        assert!(!b.try_acquire(&c, 20_005).0);
        for t in [20_006, 20_007] {
            let (allowed, tr) = b.try_acquire(&c, t);
            assert!(allowed);
            transitions.extend(tr);
            transitions.extend(b.record(&c, &k, &OK, t));
        }
        use CircuitState::*;
        let path: Vec<(CircuitState, CircuitState, i64)> = transitions
            .iter()
            .map(|t| (t.from, t.to, t.at_ms))
            .collect();
        assert_eq!(
            path,
            vec![
                (Closed, Open, 4),
                (Open, HalfOpen, 10_004),
                (HalfOpen, Open, 10_006),
                (Open, HalfOpen, 20_006),
                (HalfOpen, Closed, 20_007),
            ]
        );
    }

    #[test]
    fn classification_is_pluggable() {
        let strict = StatusTimeoutLatency {
            fail_on_5xx: true,
            fail_on_429: false,
            slow_ms: Some(100.0),
        };
        assert!(strict.is_failure(&Outcome::Answered {
            status: 200,
            latency_ms: 150.0
        }));
        assert!(!strict.is_failure(&Outcome::Answered {
            status: 429,
            latency_ms: 1.0
        }));
        assert!(strict.is_failure(&Outcome::ConnectionFailed));
        struct Only404;
        impl Classify for Only404 {
            fn is_failure(&self, o: &Outcome) -> bool {
                matches!(o, Outcome::Answered { status: 404, .. })
            }
        }
        let mut b = Circuit::default();
        let c = CircuitConfig {
            failure_threshold: 1,
            ..cfg()
        };
        assert_eq!(b.record(&c, &Only404, &FAIL, 0), None);
        let not_found = Outcome::Answered {
            status: 404,
            latency_ms: 1.0,
        };
        assert!(b.record(&c, &Only404, &not_found, 1).is_some());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        assert_eq!(backoff_ms(0, 100, 10_000, 0.999_999), 99);
        assert_eq!(backoff_ms(3, 100, 10_000, 0.5), 400);
        assert_eq!(backoff_ms(10, 100, 10_000, 0.5), 5_000);
        assert_eq!(backoff_ms(200, u64::MAX, u64::MAX, 1.0), u64::MAX);
        assert_eq!(backoff_ms(5, 100, 10_000, f64::NAN), 0);
    }
}
