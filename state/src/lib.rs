//! RocksDB-backed state of Tally. This crate owns every byte on disk.
//!
//! - [`engine`]: the narrow key-value boundary; RocksDB behind it, and a
//!   fault-injecting decorator for tests.
//! - [`clock`]: the injected wall clock.
//! - [`keys`]: column families and key encoding (partition first).
//! - [`codec`]: versioned value encoding.
//! - [`merge`]: the `stats` merge operators (undecodable values are kept,
//!   poisoned, never emptied).
//! - [`limits`]: rate-limit and quota configuration and state.
//! - [`retention`]: event-time retention and the partition clocks.
//! - [`commit`]: a shard's flush as one atomic WriteBatch.
//! - [`store`]: the RocksDB store: atomic flush commits (state deltas,
//!   dedupe claims, dead letters and positions in one WriteBatch), reads.
//! - [`snapshot`]: consistent snapshots and changed-key tracking, for the
//!   changelog.
//! - [`sinks`]: webhook configurations and alert-sink cursors.
//! - [`alerts`]: the persisted alert log.
//! - [`cluster_alerts`]: the cluster's alert topic, mirrored.
//! - [`anomalies`]: stored anomalies.
//! - [`top`]: per-period client totals for the top-consumer ranking.
//! - [`changelog`]: changelog records and the rule that rebuilds a
//!   partition from them.
//! - [`round`]: what one changelog round publishes, tombstones included.
//! - [`restore`]: a partition restored from its changelog, streamed into
//!   the store past a memory budget.

pub mod alerts;
pub mod anomalies;
pub mod audit;
pub mod changelog;
pub mod clients;
pub mod clock;
pub mod cluster_alerts;
pub mod codec;
pub mod commit;
pub mod control_log;
pub mod engine;
pub mod keys;
pub mod limits;
pub mod merge;
pub mod restore;
pub mod retention;
pub mod round;
pub mod sinks;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod top;

pub use retention::Retention;
pub use store::{Checkpoint, CommitStats, DeadLetterRecord, Store, StoreOptions};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Storage(String),
    #[error("encoding: {0}")]
    Codec(String),
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("invalid store options: {0}")]
    InvalidOptions(String),
    #[error("the data directory was created with {stored} partitions, but {configured} are configured; use --partitions {stored} or a new data directory")]
    PartitionMismatch { stored: u16, configured: u16 },
    #[error("the data directory lays clients out by the {stored} partitioner, but {configured} is configured; use --partitioner {stored} or a new data directory")]
    PartitionerMismatch {
        stored: tally_pipelines::partitioner::Partitioner,
        configured: tally_pipelines::partitioner::Partitioner,
    },
    #[error("the data directory was written in storage format {found}, and this Tally reads format {supported} only (format 2 de-duplicates by client and event id, format 1 by event id alone, so format-1 state would be misread); start with a new --data-dir and replay the events into it, or run the Tally that wrote it")]
    UnsupportedFormat { found: u32, supported: u32 },
}

impl Error {
    /// Stored state that cannot be read as what it should be (as opposed
    /// to an I/O failure that a retry may cure).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt(_) | Error::Codec(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
