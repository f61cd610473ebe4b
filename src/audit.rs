//! The audit trail: every control change (as this instance applied it,
//! so in a cluster every instance has every change) and every request
//! refused by access control here, with who, what, the request id, the
//! client address and the result. Kept `audit_retention` (30 days by
//! default), read by `GET /v1/audit`.
//!
//! Refusals can come in floods (a scanner, a leaked revoked key), so
//! they are handed to a writer thread through a bounded queue: when it is
//! full, records are dropped and counted (`tally_audit_dropped_total`),
//! never waited for on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::counter;
use serde::{Deserialize, Serialize};
use tally_actors::telemetry::AUDIT_DROPPED;
use tally_state::retention::wall_clock_ms;
use tally_state::Store;

/// Records waiting for the writer at most.
const QUEUE: usize = 10_000;
/// Records written in one batch at most.
const BATCH: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// The key id that acted (`-` when none was presented or parsed;
    /// `bootstrap`, `cli`, `anonymous` for operator actions).
    pub actor: String,
    /// `key.create`, `key.rotate`, `key.revoke`, `request.refused`, ...
    pub action: String,
    /// What it acted on: a key id, or a refused request's route.
    pub target: String,
    /// Clients it concerns (a key's clients, a refused request's client).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// `applied`, `stale_version`, or a refusal's cause.
    pub result: String,
}

pub struct Audit {
    queue: SyncSender<(i64, u64, Vec<u8>)>,
    /// Orders records of the same millisecond; starts from the clock in
    /// µs so that a restart does not reuse a position.
    seq: AtomicU64,
    store: Arc<Store>,
}

impl Audit {
    pub fn start(store: Arc<Store>, retention: Duration) -> anyhow::Result<Arc<Audit>> {
        let (queue, rx) = sync_channel(QUEUE);
        let writer_store = store.clone();
        std::thread::Builder::new()
            .name("tally-audit".into())
            .spawn(move || write_loop(&writer_store, &rx, retention))?;
        let start = u64::try_from(wall_clock_ms()).unwrap_or(0) * 1000;
        Ok(Arc::new(Audit {
            queue,
            seq: AtomicU64::new(start),
            store,
        }))
    }

    /// Queues a record; drops it (counted) when the writer is behind.
    pub fn record(&self, entry: &AuditEntry) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let Ok(json) = serde_json::to_vec(entry) else {
            return;
        };
        match self.queue.try_send((entry.at_ms, seq, json)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                counter!(AUDIT_DROPPED).increment(1);
            }
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

fn write_loop(store: &Store, rx: &Receiver<(i64, u64, Vec<u8>)>, retention: Duration) {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut last_expiry: Option<Instant> = None;
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<_> = first.into_iter().collect();
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.append_audit(&batch) {
                counter!(AUDIT_DROPPED).increment(batch.len() as u64);
                tracing::error!(error = %e, records = batch.len(), "cannot write audit records");
            }
        }
        if last_expiry.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            last_expiry = Some(Instant::now());
            if let Err(e) = store.expire_audit(wall_clock_ms().saturating_sub(retention_ms)) {
                tracing::warn!(error = %e, "cannot expire audit records");
            }
        }
    }
}
