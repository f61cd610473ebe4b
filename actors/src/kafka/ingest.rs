//! HTTP ingest in Kafka mode: events are produced to the request topic
//! (points to the telemetry topic)
//! (idempotent producer, `acks=all`) and acknowledged once the broker has
//! them; the Kafka source then counts them like any other message. Ingest
//! never bypasses the topic, so the topic stays the one source of truth.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_pipelines::partitioner::Partitioner;

use crate::kafka::decode::FeedItem;
use crate::kafka::source::{Feed, KafkaConfig};
use crate::Error;

/// The producer settings of everything Tally must not lose or duplicate
/// (ingest, alert topic, control records): idempotent, acknowledged by all
/// replicas, a delivery report always within 30 s.
pub(crate) fn acked_producer(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    config
}

pub struct KafkaIngest {
    producer: FutureProducer,
    /// Per feed ([`Feed::index`]).
    topics: [String; 2],
    partitions: u16,
    partitioner: Partitioner,
}

impl KafkaIngest {
    pub fn new(
        config: &KafkaConfig,
        partitions: u16,
        partitioner: Partitioner,
    ) -> Result<KafkaIngest, Error> {
        let producer = acked_producer(&config.brokers)
            .create()
            .map_err(|e| Error::Kafka(e.to_string()))?;
        Ok(KafkaIngest {
            producer,
            topics: Feed::ALL.map(|f| config.topic_of(f).to_string()),
            partitions,
            partitioner,
        })
    }

    /// Produces every item to its key's partition of its feed's topic and
    /// waits until the broker has acknowledged or refused each of them:
    /// which ones it has.
    pub async fn produce<T: FeedItem>(&self, events: &[T]) -> Produced {
        let mut produced = Produced {
            delivered: vec![false; events.len()],
            first_error: None,
        };
        match self.try_produce(events, &mut produced).await {
            Ok(()) => {}
            Err(e) => {
                produced.first_error.get_or_insert(e.to_string());
            }
        }
        produced
    }

    async fn try_produce<T: FeedItem>(
        &self,
        events: &[T],
        out: &mut Produced,
    ) -> Result<(), Error> {
        let topic = &self.topics[T::FEED.index()];
        let mut deliveries = Vec::with_capacity(events.len());
        for event in events {
            let payload = event.wire_json();
            // Place explicitly: the shard of partition N must own the key.
            let key = event.routing_key();
            let partition = i32::from(self.partitioner.partition(key, self.partitions));
            let mut record = FutureRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(payload.as_str());
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((e, back)) => {
                        if deliveries.len() > 100_000 {
                            return Err(Error::Kafka(format!("producer queue full: {e}")));
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        }
        for (i, delivery) in deliveries.into_iter().enumerate() {
            match delivery.await {
                Ok(Ok(_)) => out.delivered[i] = true,
                Ok(Err((e, _))) => {
                    out.first_error
                        .get_or_insert_with(|| format!("delivery failed: {e}"));
                }
                Err(_) => {
                    out.first_error
                        .get_or_insert_with(|| "delivery cancelled".into());
                }
            }
        }
        Ok(())
    }
}

/// Which events of a body the broker has (by position).
#[derive(Debug)]
pub struct Produced {
    pub delivered: Vec<bool>,
    pub first_error: Option<String>,
}
