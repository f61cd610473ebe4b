//! The event channel: `RATE_LIMITED`, `QUOTA_WARNING`, `QUOTA_EXCEEDED`,
//! `ANOMALY_DETECTED`, `REQUEST_RECORDED` (opt-in, sampled) and
//! `CIRCUIT_STATE_CHANGED` (a webhook's circuit breaker) and
//! `BILLING_PERIOD_CLOSED` (a period's finalised totals),
//! `TELEMETRY_ANOMALY` and `TELEMETRY_DRIFT` (a series' point far out, a
//! series' level changed; `client_id` carries the series). Each event gets the next sequence number (its
//! `event_id`), is appended to a persisted log (so a subscriber can resume
//! with `Last-Event-ID`), and is broadcast to live subscribers.
//!
//! In a cluster every instance numbers its own events, so an id carries the
//! instance's tag in its top 24 bits ([`cluster_tag`]) above a 40-bit
//! sequence: two instances never hand out the same `event_id`, and a
//! receiver that deduplicates webhook deliveries by it drops only repeats.
//!
//! Publishing only queues the event (bounded; beyond the bound events are
//! counted in `tally_alerts_dropped_total`, never buffered without end):
//! one writer thread numbers, appends and broadcasts them in order, so
//! live order equals log order and no publisher (a check holding its
//! shard's lock, an async task) waits for the disk. The broadcast buffer
//! is bounded: a subscriber that falls behind is told how far (and resumes
//! from the log), the engine never waits.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tally_state::Store;
use tokio::sync::broadcast;

/// Every event type the channel carries.
pub const EVENT_TYPES: [&str; 9] = [
    "RATE_LIMITED",
    "QUOTA_WARNING",
    "QUOTA_EXCEEDED",
    "ANOMALY_DETECTED",
    "REQUEST_RECORDED",
    "CIRCUIT_STATE_CHANGED",
    "BILLING_PERIOD_CLOSED",
    crate::shard::TELEMETRY_ANOMALY,
    crate::shard::TELEMETRY_DRIFT,
];

/// One event on the channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertEvent {
    pub event_id: u64,
    pub event_type: String,
    pub client_id: String,
    pub endpoint: Option<String>,
    /// Event time for anomalies and recorded requests, wall clock
    /// otherwise; RFC 3339 on the wire (`timestamp`).
    #[serde(rename = "timestamp", with = "rfc3339")]
    pub timestamp_ms: i64,
    /// Kept as raw JSON: subscribers catching up from the log read many
    /// events, and only relay this part.
    pub details: Box<serde_json::value::RawValue>,
    /// This event as JSON, encoded once when logged and shared by every
    /// subscriber (fan-out to many streams must not re-encode per stream).
    #[serde(skip)]
    pub json: Option<Arc<str>>,
}

impl AlertEvent {
    /// The event as JSON (cached when it came from the log).
    pub fn to_json(&self) -> Arc<str> {
        match &self.json {
            Some(j) => j.clone(),
            None => Arc::from(serde_json::to_string(self).unwrap_or_default()),
        }
    }
}

pub struct AlertLog {
    store: Arc<Store>,
    /// The next sequence number (owned by the writer; read for `last_id`).
    next: Arc<Mutex<u64>>,
    live: broadcast::Sender<Arc<AlertEvent>>,
    queue: SyncSender<Queued>,
}

enum Queued {
    Event {
        event_type: String,
        client_id: String,
        endpoint: Option<String>,
        timestamp_ms: i64,
        details: Box<serde_json::value::RawValue>,
    },
    /// Answered once everything queued before it is logged.
    Flush(std::sync::mpsc::Sender<()>),
    /// Like `Flush`, and the writer lets go of the store first: answered
    /// once the thread holds nothing.
    Close(std::sync::mpsc::Sender<()>),
}

impl Queued {
    /// An event to queue; `None` (logged) when its details do not encode.
    fn event(
        event_type: &str,
        client_id: &str,
        endpoint: Option<&str>,
        timestamp_ms: i64,
        details: serde_json::Value,
    ) -> Option<Queued> {
        let details = serde_json::value::to_raw_value(&details)
            .map_err(|e| tracing::error!(error = %e, "cannot encode alert details"))
            .ok()?;
        Some(Queued::Event {
            event_type: event_type.to_string(),
            client_id: client_id.to_string(),
            endpoint: endpoint.map(str::to_string),
            timestamp_ms,
            details,
        })
    }
}

/// Events queued for the writer before publishers start dropping them.
pub const QUEUE_CAPACITY: usize = 65_536;

impl std::fmt::Debug for AlertLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertLog").finish_non_exhaustive()
    }
}

/// Live events buffered per subscriber before it counts as lagging.
pub const SUBSCRIBER_BUFFER: usize = 16_384;

/// Bits of an event id below the instance tag.
pub const SEQUENCE_BITS: u32 = 40;

/// The tag of an instance's event ids in a cluster: 24 bits of its data
/// directory's instance id (random, made once), never 0 (the tag of a
/// standalone instance). Two instances share a tag with a chance of about
/// one in 16 million per pair (not checked yet).
pub fn cluster_tag(instance_id: &str) -> u64 {
    let bits = u64::from_str_radix(instance_id, 16).unwrap_or_else(|_| {
        instance_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    });
    match bits & 0xFF_FFFF {
        0 => 1,
        tag => tag,
    }
}

impl AlertLog {
    /// Opens the log; `tag` (0 standalone, [`cluster_tag`] in a cluster)
    /// goes into the top bits of every id from now on. Ids only grow: a
    /// log that already numbered past the tag's range keeps counting.
    pub fn open(store: Arc<Store>, tag: u64) -> Result<Arc<AlertLog>, crate::Error> {
        let stored = store.next_alert_sequence()?;
        let mask = (1u64 << SEQUENCE_BITS) - 1;
        let tagged = (tag << SEQUENCE_BITS) | (stored & mask).max(1);
        let next = Arc::new(Mutex::new(stored.max(tagged)));
        let (live, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        let (queue, queued) = sync_channel(QUEUE_CAPACITY);
        let writer = Writer {
            store: store.clone(),
            next: next.clone(),
            live: live.clone(),
        };
        std::thread::Builder::new()
            .name("tally-alert-log".into())
            .spawn(move || writer.run(queued))
            .map_err(|e| crate::Error::Startup(format!("alert log writer: {e}")))?;
        Ok(Arc::new(AlertLog {
            store,
            next,
            live,
            queue,
        }))
    }

    /// Queues one event for the log and the live streams; never blocks and
    /// never fails the caller (alerts must not stop the engine).
    pub fn publish(
        &self,
        event_type: &str,
        client_id: &str,
        endpoint: Option<&str>,
        timestamp_ms: i64,
        details: serde_json::Value,
    ) {
        let Some(queued) = Queued::event(event_type, client_id, endpoint, timestamp_ms, details)
        else {
            return;
        };
        match self.queue.try_send(queued) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => crate::telemetry::AlertsDropped.emit(),
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("the alert log writer is gone; event dropped")
            }
        }
    }

    /// Like [`AlertLog::publish`], but waits for room in the queue rather
    /// than dropping the event when it is full: for events downstream
    /// systems act on (a closed billing period). Blocking: call it off the
    /// async workers.
    pub fn publish_waiting(
        &self,
        event_type: &str,
        client_id: &str,
        endpoint: Option<&str>,
        timestamp_ms: i64,
        details: serde_json::Value,
    ) {
        let Some(queued) = Queued::event(event_type, client_id, endpoint, timestamp_ms, details)
        else {
            return;
        };
        if self.queue.send(queued).is_err() {
            tracing::error!("the alert log writer is gone; event dropped");
        }
    }

    /// Waits until every event published before the call is logged and
    /// broadcast (shutdown, tests).
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.queue.send(Queued::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Logs everything published before the call, then stops the writer
    /// thread and waits until it has let go of the store. The store must
    /// be closed by the main thread before the process exits: a RocksDB
    /// closed by a thread racing `exit` aborts in its destructor (its
    /// static mutexes are already gone). Later events are dropped.
    pub fn close(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.queue.send(Queued::Close(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// The id of the newest logged event (0 when none).
    pub fn last_id(&self) -> u64 {
        self.next
            .lock()
            .map(|n| n.saturating_sub(1))
            .unwrap_or_else(|e| e.into_inner().saturating_sub(1))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlertEvent>> {
        self.live.subscribe()
    }

    /// A reader that follows the log from a cursor (sinks: webhooks, the
    /// alert topic).
    pub fn follow(self: &Arc<Self>) -> Follower {
        Follower {
            log: self.clone(),
            live: self.subscribe(),
        }
    }

    /// Logged events after `event_id`, oldest first (at most `limit`).
    pub fn after(&self, event_id: u64, limit: usize) -> Result<Vec<AlertEvent>, crate::Error> {
        Ok(self
            .store
            .alerts_after(event_id, limit)?
            .into_iter()
            .filter_map(|(_, json)| {
                let mut e: AlertEvent = serde_json::from_str(&json).ok()?;
                e.json = Some(Arc::from(json));
                Some(e)
            })
            .collect())
    }
}

/// The one writer of the log: numbers, appends and broadcasts in order.
struct Writer {
    store: Arc<Store>,
    next: Arc<Mutex<u64>>,
    live: broadcast::Sender<Arc<AlertEvent>>,
}

impl Writer {
    fn run(self, queued: Receiver<Queued>) {
        for item in &queued {
            match item {
                Queued::Flush(done) => {
                    let _ = done.send(());
                }
                Queued::Close(done) => {
                    drop(self);
                    let _ = done.send(());
                    return;
                }
                Queued::Event {
                    event_type,
                    client_id,
                    endpoint,
                    timestamp_ms,
                    details,
                } => {
                    let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
                    let mut event = AlertEvent {
                        event_id: *next,
                        event_type,
                        client_id,
                        endpoint,
                        timestamp_ms,
                        details,
                        json: None,
                    };
                    let json = match serde_json::to_string(&event) {
                        Ok(j) => j,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode alert event");
                            continue;
                        }
                    };
                    let logged_at = self.store.clock().now_ms();
                    if let Err(e) = self.store.append_alert(event.event_id, logged_at, &json) {
                        tracing::error!(error = %e, "cannot append to the alert log");
                        continue;
                    }
                    *next += 1;
                    drop(next);
                    event.json = Some(Arc::from(json));
                    // No subscriber is not an error.
                    let _ = self.live.send(Arc::new(event));
                }
            }
        }
    }
}

/// Follows the persisted log for a sink: each call returns the events
/// after a cursor, or, when there are none, waits for news (a second at
/// most) and returns nothing, so the caller can look at its own state.
pub struct Follower {
    log: Arc<AlertLog>,
    live: broadcast::Receiver<Arc<AlertEvent>>,
}

impl Follower {
    pub async fn next_batch(&mut self, cursor: u64, limit: usize) -> Vec<AlertEvent> {
        match self.log.after(cursor, limit) {
            Ok(batch) if !batch.is_empty() => batch,
            Ok(_) => {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                    match self.live.recv().await {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => {
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await
                        }
                    }
                })
                .await;
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the alert log");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                Vec::new()
            }
        }
    }
}

/// Epoch ms as RFC 3339 (UTC, milliseconds), the API's time format.
mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use tally_pipelines::time::{format_rfc3339_ms, parse_rfc3339_ms};

    pub fn serialize<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_rfc3339_ms(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let text = String::deserialize(d)?;
        parse_rfc3339_ms(&text).map_err(serde::de::Error::custom)
    }
}
