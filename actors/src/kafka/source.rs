//! The Kafka source: consumes the request topic in a consumer group and
//! feeds partition N to shard N, in batches.
//!
//! RocksDB, not the broker, holds the truth about progress: each shard
//! stores the last offset it applied in the same WriteBatch as the state it
//! produced. When the group assigns a partition, the consumer starts at
//! that stored offset + 1; offsets are committed to the broker only after a
//! shard's flush acknowledges them, for lag monitoring. Killed at any
//! moment and restarted, the instance re-reads what was not flushed, and
//! the shard drops what it had already applied.
//!
//! Messages that do not decode or validate, or whose key was placed on the
//! wrong partition, go to a dead-letter topic with headers saying why and
//! where they came from; they never stall a partition.
//!
//! Instances sharing the group split the partitions; what moves with a
//! partition (changelog restore, membership) is in [`crate::kafka::rebalance`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use metrics::counter;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tally_pipelines::event::ValidationContext;
use tally_state::changelog::StateStore;
use tally_state::retention::wall_clock_ms;
use tally_state::Store;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::kafka::changelog::{changelog_topic, ChangelogReader, ChangelogWriter};
use crate::kafka::decode::{dead_letter, decode_round, take, Received};
use crate::kafka::health::KafkaHealth;
use crate::kafka::membership::{Membership, MEMBER_EXPIRY};
use crate::kafka::rebalance::GroupContext;
use crate::messages::{BatchOutcome, PartitionControl, Source};
use crate::router::ShardRouter;
use crate::telemetry::{KAFKA_PARTITION_PAUSES, KAFKA_PARTITION_RESUMES, KAFKA_REREADS};
use crate::Error;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group: String,
    pub topic: String,
    pub dead_letter_topic: String,
    /// Most messages gathered into one round of batches.
    pub batch_max: usize,
    /// How long to wait for more messages before dispatching a round.
    pub batch_linger: Duration,
    /// How soon the group notices a dead member and moves its partitions.
    pub session_timeout: Duration,
    /// How often owned partitions publish their changelog round (the most
    /// a new owner replays after a crash).
    pub changelog_interval: Duration,
}

impl KafkaConfig {
    pub fn source(&self) -> Source {
        Source::Kafka {
            id: self.position_key(),
        }
    }

    /// Under which name a shard's checkpoint keeps its offset in the topic.
    pub fn position_key(&self) -> String {
        format!("kafka:{}", self.topic)
    }
}

/// A running Kafka source.
pub struct KafkaSource {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    health: Arc<KafkaHealth>,
    writer: Arc<ChangelogWriter>,
    membership: Arc<Membership>,
}

/// A dispatched batch awaiting its shard's flush.
pub(crate) struct PendingAck {
    pub partition: i32,
    pub last_offset: i64,
    /// The ownership epoch the batch was sent with.
    pub epoch: u64,
    pub rx: oneshot::Receiver<Result<BatchOutcome, Error>>,
}

impl KafkaSource {
    /// Creates the changelog and membership topics if missing.
    pub async fn ensure_topics(config: &KafkaConfig, partitions: u16) -> Result<(), Error> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(|e| Error::Kafka(e.to_string()))?;
        let names: Vec<String> = StateStore::ALL
            .iter()
            .map(|s| changelog_topic(&config.topic, *s))
            .collect();
        let members = Membership::members_topic(&config.topic);
        let control = crate::kafka::control::control_topic(&config.topic);
        let mut topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, i32::from(partitions), TopicReplication::Fixed(1)))
            .collect();
        topics.push(NewTopic::new(&members, 1, TopicReplication::Fixed(1)));
        topics.push(NewTopic::new(&control, 1, TopicReplication::Fixed(1)));
        let topics: Vec<NewTopic<'_>> = topics
            .into_iter()
            .map(|t| {
                t.set("cleanup.policy", "compact")
                    // Compaction alone bounds these topics; brokers that
                    // want an explicit retention get "forever".
                    .set("retention.ms", "-1")
            })
            .collect();
        // The alert topic is an event stream, not state: plain retention.
        let alerts = crate::kafka::alert_topic::alerts_topic(&config.topic);
        let mut topics = topics;
        topics.push(NewTopic::new(
            &alerts,
            i32::from(partitions),
            TopicReplication::Fixed(1),
        ));
        let results = admin
            .create_topics(
                &topics,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| Error::Kafka(e.to_string()))?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::Kafka(format!("cannot create topic {name}: {code}")))
                }
            }
        }
        Ok(())
    }

    /// Subscribes and starts consuming on the current tokio runtime;
    /// `address` is this instance's advertised HTTP base URL.
    pub fn start(
        config: KafkaConfig,
        router: ShardRouter,
        store: Arc<Store>,
        address: String,
        validation: impl Fn() -> ValidationContext + Send + Sync + 'static,
    ) -> Result<KafkaSource, Error> {
        let kafka = |e: rdkafka::error::KafkaError| Error::Kafka(e.to_string());
        let health = Arc::new(KafkaHealth::new(
            wall_clock_ms(),
            crate::kafka::partitioning::PartitionCheck::new(
                router.partitioner(),
                router.partitions(),
            ),
        ));
        store.track_changes();
        // Static membership (KIP-345): restarted on the same data directory
        // after a crash, the instance rejoins as the member it was and gets
        // its partitions back at once, instead of after the broker expires
        // the dead member's session. A clean stop still leaves the group
        // (unsubscribe sends LeaveGroup), so its partitions move at once.
        let group_instance_id = format!("tally-{}", store.instance_id()?);
        tracing::info!(
            group_instance_id,
            "joining the consumer group as a static member"
        );
        let source_key = config.position_key();
        // Changelog and membership records: ordered, exactly once per
        // round attempt, and a delivery report always within the timeout.
        let control_producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("queue.buffering.max.messages", "1000000")
            .set("linger.ms", "5")
            .create()
            .map_err(kafka)?;
        let writer = Arc::new(ChangelogWriter::start(
            store.clone(),
            control_producer.clone(),
            &config.topic,
            source_key.clone(),
            config.changelog_interval,
        )?);
        let membership = Membership::start(
            &config.brokers,
            &config.topic,
            router.partitions(),
            address,
            control_producer,
        )?;
        let context = GroupContext {
            store,
            topic: config.topic.clone(),
            source_key,
            health: health.clone(),
            router: router.clone(),
            epochs: Arc::new(
                (0..router.partitions())
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            ),
            writer: writer.clone(),
            reader: ChangelogReader::new(&config.brokers, &config.topic, Duration::from_secs(10))?,
            membership: membership.clone(),
            revocations: AtomicU64::new(0),
            expected: Arc::new(
                (0..router.partitions())
                    .map(|_| AtomicI64::new(-1))
                    .collect(),
            ),
        };
        let mut consumer_config = ClientConfig::new();
        // librdkafka's own debug contexts (e.g. "cgrp,fetch") for operators.
        if let Ok(contexts) = std::env::var("TALLY_KAFKA_DEBUG") {
            consumer_config.set("debug", contexts);
        }
        let consumer: StreamConsumer<GroupContext> = consumer_config
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group)
            .set("group.instance.id", &group_instance_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", "range")
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().to_string(),
            )
            .set("statistics.interval.ms", "2000")
            // Large fetches: the engine wants batches, not messages.
            .set("max.partition.fetch.bytes", "8388608")
            .set("fetch.max.bytes", "67108864")
            .set("fetch.wait.max.ms", "50")
            // Bounded prefetch: when shards fall behind, the consumer stops
            // pulling and librdkafka stops fetching at this bound.
            .set("queued.max.messages.kbytes", "32768")
            // Keep retrying a lost broker quickly; consumption resumes by
            // itself when it returns.
            .set("reconnect.backoff.max.ms", "2000")
            .create_with_context(context)
            .map_err(kafka)?;
        consumer.subscribe(&[&config.topic]).map_err(kafka)?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(kafka)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(consume(
            config,
            consumer,
            producer,
            router,
            Arc::new(validation),
            stopped,
            health.clone(),
        ));
        Ok(KafkaSource {
            stop,
            task,
            health,
            writer,
            membership,
        })
    }

    pub fn health(&self) -> Arc<KafkaHealth> {
        self.health.clone()
    }

    /// Who owns which partition, for query forwarding.
    pub fn membership(&self) -> Arc<Membership> {
        self.membership.clone()
    }

    /// Stops consuming and hands the partitions over: each shard flushes,
    /// each partition publishes its last changelog round, and the instance
    /// leaves the membership. Call while the engine still runs.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let writer = self.writer.clone();
        let _ = tokio::task::spawn_blocking(move || writer.stop(Duration::from_secs(20))).await;
        let membership = self.membership.clone();
        let _ = tokio::task::spawn_blocking(move || membership.leave()).await;
    }
}

/// How soon a partition held at a record reads it again.
const HOLD_RETRY: Duration = Duration::from_secs(1);

type Validation = Arc<dyn Fn() -> ValidationContext + Send + Sync>;

/// Splits every partition's messages into its own queue, consumed by its
/// own task: partitions proceed in parallel on all cores, and a shard that
/// falls behind pauses only its partition. The main stream keeps serving
/// rebalances and errors.
async fn consume(
    config: KafkaConfig,
    consumer: StreamConsumer<GroupContext>,
    producer: FutureProducer,
    router: ShardRouter,
    validation: Validation,
    stopped: watch::Receiver<bool>,
    health: Arc<KafkaHealth>,
) {
    let consumer = Arc::new(consumer);
    let config = Arc::new(config);
    let mut tasks = Vec::new();
    for p in 0..router.partitions() {
        let Some(queue) = consumer.split_partition_queue(&config.topic, i32::from(p)) else {
            tracing::error!(partition = p, "cannot split partition queue");
            continue;
        };
        tasks.push(tokio::spawn(consume_partition(
            p,
            queue,
            consumer.clone(),
            config.clone(),
            producer.clone(),
            router.clone(),
            validation.clone(),
            stopped.clone(),
            health.clone(),
        )));
    }
    let mut main = consumer.stream();
    let mut stopped_main = stopped;
    let mut watchdog = tokio::time::interval(Duration::from_secs(5));
    let mut orphaned_since: Option<tokio::time::Instant> = None;
    // Longer than the session timeout: a dead member must have left the
    // group before a rejoin can give its partitions to someone else.
    let orphan_grace = config.session_timeout + MEMBER_EXPIRY;
    loop {
        tokio::select! {
            _ = stopped_main.changed() => break,
            _ = watchdog.tick() => {
                let orphaned = consumer.context().membership.orphaned();
                if orphaned.is_empty() {
                    orphaned_since = None;
                } else if orphaned_since.get_or_insert_with(tokio::time::Instant::now).elapsed() > orphan_grace {
                    // Some group coordinators (tansu 0.6) keep a dead
                    // member's assignment after expelling it; rejoining
                    // as a new member forces a fresh assignment.
                    tracing::warn!(?orphaned, "partitions without a live owner; rejoining the consumer group");
                    orphaned_since = None;
                    let (c, topic) = (consumer.clone(), config.topic.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        c.unsubscribe();
                        if let Err(e) = c.subscribe(&[&topic]) {
                            tracing::error!(error = %e, "cannot resubscribe");
                        }
                    })
                    .await;
                }
            }
            m = main.next() => match m {
                // Only partitions beyond the shards arrive here.
                Some(Ok(m)) => {
                    let reason = format!("topic partition {} has no shard (instance has {})", m.partition(), router.partitions());
                    // Beyond the shards nothing is committed: a failed
                    // write is read again after the next restart.
                    let _ = dead_letter(&config, &producer, m.partition(), m.offset(), m.key(), m.payload(), &reason).await;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
                None => break,
            },
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    // Hand over: flush and publish every owned partition before leaving
    // the group (blocking calls, off the async workers).
    let revocations = consumer.context().revocations.load(Ordering::SeqCst);
    let handing = consumer.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let context = handing.context();
        for p in context.membership.owned() {
            context.release(p);
        }
        context.membership.set_owned(Default::default());
        handing.unsubscribe();
    })
    .await;
    // A static member leaves the group only once the revocation that
    // unsubscribing causes is served (never on close): keep polling until
    // it is, so its partitions move at once rather than after the session
    // timeout.
    let deadline = tokio::time::Instant::now() + LEAVE_TIMEOUT;
    while consumer.context().revocations.load(Ordering::SeqCst) == revocations {
        match tokio::time::timeout_at(deadline, main.next()).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                tracing::warn!("the consumer group did not confirm the leave; partitions move after the session timeout");
                return;
            }
        }
    }
    // Let librdkafka send the LeaveGroup it queued.
    let _ = tokio::time::timeout(Duration::from_millis(500), main.next()).await;
}

/// How long a stopping source serves the group to leave it cleanly.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

#[allow(clippy::too_many_arguments)]
async fn consume_partition(
    partition: u16,
    queue: rdkafka::consumer::stream_consumer::StreamPartitionQueue<GroupContext>,
    consumer: Arc<StreamConsumer<GroupContext>>,
    config: Arc<KafkaConfig>,
    producer: FutureProducer,
    router: ShardRouter,
    validation: Validation,
    mut stopped: watch::Receiver<bool>,
    health: Arc<KafkaHealth>,
) {
    let source = config.source();
    let partitions = router.partitions();
    let mut stream = queue.stream();
    let mut pending: VecDeque<PendingAck> = VecDeque::new();
    let mut step_back = STEP_BACK;
    loop {
        let first = tokio::select! {
            _ = stopped.changed() => break,
            m = stream.next() => m,
            // Wake up to commit acknowledged offsets while idle.
            _ = tokio::time::sleep(Duration::from_millis(200)) => None,
        };
        let mut round: Vec<Received> = Vec::new();
        let epoch = consumer.context().epoch(partition);
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
                && !check_expected(&consumer, &config.topic, partition, first, &mut step_back)
            {
                continue;
            }
        }
        let round_end = round.last().map(|&(_, offset, _, _)| offset);
        let mut hold_from = None;
        if !round.is_empty() {
            let sent = async {
                let decoded = decode_round(
                    &config,
                    &source,
                    partitions,
                    health.partitioning(),
                    &producer,
                    validation.as_ref(),
                    round,
                )
                .await?;
                hold_from = decoded.hold_from;
                let (events, offsets) = (decoded.events, decoded.offsets);
                let Some(&last) = offsets.last() else {
                    return Ok::<(), Error>(());
                };
                if consumer.context().epoch(partition) != epoch {
                    // The partition moved while this round was read: drop
                    // it and read again from what the store now holds
                    // (not from a hold inside the dropped round, which
                    // would skip what came before it).
                    hold_from = None;
                    reposition(&consumer, &config.topic, partition);
                    return Ok(());
                }
                if !router.has_room(partition) {
                    // The shard is behind: stop fetching this partition only.
                    set_paused(&consumer, &config.topic, partition, true);
                    counter!(KAFKA_PARTITION_PAUSES).increment(1);
                    router.wait_for_room(partition).await;
                    set_paused(&consumer, &config.topic, partition, false);
                    // Resumed, the fetch starts after this round: it must
                    // not skip past that (see `check_expected`).
                    if let Some(end) = round_end {
                        consumer
                            .context()
                            .expect(partition, Offset::Offset(end + 1));
                    }
                }
                let rx = router
                    .send_positioned(partition, source.clone(), events, offsets, Some(epoch))
                    .await?;
                pending.push_back(PendingAck {
                    partition: i32::from(partition),
                    last_offset: i64::try_from(last).unwrap_or(i64::MAX),
                    epoch,
                    rx,
                });
                Ok(())
            };
            if let Err(e) = sent.await {
                tracing::error!(error = %e, partition, "kafka dispatch failed; reading again from the stored position");
                // Nothing of the round was applied: read it again (the
                // shard drops what it already has), and a hold inside it
                // must not move reading past the rest.
                hold_from = None;
                reposition(&consumer, &config.topic, partition);
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(HOLD_RETRY) => {}
                }
            }
        }
        let current = consumer.context().epoch(partition);
        if commit_acknowledged(&consumer, &config.topic, &mut pending, current) {
            // The shard lost applied-but-unflushed batches (a failed flush
            // restarted it) and refuses what follows them: read again from
            // what it stored, instead of fetching and dropping forever.
            resume_from_store(&consumer, &router, &config.topic, partition, current).await;
            continue;
        }
        if let Some(offset) = hold_from {
            // Read the held record again after a pause: nothing past it
            // is applied or committed meanwhile.
            match consumer.seek(
                &config.topic,
                i32::from(partition),
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                Ok(()) => consumer.context().expect(partition, Offset::Offset(offset)),
                Err(e) => tracing::debug!(partition, error = %e, "seek back to a held record"),
            }
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tokio::time::sleep(HOLD_RETRY) => {}
            }
        }
    }
    let current = consumer.context().epoch(partition);
    commit_acknowledged(&consumer, &config.topic, &mut pending, current);
}

async fn resume_from_store(
    consumer: &StreamConsumer<GroupContext>,
    router: &ShardRouter,
    topic: &str,
    partition: u16,
    from_epoch: u64,
) {
    // A rebalance in between reloads the shard and repositions by itself.
    let Some(epoch) = consumer.context().advance_epoch(partition, from_epoch) else {
        return;
    };
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
            reposition(consumer, topic, partition);
        }
        Err(e) => tracing::warn!(partition, error = %e, "cannot resume the partition's shard"),
    }
}

fn reposition(consumer: &StreamConsumer<GroupContext>, topic: &str, p: u16) {
    let offset = match consumer.context().resume_offset(p) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "cannot read the stored position");
            return;
        }
    };
    match consumer.seek(topic, i32::from(p), offset, Duration::from_secs(5)) {
        Ok(()) => {
            consumer.context().expect(p, offset);
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
const STEP_BACK: i64 = 1024;

/// Whether a round whose first record is at `first` may be dispatched.
///
/// After an assignment, a seek or a pause to offset X the next record read
/// must be at or before X. Some brokers (tansu 0.6's object-store engine) answer a
/// fetch from the middle of a record batch with the batches after it, which
/// would skip the rest of that batch silently. Then this seeks further back
/// (1,024 records, doubling) until the record at X is read again; what comes
/// before it is dropped by the shard, which keeps its position. A gap that
/// remains from offset 0 is real (deleted records) and is let through.
fn check_expected(
    consumer: &StreamConsumer<GroupContext>,
    topic: &str,
    partition: u16,
    first: i64,
    step_back: &mut i64,
) -> bool {
    let Some(expected) = consumer.context().expected.get(usize::from(partition)) else {
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
    counter!(KAFKA_REREADS).increment(1);
    *step_back = step_back.saturating_mul(2);
    if let Err(e) = consumer.seek(
        topic,
        i32::from(partition),
        Offset::Offset(from),
        Duration::from_secs(5),
    ) {
        tracing::debug!(partition, error = %e, "seek further back");
    }
    false
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
