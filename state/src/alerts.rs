//! The persisted alert log: sequence number -> event JSON (not per
//! partition), with the wall-clock time each entry was logged (retention)
//! and the next sequence number, which never repeats.

use crate::codec::{decode, encode};
use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_ALERTS, CF_META};
use crate::store::Store;
use crate::{Error, Result};

impl Store {
    /// Appends one event to the alert log under `sequence`, logged at
    /// `logged_at_ms` (wall clock, for retention). The next sequence is
    /// stored with it, so ids never repeat even after retention empties
    /// the log.
    pub fn append_alert(&self, sequence: u64, logged_at_ms: i64, json: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(
            CF_ALERTS,
            &sequence.to_be_bytes(),
            &encode(&(logged_at_ms, json))?,
        );
        batch.put(
            CF_META,
            &keys::setting_key("alert_next"),
            &encode(&sequence.saturating_add(1))?,
        );
        self.engine.write(batch, false)
    }

    /// Alert log entries after `sequence`, oldest first, at most `limit`.
    pub fn alerts_after(&self, sequence: u64, limit: usize) -> Result<Vec<(u64, String)>> {
        let start = sequence.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        let scan = Scan {
            from: start.to_vec(),
            ..Scan::default()
        };
        for item in self.engine.scan(CF_ALERTS, scan)?.take(limit) {
            let (key, value) = item?;
            let seq = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| Error::Corrupt(format!("alert key {key:?}")))?,
            );
            let (_, json): (i64, String) = decode(&value)?;
            out.push((seq, json));
        }
        Ok(out)
    }

    /// The sequence number the next alert gets (1 for a new store).
    pub fn next_alert_sequence(&self) -> Result<u64> {
        match self.engine.get(CF_META, &keys::setting_key("alert_next"))? {
            Some(v) => decode(&v),
            None => Ok(1),
        }
    }
}
