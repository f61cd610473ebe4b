//! The cluster's event channel, mirrored into every instance: each
//! instance reads every partition of the alert topic and keeps what it
//! read under (topic partition, offset), so a stream cursor made of
//! per-partition offsets means the same at every instance, and a
//! subscriber resumes wherever it reconnects.
//!
//! A crashed origin publishes its last batch again; the mirror drops an
//! event whose sequence is not above the highest it kept from that origin
//! in that partition. Every instance reads a partition in the same order
//! and so drops the same records: the offsets stay comparable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode};
use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_CLUSTER_ALERTS, CF_META};
use crate::store::Store;
use crate::{Error, Result};

/// Where the mirror stands: per topic partition the next offset to read,
/// and per (partition, origin tag) the highest sequence kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorPosition {
    pub next: Vec<u64>,
    pub high_water: BTreeMap<(u16, u64), u64>,
}

impl MirrorPosition {
    /// Whether an event read from `partition`, numbered `event_id`
    /// (origin tag above `sequence_bits`), is new; if so it is recorded.
    pub fn admit(&mut self, partition: u16, event_id: u64, sequence_bits: u32) -> bool {
        let tag = event_id >> sequence_bits;
        let sequence = event_id & ((1u64 << sequence_bits) - 1);
        let seen = self.high_water.entry((partition, tag)).or_insert(0);
        if sequence <= *seen {
            return false;
        }
        *seen = sequence;
        true
    }
}

/// One mirrored event: where it sits in the topic and its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    pub partition: u16,
    pub offset: u64,
    pub json: String,
}

const POSITION: &str = "cluster_alert_mirror";

fn mirror_key(partition: u16, offset: u64) -> Vec<u8> {
    let mut key = partition.to_be_bytes().to_vec();
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

impl Store {
    /// The mirror's position (empty for a new store).
    pub fn mirror_position(&self) -> Result<MirrorPosition> {
        match self.engine.get(CF_META, &keys::setting_key(POSITION))? {
            Some(v) => decode(&v),
            None => Ok(MirrorPosition::default()),
        }
    }

    /// Keeps `events` (logged at `logged_at_ms`, wall clock, for
    /// retention) and the position after them, in one write: a crash
    /// keeps both or neither, so nothing is mirrored twice.
    pub fn append_mirrored(
        &self,
        events: &[Mirrored],
        position: &MirrorPosition,
        logged_at_ms: i64,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        for e in events {
            batch.put(
                CF_CLUSTER_ALERTS,
                &mirror_key(e.partition, e.offset),
                &encode(&(logged_at_ms, e.json.as_str()))?,
            );
        }
        batch.put(CF_META, &keys::setting_key(POSITION), &encode(position)?);
        self.engine.write(batch, false)
    }

    /// Mirrored events of `partition` at or after `offset`, oldest first,
    /// at most `limit`.
    pub fn mirrored_from(
        &self,
        partition: u16,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Mirrored>> {
        let scan = Scan::range(
            mirror_key(partition, offset),
            mirror_key(partition, u64::MAX),
        );
        let mut out = Vec::new();
        for item in self.engine.scan(CF_CLUSTER_ALERTS, scan)?.take(limit) {
            let (key, value) = item?;
            let offset = key
                .get(2..10)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| Error::Corrupt(format!("cluster alert key {key:?}")))?;
            let (_, json): (i64, String) = decode(&value)?;
            out.push(Mirrored {
                partition,
                offset,
                json,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreOptions;

    fn event(partition: u16, offset: u64) -> Mirrored {
        Mirrored {
            partition,
            offset,
            json: format!("{{\"p\":{partition},\"o\":{offset}}}"),
        }
    }

    #[test]
    fn a_repeat_from_one_origin_is_dropped_and_other_origins_are_not() {
        let mut p = MirrorPosition::default();
        let bits = 40;
        let a = |s: u64| (7u64 << bits) | s;
        let b = |s: u64| (9u64 << bits) | s;
        assert!(p.admit(0, a(1), bits));
        assert!(p.admit(0, a(2), bits));
        // The origin crashed and published 1 and 2 again.
        assert!(!p.admit(0, a(1), bits));
        assert!(!p.admit(0, a(2), bits));
        assert!(p.admit(0, a(3), bits));
        // Another origin, and the same origin in another partition, count
        // on their own.
        assert!(p.admit(0, b(1), bits));
        assert!(p.admit(1, a(1), bits));
    }

    #[test]
    fn mirrored_events_read_back_per_partition_from_an_offset_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let mut position = MirrorPosition {
            next: vec![0, 0],
            ..Default::default()
        };
        let events = [event(0, 3), event(1, 0), event(0, 5), event(0, 9)];
        position.next = vec![10, 1];
        store.append_mirrored(&events, &position, 1).unwrap();
        let offsets = |p, from| -> Vec<u64> {
            store
                .mirrored_from(p, from, 10)
                .unwrap()
                .iter()
                .map(|m| m.offset)
                .collect()
        };
        assert_eq!(offsets(0, 0), vec![3, 5, 9]);
        assert_eq!(offsets(0, 4), vec![5, 9]);
        assert_eq!(offsets(0, 10), Vec::<u64>::new());
        assert_eq!(offsets(1, 0), vec![0]);
        assert_eq!(store.mirrored_from(0, 0, 2).unwrap().len(), 2);
        assert_eq!(store.mirrored_from(0, 5, 1).unwrap()[0], events[2]);
        drop(store);
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(store.mirror_position().unwrap(), position);
        assert_eq!(store.mirrored_from(0, 0, 10).unwrap().len(), 3);
    }
}
