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
//! Rebuilding ([`Rebuild`]) reads a partition's records in log order and
//! keeps the last record per key: a record of a round at or before the last
//! marker contributes its `after`, a later one (a round cut short by a
//! crash) its `before`, which is the state at that marker. The rebuilt
//! state is therefore exactly the state at the last marker, wherever a
//! writer died, and log compaction (which keeps only the last record of a
//! key) cannot change the outcome. The new owner republishes the keys of
//! the cut-short round in its first round, so its marker never commits a
//! stray `after`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::codec::decode;
use crate::keys::{CF_DEDUPE, CF_LIMITS, CF_STATS};
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
}

/// How many state stores (and changelog topics) there are.
pub const STATE_STORES: usize = 3;

impl StateStore {
    pub const ALL: [StateStore; STATE_STORES] =
        [StateStore::Stats, StateStore::Dedupe, StateStore::Limits];

    /// Position in [`StateStore::ALL`].
    pub fn index(self) -> usize {
        match self {
            StateStore::Stats => 0,
            StateStore::Dedupe => 1,
            StateStore::Limits => 2,
        }
    }

    /// The suffix of the store's changelog topic.
    pub fn name(self) -> &'static str {
        match self {
            StateStore::Stats => "stats",
            StateStore::Dedupe => "dedupe",
            StateStore::Limits => "limits",
        }
    }

    pub(crate) fn column_family(self) -> &'static str {
        match self {
            StateStore::Stats => CF_STATS,
            StateStore::Dedupe => CF_DEDUPE,
            StateStore::Limits => CF_LIMITS,
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

/// One key's state after a rebuild.
pub type RebuiltValue = (StateStore, Vec<u8>, Vec<u8>);

/// A partition's state as the changelog says it was at its last marker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rebuilt {
    /// The last marker's round; `None` if no round was ever completed.
    pub round: Option<u64>,
    pub checkpoint: Checkpoint,
    pub values: Vec<RebuiltValue>,
    /// Keys whose last record belongs to a round after the marker; the
    /// next round must republish them.
    pub uncommitted: Vec<(StateStore, Vec<u8>)>,
    /// Records that could not be decoded (counted, skipped).
    pub undecodable: u64,
}

impl Rebuilt {
    /// The number of the next round to publish.
    pub fn next_round(&self) -> u64 {
        self.round.map_or(1, |r| r + 1)
    }
}

type Pending = (u64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Rebuilds one partition from its changelog records, fed in log order.
#[derive(Debug, Default)]
pub struct Rebuild {
    last: HashMap<(StateStore, Vec<u8>), Pending>,
    marker: Option<(u64, Checkpoint)>,
    undecodable: u64,
}

impl Rebuild {
    /// Feeds one record; `value: None` is a tombstone.
    pub fn apply(&mut self, store: StateStore, key: &[u8], value: Option<&[u8]>) {
        let Some(value) = value else {
            self.last.remove(&(store, key.to_vec()));
            return;
        };
        match decode::<ChangelogValue>(value) {
            Ok(ChangelogValue::Change {
                round,
                before,
                after,
                ..
            }) => {
                self.last
                    .insert((store, key.to_vec()), (round, before, after));
            }
            Ok(ChangelogValue::Marker { round, checkpoint }) => {
                // Markers only move forward; an older one arriving later
                // (it cannot, with one writer at a time) would be ignored.
                if self.marker.as_ref().is_none_or(|(r, _)| round >= *r) {
                    self.marker = Some((round, checkpoint));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, key = ?key, "undecodable changelog record skipped");
                self.undecodable += 1;
            }
        }
    }

    pub fn finish(self) -> Rebuilt {
        let committed_round = self.marker.as_ref().map(|(r, _)| *r);
        let mut values = Vec::new();
        let mut uncommitted = Vec::new();
        for ((store, key), (round, before, after)) in self.last {
            let value = if committed_round.is_some_and(|m| round <= m) {
                after
            } else {
                uncommitted.push((store, key.clone()));
                before
            };
            if let Some(v) = value {
                values.push((store, key, v));
            }
        }
        values.sort();
        uncommitted.sort();
        let (round, checkpoint) = match self.marker {
            Some((r, c)) => (Some(r), c),
            None => (None, Checkpoint::default()),
        };
        Rebuilt {
            round,
            checkpoint,
            values,
            uncommitted,
            undecodable: self.undecodable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use std::collections::BTreeMap;

    fn change(round: u64, before: Option<&str>, after: Option<&str>) -> Vec<u8> {
        encode(&ChangelogValue::Change {
            round,
            source_offset: None,
            before: before.map(|s| s.as_bytes().to_vec()),
            after: after.map(|s| s.as_bytes().to_vec()),
        })
        .unwrap()
    }

    fn marker(round: u64, position: u64) -> Vec<u8> {
        let mut checkpoint = Checkpoint::default();
        checkpoint.positions.insert("kafka:t".into(), position);
        encode(&ChangelogValue::Marker { round, checkpoint }).unwrap()
    }

    fn as_map(r: &Rebuilt) -> BTreeMap<String, String> {
        r.values
            .iter()
            .map(|(_, k, v)| {
                (
                    String::from_utf8(k.clone()).unwrap(),
                    String::from_utf8(v.clone()).unwrap(),
                )
            })
            .collect()
    }

    /// A log of three writers: A completes rounds 1 and 2 and dies inside
    /// round 3; B restores (state at round 2), republishes A's stray key
    /// and its own change in round 3 and commits it; C dies inside round 4.
    /// At every cut of the log, the rebuilt state must equal the state at
    /// the last marker, computed by hand next to each step.
    #[test]
    fn rebuild_equals_the_state_at_the_last_marker_at_every_cut() {
        let m = b"marker".to_vec();
        let log: Vec<(&[u8], Vec<u8>)> = vec![
            (b"a", change(1, None, Some("a1"))),
            (b"b", change(1, None, Some("b1"))),
            (&m, marker(1, 10)), // state {a1, b1} @10
            (b"a", change(2, Some("a1"), Some("a2"))),
            (&m, marker(2, 20)),                             // state {a2, b1} @20
            (b"b", change(3, Some("b1"), Some("b3-stray"))), // A dies here
            // B restored {a2, b1} @20 and republishes the stray key b.
            (b"b", change(3, Some("b1"), Some("b1"))),
            (b"c", change(3, None, Some("c3"))),
            (&m, marker(3, 30)), // state {a2, b1, c3} @30
            (b"a", change(4, Some("a2"), Some("a4-stray"))), // C dies
        ];
        let expected_after: Vec<(usize, Vec<(&str, &str)>, Option<u64>)> = vec![
            (2, vec![], None),
            (3, vec![("a", "a1"), ("b", "b1")], Some(10)),
            (5, vec![("a", "a2"), ("b", "b1")], Some(20)),
            (6, vec![("a", "a2"), ("b", "b1")], Some(20)),
            (8, vec![("a", "a2"), ("b", "b1")], Some(20)),
            (9, vec![("a", "a2"), ("b", "b1"), ("c", "c3")], Some(30)),
            (10, vec![("a", "a2"), ("b", "b1"), ("c", "c3")], Some(30)),
        ];
        for (cut, expected, position) in expected_after {
            let mut rebuild = Rebuild::default();
            for (key, value) in &log[..cut] {
                rebuild.apply(StateStore::Stats, key, Some(value));
            }
            let rebuilt = rebuild.finish();
            let expected: BTreeMap<String, String> = expected
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(as_map(&rebuilt), expected, "cut after {cut} records");
            assert_eq!(
                rebuilt.checkpoint.positions.get("kafka:t").copied(),
                position,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn compaction_keeps_the_outcome() {
        // Compaction keeps only the last record per key (and the last
        // marker); the rebuilt state must not change.
        let log: Vec<(&[u8], Vec<u8>)> = vec![
            (b"a", change(1, None, Some("a1"))),
            (b"marker", marker(1, 10)),
            (b"a", change(2, Some("a1"), Some("a2"))),
            (b"b", change(2, None, Some("b2"))),
            (b"marker", marker(2, 20)),
            (b"a", change(3, Some("a2"), Some("a3-stray"))),
        ];
        let mut full = Rebuild::default();
        for (k, v) in &log {
            full.apply(StateStore::Stats, k, Some(v));
        }
        let mut compacted = Rebuild::default();
        for i in [3, 4, 5] {
            compacted.apply(StateStore::Stats, log[i].0, Some(&log[i].1));
        }
        let (full, compacted) = (full.finish(), compacted.finish());
        assert_eq!(full, compacted);
        assert_eq!(
            as_map(&full),
            BTreeMap::from([("a".into(), "a2".into()), ("b".into(), "b2".into())])
        );
        assert_eq!(full.uncommitted, vec![(StateStore::Stats, b"a".to_vec())]);
        assert_eq!(full.next_round(), 3);
    }

    #[test]
    fn without_a_marker_the_state_is_empty_and_garbage_is_counted() {
        let mut rebuild = Rebuild::default();
        rebuild.apply(StateStore::Dedupe, b"x", Some(&change(1, None, Some("x1"))));
        rebuild.apply(StateStore::Dedupe, b"y", Some(b"\x01garbage"));
        rebuild.apply(StateStore::Dedupe, b"z", Some(&change(1, None, Some("z1"))));
        rebuild.apply(StateStore::Dedupe, b"z", None);
        let rebuilt = rebuild.finish();
        assert!(rebuilt.values.is_empty());
        assert_eq!(rebuilt.round, None);
        assert_eq!(rebuilt.next_round(), 1);
        assert_eq!(rebuilt.undecodable, 1);
        assert_eq!(
            rebuilt.uncommitted,
            vec![(StateStore::Dedupe, b"x".to_vec())]
        );
    }
}
