//! Restoring a partition from its changelog, streamed into the store.
//!
//! Records are fed in log order ([`Restore::apply`]) and the rule of
//! [`crate::changelog`] decides each key: the last record of a key counts,
//! with its `after` if its round is at or before the last marker, else its
//! `before` (a round cut short by a crash), and a tombstone removes the key.
//!
//! What is not yet decided is held in memory, up to a budget. A restore
//! that fits is applied in one atomic, durable batch, so readers of the
//! partition see the old state or the new one, never a mix. Past the
//! budget the restore *spills*: it first removes the partition's
//! checkpoint and changelog mark (readers then refuse stale answers, and a
//! crash leaves a partition known to need a full restore), then writes
//! every key whose round is committed by a marker already read. Only the
//! records after the newest marker stay in memory: one round.
//!
//! A restore either replaces the partition ([`Restore::replacing`]) or
//! continues a local state that equals the changelog at a mark this
//! instance recorded ([`Restore::continuing`], as Kafka Streams restores
//! from its local checkpoint), reading only what was appended since.

use std::collections::HashMap;

use crate::changelog::{ChangelogMark, ChangelogValue, StateStore, STATE_STORES};
use crate::codec::{decode, encode};
use crate::engine::WriteBatch;
use crate::keys::{self, CF_META};
use crate::snapshot::ChangedKey;
use crate::store::{Checkpoint, Store};
use crate::Result;

/// The last record of a key not yet written to the store.
enum Pending {
    Change {
        round: u64,
        before: Option<Vec<u8>>,
        after: Option<Vec<u8>>,
    },
    Tombstone,
}

impl Pending {
    fn bytes(&self) -> usize {
        match self {
            Pending::Change { before, after, .. } => {
                before.as_ref().map_or(0, Vec::len) + after.as_ref().map_or(0, Vec::len) + 32
            }
            Pending::Tombstone => 8,
        }
    }
}

/// At most this many keys left absent without a tombstone are handed to
/// the next owner's first round (more only means more changelog records
/// until those keys change again).
const MAX_UNBURIED: usize = 100_000;
/// Spilled writes go in batches of about this size.
const SPILL_BATCH_BYTES: usize = 8 << 20;

/// One partition's restore in progress.
pub struct Restore<'s> {
    store: &'s Store,
    partition: u16,
    /// A full restore: the partition's local state is replaced.
    replace: bool,
    marker: Option<(u64, Checkpoint)>,
    pending: HashMap<ChangedKey, Pending>,
    pending_bytes: usize,
    budget: usize,
    spilled: bool,
    /// The committed round at the last spill: until a newer marker, a
    /// spill could write nothing more.
    spilled_at: Option<u64>,
    unburied: Vec<ChangedKey>,
    /// The local checkpoint's dead-letter sequence: local dead letters
    /// keep their numbers.
    dead_letter_seq: u64,
    records: u64,
    undecodable: u64,
}

/// What a finished restore did.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The last marker's round; `None` if no round was ever completed.
    pub round: Option<u64>,
    pub mark: ChangelogMark,
    /// Keys of a round cut short; the next round republishes them.
    pub uncommitted: usize,
    /// Keys absent at the marker whose last record is not a tombstone:
    /// the next round publishes a tombstone for each.
    pub unburied: Vec<ChangedKey>,
    pub records: u64,
    pub undecodable: u64,
    /// Whether the restore outgrew its memory budget and streamed.
    pub spilled: bool,
}

impl Restored {
    /// The number of the next round to publish.
    pub fn next_round(&self) -> u64 {
        self.round.map_or(1, |r| r + 1)
    }
}

impl<'s> Restore<'s> {
    /// A restore that replaces everything of `partition` (statistics,
    /// dedupe claims, limits, checkpoint) with the changelog's state.
    /// Dead letters stay: they are local diagnostics.
    pub fn replacing(store: &'s Store, partition: u16, budget: usize) -> Self {
        Self::new(store, partition, true, None, budget)
    }

    /// A restore on top of the local state, which equals the changelog's
    /// at `mark` (the caller checked the local checkpoint is the mark's);
    /// fed the records appended after `mark.ends`.
    pub fn continuing(
        store: &'s Store,
        partition: u16,
        mark: &ChangelogMark,
        budget: usize,
    ) -> Self {
        let marker = Some((mark.round, mark.checkpoint.clone()));
        Self::new(store, partition, false, marker, budget)
    }

    fn new(
        store: &'s Store,
        partition: u16,
        replace: bool,
        marker: Option<(u64, Checkpoint)>,
        budget: usize,
    ) -> Self {
        Self {
            store,
            partition,
            replace,
            marker,
            pending: HashMap::new(),
            pending_bytes: 0,
            budget,
            spilled: false,
            spilled_at: None,
            unburied: Vec::new(),
            dead_letter_seq: store
                .load_checkpoint(partition)
                .map_or(0, |c| c.dead_letter_seq),
            records: 0,
            undecodable: 0,
        }
    }

    /// Feeds one record of `store`'s changelog; `value: None` is a
    /// tombstone. Fails only if a spill cannot be written.
    pub fn apply(&mut self, store: StateStore, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        self.records += 1;
        let entry = match value {
            None => Pending::Tombstone,
            Some(value) => match decode::<ChangelogValue>(value) {
                Ok(ChangelogValue::Change {
                    round,
                    before,
                    after,
                    ..
                }) => Pending::Change {
                    round,
                    before,
                    after,
                },
                Ok(ChangelogValue::Marker { round, checkpoint }) => {
                    // Markers only move forward; an older one arriving
                    // later (it cannot, with one writer at a time) is
                    // ignored.
                    if self.marker.as_ref().is_none_or(|(r, _)| round >= *r) {
                        self.marker = Some((round, checkpoint));
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, key = ?key, "undecodable changelog record skipped");
                    self.undecodable += 1;
                    return Ok(());
                }
            },
        };
        self.pending_bytes += entry.bytes() + key.len();
        if let Some(old) = self.pending.insert((store, key.to_vec()), entry) {
            self.pending_bytes = self.pending_bytes.saturating_sub(old.bytes() + key.len());
        }
        if self.pending_bytes > self.budget
            && (!self.spilled || self.committed_round() != self.spilled_at)
        {
            self.spill()?;
        }
        Ok(())
    }

    fn committed_round(&self) -> Option<u64> {
        self.marker.as_ref().map(|(r, _)| *r)
    }

    /// Writes every pending key a marker already decided.
    fn spill(&mut self) -> Result<()> {
        let p = self.partition;
        if !self.spilled {
            let mut batch = WriteBatch::default();
            // From here on the partition is neither its old state nor a
            // restored one: nothing may read it as either.
            batch.delete(CF_META, &keys::checkpoint_key(p));
            batch.delete(CF_META, &keys::changelog_mark_key(p));
            if self.replace {
                clear_partition(&mut batch, p);
            }
            self.store.engine.write(batch, false)?;
            self.spilled = true;
            tracing::info!(
                partition = p,
                budget = self.budget,
                "changelog restore outgrew its memory budget; streaming it into the store"
            );
        }
        let committed = self.committed_round();
        let decided: Vec<ChangedKey> = self
            .pending
            .iter()
            .filter(|(_, e)| match e {
                Pending::Tombstone => true,
                Pending::Change { round, .. } => committed.is_some_and(|m| *round <= m),
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut batch = WriteBatch::default();
        for key in decided {
            if let Some(entry) = self.pending.remove(&key) {
                self.pending_bytes = self
                    .pending_bytes
                    .saturating_sub(entry.bytes() + key.1.len());
                let value = match entry {
                    Pending::Tombstone => None,
                    Pending::Change { after, .. } => {
                        if after.is_none() {
                            self.bury_later(&key);
                        }
                        after
                    }
                };
                self.write_value(&mut batch, &key, value.as_deref());
                if batch.size_in_bytes() >= SPILL_BATCH_BYTES {
                    self.store.engine.write(std::mem::take(&mut batch), false)?;
                }
            }
        }
        if !batch.is_empty() {
            self.store.engine.write(batch, false)?;
        }
        self.spilled_at = committed;
        Ok(())
    }

    fn bury_later(&mut self, key: &ChangedKey) {
        if self.unburied.len() < MAX_UNBURIED {
            self.unburied.push(key.clone());
        }
    }

    fn write_value(&self, batch: &mut WriteBatch, (store, key): &ChangedKey, value: Option<&[u8]>) {
        match value {
            Some(v) => batch.put(store.column_family(), key, v),
            // A replaced, unspilled partition was range-deleted in the
            // same batch; anything else may hold the key.
            None if self.replace && !self.spilled => {}
            None => batch.delete(store.column_family(), key),
        }
    }

    /// Decides the keys still pending, writes them with the checkpoint of
    /// the last marker and the mark of what was read (`ends`: where each
    /// changelog partition ended), durably, and resets the changed-key set
    /// to the keys of a cut-short round.
    pub fn finish(mut self, ends: [i64; STATE_STORES]) -> Result<Restored> {
        let p = self.partition;
        let committed = self.committed_round();
        let mut uncommitted: Vec<ChangedKey> = Vec::new();
        let mut batch = WriteBatch::default();
        if self.replace && !self.spilled {
            clear_partition(&mut batch, p);
        }
        let mut pending: Vec<(ChangedKey, Pending)> =
            std::mem::take(&mut self.pending).into_iter().collect();
        pending.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, entry) in pending {
            let value = match entry {
                Pending::Tombstone => None,
                Pending::Change {
                    round,
                    before,
                    after,
                } => {
                    let value = if committed.is_some_and(|m| round <= m) {
                        after
                    } else {
                        uncommitted.push(key.clone());
                        before
                    };
                    if value.is_none() {
                        self.bury_later(&key);
                    }
                    value
                }
            };
            self.write_value(&mut batch, &key, value.as_deref());
            if self.spilled && batch.size_in_bytes() >= SPILL_BATCH_BYTES {
                self.store.engine.write(std::mem::take(&mut batch), false)?;
            }
        }
        let (round, mut checkpoint) = match self.marker.take() {
            Some((r, c)) => (Some(r), c),
            None => (None, Checkpoint::default()),
        };
        checkpoint.dead_letter_seq = checkpoint.dead_letter_seq.max(self.dead_letter_seq);
        let mark = ChangelogMark {
            round: round.unwrap_or(0),
            checkpoint: checkpoint.clone(),
            // Strays of a cut-short round must be republished before the
            // local state may count as current.
            ends: uncommitted.is_empty().then_some(ends),
        };
        batch.put(CF_META, &keys::checkpoint_key(p), &encode(&checkpoint)?);
        batch.put(CF_META, &keys::changelog_mark_key(p), &encode(&mark)?);
        let guard = self.store.changes.get().and_then(|t| t.lock(p));
        self.store.engine.write(batch, true)?;
        let uncommitted_count = uncommitted.len();
        if let Some(mut set) = guard {
            set.clear();
            set.extend(uncommitted);
        }
        if let Some(ms) = checkpoint.event_clock_ms {
            self.store.clocks.advance(p, ms);
        }
        self.store.clocks.forget_published_expiry(p);
        // The telemetry clock restored with the partition's telemetry.
        if let Ok(Some(ms)) = self
            .store
            .load_telemetry_checkpoint(p)
            .map(|c| c.event_clock_ms)
        {
            self.store.telemetry_clocks.advance(p, ms);
        }
        self.store.telemetry_clocks.forget_published_expiry(p);
        Ok(Restored {
            round,
            mark,
            uncommitted: uncommitted_count,
            unburied: self.unburied,
            records: self.records,
            undecodable: self.undecodable,
            spilled: self.spilled,
        })
    }
}

/// Removes everything of `p` the changelog restores.
fn clear_partition(batch: &mut WriteBatch, p: u16) {
    for store in StateStore::ALL {
        let (start, end) = store.partition_range(p);
        batch.delete_range(store.column_family(), &start, &end);
    }
}

#[cfg(test)]
mod tests;
