//! Retention by event time, enforced without scans: compaction filters drop
//! expired records as RocksDB rewrites files anyway, and reads apply the
//! same rule, so answers never depend on when compaction ran.
//!
//! The clock of a partition is the highest event time it has flushed, so a
//! replay of old traffic keeps its history instead of expiring on arrival.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tally_pipelines::time::{Granularity, Period, DAY_MS, HOUR_MS};

use crate::keys;

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
    /// Telemetry buckets: `(resolution, retention)` in ms per stored
    /// resolution (unused entries are `(0, 0)`), by the partition's
    /// telemetry clock.
    pub telemetry: [(u32, i64); MAX_TELEMETRY_RESOLUTIONS],
}

/// Stored telemetry resolutions at most.
pub const MAX_TELEMETRY_RESOLUTIONS: usize = 8;

impl Default for Retention {
    fn default() -> Self {
        Self {
            minute_ms: 48 * HOUR_MS,
            hour_ms: 90 * DAY_MS,
            day_ms: 730 * DAY_MS,
            dedupe_window_ms: HOUR_MS,
            dead_letter_ms: 7 * DAY_MS,
            alerts_ms: 7 * DAY_MS,
            telemetry: [
                (10_000, 2 * DAY_MS),
                (60_000, 30 * DAY_MS),
                (3_600_000, 400 * DAY_MS),
                (86_400_000, 1_830 * DAY_MS),
                (0, 0),
                (0, 0),
                (0, 0),
                (0, 0),
            ],
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

    /// Whether a `stats` key (a bucket or a period's totals) has aged out,
    /// given its partition's clock.
    pub fn stats_key_expired(&self, key: &[u8], clock_ms: Option<i64>) -> bool {
        match keys::decode_stats_key(key) {
            Some(k) => self.bucket_expired(k.granularity, k.bucket_start_ms, clock_ms),
            None => keys::decode_period_totals_key(key)
                .is_some_and(|k| self.period_expired(k.period, k.period_start_ms, clock_ms)),
        }
    }

    /// Whether a telemetry bucket has aged out, given its partition's
    /// telemetry clock: it ended longer ago than its resolution's
    /// retention. A resolution no longer configured keeps its buckets
    /// (dropping history on a configuration edit would be worse).
    pub fn telemetry_key_expired(&self, key: &[u8], clock_ms: Option<i64>) -> bool {
        let Some((resolution, start)) = keys::decode_telemetry_key_time(key) else {
            return false;
        };
        self.telemetry_bucket_expired(resolution, start, clock_ms)
    }

    pub fn telemetry_bucket_expired(
        &self,
        resolution_ms: u32,
        start_ms: i64,
        clock_ms: Option<i64>,
    ) -> bool {
        let Some(&(_, keep)) = self
            .telemetry
            .iter()
            .find(|(r, _)| *r == resolution_ms && *r > 0)
        else {
            return false;
        };
        clock_ms.is_some_and(|now| {
            start_ms.saturating_add(i64::from(resolution_ms)) <= now.saturating_sub(keep)
        })
    }

    /// How far a partition's clock moves between two changelog sweeps for
    /// expired keys: an eighth of the shortest retention, at least a minute
    /// (each sweep reads the partition's `stats` keys once).
    pub fn sweep_step_ms(&self) -> i64 {
        (self.minute_ms.min(self.hour_ms).min(self.day_ms) / 8).max(60_000)
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

/// The event-time clock of every partition (highest flushed event time),
/// and, with a changelog, the clock up to which expired keys have been
/// published as deleted.
#[derive(Debug)]
pub struct PartitionClocks {
    clocks: Vec<AtomicI64>,
    published: Vec<AtomicI64>,
    /// Set in Kafka mode: compaction may drop only what the changelog has
    /// published as deleted, or the changelog would keep it forever.
    guarded: AtomicBool,
}

const UNKNOWN: i64 = i64::MIN;

impl PartitionClocks {
    pub fn new(partitions: u16) -> Self {
        Self {
            clocks: (0..partitions).map(|_| AtomicI64::new(UNKNOWN)).collect(),
            published: (0..partitions).map(|_| AtomicI64::new(UNKNOWN)).collect(),
            guarded: AtomicBool::new(false),
        }
    }

    /// From now on compaction drops by [`PartitionClocks::drop_clock`].
    pub fn guard_with_changelog(&self) {
        self.guarded.store(true, Ordering::SeqCst);
    }

    /// The clock by which compaction may drop a partition's expired keys:
    /// its clock, or with a changelog the clock its expired keys were
    /// published as deleted at (nothing before the first such round).
    pub fn drop_clock(&self, partition: u16) -> Option<i64> {
        let clock = self.get(partition)?;
        if !self.guarded.load(Ordering::Relaxed) {
            return Some(clock);
        }
        let published = self
            .published
            .get(usize::from(partition))?
            .load(Ordering::Relaxed);
        (published != UNKNOWN).then(|| published.min(clock))
    }

    /// The changelog has published every key expired at `event_ms`.
    pub fn published_expiry(&self, partition: u16, event_ms: i64) {
        if let Some(c) = self.published.get(usize::from(partition)) {
            c.fetch_max(event_ms, Ordering::SeqCst);
        }
    }

    /// A partition taken over starts without published expiries: its
    /// first round sweeps from scratch.
    pub fn forget_published_expiry(&self, partition: u16) {
        if let Some(c) = self.published.get(usize::from(partition)) {
            c.store(UNKNOWN, Ordering::SeqCst);
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

    #[test]
    fn with_a_changelog_compaction_drops_only_what_was_published() {
        let c = PartitionClocks::new(1);
        c.advance(0, 100);
        assert_eq!(c.drop_clock(0), Some(100));
        c.guard_with_changelog();
        assert_eq!(c.drop_clock(0), None, "nothing published yet");
        c.published_expiry(0, 40);
        assert_eq!(c.drop_clock(0), Some(40));
        c.published_expiry(0, 500);
        assert_eq!(c.drop_clock(0), Some(100), "never past the clock");
        c.forget_published_expiry(0);
        assert_eq!(c.drop_clock(0), None);
    }
}
