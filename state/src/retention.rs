//! Retention by event time, enforced without scans: compaction filters drop
//! expired records as RocksDB rewrites files anyway, and reads apply the
//! same rule, so answers never depend on when compaction ran.
//!
//! The clock of a partition is the highest event time it has flushed, so a
//! replay of old traffic keeps its history instead of expiring on arrival.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tally_pipelines::time::{Granularity, Period, DAY_MS, HOUR_MS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub minute_ms: i64,
    pub hour_ms: i64,
    pub day_ms: i64,
    pub dedupe_window_ms: i64,
    /// Dead letters are kept this long after they were recorded (wall clock).
    pub dead_letter_ms: i64,
    /// Alert log entries are kept this long after they were logged (wall
    /// clock): how far back a subscriber can resume.
    pub alerts_ms: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            minute_ms: 48 * HOUR_MS,
            hour_ms: 90 * DAY_MS,
            day_ms: 730 * DAY_MS,
            dedupe_window_ms: HOUR_MS,
            dead_letter_ms: 7 * DAY_MS,
            alerts_ms: 7 * DAY_MS,
        }
    }
}

impl Retention {
    pub fn for_granularity(&self, g: Granularity) -> i64 {
        match g {
            Granularity::Minute => self.minute_ms,
            Granularity::Hour => self.hour_ms,
            Granularity::Day => self.day_ms,
        }
    }

    /// Whether a period's totals have aged out: they are kept as long as
    /// the buckets they are assembled from (hour buckets for hours, day
    /// buckets for the rest).
    pub fn period_expired(
        &self,
        period: Period,
        period_start_ms: i64,
        clock_ms: Option<i64>,
    ) -> bool {
        let (_, end) = period.bounds(period_start_ms);
        clock_ms.is_some_and(|now| {
            end <= now.saturating_sub(self.for_granularity(period.granularity()))
        })
    }

    /// Whether a bucket has aged out, given its partition's clock.
    pub fn bucket_expired(
        &self,
        g: Granularity,
        bucket_start_ms: i64,
        clock_ms: Option<i64>,
    ) -> bool {
        clock_ms.is_some_and(|now| {
            bucket_start_ms.saturating_add(g.width_ms())
                <= now.saturating_sub(self.for_granularity(g))
        })
    }
}

/// The event-time clock of every partition (highest flushed event time).
#[derive(Debug)]
pub struct PartitionClocks {
    clocks: Vec<AtomicI64>,
}

const UNKNOWN: i64 = i64::MIN;

impl PartitionClocks {
    pub fn new(partitions: u16) -> Self {
        Self {
            clocks: (0..partitions).map(|_| AtomicI64::new(UNKNOWN)).collect(),
        }
    }

    pub fn get(&self, partition: u16) -> Option<i64> {
        let v = self
            .clocks
            .get(usize::from(partition))?
            .load(Ordering::Relaxed);
        (v != UNKNOWN).then_some(v)
    }

    pub fn advance(&self, partition: u16, event_ms: i64) {
        if let Some(c) = self.clocks.get(usize::from(partition)) {
            c.fetch_max(event_ms, Ordering::Relaxed);
        }
    }
}

pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_bucket_expires_after_48_hours_of_event_time() {
        let r = Retention::default();
        let bucket = 0;
        assert!(!r.bucket_expired(Granularity::Minute, bucket, None));
        assert!(!r.bucket_expired(Granularity::Minute, bucket, Some(48 * HOUR_MS)));
        assert!(r.bucket_expired(Granularity::Minute, bucket, Some(48 * HOUR_MS + 60_000)));
        assert!(!r.bucket_expired(Granularity::Hour, bucket, Some(48 * HOUR_MS + 60_000)));
    }

    #[test]
    fn clocks_only_move_forward() {
        let c = PartitionClocks::new(2);
        assert_eq!(c.get(0), None);
        c.advance(0, 10);
        c.advance(0, 5);
        assert_eq!(c.get(0), Some(10));
        assert_eq!(c.get(1), None);
        assert_eq!(c.get(9), None);
    }
}
