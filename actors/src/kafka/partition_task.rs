//! One partition's consume loop: gathers its messages into rounds,
//! dispatches them to its shard, commits what the shard's flushes
//! acknowledged, pauses while the shard is behind, and reads again from
//! the stored position whenever what was read may not be what was applied
//! (a shard restart, a broker answering past the offset asked for).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use metrics::counter;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tally_pipelines::event::ValidationContext;
use tally_state::retention::wall_clock_ms;
use tokio::sync::{oneshot, watch};

use crate::kafka::decode::{decode_round, take, FeedItem, Received};
use crate::kafka::health::KafkaHealth;
use crate::kafka::positioning::{
    check_expected, nudge_back, reposition, EXPECT_PATIENCE, STEP_BACK,
};
use crate::kafka::rebalance::GroupContext;
use crate::kafka::source::{Feed, KafkaConfig, PendingAck};
use crate::messages::PartitionControl;
use crate::router::ShardRouter;
use crate::telemetry::{KAFKA_PARTITION_PAUSES, KAFKA_PARTITION_RESUMES};
use crate::Error;

/// How soon a partition held at a record reads it again.
const HOLD_RETRY: Duration = Duration::from_secs(1);

pub(crate) type Validation = Arc<dyn Fn() -> ValidationContext + Send + Sync>;

/// What one partition of one feed's topic is read with.
pub(crate) struct PartitionReader {
    pub feed: Feed,
    pub partition: u16,
    pub queue: rdkafka::consumer::stream_consumer::StreamPartitionQueue<GroupContext>,
    pub consumer: Arc<StreamConsumer<GroupContext>>,
    pub config: Arc<KafkaConfig>,
    pub producer: FutureProducer,
    pub router: ShardRouter,
    pub validation: Validation,
    pub stopped: watch::Receiver<bool>,
    pub health: Arc<KafkaHealth>,
}

impl PartitionReader {
    pub(crate) async fn consume<T: FeedItem>(self) {
        let PartitionReader {
            feed,
            partition,
            queue,
            consumer,
            config,
            producer,
            router,
            validation,
            mut stopped,
            health,
        } = self;
        let topic = config.topic_of(feed).to_string();
        let topic = topic.as_str();
        let source = config.feed_source(feed);
        let partitions = router.partitions();
        let mut stream = queue.stream();
        // The epoch this reader last positioned itself in. The partition
        // may move on without it: the other feed's reader resumed the
        // shard after a failed flush, and the shard, which lost this
        // feed's unflushed batches too, now takes what follows them. So a
        // new epoch means reading again from the stored position.
        let mut positioned = consumer.context().epoch(partition);
        let mut pending: VecDeque<PendingAck> = VecDeque::new();
        let mut step_back = STEP_BACK;
        // The epoch in which the partition was last held at a dead letter.
        let mut held_epoch: Option<u64> = None;
        // Since when nothing has been read (None: something was).
        let mut quiet_since: Option<tokio::time::Instant> = None;
        loop {
            let first = tokio::select! {
                _ = stopped.changed() => break,
                m = stream.next() => m,
                // Wake up to commit acknowledged offsets while idle.
                _ = tokio::time::sleep(Duration::from_millis(200)) => None,
            };
            if first.is_some() {
                quiet_since = None;
            } else {
                let since = *quiet_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= EXPECT_PATIENCE
                    && nudge_back(&consumer, feed, topic, partition, &mut step_back)
                {
                    quiet_since = None;
                }
            }
            let mut round: Vec<Received> = Vec::new();
            let epoch = consumer.context().epoch(partition);
            if held_epoch.is_some_and(|e| e != epoch) {
                // Moved or resumed since: the hold is the new owner's to report.
                health.release_hold(topic, i32::from(partition));
                held_epoch = None;
            }
            if epoch != positioned {
                positioned = epoch;
                reposition(&consumer, feed, topic, partition);
                continue;
            }
            if let Some(m) = first {
                if m.is_ok() {
                    health.connected();
                }
                take(&mut round, m);
                let deadline = tokio::time::Instant::now() + config.batch_linger;
                while round.len() < config.batch_max {
                    match tokio::time::timeout_at(deadline, stream.next()).await {
                        Ok(Some(m)) => take(&mut round, m),
                        _ => break,
                    }
                }
            }
            if let Some(&(_, first, _, _)) = round.first() {
                if consumer.context().epoch(partition) == epoch
                    && !check_expected(&consumer, feed, topic, partition, first, &mut step_back)
                {
                    continue;
                }
            }
            // A re-read from further back (see `check_expected`, `nudge_back`)
            // brings records the shard has applied or set aside already: they
            // are not dispatched or dead-lettered again.
            if !round.is_empty() {
                if let Ok(Offset::Offset(floor)) = consumer.context().resume_offset(feed, partition)
                {
                    round.retain(|&(_, offset, _, _)| offset >= floor);
                }
            }
            let round_end = round.last().map(|&(_, offset, _, _)| offset);
            if let (Some(&(_, from, _, _)), Some(to)) = (round.first(), round_end) {
                tracing::trace!(
                    topic,
                    partition,
                    from,
                    to,
                    records = round.len(),
                    epoch,
                    "round read"
                );
            }
            let mut hold_from = None;
            if !round.is_empty() {
                let sent = async {
                    let decoded = decode_round::<T>(
                        &config,
                        topic,
                        &source,
                        partitions,
                        health.partitioning_of(feed),
                        &producer,
                        validation.as_ref(),
                        round,
                    )
                    .await?;
                    hold_from = decoded.hold_from;
                    match (&decoded.dead_letter_failure, hold_from) {
                        (Some(reason), Some(offset)) => {
                            health.hold(
                                topic,
                                i32::from(partition),
                                offset,
                                reason,
                                wall_clock_ms(),
                            );
                            held_epoch = Some(epoch);
                        }
                        // Every record read was applied or set aside (or is
                        // held by the partitioner check, reported apart).
                        _ => {
                            if held_epoch.take().is_some() {
                                health.release_hold(topic, i32::from(partition));
                            }
                        }
                    }
                    let (items, offsets) = (decoded.items, decoded.offsets);
                    let Some(&last) = offsets.last() else {
                        return Ok::<(), Error>(());
                    };
                    if consumer.context().epoch(partition) != epoch {
                        // The partition moved while this round was read: drop
                        // it and read again from what the store now holds
                        // (not from a hold inside the dropped round, which
                        // would skip what came before it).
                        hold_from = None;
                        reposition(&consumer, feed, topic, partition);
                        return Ok(());
                    }
                    if !router.has_room(partition) {
                        // The shard is behind: stop fetching this partition only.
                        set_paused(&consumer, topic, partition, true);
                        counter!(KAFKA_PARTITION_PAUSES).increment(1);
                        router.wait_for_room(partition).await;
                        set_paused(&consumer, topic, partition, false);
                        // Resumed, the fetch starts after this round: it must
                        // not skip past that (see `check_expected`).
                        if let Some(end) = round_end {
                            consumer
                                .context()
                                .expect(feed, partition, Offset::Offset(end + 1));
                        }
                    }
                    let rx = router
                        .send_positioned(partition, source.clone(), items, offsets, Some(epoch))
                        .await?;
                    pending.push_back(PendingAck {
                        partition: i32::from(partition),
                        last_offset: i64::try_from(last).unwrap_or(i64::MAX),
                        epoch,
                        rx,
                    });
                    Ok(())
                };
                // A stop does not wait for a dead-letter write that hangs:
                // nothing of an unfinished round is committed, and it is read
                // again from the stored position after the restart.
                let sent = tokio::select! {
                    r = sent => r,
                    _ = stopped.changed() => break,
                };
                if let Err(e) = sent {
                    tracing::error!(error = %e, partition, "kafka dispatch failed; reading again from the stored position");
                    // Nothing of the round was applied: read it again (the
                    // shard drops what it already has), and a hold inside it
                    // must not move reading past the rest.
                    hold_from = None;
                    reposition(&consumer, feed, topic, partition);
                    tokio::select! {
                        _ = stopped.changed() => break,
                        _ = tokio::time::sleep(HOLD_RETRY) => {}
                    }
                }
            }
            let current = consumer.context().epoch(partition);
            if commit_acknowledged(&consumer, topic, &mut pending, current) {
                // The shard lost applied-but-unflushed batches (a failed flush
                // restarted it) and refuses what follows them: read again from
                // what it stored, instead of fetching and dropping forever.
                if let Some(epoch) =
                    resume_from_store(&consumer, &router, feed, topic, partition, current).await
                {
                    positioned = epoch;
                }
                continue;
            }
            if let Some(offset) = hold_from {
                // Read the held record again after a pause: nothing past it
                // is applied or committed meanwhile.
                match consumer.seek(
                    topic,
                    i32::from(partition),
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                ) {
                    Ok(()) => consumer
                        .context()
                        .expect(feed, partition, Offset::Offset(offset)),
                    Err(e) => tracing::debug!(partition, error = %e, "seek back to a held record"),
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(HOLD_RETRY) => {}
                }
            }
        }
        health.release_hold(topic, i32::from(partition));
        let current = consumer.context().epoch(partition);
        commit_acknowledged(&consumer, topic, &mut pending, current);
    }
}

/// Resumes the shard of `partition` after it lost batches; answers the
/// epoch this reader positioned itself in, if it did.
async fn resume_from_store(
    consumer: &StreamConsumer<GroupContext>,
    router: &ShardRouter,
    feed: Feed,
    topic: &str,
    partition: u16,
    from_epoch: u64,
) -> Option<u64> {
    // A rebalance (or the other feed's reader) in between moved the
    // partition on; this reader repositions when it sees the new epoch.
    let epoch = consumer.context().advance_epoch(partition, from_epoch)?;
    match router
        .control(partition, PartitionControl::Resume { from_epoch, epoch })
        .await
    {
        Ok(()) => {
            tracing::warn!(
                partition,
                "shard restarted; resuming from its stored position"
            );
            counter!(KAFKA_PARTITION_RESUMES).increment(1);
            reposition(consumer, feed, topic, partition);
            Some(epoch)
        }
        Err(e) => {
            tracing::warn!(partition, error = %e, "cannot resume the partition's shard");
            None
        }
    }
}

fn set_paused(consumer: &StreamConsumer<GroupContext>, topic: &str, p: u16, paused: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, i32::from(p));
    let result = if paused {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, partition = p, paused, "cannot pause/resume partition");
    }
}

/// Commits, for monitoring, the offsets whose shards have flushed; true
/// if a batch of the current `epoch` was not applied (the partition must
/// then be read again from the stored position).
fn commit_acknowledged(
    consumer: &StreamConsumer<GroupContext>,
    topic: &str,
    pending: &mut VecDeque<PendingAck>,
    epoch: u64,
) -> bool {
    let mut tpl = TopicPartitionList::new();
    let mut lost = false;
    pending.retain_mut(|ack| match ack.rx.try_recv() {
        Ok(Ok(_)) => {
            let _ = tpl.add_partition_offset(topic, ack.partition, Offset::Offset(ack.last_offset + 1));
            false
        }
        Ok(Err(Error::StaleEpoch { .. })) => false,
        // Sent before the last resume or move: already read again.
        Ok(Err(_)) if ack.epoch != epoch => false,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, partition = ack.partition, "batch not applied; reading again from the stored position");
            lost = true;
            false
        }
        Err(oneshot::error::TryRecvError::Empty) => true,
        Err(oneshot::error::TryRecvError::Closed) => false,
    });
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed (monitoring only)");
        }
    }
    lost
}
