//! Concurrency of Tally: who holds which state and who talks to whom.
//!
//! - [`shard`]: the shard actor, sole owner of one partition's hot state,
//!   flushing it atomically with source positions; supervised.
//! - [`kafka`]: everything that talks to Kafka: the consumer-group
//!   source, decoding and dead letters, rebalancing, changelogs,
//!   membership, the control and alert topics, health, HTTP ingest.
//! - [`limits`]: a shard's rate limiters and quotas; the gateway check.
//! - [`anomaly`]: closing a shard's minutes and judging them.
//! - [`top`]: a shard's incremental top-consumer ranking.
//! - [`alerts`]: the event channel: persisted log and live broadcast.
//! - [`adaptive`]: tightening every limit under pressure (hysteresis).
//! - [`router`]: partitioning, admission and back-pressure.
//! - [`engine`]: starts the actor system and the supervised shards.
//! - [`status`]: mailbox depth and health a shard shares.
//! - [`messages`]: batches and acknowledgements.
//! - [`telemetry`]: metric names and typed internal events.

pub mod adaptive;
pub mod alerts;
pub mod anomaly;
pub mod engine;
pub mod kafka;
pub mod limits;
pub mod messages;
pub mod router;
pub mod shard;
pub mod status;
pub mod telemetry;
pub mod top;

pub use engine::Engine;
pub use messages::{BatchOutcome, Source};
pub use router::ShardRouter;
pub use shard::ShardConfig;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("shard {shard} is behind; retry later")]
    Overloaded { shard: u16 },
    #[error("shard {shard} is unavailable")]
    ShardUnavailable { shard: u16 },
    #[error("shard {shard} restarted before the batch was durable; retry")]
    ShardRestarted { shard: u16 },
    #[error("shard {shard} lost unflushed events of this source in a restart; resume from the stored position")]
    SourceGap { shard: u16 },
    #[error("no partition {0}")]
    NoSuchPartition(u16),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot start the engine: {0}")]
    Startup(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("shard {shard} no longer owns this batch's partition epoch")]
    StaleEpoch { shard: u16 },
    #[error("changelog: {0}")]
    Changelog(String),
    #[error("shard {shard} stopped: {reason}")]
    ShardFailed { shard: u16, reason: String },
    #[error("corrupt state: {0}")]
    Corrupt(String),
    /// Internal: a limits request met state that is not in memory.
    #[error("not loaded: {0}")]
    NotLoaded(String),
}

impl From<tally_state::Error> for Error {
    fn from(e: tally_state::Error) -> Self {
        if e.is_corruption() {
            Error::Corrupt(e.to_string())
        } else {
            Error::Storage(e.to_string())
        }
    }
}
