//! Every setting, as one layered struct: the TOML file, the `TALLY_*`
//! environment and the flags are three layers of [`Settings`] (clap reads
//! the last two together), merged in that order by [`Settings::over`].
//! Field names are the file's keys; flags are the same names with `-`, and
//! sections become prefixes (`[kafka] brokers` is `--kafka-brokers`).
//! Sections that only make sense in a file (detector tuning, retention,
//! default limits) are not flags.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

/// Takes each field of `over` where set, else of `base`.
macro_rules! layer {
    ($base:expr, $over:expr; $($field:ident),* $(,)?) => {
        $( $base.$field = $over.$field.or($base.$field); )*
    };
}

/// A setting that is a secret: `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretString(redacted)")
    }
}

impl std::str::FromStr for SecretString {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(SecretString(s.to_string()))
    }
}

#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long, env = "TALLY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// RocksDB state directory [default: ./data].
    #[arg(long, env = "TALLY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "TALLY_LISTEN")]
    pub listen: Option<String>,
    /// HTTP base URL other instances forward queries to [default:
    /// http://<listen address>].
    #[arg(long, env = "TALLY_ADVERTISE")]
    pub advertise: Option<String>,
    /// Partitions (= shards); fixed for the life of a data directory [default: 12].
    #[arg(long, env = "TALLY_PARTITIONS")]
    pub partitions: Option<u16>,
    /// How the Kafka topic's producers place keyed records, and so how
    /// clients map to partitions everywhere: murmur2 (Java clients),
    /// crc32 (librdkafka's default consistent_random: confluent-kafka,
    /// node-rdkafka, Rust rdkafka) or fnv1a; fixed for the life of a data
    /// directory [default: murmur2].
    #[arg(long, env = "TALLY_PARTITIONER")]
    pub partitioner: Option<String>,
    /// Threads that run shards [default: number of CPUs].
    #[arg(long, env = "TALLY_SHARD_THREADS")]
    pub shard_threads: Option<usize>,
    /// Flush interval of a dirty shard, e.g. 1s, 250ms [default: 1s].
    #[arg(long, env = "TALLY_FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Flush a shard once this many events are pending [default: 25000].
    #[arg(long, env = "TALLY_FLUSH_MAX_EVENTS")]
    pub flush_max_events: Option<usize>,
    /// Bounded shard mailbox, in batches [default: 16].
    #[arg(long, env = "TALLY_MAILBOX_CAPACITY")]
    pub mailbox_capacity: Option<usize>,
    /// fsync acknowledged writes [default: true].
    #[arg(long, env = "TALLY_SYNC_WRITES")]
    pub sync_writes: Option<bool>,
    /// Allowed lateness of event time behind the partition watermark [default: 5m].
    #[arg(long, env = "TALLY_ALLOWED_LATENESS")]
    pub allowed_lateness: Option<String>,
    /// De-duplication window of event time [default: 1h].
    #[arg(long, env = "TALLY_DEDUPE_WINDOW")]
    pub dedupe_window: Option<String>,
    /// Event ids the dedupe indexes hold in memory over all partitions
    /// [default: 4000000].
    #[arg(long, env = "TALLY_DEDUPE_MAX_IDS")]
    pub dedupe_max_ids: Option<usize>,
    /// Refuse events dated further ahead of the ingest clock [default: 15m].
    #[arg(long, env = "TALLY_MAX_FUTURE")]
    pub max_future: Option<String>,
    /// Largest accepted request body in bytes [default: 64 MiB].
    #[arg(long, env = "TALLY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Ingest bodies processed at once; more are answered 503 [default: 64].
    #[arg(long, env = "TALLY_MAX_INGEST_REQUESTS")]
    pub max_ingest_requests: Option<usize>,
    /// Ingest body bytes in flight at once; more are answered 503 [default: 512 MiB].
    #[arg(long, env = "TALLY_MAX_INGEST_BYTES")]
    pub max_ingest_bytes: Option<usize>,
    /// Open SSE and WebSocket alert subscriptions [default: 1000].
    #[arg(long, env = "TALLY_MAX_SUBSCRIBERS")]
    pub max_subscribers: Option<usize>,
    /// Configured webhooks [default: 100].
    #[arg(long, env = "TALLY_MAX_WEBHOOKS")]
    pub max_webhooks: Option<usize>,
    /// Webhook destinations allowed although not public: comma-separated
    /// CIDRs (10.0.0.0/8, ::1/128) and exact host names [default: none,
    /// only public addresses].
    #[arg(long, env = "TALLY_WEBHOOK_ALLOW")]
    pub webhook_allow: Option<String>,
    /// Log format: text or json [default: text on a terminal, json otherwise].
    #[arg(long, env = "TALLY_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// A request taking longer is answered 408 [default: 60s].
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// Per-event errors listed in an ingest answer [default: 1000].
    #[arg(long, env = "TALLY_MAX_ERRORS_REPORTED")]
    pub max_errors_reported: Option<usize>,
    /// Judge a quiet partition's open minutes after this long [default: 2m].
    #[arg(long, env = "TALLY_ANOMALY_IDLE_CLOSE")]
    pub anomaly_idle_close: Option<String>,
    /// An admin key (`tly_...`, as `tally keys create` prints) that exists
    /// from start-up; turns access control on.
    #[arg(long, env = "TALLY_BOOTSTRAP_KEY", hide_env_values = true)]
    pub bootstrap_key: Option<SecretString>,
    /// Serve an open API (no key exists) on a non-loopback address.
    #[arg(long, env = "TALLY_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// HS256 key of accepted JWTs (at least 32 bytes).
    #[arg(long, env = "TALLY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<SecretString>,
    /// RSA public key (PEM file) of accepted RS256 JWTs.
    #[arg(long, env = "TALLY_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,
    /// JWKS file of accepted RS256 JWTs (keys chosen by `kid`).
    #[arg(long, env = "TALLY_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Required `iss` of JWTs.
    #[arg(long, env = "TALLY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of JWTs.
    #[arg(long, env = "TALLY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Key sealing webhook secrets at rest and on the control topic: 64 hex
    /// digits (e.g. `openssl rand -hex 32`) [default: none, stored as given].
    #[arg(long, env = "TALLY_SECRETS_KEY", hide_env_values = true)]
    pub secrets_key: Option<SecretString>,
    /// How long the audit trail keeps records, e.g. 30d [default: 30d].
    #[arg(long, env = "TALLY_AUDIT_RETENTION")]
    pub audit_retention: Option<String>,
    /// How long after a billing period's end (past the allowed lateness)
    /// it closes and its report is final, e.g. 1h [default: 1h].
    #[arg(long, env = "TALLY_BILLING_CLOSE_DELAY")]
    pub billing_close_delay: Option<String>,
    /// `/health/ready` and `/metrics` want a key with `read` too [default: false].
    #[arg(long, env = "TALLY_KEYED_OPS", num_args = 0..=1, default_missing_value = "true")]
    pub keyed_ops: Option<bool>,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[arg(skip)]
    pub memory: MemorySettings,
    #[arg(skip)]
    pub retention: RetentionSettings,
    #[arg(skip)]
    pub limits: LimitsSettings,
    /// Anomaly detector tuning (thresholds, warm-up, rules).
    #[arg(skip)]
    pub detect: Option<tally_pipelines::detect::DetectorConfig>,
    /// Compute units per endpoint template for events without their own.
    #[arg(skip)]
    pub compute_units: HashMap<String, u64>,
    #[arg(skip)]
    pub top: TopSettings,
    #[arg(skip)]
    pub alerts: AlertsSettings,
    #[arg(skip)]
    pub telemetry: TelemetrySettings,
}

impl Settings {
    /// `over` layered on `self`: its set fields win.
    pub fn over(mut self, over: Settings) -> Settings {
        layer!(self, over; config, data_dir, listen, advertise, partitions, partitioner, shard_threads,
            flush_interval, flush_max_events, mailbox_capacity, sync_writes, allowed_lateness,
            dedupe_window, dedupe_max_ids, max_future, max_body_bytes, max_ingest_requests,
            max_ingest_bytes, max_subscribers, max_webhooks, webhook_allow, log_format, request_timeout,
            max_errors_reported, anomaly_idle_close, detect, bootstrap_key, insecure, keyed_ops, audit_retention, billing_close_delay, jwt_hs256_secret,
            jwt_rs256_public_key, jwt_jwks, jwt_issuer, jwt_audience, secrets_key);
        layer!(self.kafka, over.kafka; brokers, group, topic, dead_letter_topic, telemetry_topic, outage_grace,
            changelog_interval, session_timeout);
        layer!(self.memory, over.memory; detectors, ranked_clients, memtable_bytes, block_cache_bytes, restore_bytes);
        layer!(self.retention, over.retention; minute, hour, day, dead_letter, alerts);
        layer!(self.limits, over.limits; default, max_clients, quota_reservation_ttl);
        layer!(self.top, over.top; trend_threshold);
        layer!(self.alerts, over.alerts; request_sample_rate);
        layer!(self.telemetry, over.telemetry; resolutions, max_series, anomaly_k,
            anomaly_cooldown, drift);
        self.compute_units.extend(over.compute_units);
        self
    }
}

#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers (HOST:PORT,...); without them no Kafka is used.
    #[arg(
        id = "kafka_brokers",
        long = "kafka-brokers",
        env = "TALLY_KAFKA_BROKERS"
    )]
    pub brokers: Option<String>,
    /// Kafka consumer group [default: tally].
    #[arg(id = "kafka_group", long = "kafka-group", env = "TALLY_KAFKA_GROUP")]
    pub group: Option<String>,
    /// Request topic [default: tally.requests].
    #[arg(id = "kafka_topic", long = "kafka-topic", env = "TALLY_KAFKA_TOPIC")]
    pub topic: Option<String>,
    /// Dead-letter topic [default: <topic>.dlq].
    #[arg(
        id = "kafka_dlq_topic",
        long = "kafka-dlq-topic",
        env = "TALLY_KAFKA_DLQ_TOPIC"
    )]
    pub dead_letter_topic: Option<String>,
    /// Telemetry topic, keyed by series and partitioned like the request
    /// topic [default: tally.telemetry beside tally.requests, else
    /// <topic>.telemetry].
    #[arg(
        id = "kafka_telemetry_topic",
        long = "kafka-telemetry-topic",
        env = "TALLY_KAFKA_TELEMETRY_TOPIC"
    )]
    pub telemetry_topic: Option<String>,
    /// Not ready after the brokers have been unreachable this long [default: 30s].
    #[arg(
        id = "kafka_outage_grace",
        long = "kafka-outage-grace",
        env = "TALLY_KAFKA_OUTAGE_GRACE"
    )]
    pub outage_grace: Option<String>,
    /// How often owned partitions publish their changelog [default: 1s].
    #[arg(
        id = "kafka_changelog_interval",
        long = "kafka-changelog-interval",
        env = "TALLY_KAFKA_CHANGELOG_INTERVAL"
    )]
    pub changelog_interval: Option<String>,
    /// How long the group waits for a silent instance before moving its
    /// partitions [default: 45s].
    #[arg(
        id = "kafka_session_timeout",
        long = "kafka-session-timeout",
        env = "TALLY_KAFKA_SESSION_TIMEOUT"
    )]
    pub session_timeout: Option<String>,
}

/// `[memory]`: what in-memory structures may hold, over all shards.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySettings {
    /// Client detectors kept in memory (LRU; the rest are in the store).
    pub detectors: Option<usize>,
    /// Clients each top-consumer ranking holds.
    pub ranked_clients: Option<usize>,
    /// Bytes all RocksDB memtables may hold together.
    pub memtable_bytes: Option<usize>,
    /// Bytes of RocksDB's block cache.
    pub block_cache_bytes: Option<usize>,
    /// Bytes of changelog records a Kafka restore holds before it streams
    /// into the store.
    pub restore_bytes: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    pub minute: Option<String>,
    pub hour: Option<String>,
    pub day: Option<String>,
    pub dead_letter: Option<String>,
    pub alerts: Option<String>,
}

/// `[limits]`: the default rate limit and the limiter memory bound.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// Applies to clients without their own configuration (none: such
    /// clients are not rate-limited).
    pub default: Option<tally_pipelines::limit::policy::LimitConfig>,
    /// Clients whose limiter state is kept in memory, over all shards.
    pub max_clients: Option<usize>,
    /// A hard-quota reservation not matched by an ingested event after
    /// this long is released.
    pub quota_reservation_ttl: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsSettings {
    /// Share of accepted events published as `REQUEST_RECORDED` (0..=1;
    /// 0, the default, publishes none).
    pub request_sample_rate: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Stored resolutions, finest first, each with its retention
    /// (default 10s/48h, 1m/30days, 1h/400days, 1d/1830days).
    pub resolutions: Option<Vec<ResolutionSetting>>,
    /// Series one partition holds at most (default 100,000).
    pub max_series: Option<usize>,
    /// Points beyond this many standard deviations of their series'
    /// running statistics raise `TELEMETRY_ANOMALY` (default 4).
    pub anomaly_k: Option<f64>,
    /// At most one anomaly per series within this much event time
    /// (default 1m).
    pub anomaly_cooldown: Option<String>,
    /// Drift detection by series pattern (`name{tags}` or `prefix*`),
    /// first match wins; a rule without `detector` turns it off. Series
    /// no rule matches get CUSUM (k = 0.5σ, h = 10σ, 100 points warm-up).
    pub drift: Option<Vec<DriftRule>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolutionSetting {
    pub width: String,
    pub retention: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftRule {
    pub pattern: String,
    #[serde(default)]
    pub detector: Option<tally_pipelines::telemetry::drift::DriftConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopSettings {
    /// A change beyond this share of the previous period is a trend
    /// (0.1 = ±10 %).
    pub trend_threshold: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_layer_wins_where_set_and_keeps_the_rest() {
        let file: Settings = toml::from_str(
            "partitions = 6\nlisten = \"127.0.0.1:9000\"\n[kafka]\nbrokers = \"a:9092\"\ngroup = \"g\"\n[retention]\nminute = \"24h\"\n",
        )
        .unwrap();
        let flags = Settings {
            partitions: Some(8),
            kafka: KafkaSettings {
                group: Some("flag-group".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = file.over(flags);
        assert_eq!(s.partitions, Some(8));
        assert_eq!(s.listen.as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(s.kafka.brokers.as_deref(), Some("a:9092"));
        assert_eq!(s.kafka.group.as_deref(), Some("flag-group"));
        assert_eq!(s.retention.minute.as_deref(), Some("24h"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Settings>("partitons = 6\n").is_err());
        assert!(toml::from_str::<Settings>("[kafka]\nbroker = \"x\"\n").is_err());
    }
}
