//! Where a partition reader reads from: the stored position after a move
//! or a restart, and the re-reads from further back that brokers which
//! answer past the offset asked for (tansu 0.6) make necessary.

use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::counter;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Offset;

use crate::kafka::rebalance::GroupContext;
use crate::kafka::source::Feed;
use crate::telemetry::KAFKA_REREADS;

pub(super) fn reposition(consumer: &StreamConsumer<GroupContext>, feed: Feed, topic: &str, p: u16) {
    let offset = match consumer.context().resume_offset(feed, p) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot read the stored position");
            return;
        }
    };
    match consumer.seek(topic, i32::from(p), offset, Duration::from_secs(5)) {
        Ok(()) => {
            consumer.context().expect(feed, p, offset);
            tracing::debug!(
                partition = p,
                ?offset,
                "reading again from the stored position"
            )
        }
        // Not assigned any more: nothing to read again.
        Err(e) => {
            tracing::warn!(partition = p, ?offset, error = %e, "cannot seek to the stored position")
        }
    }
}

/// How far back a first re-read step goes (doubled each time).
pub(super) const STEP_BACK: i64 = 1024;

/// Whether a round whose first record is at `first` may be dispatched.
///
/// After an assignment, a seek or a pause to offset X the next record read
/// must be at or before X. Some brokers (tansu 0.6's object-store engine) answer a
/// fetch from the middle of a record batch with the batches after it, which
/// would skip the rest of that batch silently. Then this seeks further back
/// (1,024 records, doubling) until the record at X is read again; what comes
/// before it is dropped by the shard, which keeps its position. A gap that
/// remains from offset 0 is real (deleted records) and is let through.
pub(super) fn check_expected(
    consumer: &StreamConsumer<GroupContext>,
    feed: Feed,
    topic: &str,
    partition: u16,
    first: i64,
    step_back: &mut i64,
) -> bool {
    let Some(expected) = consumer.context().expected(feed, partition) else {
        return true;
    };
    let want = expected.load(Ordering::SeqCst);
    if want < 0 || first <= want {
        expected.store(-1, Ordering::SeqCst);
        *step_back = STEP_BACK;
        return true;
    }
    // The last step went back to offset 0 already.
    let tried_zero = *step_back != STEP_BACK && want.saturating_sub(*step_back / 2) <= 0;
    let from = want.saturating_sub(*step_back).max(0);
    if tried_zero {
        tracing::warn!(
            partition,
            want,
            first,
            "records before {first} cannot be read; going on from there"
        );
        expected.store(-1, Ordering::SeqCst);
        *step_back = STEP_BACK;
        return true;
    }
    tracing::warn!(
        partition,
        want,
        first,
        from,
        "the broker answered past the offset asked for; reading again from further back"
    );
    seek_further_back(consumer, topic, partition, from, step_back);
    false
}

/// Seeks `partition` back to `from` and doubles the next step back
/// (counted as a re-read); answers whether the seek was taken.
fn seek_further_back(
    consumer: &StreamConsumer<GroupContext>,
    topic: &str,
    partition: u16,
    from: i64,
    step_back: &mut i64,
) -> bool {
    counter!(KAFKA_REREADS).increment(1);
    *step_back = step_back.saturating_mul(2);
    match consumer.seek(
        topic,
        i32::from(partition),
        Offset::Offset(from),
        Duration::from_secs(5),
    ) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(partition, error = %e, "seek further back");
            false
        }
    }
}

/// How long a partition waits for the record it was positioned at before
/// reading from further back.
pub(super) const EXPECT_PATIENCE: Duration = Duration::from_secs(2);

/// A partition positioned at X (an assignment, a seek) that reads nothing
/// at all: tansu 0.6 answers a fetch from the middle of the log's last
/// record batch with nothing (the batches after it, of which there are
/// none), so a restart at a held record with no new records behind it
/// would wait forever. Reads again from further back, as
/// [`check_expected`] does; the shard drops what it already applied. With
/// Kafka, which answers from X, nothing is waiting here (or X is the log
/// end, and one short re-read of what precedes it is the cost). Answers
/// whether it sought.
pub(super) fn nudge_back(
    consumer: &StreamConsumer<GroupContext>,
    feed: Feed,
    topic: &str,
    partition: u16,
    step_back: &mut i64,
) -> bool {
    let Some(expected) = consumer.context().expected(feed, partition) else {
        return false;
    };
    let want = expected.load(Ordering::SeqCst);
    if want <= 0 {
        return false;
    }
    let from = want.saturating_sub(*step_back).max(0);
    tracing::debug!(
        partition,
        want,
        from,
        "nothing read at the offset asked for; reading again from further back"
    );
    if !seek_further_back(consumer, topic, partition, from, step_back) {
        return false;
    }
    if from == 0 {
        // Everything there is will be read; nothing further to try.
        expected.store(-1, Ordering::SeqCst);
    }
    true
}
