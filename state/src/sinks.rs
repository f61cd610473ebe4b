//! What the alert-log followers keep: webhook configurations and, per
//! sink (a webhook, the Kafka alert topic), how far it has delivered.
//! Both live in `meta` under store-wide setting keys; the alert log itself
//! is the queue, so a sink's backlog is everything after its cursor.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::engine::{Scan, WriteBatch};
use crate::keys::{self, CF_META};
use crate::store::Store;
use crate::Result;

const WEBHOOK: &str = "webhook/";
const SINK: &str = "sink/";

impl Store {
    /// Stores a webhook's configuration (JSON, as the API shows it).
    pub fn put_webhook(&self, id: &str, json: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(
            CF_META,
            &keys::setting_key(&format!("{WEBHOOK}{id}")),
            &encode(&json.to_string())?,
        );
        self.engine.write(batch, true)
    }

    /// Deletes a webhook and its delivery state.
    pub fn delete_webhook(&self, id: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete(CF_META, &keys::setting_key(&format!("{WEBHOOK}{id}")));
        batch.delete(CF_META, &keys::setting_key(&format!("{SINK}{WEBHOOK}{id}")));
        self.engine.write(batch, true)
    }

    /// Every configured webhook: `(id, configuration JSON)`.
    pub fn webhooks(&self) -> Result<Vec<(String, String)>> {
        let prefix = keys::setting_key(WEBHOOK);
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        for item in self
            .engine
            .scan(CF_META, Scan::range(prefix.clone(), end))?
        {
            let (key, value) = item?;
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            out.push((id, decode(&value)?));
        }
        Ok(out)
    }

    /// A sink's delivery state (`webhook/<id>`, `kafka`).
    pub fn sink_state<T: DeserializeOwned>(&self, sink: &str) -> Result<Option<T>> {
        match self
            .engine
            .get(CF_META, &keys::setting_key(&format!("{SINK}{sink}")))?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn put_sink_state<T: Serialize>(&self, sink: &str, state: &T) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(
            CF_META,
            &keys::setting_key(&format!("{SINK}{sink}")),
            &encode(state)?,
        );
        self.engine.write(batch, false)
    }
}
