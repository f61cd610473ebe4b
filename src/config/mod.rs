//! Configuration: one layered [`Settings`] struct (the TOML file, then
//! `TALLY_*` environment variables and flags, which clap reads together),
//! resolved into a typed [`Config`]. Validation reports every problem at
//! once.

mod settings;
mod telemetry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use settings::{SecretString, Settings};

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
    pub partitioner: tally_pipelines::partitioner::Partitioner,
    pub shard_threads: usize,
    pub flush_interval: Duration,
    pub flush_max_events: usize,
    pub mailbox_capacity: usize,
    pub sync_writes: bool,
    pub allowed_lateness: Duration,
    pub dedupe_window: Duration,
    /// Event ids in memory over all partitions' dedupe indexes.
    pub dedupe_max_ids: usize,
    pub max_future: Duration,
    pub max_body_bytes: usize,
    /// Load shedding: ingest bodies and body bytes in flight at once.
    pub max_ingest_requests: usize,
    pub max_ingest_bytes: usize,
    /// SSE and WebSocket subscriptions open at once.
    pub max_subscribers: usize,
    pub max_webhooks: usize,
    /// Non-public webhook destinations the operator allows.
    pub webhook_allow: crate::webhooks::egress::EgressPolicy,
    pub request_timeout: Duration,
    /// How long the audit trail keeps records.
    pub audit_retention: Duration,
    /// A billing period closes this long after its end plus the allowed
    /// lateness.
    pub billing_close_delay: Duration,
    pub max_errors_reported: usize,
    pub retention_minute: Duration,
    pub retention_hour: Duration,
    pub retention_day: Duration,
    pub retention_dead_letter: Duration,
    pub retention_alerts: Duration,
    pub log_format: Option<LogFormat>,
    pub compute_units: HashMap<String, u64>,
    pub kafka: Option<tally_actors::kafka::source::KafkaConfig>,
    pub kafka_outage_grace: Duration,
    /// Advertised HTTP base URL, if configured.
    pub advertise: Option<String>,
    pub limit_default: Option<tally_pipelines::limit::policy::LimitConfig>,
    pub limits_max_clients: usize,
    pub quota_reservation_ttl: Duration,
    pub detect: tally_pipelines::detect::DetectorConfig,
    /// Telemetry resolutions and the series bound of a partition.
    pub telemetry: tally_pipelines::telemetry::ingest::TelemetryRules,
    /// Retention of each stored telemetry resolution, in its order.
    pub telemetry_retention: Vec<Duration>,
    /// What telemetry series are watched for.
    pub watch: tally_pipelines::telemetry::watch::WatchRules,
    pub max_detectors: usize,
    pub max_ranked_clients: usize,
    pub memtable_bytes: usize,
    pub block_cache_bytes: usize,
    pub anomaly_idle_close: Duration,
    /// Top consumers: a change beyond this share is a trend.
    pub top_trend_threshold: f64,
    /// Share of accepted events published as `REQUEST_RECORDED`.
    pub request_sample_rate: f64,
    /// The adaptive limit factor, shared by shards and the HTTP API.
    pub adaptive: Arc<tally_actors::adaptive::AdaptiveLimits>,
    /// The one wall clock every component reads.
    pub clock: tally_state::clock::SharedClock,
    /// The key that exists from start-up (never shown by `Debug`).
    pub bootstrap_key: Option<settings::SecretString>,
    /// An open API may listen beyond loopback.
    pub insecure: bool,
    /// Readiness and metrics want a key.
    pub keyed_ops: bool,
    /// How JWTs are checked (none configured: no JWT is accepted).
    pub jwt: crate::jwt::JwtSettings,
    /// Seals webhook secrets (no key: stored as given).
    pub secret_seal: crate::webhooks::sealed::SecretSeal,
}

/// `tally.telemetry` beside the default request topic, else
/// `<topic>.telemetry`: instances sharing a broker under different request
/// topics never share a telemetry topic.
fn default_telemetry_topic(topic: &str) -> String {
    match topic.strip_suffix(".requests") {
        Some(stem) => format!("{stem}.telemetry"),
        None => format!("{topic}.telemetry"),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Config {
    /// Resolves the flags (and environment) layered over the file they
    /// name, if any.
    pub fn resolve(flags: &Settings) -> Result<Config, Vec<String>> {
        let file = match &flags.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => match toml::from_str::<Settings>(&text) {
                    Ok(f) => f,
                    Err(e) => return Err(vec![format!("{}: {e}", path.display())]),
                },
                Err(e) => return Err(vec![format!("cannot read {}: {e}", path.display())]),
            },
            None => Settings::default(),
        };
        Self::from_settings(file.over(flags.clone()))
    }

    fn from_settings(s: Settings) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let request_sample_rate = s.alerts.request_sample_rate.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&request_sample_rate) {
            problems.push(format!(
                "alerts.request_sample_rate must be within 0..=1, got {request_sample_rate}"
            ));
        }
        let top_trend_threshold = s.top.trend_threshold.unwrap_or(0.10);
        if !(0.0..=10.0).contains(&top_trend_threshold) {
            problems.push(format!(
                "top.trend_threshold must be within 0..=10 (a share: 0.1 = 10 %), got {top_trend_threshold}"
            ));
        }
        let mut duration = |name: &str, value: &Option<String>, default: &str| -> Duration {
            let text = value.as_deref().unwrap_or(default);
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
        let flush_interval = duration("flush_interval", &s.flush_interval, "1s");
        let allowed_lateness = duration("allowed_lateness", &s.allowed_lateness, "5m");
        let dedupe_window = duration("dedupe_window", &s.dedupe_window, "1h");
        let max_future = duration("max_future", &s.max_future, "15m");
        let request_timeout = duration("request_timeout", &s.request_timeout, "60s");
        let audit_retention = duration("audit_retention", &s.audit_retention, "30d");
        let billing_close_delay = duration("billing_close_delay", &s.billing_close_delay, "1h");
        let anomaly_idle_close = duration("anomaly_idle_close", &s.anomaly_idle_close, "2m");
        let kafka_outage_grace = duration("kafka.outage_grace", &s.kafka.outage_grace, "30s");
        let changelog_interval = duration(
            "kafka.changelog_interval",
            &s.kafka.changelog_interval,
            "1s",
        );
        let session_timeout = duration("kafka.session_timeout", &s.kafka.session_timeout, "45s");
        let retention_minute = duration("retention.minute", &s.retention.minute, "48h");
        let retention_hour = duration("retention.hour", &s.retention.hour, "90days");
        let retention_day = duration("retention.day", &s.retention.day, "730days");
        let retention_alerts = duration("retention.alerts", &s.retention.alerts, "7days");
        let retention_dead_letter =
            duration("retention.dead_letter", &s.retention.dead_letter, "7days");
        let quota_reservation_ttl = duration(
            "limits.quota_reservation_ttl",
            &s.limits.quota_reservation_ttl,
            "5m",
        );
        let listen_text = s.listen.clone().unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen_text.parse().unwrap_or_else(|e| {
            problems.push(format!(
                "listen: {listen_text:?} is not an address such as 127.0.0.1:8080 ({e})"
            ));
            SocketAddr::from(([127, 0, 0, 1], 8080))
        });
        let partitions = s.partitions.unwrap_or(12);
        if partitions == 0 || partitions > 4096 {
            problems.push(format!("partitions: {partitions} is outside 1..=4096"));
        }
        let partitioner = match s.partitioner.as_deref() {
            None => Default::default(),
            Some(name) => name.parse().unwrap_or_else(|e| {
                problems.push(format!("partitioner: {e}"));
                Default::default()
            }),
        };
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let shard_threads = s.shard_threads.unwrap_or(cpus);
        let flush_max_events = s.flush_max_events.unwrap_or(25_000);
        let mailbox_capacity = s.mailbox_capacity.unwrap_or(16);
        let dedupe_max_ids = s.dedupe_max_ids.unwrap_or(4_000_000);
        let max_ingest_requests = s.max_ingest_requests.unwrap_or(64);
        let max_ingest_bytes = s.max_ingest_bytes.unwrap_or(512 << 20);
        let max_subscribers = s.max_subscribers.unwrap_or(1000);
        let max_webhooks = s.max_webhooks.unwrap_or(100);
        let limits_max_clients = s.limits.max_clients.unwrap_or(1_000_000);
        let max_detectors = s.memory.detectors.unwrap_or(200_000);
        let max_ranked_clients = s.memory.ranked_clients.unwrap_or(120_000);
        let max_errors_reported = s.max_errors_reported.unwrap_or(1000);
        let memtable_bytes = s.memory.memtable_bytes.unwrap_or(192 << 20);
        let block_cache_bytes = s.memory.block_cache_bytes.unwrap_or(64 << 20);
        let restore_memory_bytes = s.memory.restore_bytes.unwrap_or(64 << 20);
        if memtable_bytes < (8 << 20) {
            problems.push(format!(
                "memory.memtable_bytes: {memtable_bytes} is below 8 MiB"
            ));
        }
        for (name, v) in [
            ("shard_threads", shard_threads),
            ("flush_max_events", flush_max_events),
            ("mailbox_capacity", mailbox_capacity),
            ("dedupe_max_ids", dedupe_max_ids),
            ("max_ingest_requests", max_ingest_requests),
            ("max_subscribers", max_subscribers),
            ("max_webhooks", max_webhooks),
            ("limits.max_clients", limits_max_clients),
            ("memory.detectors", max_detectors),
            ("memory.ranked_clients", max_ranked_clients),
        ] {
            if v == 0 {
                problems.push(format!("{name}: must be at least 1"));
            }
        }
        if flush_interval.is_zero() {
            problems.push("flush_interval: must be above zero".into());
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(64 << 20);
        if max_body_bytes < 1024 {
            problems.push(format!("max_body_bytes: {max_body_bytes} is below 1024"));
        }
        if max_ingest_bytes < max_body_bytes {
            problems.push(format!(
                "max_ingest_bytes: {max_ingest_bytes} is below max_body_bytes ({max_body_bytes}); no body of the largest size could be taken"
            ));
        }
        let webhook_allow = match crate::webhooks::egress::EgressPolicy::parse(
            s.webhook_allow.as_deref().unwrap_or(""),
        ) {
            Ok(policy) => policy,
            Err(bad) => {
                problems.extend(bad.into_iter().map(|p| format!("webhook_allow: {p}")));
                Default::default()
            }
        };
        let secret_seal = match &s.secrets_key {
            Some(k) => match crate::webhooks::sealed::SecretSeal::from_hex(k.expose()) {
                Ok(seal) => seal,
                Err(e) => {
                    problems.push(format!("secrets_key: {e}"));
                    Default::default()
                }
            },
            None => Default::default(),
        };
        let log_format = match s.log_format.as_deref() {
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
        let advertise = s.advertise.clone();
        if let Some(a) = &advertise {
            if !(a.starts_with("http://") || a.starts_with("https://")) {
                problems.push(format!(
                    "advertise: {a:?} is not an http:// or https:// base URL"
                ));
            }
        }
        if let Some(default) = &s.limits.default {
            for (field, reason) in default.problems() {
                problems.push(format!("limits.default.{field}: {reason}"));
            }
        }
        let kafka = s
            .kafka
            .brokers
            .clone()
            .filter(|b| !b.trim().is_empty())
            .map(|brokers| {
                let topic = s
                    .kafka
                    .topic
                    .clone()
                    .unwrap_or_else(|| "tally.requests".into());
                tally_actors::kafka::source::KafkaConfig {
                    brokers,
                    group: s.kafka.group.clone().unwrap_or_else(|| "tally".into()),
                    dead_letter_topic: s
                        .kafka
                        .dead_letter_topic
                        .clone()
                        .unwrap_or_else(|| format!("{topic}.dlq")),
                    telemetry_topic: s
                        .kafka
                        .telemetry_topic
                        .clone()
                        .unwrap_or_else(|| default_telemetry_topic(&topic)),
                    topic,
                    batch_max: 50_000,
                    batch_linger: Duration::from_millis(20),
                    session_timeout,
                    changelog_interval,
                    restore_memory_bytes,
                }
            });
        if let Some(k) = kafka.as_ref().filter(|k| k.telemetry_topic == k.topic) {
            problems.push(format!(
                "kafka.telemetry_topic: {:?} is the request topic; telemetry needs a topic of its own",
                k.topic
            ));
        }
        let telemetry::Resolved {
            rules: telemetry,
            retention: telemetry_retention,
            watch,
        } = telemetry::resolve(&s.telemetry, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            data_dir: s.data_dir.unwrap_or_else(|| PathBuf::from("data")),
            listen,
            partitions,
            partitioner,
            shard_threads,
            flush_interval,
            flush_max_events,
            mailbox_capacity,
            sync_writes: s.sync_writes.unwrap_or(true),
            bootstrap_key: s.bootstrap_key.clone(),
            insecure: s.insecure.unwrap_or(false),
            keyed_ops: s.keyed_ops.unwrap_or(false),
            secret_seal,
            jwt: crate::jwt::JwtSettings {
                hs256_secret: s.jwt_hs256_secret.clone(),
                rs256_public_key: s.jwt_rs256_public_key.clone(),
                jwks: s.jwt_jwks.clone(),
                issuer: s.jwt_issuer.clone(),
                audience: s.jwt_audience.clone(),
            },
            allowed_lateness,
            dedupe_window,
            dedupe_max_ids,
            max_future,
            max_body_bytes,
            max_ingest_requests,
            max_ingest_bytes,
            max_subscribers,
            max_webhooks,
            webhook_allow,
            request_timeout,
            audit_retention,
            billing_close_delay,
            max_errors_reported,
            retention_minute,
            retention_hour,
            retention_day,
            retention_dead_letter,
            retention_alerts,
            log_format,
            compute_units: s.compute_units,
            kafka,
            kafka_outage_grace,
            advertise: advertise.map(|a| a.trim_end_matches('/').to_string()),
            limit_default: s.limits.default,
            limits_max_clients,
            quota_reservation_ttl,
            adaptive: Default::default(),
            detect: s.detect.unwrap_or_default(),
            telemetry,
            telemetry_retention,
            watch,
            max_detectors,
            max_ranked_clients,
            memtable_bytes,
            block_cache_bytes,
            anomaly_idle_close,
            top_trend_threshold,
            request_sample_rate,
            clock: tally_state::clock::system(),
        })
    }

    pub fn store_options(&self) -> tally_state::StoreOptions {
        tally_state::StoreOptions {
            partitions: self.partitions,
            partitioner: self.partitioner,
            retention: tally_state::Retention {
                minute_ms: ms(self.retention_minute),
                hour_ms: ms(self.retention_hour),
                day_ms: ms(self.retention_day),
                dedupe_window_ms: ms(self.dedupe_window),
                dead_letter_ms: ms(self.retention_dead_letter),
                alerts_ms: ms(self.retention_alerts),
                telemetry: {
                    let mut t = [(0, 0); tally_state::retention::MAX_TELEMETRY_RESOLUTIONS];
                    for (slot, (r, keep)) in t.iter_mut().zip(
                        self.telemetry
                            .resolutions_ms
                            .iter()
                            .zip(&self.telemetry_retention),
                    ) {
                        *slot = (*r, ms(*keep));
                    }
                    t
                },
            },
            clock: self.clock.clone(),
            memtable_budget_bytes: self.memtable_bytes,
            block_cache_bytes: self.block_cache_bytes,
            ..Default::default()
        }
    }

    pub fn shard_config(&self) -> tally_actors::ShardConfig {
        let per_shard = |total: usize| (total / usize::from(self.partitions.max(1))).max(1);
        tally_actors::ShardConfig {
            rules: tally_pipelines::ingest::PartitionRules {
                allowed_lateness_ms: ms(self.allowed_lateness),
                dedupe_window_ms: ms(self.dedupe_window),
            },
            weights: Arc::new(tally_pipelines::aggregate::ComputeWeights {
                per_endpoint: self.compute_units.clone(),
            }),
            flush_interval: self.flush_interval,
            flush_max_events: self.flush_max_events,
            mailbox_capacity: self.mailbox_capacity,
            sync_writes: self.sync_writes,
            dedupe: tally_pipelines::dedupe::DedupeBudget::new(self.dedupe_max_ids),
            limits: tally_actors::limits::LimitSettings {
                default_config: self.limit_default.clone().map(Arc::new),
                max_clients: per_shard(self.limits_max_clients),
                adaptive: self.adaptive.clone(),
                // Set by `serve`, which owns the event channel.
                alerts: None,
                reservation_ttl_ms: ms(self.quota_reservation_ttl),
            },
            detect: tally_actors::anomaly::DetectSettings {
                config: self.detect.clone(),
                idle_close: self.anomaly_idle_close,
                alerts: None,
                max_detectors: per_shard(self.max_detectors),
            },
            max_ranked_clients: per_shard(self.max_ranked_clients),
            request_sampler: tally_pipelines::sample::RequestSampler::new(self.request_sample_rate),
            clock: self.clock.clone(),
            telemetry: self.telemetry.clone(),
            watch: Arc::new(self.watch.clone()),
        }
    }

    pub fn validation(&self, now_ms: i64) -> tally_pipelines::event::ValidationContext {
        tally_pipelines::event::ValidationContext {
            now_ms,
            max_future_ms: ms(self.max_future),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_telemetry_topic_sits_beside_the_request_topic() {
        assert_eq!(default_telemetry_topic("tally.requests"), "tally.telemetry");
        assert_eq!(default_telemetry_topic("acme.requests"), "acme.telemetry");
        assert_eq!(default_telemetry_topic("gateway"), "gateway.telemetry");
        let mut s = Settings::default();
        s.kafka.brokers = Some("127.0.0.1:9092".into());
        s.kafka.topic = Some("t".into());
        s.kafka.telemetry_topic = Some("t".into());
        let problems = Config::resolve(&s).err().unwrap_or_default();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("kafka.telemetry_topic")),
            "{problems:?}"
        );
    }

    #[test]
    fn defaults_match_the_readme() {
        let c = Config::resolve(&Settings::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.partitions, 12);
        assert_eq!(c.allowed_lateness, Duration::from_secs(300));
        assert_eq!(c.max_body_bytes, 64 << 20);
        assert_eq!(c.dedupe_max_ids, 4_000_000);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let flags = Settings {
            partitions: Some(0),
            allowed_lateness: Some("soon".into()),
            log_format: Some("xml".into()),
            listen: Some("nowhere".into()),
            ..Default::default()
        };
        let problems = Config::resolve(&flags).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    /// The shipped example is valid and its detector block states the
    /// defaults (so the example cannot drift from the code).
    #[test]
    fn the_example_configuration_is_valid_and_states_the_defaults() {
        let flags = Settings {
            config: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/tally.example.toml"
            ))),
            ..Default::default()
        };
        let c = Config::resolve(&flags).unwrap();
        assert_eq!(c.detect, tally_pipelines::detect::DetectorConfig::default());
        assert_eq!(c.top_trend_threshold, 0.10);
        assert_eq!(c.request_sample_rate, 0.0);
        assert_eq!(c.anomaly_idle_close, Duration::from_secs(120));
        assert_eq!(c.max_detectors, 200_000);
    }

    #[test]
    fn every_bad_webhook_allow_entry_is_a_problem_named_after_the_setting() {
        let flags = Settings {
            webhook_allow: Some("127.0.0.1/32,10.0.0.0/40,hooks.internal,a b".into()),
            ..Default::default()
        };
        let problems = Config::resolve(&flags).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().all(|p| p.starts_with("webhook_allow: ")),
            "{problems:?}"
        );
        let flags = Settings {
            webhook_allow: Some("127.0.0.1/32,hooks.internal".into()),
            ..Default::default()
        };
        let c = Config::resolve(&flags).unwrap();
        assert!(c
            .webhook_allow
            .permits_address("127.0.0.1".parse().unwrap()));
        assert!(!c.webhook_allow.permits_address("10.0.0.1".parse().unwrap()));
        assert!(c.webhook_allow.permits_host("hooks.internal"));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally.toml");
        std::fs::write(&path, "data_dir = \"/srv/tally\"\npartitions = 6\nlisten = \"127.0.0.1:9000\"\n[retention]\nminute = \"24h\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n").unwrap();
        let flags = Settings {
            config: Some(path),
            partitions: Some(8),
            ..Default::default()
        };
        let c = Config::resolve(&flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/tally"));
        assert_eq!(c.partitions, 8);
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.retention_minute, Duration::from_secs(86_400));
        assert_eq!(
            c.kafka.map(|k| k.brokers).as_deref(),
            Some("127.0.0.1:9092")
        );
    }
}
