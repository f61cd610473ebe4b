//! Messages between sources and shards. Every message carries a batch:
//! per-message overhead must not dominate at a million events per second.

use actix::Message;
use tally_pipelines::event::RequestEvent;
use tally_pipelines::telemetry::Point;
use tokio::sync::oneshot;

use crate::Error;

/// Where a batch came from: the label of its metrics, and for positioned
/// sources the key under which a shard stores how far it has applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `POST /v1/events`: durable on acknowledgement, no position.
    Http,
    /// A file replay; `id` identifies the file, positions are line numbers.
    Replay { id: String },
    /// A Kafka topic; positions are offsets of the shard's own partition.
    Kafka { id: String },
}

impl Source {
    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Replay { .. } => "replay",
            Source::Kafka { .. } => "kafka",
        }
    }

    pub fn position_key(&self) -> Option<&str> {
        match self {
            Source::Http => None,
            Source::Replay { id } | Source::Kafka { id } => Some(id),
        }
    }
}

/// What a shard did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub accepted: u64,
    pub duplicates: u64,
    pub late: u64,
    /// Points of new series refused: the partition holds as many series
    /// as it may.
    pub over_series_limit: u64,
    /// Events at or before the source position the shard had already
    /// applied (a resumed replay re-reading its last batch).
    pub already_applied: u64,
}

impl BatchOutcome {
    pub fn add(&mut self, other: &BatchOutcome) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.late += other.late;
        self.over_series_limit += other.over_series_limit;
        self.already_applied += other.already_applied;
    }
}

pub type Ack = oneshot::Sender<Result<BatchOutcome, Error>>;

/// How soon the sender needs the acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Flush as soon as the mailbox is drained (group commit): a client is
    /// waiting for its 202.
    FlushSoon,
    /// Acknowledge at the next regular flush.
    NextFlush,
}

/// What a batch carries: request events or telemetry points (a series
/// maps to a partition as a client does).
pub enum Items {
    Events(Vec<RequestEvent>),
    Points(Vec<Point>),
}

impl Items {
    pub fn len(&self) -> usize {
        match self {
            Items::Events(e) => e.len(),
            Items::Points(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Something a router places on a partition by its key.
pub trait Routable: Sized + Send + 'static {
    /// The key the partitioner hashes: a client id, a series.
    fn routing_key(&self) -> &str;
    fn into_items(batch: Vec<Self>) -> Items;
}

impl Routable for RequestEvent {
    fn routing_key(&self) -> &str {
        &self.client_id
    }

    fn into_items(batch: Vec<Self>) -> Items {
        Items::Events(batch)
    }
}

impl Routable for Point {
    fn routing_key(&self) -> &str {
        &self.series
    }

    fn into_items(batch: Vec<Self>) -> Items {
        Items::Points(batch)
    }
}

/// A batch of events or points for one partition, in source order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplyBatch {
    pub source: Source,
    pub events: Items,
    /// Source positions of `events`, ascending (positioned sources only).
    pub positions: Option<Vec<u64>>,
    /// Answered once the batch's effects are durable.
    pub ack: Option<(Ack, Urgency)>,
    /// For Kafka batches: the partition's ownership epoch the batch was
    /// fetched in; a shard refuses batches of any other epoch (fetched
    /// before a revocation, delivered after a takeover).
    pub epoch: Option<u64>,
}

/// Kafka moved a partition: the shard lets go of it or takes it.
#[derive(Message)]
#[rtype(result = "Result<(), crate::Error>")]
pub enum PartitionControl {
    /// Revoked: flush what was applied, then drop the hot state and refuse
    /// batches until adopted again.
    Release,
    /// Assigned: reload the hot state from the store (which a restore from
    /// the changelog may have rewritten while the shard was released), and
    /// accept batches of `epoch`.
    Adopt { epoch: u64 },
    /// The source read the stored position again after the shard lost
    /// applied-but-unflushed events in a restart: accept its batches again,
    /// tagged `epoch` (batches of `from_epoch`, fetched before, stay
    /// refused). Refused if the partition moved since `from_epoch`.
    Resume { from_epoch: u64, epoch: u64 },
}

/// Flush now and answer when durable. With a `source`, also fail if the
/// shard lost unflushed events of that source in a restart (the source must
/// then resume from the stored position).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushNow {
    pub source: Option<Source>,
    pub ack: oneshot::Sender<Result<(), Error>>,
}

/// Rate-limit and quota requests, answered from the client's shard's
/// limits (see [`crate::limits`] for why not through its mailbox).
pub enum LimitRequest {
    /// A gateway check (`consume`) or a status read.
    Check {
        client_id: String,
        endpoint: String,
        cost: u64,
        consume: bool,
        now_ms: i64,
    },
    SetConfig {
        client_id: String,
        config: Option<tally_pipelines::limit::policy::LimitConfig>,
    },
    ResetCounters {
        client_id: String,
        endpoint: Option<String>,
    },
    SetQuota {
        client_id: String,
        config: Option<tally_pipelines::quota::QuotaConfig>,
    },
    /// The quota configuration and status (reservations included).
    QuotaStatus { client_id: String, now_ms: i64 },
}

pub enum LimitReply {
    Check(crate::limits::CheckAnswer),
    Quota(
        Option<(
            tally_pipelines::quota::QuotaConfig,
            tally_pipelines::quota::QuotaStatus,
        )>,
    ),
    Done,
}
