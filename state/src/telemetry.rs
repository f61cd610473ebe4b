//! Telemetry buckets of a partition's series: each write merges a delta
//! (the points of one flush) into the bucket of its series, resolution and
//! start, in one write with the rest of a flush when the caller batches
//! it; reads return whole buckets in time order, and the series of a
//! partition are walked in key order without holding the list.

use serde::{Deserialize, Serialize};
use tally_pipelines::telemetry::Bucket;

use crate::changelog::StateStore;
use crate::codec::{decode, encode};
use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_META, CF_STATS};
use crate::store::Store;
use crate::{Error, Result};

/// What a partition has durably applied of telemetry, beside (and in the
/// same batch as) its [`crate::Checkpoint`]: its own event-time clock, so
/// that a backfill of request events and live telemetry never make each
/// other late, and its own point-id segments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryCheckpoint {
    pub event_clock_ms: Option<i64>,
    pub dedupe_seq: u64,
    pub dedupe_deleted_below_ms: i64,
}

/// One bucket's delta: series, resolution (ms), bucket start (ms), stats.
pub type Delta<'a> = (&'a str, u32, i64, &'a Bucket);

impl Store {
    /// Adds `deltas` to `batch` as merges; answers the keys written, for
    /// the changelog.
    pub fn telemetry_merges(
        batch: &mut WriteBatch,
        partition: u16,
        deltas: &[Delta<'_>],
    ) -> Result<Vec<Vec<u8>>> {
        let mut written = Vec::with_capacity(deltas.len());
        for (series, resolution_ms, start_ms, bucket) in deltas {
            let key = keys::telemetry_key(partition, *resolution_ms, series, *start_ms);
            batch.merge(CF_STATS, &key, &encode(*bucket)?);
            written.push(key);
        }
        Ok(written)
    }

    /// Merges `deltas` durably (one synced write), tracked for the
    /// changelog.
    pub fn write_telemetry(&self, partition: u16, deltas: &[Delta<'_>]) -> Result<()> {
        let mut batch = WriteBatch::default();
        let written = Store::telemetry_merges(&mut batch, partition, deltas)?;
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        self.engine.write(batch, true)?;
        if let Some(mut set) = guard {
            set.extend(written.into_iter().map(|k| (StateStore::Stats, k)));
        }
        Ok(())
    }

    pub fn load_telemetry_checkpoint(&self, partition: u16) -> Result<TelemetryCheckpoint> {
        match self
            .engine
            .get(CF_META, &keys::telemetry_checkpoint_key(partition))?
        {
            Some(v) => decode(&v).map_err(|e| {
                Error::Corrupt(format!(
                    "the telemetry checkpoint of partition {partition} cannot be decoded ({e})"
                ))
            }),
            None => Ok(TelemetryCheckpoint::default()),
        }
    }

    /// Point ids claimed at or after `cutoff_ms`.
    pub fn load_telemetry_dedupe_claims(
        &self,
        partition: u16,
        cutoff_ms: Option<i64>,
    ) -> Result<Vec<(u128, i64)>> {
        let cutoff = cutoff_ms.unwrap_or(0);
        self.dedupe_claims_in(
            keys::telemetry_dedupe_segments_from(partition, cutoff),
            keys::partition_end(partition),
            cutoff,
        )
    }

    /// The stored detector state of every series of `partition` that has
    /// one: `(series, encoded state)`.
    pub fn telemetry_detectors(&self, partition: u16) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = keys::telemetry_detector_key(partition, "");
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        for item in self
            .engine
            .scan(CF_META, Scan::range(prefix.clone(), end))?
        {
            let (key, value) = item?;
            let series = String::from_utf8(key[prefix.len()..].to_vec()).map_err(|_| {
                Error::Corrupt(format!("undecodable telemetry detector key {key:?}"))
            })?;
            out.push((series, value.to_vec()));
        }
        Ok(out)
    }

    /// Every series the partition holds (its registry).
    pub fn telemetry_series(&self, partition: u16) -> Result<Vec<String>> {
        self.telemetry_series_page(partition, "", None, usize::MAX)
    }

    /// Up to `limit` series of `partition` starting with `prefix`, after
    /// `after` (exclusive), in byte order.
    pub fn telemetry_series_page(
        &self,
        partition: u16,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let (mut from, to) = keys::telemetry_series_range(partition, prefix);
        if let Some(after) = after {
            let mut past = keys::telemetry_series_key(partition, after);
            past.push(0);
            from = from.max(past);
        }
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for item in self.engine.scan(CF_META, Scan::range(from, to))? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item?;
            out.push(keys::decode_telemetry_series_key(&key).ok_or_else(|| {
                Error::Corrupt(format!("undecodable telemetry series key {key:?}"))
            })?);
        }
        Ok(out)
    }

    /// A series' buckets at one resolution with start in `[from, to)`.
    pub fn read_telemetry(
        &self,
        partition: u16,
        series: &str,
        resolution_ms: u32,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, Bucket)>> {
        if to_ms <= from_ms {
            return Ok(Vec::new());
        }
        let start = keys::telemetry_key(partition, resolution_ms, series, from_ms);
        let end = keys::telemetry_key(partition, resolution_ms, series, to_ms);
        let mut out = Vec::new();
        let clock = self.telemetry_clocks.get(partition);
        for item in self.engine.scan(CF_STATS, Scan::range(start, end))? {
            let (key, value) = item?;
            let (_, start_ms) = keys::decode_telemetry_key(&key)
                .ok_or_else(|| Error::Corrupt(format!("undecodable telemetry key {key:?}")))?;
            // Reads apply retention as compaction does: answers never
            // depend on when compaction ran.
            if self
                .retention()
                .telemetry_bucket_expired(resolution_ms, start_ms, clock)
            {
                continue;
            }
            let bucket: Bucket = decode(&value).map_err(|e| {
                Error::Corrupt(format!(
                    "telemetry bucket of {series:?} at {start_ms} in partition {partition}: {e}"
                ))
            })?;
            out.push((start_ms, bucket));
        }
        Ok(out)
    }

    /// The first series of `partition` after `after` (exclusive) that has
    /// buckets at `resolution_ms`, in key order (by length, then bytes).
    pub fn next_series(
        &self,
        partition: u16,
        resolution_ms: u32,
        after: Option<&str>,
    ) -> Result<Option<String>> {
        let (first, to) = keys::telemetry_resolution_range(partition, resolution_ms);
        let from = match after {
            Some(series) => {
                let mut key = keys::telemetry_key(partition, resolution_ms, series, i64::MAX);
                key.push(0xFF);
                key
            }
            None => first,
        };
        let mut scan = self.engine.scan(CF_STATS, Scan::range(from, to))?;
        match scan.next() {
            None => Ok(None),
            Some(item) => {
                let (key, _) = item?;
                keys::decode_telemetry_key(&key)
                    .map(|(series, _)| Some(series))
                    .ok_or_else(|| Error::Corrupt(format!("undecodable telemetry key {key:?}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::TelemetryWrite;
    use crate::limits::LimitWrites;
    use crate::{Checkpoint, StoreOptions};
    use tally_pipelines::dedupe::DedupeIndex;
    use tally_pipelines::ingest::{FlushContent, PartitionRules};
    use tally_pipelines::telemetry::ingest::{PartitionTelemetry, TelemetryRules};
    use tally_pipelines::telemetry::Point;

    #[test]
    fn a_flush_keeps_telemetry_apart_and_retention_follows_its_own_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
        let rules = TelemetryRules::default();
        let mut partition = PartitionTelemetry::new(
            PartitionRules {
                allowed_lateness_ms: 60_000,
                dedupe_window_ms: 3_600_000,
            },
            rules.clone(),
            None,
            DedupeIndex::new(100),
            Vec::<String>::new(),
        );
        let day = 86_400_000i64;
        let t0 = 20_000 * day;
        let mut checkpoint = Checkpoint::default();
        let mut telemetry = TelemetryCheckpoint::default();
        let mut flush_points = |points: &[(i64, Option<&str>)],
                                telemetry: &mut TelemetryCheckpoint,
                                checkpoint: &mut Checkpoint| {
            for (ts, id) in points {
                let point = Point {
                    series: "s".into(),
                    timestamp_ms: *ts,
                    value: 1.0,
                    point_id: id.map(str::to_string),
                };
                partition.apply(&point, i64::MAX / 4);
            }
            let flush = partition.take_flush();
            store
                .commit_flush(
                    0,
                    &FlushContent::default(),
                    &LimitWrites::default(),
                    Some(TelemetryWrite {
                        flush: &flush,
                        rules: &rules,
                        detectors: &[],
                        checkpoint: telemetry,
                    }),
                    checkpoint,
                    true,
                )
                .expect("commit");
        };
        flush_points(&[(t0, Some("a"))], &mut telemetry, &mut checkpoint);
        assert_eq!(telemetry.event_clock_ms, Some(t0));
        assert_eq!(telemetry.dedupe_seq, 1);
        // The request events' clock and dedupe are untouched.
        assert_eq!(checkpoint.event_clock_ms, None);
        assert!(store
            .load_dedupe_claims(0, None)
            .expect("claims")
            .is_empty());
        assert_eq!(
            store
                .load_telemetry_dedupe_claims(0, None)
                .expect("claims")
                .len(),
            1
        );
        assert_eq!(store.telemetry_series(0).expect("series"), ["s"]);
        assert_eq!(
            store.load_telemetry_checkpoint(0).expect("checkpoint"),
            telemetry
        );
        let read = |resolution: u32| {
            store
                .read_telemetry(0, "s", resolution, 0, i64::MAX / 2)
                .expect("read")
                .len()
        };
        assert_eq!((read(10_000), read(60_000)), (1, 1));
        // Three days on (10 s buckets are kept 48 h, minutes 30 days): the
        // first 10 s bucket is gone, its minute is not.
        flush_points(&[(t0 + 3 * day, None)], &mut telemetry, &mut checkpoint);
        assert_eq!((read(10_000), read(60_000)), (1, 2));
        assert!(store
            .retention()
            .telemetry_key_expired(&keys::telemetry_key(0, 10_000, "s", t0), Some(t0 + 3 * day)));
        assert!(!store
            .retention()
            .telemetry_key_expired(&keys::telemetry_key(0, 60_000, "s", t0), Some(t0 + 3 * day)));
    }

    fn bucket(points: &[(i64, f64)]) -> Bucket {
        let mut b = Bucket::default();
        for &(t, v) in points {
            b.insert(t, v);
        }
        b
    }

    #[test]
    fn deltas_merge_into_buckets_that_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let series = "cpu{host=a\\,b,region=eu}";
        let minute = 60_000u32;
        // Three flushes of the same two minutes, and another series.
        let flushes: Vec<Vec<(i64, f64)>> = vec![
            vec![(1_000, 5.0), (61_000, -2.5)],
            vec![(2_000, 7.0), (59_999, 1e9), (60_000, 0.0)],
            vec![(3_000, -1.0)],
        ];
        let mut want = [Bucket::default(), Bucket::default()];
        {
            let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
            for flush in &flushes {
                let (first, second): (Vec<_>, Vec<_>) = flush.iter().partition(|p| p.0 < 60_000);
                let (b0, b1) = (bucket(&first), bucket(&second));
                want[0].merge(&b0);
                want[1].merge(&b1);
                store
                    .write_telemetry(
                        3,
                        &[(series, minute, 0, &b0), (series, minute, 60_000, &b1)],
                    )
                    .expect("write");
            }
            let other = bucket(&[(5, 1.0)]);
            store
                .write_telemetry(3, &[("mem", minute, 0, &other), ("cpu", 10_000, 0, &other)])
                .expect("write");
        }
        let store = Store::open(dir.path(), StoreOptions::default()).expect("reopen");
        let got = store
            .read_telemetry(3, series, minute, 0, 120_000)
            .expect("read");
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[1].0), (0, 60_000));
        assert_eq!(got[0].1, want[0]);
        assert_eq!(got[1].1, want[1]);
        assert_eq!(got[0].1.moments.count(), 4);
        assert_eq!(got[0].1.moments.max(), Some(1e9));
        // The range is half-open, and the resolution and partition apart.
        assert_eq!(
            store
                .read_telemetry(3, series, minute, 0, 60_000)
                .expect("read")
                .len(),
            1
        );
        assert!(store
            .read_telemetry(3, series, 10_000, 0, 120_000)
            .expect("read")
            .is_empty());
        assert!(store
            .read_telemetry(4, series, minute, 0, 120_000)
            .expect("read")
            .is_empty());
        // The series of a resolution, walked one after another.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        while let Some(next) = store
            .next_series(3, minute, after.as_deref())
            .expect("next")
        {
            seen.push(next.clone());
            after = Some(next);
        }
        assert_eq!(seen, ["mem", series]);
        assert_eq!(
            store.next_series(3, 10_000, None).expect("next").as_deref(),
            Some("cpu")
        );
        // Telemetry keys are not request buckets: no retention of those
        // applies to them.
        let key = keys::telemetry_key(3, minute, series, 0);
        assert!(!store
            .retention()
            .stats_key_expired(&key, Some(i64::MAX / 2)));
    }
}
