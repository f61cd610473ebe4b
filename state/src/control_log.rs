//! The control plane's append-only log: every configuration change is an
//! event stored under its sequence number, synced before it is
//! acknowledged, never rewritten. The current configuration is a
//! projection of the log (built by the caller); a snapshot of the
//! projection at some sequence spares a start-up the replay of everything
//! before it. Events are opaque bytes here: their format and its upcasting
//! belong to the caller.

use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_META};
use crate::store::Store;
use crate::{Error, Result};

impl Store {
    /// Appends event `seq` (durably: synced before this returns), with,
    /// in Kafka mode, the control topic offset it was read at (in the same
    /// batch: a restart resumes after it, neither skipping nor repeating).
    pub fn append_control_event(
        &self,
        seq: u64,
        event: &[u8],
        topic_offset: Option<i64>,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(CF_META, &keys::control_event_key(seq), event);
        if let Some(offset) = topic_offset {
            batch.put(
                CF_META,
                &keys::control_topic_offset_key(),
                &offset.to_be_bytes(),
            );
        }
        self.engine.write(batch, true)
    }

    /// The control topic offset of the last event appended from it.
    pub fn control_topic_offset(&self) -> Result<Option<i64>> {
        let Some(value) = self
            .engine
            .get(CF_META, &keys::control_topic_offset_key())?
        else {
            return Ok(None);
        };
        <[u8; 8]>::try_from(value.as_slice())
            .map(|b| Some(i64::from_be_bytes(b)))
            .map_err(|_| Error::Corrupt("a control topic offset that is not 8 bytes".into()))
    }

    /// Events from `from_seq` on, in order: `(seq, bytes)`.
    pub fn control_events(&self, from_seq: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let prefix = keys::control_event_prefix();
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        for item in self
            .engine
            .scan(CF_META, Scan::range(keys::control_event_key(from_seq), end))?
        {
            let (key, value) = item?;
            let seq = key
                .get(prefix.len()..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| Error::Corrupt("a control event key without a sequence".into()))?;
            out.push((seq, value.to_vec()));
        }
        Ok(out)
    }

    /// The projection as of `seq` (every event up to and including it).
    pub fn put_control_snapshot(&self, seq: u64, projection: &[u8]) -> Result<()> {
        let mut value = seq.to_be_bytes().to_vec();
        value.extend_from_slice(projection);
        let mut batch = WriteBatch::default();
        batch.put(CF_META, &keys::control_snapshot_key(), &value);
        self.engine.write(batch, true)
    }

    pub fn control_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(value) = self.engine.get(CF_META, &keys::control_snapshot_key())? else {
            return Ok(None);
        };
        let seq = value
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| Error::Corrupt("a control snapshot without a sequence".into()))?;
        Ok(Some((seq, value[8..].to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreOptions};

    #[test]
    fn events_come_back_in_sequence_order_from_any_point_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            // Written out of order: the log is ordered by sequence.
            for seq in [2u64, 0, 1, 256, 255] {
                store
                    .append_control_event(seq, format!("e{seq}").as_bytes(), None)
                    .unwrap();
            }
            store.put_control_snapshot(1, b"snap").unwrap();
            assert_eq!(store.control_topic_offset().unwrap(), None);
            store.append_control_event(257, b"e257", Some(41)).unwrap();
        }
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let all: Vec<u64> = store
            .control_events(0)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(all, vec![0, 1, 2, 255, 256, 257]);
        let tail = store.control_events(255).unwrap();
        assert_eq!(tail.len(), 3);
        assert_eq!(tail[0], (255, b"e255".to_vec()));
        assert_eq!(store.control_topic_offset().unwrap(), Some(41));
        assert_eq!(
            store.control_snapshot().unwrap(),
            Some((1, b"snap".to_vec()))
        );
        // Other settings under the same prefix space are not events.
        assert!(store.webhooks().unwrap().is_empty());
        assert_eq!(store.control_events(258).unwrap(), vec![]);
    }
}
