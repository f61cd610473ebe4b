//! One client's quota as a shard holds it: the configuration, the marks
//! (events raised this period, reservations of admitted checks) and the
//! usage of the current period, read once from the flushed statistics and
//! then kept current from each flush's deltas.

use tally_pipelines::ingest::StatsDelta;
use tally_pipelines::quota::{
    period, QuotaConfig, QuotaEvent, QuotaMarks, QuotaStatus, QuotaUsage,
};
use tally_pipelines::time::{Granularity, DAY_MS};
use tally_pipelines::top::PeriodTotals;
use tally_state::Store;

use crate::alerts::AlertLog;
use crate::telemetry::QuotaEventRaised;
use crate::Error;

/// Flushed usage of one billing period, as of the current day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodUsage {
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub day_start_ms: i64,
    pub usage: QuotaUsage,
}

#[derive(Debug)]
pub(super) struct QuotaState {
    pub(super) config: QuotaConfig,
    pub(super) marks: QuotaMarks,
    usage: Option<PeriodUsage>,
}

impl QuotaState {
    pub(super) fn new(config: QuotaConfig, marks: QuotaMarks) -> Self {
        Self {
            config,
            marks,
            usage: None,
        }
    }

    pub(super) fn set_config(&mut self, config: QuotaConfig) {
        if config.reset_day != self.config.reset_day {
            self.usage = None;
        }
        self.config = config;
    }

    /// Whether the cached usage is of the period and day of `now_ms`.
    pub(super) fn usage_is_current(&self, now_ms: i64) -> bool {
        self.usage.is_some_and(|u| {
            (u.period_start_ms..u.period_end_ms).contains(&now_ms)
                && u.day_start_ms == Granularity::Day.bucket_start(now_ms)
        })
    }

    pub(super) fn install_usage(&mut self, usage: PeriodUsage) {
        self.usage = Some(usage);
    }

    /// Adds a flushed delta to the cached usage and settles reservations
    /// with its requests; whether the marks changed.
    pub(super) fn add_flushed(&mut self, delta: &StatsDelta, now_ms: i64) -> bool {
        let totals = PeriodTotals::of(&delta.stats);
        let (start, end) = period(now_ms, self.config.reset_day);
        if !(start..end).contains(&delta.minute_start_ms) {
            return false;
        }
        if let Some(u) = &mut self.usage {
            if u.period_start_ms == start {
                u.usage.requests = u.usage.requests.saturating_add(totals.requests);
                u.usage.bytes = u
                    .usage
                    .bytes
                    .saturating_add(u64::try_from(totals.bytes).unwrap_or(u64::MAX));
                if Granularity::Day.bucket_start(delta.minute_start_ms) == u.day_start_ms {
                    u.usage.today_requests = u.usage.today_requests.saturating_add(totals.requests);
                }
            }
        }
        let had = self.marks.reservations.outstanding();
        self.marks.reservations.settle(totals.requests);
        had != self.marks.reservations.outstanding()
    }

    /// The status at `now_ms` (usage must be current), releasing expired
    /// reservations first.
    pub(super) fn status(&mut self, now_ms: i64, ttl_ms: i64) -> Result<QuotaStatus, Error> {
        let u = self
            .usage
            .filter(|_| self.usage_is_current(now_ms))
            .ok_or_else(|| Error::NotLoaded("quota usage".into()))?;
        let since = u.period_start_ms.max(now_ms.saturating_sub(ttl_ms));
        self.marks.reservations.drop_before(since);
        let mut usage = u.usage;
        usage.reserved = self.marks.reservations.outstanding();
        usage.today_reserved = self.marks.reservations.outstanding_since(u.day_start_ms);
        Ok(QuotaStatus::compute(&self.config, &usage, now_ms))
    }

    /// Raises the events the status calls for; whether the marks changed.
    pub(super) fn observe(
        &mut self,
        client: &str,
        now_ms: i64,
        ttl_ms: i64,
        alerts: Option<&AlertLog>,
    ) -> bool {
        let Ok(status) = self.status(now_ms, ttl_ms) else {
            return false;
        };
        let events = self.marks.alerts.observe(&status);
        for event in &events {
            QuotaEventRaised {
                event: *event,
                client,
                percent_used: status.percent_used,
            }
            .emit();
            if let Some(alerts) = alerts {
                let kind = match event {
                    QuotaEvent::QuotaWarning => "QUOTA_WARNING",
                    QuotaEvent::QuotaExceeded => "QUOTA_EXCEEDED",
                };
                alerts.publish(
                    kind,
                    client,
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
        !events.is_empty()
    }
}

/// A client's flushed usage in the quota period containing `now_ms`, from
/// the day buckets (the numbers the usage queries return).
pub fn quota_usage(
    store: &Store,
    partition: u16,
    client: &str,
    config: &QuotaConfig,
    now_ms: i64,
) -> Result<PeriodUsage, Error> {
    let (start, end) = period(now_ms, config.reset_day);
    let today = Granularity::Day.bucket_start(now_ms);
    let mut usage = QuotaUsage::default();
    for (day_start, stats) in store.read_buckets(partition, client, Granularity::Day, start, end)? {
        let totals = PeriodTotals::of(&stats);
        usage.requests = usage.requests.saturating_add(totals.requests);
        usage.bytes = usage
            .bytes
            .saturating_add(u64::try_from(totals.bytes).unwrap_or(u64::MAX));
        if day_start == today && day_start + DAY_MS > now_ms {
            usage.today_requests = usage.today_requests.saturating_add(totals.requests);
        }
    }
    Ok(PeriodUsage {
        period_start_ms: start,
        period_end_ms: end,
        day_start_ms: today,
        usage,
    })
}
