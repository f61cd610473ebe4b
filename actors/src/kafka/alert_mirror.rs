//! The whole cluster's event channel at every instance: each instance
//! reads every partition of `<topic>.alerts` (its own consumer, no group)
//! into its store, where the streams read it. A stream's position is one
//! offset per topic partition, the same at every instance, so a
//! subscriber resumes with `Last-Event-ID` wherever it reconnects.
//!
//! The origin publishes its log at least once (a crash repeats its last
//! batch); the mirror keeps an event only if its sequence is above the
//! highest kept from that origin in that partition
//! ([`MirrorPosition::admit`]), and stores the events with the position
//! after them in one write, so it neither loses nor repeats across its own
//! restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_state::cluster_alerts::{MirrorPosition, Mirrored};
use tally_state::Store;
use tokio::sync::broadcast;

use crate::alerts::{AlertEvent, SEQUENCE_BITS, SUBSCRIBER_BUFFER};
use crate::kafka::alert_topic::alerts_topic;
use crate::kafka::source::KafkaConfig;
use crate::Error;

/// Records gathered into one store write.
const BATCH: usize = 500;

/// One event of the cluster's channel and where it sits in the topic.
#[derive(Debug, Clone)]
pub struct ClusterEvent {
    pub partition: u16,
    pub offset: u64,
    pub event: AlertEvent,
}

pub struct ClusterAlerts {
    store: Arc<Store>,
    partitions: u16,
    /// Per partition, the next offset to read (everything below is
    /// stored): where a stream that starts live begins.
    ends: Mutex<Vec<u64>>,
    live: broadcast::Sender<Arc<ClusterEvent>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for ClusterAlerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAlerts")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl ClusterAlerts {
    /// Starts mirroring the alert topic, which has `partitions`
    /// partitions, on a thread of its own.
    pub fn start(
        config: &KafkaConfig,
        partitions: u16,
        store: Arc<Store>,
    ) -> Result<Arc<ClusterAlerts>, Error> {
        let kafka = |e: rdkafka::error::KafkaError| Error::Kafka(e.to_string());
        let topic = alerts_topic(&config.topic);
        let mut position = store.mirror_position()?;
        position.next.resize(usize::from(partitions), 0);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set(
                "group.id",
                format!("tally-alert-mirror-{}", store.instance_id()?),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(kafka)?;
        let mut tpl = TopicPartitionList::new();
        for (p, next) in position.next.iter().enumerate() {
            let offset = match i64::try_from(*next) {
                Ok(0) | Err(_) => Offset::Beginning,
                Ok(o) => Offset::Offset(o),
            };
            let p = i32::try_from(p).map_err(|e| Error::Startup(e.to_string()))?;
            tpl.add_partition_offset(&topic, p, offset).map_err(kafka)?;
        }
        consumer.assign(&tpl).map_err(kafka)?;
        let (live, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        let mirror = Arc::new(ClusterAlerts {
            store,
            partitions,
            ends: Mutex::new(position.next.clone()),
            live,
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
        });
        let reader = Reader {
            mirror: mirror.clone(),
            consumer,
            topic,
            position,
            step_back: vec![0; usize::from(partitions)],
        };
        let thread = std::thread::Builder::new()
            .name("tally-alert-mirror".into())
            .spawn(move || reader.run())
            .map_err(|e| Error::Startup(format!("alert mirror: {e}")))?;
        *mirror.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(mirror)
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Where a stream that starts now begins: subscribe first, then read
    /// this, and nothing falls in between.
    pub fn ends(&self) -> Vec<u64> {
        self.ends.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ClusterEvent>> {
        self.live.subscribe()
    }

    /// Mirrored events of `partition` at or after `offset`, oldest first.
    pub fn from(
        &self,
        partition: u16,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<ClusterEvent>, Error> {
        Ok(self
            .store
            .mirrored_from(partition, offset, limit)?
            .into_iter()
            .filter_map(|m| cluster_event(m.partition, m.offset, m.json))
            .collect())
    }

    /// Stops mirroring and waits until the thread has let go of the store
    /// (which must close on the main thread).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

fn cluster_event(partition: u16, offset: u64, json: String) -> Option<ClusterEvent> {
    let mut event: AlertEvent = serde_json::from_str(&json).ok()?;
    event.json = Some(Arc::from(json));
    Some(ClusterEvent {
        partition,
        offset,
        event,
    })
}

struct Reader {
    mirror: Arc<ClusterAlerts>,
    consumer: BaseConsumer,
    topic: String,
    position: MirrorPosition,
    /// Per partition: 0 once reading is where it should be; otherwise how
    /// far the last seek went back (see `in_place`).
    step_back: Vec<u64>,
}

impl Reader {
    fn run(mut self) {
        let mut started = vec![false; usize::from(self.mirror.partitions)];
        while !self.mirror.stop.load(Ordering::Relaxed) {
            let mut kept: Vec<Mirrored> = Vec::new();
            let mut events = Vec::new();
            let mut read = 0;
            let mut wait = Duration::from_millis(200);
            while read < BATCH {
                let Some(m) = self.consumer.poll(wait) else {
                    break;
                };
                wait = Duration::ZERO;
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "alert topic read error");
                        break;
                    }
                };
                read += 1;
                let (Ok(p), Ok(offset)) = (u16::try_from(m.partition()), u64::try_from(m.offset()))
                else {
                    continue;
                };
                let Some(next) = self.position.next.get(usize::from(p)).copied() else {
                    continue;
                };
                if !started[usize::from(p)] {
                    let Some(step) = self.step_back.get_mut(usize::from(p)) else {
                        continue;
                    };
                    if !in_place(&self.consumer, &self.topic, step, p, offset, next) {
                        continue;
                    }
                    started[usize::from(p)] = true;
                }
                if offset < next {
                    // Read again after a seek back: kept already.
                    continue;
                }
                if let Some(n) = self.position.next.get_mut(usize::from(p)) {
                    *n = offset + 1;
                }
                let Some(json) = m.payload().and_then(|b| std::str::from_utf8(b).ok()) else {
                    tracing::warn!(
                        partition = p,
                        offset,
                        "alert topic record is not UTF-8; skipped"
                    );
                    continue;
                };
                let Some(event) = cluster_event(p, offset, json.to_string()) else {
                    tracing::warn!(
                        partition = p,
                        offset,
                        "alert topic record is not an event; skipped"
                    );
                    continue;
                };
                if !self.position.admit(p, event.event.event_id, SEQUENCE_BITS) {
                    // An origin's repeat after its crash.
                    continue;
                }
                kept.push(Mirrored {
                    partition: p,
                    offset,
                    json: json.to_string(),
                });
                events.push(event);
            }
            if read == 0 {
                continue;
            }
            let logged_at = self.mirror.store.clock().now_ms();
            if let Err(e) = self
                .mirror
                .store
                .append_mirrored(&kept, &self.position, logged_at)
            {
                // Read again from what is stored.
                tracing::error!(error = %e, "cannot store mirrored alert events; reading them again");
                self.reread();
                started.iter_mut().for_each(|s| *s = false);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            *self.mirror.ends.lock().unwrap_or_else(|e| e.into_inner()) =
                self.position.next.clone();
            for e in events {
                let _ = self.mirror.live.send(Arc::new(e));
            }
        }
    }

    /// After a failed write: back to the stored position.
    fn reread(&mut self) {
        match self.mirror.store.mirror_position() {
            Ok(mut stored) => {
                stored.next.resize(self.position.next.len(), 0);
                self.position = stored;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the alert mirror position");
                return;
            }
        }
        for (p, next) in self.position.next.iter().enumerate() {
            let (Ok(p), Ok(o)) = (i32::try_from(p), i64::try_from(*next)) else {
                continue;
            };
            let _ = self
                .consumer
                .seek(&self.topic, p, Offset::Offset(o), Duration::from_secs(5));
        }
    }
}

/// Whether the first record read from `partition`, at `offset`, is at
/// or before `next`, the one wanted. Some brokers (tansu 0.6) answer a
/// fetch from the middle of a record batch with the batches after it;
/// then this seeks further back (doubling) until the wanted record
/// comes again, or accepts the gap once offset 0 was asked for.
fn in_place(
    consumer: &BaseConsumer,
    topic: &str,
    step: &mut u64,
    partition: u16,
    offset: u64,
    next: u64,
) -> bool {
    if offset <= next || (*step > 0 && next <= *step) {
        *step = 0;
        return true;
    }
    *step = if *step == 0 {
        64
    } else {
        step.saturating_mul(2)
    };
    let from = next.saturating_sub(*step);
    tracing::debug!(
        partition,
        offset,
        next,
        from,
        "alert topic answered past the offset asked for; reading from further back"
    );
    let from = i64::try_from(from).unwrap_or(0);
    if let Err(e) = consumer.seek(
        topic,
        i32::from(partition),
        Offset::Offset(from),
        Duration::from_secs(5),
    ) {
        tracing::debug!(partition, error = %e, "alert mirror seek");
    }
    false
}
