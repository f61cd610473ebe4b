//! Back-pressure for the Kafka source: a batch whose shard has no mailbox
//! room is held, and its partition is paused at the consumer, so a slow
//! shard stops only its own partition while the others keep flowing. When
//! the shard takes batches again, the held ones go first (offsets stay in
//! order) and the partition resumes.

use std::collections::{BTreeMap, VecDeque};

use metrics::counter;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;
use tally_pipelines::event::RequestEvent;

use crate::kafka_source::PendingAck;
use crate::messages::Source;
use crate::router::ShardRouter;
use crate::telemetry::KAFKA_PARTITION_PAUSES;
use crate::Error;

/// Events of one partition with their offsets.
pub(crate) type Batch = (Vec<RequestEvent>, Vec<u64>);

#[derive(Default)]
pub(crate) struct Backlog {
    held: BTreeMap<u16, VecDeque<Batch>>,
}

impl Backlog {
    /// Sends each batch if its shard has room and nothing is held before
    /// it; otherwise holds it and pauses the partition.
    pub async fn offer<C: ConsumerContext>(
        &mut self,
        batches: Vec<(u16, Batch)>,
        router: &ShardRouter,
        source: &Source,
        consumer: &impl Consumer<C>,
        topic: &str,
        pending: &mut VecDeque<PendingAck>,
    ) -> Result<(), Error> {
        for (p, batch) in batches {
            let queue = self.held.entry(p).or_default();
            if queue.is_empty() && router.has_room(p) {
                send(router, source, p, batch, pending).await?;
                continue;
            }
            if queue.is_empty() {
                pause(consumer, topic, p, true);
                counter!(KAFKA_PARTITION_PAUSES).increment(1);
                tracing::debug!(partition = p, "shard behind; partition paused");
            }
            queue.push_back(batch);
        }
        Ok(())
    }

    /// Sends held batches the shards now have room for; resumes the
    /// partitions whose backlog is empty.
    pub async fn drain<C: ConsumerContext>(
        &mut self,
        router: &ShardRouter,
        source: &Source,
        consumer: &impl Consumer<C>,
        topic: &str,
        pending: &mut VecDeque<PendingAck>,
    ) -> Result<(), Error> {
        for (&p, queue) in self.held.iter_mut() {
            let was_held = !queue.is_empty();
            while router.has_room(p) {
                let Some(batch) = queue.pop_front() else {
                    break;
                };
                send(router, source, p, batch, pending).await?;
            }
            if was_held && queue.is_empty() {
                pause(consumer, topic, p, false);
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.held.values().all(VecDeque::is_empty)
    }
}

async fn send(
    router: &ShardRouter,
    source: &Source,
    p: u16,
    (events, offsets): Batch,
    pending: &mut VecDeque<PendingAck>,
) -> Result<(), Error> {
    let Some(&last) = offsets.last() else {
        return Ok(());
    };
    let rx = router
        .send_positioned(p, source.clone(), events, offsets)
        .await?;
    pending.push_back(PendingAck {
        partition: i32::from(p),
        last_offset: i64::try_from(last).unwrap_or(i64::MAX),
        rx,
    });
    Ok(())
}

fn pause<C: ConsumerContext>(consumer: &impl Consumer<C>, topic: &str, p: u16, paused: bool) {
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
