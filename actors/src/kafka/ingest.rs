//! HTTP ingest in Kafka mode: events are produced to the request topic
//! (idempotent producer, `acks=all`) and acknowledged once the broker has
//! them; the Kafka source then counts them like any other message. Ingest
//! never bypasses the topic, so the topic stays the one source of truth.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_pipelines::event::RequestEvent;
use tally_pipelines::partitioner::Partitioner;

use crate::kafka::source::KafkaConfig;
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
    topic: String,
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
            topic: config.topic.clone(),
            partitions,
            partitioner,
        })
    }

    /// Produces every event to its client's partition and waits until the
    /// broker has acknowledged or refused each of them: which ones it has.
    pub async fn produce(&self, events: &[RequestEvent]) -> Produced {
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

    async fn try_produce(&self, events: &[RequestEvent], out: &mut Produced) -> Result<(), Error> {
        let mut deliveries = Vec::with_capacity(events.len());
        for event in events {
            let payload = event.to_wire_json();
            // Place explicitly: the shard of partition N must own the client.
            let partition = i32::from(
                self.partitioner
                    .partition(&event.client_id, self.partitions),
            );
            let mut record = FutureRecord::to(&self.topic)
                .partition(partition)
                .key(event.client_id.as_str())
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
