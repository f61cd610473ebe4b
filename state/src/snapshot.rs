//! Consistent snapshots and changed-key tracking: what the changelog
//! publishes from.
//!
//! A commit marks its keys changed and writes its batch under the
//! partition's tracking lock; a changelog round takes its snapshot and the
//! set of changed keys under the same lock. So every change is either in
//! the snapshot and in the set, or in neither (and goes to the next round).

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use crate::changelog::{ChangelogMark, StateStore};
use crate::codec::{decode, encode};
use crate::engine::{EngineSnapshot, Scan, ScanIter, WriteBatch};
use crate::keys::{self, CF_META};
use crate::store::{Checkpoint, Store};
use crate::telemetry::TelemetryCheckpoint;
use crate::Result;

pub type ChangedKey = (StateStore, Vec<u8>);

/// Keys changed since the last changelog round, per partition.
pub(crate) struct ChangeTracker {
    changed: Vec<Mutex<HashSet<ChangedKey>>>,
}

impl ChangeTracker {
    pub(crate) fn new(partitions: u16) -> Self {
        Self {
            changed: (0..partitions).map(|_| Mutex::default()).collect(),
        }
    }

    /// The partition's set, held while a commit writes or a round snapshots.
    pub(crate) fn lock(&self, partition: u16) -> Option<MutexGuard<'_, HashSet<ChangedKey>>> {
        self.changed
            .get(usize::from(partition))
            // A poisoned set is still a valid set of keys.
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A consistent, read-only view of the whole store.
pub struct StoreSnapshot<'a> {
    snapshot: Box<dyn EngineSnapshot + 'a>,
}

impl StoreSnapshot<'_> {
    pub fn get(&self, store: StateStore, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snapshot.get(store.column_family(), key)
    }

    pub fn scan(&self, store: &'static str, scan: Scan) -> Result<ScanIter<'_>> {
        self.snapshot.scan(store, scan)
    }

    pub fn checkpoint(&self, partition: u16) -> Result<Checkpoint> {
        match self
            .snapshot
            .get(CF_META, &keys::checkpoint_key(partition))?
        {
            Some(v) => decode(&v),
            None => Ok(Checkpoint::default()),
        }
    }

    pub fn telemetry_checkpoint(&self, partition: u16) -> Result<TelemetryCheckpoint> {
        match self
            .snapshot
            .get(CF_META, &keys::telemetry_checkpoint_key(partition))?
        {
            Some(v) => decode(&v),
            None => Ok(TelemetryCheckpoint::default()),
        }
    }
}

impl Store {
    /// Starts recording which keys each commit changes (Kafka mode).
    pub fn track_changes(&self) {
        let _ = self.changes.set(ChangeTracker::new(self.partitions()));
        self.clocks.guard_with_changelog();
        self.telemetry_clocks.guard_with_changelog();
    }

    pub fn snapshot(&self) -> StoreSnapshot<'_> {
        StoreSnapshot {
            snapshot: self.engine.snapshot(),
        }
    }

    /// A snapshot and the keys of `partition` changed since the last
    /// round, taken together.
    pub fn begin_round(&self, partition: u16) -> (StoreSnapshot<'_>, Vec<ChangedKey>) {
        let guard = self.changes.get().and_then(|t| t.lock(partition));
        let snapshot = self.snapshot();
        let keys = match guard {
            Some(mut set) => set.drain().collect(),
            None => Vec::new(),
        };
        (snapshot, keys)
    }

    /// Gives back the keys of a round that was not published.
    pub fn return_changes(&self, partition: u16, keys: Vec<ChangedKey>) {
        if let Some(mut set) = self.changes.get().and_then(|t| t.lock(partition)) {
            set.extend(keys);
        }
    }

    pub fn load_changelog_mark(&self, partition: u16) -> Result<Option<ChangelogMark>> {
        let Some(v) = self
            .engine
            .get(CF_META, &keys::changelog_mark_key(partition))?
        else {
            return Ok(None);
        };
        match decode(&v) {
            Ok(mark) => Ok(Some(mark)),
            // A mark of a version with fewer state stores: unknown, so the
            // partition is restored from its changelog (always safe).
            Err(e) => {
                tracing::warn!(partition, error = %e, "changelog mark of another version; restoring the partition");
                Ok(None)
            }
        }
    }

    pub fn save_changelog_mark(&self, partition: u16, mark: &ChangelogMark) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(
            CF_META,
            &keys::changelog_mark_key(partition),
            &encode(mark)?,
        );
        self.engine.write(batch, false)
    }
}
