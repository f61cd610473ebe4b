//! Pure stream logic of Tally: no I/O, no clocks, no actors.
//!
//! - [`event`]: the request event, its wire form and validation reasons.
//! - [`decode`]: request bodies (JSON, NDJSON, CloudEvents) into events.
//! - [`partitioner`]: Kafka's default partitioner, so every source agrees
//!   on a client's partition.
//! - [`sketch`]: the sparse, mergeable latency sketch (≤ 0.5 % error).
//! - [`circuit`]: the per-endpoint delivery circuit breaker and backoff.
//! - [`aggregate`]: per-client, per-endpoint bucket statistics.
//! - [`detect`]: anomaly detectors on closed minute buckets.
//! - [`dedupe`]: the in-memory, flush-persisted event-id index.
//! - [`ingest`]: per-partition watermark, dedupe and minute/hour/day rollup.
//! - [`time`]: bucket and period boundaries in UTC.
//! - [`limit`]: rate-limit algorithms (fixed and sliding window, token and
//!   leaky bucket) over explicit time.
//! - [`quota`]: billing periods, quota status and once-per-period events.
//! - [`reservation`]: quota units admitted by checks until their events
//!   are ingested.
//! - [`sample`]: deterministic sampling for `REQUEST_RECORDED`.
//! - [`synthetic`]: deterministic synthetic traffic.
//! - [`telemetry`]: telemetry points and their single-pass statistics.
//! - [`top`]: per-period client totals and the incremental top-consumer
//!   ranking.
//!
//! Time is always passed in, so every behaviour is testable and replayable.

pub mod access;
pub mod aggregate;
pub mod billing;
pub mod circuit;
pub mod decode;
pub mod dedupe;
pub mod detect;
pub mod event;
pub mod ingest;
pub mod limit;
pub mod partitioner;
pub mod quota;
pub mod reservation;
pub mod sample;
pub mod sketch;
pub mod synthetic;
pub mod telemetry;
pub mod time;
pub mod top;

/// Errors of the pure layer that are not per-event rejections.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("malformed JSON body: {0}")]
    MalformedBody(String),
    #[error("unsupported content type `{0}`; use application/json, application/x-ndjson, application/cloudevents+json or application/cloudevents-batch+json")]
    UnsupportedMediaType(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
