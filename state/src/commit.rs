//! A shard's flush: one atomic WriteBatch with the stats deltas (merged
//! into minute, hour and day buckets and into period totals), dedupe
//! claims, dead letters, limiter and detector state and the checkpoint,
//! with the changed keys recorded for the changelog under the same lock.

use std::collections::HashMap;

use tally_pipelines::ingest::FlushContent;
use tally_pipelines::telemetry::ingest::{TelemetryFlush, TelemetryRules};
use tally_pipelines::time::{Granularity, Period};
use tally_pipelines::top::PeriodTotals;

use crate::changelog::StateStore;
use crate::codec::encode;
use crate::engine::WriteBatch;
use crate::keys::{self, CF_DEAD_LETTER, CF_DEDUPE, CF_LIMITS, CF_META, CF_STATS};
use crate::limits::LimitWrites;
use crate::snapshot::ChangedKey;
use crate::store::{Checkpoint, CommitStats, DeadLetterRecord, Store};
use crate::telemetry::TelemetryCheckpoint;
use crate::Result;

/// The telemetry part of a shard's flush, tracked for the changelog like
/// the rest: buckets as `stats` keys, point ids as `dedupe` keys, the
/// checkpoint, registry and detectors as the `telemetry` store.
pub struct TelemetryWrite<'a> {
    pub flush: &'a TelemetryFlush,
    pub rules: &'a TelemetryRules,
    /// Detector state of the series whose detectors changed, encoded.
    pub detectors: &'a [(String, Vec<u8>)],
    /// Advanced once the batch is written.
    pub checkpoint: &'a mut TelemetryCheckpoint,
}

impl TelemetryWrite<'_> {
    /// Adds the telemetry writes to `batch`; answers the checkpoint they
    /// make.
    fn add_to(
        &self,
        batch: &mut WriteBatch,
        partition: u16,
        dead_letter_seq: &mut u64,
        now_ms: i64,
        changed: Option<&mut Vec<ChangedKey>>,
    ) -> Result<TelemetryCheckpoint> {
        let mut next = self.checkpoint.clone();
        let mut tracked = Vec::new();
        let track = changed.is_some();
        for delta in &self.flush.deltas {
            // One encoded delta merged into every resolution's bucket.
            let value = encode(&delta.bucket)?;
            for (resolution, start) in delta.targets(self.rules) {
                let key = keys::telemetry_key(partition, resolution, &delta.series, start);
                batch.merge(CF_STATS, &key, &value);
                if track {
                    tracked.push((StateStore::Stats, key));
                }
            }
        }
        for series in &self.flush.new_series {
            let key = keys::telemetry_series_key(partition, series);
            batch.put(CF_META, &key, &[]);
            if track {
                tracked.push((StateStore::Telemetry, key));
            }
        }
        if let Some(newest) = self.flush.dedupe_claims.iter().map(|&(_, ts)| ts).max() {
            let key = keys::telemetry_dedupe_segment_key(partition, newest, next.dedupe_seq);
            batch.put(CF_DEDUPE, &key, &encode(&self.flush.dedupe_claims)?);
            if track {
                tracked.push((StateStore::Dedupe, key));
            }
            next.dedupe_seq += 1;
        }
        if let Some(cutoff) = self.flush.dedupe_cutoff_ms {
            if cutoff >= next.dedupe_deleted_below_ms.saturating_add(60_000) {
                batch.delete_range(
                    CF_DEDUPE,
                    &keys::telemetry_dedupe_segments_from(partition, 0),
                    &keys::telemetry_dedupe_segments_from(partition, cutoff),
                );
                next.dedupe_deleted_below_ms = cutoff;
            }
        }
        for dl in &self.flush.dead_letters {
            let record = DeadLetterRecord {
                partition,
                sequence: *dead_letter_seq,
                reason: dl.reason.clone(),
                event_json: dl.event_json.clone(),
                event_ms: dl.event_ms,
                recorded_at_ms: now_ms,
            };
            batch.put(
                CF_DEAD_LETTER,
                &keys::dead_letter_key(partition, record.sequence),
                &encode(&record)?,
            );
            *dead_letter_seq += 1;
        }
        for (series, state) in self.detectors {
            let key = keys::telemetry_detector_key(partition, series);
            batch.put(CF_META, &key, state);
            if track {
                tracked.push((StateStore::Telemetry, key));
            }
        }
        next.event_clock_ms = self.flush.event_clock_ms.max(next.event_clock_ms);
        let key = keys::telemetry_checkpoint_key(partition);
        batch.put(CF_META, &key, &encode(&next)?);
        if let Some(changed) = changed {
            changed.extend(tracked);
            changed.push((StateStore::Telemetry, key));
        }
        Ok(next)
    }
}

impl Store {
    /// Writes one flush of one partition atomically: stats deltas (merged),
    /// dedupe claims, dead letters and the checkpoint. `sync` makes the
    /// write durable against power loss, not only against a process crash.
    pub fn commit(
        &self,
        partition: u16,
        content: &FlushContent,
        checkpoint: &mut Checkpoint,
        sync: bool,
    ) -> Result<CommitStats> {
        self.commit_with(
            partition,
            content,
            &LimitWrites::default(),
            checkpoint,
            sync,
        )
    }

    /// [`Store::commit`] plus the shard's dirty limiter and quota state.
    pub fn commit_with(
        &self,
        partition: u16,
        content: &FlushContent,
        limits: &LimitWrites,
        checkpoint: &mut Checkpoint,
        sync: bool,
    ) -> Result<CommitStats> {
        self.commit_flush(partition, content, limits, None, checkpoint, sync)
    }

    /// [`Store::commit_with`] plus the partition's telemetry, all in one
    /// batch.
    pub fn commit_flush(
        &self,
        partition: u16,
        content: &FlushContent,
        limits: &LimitWrites,
        telemetry: Option<TelemetryWrite<'_>>,
        checkpoint: &mut Checkpoint,
        sync: bool,
    ) -> Result<CommitStats> {
        let mut batch = WriteBatch::default();
        let tracking = self.changes.get().is_some();
        let mut changed: Vec<ChangedKey> = Vec::new();
        let mut period_totals: HashMap<(Period, i64, &str), PeriodTotals> = HashMap::new();
        for delta in &content.stats {
            // One encoded delta is merged into its minute, hour and day.
            let value = encode(&delta.stats)?;
            for g in Granularity::ALL {
                let key = keys::stats_key(
                    partition,
                    g,
                    &delta.client_id,
                    g.bucket_start(delta.minute_start_ms),
                );
                batch.merge(CF_STATS, &key, &value);
                if tracking {
                    changed.push((StateStore::Stats, key));
                }
            }
            // And its totals into the client's hour, day, week and month,
            // summed over the flush first (a client's minutes mostly share
            // their periods, so this is one operand per period, not one
            // per minute).
            let totals = PeriodTotals::of(&delta.stats);
            for period in crate::top::PERIODS {
                let (start, _) = period.bounds(delta.minute_start_ms);
                period_totals
                    .entry((period, start, delta.client_id.as_str()))
                    .or_default()
                    .add(&totals);
            }
        }
        for ((period, start, client), totals) in period_totals {
            let key = keys::period_totals_key(partition, period, start, client);
            batch.merge(CF_STATS, &key, &encode(&totals)?);
            if tracking {
                changed.push((StateStore::Stats, key));
            }
        }
        let mut next = checkpoint.clone();
        if let Some(newest) = content.dedupe_claims.iter().map(|&(_, ts)| ts).max() {
            let key = keys::dedupe_segment_key(partition, newest, next.dedupe_seq);
            batch.put(CF_DEDUPE, &key, &encode(&content.dedupe_claims)?);
            if tracking {
                changed.push((StateStore::Dedupe, key));
            }
            next.dedupe_seq += 1;
        }
        // Segments wholly before the window go in one range delete, at most
        // once per minute of event time (each is a range tombstone).
        if let Some(cutoff) = content.dedupe_cutoff_ms {
            if cutoff >= next.dedupe_deleted_below_ms.saturating_add(60_000) {
                batch.delete_range(
                    CF_DEDUPE,
                    &keys::dedupe_segments_from(partition, 0),
                    &keys::dedupe_segments_from(partition, cutoff),
                );
                next.dedupe_deleted_below_ms = cutoff;
            }
        }
        let now = self.clock.now_ms();
        for dl in &content.dead_letters {
            let record = DeadLetterRecord {
                partition,
                sequence: next.dead_letter_seq,
                reason: dl.reason.clone(),
                event_json: dl.event_json.clone(),
                event_ms: dl.event_ms,
                recorded_at_ms: now,
            };
            batch.put(
                CF_DEAD_LETTER,
                &keys::dead_letter_key(partition, record.sequence),
                &encode(&record)?,
            );
            next.dead_letter_seq += 1;
        }
        let telemetry_next = match &telemetry {
            Some(t) => Some(t.add_to(
                &mut batch,
                partition,
                &mut next.dead_letter_seq,
                now,
                tracking.then_some(&mut changed),
            )?),
            None => None,
        };
        for (key, value) in limits.encoded(partition)? {
            batch.put(CF_LIMITS, &key, &value);
            if tracking {
                changed.push((StateStore::Limits, key));
            }
        }
        for key in limits.deleted(partition) {
            batch.delete(CF_LIMITS, &key);
            if tracking {
                changed.push((StateStore::Limits, key));
            }
        }
        next.event_clock_ms = content.event_clock_ms.max(next.event_clock_ms);
        batch.put(CF_META, &keys::checkpoint_key(partition), &encode(&next)?);
        let stats = CommitStats {
            bytes: batch.size_in_bytes(),
            records: batch.len(),
        };
        // Marked and written under one lock: see `snapshot`.
        match self.changes.get().and_then(|t| t.lock(partition)) {
            Some(mut set) => {
                self.engine.write(batch, sync)?;
                set.extend(changed);
            }
            None => self.engine.write(batch, sync)?,
        }
        *checkpoint = next;
        if let (Some(t), Some(next)) = (telemetry, telemetry_next) {
            if let Some(ms) = next.event_clock_ms {
                self.telemetry_clocks.advance(partition, ms);
            }
            *t.checkpoint = next;
        }
        if let Some(ms) = checkpoint.event_clock_ms {
            self.clocks.advance(partition, ms);
        }
        Ok(stats)
    }
}
