//! Internal telemetry: metric names in one place, and one struct per
//! internal event whose `emit` writes both the log line and the metrics.
//! Label values come from bounded sets (source kind, shard number, route
//! template), never from client ids.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

pub const EVENTS_ACCEPTED: &str = "tally_events_accepted_total";
pub const EVENTS_REJECTED: &str = "tally_events_rejected_total";
pub const EVENTS_LATE: &str = "tally_events_late_total";
pub const EVENTS_DUPLICATE: &str = "tally_events_duplicate_total";
pub const BATCH_DURATION: &str = "tally_ingest_batch_duration_seconds";
pub const MAILBOX_DEPTH: &str = "tally_shard_mailbox_depth";
pub const FLUSH_DURATION: &str = "tally_flush_duration_seconds";
pub const FLUSH_BYTES: &str = "tally_flush_bytes_total";
pub const SHARD_RESTARTS: &str = "tally_shard_restarts_total";
pub const ROCKSDB_SIZE: &str = "tally_rocksdb_size_bytes";
pub const INGEST_OVERLOADED: &str = "tally_ingest_overloaded_total";
pub const HTTP_REQUESTS: &str = "tally_http_requests_total";
pub const KAFKA_DEAD_LETTERS: &str = "tally_kafka_dead_letters_total";
pub const KAFKA_CONSUMER_LAG: &str = "tally_kafka_consumer_lag";
pub const KAFKA_PARTITION_PAUSES: &str = "tally_kafka_partition_pauses_total";
pub const KAFKA_PARTITION_RESUMES: &str = "tally_kafka_partition_resumes_total";
pub const KAFKA_REREADS: &str = "tally_kafka_rereads_total";
pub const KAFKA_PARTITIONS_HELD: &str = "tally_kafka_partitions_held";
pub const HTTP_DURATION: &str = "tally_http_request_duration_seconds";
pub const CHANGELOG_RECORDS: &str = "tally_changelog_records_total";
pub const CHANGELOG_ROUNDS: &str = "tally_changelog_rounds_total";
pub const CHANGELOG_RESTORES: &str = "tally_changelog_restores_total";
pub const CHANGELOG_RESTORED_RECORDS: &str = "tally_changelog_restored_records_total";
pub const CHANGELOG_TOMBSTONES: &str = "tally_changelog_tombstones_total";
pub const CHANGELOG_RESTORES_STREAMED: &str = "tally_changelog_restores_streamed_total";
pub const OWNED_PARTITIONS: &str = "tally_owned_partitions";
pub const RATE_LIMIT_FACTOR: &str = "tally_rate_limit_factor";
pub const QUEUE_UTILIZATION: &str = "tally_queue_utilization";
pub const CHECKS_DENIED: &str = "tally_checks_denied_total";
pub const QUOTA_EVENTS: &str = "tally_quota_events_total";
pub const ANOMALIES: &str = "tally_anomalies_total";
pub const DENIALS_UNCOUNTED: &str = "tally_detector_denials_uncounted_total";
pub const WEBHOOK_DELIVERIES: &str = "tally_webhook_deliveries_total";
pub const WEBHOOK_ATTEMPTS: &str = "tally_webhook_attempts_total";
pub const WEBHOOK_CIRCUIT_TRANSITIONS: &str = "tally_webhook_circuit_transitions_total";
pub const WEBHOOK_CIRCUIT_STATE: &str = "tally_webhook_circuit_state";
pub const WEBHOOK_PENDING: &str = "tally_webhook_pending";
pub const WEBHOOK_OVERFLOW: &str = "tally_webhook_overflow_total";
pub const ALERT_TOPIC_PUBLISHED: &str = "tally_alert_topic_published_total";
pub const ALERTS_DROPPED: &str = "tally_alerts_dropped_total";
pub const INGEST_SHED: &str = "tally_ingest_shed_total";
/// Requests refused by access control, by cause (a fixed set).
pub const AUTH_REFUSALS: &str = "tally_auth_refusals_total";
/// From a control change being made to its being applied here (seconds).
pub const CONTROL_PROPAGATION: &str = "tally_control_propagation_seconds";
/// Audit records dropped (the writer behind, or the store failing).
pub const AUDIT_DROPPED: &str = "tally_audit_dropped_total";

/// Histogram buckets (seconds) shared by the latency histograms.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// An ingest body was refused before it was read: too many bodies or
/// bytes in flight.
pub struct IngestShed;

impl IngestShed {
    pub fn emit(&self) {
        tracing::debug!("ingest body shed");
        counter!(INGEST_SHED).increment(1);
    }
}

/// The alert log's queue was full: an event was dropped.
pub struct AlertsDropped;

impl AlertsDropped {
    pub fn emit(&self) {
        tracing::warn!("alert log queue full; event dropped");
        counter!(ALERTS_DROPPED).increment(1);
    }
}

/// A shard applied a batch.
pub struct BatchApplied {
    pub shard: u16,
    pub source: &'static str,
    pub accepted: u64,
    pub duplicates: u64,
    pub late: u64,
}

impl BatchApplied {
    pub fn emit(&self) {
        let source = self.source;
        counter!(EVENTS_ACCEPTED, "source" => source).increment(self.accepted);
        if self.duplicates > 0 {
            counter!(EVENTS_DUPLICATE, "source" => source).increment(self.duplicates);
        }
        if self.late > 0 {
            counter!(EVENTS_LATE, "source" => source).increment(self.late);
            tracing::debug!(
                shard = self.shard,
                late = self.late,
                "late events set aside in dead letters"
            );
        }
    }
}

/// Events failed validation before reaching a shard.
pub struct EventsRejected {
    pub source: &'static str,
    pub count: u64,
}

impl EventsRejected {
    pub fn emit(&self) {
        if self.count > 0 {
            counter!(EVENTS_REJECTED, "source" => self.source).increment(self.count);
        }
    }
}

/// A shard wrote one flush.
pub struct FlushCompleted {
    pub shard: u16,
    pub duration: Duration,
    pub bytes: usize,
    pub records: usize,
}

impl FlushCompleted {
    pub fn emit(&self) {
        histogram!(FLUSH_DURATION).record(self.duration.as_secs_f64());
        counter!(FLUSH_BYTES).increment(self.bytes as u64);
        tracing::trace!(
            shard = self.shard,
            records = self.records,
            bytes = self.bytes,
            "flushed"
        );
    }
}

/// A shard's flush failed; it will be restarted from its last flush.
pub struct FlushFailed<'a> {
    pub shard: u16,
    pub error: &'a str,
}

impl FlushFailed<'_> {
    pub fn emit(&self) {
        tracing::error!(
            shard = self.shard,
            error = self.error,
            "flush failed; restarting shard from its last flush"
        );
    }
}

pub struct ShardRestarted {
    pub shard: u16,
}

impl ShardRestarted {
    pub fn emit(&self) {
        counter!(SHARD_RESTARTS, "shard" => self.shard.to_string()).increment(1);
        tracing::warn!(shard = self.shard, "shard restarted from its last flush");
    }
}

pub struct MailboxDepth {
    pub shard: u16,
    pub depth: usize,
}

impl MailboxDepth {
    pub fn emit(&self) {
        gauge!(MAILBOX_DEPTH, "shard" => self.shard.to_string()).set(self.depth as f64);
    }
}

/// Ingest refused a batch because shards are behind.
pub struct IngestOverloaded {
    pub shard: u16,
}

impl IngestOverloaded {
    pub fn emit(&self) {
        counter!(INGEST_OVERLOADED).increment(1);
        tracing::warn!(shard = self.shard, "shard mailbox full; answering 503");
    }
}

/// A changelog round of one partition was delivered.
pub struct ChangelogRoundPublished {
    pub partition: u16,
    pub records: usize,
    pub tombstones: usize,
    pub duration: Duration,
}

impl ChangelogRoundPublished {
    pub fn emit(&self) {
        counter!(CHANGELOG_ROUNDS).increment(1);
        counter!(CHANGELOG_RECORDS).increment(self.records as u64);
        counter!(CHANGELOG_TOMBSTONES).increment(self.tombstones as u64);
        tracing::debug!(
            partition = self.partition,
            records = self.records,
            tombstones = self.tombstones,
            ms = self.duration.as_millis() as u64,
            "changelog round published"
        );
    }
}

/// A partition's state was rebuilt from its changelog.
pub struct ChangelogRestored {
    pub partition: u16,
    pub records: u64,
    /// Read from a local mark on (only what was appended since).
    pub continued: bool,
    /// Outgrew the memory budget and streamed into the store.
    pub streamed: bool,
    pub duration: Duration,
}

impl ChangelogRestored {
    pub fn emit(&self) {
        counter!(CHANGELOG_RESTORES).increment(1);
        counter!(CHANGELOG_RESTORED_RECORDS).increment(self.records);
        if self.streamed {
            counter!(CHANGELOG_RESTORES_STREAMED).increment(1);
        }
        tracing::info!(
            partition = self.partition,
            records = self.records,
            continued = self.continued,
            streamed = self.streamed,
            ms = self.duration.as_millis() as u64,
            "partition restored from its changelog"
        );
    }
}

/// A check was denied (or would have been, in shadow mode).
pub struct RateLimited {
    pub reason: crate::limits::DenyReason,
}

impl RateLimited {
    pub fn emit(&self) {
        counter!(CHECKS_DENIED, "reason" => self.reason.as_str()).increment(1);
    }
}

/// A denied check could not be counted for abuse detection: the per-minute
/// denial table of its shard was full (`[limits] max_clients` entries).
pub struct DenialsDropped;

impl DenialsDropped {
    pub fn emit(&self) {
        counter!(DENIALS_UNCOUNTED).increment(1);
    }
}

/// A client crossed its quota's warning threshold or limit (once per
/// period each). The alert streams will carry these.
pub struct QuotaEventRaised<'a> {
    pub event: tally_pipelines::quota::QuotaEvent,
    pub client: &'a str,
    pub percent_used: f64,
}

impl QuotaEventRaised<'_> {
    pub fn emit(&self) {
        let kind = match self.event {
            tally_pipelines::quota::QuotaEvent::QuotaWarning => "QUOTA_WARNING",
            tally_pipelines::quota::QuotaEvent::QuotaExceeded => "QUOTA_EXCEEDED",
        };
        counter!(QUOTA_EVENTS, "type" => kind).increment(1);
        tracing::info!(
            event_type = kind,
            client_id = self.client,
            percent_used = self.percent_used,
            "quota event"
        );
    }
}

/// A detector judged a closed bucket anomalous.
pub struct AnomalyDetected<'a> {
    pub anomaly: &'a tally_pipelines::detect::Anomaly,
}

impl AnomalyDetected<'_> {
    pub fn emit(&self) {
        let a = self.anomaly;
        let severity = match a.severity {
            tally_pipelines::detect::Severity::Low => "LOW",
            tally_pipelines::detect::Severity::Medium => "MEDIUM",
            tally_pipelines::detect::Severity::High => "HIGH",
            tally_pipelines::detect::Severity::Critical => "CRITICAL",
        };
        counter!(ANOMALIES, "type" => a.anomaly_type.as_str(), "severity" => severity).increment(1);
        tracing::info!(
            anomaly_id = %a.anomaly_id,
            client_id = %a.client_id,
            anomaly_type = a.anomaly_type.as_str(),
            severity,
            "{}",
            a.description
        );
    }
}
