//! From consumed Kafka records to shard batches: decoding and validation
//! (off the async threads), the partition check, and dead letters for what
//! cannot be counted, with headers saying why and where it came from.

use std::time::Duration;

use metrics::counter;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tally_pipelines::decode::decode_event_bytes;
use tally_pipelines::event::{RequestEvent, ValidationContext};
use tally_pipelines::partitioner::partition_for;

use crate::kafka_source::KafkaConfig;
use crate::messages::Source;
use crate::telemetry::{EventsRejected, KAFKA_DEAD_LETTERS};
use crate::Error;

/// A message copied out of the consumer: partition, offset, key, payload.
pub(crate) type Received = (i32, i64, Option<Vec<u8>>, Option<Vec<u8>>);

pub(crate) fn take(
    round: &mut Vec<Received>,
    m: rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>,
) {
    match m {
        Ok(m) => round.push((
            m.partition(),
            m.offset(),
            m.key().map(<[u8]>::to_vec),
            m.payload().map(<[u8]>::to_vec),
        )),
        Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
    }
}

/// Decodes one message and checks it is on its client's partition.
fn classify(
    m: &Received,
    partitions: u16,
    ctx: &ValidationContext,
) -> Result<(u16, RequestEvent), String> {
    let (partition, _, _, payload) = m;
    let Some(p) = u16::try_from(*partition).ok().filter(|p| *p < partitions) else {
        return Err(format!(
            "topic partition {partition} has no shard (instance has {partitions})"
        ));
    };
    let Some(bytes) = payload else {
        return Err("empty message".to_string());
    };
    let event = decode_event_bytes(bytes, ctx).map_err(|r| r.to_string())?;
    let owner = partition_for(&event.client_id, partitions);
    if owner != p {
        return Err(format!(
            "client {:?} belongs to partition {owner}, not {p}: key messages by client_id with the default partitioner",
            event.client_id
        ));
    }
    Ok((p, event))
}

/// Decodes one partition's round of messages, in offset order, in parallel
/// off the async threads; bad messages go to the dead-letter topic.
pub(crate) async fn decode_round(
    config: &KafkaConfig,
    source: &Source,
    partitions: u16,
    producer: &FutureProducer,
    validation: &(dyn Fn() -> ValidationContext + Send + Sync),
    round: Vec<Received>,
) -> Result<(Vec<RequestEvent>, Vec<u64>), Error> {
    let ctx = validation();
    let decoded = tokio::task::spawn_blocking(move || {
        round
            .into_iter()
            .map(|m| {
                let outcome = classify(&m, partitions, &ctx);
                (m, outcome)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Error::Kafka(format!("decoder task failed: {e}")))?;
    let (mut events, mut offsets) = (
        Vec::with_capacity(decoded.len()),
        Vec::with_capacity(decoded.len()),
    );
    let mut rejected = 0;
    for ((partition, offset, key, payload), outcome) in decoded {
        match outcome {
            Ok((_, event)) => {
                events.push(event);
                offsets.push(u64::try_from(offset).unwrap_or(0));
            }
            Err(reason) => {
                rejected += 1;
                dead_letter(
                    config,
                    producer,
                    partition,
                    offset,
                    key.as_deref(),
                    payload.as_deref(),
                    &reason,
                )
                .await;
            }
        }
    }
    EventsRejected {
        source: source.label(),
        count: rejected,
    }
    .emit();
    Ok((events, offsets))
}

pub(crate) async fn dead_letter(
    config: &KafkaConfig,
    producer: &FutureProducer,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    reason: &str,
) {
    let (p, o) = (partition.to_string(), offset.to_string());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "tally-reason",
            value: Some(reason),
        })
        .insert(Header {
            key: "tally-source-topic",
            value: Some(&config.topic),
        })
        .insert(Header {
            key: "tally-source-partition",
            value: Some(&p),
        })
        .insert(Header {
            key: "tally-source-offset",
            value: Some(&o),
        });
    let mut record = FutureRecord::<[u8], [u8]>::to(&config.dead_letter_topic).headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(v) = payload {
        record = record.payload(v);
    }
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(_) => counter!(KAFKA_DEAD_LETTERS).increment(1),
        Err((e, _)) => {
            tracing::error!(error = %e, partition, offset, "cannot write to the dead-letter topic")
        }
    }
}
