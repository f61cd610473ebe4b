//! Kafka mode, in one place.
//!
//! - [`source`]: the consumer-group source: configuration, topics,
//!   start and stop.
//! - `group`: the main stream (rebalances, errors) on a thread of its own,
//!   and the hand-over and clean leave.
//! - `partition_task`: one task per partition of each topic (request
//!   events, telemetry points): offsets committed after the flush.
//! - `positioning`: where such a task reads from (the stored position,
//!   re-reads when a read went wrong).
//! - [`decode`]: records to shard batches; the partition check; dead
//!   letters with their reason and origin.
//! - [`partitioning`]: whether the producers use the configured
//!   partitioner, judged from the records.
//! - [`dead_letters`]: the dead-letter topic read back for operators.
//! - [`rebalance`]: what moves with a partition: flush and last changelog
//!   round on revocation, restore on assignment.
//! - [`changelog`]: changelog topics: publishing rounds, rebuilding.
//! - [`membership`]: who owns which partition, for query forwarding.
//! - [`control`]: configuration every instance shares (webhooks).
//! - [`alert_topic`]: the event channel produced to `<topic>.alerts`.
//! - [`alert_mirror`]: that topic read back into every instance, so the
//!   streams carry the whole cluster's events.
//! - [`health`]: broker connection, consumer lag and partitioning, for
//!   readiness.
//! - [`ingest`]: HTTP ingest through the topic.
//! - `log_end`: where a partition's log really ends (tansu 0.6 says less).

pub mod alert_mirror;
pub mod alert_topic;
pub mod changelog;
pub mod control;
pub mod dead_letters;
pub mod decode;
mod group;
pub mod health;
pub mod ingest;
mod log_end;
pub mod membership;
mod partition_task;
pub mod partitioning;
mod positioning;
pub mod rebalance;
pub mod source;
