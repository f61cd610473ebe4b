//! The consumer group's side of the Kafka source: the per-partition tasks
//! are started here, and the main stream (rebalances, errors, messages of
//! partitions beyond the shards) is served on a thread of its own, as is
//! the hand-over and clean leave when the source stops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::Message;
use tally_pipelines::event::RequestEvent;
use tally_pipelines::telemetry::Point;
use tokio::sync::{oneshot, watch};

use crate::kafka::decode::dead_letter;
use crate::kafka::health::KafkaHealth;
use crate::kafka::membership::MEMBER_EXPIRY;
use crate::kafka::partition_task::{PartitionReader, Validation};
use crate::kafka::rebalance::GroupContext;
use crate::kafka::source::{Feed, KafkaConfig};
use crate::router::ShardRouter;

/// Splits every partition's messages (of each feed's topic) into its own
/// queue, consumed by its own task: partitions proceed in parallel on all cores, and a shard that
/// falls behind pauses only its partition. The main stream, which serves
/// rebalances and errors, is polled on a thread of its own: a rebalance
/// blocks while shards flush, changelogs are read into the store and last
/// rounds are published, and none of that may hold up an async worker
/// that checks and queries need.
pub(crate) async fn consume(
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
    for feed in Feed::ALL {
        for p in 0..router.partitions() {
            let topic = config.topic_of(feed);
            let Some(queue) = consumer.split_partition_queue(topic, i32::from(p)) else {
                tracing::error!(topic, partition = p, "cannot split partition queue");
                continue;
            };
            let reader = PartitionReader {
                feed,
                partition: p,
                queue,
                consumer: consumer.clone(),
                config: config.clone(),
                producer: producer.clone(),
                router: router.clone(),
                validation: validation.clone(),
                stopped: stopped.clone(),
                health: health.clone(),
            };
            tasks.push(match feed {
                Feed::Events => tokio::spawn(reader.consume::<RequestEvent>()),
                Feed::Points => tokio::spawn(reader.consume::<Point>()),
            });
        }
    }
    let (done, finished) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("tally-kafka-group".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(serve_group(
                    consumer, config, producer, router, stopped, tasks,
                )),
                Err(e) => tracing::error!(error = %e, "cannot start the consumer group thread"),
            }
            let _ = done.send(());
        });
    match thread {
        Ok(_) => {
            let _ = finished.await;
        }
        Err(e) => tracing::error!(error = %e, "cannot start the consumer group thread"),
    }
}

/// The group's side of the consumer, on its own thread: rebalances, errors,
/// messages of partitions without a shard, the orphan watchdog, and the
/// hand-over and clean leave at the end.
async fn serve_group(
    consumer: Arc<StreamConsumer<GroupContext>>,
    config: Arc<KafkaConfig>,
    producer: FutureProducer,
    router: ShardRouter,
    stopped: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
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
                    consumer.unsubscribe();
                    if let Err(e) = consumer.subscribe(&[&config.topic, &config.telemetry_topic]) {
                        tracing::error!(error = %e, "cannot resubscribe");
                    }
                }
            }
            m = main.next() => match m {
                // Only partitions beyond the shards arrive here.
                Some(Ok(m)) => {
                    let reason = format!("topic partition {} has no shard (instance has {})", m.partition(), router.partitions());
                    // Beyond the shards nothing is committed: a failed
                    // write is read again after the next restart.
                    let _ = dead_letter(&config, m.topic(), &producer, m.partition(), m.offset(), m.key(), m.payload(), &reason).await;
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
    // the group (blocking, on this thread of its own).
    let revocations = consumer.context().revocations.load(Ordering::SeqCst);
    let context = consumer.context();
    for p in context.membership.owned() {
        context.release(p);
    }
    context.membership.set_owned(Default::default());
    consumer.unsubscribe();
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
