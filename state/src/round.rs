//! What one changelog round of a partition publishes, in order: its
//! changes, its marker, then a tombstone for every key it left absent.
//!
//! A key leaves the store in four ways, and each ends as a tombstone so
//! that log compaction bounds a changelog by its live keys:
//! - a tracked delete (a judged open minute, a removed limit): the commit
//!   marks it changed like any write;
//! - expired dedupe segments, removed by one range delete per commit: the
//!   round finds them in the previous marker's snapshot, below the new
//!   cutoff;
//! - expired statistics, which RocksDB drops at compaction: a sweep, once
//!   the partition's clock has moved [`Retention::sweep_step_ms`] past the
//!   last one, reads the partition's `stats` keys and publishes those that
//!   expired since. Until the round has been delivered, compaction keeps
//!   them (see [`crate::retention::PartitionClocks::drop_clock`]), so the
//!   sweep cannot miss a key;
//! - a restore that found keys absent at the marker without a tombstone
//!   (a writer that died between its marker and its tombstones).
//!
//! A removed key is published like a change (its value before, `after:
//! None`) within the round, and its tombstone only after the marker: a
//! round cut short must still rebuild the state at the previous marker,
//! which the tombstone alone would not.

use std::collections::BTreeMap;

use crate::changelog::{ChangelogValue, StateStore};
use crate::codec::encode;
use crate::engine::Scan;
use crate::keys::{self, CF_DEDUPE, CF_STATS};
use crate::snapshot::{ChangedKey, StoreSnapshot};
use crate::store::{Checkpoint, Store};
use crate::{Result, Retention};

/// One round, ready to publish.
pub struct Round<'s> {
    pub snapshot: StoreSnapshot<'s>,
    pub checkpoint: Checkpoint,
    /// `(store, key, encoded change)`, in key order.
    pub changes: Vec<(StateStore, Vec<u8>, Vec<u8>)>,
    /// The encoded marker, published after every change is delivered.
    pub marker: Vec<u8>,
    /// Keys to tombstone once the marker is delivered.
    pub tombstones: Vec<ChangedKey>,
    /// The clock at which this round published every expired key, if it
    /// swept.
    pub swept_at: Option<i64>,
    /// The same for telemetry buckets, by the telemetry clock.
    pub telemetry_swept_at: Option<i64>,
    /// The changed keys, given back if the round is not published.
    changed: Vec<ChangedKey>,
}

impl Round<'_> {
    /// Nothing to publish but possibly a marker.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.tombstones.is_empty()
    }
}

impl Store {
    /// Takes a snapshot and the keys changed since the last round, and
    /// encodes round number `round` of `partition`. `at_marker` is the
    /// snapshot of the previous round's marker; `swept` the clocks (event,
    /// telemetry) of the last sweeps (`None`: sweep now, from scratch);
    /// `unburied` keys known absent that still need a tombstone.
    pub fn prepare_round<'s>(
        &'s self,
        partition: u16,
        at_marker: &StoreSnapshot<'_>,
        round: u64,
        source_key: &str,
        swept: Swept,
        unburied: &[ChangedKey],
    ) -> Result<Round<'s>> {
        let (snapshot, changed) = self.begin_round(partition);
        match self.encode_round(
            partition, at_marker, snapshot, &changed, round, source_key, swept, unburied,
        ) {
            Ok(mut prepared) => {
                prepared.changed = changed;
                Ok(prepared)
            }
            Err(e) => {
                self.return_changes(partition, changed);
                Err(e)
            }
        }
    }

    /// Gives a round that was not published back: its keys go to the next.
    pub fn abandon_round(&self, partition: u16, round: Round<'_>) {
        self.return_changes(partition, round.changed);
    }

    /// A round was delivered, marker and tombstones: compaction may now
    /// drop what it swept.
    pub fn round_delivered(&self, partition: u16, round: &Round<'_>) {
        if let Some(clock) = round.swept_at {
            self.clocks.published_expiry(partition, clock);
        }
        if let Some(clock) = round.telemetry_swept_at {
            self.telemetry_clocks.published_expiry(partition, clock);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_round<'s>(
        &'s self,
        p: u16,
        at_marker: &StoreSnapshot<'_>,
        snapshot: StoreSnapshot<'s>,
        changed: &[ChangedKey],
        round: u64,
        source_key: &str,
        swept: Swept,
        unburied: &[ChangedKey],
    ) -> Result<Round<'s>> {
        let retention = self.retention();
        let checkpoint = snapshot.checkpoint(p)?;
        let clock = checkpoint.event_clock_ms;
        let telemetry = snapshot.telemetry_checkpoint(p)?;
        let telemetry_clock = telemetry.event_clock_ms;
        // Key -> whether it counts as absent whatever the snapshot holds
        // (expired statistics are still on disk until compaction).
        let mut keys: BTreeMap<ChangedKey, bool> = BTreeMap::new();
        for (store, key) in changed {
            let expired = *store == StateStore::Stats
                && if keys::is_telemetry_key(key) {
                    retention.telemetry_key_expired(key, telemetry_clock)
                } else {
                    retention.stats_key_expired(key, clock)
                };
            keys.insert((*store, key.clone()), expired);
        }
        let cut = at_marker.checkpoint(p)?.dedupe_deleted_below_ms;
        if checkpoint.dedupe_deleted_below_ms > cut {
            for key in scan_keys(
                at_marker,
                CF_DEDUPE,
                keys::dedupe_segments_from(p, 0),
                keys::dedupe_segments_from(p, checkpoint.dedupe_deleted_below_ms),
            )? {
                keys.entry((StateStore::Dedupe, key)).or_insert(false);
            }
        }
        // The same for the telemetry point-id segments, by their own cut.
        let telemetry_cut = at_marker.telemetry_checkpoint(p)?.dedupe_deleted_below_ms;
        if telemetry.dedupe_deleted_below_ms > telemetry_cut {
            for key in scan_keys(
                at_marker,
                CF_DEDUPE,
                keys::telemetry_dedupe_segments_from(p, 0),
                keys::telemetry_dedupe_segments_from(p, telemetry.dedupe_deleted_below_ms),
            )? {
                keys.entry((StateStore::Dedupe, key)).or_insert(false);
            }
        }
        let step = retention.sweep_step_ms();
        let swept_at = match clock {
            Some(now) if swept.stats.is_none_or(|s| now >= s.saturating_add(step)) => {
                for key in expired_since(&snapshot, p, &retention, swept.stats, now)? {
                    keys.insert((StateStore::Stats, key), true);
                }
                Some(now)
            }
            _ => None,
        };
        let telemetry_swept_at = match telemetry_clock {
            Some(now)
                if swept
                    .telemetry
                    .is_none_or(|s| now >= s.saturating_add(step)) =>
            {
                let (from, to) = keys::telemetry_range(p);
                for key in scan_keys(&snapshot, CF_STATS, from, to)? {
                    if retention.telemetry_key_expired(&key, Some(now))
                        && !retention.telemetry_key_expired(&key, swept.telemetry)
                    {
                        keys.insert((StateStore::Stats, key), true);
                    }
                }
                Some(now)
            }
            _ => None,
        };
        let source_offset = checkpoint.positions.get(source_key).copied();
        let mut changes = Vec::with_capacity(keys.len());
        let mut tombstones = Vec::new();
        for ((store, key), absent) in keys {
            let after = if absent {
                None
            } else {
                snapshot.get(store, &key)?
            };
            if after.is_none() {
                tombstones.push((store, key.clone()));
            }
            let value = ChangelogValue::Change {
                round,
                source_offset,
                before: at_marker.get(store, &key)?,
                after,
            };
            changes.push((store, key, encode(&value)?));
        }
        tombstones.extend(unburied.iter().cloned());
        let marker = encode(&ChangelogValue::Marker {
            round,
            checkpoint: checkpoint.clone(),
        })?;
        Ok(Round {
            snapshot,
            checkpoint,
            changes,
            marker,
            tombstones,
            swept_at,
            telemetry_swept_at,
            changed: Vec::new(),
        })
    }
}

/// The clocks of a partition's last sweeps for expired keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// By the event clock (request statistics).
    pub stats: Option<i64>,
    /// By the telemetry clock (telemetry buckets).
    pub telemetry: Option<i64>,
}

fn scan_keys(
    snapshot: &StoreSnapshot<'_>,
    cf: &'static str,
    from: Vec<u8>,
    to: Vec<u8>,
) -> Result<Vec<Vec<u8>>> {
    snapshot
        .scan(cf, Scan::range(from, to))?
        .map(|item| item.map(|(k, _)| k.into_vec()))
        .collect()
}

/// The partition's `stats` keys expired at `now` but not at `since`.
fn expired_since(
    snapshot: &StoreSnapshot<'_>,
    p: u16,
    retention: &Retention,
    since: Option<i64>,
    now: i64,
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let scan = Scan::range(keys::partition_start(p), keys::partition_end(p));
    for item in snapshot.scan(CF_STATS, scan)? {
        let (key, _) = item?;
        if retention.stats_key_expired(&key, Some(now)) && !retention.stats_key_expired(&key, since)
        {
            out.push(key.into_vec());
        }
    }
    Ok(out)
}
