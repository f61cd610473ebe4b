//! The changelog of a partition's state: what Tally publishes to Kafka so
//! that another instance can take the partition over, and the rule that
//! rebuilds the state from it.
//!
//! Publishing works in rounds, one in flight per partition. A round takes
//! a consistent snapshot of the store, publishes every key changed since
//! the previous round with its value *before* (at the previous round's
//! marker) and *after* (at this snapshot), waits for delivery, then
//! publishes a marker carrying the snapshot's checkpoint: the source
//! position the state reflects. A round's number is the last marker's + 1,
//! whoever writes it.
//!
//! Rebuilding ([`crate::restore`]) reads a partition's records in log order and
//! keeps the last record per key: a record of a round at or before the last
//! marker contributes its `after`, a later one (a round cut short by a
//! crash) its `before`, which is the state at that marker. The rebuilt
//! state is therefore exactly the state at the last marker, wherever a
//! writer died, and log compaction (which keeps only the last record of a
//! key) cannot change the outcome. The new owner republishes the keys of
//! the cut-short round in its first round, so its marker never commits a
//! stray `after`.

use serde::{Deserialize, Serialize};

use crate::keys::{self, CF_ANOMALIES, CF_DEDUPE, CF_LIMITS, CF_META, CF_STATS};
use crate::store::Checkpoint;

/// A state store with its own changelog topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateStore {
    /// Bucket statistics (minute, hour, day); also carries the markers.
    Stats,
    /// Dedupe claims (one segment per flush).
    Dedupe,
    /// Rate-limit and quota configuration and state.
    Limits,
    /// What the detectors found (they move with their partition, so the
    /// new owner answers for them).
    Anomalies,
    /// A partition's telemetry bookkeeping in `meta`: its checkpoint,
    /// series registry and detector state (its buckets are `stats` keys,
    /// its point ids `dedupe` keys).
    Telemetry,
}

/// How many state stores (and changelog topics) there are.
pub const STATE_STORES: usize = 5;

impl StateStore {
    pub const ALL: [StateStore; STATE_STORES] = [
        StateStore::Stats,
        StateStore::Dedupe,
        StateStore::Limits,
        StateStore::Anomalies,
        StateStore::Telemetry,
    ];

    /// Position in [`StateStore::ALL`].
    pub fn index(self) -> usize {
        match self {
            StateStore::Stats => 0,
            StateStore::Dedupe => 1,
            StateStore::Limits => 2,
            StateStore::Anomalies => 3,
            StateStore::Telemetry => 4,
        }
    }

    /// The suffix of the store's changelog topic.
    pub fn name(self) -> &'static str {
        match self {
            StateStore::Stats => "stats",
            StateStore::Dedupe => "dedupe",
            StateStore::Limits => "limits",
            StateStore::Anomalies => "anomalies",
            StateStore::Telemetry => "telemetry",
        }
    }

    pub(crate) fn column_family(self) -> &'static str {
        match self {
            StateStore::Stats => CF_STATS,
            StateStore::Dedupe => CF_DEDUPE,
            StateStore::Limits => CF_LIMITS,
            StateStore::Anomalies => CF_ANOMALIES,
            StateStore::Telemetry => CF_META,
        }
    }

    /// The keys of `partition` this store holds, `[from, to)`: what a
    /// restore that replaces the partition clears first.
    pub(crate) fn partition_range(self, partition: u16) -> (Vec<u8>, Vec<u8>) {
        match self {
            // Only the telemetry part of `meta`: the partition's
            // checkpoint and changelog mark are the restore's own.
            StateStore::Telemetry => keys::telemetry_meta_range(partition),
            _ => (
                keys::partition_start(partition),
                keys::partition_end(partition),
            ),
        }
    }
}

/// The value of a changelog record. The record key is the state key
/// (partition first), or [`crate::keys::changelog_marker_key`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChangelogValue {
    Change {
        round: u64,
        /// The source position the `after` value reflects.
        source_offset: Option<u64>,
        before: Option<Vec<u8>>,
        after: Option<Vec<u8>>,
    },
    Marker {
        round: u64,
        checkpoint: Checkpoint,
    },
}

/// What this instance last published (or restored) for a partition, kept
/// in its own store: if the changelog has not grown since and the local
/// checkpoint still equals the marker's, the local state *is* the
/// changelog's and taking the partition needs no restore.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChangelogMark {
    /// The last marker's round.
    pub round: u64,
    pub checkpoint: Checkpoint,
    /// End offsets of the changelog partitions right after that marker
    /// (in [`StateStore::ALL`] order); `None` when strays must still be
    /// republished.
    pub ends: Option<[i64; STATE_STORES]>,
}
