//! Changelog topics: publishing the owned partitions' state in rounds, and
//! rebuilding a partition from them when this instance takes it over.
//!
//! One compacted topic per state store (`<topic>.changelog.stats`,
//! `.dedupe`, `.limits`, `.anomalies`, `.telemetry`), partitioned like the
//! request topic; the
//! rules that make a rebuild exact wherever a writer died are in
//! [`tally_state::changelog`]. The writer is a plain thread: a round holds
//! RocksDB snapshots from one round to the next, and the rebalance callback
//! (which must finish a revoked partition's last round before returning)
//! talks to it over a channel.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tally_state::changelog::{ChangelogMark, StateStore, STATE_STORES};
use tally_state::keys::changelog_marker_key;
use tally_state::restore::{Restore, Restored};
use tally_state::round::{Round, Swept};
use tally_state::snapshot::{ChangedKey, StoreSnapshot};
use tally_state::Store;

use crate::kafka::log_end::{log_bounds, EndReader, ReadsToEnd};
use crate::telemetry::{ChangelogRestored, ChangelogRoundPublished};
use crate::Error;

/// The changelog topic of `store` for the request topic `topic`.
pub fn changelog_topic(topic: &str, store: StateStore) -> String {
    format!("{topic}.changelog.{}", store.name())
}

fn index(store: StateStore) -> usize {
    store.index()
}

fn kafka(e: KafkaError) -> Error {
    Error::Changelog(e.to_string())
}

fn state(e: tally_state::Error) -> Error {
    Error::Changelog(e.to_string())
}

enum Command {
    Adopt {
        partition: u16,
        next_round: u64,
        ends: Option<[i64; STATE_STORES]>,
        unburied: Vec<ChangedKey>,
    },
    Release {
        partition: u16,
        done: mpsc::Sender<Result<(), Error>>,
    },
    Stop {
        done: mpsc::Sender<()>,
    },
}

/// Publishes the owned partitions' changes, one round per interval.
pub struct ChangelogWriter {
    commands: mpsc::Sender<Command>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl ChangelogWriter {
    pub fn start(
        store: Arc<Store>,
        producer: FutureProducer,
        topic: &str,
        source_key: String,
        interval: Duration,
    ) -> Result<ChangelogWriter, Error> {
        let (commands, rx) = mpsc::channel();
        let publisher = Publisher {
            producer,
            topics: StateStore::ALL.map(|s| changelog_topic(topic, s)),
            source_key,
        };
        let thread = std::thread::Builder::new()
            .name("tally-changelog".into())
            .spawn(move || publisher.run(&store, &rx, interval))
            .map_err(|e| Error::Startup(e.to_string()))?;
        Ok(ChangelogWriter {
            commands,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Starts publishing `partition`, whose state now equals the
    /// changelog's at round `next_round - 1`; `unburied` keys are absent
    /// but still need their tombstone.
    pub fn adopt(
        &self,
        partition: u16,
        next_round: u64,
        ends: Option<[i64; STATE_STORES]>,
        unburied: Vec<ChangedKey>,
    ) {
        let _ = self.commands.send(Command::Adopt {
            partition,
            next_round,
            ends,
            unburied,
        });
    }

    /// Publishes `partition`'s last round and stops publishing it.
    pub fn release(&self, partition: u16, timeout: Duration) -> Result<(), Error> {
        let (done, rx) = mpsc::channel();
        self.commands
            .send(Command::Release { partition, done })
            .map_err(|_| Error::Changelog("changelog writer stopped".into()))?;
        rx.recv_timeout(timeout).map_err(|_| {
            Error::Changelog(format!(
                "last round of partition {partition} not published within {timeout:?}"
            ))
        })?
    }

    /// Publishes a last round of every owned partition and stops.
    pub fn stop(&self, timeout: Duration) {
        let (done, rx) = mpsc::channel();
        if self.commands.send(Command::Stop { done }).is_ok() && rx.recv_timeout(timeout).is_err() {
            tracing::warn!("changelog writer did not finish its last rounds in time");
            return;
        }
        let thread = self.thread.lock().map(|mut t| t.take()).ok().flatten();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// A partition being published.
struct Owned<'s> {
    next_round: u64,
    /// The state at the last marker: the `before` of the next round.
    at_marker: StoreSnapshot<'s>,
    /// End offsets of the changelog partitions after the last marker.
    ends: Option<[i64; STATE_STORES]>,
    published: Option<tally_state::Checkpoint>,
    /// The clocks of the last sweeps for expired keys (`None`: the first
    /// round sweeps).
    swept: Swept,
    /// Keys a restore found absent without a tombstone.
    unburied: Vec<ChangedKey>,
}

struct Publisher {
    producer: FutureProducer,
    topics: [String; STATE_STORES],
    source_key: String,
}

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl Publisher {
    fn run(&self, store: &Store, commands: &mpsc::Receiver<Command>, interval: Duration) {
        let mut owned: BTreeMap<u16, Owned<'_>> = BTreeMap::new();
        let mut next_tick = Instant::now() + interval;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(Command::Adopt {
                    partition,
                    next_round,
                    ends,
                    unburied,
                }) => {
                    owned.insert(
                        partition,
                        Owned {
                            next_round,
                            at_marker: store.snapshot(),
                            ends,
                            published: None,
                            swept: Swept::default(),
                            unburied,
                        },
                    );
                }
                Ok(Command::Release { partition, done }) => {
                    let result = match owned.remove(&partition) {
                        Some(mut o) => self.publish(store, partition, &mut o),
                        None => Ok(()),
                    };
                    let _ = done.send(result);
                }
                Ok(Command::Stop { done }) => {
                    for (&p, o) in owned.iter_mut() {
                        if let Err(e) = self.publish(store, p, o) {
                            tracing::warn!(partition = p, error = %e, "last changelog round failed");
                        }
                    }
                    let _ = done.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    for (&p, o) in owned.iter_mut() {
                        if let Err(e) = self.publish(store, p, o) {
                            tracing::warn!(partition = p, error = %e, "changelog round failed; retrying next interval");
                        }
                    }
                    next_tick = Instant::now() + interval;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// One round of one partition: changed keys with their values before
    /// and after, the marker, then tombstones. On failure the keys go back
    /// to the changed set and the next attempt reuses the round number.
    fn publish<'s>(&self, store: &'s Store, p: u16, owned: &mut Owned<'s>) -> Result<(), Error> {
        let round = store
            .prepare_round(
                p,
                &owned.at_marker,
                owned.next_round,
                &self.source_key,
                owned.swept,
                &owned.unburied,
            )
            .map_err(state)?;
        if round.is_empty() && owned.published.as_ref() == Some(&round.checkpoint) {
            store.abandon_round(p, round);
            return Ok(());
        }
        let started = Instant::now();
        match self.send_round(p, owned, &round) {
            Ok(ends) => {
                store.round_delivered(p, &round);
                let mark = ChangelogMark {
                    round: owned.next_round,
                    checkpoint: round.checkpoint.clone(),
                    ends: Some(ends),
                };
                if let Err(e) = store.save_changelog_mark(p, &mark) {
                    // Only costs a full restore if this instance takes the
                    // partition again.
                    tracing::warn!(partition = p, error = %e, "cannot record changelog mark");
                }
                ChangelogRoundPublished {
                    partition: p,
                    records: round.changes.len(),
                    tombstones: round.tombstones.len(),
                    duration: started.elapsed(),
                }
                .emit();
                if round.swept_at.is_some() {
                    owned.swept.stats = round.swept_at;
                }
                if round.telemetry_swept_at.is_some() {
                    owned.swept.telemetry = round.telemetry_swept_at;
                }
                owned.unburied.clear();
                owned.next_round += 1;
                owned.ends = Some(ends);
                owned.published = Some(round.checkpoint.clone());
                owned.at_marker = round.snapshot;
                Ok(())
            }
            Err(e) => {
                store.abandon_round(p, round);
                Err(e)
            }
        }
    }

    fn send_round(
        &self,
        p: u16,
        owned: &Owned<'_>,
        round: &Round<'_>,
    ) -> Result<[i64; STATE_STORES], Error> {
        // Where each changelog partition ends after this round.
        let mut ends: [Option<i64>; STATE_STORES] = [None; STATE_STORES];
        let mut deliveries = Vec::with_capacity(round.changes.len());
        for (store, key, payload) in &round.changes {
            let topic = &self.topics[index(*store)];
            deliveries.push((*store, self.send(topic, p, key, Some(payload))?));
        }
        self.await_all(deliveries, &mut ends)?;
        let key = changelog_marker_key(p);
        let delivery = delivered(futures::executor::block_on(self.send(
            &self.topics[0],
            p,
            &key,
            Some(&round.marker),
        )?))?;
        ends[0] = Some(delivery.offset + 1);
        // Tombstones only after the marker: a round cut short must still
        // rebuild the previous marker's state, which needs the `before`s.
        let mut deliveries = Vec::with_capacity(round.tombstones.len());
        for (store, key) in &round.tombstones {
            let topic = &self.topics[index(*store)];
            deliveries.push((*store, self.send(topic, p, key, None)?));
        }
        self.await_all(deliveries, &mut ends)?;
        let mut out = [0; STATE_STORES];
        for (i, end) in ends.iter().enumerate() {
            out[i] = match (end, owned.ends) {
                (Some(end), _) => *end,
                (None, Some(previous)) => previous[i],
                (None, None) => {
                    self.producer
                        .client()
                        .fetch_watermarks(&self.topics[i], i32::from(p), Duration::from_secs(5))
                        .map_err(kafka)?
                        .1
                }
            };
        }
        Ok(out)
    }

    fn await_all(
        &self,
        deliveries: Vec<(StateStore, rdkafka::producer::DeliveryFuture)>,
        ends: &mut [Option<i64>; STATE_STORES],
    ) -> Result<(), Error> {
        let results = futures::executor::block_on(join_all(
            deliveries
                .into_iter()
                .map(|(s, d)| async move { (s, d.await) }),
        ));
        for (store, result) in results {
            let delivery = delivered(result)?;
            let end = &mut ends[index(store)];
            *end = (*end).max(Some(delivery.offset + 1));
        }
        Ok(())
    }

    /// Enqueues one record, waiting while the producer queue is full.
    /// `payload: None` is a tombstone.
    fn send(
        &self,
        topic: &str,
        p: u16,
        key: &[u8],
        payload: Option<&Vec<u8>>,
    ) -> Result<rdkafka::producer::DeliveryFuture, Error> {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        let mut record = FutureRecord::<[u8], Vec<u8>>::to(topic)
            .partition(i32::from(p))
            .key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        loop {
            match self.producer.send_result(record) {
                Ok(d) => return Ok(d),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if Instant::now() < deadline =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(kafka(e)),
            }
        }
    }
}

fn delivered(
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> Result<rdkafka::producer::future_producer::Delivery, Error> {
    match result {
        Ok(Ok(d)) => Ok(d),
        Ok(Err((e, _))) => Err(kafka(e)),
        Err(_) => Err(Error::Changelog("delivery cancelled".into())),
    }
}

/// Reads changelog partitions (no consumer group: plain assignment).
pub struct ChangelogReader {
    consumer: EndReader,
    topics: [String; STATE_STORES],
    /// How long a read may go without progress.
    timeout: Duration,
    /// How many bytes of undecided records a restore holds before it
    /// streams into the store.
    budget: usize,
}

impl ChangelogReader {
    pub fn new(
        brokers: &str,
        topic: &str,
        timeout: Duration,
        budget: usize,
    ) -> Result<ChangelogReader, Error> {
        let consumer: EndReader = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set(
                "group.id",
                format!("tally-changelog-reader-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            // The end of a read is the partition end event (see `log_end`).
            .set("enable.partition.eof", "true")
            .set("fetch.max.bytes", "67108864")
            .set("max.partition.fetch.bytes", "16777216")
            // A restore reads to a known end: never wait for more data.
            .set("fetch.wait.max.ms", "10")
            .create_with_context(ReadsToEnd)
            .map_err(kafka)?;
        Ok(ChangelogReader {
            consumer,
            topics: StateStore::ALL.map(|s| changelog_topic(topic, s)),
            timeout,
            budget,
        })
    }

    /// Current end offsets of the partition's changelogs.
    pub fn ends(&self, p: u16) -> Result<[i64; STATE_STORES], Error> {
        let mut ends = [0; STATE_STORES];
        for (i, topic) in self.topics.iter().enumerate() {
            ends[i] = log_bounds(&self.consumer, topic, i32::from(p), self.timeout)
                .map_err(kafka)?
                .1;
        }
        Ok(ends)
    }

    /// Restores `p` into `store` from its changelogs, read to their ends
    /// `ends`: everything, or with `from` (a mark this instance recorded,
    /// whose state the local one still is) only what was appended after
    /// it. A read fails when it makes no progress for the timeout, however
    /// long the whole read takes.
    pub fn restore(
        &self,
        store: &Store,
        p: u16,
        ends: [i64; STATE_STORES],
        from: Option<&ChangelogMark>,
    ) -> Result<Restored, Error> {
        let started = Instant::now();
        let (mut restore, starts) = match from.and_then(|m| m.ends.map(|e| (m, e))) {
            Some((mark, starts)) => (
                Restore::continuing(store, p, mark, self.budget),
                Some(starts),
            ),
            None => (Restore::replacing(store, p, self.budget), None),
        };
        for store_kind in StateStore::ALL {
            let i = index(store_kind);
            let topic = &self.topics[i];
            let low = match starts {
                Some(s) => s[i],
                None => {
                    self.consumer
                        .fetch_watermarks(topic, i32::from(p), self.timeout)
                        .map_err(kafka)?
                        .0
                }
            };
            let high = ends[i];
            if high <= low {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, i32::from(p), Offset::Offset(low))
                .map_err(kafka)?;
            self.consumer.assign(&tpl).map_err(kafka)?;
            let mut next = low;
            let mut progress = Instant::now();
            // To the partition end event, not just to `high`: records may
            // follow it (see `log_end`).
            let mut at_end = false;
            while next < high || !at_end {
                if progress.elapsed() > self.timeout {
                    let _ = self.consumer.unassign();
                    return Err(Error::Changelog(format!(
                        "reading {topic}[{p}] made no progress for {:?} at offset {next} of {high}",
                        self.timeout
                    )));
                }
                match self.consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(m)) => {
                        next = m.offset() + 1;
                        progress = Instant::now();
                        if let Some(key) = m.key() {
                            restore.apply(store_kind, key, m.payload()).map_err(state)?;
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => at_end = next >= high,
                    Some(Err(e)) => tracing::warn!(error = %e, topic, p, "changelog read error"),
                    None => {}
                }
            }
        }
        let _ = self.consumer.unassign();
        let restored = restore.finish(ends).map_err(state)?;
        ChangelogRestored {
            partition: p,
            records: restored.records,
            continued: starts.is_some(),
            streamed: restored.spilled,
            duration: started.elapsed(),
        }
        .emit();
        Ok(restored)
    }
}
