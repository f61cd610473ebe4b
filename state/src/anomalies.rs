//! Stored anomalies, by partition and detection time (event time). Ids
//! are deterministic, so storing a finding again overwrites it.

use tally_pipelines::detect::Anomaly;

use crate::changelog::StateStore;
use crate::codec::{decode, encode};
use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_ANOMALIES};
use crate::store::Store;
use crate::Result;

impl Store {
    /// Stores anomalies (idempotent: ids are deterministic).
    pub fn put_anomalies(&self, partition: u16, anomalies: &[Anomaly]) -> Result<()> {
        let mut batch = WriteBatch::default();
        let mut written = Vec::with_capacity(anomalies.len());
        for a in anomalies {
            let key = keys::anomaly_key(partition, a.detected_at_ms, &a.anomaly_id);
            batch.put(CF_ANOMALIES, &key, &encode(a)?);
            written.push(key);
        }
        // Published by the partition's next changelog round.
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        self.engine.write(batch, false)?;
        if let Some(mut set) = guard {
            set.extend(written.into_iter().map(|k| (StateStore::Anomalies, k)));
        }
        Ok(())
    }

    /// Anomalies of a partition detected at or after `from_ms`, oldest
    /// first, at most `limit`.
    pub fn anomalies(&self, partition: u16, from_ms: i64, limit: usize) -> Result<Vec<Anomaly>> {
        let start = keys::anomalies_from(partition, from_ms);
        let mut out = Vec::new();
        for item in self
            .engine
            .scan(
                CF_ANOMALIES,
                Scan::range(start, keys::partition_end(partition)),
            )?
            .take(limit)
        {
            let (_, value) = item?;
            out.push(decode(&value)?);
        }
        Ok(out)
    }
}

impl Store {
    /// Anomalies of a partition detected at or after `from_ms`, newest
    /// first (by detection time, then id, both descending), strictly
    /// after `before` in that order, that `keep` accepts: at most `limit`.
    pub fn anomalies_newest_first(
        &self,
        partition: u16,
        from_ms: i64,
        before: Option<(i64, &str)>,
        limit: usize,
        keep: impl Fn(&Anomaly) -> bool,
    ) -> Result<Vec<Anomaly>> {
        let start = match before {
            Some((at, id)) => keys::anomaly_key(partition, at, id),
            None => keys::partition_end(partition),
        };
        let lower = keys::anomalies_from(partition, from_ms);
        let mut out = Vec::new();
        for item in self
            .engine
            .scan(CF_ANOMALIES, Scan::backward(start.clone(), lower))?
        {
            let (key, value) = item?;
            if *key == *start {
                continue;
            }
            let a: Anomaly = decode(&value)?;
            if keep(&a) {
                out.push(a);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}
