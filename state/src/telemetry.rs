//! Telemetry buckets of a partition's series: each write merges a delta
//! (the points of one flush) into the bucket of its series, resolution and
//! start, in one write with the rest of a flush when the caller batches
//! it; reads return whole buckets in time order, and the series of a
//! partition are walked in key order without holding the list.

use tally_pipelines::telemetry::Bucket;

use crate::changelog::StateStore;
use crate::codec::{decode, encode};
use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_STATS};
use crate::store::Store;
use crate::{Error, Result};

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
        for item in self.engine.scan(CF_STATS, Scan::range(start, end))? {
            let (key, value) = item?;
            let (_, start_ms) = keys::decode_telemetry_key(&key)
                .ok_or_else(|| Error::Corrupt(format!("undecodable telemetry key {key:?}")))?;
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
    use crate::StoreOptions;

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
