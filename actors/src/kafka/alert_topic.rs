//! The event channel on Kafka: in Kafka mode every event of the alert log
//! is also produced to `<topic>.alerts`, keyed by client id (so one
//! client's events stay in order), as the same JSON the streams carry;
//! `BILLING_PERIOD_CLOSED` also to `<topic>.billing`, for invoicing.
//!
//! Like a webhook, the topic follows the persisted log from a stored
//! cursor, advanced only once the broker has acknowledged a batch: a
//! broker outage delays events, a crash can repeat the last batch (each
//! carries its `event_id`), nothing is lost.

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_state::Store;

use crate::alerts::AlertLog;
use crate::kafka::source::KafkaConfig;
use crate::telemetry::ALERT_TOPIC_PUBLISHED;
use crate::Error;

/// The sink name of the topic's cursor.
const SINK: &str = "kafka";
/// Events produced per round.
const BATCH: usize = 500;

pub fn alerts_topic(topic: &str) -> String {
    format!("{topic}.alerts")
}

pub fn billing_topic(topic: &str) -> String {
    format!("{topic}.billing")
}

/// Starts following the alert log into the topic (on the current tokio
/// runtime).
pub fn start(
    config: &KafkaConfig,
    store: Arc<Store>,
    alerts: Arc<AlertLog>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let producer: FutureProducer = crate::kafka::ingest::acked_producer(&config.brokers)
        .create()
        .map_err(|e| Error::Kafka(e.to_string()))?;
    let cursor = match store.sink_state::<u64>(SINK)? {
        Some(c) => c,
        None => {
            // The topic carries what happens from its first start on.
            let c = alerts.last_id();
            store.put_sink_state(SINK, &c)?;
            c
        }
    };
    let topics = (alerts_topic(&config.topic), billing_topic(&config.topic));
    Ok(tokio::spawn(run(producer, topics, store, alerts, cursor)))
}

async fn run(
    producer: FutureProducer,
    (topic, billing): (String, String),
    store: Arc<Store>,
    alerts: Arc<AlertLog>,
    mut cursor: u64,
) {
    let mut follower = alerts.follow();
    loop {
        let batch = follower.next_batch(cursor, BATCH).await;
        if batch.is_empty() {
            continue;
        }
        let mut payloads: Vec<(&str, String, std::sync::Arc<str>)> = Vec::new();
        for e in &batch {
            payloads.push((&topic, e.client_id.clone(), e.to_json()));
            if e.event_type == "BILLING_PERIOD_CLOSED" {
                payloads.push((&billing, e.client_id.clone(), e.to_json()));
            }
        }
        let sends = payloads.iter().map(|(to, key, json)| {
            producer.send(
                FutureRecord::to(to).key(key).payload(&**json),
                Duration::from_secs(30),
            )
        });
        let results = futures::future::join_all(sends).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            if let Some(Err((e, _))) = results.iter().find(|r| r.is_err()) {
                tracing::warn!(error = %e, failed, "alert topic delivery failed; retrying the batch");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        counter!(ALERT_TOPIC_PUBLISHED).increment(payloads.len() as u64);
        if let Some(last) = batch.last() {
            cursor = last.event_id;
            if let Err(e) = store.put_sink_state(SINK, &cursor) {
                tracing::error!(error = %e, "cannot store the alert topic cursor");
            }
        }
    }
}
