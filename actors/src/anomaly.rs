//! Closing a shard's minute buckets and judging them.
//!
//! A (client, minute) bucket is closed once the partition's watermark
//! (its event-time clock minus the allowed lateness) passes the minute's
//! end, or when the partition has been idle for `idle_close` of wall-clock
//! time, so that a client who goes quiet still has its last minutes judged.
//! A closed bucket is read back from the store (it was flushed), summarized,
//! and fed to the client's detector; anomalies are stored at once (their
//! ids are deterministic, so a repeat overwrites) and detectors' baselines
//! go with the next flush.
//!
//! Each minute is judged once. Closing moves a mark, `judged_before`
//! (persisted in the checkpoint), past every minute it closed; on-time
//! events that reach such a minute later (the idle timer closed it, then
//! the producer caught up) are counted in usage but never reopen it, so it
//! is not judged, learned from or alerted on a second time.
//!
//! Detectors live in a bounded LRU, like limiters: a detector evicted with
//! unflushed learning is kept for the next flush, which writes it, and is
//! read back from there until then.
//!
//! The clients of each open minute are marked in the store with the flush
//! that wrote their bucket; memory keeps at most `max_detectors` of them
//! per shard (so a burst of new clients inside the allowed lateness costs
//! no memory per client). A minute whose list outgrew that is read back
//! from its marks when it closes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;
use tally_pipelines::detect::{Anomaly, ClientDetector, DetectorConfig, MinuteSummary};
use tally_pipelines::ingest::FlushContent;
use tally_pipelines::sketch::LatencySketch;
use tally_pipelines::time::{Granularity, MINUTE_MS};
use tally_state::Store;

use crate::telemetry::AnomalyDetected;
use crate::Error;

/// Detector settings every shard shares.
#[derive(Debug, Clone)]
pub struct DetectSettings {
    pub config: DetectorConfig,
    /// Close every open minute after this long without events.
    pub idle_close: Duration,
    /// Where ANOMALY_DETECTED events go.
    pub alerts: Option<Arc<crate::alerts::AlertLog>>,
    /// Detectors a shard keeps in memory.
    pub max_detectors: usize,
}

impl Default for DetectSettings {
    fn default() -> Self {
        Self {
            config: DetectorConfig::default(),
            idle_close: Duration::from_secs(120),
            alerts: None,
            max_detectors: 100_000,
        }
    }
}

pub struct ShardDetectors {
    partition: u16,
    store: Arc<Store>,
    settings: DetectSettings,
    detectors: LruCache<String, ClientDetector>,
    /// Detectors evicted with unflushed learning (written by the next
    /// flush, read back from here until then).
    evicted: HashMap<String, ClientDetector>,
    /// Minutes before this are judged; they never open again.
    judged_before: Option<i64>,
    /// Flushed minutes not closed yet, with the clients seen in them.
    open: BTreeMap<i64, OpenMinute>,
    /// Clients listed in `open`, over all minutes.
    open_listed: usize,
    /// Gateway denials per (minute, client) not judged yet.
    denials: HashMap<(i64, String), u64>,
    changed: HashSet<String>,
    /// Judged since the last flush: their open marks go with it.
    closed: Vec<(i64, String)>,
}

impl ShardDetectors {
    pub fn new(partition: u16, store: Arc<Store>, settings: DetectSettings) -> Self {
        let capacity =
            NonZeroUsize::new(settings.max_detectors.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            partition,
            store,
            settings,
            detectors: LruCache::new(capacity),
            evicted: HashMap::new(),
            judged_before: None,
            open: BTreeMap::new(),
            open_listed: 0,
            denials: HashMap::new(),
            changed: HashSet::new(),
            closed: Vec::new(),
        }
    }

    /// Forgets everything in memory (the partition was released).
    pub fn clear(&mut self) {
        self.detectors.clear();
        self.evicted.clear();
        self.judged_before = None;
        self.open.clear();
        self.open_listed = 0;
        self.denials.clear();
        self.changed.clear();
        self.closed.clear();
    }

    /// Back to the last flush (restart, restore): the minutes flushed and
    /// not judged are read back, so none is skipped, whoever judges it. A
    /// minute judged after the last flush is judged again, against the
    /// baseline of that flush, with the same outcome (ids included).
    pub fn reload(&mut self, judged_before: Option<i64>) -> Result<(), Error> {
        self.clear();
        self.judged_before = judged_before;
        for (minute, client) in self.store.open_minutes(self.partition)? {
            self.note_open(minute, client);
        }
        Ok(())
    }

    /// Lists a client in an open minute, or notes that the minute's list is
    /// partial once memory holds as many as it may.
    fn note_open(&mut self, minute: i64, client: String) {
        let cap = self.settings.max_detectors.max(1);
        let open = self.open.entry(minute).or_default();
        if open.clients.contains(&client) {
            return;
        }
        if self.open_listed < cap {
            open.clients.insert(client);
            self.open_listed += 1;
        } else {
            open.partial = true;
        }
    }

    /// Minutes before this are judged (persisted with the flush).
    pub fn judged_before(&self) -> Option<i64> {
        self.judged_before
    }

    /// Whether a minute may still be judged.
    fn is_open_to_judging(&self, minute: i64) -> bool {
        self.judged_before.is_none_or(|j| minute >= j)
    }

    /// The (minute, client) buckets a flush opens, to be marked with it.
    pub fn opened_by(&self, content: &FlushContent) -> Vec<(i64, String)> {
        let mut pairs: Vec<(i64, String)> = content
            .stats
            .iter()
            .filter(|d| {
                self.is_open_to_judging(d.minute_start_ms)
                    && !self
                        .open
                        .get(&d.minute_start_ms)
                        .is_some_and(|m| m.clients.contains(&d.client_id))
            })
            .map(|d| (d.minute_start_ms, d.client_id.clone()))
            .collect();
        pairs.sort();
        pairs.dedup();
        pairs
    }

    /// Buckets judged since the last flush (their marks are removed by it).
    pub fn take_closed(&mut self) -> Vec<(i64, String)> {
        std::mem::take(&mut self.closed)
    }

    pub fn idle_close(&self) -> Duration {
        self.settings.idle_close
    }

    /// Notes the (client, minute) cells a flush wrote.
    pub fn note_flushed(&mut self, content: &FlushContent) {
        for delta in &content.stats {
            if !self.is_open_to_judging(delta.minute_start_ms) {
                continue;
            }
            self.note_open(delta.minute_start_ms, delta.client_id.clone());
        }
    }

    /// Notes the checks the gateway was told to deny, per (minute,
    /// client): a denied client's minute is judged even when none of its
    /// requests reached the event stream.
    pub fn note_denials(&mut self, denials: impl IntoIterator<Item = ((i64, String), u64)>) {
        for ((minute, client), n) in denials {
            if !self.is_open_to_judging(minute) {
                continue;
            }
            self.note_open(minute, client.clone());
            *self.denials.entry((minute, client)).or_default() += n;
        }
    }

    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || !self.closed.is_empty() || !self.evicted.is_empty()
    }

    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// Closes and judges every open minute that ends at or before
    /// `watermark_ms` (all of them with `None`), oldest first.
    pub fn close(&mut self, watermark_ms: Option<i64>) -> Result<Vec<Anomaly>, Error> {
        let mut found = Vec::new();
        let config = self.settings.config.clone();
        while let Some((&minute, _)) = self.open.first_key_value() {
            if watermark_ms.is_some_and(|w| minute + MINUTE_MS > w) {
                break;
            }
            let Some((minute, open)) = self.open.pop_first() else {
                break;
            };
            self.open_listed -= open.clients.len();
            let mut clients: Vec<String> = open.clients.into_iter().collect();
            if open.partial {
                // Marked by the flushes; denials are noted in memory only.
                clients.extend(self.store.open_minute_clients(self.partition, minute)?);
                clients.extend(
                    self.denials
                        .keys()
                        .filter(|(m, _)| *m == minute)
                        .map(|(_, c)| c.clone()),
                );
            }
            clients.sort();
            clients.dedup();
            for client in clients {
                let summary = self.summary(&client, minute)?;
                self.denials.remove(&(minute, client.clone()));
                let detector = self.detector(&client)?;
                found.extend(detector.evaluate(&client, &summary, &config));
                self.changed.insert(client.clone());
                self.closed.push((minute, client));
            }
            self.judged_before = Some(
                self.judged_before
                    .map_or(minute + MINUTE_MS, |j| j.max(minute + MINUTE_MS)),
            );
        }
        if !found.is_empty() {
            self.store.put_anomalies(self.partition, &found)?;
            for a in &found {
                AnomalyDetected { anomaly: a }.emit();
                if let Some(alerts) = &self.settings.alerts {
                    alerts.publish(
                        "ANOMALY_DETECTED",
                        &a.client_id,
                        a.endpoint.as_deref(),
                        a.detected_at_ms,
                        serde_json::to_value(a).unwrap_or(serde_json::Value::Null),
                    );
                }
            }
        }
        Ok(found)
    }

    /// A client's detector: in memory, evicted and not yet written, or
    /// stored.
    fn detector(&mut self, client: &str) -> Result<&mut ClientDetector, Error> {
        if !self.detectors.contains(client) {
            let state = match self.evicted.remove(client) {
                Some(d) => d,
                None => self
                    .store
                    .detector(self.partition, client)?
                    .unwrap_or_default(),
            };
            if let Some((name, old)) = self.detectors.push(client.to_string(), state) {
                if name != client && self.changed.remove(&name) {
                    self.evicted.insert(name, old);
                }
            }
        }
        self.detectors
            .get_mut(client)
            .ok_or_else(|| Error::NotLoaded(client.to_string()))
    }

    fn summary(&self, client: &str, minute: i64) -> Result<MinuteSummary, Error> {
        let mut s = MinuteSummary {
            minute_start_ms: minute,
            denials: self
                .denials
                .get(&(minute, client.to_string()))
                .copied()
                .unwrap_or(0),
            ..MinuteSummary::default()
        };
        let mut latency = LatencySketch::new();
        if let Some(bucket) =
            self.store
                .read_bucket(self.partition, client, Granularity::Minute, minute)?
        {
            for (endpoint, e) in bucket.endpoints() {
                s.requests += e.requests;
                s.server_errors += e.server_errors;
                s.auth_failures += e.auth_failures;
                latency.merge(&e.latency);
                s.endpoints.push((endpoint.to_string(), e.requests));
            }
        }
        s.p95_latency_ms = latency.quantile(0.95);
        Ok(s)
    }

    /// Detectors that learned since the last flush.
    pub fn take_changed(&mut self) -> Vec<(String, ClientDetector)> {
        let detectors = &self.detectors;
        let mut out: Vec<(String, ClientDetector)> = self
            .changed
            .drain()
            .filter_map(|c| detectors.peek(&c).map(|d| (c.clone(), d.clone())))
            .collect();
        // Written by this flush; a failed flush restarts the shard, which
        // reloads from the store anyway.
        out.extend(self.evicted.drain());
        out
    }

    /// Detectors in memory (for the memory bound).
    pub fn in_memory(&self) -> usize {
        self.detectors.len() + self.evicted.len()
    }

    /// Clients of open minutes listed in memory (for the memory bound).
    pub fn open_listed(&self) -> usize {
        self.open_listed
    }
}

/// One minute flushed and not judged yet.
#[derive(Default)]
struct OpenMinute {
    clients: HashSet<String>,
    /// More clients were marked in the store than memory lists.
    partial: bool,
}
