//! RocksDB-backed state of Tally. This crate owns every byte on disk.
//!
//! - [`keys`]: column families and key encoding (partition first).
//! - [`codec`]: versioned value encoding.
//! - [`limits`]: rate-limit and quota configuration and state.
//! - [`retention`]: event-time retention and the partition clocks.
//! - [`commit`]: a shard's flush as one atomic WriteBatch.
//! - [`store`]: the RocksDB store: atomic flush commits (state deltas,
//!   dedupe claims, dead letters and positions in one WriteBatch), reads.
//! - [`snapshot`]: consistent snapshots, changed-key tracking and
//!   whole-partition replacement, for the changelog.
//! - [`sinks`]: webhook configurations and alert-sink cursors.
//! - [`top`]: per-period client totals for the top-consumer ranking.
//! - [`changelog`]: changelog records and the rule that rebuilds a
//!   partition from them.

pub mod changelog;
pub mod codec;
pub mod commit;
pub mod keys;
pub mod limits;
pub mod retention;
pub mod sinks;
pub mod snapshot;
pub mod store;
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
