//! What one partition does with each telemetry point, in order, as
//! [`crate::ingest`] does with request events: recognise a point sent
//! twice (by `point_id`, within its series), set late points aside, refuse
//! a new series past the partition's cardinality bound, and add the rest
//! to its bucket at the finest resolution.
//!
//! A flush hands over one delta per (series, finest bucket); the store
//! merges each into the bucket of every stored resolution that contains
//! it (a coarser bucket is an exact merge of finer ones), in one batch
//! with the partition's position. Everything is deterministic in the
//! order of points, so a replay from a stored position rebuilds the same
//! state, and the watermark is bounded by the ingest clock as for events.

use rustc_hash::{FxHashMap, FxHashSet};

use super::{Bucket, Point};
use crate::dedupe::{event_fingerprint, DedupeIndex, Fingerprint};
use crate::ingest::{DeadLetter, PartitionRules};
use crate::time::format_rfc3339_ms;

/// Point ids are scoped by series under this source name, apart from
/// request events' ids of a client of the same name.
const POINT_SOURCE: &str = "tally.telemetry";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryRules {
    /// Stored resolutions (ms), finest first; each a multiple of the
    /// finest.
    pub resolutions_ms: Vec<u32>,
    /// Distinct series a partition holds at most.
    pub max_series: usize,
}

impl Default for TelemetryRules {
    fn default() -> Self {
        TelemetryRules {
            resolutions_ms: vec![10_000, 60_000, 3_600_000, 86_400_000],
            max_series: 100_000,
        }
    }
}

impl TelemetryRules {
    /// Why these rules cannot be used, if they cannot.
    pub fn problem(&self) -> Option<String> {
        let finest = *self.resolutions_ms.first()?;
        if finest == 0 {
            return Some("resolutions must be positive".into());
        }
        if self.resolutions_ms.windows(2).any(|w| w[1] <= w[0]) {
            return Some("resolutions must be given finest first, without repeats".into());
        }
        self.resolutions_ms
            .iter()
            .find(|r| *r % finest != 0)
            .map(|r| format!("resolution {r} ms is not a multiple of the finest ({finest} ms)"))
    }
}

/// What happened to one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointVerdict {
    Accepted,
    Duplicate,
    Late {
        watermark_ms: i64,
    },
    /// A new series beyond the partition's bound.
    TooManySeries {
        limit: usize,
    },
}

/// One series' points in one finest bucket since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct PointsDelta {
    pub series: String,
    pub start_ms: i64,
    pub bucket: Bucket,
}

impl PointsDelta {
    /// `(resolution, bucket start)` of every stored bucket this delta
    /// belongs to.
    pub fn targets<'a>(
        &'a self,
        rules: &'a TelemetryRules,
    ) -> impl Iterator<Item = (u32, i64)> + 'a {
        rules.resolutions_ms.iter().map(move |r| {
            let r64 = i64::from(*r);
            (*r, self.start_ms - self.start_ms.rem_euclid(r64))
        })
    }
}

#[derive(Debug, Default)]
pub struct TelemetryFlush {
    pub deltas: Vec<PointsDelta>,
    pub dedupe_claims: Vec<(Fingerprint, i64)>,
    pub dedupe_cutoff_ms: Option<i64>,
    pub dead_letters: Vec<DeadLetter>,
    pub event_clock_ms: Option<i64>,
    /// Series first seen since the last flush.
    pub new_series: Vec<String>,
}

#[derive(Debug)]
pub struct PartitionTelemetry {
    rules: PartitionRules,
    telemetry: TelemetryRules,
    event_clock_ms: Option<i64>,
    dedupe: DedupeIndex,
    /// The series this partition holds (restored from the store).
    known: FxHashSet<String>,
    new_series: Vec<String>,
    /// series -> (finest bucket start, points), a few buckets per series.
    pending: FxHashMap<String, Vec<(i64, Bucket)>>,
    /// Points added to `pending` since the last flush.
    pending_points: usize,
    dead_letters: Vec<DeadLetter>,
}

fn point_json(p: &Point) -> String {
    serde_json::json!({"series": p.series, "timestamp": p.timestamp_ms, "value": p.value,
        "point_id": p.point_id})
    .to_string()
}

impl PartitionTelemetry {
    /// `event_clock_ms`, `dedupe` and `known` come from the last flush.
    pub fn new(
        rules: PartitionRules,
        telemetry: TelemetryRules,
        event_clock_ms: Option<i64>,
        dedupe: DedupeIndex,
        known: impl IntoIterator<Item = String>,
    ) -> Self {
        PartitionTelemetry {
            rules,
            telemetry,
            event_clock_ms,
            dedupe,
            known: known.into_iter().collect(),
            new_series: Vec::new(),
            pending: FxHashMap::default(),
            pending_points: 0,
            dead_letters: Vec::new(),
        }
    }

    pub fn watermark_ms(&self) -> Option<i64> {
        self.event_clock_ms
            .map(|m| m.saturating_sub(self.rules.allowed_lateness_ms))
    }

    fn dedupe_cutoff_ms(&self) -> Option<i64> {
        self.event_clock_ms
            .map(|m| m.saturating_sub(self.rules.dedupe_window_ms))
    }

    /// Points applied since the last flush.
    pub fn pending_points(&self) -> usize {
        self.pending_points
    }

    pub fn series_count(&self) -> usize {
        self.known.len()
    }

    /// Applies one point that arrived when the ingest clock read `now_ms`.
    pub fn apply(&mut self, point: &Point, now_ms: i64) -> PointVerdict {
        let fp = point
            .point_id
            .as_deref()
            .map(|id| event_fingerprint(&point.series, Some(POINT_SOURCE), id));
        if let Some(claimed_ms) = fp.and_then(|fp| self.dedupe.claim_of(fp)) {
            if self
                .dedupe_cutoff_ms()
                .is_none_or(|cutoff| claimed_ms >= cutoff)
            {
                return PointVerdict::Duplicate;
            }
        }
        if let Some(watermark_ms) = self.watermark_ms() {
            if point.timestamp_ms < watermark_ms {
                self.dead_letters.push(DeadLetter {
                    reason: format!(
                        "late: point time {} is before the partition watermark {} (allowed lateness {} ms)",
                        format_rfc3339_ms(point.timestamp_ms),
                        format_rfc3339_ms(watermark_ms),
                        self.rules.allowed_lateness_ms
                    ),
                    event_json: point_json(point),
                    event_ms: point.timestamp_ms,
                });
                return PointVerdict::Late { watermark_ms };
            }
        }
        if !self.known.contains(point.series.as_str()) {
            if self.known.len() >= self.telemetry.max_series {
                return PointVerdict::TooManySeries {
                    limit: self.telemetry.max_series,
                };
            }
            self.known.insert(point.series.clone());
            self.new_series.push(point.series.clone());
        }
        let advance = point.timestamp_ms.min(now_ms);
        self.event_clock_ms = Some(self.event_clock_ms.map_or(advance, |m| m.max(advance)));
        if let Some(fp) = fp {
            self.dedupe.claim(fp, point.timestamp_ms);
        }
        let finest = i64::from(
            self.telemetry
                .resolutions_ms
                .first()
                .copied()
                .unwrap_or(10_000),
        );
        let start = point.timestamp_ms - point.timestamp_ms.rem_euclid(finest);
        self.pending_points += 1;
        let buckets = match self.pending.get_mut(point.series.as_str()) {
            Some(b) => b,
            None => self.pending.entry(point.series.clone()).or_default(),
        };
        match buckets.iter_mut().find(|(s, _)| *s == start) {
            Some((_, b)) => b.insert(point.timestamp_ms, point.value),
            None => {
                let mut b = Bucket::default();
                b.insert(point.timestamp_ms, point.value);
                buckets.push((start, b));
            }
        }
        PointVerdict::Accepted
    }

    /// What the next flush writes; the hot state is left empty.
    pub fn take_flush(&mut self) -> TelemetryFlush {
        let mut deltas = Vec::new();
        self.pending_points = 0;
        for (series, buckets) in self.pending.drain() {
            for (start_ms, bucket) in buckets {
                deltas.push(PointsDelta {
                    series: series.clone(),
                    start_ms,
                    bucket,
                });
            }
        }
        // A stable order: the same points give the same write.
        deltas.sort_by(|a, b| (&a.series, a.start_ms).cmp(&(&b.series, b.start_ms)));
        let dedupe_cutoff_ms = self.dedupe_cutoff_ms();
        if let Some(cutoff) = dedupe_cutoff_ms {
            self.dedupe.expire(cutoff);
        }
        TelemetryFlush {
            deltas,
            dedupe_claims: self.dedupe.take_new_claims(),
            dedupe_cutoff_ms,
            dead_letters: std::mem::take(&mut self.dead_letters),
            event_clock_ms: self.event_clock_ms,
            new_series: std::mem::take(&mut self.new_series),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(series: &str, ts: i64, value: f64, id: Option<&str>) -> Point {
        Point {
            series: series.into(),
            timestamp_ms: ts,
            value,
            point_id: id.map(str::to_string),
        }
    }

    fn partition(max_series: usize) -> PartitionTelemetry {
        PartitionTelemetry::new(
            PartitionRules {
                allowed_lateness_ms: 60_000,
                dedupe_window_ms: 3_600_000,
            },
            TelemetryRules {
                max_series,
                ..TelemetryRules::default()
            },
            None,
            DedupeIndex::new(10_000),
            ["restored".to_string()],
        )
    }

    const NOW: i64 = i64::MAX / 4;

    #[test]
    fn duplicates_late_points_and_the_series_bound_by_hand() {
        let mut p = partition(3);
        assert_eq!(
            p.apply(&point("cpu", 100_000, 1.0, Some("a")), NOW),
            PointVerdict::Accepted
        );
        assert_eq!(
            p.apply(&point("cpu", 100_500, 9.0, Some("a")), NOW),
            PointVerdict::Duplicate
        );
        // The same id in another series is another point.
        assert_eq!(
            p.apply(&point("mem", 100_000, 2.0, Some("a")), NOW),
            PointVerdict::Accepted
        );
        // Two series known plus the restored one: the bound is reached.
        assert_eq!(
            p.apply(&point("disk", 100_000, 2.0, None), NOW),
            PointVerdict::TooManySeries { limit: 3 }
        );
        assert_eq!(
            p.apply(&point("restored", 100_000, 2.0, None), NOW),
            PointVerdict::Accepted
        );
        // The clock at 100 s, lateness 60 s: 39.999 s is late, 40 s is not.
        assert_eq!(
            p.apply(&point("cpu", 39_999, 1.0, None), NOW),
            PointVerdict::Late {
                watermark_ms: 40_000
            }
        );
        assert_eq!(
            p.apply(&point("cpu", 40_000, 3.0, None), NOW),
            PointVerdict::Accepted
        );
        let flush = p.take_flush();
        assert_eq!(flush.dead_letters.len(), 1);
        assert!(flush.dead_letters[0].reason.starts_with("late: point time"));
        assert_eq!(flush.new_series, ["cpu", "mem"]);
        assert_eq!(flush.event_clock_ms, Some(100_000));
        let cpu: Vec<(i64, u64)> = flush
            .deltas
            .iter()
            .filter(|d| d.series == "cpu")
            .map(|d| (d.start_ms, d.bucket.moments.count()))
            .collect();
        assert_eq!(cpu, [(40_000, 1), (100_000, 1)]);
        // Ids claimed in the flush are handed over for the store.
        assert_eq!(flush.dedupe_claims.len(), 2);
    }

    #[test]
    fn the_ingest_clock_bounds_the_watermark() {
        let mut p = partition(10);
        // A point from far ahead does not make honest points late.
        let now = 1_000_000;
        assert_eq!(
            p.apply(&point("s", now + 86_400_000, 1.0, None), now),
            PointVerdict::Accepted
        );
        assert_eq!(
            p.apply(&point("s", now - 30_000, 1.0, None), now),
            PointVerdict::Accepted
        );
    }

    #[test]
    fn deltas_rolled_to_every_resolution_equal_buckets_computed_directly() {
        let rules = TelemetryRules::default();
        assert_eq!(rules.problem(), None);
        let mut p = partition(10);
        let mut state = 3u64;
        let mut points = Vec::new();
        for i in 0..5_000i64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            points.push(point("s", i * 997, (state % 1000) as f64 - 500.0, None));
        }
        let mut stored: std::collections::BTreeMap<(u32, i64), Bucket> = Default::default();
        for chunk in points.chunks(700) {
            for pt in chunk {
                assert_eq!(p.apply(pt, NOW), PointVerdict::Accepted);
            }
            for d in p.take_flush().deltas {
                for target in d.targets(&rules) {
                    stored.entry(target).or_default().merge(&d.bucket);
                }
            }
        }
        for r in &rules.resolutions_ms {
            let r64 = i64::from(*r);
            let mut direct: std::collections::BTreeMap<i64, Bucket> = Default::default();
            for pt in &points {
                let start = pt.timestamp_ms - pt.timestamp_ms % r64;
                direct
                    .entry(start)
                    .or_default()
                    .insert(pt.timestamp_ms, pt.value);
            }
            for (start, want) in direct {
                let got = &stored[&(*r, start)];
                assert_eq!(got.sketch, want.sketch);
                assert_eq!(got.moments.count(), want.moments.count());
                assert_eq!(
                    (got.moments.min(), got.moments.max()),
                    (want.moments.min(), want.moments.max())
                );
                assert_eq!(got.moments.sum(), want.moments.sum());
                let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-9);
                assert!(rel(got.moments.mean().unwrap(), want.moments.mean().unwrap()) < 1e-9);
            }
        }
        assert!(TelemetryRules {
            resolutions_ms: vec![10_000, 15_000],
            max_series: 1
        }
        .problem()
        .is_some());
        assert!(TelemetryRules {
            resolutions_ms: vec![60_000, 10_000],
            max_series: 1
        }
        .problem()
        .is_some());
    }

    #[test]
    fn the_same_points_in_the_same_order_give_the_same_flush() {
        let run = || {
            let mut p = partition(10);
            for i in 0..300i64 {
                p.apply(
                    &point(
                        ["a", "b", "c"][i as usize % 3],
                        i * 311,
                        i as f64 * 0.37,
                        Some(&i.to_string()),
                    ),
                    NOW,
                );
            }
            let f = p.take_flush();
            (f.deltas, f.dedupe_claims, f.event_clock_ms)
        };
        assert_eq!(run(), run());
    }
}
