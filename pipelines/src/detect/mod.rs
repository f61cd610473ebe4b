//! Anomaly detection on closed minute buckets, per client.
//!
//! - [`baseline`]: exponentially weighted mean and variance (and why).
//! - [`detector`]: a client's learned behaviour and the rules that judge a
//!   closed bucket against it.
//!
//! Everything is a function of the buckets fed in, in order: the same
//! stream gives the same anomalies with the same ids (replay-safe). The
//! detection time is the bucket's end in event time, not the wall clock.

pub mod baseline;
pub mod detector;
#[cfg(test)]
mod scenarios;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

pub use detector::ClientDetector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AnomalyType {
    SpikeInRequests,
    SpikeInErrors,
    LatencyDegradation,
    UnusualEndpointAccess,
    PotentialAbuse,
}

impl AnomalyType {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyType::SpikeInRequests => "SPIKE_IN_REQUESTS",
            AnomalyType::SpikeInErrors => "SPIKE_IN_ERRORS",
            AnomalyType::LatencyDegradation => "LATENCY_DEGRADATION",
            AnomalyType::UnusualEndpointAccess => "UNUSUAL_ENDPOINT_ACCESS",
            AnomalyType::PotentialAbuse => "POTENTIAL_ABUSE",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

/// Score thresholds of each severity. Scores are standard deviations above
/// the baseline for the statistical detectors, and multiples of the
/// configured trigger for the rule-based ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeverityThresholds {
    pub low: f64,
    pub medium: f64,
    pub high: f64,
    pub critical: f64,
}

impl SeverityThresholds {
    pub fn severity(&self, score: f64) -> Option<Severity> {
        if score >= self.critical {
            Some(Severity::Critical)
        } else if score >= self.high {
            Some(Severity::High)
        } else if score >= self.medium {
            Some(Severity::Medium)
        } else if score >= self.low {
            Some(Severity::Low)
        } else {
            None
        }
    }
}

/// Tuning of the detectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Closed buckets a client needs before it can alarm.
    pub warmup_buckets: u32,
    /// EWMA weight of each new bucket.
    pub alpha: f64,
    /// A statistical baseline (error rate, p95, usual 401/403) judges
    /// only once it has learned from this many buckets: a light client's
    /// first busy minute is not compared with nothing.
    pub min_baseline_samples: u32,
    /// In standard deviations above the baseline.
    pub statistical: SeverityThresholds,
    /// In multiples of the rule's trigger (1 = just reached it).
    pub rules: SeverityThresholds,
    /// A request spike must also be this many times the baseline...
    pub spike_min_ratio: f64,
    /// ...and at least this many requests in the minute.
    pub spike_min_requests: u64,
    /// Error rates are judged from this many requests in the minute.
    pub error_min_requests: u64,
    /// An error-rate spike must exceed the baseline by this much (0..1).
    pub error_min_increase: f64,
    /// A latency degradation must be this many times the baseline p95...
    pub latency_min_ratio: f64,
    /// ...measured over at least this many requests in the minute (the p95
    /// of a handful of requests is their maximum).
    pub latency_min_requests: u64,
    /// An error-rate spike needs at least this many 5xx in the minute.
    pub error_min_errors: u64,
    /// 401/403 answers in one minute that count as a burst...
    pub auth_failure_burst: u64,
    /// ...and, for a warm client, this many times its own usual number
    /// (a busy client's ordinary 1 % of 401s is not a burst).
    pub auth_failure_baseline_ratio: f64,
    /// Gateway denials per minute that, sustained, count as abuse...
    pub denial_burst: u64,
    /// ...for this many consecutive minutes.
    pub denial_minutes: u32,
    /// Never-seen endpoints in one minute that count as enumeration.
    pub enumeration_endpoints: usize,
    /// Requests to never-seen endpoints in a minute before they are
    /// unusual (one stray request is not)...
    pub new_endpoint_min_requests: u64,
    /// ...and only once the client's baseline holds this many requests
    /// (a light client has not shown all its endpoints yet).
    pub endpoint_baseline_min_requests: u64,
    /// Endpoints remembered per client (beyond, none are added).
    pub max_known_endpoints: usize,
    /// A client with fewer than `error_min_requests` in a minute is judged
    /// over a window of its minutes instead (errors, request spikes and
    /// 401/403 bursts), closed once it holds `error_min_requests` or spans
    /// this many minutes...
    pub sparse_window_minutes: u32,
    /// ...and judged if it holds at least this many requests.
    pub sparse_min_requests: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            warmup_buckets: 30,
            alpha: 0.1,
            min_baseline_samples: 10,
            statistical: SeverityThresholds {
                low: 4.0,
                medium: 6.0,
                high: 10.0,
                critical: 20.0,
            },
            rules: SeverityThresholds {
                low: 1.0,
                medium: 2.0,
                high: 4.0,
                critical: 8.0,
            },
            spike_min_ratio: 2.0,
            spike_min_requests: 20,
            error_min_requests: 20,
            error_min_increase: 0.1,
            latency_min_ratio: 1.5,
            latency_min_requests: 20,
            error_min_errors: 5,
            auth_failure_burst: 20,
            auth_failure_baseline_ratio: 3.0,
            denial_burst: 50,
            denial_minutes: 3,
            enumeration_endpoints: 10,
            new_endpoint_min_requests: 3,
            endpoint_baseline_min_requests: 500,
            max_known_endpoints: 1000,
            sparse_window_minutes: 5,
            sparse_min_requests: 10,
        }
    }
}

/// What a closed minute bucket says about one client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MinuteSummary {
    pub minute_start_ms: i64,
    pub requests: u64,
    /// status >= 500
    pub server_errors: u64,
    /// status 401 or 403
    pub auth_failures: u64,
    /// Checks the gateway was told to deny.
    pub denials: u64,
    pub p95_latency_ms: Option<f64>,
    /// (endpoint, requests), any order.
    pub endpoints: Vec<(String, u64)>,
}

/// An anomaly record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Deterministic: the same bucket and finding give the same id.
    pub anomaly_id: String,
    pub client_id: String,
    pub endpoint: Option<String>,
    pub anomaly_type: AnomalyType,
    pub severity: Severity,
    /// The end of the judged bucket (event time), epoch ms.
    pub detected_at_ms: i64,
    pub description: String,
    pub baseline: f64,
    pub observed: f64,
    pub deviation_percent: f64,
}

/// Deterministic anomaly id from what identifies the finding.
pub fn anomaly_id(
    client: &str,
    kind: AnomalyType,
    minute_start_ms: i64,
    rule: &str,
    endpoint: Option<&str>,
) -> String {
    let mut h = Xxh3::new();
    h.update(client.as_bytes());
    h.update(&[0]);
    h.update(kind.as_str().as_bytes());
    h.update(&minute_start_ms.to_be_bytes());
    h.update(rule.as_bytes());
    if let Some(e) = endpoint {
        h.update(&[1]);
        h.update(e.as_bytes());
    }
    format!("an-{:032x}", h.digest128())
}

/// Percent change of `observed` over `baseline` (a zero baseline counts
/// as `floor`, so the figure stays finite).
pub fn deviation_percent(baseline: f64, observed: f64, floor: f64) -> f64 {
    let base = baseline.abs().max(floor);
    ((observed - baseline) / base * 10_000.0).round() / 100.0
}
