//! Reading the dead-letter topic back, newest first, for operators who
//! have no Kafka client at hand (`GET /v1/dead-letters/kafka`). The topic
//! is the record: every instance's dead letters, with the reason and
//! origin headers the source wrote, and nothing kept in local state.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::kafka::log_end::{log_bounds, EndReader, ReadsToEnd};
use crate::kafka::source::KafkaConfig;
use crate::Error;

/// Payload bytes shown per record; longer payloads are cut.
const MAX_PAYLOAD_SHOWN: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct KafkaDeadLetter {
    /// Where the dead letter is in the dead-letter topic.
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub reason: Option<String>,
    pub source_topic: Option<String>,
    pub source_partition: Option<String>,
    pub source_offset: Option<String>,
    pub key: Option<String>,
    pub payload: Option<String>,
    pub payload_truncated: bool,
}

pub struct KafkaDeadLetterPage {
    pub dead_letters: Vec<KafkaDeadLetter>,
    /// Per partition with more to read, the offset below which the next
    /// page starts.
    pub next: Vec<(i32, i64)>,
}

/// One page, newest first: `below` holds, per partition, the offset the
/// previous page stopped at (`None`: from the newest, every partition).
/// Blocking; call off the async threads.
pub fn read_page(
    config: &KafkaConfig,
    below: Option<&[(i32, i64)]>,
    limit: usize,
) -> Result<KafkaDeadLetterPage, Error> {
    let kafka = |e: rdkafka::error::KafkaError| Error::Kafka(e.to_string());
    let topic = config.dead_letter_topic.as_str();
    let consumer: EndReader = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", format!("{}.dead-letter-reader", config.group))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create_with_context(ReadsToEnd)
        .map_err(kafka)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let limit = limit.max(1) as i64;
    // (partition, low watermark, first offset read, end of the range)
    let mut ranges = Vec::new();
    for p in partitions {
        let (low, high) = log_bounds(&consumer, topic, p, TIMEOUT).map_err(kafka)?;
        let end = match below {
            None => high,
            Some(b) => match b.iter().find(|(bp, _)| *bp == p) {
                Some((_, o)) => (*o).min(high),
                None => continue,
            },
        };
        if end > low {
            ranges.push((p, low, (end - limit).max(low), end));
        }
    }
    let mut found = Vec::new();
    if !ranges.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for &(p, _, start, _) in &ranges {
            tpl.add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(kafka)?;
        }
        consumer.assign(&tpl).map_err(kafka)?;
        let mut open: Vec<(i32, i64)> = ranges.iter().map(|r| (r.0, r.3)).collect();
        let deadline = Instant::now() + TIMEOUT;
        while !open.is_empty() && Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            match m {
                Ok(m) => {
                    let (p, o) = (m.partition(), m.offset());
                    if let Some(&(_, end)) = open.iter().find(|(op, _)| *op == p) {
                        if o < end {
                            found.push(dead_letter_of(&m));
                        }
                        if o + 1 >= end {
                            open.retain(|(op, _)| *op != p);
                        }
                    }
                }
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => open.retain(|(op, _)| *op != p),
                Err(e) => return Err(kafka(e)),
            }
        }
        if !open.is_empty() {
            return Err(Error::Kafka(format!(
                "the dead-letter topic {topic} did not answer within {} s",
                TIMEOUT.as_secs()
            )));
        }
    }
    found.sort_by(|a, b| {
        b.timestamp_ms
            .cmp(&a.timestamp_ms)
            .then(a.partition.cmp(&b.partition))
            .then(b.offset.cmp(&a.offset))
    });
    found.truncate(limit as usize);
    // A partition resumes below the oldest record taken from it (or where
    // it stood, if none was); it has more while that is above its start.
    let next = ranges
        .iter()
        .filter_map(|&(p, low, _, end)| {
            let resume = found
                .iter()
                .filter(|d| d.partition == p)
                .map(|d| d.offset)
                .min()
                .unwrap_or(end);
            (resume > low).then_some((p, resume))
        })
        .collect();
    Ok(KafkaDeadLetterPage {
        dead_letters: found,
        next,
    })
}

fn dead_letter_of(m: &rdkafka::message::BorrowedMessage<'_>) -> KafkaDeadLetter {
    let header = |name: &str| {
        m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    let payload = m.payload();
    KafkaDeadLetter {
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        reason: header("tally-reason"),
        source_topic: header("tally-source-topic"),
        source_partition: header("tally-source-partition"),
        source_offset: header("tally-source-offset"),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: payload
            .map(|p| String::from_utf8_lossy(&p[..p.len().min(MAX_PAYLOAD_SHOWN)]).into_owned()),
        payload_truncated: payload.is_some_and(|p| p.len() > MAX_PAYLOAD_SHOWN),
    }
}
