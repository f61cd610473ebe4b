//! Rate-limit and quota configuration and state of a partition's clients.
//! Configuration is written when it changes (durably, and tracked for the
//! changelog); limiter state and quota alert marks go with the shard's
//! flush, in the same WriteBatch as the statistics.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tally_pipelines::detect::ClientDetector;
use tally_pipelines::limit::policy::{ClientLimiter, LimitConfig};
use tally_pipelines::quota::{QuotaConfig, QuotaMarks};

use crate::changelog::StateStore;
use crate::codec::{decode, encode};
use crate::engine::{KeyValue, Scan, WriteBatch};
use crate::keys::{self, LimitKind, CF_LIMITS};
use crate::store::Store;
use crate::{Error, Result};

/// Limiter state and quota marks to write with a flush.
#[derive(Debug, Default)]
pub struct LimitWrites {
    pub limiters: Vec<(String, ClientLimiter)>,
    /// Quota events raised and reservations outstanding.
    pub quota_marks: Vec<(String, QuotaMarks)>,
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
            && self.quota_marks.is_empty()
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
        let mut out = Vec::with_capacity(self.limiters.len() + self.quota_marks.len());
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
        for (client, marks) in &self.quota_marks {
            out.push((
                keys::limit_key(partition, LimitKind::QuotaMarks, client),
                encode(marks)?,
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
        self.engine
            .get(CF_LIMITS, &keys::limit_key(partition, kind, client))?
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
        let mut batch = WriteBatch::default();
        match value {
            Some(v) => batch.put(CF_LIMITS, &key, &encode(v)?),
            None => batch.delete(CF_LIMITS, &key),
        }
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        self.engine.write(batch, true)?;
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

    pub fn quota_marks(&self, partition: u16, client: &str) -> Result<Option<QuotaMarks>> {
        self.limit_get(partition, LimitKind::QuotaMarks, client)
    }

    pub fn detector(&self, partition: u16, client: &str) -> Result<Option<ClientDetector>> {
        self.limit_get(partition, LimitKind::Detector, client)
    }

    /// Every `limits` entry of one kind in a partition, in key order.
    fn limit_scan(&self, partition: u16, kind: LimitKind) -> Result<Vec<KeyValue>> {
        let prefix = keys::limit_prefix(partition, kind);
        let end = keys::prefix_end(&prefix);
        self.engine
            .scan(CF_LIMITS, Scan::range(prefix, end))?
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

    /// The clients of one minute flushed and not judged yet (the store is
    /// authoritative when a shard's in-memory list of them is partial).
    pub fn open_minute_clients(&self, partition: u16, minute_start_ms: i64) -> Result<Vec<String>> {
        let prefix = keys::open_minute_key(partition, minute_start_ms, "");
        let end = keys::prefix_end(&prefix);
        Ok(self
            .engine
            .scan(CF_LIMITS, Scan::range(prefix, end))?
            .collect::<Result<Vec<_>>>()?
            .iter()
            .filter_map(|(key, _)| keys::decode_open_minute_key(key).map(|(_, client)| client))
            .collect())
    }

    /// Every quota configured in a partition with its marks (bounded by
    /// the number of clients with a quota; read when a shard loads).
    pub fn quotas(&self, partition: u16) -> Result<Vec<(String, QuotaConfig, QuotaMarks)>> {
        let mut out = Vec::new();
        for (key, value) in self.limit_scan(partition, LimitKind::Quota)? {
            if let Some(client) = keys::limit_key_client(&key) {
                let marks = self.quota_marks(partition, &client)?.unwrap_or_default();
                out.push((client, decode(&value)?, marks));
            }
        }
        Ok(out)
    }
}

impl Store {
    /// A closed period's stored report, as it was stored.
    pub fn closed_report(
        &self,
        partition: u16,
        client: &str,
        period_start_ms: i64,
    ) -> Result<Option<Vec<u8>>> {
        self.engine.get(
            CF_LIMITS,
            &keys::closed_report_key(partition, client, period_start_ms),
        )
    }

    /// Stores closed reports of one partition in one durable write (one
    /// sync for all: what an export closing many clients needs), tracked
    /// for the changelog (so they move with the partition), each with the
    /// marker of its announcement (`announcement`: the event's details),
    /// which [`Store::announced`] removes once the event is logged. A
    /// crash in between leaves the marker, and the announcement is made
    /// again (at least once, never lost).
    pub fn put_closed_reports(
        &self,
        partition: u16,
        reports: &[(&str, i64, &[u8], &[u8])],
    ) -> Result<()> {
        if reports.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let mut written = Vec::with_capacity(2 * reports.len());
        for (client, period_start_ms, report, announcement) in reports {
            let key = keys::closed_report_key(partition, client, *period_start_ms);
            batch.put(CF_LIMITS, &key, report);
            written.push(key);
            let marker = keys::unannounced_close_key(partition, client, *period_start_ms);
            batch.put(CF_LIMITS, &marker, announcement);
            written.push(marker);
        }
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        self.engine.write(batch, true)?;
        if let Some(mut set) = guard {
            set.extend(written.into_iter().map(|key| (StateStore::Limits, key)));
        }
        Ok(())
    }

    /// Closed periods of a partition not yet announced: `(client, period
    /// start, the announcement's details)`.
    pub fn unannounced_closes(&self, partition: u16) -> Result<Vec<(String, i64, Vec<u8>)>> {
        let mut out = Vec::new();
        for (key, value) in self.limit_scan(partition, LimitKind::UnannouncedClose)? {
            let (client, start) = keys::decode_unannounced_close_key(&key)
                .ok_or_else(|| Error::Corrupt(format!("undecodable close marker {key:?}")))?;
            out.push((client, start, value.to_vec()));
        }
        Ok(out)
    }

    /// Removes the markers of closes whose announcements are logged.
    pub fn announced(&self, partition: u16, closes: &[(&str, i64)]) -> Result<()> {
        if closes.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let mut written = Vec::with_capacity(closes.len());
        for (client, start) in closes {
            let key = keys::unannounced_close_key(partition, client, *start);
            batch.delete(CF_LIMITS, &key);
            written.push(key);
        }
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        self.engine.write(batch, false)?;
        if let Some(mut set) = guard {
            set.extend(written.into_iter().map(|key| (StateStore::Limits, key)));
        }
        Ok(())
    }
}
