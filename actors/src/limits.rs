//! The rate-limit and quota state a shard holds for its clients, and the
//! gateway check. A client's limiter lives in the shard that owns the
//! client, so checks for one client are serialized and exact under any
//! concurrency.
//!
//! Unlike event batches, checks do not travel through the shard's mailbox:
//! a decision costs well under a microsecond, and a round trip to the
//! shard's thread and back (two context switches) cost several times the
//! rest of a check. The shard shares its limits behind a mutex instead;
//! HTTP handlers lock it for the decision, the shard for its flush. The
//! lock is per shard and held for a decision, so it is uncontended in
//! practice.
//!
//! Limiters are kept in a bounded LRU; an evicted client's state is written
//! out (if changed) and read back on its next check, giving the answer it
//! would have given in memory. Limiter state is persisted with the shard's
//! flush. Quota usage is read from the flushed statistics (the same numbers
//! the usage queries return) and cached until the next flush.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use tally_pipelines::limit::policy::{ClientLimiter, LimitConfig};
use tally_pipelines::limit::Algorithm;
use tally_pipelines::quota::{QuotaAlerts, QuotaConfig, QuotaStatus, QuotaUsage};
use tally_pipelines::time::{Granularity, DAY_MS};
use tally_state::limits::LimitWrites;
use tally_state::Store;

use crate::adaptive::AdaptiveLimits;
use crate::alerts::AlertLog;
use crate::messages::{LimitReply, LimitRequest};
use crate::telemetry::{DenialsDropped, QuotaEventRaised, RateLimited};
use crate::Error;

/// Limit settings every shard shares.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Applies to clients without their own configuration.
    /// Shared, not copied: a check takes it on every call.
    pub default_config: Option<Arc<LimitConfig>>,
    /// Clients whose limiter state a shard keeps in memory.
    pub max_clients: usize,
    pub adaptive: Arc<AdaptiveLimits>,
    /// Where RATE_LIMITED and quota events go.
    pub alerts: Option<Arc<AlertLog>>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            default_config: None,
            max_clients: 100_000,
            adaptive: Arc::default(),
            alerts: None,
        }
    }
}

/// Why a check was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    RateLimit,
    Quota,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::RateLimit => "rate_limit",
            DenyReason::Quota => "quota",
        }
    }
}

/// The answer to a check or a status request.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckAnswer {
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    /// `None` when no rate limit applies to the client.
    pub algorithm: Option<Algorithm>,
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: i64,
    pub retry_after_ms: i64,
    /// `global`, the endpoint whose limit decided, `quota`, `disabled` or
    /// `none`.
    pub policy: String,
    pub window_seconds: u64,
    pub factor: f64,
    /// Shadow mode: a limit denied, the request was allowed anyway.
    pub shadow_limited: bool,
    /// Soft quota exceeded: allowed, marked as overage.
    pub quota_overage: bool,
}

struct Client {
    /// The client's own configuration (else the default applies).
    config: Option<Arc<LimitConfig>>,
    limiter: ClientLimiter,
}

/// A shard's limits, shared with the HTTP handlers.
pub type SharedLimits = Arc<Mutex<ShardLimits>>;

/// Locks a shard's limits. A panic while holding the lock cannot leave a
/// half-applied decision (each is one assignment), so poisoning is ignored.
pub fn lock(limits: &SharedLimits) -> MutexGuard<'_, ShardLimits> {
    limits.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct ShardLimits {
    partition: u16,
    store: Arc<Store>,
    settings: LimitSettings,
    clients: LruCache<String, Client>,
    /// Clients whose limiter changed since the last flush.
    changed: HashSet<String>,
    quotas: HashMap<String, QuotaConfig>,
    alerts: HashMap<String, QuotaAlerts>,
    alerts_changed: HashSet<String>,
    /// Quota usage as of flush number `.0`.
    usage: HashMap<String, (u64, i64, QuotaUsage)>,
    flushes: u64,
    /// The minute each client last had a RATE_LIMITED event (at most one
    /// per client and minute goes on the channel).
    limited_in_minute: HashMap<String, i64>,
    /// Denied checks per (minute, client) since the detectors last took
    /// them; bounded by `max_clients` entries.
    denials: HashMap<(i64, String), u64>,
}

impl ShardLimits {
    pub fn new(partition: u16, store: Arc<Store>, settings: LimitSettings) -> Self {
        let capacity = NonZeroUsize::new(settings.max_clients.max(1)).unwrap_or(NonZeroUsize::MIN);
        let mut limits = ShardLimits {
            partition,
            store,
            settings,
            clients: LruCache::new(capacity),
            changed: HashSet::new(),
            quotas: HashMap::new(),
            alerts: HashMap::new(),
            alerts_changed: HashSet::new(),
            usage: HashMap::new(),
            flushes: 0,
            limited_in_minute: HashMap::new(),
            denials: HashMap::new(),
        };
        limits.reload();
        limits
    }

    /// Forgets everything in memory and reads the quota list again (after
    /// a restart or a restore).
    pub fn reload(&mut self) {
        self.clients.clear();
        self.changed.clear();
        self.alerts.clear();
        self.alerts_changed.clear();
        self.usage.clear();
        self.quotas = match self.store.quota_configs(self.partition) {
            Ok(q) => q.into_iter().collect(),
            Err(e) => {
                tracing::error!(shard = self.partition, error = %e, "cannot read quota configurations");
                HashMap::new()
            }
        };
    }

    fn client(&mut self, client: &str) -> Result<&mut Client, Error> {
        if !self.clients.contains(client) {
            let loaded = Client {
                config: self
                    .store
                    .limit_config(self.partition, client)?
                    .map(Arc::new),
                limiter: self
                    .store
                    .limiter(self.partition, client)?
                    .unwrap_or_default(),
            };
            if let Some((evicted, state)) = self.clients.push(client.to_string(), loaded) {
                if evicted != client && self.changed.remove(&evicted) {
                    // Written now so that reloading gives the same answer.
                    self.store
                        .put_limiter(self.partition, &evicted, &state.limiter)?;
                }
            }
        }
        self.clients
            .get_mut(client)
            .ok_or_else(|| Error::Storage("limiter cache lost an entry".into()))
    }

    /// Serves one request.
    pub fn handle(&mut self, request: LimitRequest) -> Result<LimitReply, Error> {
        match request {
            LimitRequest::Check {
                client_id,
                endpoint,
                cost,
                consume,
                now_ms,
            } => self
                .check(&client_id, &endpoint, cost, consume, now_ms)
                .map(LimitReply::Check),
            LimitRequest::SetConfig { client_id, config } => self
                .set_config(&client_id, config)
                .map(|()| LimitReply::Done),
            LimitRequest::ResetCounters {
                client_id,
                endpoint,
            } => self
                .reset_counters(&client_id, endpoint.as_deref())
                .map(|()| LimitReply::Done),
            LimitRequest::SetQuota { client_id, config } => self
                .set_quota(&client_id, config)
                .map(|()| LimitReply::Done),
        }
    }

    /// A gateway check (`consume`) or a status read (not consuming).
    pub fn check(
        &mut self,
        client: &str,
        endpoint: &str,
        cost: u64,
        consume: bool,
        now_ms: i64,
    ) -> Result<CheckAnswer, Error> {
        let factor = self.settings.adaptive.factor();
        let quota = match self.quotas.get(client).cloned() {
            Some(config) => Some((self.quota_status(client, &config, now_ms)?, config)),
            None => None,
        };
        let default = self.settings.default_config.clone();
        let entry = self.client(client)?;
        let config = entry.config.clone().or(default);
        if let Some((status, q)) = &quota {
            if status.is_exceeded && q.hard_limit {
                let limit = q
                    .monthly_request_limit
                    .or(q.daily_request_limit)
                    .unwrap_or(0);
                let reset_ms = status.retry_at_ms(q, now_ms);
                RateLimited {
                    reason: DenyReason::Quota,
                }
                .emit();
                if consume {
                    self.count_denial(client, now_ms);
                    self.rate_limited_event(client, endpoint, "quota", now_ms);
                }
                return Ok(CheckAnswer {
                    allowed: false,
                    reason: Some(DenyReason::Quota),
                    algorithm: config.as_ref().map(|c| c.algorithm),
                    limit,
                    remaining: 0,
                    reset_ms,
                    retry_after_ms: reset_ms.saturating_sub(now_ms).max(0),
                    policy: "quota".into(),
                    window_seconds: u64::try_from(
                        (status.period_end_ms - status.period_start_ms) / 1000,
                    )
                    .unwrap_or(0),
                    factor,
                    shadow_limited: false,
                    quota_overage: false,
                });
            }
        }
        let quota_overage = quota.as_ref().is_some_and(|(s, _)| s.is_exceeded);
        let Some(config) = config else {
            return Ok(CheckAnswer {
                allowed: true,
                reason: None,
                algorithm: None,
                limit: 0,
                remaining: 0,
                reset_ms: now_ms,
                retry_after_ms: 0,
                policy: "none".into(),
                window_seconds: 0,
                factor,
                shadow_limited: false,
                quota_overage,
            });
        };
        let outcome = entry
            .limiter
            .check(&config, factor, endpoint, now_ms, cost, consume);
        if consume && !outcome.limited {
            self.changed.insert(client.to_string());
        }
        if outcome.limited {
            RateLimited {
                reason: DenyReason::RateLimit,
            }
            .emit();
            if consume && !outcome.allowed {
                self.count_denial(client, now_ms);
            }
            if consume {
                let reason = if outcome.allowed {
                    "shadow"
                } else {
                    "rate_limit"
                };
                self.rate_limited_event(client, endpoint, reason, now_ms);
            }
        }
        Ok(CheckAnswer {
            allowed: outcome.allowed,
            reason: (!outcome.allowed).then_some(DenyReason::RateLimit),
            algorithm: Some(outcome.algorithm),
            limit: outcome.decision.limit,
            remaining: outcome.decision.remaining,
            reset_ms: outcome.decision.reset_ms,
            retry_after_ms: outcome.decision.retry_after_ms,
            policy: outcome.policy,
            window_seconds: outcome.limit.window_seconds,
            factor,
            shadow_limited: outcome.limited && outcome.allowed,
            quota_overage,
        })
    }

    /// Denied checks per (minute, client) since the last call.
    pub fn take_denials(&mut self) -> HashMap<(i64, String), u64> {
        std::mem::take(&mut self.denials)
    }

    fn count_denial(&mut self, client: &str, now_ms: i64) {
        let key = (Granularity::Minute.bucket_start(now_ms), client.to_string());
        if let Some(n) = self.denials.get_mut(&key) {
            *n += 1;
        } else if self.denials.len() < self.settings.max_clients {
            self.denials.insert(key, 1);
        } else {
            DenialsDropped.emit();
        }
    }

    fn rate_limited_event(&mut self, client: &str, endpoint: &str, reason: &str, now_ms: i64) {
        let Some(alerts) = &self.settings.alerts else {
            return;
        };
        let minute = Granularity::Minute.bucket_start(now_ms);
        if self.limited_in_minute.get(client) == Some(&minute) {
            return;
        }
        if self.limited_in_minute.len() >= self.settings.max_clients {
            self.limited_in_minute.clear();
        }
        self.limited_in_minute.insert(client.to_string(), minute);
        alerts.publish(
            "RATE_LIMITED",
            client,
            Some(endpoint),
            now_ms,
            serde_json::json!({"reason": reason}),
        );
    }

    pub fn set_config(&mut self, client: &str, config: Option<LimitConfig>) -> Result<(), Error> {
        self.store
            .put_limit_config(self.partition, client, config.as_ref())?;
        let entry = self.client(client)?;
        if let Some(c) = &config {
            entry.limiter.retain_configured(c);
        }
        entry.config = config.map(Arc::new);
        self.changed.insert(client.to_string());
        Ok(())
    }

    pub fn reset_counters(&mut self, client: &str, endpoint: Option<&str>) -> Result<(), Error> {
        self.client(client)?.limiter.reset(endpoint);
        self.changed.insert(client.to_string());
        Ok(())
    }

    pub fn set_quota(&mut self, client: &str, config: Option<QuotaConfig>) -> Result<(), Error> {
        self.store
            .put_quota_config(self.partition, client, config.as_ref())?;
        self.usage.remove(client);
        match config {
            Some(c) => self.quotas.insert(client.to_string(), c),
            None => self.quotas.remove(client),
        };
        Ok(())
    }

    /// Whether a flush has limiter state to write.
    pub fn has_changes(&self) -> bool {
        !self.changed.is_empty() || !self.alerts_changed.is_empty()
    }

    /// Changed limiter state and alert marks, for the flush's WriteBatch.
    pub fn take_writes(&mut self) -> LimitWrites {
        let mut writes = LimitWrites::default();
        for client in self.changed.drain() {
            if let Some(entry) = self.clients.peek(&client) {
                writes.limiters.push((client, entry.limiter.clone()));
            }
        }
        for client in self.alerts_changed.drain() {
            if let Some(a) = self.alerts.get(&client) {
                writes.quota_alerts.push((client, *a));
            }
        }
        writes
    }

    /// After a flush: quota usage moved, so cached usage is stale, and the
    /// flushed clients with a quota may have crossed a threshold.
    pub fn after_flush<'a>(&mut self, flushed: impl Iterator<Item = &'a str>, now_ms: i64) {
        self.flushes += 1;
        let with_quota: Vec<(String, QuotaConfig)> = flushed
            .filter_map(|c| self.quotas.get(c).map(|q| (c.to_string(), q.clone())))
            .collect();
        for (client, config) in with_quota {
            let status = match self.quota_status(&client, &config, now_ms) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(shard = self.partition, error = %e, "cannot evaluate quota");
                    continue;
                }
            };
            let alerts = match self.alerts.get_mut(&client) {
                Some(a) => a,
                None => {
                    let stored = self
                        .store
                        .quota_alerts(self.partition, &client)
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    self.alerts.entry(client.clone()).or_insert(stored)
                }
            };
            let events = alerts.observe(&status);
            if !events.is_empty() {
                self.alerts_changed.insert(client.clone());
            }
            for event in events {
                QuotaEventRaised {
                    event,
                    client: &client,
                    percent_used: status.percent_used,
                }
                .emit();
                if let Some(alerts) = &self.settings.alerts {
                    let kind = match event {
                        tally_pipelines::quota::QuotaEvent::QuotaWarning => "QUOTA_WARNING",
                        tally_pipelines::quota::QuotaEvent::QuotaExceeded => "QUOTA_EXCEEDED",
                    };
                    alerts.publish(
                        kind,
                        &client,
                        None,
                        now_ms,
                        serde_json::json!({
                            "percent_used": status.percent_used,
                            "requests_used": status.requests_used,
                            "requests_limit": status.requests_limit,
                            "data_transfer_used": status.data_transfer_used,
                            "data_transfer_limit": status.data_transfer_limit,
                            "period_start_ms": status.period_start_ms,
                        }),
                    );
                }
            }
        }
    }

    /// Quota status from the flushed statistics, cached until the next
    /// flush (or a new day).
    fn quota_status(
        &mut self,
        client: &str,
        config: &QuotaConfig,
        now_ms: i64,
    ) -> Result<QuotaStatus, Error> {
        let day = Granularity::Day.bucket_start(now_ms);
        let usage = match self.usage.get(client) {
            Some(&(flushes, at_day, usage)) if flushes == self.flushes && at_day == day => usage,
            _ => {
                let usage = quota_usage(&self.store, self.partition, client, config, now_ms)?;
                self.usage
                    .insert(client.to_string(), (self.flushes, day, usage));
                usage
            }
        };
        Ok(QuotaStatus::compute(config, &usage, now_ms))
    }
}

/// A client's usage in its current quota period, from the day buckets.
pub fn quota_usage(
    store: &Store,
    partition: u16,
    client: &str,
    config: &QuotaConfig,
    now_ms: i64,
) -> Result<QuotaUsage, Error> {
    let (start, end) = tally_pipelines::quota::period(now_ms, config.reset_day);
    let today = Granularity::Day.bucket_start(now_ms);
    let mut usage = QuotaUsage::default();
    for (day_start, stats) in store.read_buckets(partition, client, Granularity::Day, start, end)? {
        let (mut requests, mut bytes) = (0u64, 0u128);
        for (_, e) in stats.endpoints() {
            requests += e.requests;
            bytes += e.bytes;
        }
        usage.requests += requests;
        usage.bytes = usage
            .bytes
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
        if day_start == today && day_start + DAY_MS > now_ms {
            usage.today_requests += requests;
        }
    }
    Ok(usage)
}
