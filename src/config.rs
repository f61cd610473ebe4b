//! Configuration: a TOML file, overridden by `TALLY_*` environment
//! variables, overridden by flags (clap reads flag and variable together).
//! Validation reports every problem at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// Engine and server settings shared by `serve` and `replay`.
#[derive(Debug, Clone, Default, Args)]
pub struct EngineArgs {
    /// TOML configuration file.
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// RocksDB state directory [default: ./data].
    #[arg(long, env = "TALLY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Partitions (= shards); fixed for the life of a data directory [default: 12].
    #[arg(long, env = "TALLY_PARTITIONS")]
    pub partitions: Option<u16>,
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
    /// Memory cap of each partition's dedupe index, in event ids [default: 1000000].
    #[arg(long, env = "TALLY_DEDUPE_MAX_IDS")]
    pub dedupe_max_ids: Option<usize>,
    /// Refuse events dated further ahead of the ingest clock [default: 15m].
    #[arg(long, env = "TALLY_MAX_FUTURE")]
    pub max_future: Option<String>,
    /// Log format: text or json [default: text on a terminal, json otherwise].
    #[arg(long, env = "TALLY_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// `serve`-only settings.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "TALLY_LISTEN")]
    pub listen: Option<String>,
    /// Kafka bootstrap servers (HOST:PORT,...); without them no Kafka is used.
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Kafka consumer group [default: tally].
    #[arg(long, env = "TALLY_KAFKA_GROUP")]
    pub kafka_group: Option<String>,
    /// Request topic [default: tally.requests].
    #[arg(long, env = "TALLY_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Dead-letter topic [default: <topic>.dlq].
    #[arg(long, env = "TALLY_KAFKA_DLQ_TOPIC")]
    pub kafka_dlq_topic: Option<String>,
    /// Not ready after the brokers have been unreachable this long [default: 30s].
    #[arg(long, env = "TALLY_KAFKA_OUTAGE_GRACE")]
    pub kafka_outage_grace: Option<String>,
    /// How often owned partitions publish their changelog [default: 1s].
    #[arg(long, env = "TALLY_KAFKA_CHANGELOG_INTERVAL")]
    pub kafka_changelog_interval: Option<String>,
    /// How long the group waits for a silent instance before moving its
    /// partitions [default: 45s].
    #[arg(long, env = "TALLY_KAFKA_SESSION_TIMEOUT")]
    pub kafka_session_timeout: Option<String>,
    /// HTTP base URL other instances forward queries to [default:
    /// http://<listen address>].
    #[arg(long, env = "TALLY_ADVERTISE")]
    pub advertise: Option<String>,
    /// Largest accepted request body, e.g. 64MiB [default: 64MiB].
    #[arg(long, env = "TALLY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
}

/// The TOML file: same names as the flags, with `_` for `-`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub partitions: Option<u16>,
    pub shard_threads: Option<usize>,
    pub flush_interval: Option<String>,
    pub flush_max_events: Option<usize>,
    pub mailbox_capacity: Option<usize>,
    pub sync_writes: Option<bool>,
    pub allowed_lateness: Option<String>,
    pub dedupe_window: Option<String>,
    pub dedupe_max_ids: Option<usize>,
    pub max_future: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub log_format: Option<String>,
    pub request_timeout: Option<String>,
    pub max_errors_reported: Option<usize>,
    pub retention: RetentionFile,
    pub kafka: KafkaFile,
    pub limits: LimitsFile,
    /// Anomaly detector tuning (thresholds, warm-up, rules).
    pub detect: tally_pipelines::detect::DetectorConfig,
    /// Close a quiet partition's open minutes after this long.
    pub anomaly_idle_close: Option<String>,
    /// Compute units per endpoint template for events without their own.
    pub compute_units: HashMap<String, u64>,
    pub top: TopFile,
    pub alerts: AlertsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsFile {
    /// Share of accepted events published as `REQUEST_RECORDED` (0..=1;
    /// 0, the default, publishes none).
    pub request_sample_rate: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopFile {
    /// A change beyond this share of the previous period is a trend
    /// (0.1 = ±10 %).
    pub trend_threshold: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionFile {
    pub minute: Option<String>,
    pub hour: Option<String>,
    pub day: Option<String>,
    pub dead_letter: Option<String>,
    pub alerts: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaFile {
    pub brokers: Option<String>,
    pub group: Option<String>,
    pub topic: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub outage_grace: Option<String>,
    pub changelog_interval: Option<String>,
    pub session_timeout: Option<String>,
}

/// `[limits]`: the default rate limit and the limiter memory bound.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// Applies to clients without their own configuration (none: such
    /// clients are not rate-limited).
    pub default: Option<tally_pipelines::limit::policy::LimitConfig>,
    /// Clients whose limiter state is kept in memory, over all shards.
    pub max_clients: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub partitions: u16,
    pub shard_threads: usize,
    pub flush_interval: Duration,
    pub flush_max_events: usize,
    pub mailbox_capacity: usize,
    pub sync_writes: bool,
    pub allowed_lateness: Duration,
    pub dedupe_window: Duration,
    pub dedupe_max_ids: usize,
    pub max_future: Duration,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_errors_reported: usize,
    pub retention_minute: Duration,
    pub retention_hour: Duration,
    pub retention_day: Duration,
    pub retention_dead_letter: Duration,
    pub retention_alerts: Duration,
    pub log_format: Option<LogFormat>,
    pub compute_units: HashMap<String, u64>,
    pub kafka: Option<tally_actors::kafka_source::KafkaConfig>,
    pub kafka_outage_grace: Duration,
    /// Advertised HTTP base URL, if configured.
    pub advertise: Option<String>,
    pub limit_default: Option<tally_pipelines::limit::policy::LimitConfig>,
    pub limits_max_clients: usize,
    pub detect: tally_pipelines::detect::DetectorConfig,
    pub anomaly_idle_close: Duration,
    /// Top consumers: a change beyond this share is a trend.
    pub top_trend_threshold: f64,
    /// Share of accepted events published as `REQUEST_RECORDED`.
    pub request_sample_rate: f64,
    /// The adaptive limit factor, shared by shards and the HTTP API.
    pub adaptive: std::sync::Arc<tally_actors::adaptive::AdaptiveLimits>,
}

impl Config {
    pub fn resolve(engine: &EngineArgs, serve: &ServeArgs) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let file = match &engine.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match toml::from_str::<FileConfig>(&text) {
                    Ok(f) => f,
                    Err(e) => return Err(vec![format!("{}: {e}", path.display())]),
                },
                Err(e) => return Err(vec![format!("cannot read {}: {e}", path.display())]),
            },
            None => FileConfig::default(),
        };
        let request_sample_rate = file.alerts.request_sample_rate.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&request_sample_rate) {
            problems.push(format!(
                "[alerts] request_sample_rate must be within 0..=1, got {request_sample_rate}"
            ));
        }
        let top_trend_threshold = file.top.trend_threshold.unwrap_or(0.10);
        if !(0.0..=10.0).contains(&top_trend_threshold) {
            problems.push(format!(
                "[top] trend_threshold must be within 0..=10 (a share: 0.1 = 10 %), got {top_trend_threshold}"
            ));
        }
        let mut duration =
            |name: &str, flag: &Option<String>, file: &Option<String>, default: &str| -> Duration {
                let text = flag.as_deref().or(file.as_deref()).unwrap_or(default);
                match humantime::parse_duration(text) {
                    Ok(d) => d,
                    Err(e) => {
                        problems.push(format!(
                            "{name}: {text:?} is not a duration such as 5m or 250ms ({e})"
                        ));
                        Duration::ZERO
                    }
                }
            };
        let flush_interval = duration(
            "flush_interval",
            &engine.flush_interval,
            &file.flush_interval,
            "1s",
        );
        let allowed_lateness = duration(
            "allowed_lateness",
            &engine.allowed_lateness,
            &file.allowed_lateness,
            "5m",
        );
        let dedupe_window = duration(
            "dedupe_window",
            &engine.dedupe_window,
            &file.dedupe_window,
            "1h",
        );
        let max_future = duration("max_future", &engine.max_future, &file.max_future, "15m");
        let request_timeout = duration("request_timeout", &None, &file.request_timeout, "60s");
        let anomaly_idle_close =
            duration("anomaly_idle_close", &None, &file.anomaly_idle_close, "2m");
        let kafka_outage_grace = duration(
            "kafka.outage_grace",
            &serve.kafka_outage_grace,
            &file.kafka.outage_grace,
            "30s",
        );
        let changelog_interval = duration(
            "kafka.changelog_interval",
            &serve.kafka_changelog_interval,
            &file.kafka.changelog_interval,
            "1s",
        );
        let session_timeout = duration(
            "kafka.session_timeout",
            &serve.kafka_session_timeout,
            &file.kafka.session_timeout,
            "45s",
        );
        let retention_minute = duration("retention.minute", &None, &file.retention.minute, "48h");
        let retention_hour = duration("retention.hour", &None, &file.retention.hour, "90days");
        let retention_day = duration("retention.day", &None, &file.retention.day, "730days");
        let retention_alerts = duration("retention.alerts", &None, &file.retention.alerts, "7days");
        let retention_dead_letter = duration(
            "retention.dead_letter",
            &None,
            &file.retention.dead_letter,
            "7days",
        );

        let listen_text = serve
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen_text.parse().unwrap_or_else(|e| {
            problems.push(format!(
                "listen: {listen_text:?} is not an address such as 127.0.0.1:8080 ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 8080))
        });
        let partitions = engine.partitions.or(file.partitions).unwrap_or(12);
        if partitions == 0 || partitions > 4096 {
            problems.push(format!("partitions: {partitions} is outside 1..=4096"));
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let shard_threads = engine.shard_threads.or(file.shard_threads).unwrap_or(cpus);
        if shard_threads == 0 {
            problems.push("shard_threads: must be at least 1".into());
        }
        let flush_max_events = engine
            .flush_max_events
            .or(file.flush_max_events)
            .unwrap_or(25_000);
        let mailbox_capacity = engine
            .mailbox_capacity
            .or(file.mailbox_capacity)
            .unwrap_or(16);
        let dedupe_max_ids = engine
            .dedupe_max_ids
            .or(file.dedupe_max_ids)
            .unwrap_or(1_000_000);
        for (name, v) in [
            ("flush_max_events", flush_max_events),
            ("mailbox_capacity", mailbox_capacity),
            ("dedupe_max_ids", dedupe_max_ids),
        ] {
            if v == 0 {
                problems.push(format!("{name}: must be at least 1"));
            }
        }
        if flush_interval.is_zero() {
            problems.push("flush_interval: must be above zero".into());
        }
        let max_body_bytes = serve
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(64 << 20);
        if max_body_bytes < 1024 {
            problems.push(format!("max_body_bytes: {max_body_bytes} is below 1024"));
        }
        let log_format = match engine.log_format.as_deref().or(file.log_format.as_deref()) {
            None => None,
            Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                problems.push(format!("log_format: {other:?} is not text or json"));
                None
            }
        };
        if changelog_interval < Duration::from_millis(10) {
            problems.push(format!(
                "kafka.changelog_interval: {changelog_interval:?} is too short (at least 10ms)"
            ));
        }
        if session_timeout < Duration::from_secs(6) {
            problems.push(format!(
                "kafka.session_timeout: {session_timeout:?} is below Kafka's 6s minimum"
            ));
        }
        let advertise = serve.advertise.clone().or(file.advertise.clone());
        if let Some(a) = &advertise {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                problems.push(format!(
                    "advertise: {a:?} is not an http:// or https:// base URL"
                ));
            }
        }
        if let Some(default) = &file.limits.default {
            for (field, reason) in default.problems() {
                problems.push(format!("limits.default.{field}: {reason}"));
            }
        }
        let limits_max_clients = file.limits.max_clients.unwrap_or(1_000_000);
        if limits_max_clients == 0 {
            problems.push("limits.max_clients: must be at least 1".into());
        }
        let limit_default = file.limits.default.clone();
        let kafka = serve
            .kafka_brokers
            .clone()
            .or(file.kafka.brokers)
            .filter(|b| !b.trim().is_empty())
            .map(|brokers| {
                let topic = serve
                    .kafka_topic
                    .clone()
                    .or(file.kafka.topic)
                    .unwrap_or_else(|| "tally.requests".into());
                tally_actors::kafka_source::KafkaConfig {
                    brokers,
                    group: serve
                        .kafka_group
                        .clone()
                        .or(file.kafka.group)
                        .unwrap_or_else(|| "tally".into()),
                    dead_letter_topic: serve
                        .kafka_dlq_topic
                        .clone()
                        .or(file.kafka.dead_letter_topic)
                        .unwrap_or_else(|| format!("{topic}.dlq")),
                    topic,
                    batch_max: 50_000,
                    batch_linger: Duration::from_millis(20),
                    session_timeout,
                    changelog_interval,
                }
            });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            data_dir: engine
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("data")),
            listen,
            partitions,
            shard_threads,
            flush_interval,
            flush_max_events,
            mailbox_capacity,
            sync_writes: engine.sync_writes.or(file.sync_writes).unwrap_or(true),
            allowed_lateness,
            dedupe_window,
            dedupe_max_ids,
            max_future,
            max_body_bytes,
            request_timeout,
            max_errors_reported: file.max_errors_reported.unwrap_or(1000),
            retention_minute,
            retention_hour,
            retention_day,
            retention_dead_letter,
            retention_alerts,
            log_format,
            compute_units: file.compute_units,
            kafka,
            kafka_outage_grace,
            advertise: advertise.map(|a| a.trim_end_matches('/').to_string()),
            limit_default,
            limits_max_clients,
            adaptive: Default::default(),
            detect: file.detect,
            anomaly_idle_close,
            top_trend_threshold,
            request_sample_rate,
        })
    }

    pub fn store_options(&self) -> tally_state::StoreOptions {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        tally_state::StoreOptions {
            partitions: self.partitions,
            retention: tally_state::Retention {
                minute_ms: ms(self.retention_minute),
                hour_ms: ms(self.retention_hour),
                day_ms: ms(self.retention_day),
                dedupe_window_ms: ms(self.dedupe_window),
                dead_letter_ms: ms(self.retention_dead_letter),
                alerts_ms: ms(self.retention_alerts),
            },
            ..Default::default()
        }
    }

    pub fn shard_config(&self) -> tally_actors::ShardConfig {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        tally_actors::ShardConfig {
            rules: tally_pipelines::ingest::PartitionRules {
                allowed_lateness_ms: ms(self.allowed_lateness),
                dedupe_window_ms: ms(self.dedupe_window),
            },
            weights: std::sync::Arc::new(tally_pipelines::aggregate::ComputeWeights {
                per_endpoint: self.compute_units.clone(),
            }),
            flush_interval: self.flush_interval,
            flush_max_events: self.flush_max_events,
            mailbox_capacity: self.mailbox_capacity,
            sync_writes: self.sync_writes,
            dedupe_max_ids: self.dedupe_max_ids,
            limits: tally_actors::limits::LimitSettings {
                default_config: self.limit_default.clone().map(std::sync::Arc::new),
                max_clients: (self.limits_max_clients / usize::from(self.partitions.max(1))).max(1),
                adaptive: self.adaptive.clone(),
                // Set by `serve`, which owns the event channel.
                alerts: None,
            },
            detect: tally_actors::anomaly::DetectSettings {
                config: self.detect.clone(),
                idle_close: self.anomaly_idle_close,
                alerts: None,
            },
            request_sampler: tally_pipelines::sample::RequestSampler::new(self.request_sample_rate),
        }
    }

    pub fn validation(&self, now_ms: i64) -> tally_pipelines::event::ValidationContext {
        tally_pipelines::event::ValidationContext {
            now_ms,
            max_future_ms: i64::try_from(self.max_future.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_readme() {
        let c = Config::resolve(&EngineArgs::default(), &ServeArgs::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.partitions, 12);
        assert_eq!(c.allowed_lateness, Duration::from_secs(300));
        assert_eq!(c.max_body_bytes, 64 << 20);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let engine = EngineArgs {
            partitions: Some(0),
            allowed_lateness: Some("soon".into()),
            log_format: Some("xml".into()),
            ..Default::default()
        };
        let serve = ServeArgs {
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        let problems = Config::resolve(&engine, &serve).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    /// The shipped example is valid and its detector block states the
    /// defaults (so the example cannot drift from the code).
    #[test]
    fn the_example_configuration_is_valid_and_states_the_defaults() {
        let engine = EngineArgs {
            config: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/tally.example.toml"
            ))),
            ..Default::default()
        };
        let c = Config::resolve(&engine, &ServeArgs::default()).unwrap();
        assert_eq!(c.detect, tally_pipelines::detect::DetectorConfig::default());
        assert_eq!(c.top_trend_threshold, 0.10);
        assert_eq!(c.request_sample_rate, 0.0);
        assert_eq!(c.anomaly_idle_close, Duration::from_secs(120));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        std::fs::write(&path, "data_dir = \"/srv/tally\"\npartitions = 6\nlisten = \"127.0.0.1:9000\"\n[retention]\nminute = \"24h\"\n").unwrap();
        let engine = EngineArgs {
            config: Some(path),
            partitions: Some(8),
            ..Default::default()
        };
        let c = Config::resolve(&engine, &ServeArgs::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/tally"));
        assert_eq!(c.partitions, 8);
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.retention_minute, Duration::from_secs(86_400));
    }
}
