//! Webhooks: configured HTTP endpoints that receive the event channel.
//!
//! The persisted alert log is the delivery queue: each webhook has a
//! cursor (the last event it has finished with), stored after every
//! delivery, so a restart or an open circuit delays delivery but loses
//! nothing. The backlog is bounded by `max_pending`: when the log runs
//! that far ahead of a webhook, the oldest undelivered events are skipped
//! and counted as overflow (metric and status), never silently.
//! Delivery is at least once; the payload's `idempotency_key` lets the
//! receiver make it exactly once.
//!
//! - [`delivery`]: one task per webhook: filters, signing, retries with
//!   backoff and jitter, and the circuit breaker.
//! - [`egress`]: which destinations webhooks may reach (public addresses
//!   and the operator's allow-list), checked when configured and when
//!   delivering.

pub mod delivery;
pub mod egress;
pub mod sealed;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tally_actors::alerts::{AlertLog, EVENT_TYPES};
use tally_pipelines::circuit::{CircuitConfig, CircuitState, StatusTimeoutLatency};
use tally_state::Store;

use crate::error::FieldProblem;
use egress::EgressPolicy;

/// How a webhook is delivered to (the stored and shown configuration,
/// except that the secret is never shown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL that receives `POST`s.
    pub url: String,
    /// Key of the `X-Tally-Signature` HMAC-SHA256.
    pub secret: String,
    /// Only these event types (all when empty).
    #[serde(default)]
    pub event_types: BTreeSet<String>,
    /// Only events of these clients (all when empty).
    #[serde(default)]
    pub client_ids: BTreeSet<String>,
    #[serde(default = "enabled")]
    pub enabled: bool,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// What counts as a failure for the circuit breaker.
    #[serde(default)]
    pub failure: StatusTimeoutLatency,
}

fn enabled() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// One attempt's time limit.
    pub timeout_ms: u64,
    /// Retry waits grow from this, doubling, with full jitter...
    pub initial_backoff_ms: u64,
    /// ...up to this.
    pub max_backoff_ms: u64,
    /// Undelivered events kept at most; older ones overflow (counted).
    pub max_pending: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 5_000,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            max_pending: 100_000,
        }
    }
}

/// Every problem of a configuration, at once (`egress` judges the URL's
/// destination).
pub fn validate(id: &str, c: &WebhookConfig, egress: &EgressPolicy) -> Vec<FieldProblem> {
    let mut problems = Vec::new();
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        problems.push(FieldProblem::field(
            "id",
            "must be 1..=128 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ));
    }
    match reqwest::Url::parse(&c.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            if let Some(refusal) = egress.refusal(&u) {
                problems.push(FieldProblem::field("url", refusal));
            }
        }
        _ => problems.push(FieldProblem::field(
            "url",
            format!("{:?} is not an absolute http:// or https:// URL", c.url),
        )),
    }
    if c.secret.len() < 16 {
        problems.push(FieldProblem::field(
            "secret",
            "must be at least 16 bytes (it keys the HMAC-SHA256 signature)",
        ));
    }
    if let Some(bad) = c
        .event_types
        .iter()
        .find(|t| !EVENT_TYPES.contains(&t.as_str()))
    {
        problems.push(FieldProblem::field(
            "event_types",
            format!("unknown event type {bad:?}; use {}", EVENT_TYPES.join(", ")),
        ));
    }
    let d = &c.delivery;
    if !(1..=300_000).contains(&d.timeout_ms) {
        problems.push(FieldProblem::field(
            "delivery.timeout_ms",
            "must be within 1..=300000",
        ));
    }
    if d.initial_backoff_ms == 0 || d.max_backoff_ms < d.initial_backoff_ms {
        problems.push(FieldProblem::field(
            "delivery.max_backoff_ms",
            "backoffs must satisfy 0 < initial_backoff_ms <= max_backoff_ms",
        ));
    }
    if !(1..=10_000_000).contains(&d.max_pending) {
        problems.push(FieldProblem::field(
            "delivery.max_pending",
            "must be within 1..=10000000",
        ));
    }
    let b = &c.circuit;
    if b.failure_threshold == 0 || b.success_threshold == 0 || b.probe_count == 0 {
        problems.push(FieldProblem::field(
            "circuit",
            "failure_threshold, success_threshold and probe_count must be at least 1",
        ));
    }
    if b.reset_timeout_ms <= 0 {
        problems.push(FieldProblem::field(
            "circuit.reset_timeout_ms",
            "must be positive",
        ));
    }
    problems
}

/// What a webhook has done, persisted with its cursor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SinkCursor {
    /// The last event id finished with (delivered, rejected, filtered out
    /// or overflowed).
    pub cursor: u64,
    pub delivered: u64,
    /// Answered with a 4xx other than 408/429: the receiver refuses it, a
    /// retry would not help.
    pub rejected: u64,
    /// Skipped because the backlog exceeded `max_pending` (or retention
    /// removed them first).
    pub overflowed: u64,
}

/// A webhook's live status, as `GET /v1/webhooks/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookStatus {
    pub circuit_state: CircuitState,
    #[serde(flatten)]
    pub cursor: SinkCursor,
    /// Events logged after the cursor (an upper bound on what waits for
    /// this webhook: some may be filtered out).
    pub pending: u64,
    pub failed_attempts: u64,
    pub last_error: Option<String>,
    pub last_delivered_at: Option<String>,
}

pub(crate) fn sink_name(id: &str) -> String {
    format!("webhook/{id}")
}

struct Running {
    config: WebhookConfig,
    status: Arc<Mutex<WebhookStatus>>,
    task: tokio::task::JoinHandle<()>,
}

/// The configured webhooks and their delivery tasks.
pub struct Webhooks {
    store: Arc<Store>,
    alerts: Arc<AlertLog>,
    client: reqwest::Client,
    egress: Arc<EgressPolicy>,
    /// Seals secrets at rest and on the control topic.
    seal: sealed::SecretSeal,
    running: Mutex<BTreeMap<String, Running>>,
    /// Where delivery tasks run (configuration may arrive on another
    /// thread: the control topic's).
    runtime: tokio::runtime::Handle,
}

impl Webhooks {
    /// A configuration as it is published on the control topic (its
    /// secret sealed when a key is configured).
    pub fn encode(&self, config: &WebhookConfig) -> anyhow::Result<String> {
        self.seal.encode(config)
    }
}

/// The key of a webhook's configuration in [`Webhooks::apply_control`]
/// (and on the control topics of builds before webhooks were control
/// events).
pub fn control_key(id: &str) -> String {
    format!("webhook/{id}")
}

/// The webhooks to deliver to at start: the control plane's, and, alone,
/// those stored by a build from before webhooks were control events (the
/// plane never saw them).
pub fn configured(
    store: &Store,
    access: &crate::access::Access,
    alone: bool,
) -> anyhow::Result<Vec<(String, String)>> {
    use tally_pipelines::access::Stream;
    let mut out = access.with_plane(|p| p.webhooks());
    if alone {
        for (id, json) in store.webhooks()? {
            if access.version(Stream::Webhook(&id)) == 0 {
                out.push((id, json));
            }
        }
    }
    Ok(out)
}

/// Keeps the deliveries equal to the control plane: every applied
/// webhook change is applied to them.
pub fn follow(access: &crate::access::Access, hooks: Arc<Webhooks>) {
    use tally_pipelines::access::ControlEvent;
    access.on_applied(move |envelope| match &envelope.event {
        ControlEvent::WebhookSet { webhook_id, config } => {
            hooks.apply_control(&control_key(webhook_id), Some(config))
        }
        ControlEvent::WebhookDeleted { webhook_id } => {
            hooks.apply_control(&control_key(webhook_id), None)
        }
        _ => {}
    });
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Webhooks {
    /// Starts delivering to the `configured` webhooks (inside a tokio
    /// runtime). Deliveries reach only what `egress` permits.
    pub fn start(
        store: Arc<Store>,
        alerts: Arc<AlertLog>,
        configured: Vec<(String, String)>,
        egress: EgressPolicy,
        seal: sealed::SecretSeal,
    ) -> anyhow::Result<Arc<Webhooks>> {
        let egress = Arc::new(egress);
        let client = delivery::client(&egress)?;
        let hooks = Arc::new(Webhooks {
            store,
            alerts,
            client,
            egress,
            seal,
            running: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        });
        for (id, json) in configured {
            match hooks.seal.decode(&json) {
                Ok(config) => hooks.spawn(&id, config)?,
                Err(e) => {
                    tracing::error!(webhook = %id, error = %e, "stored webhook configuration is unreadable; not delivering to it")
                }
            }
        }
        Ok(hooks)
    }

    fn spawn(&self, id: &str, config: WebhookConfig) -> anyhow::Result<()> {
        let cursor = match self.store.sink_state::<SinkCursor>(&sink_name(id))? {
            Some(c) => c,
            None => {
                // A new webhook starts with what happens from now on.
                let c = SinkCursor {
                    cursor: self.alerts.last_id(),
                    ..SinkCursor::default()
                };
                self.store.put_sink_state(&sink_name(id), &c)?;
                c
            }
        };
        let status = Arc::new(Mutex::new(WebhookStatus {
            circuit_state: CircuitState::Closed,
            cursor,
            pending: self.alerts.last_id().saturating_sub(cursor.cursor),
            failed_attempts: 0,
            last_error: None,
            last_delivered_at: None,
        }));
        let task = self.runtime.spawn(delivery::run(delivery::Delivery {
            id: id.to_string(),
            config: config.clone(),
            store: self.store.clone(),
            alerts: self.alerts.clone(),
            client: self.client.clone(),
            egress: self.egress.clone(),
            status: status.clone(),
        }));
        if let Some(old) = lock(&self.running).insert(
            id.to_string(),
            Running {
                config,
                status,
                task,
            },
        ) {
            old.task.abort();
        }
        Ok(())
    }

    /// Creates or replaces a webhook (validated by the caller); returns
    /// whether it is new. A replaced webhook keeps its cursor.
    pub fn put(&self, id: &str, config: WebhookConfig) -> anyhow::Result<bool> {
        let existed = lock(&self.running).contains_key(id);
        self.store.put_webhook(id, &self.seal.encode(&config)?)?;
        if let Some(old) = lock(&self.running).remove(id) {
            old.task.abort();
        }
        self.spawn(id, config)?;
        Ok(!existed)
    }

    /// Deletes a webhook; returns whether it existed.
    pub fn delete(&self, id: &str) -> anyhow::Result<bool> {
        let Some(old) = lock(&self.running).remove(id) else {
            return Ok(false);
        };
        old.task.abort();
        self.store.delete_webhook(id)?;
        Ok(true)
    }

    /// Applies a control change (`webhook/<id>`: a configuration as
    /// published, or `None` for a deletion); other keys are not for
    /// webhooks. A configuration equal to the running one changes nothing.
    pub fn apply_control(&self, key: &str, value: Option<&str>) {
        let Some(id) = key.strip_prefix("webhook/") else {
            return;
        };
        let result = match value {
            None => self.delete(id).map(|_| ()),
            Some(json) => match self.seal.decode(json) {
                Ok(config) => {
                    let same = lock(&self.running)
                        .get(id)
                        .is_some_and(|r| r.config == config);
                    if same {
                        Ok(())
                    } else {
                        self.put(id, config).map(|_| ())
                    }
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::error!(webhook = id, error = %e, "cannot apply a webhook change from the control topic");
        }
    }

    pub fn get(&self, id: &str) -> Option<(WebhookConfig, WebhookStatus)> {
        let running = lock(&self.running);
        let r = running.get(id)?;
        let mut status = lock(&r.status).clone();
        status.pending = self.alerts.last_id().saturating_sub(status.cursor.cursor);
        Some((r.config.clone(), status))
    }

    /// What webhook URLs may point at.
    pub fn egress(&self) -> &EgressPolicy {
        &self.egress
    }

    pub fn ids(&self) -> Vec<String> {
        lock(&self.running).keys().cloned().collect()
    }

    /// Stops every delivery task (shutdown); cursors are already stored.
    pub fn stop(&self) {
        for (_, r) in std::mem::take(&mut *lock(&self.running)) {
            r.task.abort();
        }
    }
}
