//! Telemetry: points of named, tagged series, and the single-pass
//! statistics kept of them.
//!
//! - [`point`]: a point as it arrives, validated, and the series key.
//! - [`moments`]: count, sum, min, max, first, last, mean and variance
//!   (Welford per point, Chan to merge), exact under merges.
//! - [`sketch`]: median and percentiles of values of any sign, within 1 %.
//! - [`drift`]: the anomaly index and drift detection (CUSUM,
//!   Page-Hinkley).
//! - [`correlate`]: two series joined by time, and Pearson's r.
//! - [`ingest`]: what a partition does with each point (dedupe,
//!   lateness, the series bound) and what its flush writes.
//! - [`query`]: query steps as merges of stored buckets, aggregations,
//!   the range summary.
//!
//! What the engine stores per series and resolution bucket is one
//! [`Bucket`]: both, merged the same way at every resolution.

pub mod correlate;
pub mod drift;
pub mod ingest;
pub mod moments;
pub mod point;
pub mod query;
pub mod sketch;
pub mod watch;

use serde::{Deserialize, Serialize};

pub use moments::Moments;
pub use point::{decode_point, series_key, Point};
pub use sketch::ValueSketch;

/// The statistics of one series over one bucket of time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub moments: Moments,
    pub sketch: ValueSketch,
}

impl Bucket {
    pub fn insert(&mut self, timestamp_ms: i64, value: f64) {
        self.moments.insert(timestamp_ms, value);
        self.sketch.insert(value);
    }

    pub fn merge(&mut self, other: &Bucket) {
        self.moments.merge(&other.moments);
        self.sketch.merge(&other.sketch);
    }
}
