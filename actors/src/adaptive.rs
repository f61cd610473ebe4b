//! Adaptive limits: when the system is under pressure every effective rate
//! limit is tightened by half, and restored once the pressure is gone.
//!
//! Utilization comes from gateways (`PUT /v1/queue-health`) while their
//! report is fresh, else from Tally's own ingest mailboxes. Above 80 % the
//! factor drops to 0.5, below 40 % it returns to 1.0, and in between it
//! holds (hysteresis, so limits do not flap around one threshold).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use metrics::gauge;

use crate::telemetry::{QUEUE_UTILIZATION, RATE_LIMIT_FACTOR};

pub const TIGHTEN_ABOVE: f64 = 0.8;
pub const RESTORE_BELOW: f64 = 0.4;
pub const TIGHT_FACTOR: f64 = 0.5;
/// A gateway report older than this is stale (ms).
pub const REPORT_FRESH_MS: i64 = 10_000;

#[derive(Debug)]
pub struct AdaptiveLimits {
    /// f64 bits of the current factor.
    factor: AtomicU64,
    /// The last gateway report: (utilization, wall-clock ms).
    reported: Mutex<Option<(f64, i64)>>,
}

impl Default for AdaptiveLimits {
    fn default() -> Self {
        Self {
            factor: AtomicU64::new(1.0f64.to_bits()),
            reported: Mutex::new(None),
        }
    }
}

impl AdaptiveLimits {
    pub fn factor(&self) -> f64 {
        f64::from_bits(self.factor.load(Ordering::Relaxed))
    }

    /// A gateway's report; takes effect at once.
    pub fn report(&self, utilization: f64, now_ms: i64) -> f64 {
        if let Ok(mut r) = self.reported.lock() {
            *r = Some((utilization, now_ms));
        }
        self.apply(utilization)
    }

    /// Periodic update with Tally's own mailbox utilization, used when no
    /// gateway report is fresh. Returns the utilization in effect.
    pub fn tick(&self, own_utilization: f64, now_ms: i64) -> f64 {
        let fresh = self
            .reported
            .lock()
            .ok()
            .and_then(|r| *r)
            .filter(|&(_, at)| now_ms.saturating_sub(at) <= REPORT_FRESH_MS)
            .map(|(u, _)| u);
        let utilization = fresh.unwrap_or(own_utilization);
        self.apply(utilization);
        utilization
    }

    fn apply(&self, utilization: f64) -> f64 {
        let current = self.factor();
        let next = if utilization > TIGHTEN_ABOVE {
            TIGHT_FACTOR
        } else if utilization < RESTORE_BELOW {
            1.0
        } else {
            current
        };
        self.factor.store(next.to_bits(), Ordering::Relaxed);
        gauge!(RATE_LIMIT_FACTOR).set(next);
        gauge!(QUEUE_UTILIZATION).set(utilization);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis_between_forty_and_eighty_percent() {
        let a = AdaptiveLimits::default();
        // (utilization, factor after) worked by hand.
        let steps = [
            (0.5, 1.0),
            (0.81, 0.5),
            (0.6, 0.5),
            (0.4, 0.5),
            (0.39, 1.0),
            (0.79, 1.0),
            (0.8, 1.0),
            (0.95, 0.5),
        ];
        for (u, want) in steps {
            assert_eq!(a.report(u, 0), want, "utilization {u}");
        }
    }

    #[test]
    fn own_utilization_applies_when_the_report_is_stale() {
        let a = AdaptiveLimits::default();
        a.report(0.9, 1_000);
        assert_eq!(a.tick(0.0, 5_000), 0.9);
        assert_eq!(a.factor(), 0.5);
        assert_eq!(a.tick(0.1, 1_000 + REPORT_FRESH_MS + 1), 0.1);
        assert_eq!(a.factor(), 1.0);
    }
}
