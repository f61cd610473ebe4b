//! A shard's flush: one atomic WriteBatch with the stats deltas (merged
//! into minute, hour and day buckets and into period totals), dedupe
//! claims, dead letters, limiter and detector state and the checkpoint,
//! with the changed keys recorded for the changelog under the same lock.

use std::collections::HashMap;

use rocksdb::{WriteBatch, WriteOptions};
use tally_pipelines::ingest::FlushContent;
use tally_pipelines::time::{Granularity, Period};
use tally_pipelines::top::PeriodTotals;

use crate::changelog::StateStore;
use crate::codec::encode;
use crate::keys::{self, CF_DEAD_LETTER, CF_DEDUPE, CF_LIMITS, CF_META, CF_STATS};
use crate::limits::LimitWrites;
use crate::retention::wall_clock_ms;
use crate::snapshot::ChangedKey;
use crate::store::{rocks, Checkpoint, CommitStats, DeadLetterRecord, Store};
use crate::Result;

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
        let mut batch = WriteBatch::default();
        let tracking = self.changes.get().is_some();
        let mut changed: Vec<ChangedKey> = Vec::new();
        let stats_cf = self.cf(CF_STATS)?;
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
                batch.merge_cf(stats_cf, &key, &value);
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
            batch.merge_cf(stats_cf, &key, encode(&totals)?);
            if tracking {
                changed.push((StateStore::Stats, key));
            }
        }
        let mut next = checkpoint.clone();
        let dedupe_cf = self.cf(CF_DEDUPE)?;
        if let Some(newest) = content.dedupe_claims.iter().map(|&(_, ts)| ts).max() {
            let key = keys::dedupe_segment_key(partition, newest, next.dedupe_seq);
            batch.put_cf(dedupe_cf, &key, encode(&content.dedupe_claims)?);
            if tracking {
                changed.push((StateStore::Dedupe, key));
            }
            next.dedupe_seq += 1;
        }
        // Segments wholly before the window go in one range delete, at most
        // once per minute of event time (each is a range tombstone).
        if let Some(cutoff) = content.dedupe_cutoff_ms {
            if cutoff >= next.dedupe_deleted_below_ms.saturating_add(60_000) {
                batch.delete_range_cf(
                    dedupe_cf,
                    keys::dedupe_segments_from(partition, 0),
                    keys::dedupe_segments_from(partition, cutoff),
                );
                next.dedupe_deleted_below_ms = cutoff;
            }
        }
        let dead_cf = self.cf(CF_DEAD_LETTER)?;
        let now = wall_clock_ms();
        for dl in &content.dead_letters {
            let record = DeadLetterRecord {
                partition,
                sequence: next.dead_letter_seq,
                reason: dl.reason.clone(),
                event_json: dl.event_json.clone(),
                event_ms: dl.event_ms,
                recorded_at_ms: now,
            };
            batch.put_cf(
                dead_cf,
                keys::dead_letter_key(partition, record.sequence),
                encode(&record)?,
            );
            next.dead_letter_seq += 1;
        }
        for (key, value) in limits.encoded(partition)? {
            batch.put_cf(self.cf(CF_LIMITS)?, &key, value);
            if tracking {
                changed.push((StateStore::Limits, key));
            }
        }
        for key in limits.deleted(partition) {
            batch.delete_cf(self.cf(CF_LIMITS)?, &key);
            if tracking {
                changed.push((StateStore::Limits, key));
            }
        }
        next.max_event_ms = content.max_event_ms.max(next.max_event_ms);
        batch.put_cf(
            self.cf(CF_META)?,
            keys::checkpoint_key(partition),
            encode(&next)?,
        );
        let stats = CommitStats {
            bytes: batch.size_in_bytes(),
            records: batch.len(),
        };
        let mut opts = WriteOptions::default();
        opts.set_sync(sync && self.wal);
        opts.disable_wal(!self.wal);
        // Marked and written under one lock: see `snapshot`.
        match self.changes.get().and_then(|t| t.lock(partition)) {
            Some(mut set) => {
                self.db.write_opt(batch, &opts).map_err(rocks)?;
                set.extend(changed);
            }
            None => self.db.write_opt(batch, &opts).map_err(rocks)?,
        }
        *checkpoint = next;
        if let Some(ms) = checkpoint.max_event_ms {
            self.clocks.advance(partition, ms);
        }
        Ok(stats)
    }
}
