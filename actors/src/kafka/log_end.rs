//! Where a partition's log really ends.
//!
//! tansu 0.6 answers ListOffsets "latest" (what `fetch_watermarks` asks)
//! with the base offset of the partition's last record batch + 1, not one
//! past its last record: after a batch of five records at 15..=19 it says
//! 16. A reader that stops at that mark misses the rest of the last batch
//! (seen: all but the first of the tombstones a changelog round ends with,
//! and anomalies published together). The records are all there: a fetch
//! from the mark's last offset returns the whole batch, and the partition
//! end event (`enable.partition.eof`) comes after it. With Apache Kafka
//! the mark is already the end and this reads nothing more than it.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

/// The client context of a consumer that reads to partition ends: the end
/// event is how a read finishes, not an error worth a log line (librdkafka
/// also reports it as a client error, which the default context logs at
/// error level on every read).
pub(crate) struct ReadsToEnd;

impl ClientContext for ReadsToEnd {
    fn error(&self, error: KafkaError, reason: &str) {
        if !is_partition_end(&error) {
            tracing::warn!(error = %error, reason, "kafka reader error");
        }
    }
}

/// A partition end, as a message error or as the client error librdkafka
/// also raises for it (a global one, not `PartitionEOF`).
fn is_partition_end(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_)
            | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
    )
}

impl ConsumerContext for ReadsToEnd {}

/// A consumer that reads to partition ends.
pub(crate) type EndReader = BaseConsumer<ReadsToEnd>;

/// `(low, end)` of `topic[partition]`: its first offset and one past its
/// last record. `consumer` must have `enable.partition.eof` on; its
/// assignment is replaced.
pub(crate) fn log_bounds(
    consumer: &EndReader,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    if high <= low {
        return Ok((low, high));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(high - 1))?;
    consumer.assign(&tpl)?;
    let mut end = high;
    let deadline = Instant::now() + timeout;
    let found = loop {
        if Instant::now() > deadline {
            break Err(KafkaError::Global(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                end = end.max(m.offset() + 1);
            }
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition => break Ok(()),
            Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => break Err(e),
        }
    };
    let _ = consumer.unassign();
    found.map(|()| (low, end))
}

#[cfg(test)]
mod end_tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::is_partition_end;

    #[test]
    fn a_partition_end_is_no_error_in_either_form_and_others_are() {
        assert!(is_partition_end(&KafkaError::PartitionEOF(3)));
        // The form the log showed on every read: "Global error: PartitionEOF".
        assert!(is_partition_end(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_partition_end(&KafkaError::Global(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
    }
}
