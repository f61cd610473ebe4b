//! The control topic (`<topic>.control`, compacted, one partition): the
//! configuration every instance must share, keyed by what it configures
//! (e.g. `webhook/<id>`), the JSON as value, a tombstone for a deletion.
//! Every instance reads it from the beginning (its own consumer, no
//! group) and keeps following it, so a change reaches every instance,
//! including one that starts later, within a poll interval.

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

/// Applies one record: `(key, Some(value))` sets, `(key, None)` deletes.
pub type Apply = Box<dyn Fn(&str, Option<&str>) + Send + 'static>;

pub struct ControlTopic {
    topic: String,
    producer: FutureProducer,
    stop: Arc<AtomicBool>,
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
        std::thread::Builder::new()
            .name("tally-control".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(250)) {
                        Some(Ok(m)) => {
                            let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok())
                            else {
                                continue;
                            };
                            match m.payload().map(std::str::from_utf8) {
                                Some(Ok(value)) => apply(key, Some(value)),
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, key, "control record is not UTF-8")
                                }
                                None => apply(key, None),
                            }
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
        }))
    }

    /// Publishes a change and waits for the broker to have it.
    pub async fn publish(&self, key: &str, value: Option<&str>) -> Result<(), Error> {
        let mut record = FutureRecord::<str, str>::to(&self.topic)
            .partition(0)
            .key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| Error::Kafka(e.to_string()))
    }
}

impl Drop for ControlTopic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
