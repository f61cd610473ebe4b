//! The control topic (`<topic>.control`, compacted, one partition): the
//! configuration every instance must share, keyed by what it configures
//! (e.g. `webhook/<id>`), the JSON as value, a tombstone for a deletion.
//! Every instance reads it from the beginning (its own consumer, no
//! group) and keeps following it, so a change reaches every instance,
//! including one that starts later, within a poll interval.
//!
//! The reader publishes how far it has applied, so a writer can wait for
//! its own change to be applied here ([`ControlTopic::wait_applied`]:
//! read-your-writes) and a starting instance can wait until it has read
//! everything written before it ([`ControlTopic::sync`]: it writes a
//! marker and waits to read it back, which needs no watermark, whose
//! meaning differs between brokers).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::source::KafkaConfig;
use crate::Error;

pub fn control_topic(topic: &str) -> String {
    format!("{topic}.control")
}

/// A consumer of a one-partition topic from its first record, outside any
/// group (every instance reads everything): membership, control.
pub(crate) fn read_from_beginning(
    brokers: &str,
    topic: &str,
    reader: &str,
) -> Result<BaseConsumer, Error> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("tally-{reader}-reader-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A change (a revocation) must reach every instance within a
        // second: do not let a fetch idle at the broker for the default
        // half second.
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| Error::Kafka(e.to_string()))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| Error::Kafka(e.to_string()))?;
    consumer
        .assign(&tpl)
        .map_err(|e| Error::Kafka(e.to_string()))?;
    Ok(consumer)
}

/// Applies one record at its offset: `(key, Some(value))` sets,
/// `(key, None)` deletes.
pub type Apply = Box<dyn Fn(i64, &str, Option<&str>) + Send + 'static>;

/// Record keys of start-up markers (one per reader, so compaction keeps
/// one each).
const SYNC_PREFIX: &str = "sync/";

pub struct ControlTopic {
    topic: String,
    producer: FutureProducer,
    stop: Arc<AtomicBool>,
    /// The last offset applied (-1: none yet).
    applied: tokio::sync::watch::Receiver<i64>,
}

impl ControlTopic {
    /// Starts following the topic on its own thread, calling `apply` for
    /// every record in order.
    pub fn start(config: &KafkaConfig, apply: Apply) -> Result<Arc<ControlTopic>, Error> {
        let topic = control_topic(&config.topic);
        let consumer = read_from_beginning(&config.brokers, &topic, "control")?;
        let producer: FutureProducer = crate::kafka::ingest::acked_producer(&config.brokers)
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(|e| Error::Kafka(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let (applied_tx, applied) = tokio::sync::watch::channel(-1i64);
        std::thread::Builder::new()
            .name("tally-control".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => {
                            let offset = m.offset();
                            if let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                                if !key.starts_with(SYNC_PREFIX) {
                                    match m.payload().map(std::str::from_utf8) {
                                        Some(Ok(value)) => apply(offset, key, Some(value)),
                                        Some(Err(e)) => {
                                            tracing::warn!(error = %e, key, "control record is not UTF-8")
                                        }
                                        None => apply(offset, key, None),
                                    }
                                }
                            }
                            applied_tx.send_replace(offset);
                        }
                        Some(Err(e)) => tracing::debug!(error = %e, "control topic read error"),
                        None => {}
                    }
                }
            })
            .map_err(|e| Error::Startup(e.to_string()))?;
        Ok(Arc::new(ControlTopic {
            topic,
            producer,
            stop,
            applied,
        }))
    }

    /// Publishes a change and waits for the broker to have it; answers
    /// its offset.
    pub async fn publish(&self, key: &str, value: Option<&str>) -> Result<i64, Error> {
        let mut record = FutureRecord::<str, str>::to(&self.topic)
            .partition(0)
            .key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|delivery| delivery.offset)
            .map_err(|(e, _)| Error::Kafka(e.to_string()))
    }

    /// Waits until this instance's reader has applied `offset`.
    pub async fn wait_applied(&self, offset: i64, timeout: Duration) -> Result<(), Error> {
        let mut applied = self.applied.clone();
        let reached = tokio::time::timeout(timeout, async {
            applied.wait_for(|&a| a >= offset).await.map(|_| ())
        })
        .await;
        match reached {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Kafka("the control topic reader stopped".into())),
            Err(_) => Err(Error::Kafka(format!(
                "the control topic was not read back to offset {offset} within {timeout:?}"
            ))),
        }
    }

    /// Waits until everything written to the topic before this call has
    /// been applied here: writes a marker and waits to read it back.
    pub async fn sync(&self, reader: &str, timeout: Duration) -> Result<(), Error> {
        let offset = self
            .publish(&format!("{SYNC_PREFIX}{reader}"), Some("sync"))
            .await?;
        self.wait_applied(offset, timeout).await
    }
}

impl Drop for ControlTopic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
