//! Rate-limit and quota configuration and state of a partition's clients.
//! Configuration is written when it changes (durably, and tracked for the
//! changelog); limiter state and quota alert marks go with the shard's
//! flush, in the same WriteBatch as the statistics.

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteOptions};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tally_pipelines::detect::{Anomaly, ClientDetector};
use tally_pipelines::limit::policy::{ClientLimiter, LimitConfig};
use tally_pipelines::quota::{QuotaAlerts, QuotaConfig};

use crate::changelog::StateStore;
use crate::codec::{decode, encode};
use crate::keys::{self, LimitKind, CF_ANOMALIES, CF_LIMITS};
use crate::store::{rocks, Store};
use crate::Result;

/// A raw RocksDB entry.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Limiter state and quota alert marks to write with a flush.
#[derive(Debug, Default)]
pub struct LimitWrites {
    pub limiters: Vec<(String, ClientLimiter)>,
    pub quota_alerts: Vec<(String, QuotaAlerts)>,
    /// Anomaly detectors' learned baselines.
    pub detectors: Vec<(String, ClientDetector)>,
    /// (minute, client) buckets this flush opens for judging...
    pub open_minutes: Vec<(i64, String)>,
    /// ...and those judged since the last flush.
    pub closed_minutes: Vec<(i64, String)>,
}

impl LimitWrites {
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
            && self.quota_alerts.is_empty()
            && self.detectors.is_empty()
            && self.open_minutes.is_empty()
            && self.closed_minutes.is_empty()
    }

    /// Keys this flush deletes.
    pub(crate) fn deleted(&self, partition: u16) -> Vec<Vec<u8>> {
        self.closed_minutes
            .iter()
            .map(|(minute, client)| keys::open_minute_key(partition, *minute, client))
            .collect()
    }

    pub(crate) fn encoded(&self, partition: u16) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::with_capacity(self.limiters.len() + self.quota_alerts.len());
        for (client, detector) in &self.detectors {
            out.push((
                keys::limit_key(partition, LimitKind::Detector, client),
                encode(detector)?,
            ));
        }
        for (client, state) in &self.limiters {
            out.push((
                keys::limit_key(partition, LimitKind::Limiter, client),
                encode(state)?,
            ));
        }
        for (client, alerts) in &self.quota_alerts {
            out.push((
                keys::limit_key(partition, LimitKind::QuotaAlerts, client),
                encode(alerts)?,
            ));
        }
        for (minute, client) in &self.open_minutes {
            out.push((
                keys::open_minute_key(partition, *minute, client),
                Vec::new(),
            ));
        }
        Ok(out)
    }
}

impl Store {
    fn limit_get<T: DeserializeOwned>(
        &self,
        partition: u16,
        kind: LimitKind,
        client: &str,
    ) -> Result<Option<T>> {
        self.db
            .get_cf(
                self.cf(CF_LIMITS)?,
                keys::limit_key(partition, kind, client),
            )
            .map_err(rocks)?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Writes (or with `None` deletes) one configuration, durably.
    fn limit_put<T: Serialize>(
        &self,
        partition: u16,
        kind: LimitKind,
        client: &str,
        value: Option<&T>,
    ) -> Result<()> {
        let key = keys::limit_key(partition, kind, client);
        let cf = self.cf(CF_LIMITS)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(self.wal);
        opts.disable_wal(!self.wal);
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        match value {
            Some(v) => self.db.put_cf_opt(cf, &key, encode(v)?, &opts),
            None => self.db.delete_cf_opt(cf, &key, &opts),
        }
        .map_err(rocks)?;
        if let Some(mut set) = guard {
            set.insert((StateStore::Limits, key));
        }
        Ok(())
    }

    pub fn limit_config(&self, partition: u16, client: &str) -> Result<Option<LimitConfig>> {
        self.limit_get(partition, LimitKind::Config, client)
    }

    pub fn put_limit_config(
        &self,
        partition: u16,
        client: &str,
        config: Option<&LimitConfig>,
    ) -> Result<()> {
        self.limit_put(partition, LimitKind::Config, client, config)
    }

    pub fn limiter(&self, partition: u16, client: &str) -> Result<Option<ClientLimiter>> {
        self.limit_get(partition, LimitKind::Limiter, client)
    }

    /// Writes one client's limiter state outside a flush (LRU eviction).
    pub fn put_limiter(&self, partition: u16, client: &str, state: &ClientLimiter) -> Result<()> {
        self.limit_put(partition, LimitKind::Limiter, client, Some(state))
    }

    pub fn quota_config(&self, partition: u16, client: &str) -> Result<Option<QuotaConfig>> {
        self.limit_get(partition, LimitKind::Quota, client)
    }

    pub fn put_quota_config(
        &self,
        partition: u16,
        client: &str,
        config: Option<&QuotaConfig>,
    ) -> Result<()> {
        self.limit_put(partition, LimitKind::Quota, client, config)
    }

    pub fn quota_alerts(&self, partition: u16, client: &str) -> Result<Option<QuotaAlerts>> {
        self.limit_get(partition, LimitKind::QuotaAlerts, client)
    }

    pub fn detector(&self, partition: u16, client: &str) -> Result<Option<ClientDetector>> {
        self.limit_get(partition, LimitKind::Detector, client)
    }

    /// Stores anomalies (idempotent: ids are deterministic).
    pub fn put_anomalies(&self, partition: u16, anomalies: &[Anomaly]) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        let cf = self.cf(CF_ANOMALIES)?;
        for a in anomalies {
            batch.put_cf(
                cf,
                keys::anomaly_key(partition, a.detected_at_ms, &a.anomaly_id),
                encode(a)?,
            );
        }
        self.db.write(batch).map_err(rocks)
    }

    /// Anomalies of a partition detected at or after `from_ms`, oldest
    /// first, at most `limit`.
    pub fn anomalies(&self, partition: u16, from_ms: i64, limit: usize) -> Result<Vec<Anomaly>> {
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::partition_end(partition));
        let start = keys::anomalies_from(partition, from_ms);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(
                self.cf(CF_ANOMALIES)?,
                read,
                IteratorMode::From(&start, Direction::Forward),
            )
            .take(limit)
        {
            let (_, value) = item.map_err(rocks)?;
            out.push(decode(&value)?);
        }
        Ok(out)
    }

    /// Every `limits` entry of one kind in a partition, in key order.
    fn limit_scan(&self, partition: u16, kind: LimitKind) -> Result<Vec<KeyValue>> {
        let prefix = keys::limit_prefix(partition, kind);
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::prefix_end(&prefix));
        self.db
            .iterator_cf_opt(
                self.cf(CF_LIMITS)?,
                read,
                IteratorMode::From(&prefix, Direction::Forward),
            )
            .map(|item| item.map_err(rocks))
            .collect()
    }

    /// Minute buckets flushed and not judged yet, `(minute, client)`.
    pub fn open_minutes(&self, partition: u16) -> Result<Vec<(i64, String)>> {
        Ok(self
            .limit_scan(partition, LimitKind::OpenMinute)?
            .iter()
            .filter_map(|(key, _)| keys::decode_open_minute_key(key))
            .collect())
    }

    /// Every quota configured in a partition (bounded by the number of
    /// clients with a quota; read when a shard starts).
    pub fn quota_configs(&self, partition: u16) -> Result<Vec<(String, QuotaConfig)>> {
        let mut out = Vec::new();
        for (key, value) in self.limit_scan(partition, LimitKind::Quota)? {
            if let Some(client) = keys::limit_key_client(&key) {
                out.push((client, decode(&value)?));
            }
        }
        Ok(out)
    }
}

impl Store {
    /// Appends one event to the alert log under `sequence`, logged at
    /// `logged_at_ms` (wall clock, for retention). The next sequence is
    /// stored with it, so ids never repeat even after retention empties
    /// the log.
    pub fn append_alert(&self, sequence: u64, logged_at_ms: i64, json: &str) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            self.cf(crate::keys::CF_ALERTS)?,
            sequence.to_be_bytes(),
            encode(&(logged_at_ms, json))?,
        );
        batch.put_cf(
            self.cf(crate::keys::CF_META)?,
            keys::setting_key("alert_next"),
            encode(&sequence.saturating_add(1))?,
        );
        self.db.write(batch).map_err(rocks)
    }

    /// Alert log entries after `sequence`, oldest first, at most `limit`.
    pub fn alerts_after(&self, sequence: u64, limit: usize) -> Result<Vec<(u64, String)>> {
        let start = sequence.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(
                self.cf(crate::keys::CF_ALERTS)?,
                IteratorMode::From(&start, Direction::Forward),
            )
            .take(limit)
        {
            let (key, value) = item.map_err(rocks)?;
            let seq = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| crate::Error::Corrupt(format!("alert key {key:?}")))?,
            );
            let (_, json): (i64, String) = decode(&value)?;
            out.push((seq, json));
        }
        Ok(out)
    }

    /// The sequence number the next alert gets (1 for a new store).
    pub fn next_alert_sequence(&self) -> Result<u64> {
        match self
            .db
            .get_cf(
                self.cf(crate::keys::CF_META)?,
                keys::setting_key("alert_next"),
            )
            .map_err(rocks)?
        {
            Some(v) => decode(&v),
            None => Ok(1),
        }
    }
}
