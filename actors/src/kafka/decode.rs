//! From consumed Kafka records to shard batches: decoding and validation
//! (off the async threads), the partition check, and dead letters for what
//! cannot be counted, with headers saying why and where it came from.

use std::time::Duration;

use metrics::counter;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tally_pipelines::decode::BodyItem;
use tally_pipelines::event::{RequestEvent, ValidationContext};
use tally_pipelines::partitioner::Partitioner;
use tally_pipelines::telemetry::Point;

use crate::kafka::partitioning::{PartitionCheck, Placement, Verdict};
use crate::kafka::source::{Feed, KafkaConfig};
use crate::messages::{Routable, Source};
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

/// What a topic carries: request events keyed by client, or telemetry
/// points keyed by series.
pub trait FeedItem: BodyItem + Routable {
    /// The feed whose topic carries it.
    const FEED: Feed;
    /// What the routing key is, in a dead letter's reason.
    const NOUN: &'static str;
    /// The field producers must key records by.
    const KEYED_BY: &'static str;
    /// The record value that decodes back to it.
    fn wire_json(&self) -> String;
}

impl FeedItem for RequestEvent {
    const FEED: Feed = Feed::Events;
    const NOUN: &'static str = "client";
    const KEYED_BY: &'static str = "client_id";
    fn wire_json(&self) -> String {
        self.to_wire_json()
    }
}

impl FeedItem for Point {
    const FEED: Feed = Feed::Points;
    const NOUN: &'static str = "series";
    const KEYED_BY: &'static str = "series";
    fn wire_json(&self) -> String {
        self.to_wire_json()
    }
}

/// What one message is.
enum Classified<T> {
    Item(T),
    /// Decoded, but on a partition the configured partitioner does not
    /// give its key.
    Misplaced {
        item: T,
        owner: u16,
    },
    Bad(String),
}

/// Decodes one message and checks it is on its key's partition.
fn classify<T: FeedItem>(
    m: &Received,
    partitions: u16,
    partitioner: Partitioner,
    ctx: &ValidationContext,
) -> Classified<T> {
    let (partition, _, _, payload) = m;
    let Some(p) = u16::try_from(*partition).ok().filter(|p| *p < partitions) else {
        return Classified::Bad(format!(
            "topic partition {partition} has no shard (instance has {partitions})"
        ));
    };
    let Some(bytes) = payload else {
        return Classified::Bad("empty message".to_string());
    };
    let item = match T::decode_json(bytes, ctx) {
        Ok(e) => e,
        Err(r) => return Classified::Bad(r.to_string()),
    };
    let owner = partitioner.partition(item.routing_key(), partitions);
    if owner != p {
        return Classified::Misplaced { item, owner };
    }
    Classified::Item(item)
}

/// One partition's round, decoded: what to apply, and where reading must
/// stop (the record at `hold_from` and after are read again later, not
/// applied or committed now).
pub(crate) struct Decoded<T> {
    pub items: Vec<T>,
    pub offsets: Vec<u64>,
    pub hold_from: Option<i64>,
    /// Why the dead-letter topic did not take the record at `hold_from`
    /// (None when the partitioner check holds it).
    pub dead_letter_failure: Option<String>,
}

/// Decodes one partition's round of messages, in offset order, in parallel
/// off the async threads; bad messages go to the dead-letter topic. The
/// round stops at a message that cannot be set aside yet: a misplaced one
/// while the partitioner check holds them, or one the dead-letter topic
/// did not take.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decode_round<T: FeedItem>(
    config: &KafkaConfig,
    topic: &str,
    source: &Source,
    partitions: u16,
    check: &PartitionCheck,
    producer: &FutureProducer,
    validation: &(dyn Fn() -> ValidationContext + Send + Sync),
    round: Vec<Received>,
) -> Result<Decoded<T>, Error> {
    let ctx = validation();
    let partitioner = check.configured();
    let decoded = tokio::task::spawn_blocking(move || {
        round
            .into_iter()
            .map(|m| {
                let outcome = classify::<T>(&m, partitions, partitioner, &ctx);
                (m, outcome)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Error::Kafka(format!("decoder task failed: {e}")))?;
    let mut out = Decoded {
        items: Vec::with_capacity(decoded.len()),
        offsets: Vec::with_capacity(decoded.len()),
        hold_from: None,
        dead_letter_failure: None,
    };
    let mut rejected = 0;
    for ((partition, offset, key, payload), outcome) in decoded {
        let p = u16::try_from(partition).unwrap_or(u16::MAX);
        let reason = match outcome {
            Classified::Item(item) => {
                check.observe(p, offset, Placement::Fits);
                out.items.push(item);
                out.offsets.push(u64::try_from(offset).unwrap_or(0));
                continue;
            }
            Classified::Misplaced { item, owner } => {
                let fitting = Partitioner::fitting(item.routing_key(), p, partitions);
                let verdict = check.observe(p, offset, Placement::Misfits { fitting: &fitting });
                if verdict != Verdict::Consistent {
                    out.hold_from = Some(offset);
                    break;
                }
                let others: Vec<&str> = fitting.iter().map(|f| f.name()).collect();
                format!(
                    "{} {:?} belongs to partition {owner} under the {partitioner} partitioner, not {p}{}: key records by {} and partition them with {partitioner}",
                    T::NOUN,
                    item.routing_key(),
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!(" (the {} partitioner would put it here)", others.join(" or "))
                    },
                    T::KEYED_BY,
                )
            }
            Classified::Bad(reason) => reason,
        };
        let written = dead_letter(
            config,
            topic,
            producer,
            partition,
            offset,
            key.as_deref(),
            payload.as_deref(),
            &reason,
        )
        .await;
        if let Err(e) = written {
            // Not set aside: read it again rather than step over it.
            out.hold_from = Some(offset);
            out.dead_letter_failure = Some(e.to_string());
            break;
        }
        rejected += 1;
    }
    EventsRejected {
        source: source.label(),
        count: rejected,
    }
    .emit();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn dead_letter(
    config: &KafkaConfig,
    topic: &str,
    producer: &FutureProducer,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    reason: &str,
) -> Result<(), Error> {
    let (p, o) = (partition.to_string(), offset.to_string());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "tally-reason",
            value: Some(reason),
        })
        .insert(Header {
            key: "tally-source-topic",
            value: Some(topic),
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
        Ok(_) => {
            counter!(KAFKA_DEAD_LETTERS).increment(1);
            Ok(())
        }
        Err((e, _)) => {
            tracing::error!(error = %e, partition, offset, "cannot write to the dead-letter topic");
            Err(Error::Kafka(format!("dead-letter topic: {e}")))
        }
    }
}
