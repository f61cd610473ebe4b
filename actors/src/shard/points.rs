//! A shard's telemetry: the partition's series (dedupe, lateness, the
//! series bound and pending buckets in
//! [`tally_pipelines::telemetry::ingest`]), the watch of each series
//! (anomalies, drift), and the signals its points raised, published only
//! once the flush that makes those points durable has committed (a
//! restart replays the points and raises them again, never twice).

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use tally_pipelines::dedupe::DedupeIndex;
use tally_pipelines::telemetry::ingest::{PartitionTelemetry, PointVerdict, TelemetryFlush};
use tally_pipelines::telemetry::watch::{SeriesWatch, Signal, WatchRules};
use tally_pipelines::telemetry::Point;
use tally_state::codec::{decode, encode};
use tally_state::telemetry::TelemetryCheckpoint;
use tally_state::Store;

use super::ShardConfig;
use crate::alerts::AlertLog;
use crate::messages::BatchOutcome;
use crate::Error;

pub const TELEMETRY_ANOMALY: &str = "TELEMETRY_ANOMALY";
pub const TELEMETRY_DRIFT: &str = "TELEMETRY_DRIFT";

/// `(series, encoded watch)` of the series whose watch changed.
pub(super) type EncodedWatches = Vec<(String, Vec<u8>)>;

pub(super) struct ShardPoints {
    pub(super) ingest: PartitionTelemetry,
    /// What is durable.
    pub(super) checkpoint: TelemetryCheckpoint,
    watches: FxHashMap<String, SeriesWatch>,
    /// Series whose watch changed since the last flush.
    changed: FxHashSet<String>,
    /// Raised since the last flush: `(series, signal)`.
    signals: Vec<(String, Signal)>,
    rules: Arc<WatchRules>,
}

impl ShardPoints {
    /// An empty partition (before a load, after a release).
    pub(super) fn empty(config: &ShardConfig) -> Self {
        ShardPoints {
            ingest: PartitionTelemetry::new(
                config.rules,
                config.telemetry.clone(),
                None,
                DedupeIndex::new(1),
                Vec::new(),
            ),
            checkpoint: TelemetryCheckpoint::default(),
            watches: FxHashMap::default(),
            changed: FxHashSet::default(),
            signals: Vec::new(),
            rules: config.watch.clone(),
        }
    }

    /// The partition's telemetry as of its last flush.
    pub(super) fn load(store: &Store, partition: u16, config: &ShardConfig) -> Result<Self, Error> {
        let checkpoint = store.load_telemetry_checkpoint(partition)?;
        let cutoff = checkpoint
            .event_clock_ms
            .map(|m| m.saturating_sub(config.rules.dedupe_window_ms));
        let mut dedupe = DedupeIndex::within(config.dedupe.clone());
        dedupe.restore(store.load_telemetry_dedupe_claims(partition, cutoff)?);
        let known = store.telemetry_series(partition)?;
        let mut watches = FxHashMap::default();
        for (series, state) in store.telemetry_detectors(partition)? {
            let watch: SeriesWatch = decode(&state).map_err(|e| {
                Error::Corrupt(format!("the detector state of series {series:?}: {e}"))
            })?;
            watches.insert(series, watch);
        }
        Ok(ShardPoints {
            ingest: PartitionTelemetry::new(
                config.rules,
                config.telemetry.clone(),
                checkpoint.event_clock_ms,
                dedupe,
                known,
            ),
            checkpoint,
            watches,
            changed: FxHashSet::default(),
            signals: Vec::new(),
            rules: config.watch.clone(),
        })
    }

    pub(super) fn apply(&mut self, points: &[Point], now_ms: i64, outcome: &mut BatchOutcome) {
        for point in points {
            match self.ingest.apply(point, now_ms) {
                PointVerdict::Accepted => {
                    outcome.accepted += 1;
                    self.watch(point);
                }
                PointVerdict::Duplicate => outcome.duplicates += 1,
                PointVerdict::Late { .. } => outcome.late += 1,
                PointVerdict::TooManySeries { .. } => outcome.over_series_limit += 1,
            }
        }
    }

    fn watch(&mut self, point: &Point) {
        let drift = self.rules.drift_for(&point.series);
        let watch = match self.watches.get_mut(point.series.as_str()) {
            Some(w) => w,
            None => self.watches.entry(point.series.clone()).or_default(),
        };
        let signals = watch.observe(&self.rules, drift, point.timestamp_ms, point.value);
        if !self.changed.contains(point.series.as_str()) {
            self.changed.insert(point.series.clone());
        }
        for signal in signals.into_iter().flatten() {
            self.signals.push((point.series.clone(), signal));
        }
    }

    pub(super) fn pending(&self) -> usize {
        self.ingest.pending_points()
    }

    /// What the next flush writes: the points' deltas and the changed
    /// watches, encoded.
    pub(super) fn take_write(&mut self) -> Result<(TelemetryFlush, EncodedWatches), Error> {
        let flush = self.ingest.take_flush();
        let mut detectors = Vec::with_capacity(self.changed.len());
        for series in self.changed.drain() {
            if let Some(w) = self.watches.get(&series) {
                detectors.push((series, encode(w)?));
            }
        }
        Ok((flush, detectors))
    }

    /// The flush committed: what its points raised goes on the channel.
    pub(super) fn publish(&mut self, alerts: Option<&AlertLog>) {
        let Some(alerts) = alerts else {
            self.signals.clear();
            return;
        };
        for (series, signal) in self.signals.drain(..) {
            match signal {
                Signal::Anomaly {
                    at_ms,
                    value,
                    index,
                    mean,
                    stddev,
                } => alerts.publish(
                    TELEMETRY_ANOMALY,
                    &series,
                    None,
                    at_ms,
                    serde_json::json!({
                        "series": series,
                        "value": value,
                        "anomaly_index": index,
                        "mean": mean,
                        "stddev": stddev,
                        "k": self.rules.anomaly_k,
                    }),
                ),
                Signal::Drift(d) => alerts.publish(
                    TELEMETRY_DRIFT,
                    &series,
                    None,
                    d.at_ms,
                    serde_json::json!({
                        "series": series,
                        "direction": d.direction,
                        "baseline_mean": d.baseline_mean,
                        "baseline_stddev": d.baseline_stddev,
                        "method": self.rules.drift_for(&series).map(|c| c.method),
                    }),
                ),
            }
        }
    }
}
