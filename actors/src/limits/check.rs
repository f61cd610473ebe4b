//! The gateway check: quota first (a hard quota admits only what used plus
//! reserved leaves room for), then the rate limiter; a denied check
//! consumes nothing. Denials are counted for the detectors and raise at
//! most one `RATE_LIMITED` per client and minute.

use std::collections::HashMap;

use tally_pipelines::limit::policy::LimitConfig;
use tally_pipelines::quota::{QuotaConfig, QuotaStatus};
use tally_pipelines::time::Granularity;

use super::{CheckAnswer, DenyReason, ShardLimits};
use crate::telemetry::{DenialsDropped, RateLimited};
use crate::Error;

impl ShardLimits {
    /// A gateway check (`consume`) or a status read (not consuming). A
    /// denied check consumes nothing, neither limiter units nor quota.
    pub fn check(
        &mut self,
        client: &str,
        endpoint: &str,
        cost: u64,
        consume: bool,
        now_ms: i64,
    ) -> Result<CheckAnswer, Error> {
        let factor = self.settings.adaptive.factor();
        let ttl = self.settings.reservation_ttl_ms;
        let quota = match self.quotas.get_mut(client) {
            Some(q) => Some((q.status(now_ms, ttl)?, q.config.clone())),
            None => None,
        };
        let default = self.settings.default_config.clone();
        let config = self.client(client)?.config.clone().or(default);
        if let Some((status, q)) = &quota {
            if q.hard_limit && !status.admits(cost) {
                return Ok(self.quota_denial(
                    client,
                    endpoint,
                    status,
                    q,
                    config.as_deref(),
                    consume,
                    now_ms,
                    factor,
                ));
            }
        }
        let quota_overage = quota.as_ref().is_some_and(|(s, _)| s.is_exceeded);
        let Some(config) = config else {
            if consume {
                self.reserve(client, &quota, cost, now_ms);
            }
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
        let outcome = self
            .client(client)?
            .limiter
            .check(&config, factor, endpoint, now_ms, cost, consume);
        if consume && !outcome.limited {
            self.changed.insert(client.to_string());
        }
        if consume && outcome.allowed {
            self.reserve(client, &quota, cost, now_ms);
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

    /// An admitted check reserves its cost against a hard quota.
    fn reserve(
        &mut self,
        client: &str,
        quota: &Option<(QuotaStatus, QuotaConfig)>,
        cost: u64,
        now_ms: i64,
    ) {
        if !quota.as_ref().is_some_and(|(_, q)| q.hard_limit) {
            return;
        }
        if let Some(q) = self.quotas.get_mut(client) {
            q.marks.reservations.reserve(now_ms, cost);
            self.quotas_changed.insert(client.to_string());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn quota_denial(
        &mut self,
        client: &str,
        endpoint: &str,
        status: &QuotaStatus,
        q: &QuotaConfig,
        config: Option<&LimitConfig>,
        consume: bool,
        now_ms: i64,
        factor: f64,
    ) -> CheckAnswer {
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
        CheckAnswer {
            allowed: false,
            reason: Some(DenyReason::Quota),
            algorithm: config.map(|c| c.algorithm),
            limit,
            remaining: 0,
            reset_ms,
            retry_after_ms: reset_ms.saturating_sub(now_ms).max(0),
            policy: "quota".into(),
            window_seconds: u64::try_from((status.period_end_ms - status.period_start_ms) / 1000)
                .unwrap_or(0),
            factor,
            shadow_limited: false,
            quota_overage: false,
        }
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
}
