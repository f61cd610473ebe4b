//! What the alert-log followers keep: webhook configurations and, per
//! sink (a webhook, the Kafka alert topic), how far it has delivered.
//! Both live in `meta` under store-wide setting keys; the alert log itself
//! is the queue, so a sink's backlog is everything after its cursor.

use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::keys::{self, CF_META};
use crate::store::{rocks, Store};
use crate::Result;

const WEBHOOK: &str = "webhook/";
const SINK: &str = "sink/";

impl Store {
    /// Stores a webhook's configuration (JSON, as the API shows it).
    pub fn put_webhook(&self, id: &str, json: &str) -> Result<()> {
        self.db
            .put_cf(
                self.cf(CF_META)?,
                keys::setting_key(&format!("{WEBHOOK}{id}")),
                encode(&json.to_string())?,
            )
            .map_err(rocks)
    }

    /// Deletes a webhook and its delivery state.
    pub fn delete_webhook(&self, id: &str) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        let meta = self.cf(CF_META)?;
        batch.delete_cf(meta, keys::setting_key(&format!("{WEBHOOK}{id}")));
        batch.delete_cf(meta, keys::setting_key(&format!("{SINK}{WEBHOOK}{id}")));
        self.db.write(batch).map_err(rocks)
    }

    /// Every configured webhook: `(id, configuration JSON)`.
    pub fn webhooks(&self) -> Result<Vec<(String, String)>> {
        let prefix = keys::setting_key(WEBHOOK);
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::prefix_end(&prefix));
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            self.cf(CF_META)?,
            read,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (key, value) = item.map_err(rocks)?;
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            out.push((id, decode(&value)?));
        }
        Ok(out)
    }

    /// A sink's delivery state (`webhook/<id>`, `kafka`).
    pub fn sink_state<T: DeserializeOwned>(&self, sink: &str) -> Result<Option<T>> {
        match self
            .db
            .get_cf(
                self.cf(CF_META)?,
                keys::setting_key(&format!("{SINK}{sink}")),
            )
            .map_err(rocks)?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn put_sink_state<T: Serialize>(&self, sink: &str, state: &T) -> Result<()> {
        self.db
            .put_cf(
                self.cf(CF_META)?,
                keys::setting_key(&format!("{SINK}{sink}")),
                encode(state)?,
            )
            .map_err(rocks)
    }
}
