//! What happens when the consumer group moves partitions.
//!
//! Revoked: the partition's epoch advances (batches fetched before are
//! refused), its shard flushes and drops its hot state, and the changelog
//! writer publishes the partition's last round, all before the callback
//! returns, so the next owner finds everything in the changelog.
//!
//! Assigned: if the changelog has not grown since this instance last
//! published or restored the partition and the local checkpoint is that
//! marker's, the local state is current; otherwise the partition is rebuilt
//! from the changelog (the state at its last marker) and replaces the local
//! one. Either way the shard reloads, consumption starts right after the
//! stored position, and the instance publishes its new membership.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_state::retention::wall_clock_ms;
use tally_state::Store;

use crate::kafka::changelog::{ChangelogReader, ChangelogWriter};
use crate::kafka::health::KafkaHealth;
use crate::kafka::membership::Membership;
use crate::kafka::source::Feed;
use crate::messages::PartitionControl;
use crate::router::ShardRouter;
use crate::Error;

/// How long a revoked partition's last changelog round may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct GroupContext {
    pub store: Arc<Store>,
    /// The request topic (its statistics are the lag reported).
    pub topic: String,
    /// Per feed ([`Feed::index`]): its topic and its position key.
    pub topics: [String; 2],
    pub source_keys: [String; 2],
    pub health: Arc<KafkaHealth>,
    pub router: ShardRouter,
    /// Ownership epoch per partition, shared with the partition tasks.
    pub epochs: Arc<Vec<AtomicU64>>,
    pub writer: Arc<ChangelogWriter>,
    pub reader: ChangelogReader,
    pub membership: Arc<Membership>,
    /// Per partition and feed, the offset the next record read must not
    /// be past (set on assignment and every seek; -1: none). See
    /// `partition_task::check_expected`.
    pub expected: Vec<[AtomicI64; 2]>,
    /// Revocations served so far: a stopping source waits for the one its
    /// unsubscribe causes, after which librdkafka sends LeaveGroup.
    pub revocations: AtomicU64,
}

impl ClientContext for GroupContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
        self.health.on_error(wall_clock_ms(), &error, reason);
    }

    /// librdkafka's own log lines (including `TALLY_KAFKA_DEBUG` contexts).
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(facility = fac, "librdkafka: {message}")
            }
            L::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
            _ => tracing::info!(facility = fac, "librdkafka: {message}"),
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.health
            .on_statistics(wall_clock_ms(), &self.topic, &statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        // Both feeds' partition N move together (co-partitioned topics,
        // range assignment): each partition is taken or let go once.
        let elements: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let partitions: BTreeSet<i32> = elements.iter().map(|(_, p)| *p).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = TopicPartitionList::new();
                let mut owned = BTreeSet::new();
                for partition in partitions {
                    let shard = u16::try_from(partition)
                        .ok()
                        .filter(|p| usize::from(*p) < self.epochs.len());
                    let taken = match shard {
                        // No shard: its messages go to the dead-letter topic.
                        None => None,
                        Some(p) => match self.take(p) {
                            Ok(()) => Some(p),
                            // Not consuming it is safe; consuming it on stale
                            // state is not. The next rebalance retries.
                            Err(e) => {
                                tracing::error!(partition, error = %e, "cannot take partition; leaving it idle");
                                continue;
                            }
                        },
                    };
                    for (topic, _) in elements.iter().filter(|(_, q)| *q == partition) {
                        let offset = match (taken, self.feed_of(topic)) {
                            (Some(p), Some(feed)) => match self.resume_offset(feed, p) {
                                Ok(offset) => {
                                    self.expect(feed, p, offset);
                                    offset
                                }
                                Err(e) => {
                                    tracing::error!(topic, partition, error = %e, "cannot read the stored position; leaving it idle");
                                    continue;
                                }
                            },
                            _ => Offset::Stored,
                        };
                        tracing::info!(topic, partition, ?offset, "partition assigned");
                        let _ = assigned.add_partition_offset(topic, partition, offset);
                    }
                    if let Some(p) = taken {
                        owned.insert(p);
                    }
                }
                if let Err(e) = consumer.assign(&assigned) {
                    tracing::error!(error = %e, "assign failed");
                }
                self.membership.set_owned(owned);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for partition in partitions {
                    if let Ok(p) = u16::try_from(partition) {
                        self.release(p);
                    }
                }
                tracing::info!(topic = %self.topic, "partitions revoked");
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign failed");
                }
                self.membership.set_owned(BTreeSet::new());
                self.revocations.fetch_add(1, Ordering::SeqCst);
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

impl GroupContext {
    pub fn epoch(&self, partition: u16) -> u64 {
        self.epochs
            .get(usize::from(partition))
            .map_or(0, |e| e.load(Ordering::SeqCst))
    }

    /// Moves `partition` from `from` to the next epoch, unless a
    /// rebalance already moved it on.
    pub fn advance_epoch(&self, partition: u16, from: u64) -> Option<u64> {
        let epoch = self.epochs.get(usize::from(partition))?;
        epoch
            .compare_exchange(from, from + 1, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| from + 1)
    }

    fn next_epoch(&self, partition: u16) -> u64 {
        self.epochs
            .get(usize::from(partition))
            .map_or(0, |e| e.fetch_add(1, Ordering::SeqCst) + 1)
    }

    fn feed_of(&self, topic: &str) -> Option<Feed> {
        Feed::ALL
            .into_iter()
            .find(|f| self.topics[f.index()] == topic)
    }

    /// The offset to resume `feed` of `partition` from: right after the
    /// stored one.
    pub fn resume_offset(&self, feed: Feed, partition: u16) -> Result<Offset, Error> {
        let stored = self
            .store
            .load_checkpoint(partition)?
            .positions
            .get(&self.source_keys[feed.index()])
            .copied();
        Ok(match stored.and_then(|o| i64::try_from(o).ok()) {
            Some(o) => Offset::Offset(o + 1),
            None => Offset::Beginning,
        })
    }

    /// Makes the shard of `partition` current (restoring from the
    /// changelog if needed) and starts publishing its changelog.
    fn take(&self, p: u16) -> Result<(), Error> {
        let epoch = self.next_epoch(p);
        let ends = self.reader.ends(p)?;
        let local = self.store.load_checkpoint(p)?;
        // The local state is the changelog's at this instance's last mark
        // if nothing was flushed since (a clean hand-over, or a restore):
        // then only what others appended after the mark is read.
        let mark = self.store.load_changelog_mark(p)?.filter(|m| {
            m.checkpoint == local
                && m.ends
                    .is_some_and(|e| e.iter().zip(ends.iter()).all(|(mine, now)| mine <= now))
        });
        let (next_round, writer_ends, unburied) = match mark {
            Some(m) if m.ends == Some(ends) => (m.round + 1, m.ends, Vec::new()),
            mark => {
                // The shard must hold nothing of the partition while its
                // stored state is rewritten under it.
                futures::executor::block_on(self.router.control(p, PartitionControl::Release))?;
                let restored = self.reader.restore(&self.store, p, ends, mark.as_ref())?;
                (restored.next_round(), restored.mark.ends, restored.unburied)
            }
        };
        futures::executor::block_on(self.router.control(p, PartitionControl::Adopt { epoch }))?;
        self.writer.adopt(p, next_round, writer_ends, unburied);
        Ok(())
    }

    /// The offset the next record of `feed` read from `partition` must not
    /// be past.
    pub fn expected(&self, feed: Feed, partition: u16) -> Option<&AtomicI64> {
        self.expected
            .get(usize::from(partition))
            .map(|e| &e[feed.index()])
    }

    /// Records that reading `feed` of `partition` now starts at `offset`.
    pub fn expect(&self, feed: Feed, partition: u16, offset: Offset) {
        if let (Some(e), Offset::Offset(o)) = (self.expected(feed, partition), offset) {
            e.store(o, Ordering::SeqCst);
        }
    }

    /// Lets go of `partition`: flush, drop hot state, publish last round.
    pub fn release(&self, p: u16) {
        if usize::from(p) >= self.epochs.len() {
            return;
        }
        self.next_epoch(p);
        if let Err(e) =
            futures::executor::block_on(self.router.control(p, PartitionControl::Release))
        {
            tracing::warn!(partition = p, error = %e, "shard did not flush on revocation");
        }
        if let Err(e) = self.writer.release(p, RELEASE_TIMEOUT) {
            tracing::warn!(partition = p, error = %e, "last changelog round not published; the next owner replays more");
        }
    }
}
