//! Routes events to the shard that owns their partition and applies
//! back-pressure: replay waits for mailbox room, HTTP ingest is refused
//! (503) when any shard it needs is at capacity, all-or-nothing, so a
//! refused request changed nothing and can simply be retried.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::Recipient;
use futures::future::join_all;
use tally_pipelines::event::RequestEvent;
use tally_pipelines::partitioner::Partitioner;
use tally_state::Store;
use tokio::sync::oneshot;

use crate::limits::{load, lock, Prepared, SharedLimits};
use crate::messages::{
    ApplyBatch, BatchOutcome, FlushNow, LimitReply, LimitRequest, PartitionControl, Routable,
    Source, Urgency,
};
use crate::status::{ShardHealth, ShardStatus};
use crate::telemetry::IngestOverloaded;
use crate::Error;

pub struct ShardEndpoint {
    pub apply: Recipient<ApplyBatch>,
    pub flush: Recipient<FlushNow>,
    pub control: Recipient<PartitionControl>,
    pub limits: SharedLimits,
    pub top: crate::top::SharedTop,
    pub status: Arc<ShardStatus>,
    /// Orders configuration writes of the shard's clients (store first,
    /// then memory) without holding the limits lock over the write.
    pub config_writes: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
pub struct ShardRouter {
    shards: Arc<Vec<ShardEndpoint>>,
    capacity: usize,
    partitioner: Partitioner,
}

/// What a durable ingest did: the outcome of the partitions that applied
/// their part, and the partitions that applied nothing (with why).
#[derive(Debug, Default)]
pub struct Ingested {
    pub outcome: BatchOutcome,
    pub failed: Vec<FailedPart>,
}

/// A partition that applied none of its part of an ingest.
#[derive(Debug)]
pub struct FailedPart {
    pub partition: u16,
    pub error: Error,
    /// Positions, in the ingested vector, of the events it held.
    pub positions: Vec<usize>,
}

/// Events (or points) split by partition, keeping source order within
/// each.
pub struct Routed<T = RequestEvent> {
    pub per_partition: Vec<(u16, Vec<T>, Vec<u64>)>,
}

impl ShardRouter {
    pub fn new(shards: Vec<ShardEndpoint>, capacity: usize, partitioner: Partitioner) -> Self {
        Self {
            shards: Arc::new(shards),
            capacity,
            partitioner,
        }
    }

    /// The function that places clients on partitions (the Kafka topic's).
    pub fn partitioner(&self) -> Partitioner {
        self.partitioner
    }

    pub fn partitions(&self) -> u16 {
        self.shards.len() as u16
    }

    pub fn partition_of(&self, client_id: &str) -> u16 {
        self.partitioner.partition(client_id, self.partitions())
    }

    /// Splits events or points (with their positions) by partition.
    pub fn split<T: Routable>(&self, events: Vec<T>, positions: Option<Vec<u64>>) -> Routed<T> {
        let n = self.shards.len();
        let mut buckets: Vec<(Vec<T>, Vec<u64>)> =
            (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        let mut positions = positions.map(Vec::into_iter);
        for event in events {
            let p = usize::from(self.partition_of(event.routing_key()));
            if let Some(pos) = positions.as_mut().and_then(Iterator::next) {
                buckets[p].1.push(pos);
            }
            buckets[p].0.push(event);
        }
        Routed {
            per_partition: buckets
                .into_iter()
                .enumerate()
                .filter(|(_, (e, _))| !e.is_empty())
                .map(|(p, (e, pos))| (p as u16, e, pos))
                .collect(),
        }
    }

    /// The top-consumer index of a partition's shard.
    pub fn top(&self, partition: u16) -> Result<&crate::top::SharedTop, Error> {
        Ok(&self.shard(partition)?.top)
    }

    fn shard(&self, partition: u16) -> Result<&ShardEndpoint, Error> {
        self.shards
            .get(usize::from(partition))
            .ok_or(Error::NoSuchPartition(partition))
    }

    /// Ingests events and answers once their effects are durable. Refuses
    /// the whole batch with [`Error::Overloaded`] if any shard it needs has
    /// a full mailbox (then nothing was applied). Otherwise every shard
    /// applies its part or fails it whole (a failed flush is never partly
    /// durable), and the answer says which partitions failed.
    pub async fn ingest_durable_parts<T: Routable>(
        &self,
        events: Vec<T>,
        source: Source,
    ) -> Result<Ingested, Error> {
        // Each event's position in `events`, to say which ones a failed
        // partition held.
        let positions = (0..events.len() as u64).collect();
        let routed = self.split(events, Some(positions));
        // Reserve mailbox room on every shard first; release on refusal.
        let mut reserved = Vec::with_capacity(routed.per_partition.len());
        for (p, _, _) in &routed.per_partition {
            let shard = self.shard(*p)?;
            let before = shard.status.queued.fetch_add(1, Ordering::Relaxed);
            reserved.push(*p);
            if before >= self.capacity {
                IngestOverloaded { shard: *p }.emit();
                for r in reserved {
                    self.shard(r)?.status.queued.fetch_sub(1, Ordering::Relaxed);
                }
                return Err(Error::Overloaded { shard: *p });
            }
        }
        let mut acks = Vec::with_capacity(routed.per_partition.len());
        for (p, events, held) in routed.per_partition {
            let (tx, rx) = oneshot::channel();
            let msg = ApplyBatch {
                source: source.clone(),
                events: T::into_items(events),
                positions: None,
                ack: Some((tx, Urgency::FlushSoon)),
                epoch: None,
            };
            // Room was reserved above; `do_send` does not wait for the shard
            // to handle the batch, so every shard works on it in parallel. A
            // dead shard drops the ack, which the receiver reports.
            self.shard(p)?.apply.do_send(msg);
            acks.push((p, held, rx));
        }
        let mut ingested = Ingested::default();
        for (p, held, rx) in acks {
            match rx.await.map_err(|_| Error::ShardUnavailable { shard: p }) {
                Ok(Ok(outcome)) => ingested.outcome.add(&outcome),
                Ok(Err(e)) | Err(e) => ingested.failed.push(FailedPart {
                    partition: p,
                    error: e,
                    positions: held.into_iter().map(|i| i as usize).collect(),
                }),
            }
        }
        Ok(ingested)
    }

    /// [`ShardRouter::ingest_durable_parts`] for callers that need all or
    /// an error (tools, tests): the first failure is the error.
    pub async fn ingest_durable<T: Routable>(
        &self,
        events: Vec<T>,
        source: Source,
    ) -> Result<BatchOutcome, Error> {
        let mut ingested = self.ingest_durable_parts(events, source).await?;
        match ingested.failed.pop() {
            Some(part) => Err(part.error),
            None => Ok(ingested.outcome),
        }
    }

    /// Sends one partition's batch, waiting for mailbox room (back-pressure
    /// for sources that can wait, such as a file replay). The returned
    /// receiver answers at the shard's next flush. Kafka batches carry the
    /// partition's ownership `epoch`.
    pub async fn send_positioned(
        &self,
        partition: u16,
        source: Source,
        events: Vec<impl Routable>,
        positions: Vec<u64>,
        epoch: Option<u64>,
    ) -> Result<oneshot::Receiver<Result<BatchOutcome, Error>>, Error> {
        let shard = self.shard(partition)?;
        shard.status.wait_for_room(self.capacity).await;
        let (tx, rx) = oneshot::channel();
        shard.status.queued.fetch_add(1, Ordering::Relaxed);
        let msg = ApplyBatch {
            source,
            events: Routable::into_items(events),
            positions: Some(positions),
            ack: Some((tx, Urgency::NextFlush)),
            epoch,
        };
        // Not `send`, which would wait until the shard has handled the
        // batch and serialize the shards behind this one sender.
        shard.apply.do_send(msg);
        Ok(rx)
    }

    /// Flushes every shard and waits until all are durable.
    pub async fn flush_all(&self, source: Option<Source>) -> Result<(), Error> {
        let results = join_all(self.shards.iter().enumerate().map(|(p, shard)| {
            let source = source.clone();
            async move {
                let (tx, rx) = oneshot::channel();
                let p = p as u16;
                shard
                    .flush
                    .send(FlushNow { source, ack: tx })
                    .await
                    .map_err(|_| Error::ShardUnavailable { shard: p })?;
                rx.await.map_err(|_| Error::ShardUnavailable { shard: p })?
            }
        }))
        .await;
        results.into_iter().collect()
    }

    /// Tells the shard of `partition` that Kafka moved it; answers once the
    /// shard has let go of it (flushed) or taken it (restored, reloaded).
    pub async fn control(&self, partition: u16, control: PartitionControl) -> Result<(), Error> {
        self.shard(partition)?
            .control
            .send(control)
            .await
            .map_err(|_| Error::ShardUnavailable { shard: partition })?
    }

    /// A rate-limit or quota request, answered from the client's shard's
    /// limits. The lock is held for the decision only: what is not in
    /// memory is read from `store` first, without it and off the async
    /// workers (see [`crate::limits`]); configuration is written to the
    /// store before memory changes.
    pub async fn limits(
        &self,
        store: &Arc<Store>,
        client_id: &str,
        request: LimitRequest,
    ) -> Result<LimitReply, Error> {
        let partition = self.partition_of(client_id);
        let shard = self.shard(partition)?;
        if let Some(reason) = shard.status.stopped() {
            return Err(Error::ShardFailed {
                shard: partition,
                reason,
            });
        }
        let _config_guard = match &request {
            LimitRequest::SetConfig { .. } | LimitRequest::SetQuota { .. } => {
                let guard = shard.config_writes.clone().lock_owned().await;
                let (store, request_copy) = (store.clone(), ConfigWrite::of(&request));
                blocking(move || request_copy.write(&store, partition)).await?;
                Some(guard)
            }
            _ => None,
        };
        // A flush between a read and its install discards the read; a few
        // rounds always suffice in practice (flushes are a second apart).
        for _ in 0..16 {
            let (needs, generation) = {
                let mut limits = lock(&shard.limits);
                match limits.prepare(&request) {
                    Prepared::Ready => return limits.handle(request),
                    Prepared::Needs(needs) => (needs, limits.generation()),
                }
            };
            // A limiter's load is two point reads (bloom-filtered, mostly
            // memtable or block cache): cheaper in place than the blocking
            // pool's two thread hops, which cost a quarter of the check
            // rate when clients are cold (measured). A quota's usage is a
            // range read over the period: on the blocking pool.
            let loaded = if needs.quota_usage.is_none() {
                load(store, partition, &needs)?
            } else {
                let store = store.clone();
                blocking(move || load(&store, partition, &needs)).await?
            };
            lock(&shard.limits).install(loaded, generation);
        }
        Err(Error::Overloaded { shard: partition })
    }

    /// A reader found the stored state of `partition` corrupt: its shard
    /// stops (applies and writes nothing) and readiness says why.
    pub fn stop_shard(&self, partition: u16, reason: &str) {
        if let Ok(shard) = self.shard(partition) {
            shard
                .status
                .set_fatal(&format!("partition {partition}: {reason}"));
        }
    }

    /// Utilization of the fullest shard mailbox, in 0..=1.
    pub fn mailbox_utilization(&self) -> f64 {
        let fullest = self
            .shards
            .iter()
            .map(|s| s.status.queued.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (fullest as f64 / self.capacity.max(1) as f64).min(1.0)
    }

    /// Whether the shard of `partition` can take a batch without waiting.
    pub fn has_room(&self, partition: u16) -> bool {
        self.shard(partition)
            .map(|s| s.status.queued.load(Ordering::Relaxed) < self.capacity)
            .unwrap_or(false)
    }

    /// Waits until the shard of `partition` can take a batch.
    pub async fn wait_for_room(&self, partition: u16) {
        if let Ok(shard) = self.shard(partition) {
            shard.status.wait_for_room(self.capacity).await;
        }
    }

    /// Messages waiting per shard.
    pub fn mailbox_depths(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.status.queued.load(Ordering::Relaxed))
            .collect()
    }

    /// Health of every shard, by partition.
    pub fn health(&self) -> Vec<ShardHealth> {
        self.shards.iter().map(|s| s.status.snapshot()).collect()
    }
}

/// Runs store I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Storage(format!("store task failed: {e}")))?
}

/// A configuration change to write before it is applied in memory.
enum ConfigWrite {
    Limits(String, Option<tally_pipelines::limit::policy::LimitConfig>),
    Quota(String, Option<tally_pipelines::quota::QuotaConfig>),
    None,
}

impl ConfigWrite {
    fn of(request: &LimitRequest) -> Self {
        match request {
            LimitRequest::SetConfig { client_id, config } => {
                ConfigWrite::Limits(client_id.clone(), config.clone())
            }
            LimitRequest::SetQuota { client_id, config } => {
                ConfigWrite::Quota(client_id.clone(), config.clone())
            }
            _ => ConfigWrite::None,
        }
    }

    fn write(self, store: &Store, partition: u16) -> Result<(), Error> {
        match self {
            ConfigWrite::Limits(client, config) => {
                store.put_limit_config(partition, &client, config.as_ref())?
            }
            ConfigWrite::Quota(client, config) => {
                store.put_quota_config(partition, &client, config.as_ref())?
            }
            ConfigWrite::None => {}
        }
        Ok(())
    }
}
