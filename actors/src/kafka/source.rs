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

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;
use tally_pipelines::event::ValidationContext;
use tally_state::changelog::StateStore;
use tally_state::retention::wall_clock_ms;
use tally_state::Store;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::kafka::changelog::{changelog_topic, ChangelogReader, ChangelogWriter};
use crate::kafka::health::KafkaHealth;
use crate::kafka::membership::Membership;
use crate::kafka::rebalance::GroupContext;
use crate::messages::{BatchOutcome, Source};
use crate::router::ShardRouter;
use crate::Error;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group: String,
    pub topic: String,
    /// Telemetry points, keyed by series; partitioned like `topic`, so
    /// the instance that owns partition N of one owns it of both.
    pub telemetry_topic: String,
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
    /// How many bytes of changelog records a restore holds in memory
    /// before it streams into the store (and the partition's local copy
    /// stops answering stale reads until it is done).
    pub restore_memory_bytes: usize,
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

    /// The topic a feed reads.
    pub fn topic_of(&self, feed: Feed) -> &str {
        match feed {
            Feed::Events => &self.topic,
            Feed::Points => &self.telemetry_topic,
        }
    }

    /// The feed that reads `topic`, if any.
    pub fn feed_of(&self, topic: &str) -> Option<Feed> {
        Feed::ALL.into_iter().find(|f| self.topic_of(*f) == topic)
    }

    /// The source (and position key) of a feed's batches.
    pub fn feed_source(&self, feed: Feed) -> Source {
        Source::Kafka {
            id: format!("kafka:{}", self.topic_of(feed)),
        }
    }
}

/// One topic read into the shards: request events, or telemetry points.
/// Both keep their own offset in the shard's checkpoint and move with
/// their partition number together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feed {
    Events,
    Points,
}

impl Feed {
    pub const ALL: [Feed; 2] = [Feed::Events, Feed::Points];

    pub fn index(self) -> usize {
        match self {
            Feed::Events => 0,
            Feed::Points => 1,
        }
    }
}

/// How many partitions `topic` has (`None`: it does not exist).
fn topic_partitions(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Option<usize>, Error> {
    // Every topic's metadata: asking for one by name may make a broker
    // with auto-creation create it, with its default partition count.
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| Error::Kafka(format!("metadata of {topic}: {e}")))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0))
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
        // The alert and billing topics are event streams, not state: plain
        // retention. So is the telemetry topic, partitioned like the
        // request topic (range assignment then gives partition N of both
        // to one instance).
        let alerts = crate::kafka::alert_topic::alerts_topic(&config.topic);
        let billing = crate::kafka::alert_topic::billing_topic(&config.topic);
        let request_partitions = topic_partitions(&admin, &config.topic)?;
        let mut topics = topics;
        if request_partitions.is_none() {
            tracing::warn!(topic = %config.topic, "the request topic does not exist yet; the telemetry topic gets {partitions} partitions");
        }
        topics.push(NewTopic::new(
            &config.telemetry_topic,
            i32::try_from(request_partitions.unwrap_or(usize::from(partitions)))
                .unwrap_or(i32::MAX),
            TopicReplication::Fixed(1),
        ));
        for stream in [&alerts, &billing] {
            topics.push(NewTopic::new(
                stream,
                i32::from(partitions),
                TopicReplication::Fixed(1),
            ));
        }
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
        // Co-partitioned or refused: a series and its partition's state
        // must be owned by the instance that owns the partition's requests.
        let telemetry_partitions = topic_partitions(&admin, &config.telemetry_topic)?;
        if let (Some(r), Some(t)) = (request_partitions, telemetry_partitions) {
            if r != t {
                return Err(Error::Kafka(format!(
                    "the telemetry topic {} has {t} partitions and the request topic {} has {r}: they must have as many (partition N of both is one shard's)",
                    config.telemetry_topic, config.topic
                )));
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
            topics: Feed::ALL.map(|f| config.topic_of(f).to_string()),
            source_keys: Feed::ALL.map(|f| {
                config
                    .feed_source(f)
                    .position_key()
                    .unwrap_or_default()
                    .to_string()
            }),
            health: health.clone(),
            router: router.clone(),
            epochs: Arc::new(
                (0..router.partitions())
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            ),
            writer: writer.clone(),
            reader: ChangelogReader::new(
                &config.brokers,
                &config.topic,
                Duration::from_secs(10),
                config.restore_memory_bytes,
            )?,
            membership: membership.clone(),
            revocations: AtomicU64::new(0),
            expected: (0..router.partitions())
                .map(|_| [AtomicI64::new(-1), AtomicI64::new(-1)])
                .collect(),
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
        consumer
            .subscribe(&[&config.topic, &config.telemetry_topic])
            .map_err(kafka)?;
        // Dead letters: a write that fails holds its partition and is tried
        // again, so it must fail within a bounded time (librdkafka's default
        // is five minutes).
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(kafka)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(crate::kafka::group::consume(
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
