//! Quotas: monthly and daily allowances over a billing month that starts
//! on a configurable day, their status, and the warning / exceeded events
//! raised once per period.

use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::time::{Granularity, DAY_MS};

fn eighty() -> u8 {
    80
}

fn yes() -> bool {
    true
}

fn first() -> u8 {
    1
}

/// `PUT /v1/clients/{id}/quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    #[serde(default)]
    pub monthly_request_limit: Option<u64>,
    #[serde(default)]
    pub monthly_data_transfer_bytes: Option<u64>,
    #[serde(default)]
    pub daily_request_limit: Option<u64>,
    #[serde(default = "eighty")]
    pub warning_threshold_percent: u8,
    /// Deny checks once exceeded (else allow and mark the overage).
    #[serde(default = "yes")]
    pub hard_limit: bool,
    /// Day of the month the period starts; 29..=31 fall back to the last
    /// day of shorter months.
    #[serde(default = "first")]
    pub reset_day: u8,
}

impl QuotaConfig {
    /// Every problem, as (field, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(1..=31).contains(&self.reset_day) {
            out.push(("reset_day".into(), "must be within 1..=31".into()));
        }
        if !(1..=100).contains(&self.warning_threshold_percent) {
            out.push((
                "warning_threshold_percent".into(),
                "must be within 1..=100".into(),
            ));
        }
        if self.monthly_request_limit.is_none()
            && self.monthly_data_transfer_bytes.is_none()
            && self.daily_request_limit.is_none()
        {
            out.push((
                "monthly_request_limit".into(),
                "at least one of monthly_request_limit, monthly_data_transfer_bytes, daily_request_limit is required".into(),
            ));
        }
        out
    }
}

/// The start of the period whose reset day falls in `year`/`month`.
fn reset_instant(year: i32, month: u32, reset_day: u8) -> i64 {
    let last_day = (28..=31)
        .rev()
        .find(|&d| NaiveDate::from_ymd_opt(year, month, d).is_some())
        .unwrap_or(28);
    let day = u32::from(reset_day).clamp(1, last_day);
    NaiveDate::from_ymd_opt(year, month, day)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(0)
}

fn shift_month(year: i32, month: u32, by: i32) -> (i32, u32) {
    let index = year * 12 + month as i32 - 1 + by;
    (index.div_euclid(12), (index.rem_euclid(12) + 1) as u32)
}

/// The billing period `[start, end)` (UTC) containing `at_ms`.
pub fn period(at_ms: i64, reset_day: u8) -> (i64, i64) {
    let date = Utc
        .timestamp_millis_opt(at_ms)
        .single()
        .map(|t| t.date_naive())
        .unwrap_or_default();
    let (y, m) = (date.year(), date.month());
    let this = reset_instant(y, m, reset_day);
    let (start_ym, end_ym) = if at_ms >= this {
        ((y, m), shift_month(y, m, 1))
    } else {
        (shift_month(y, m, -1), (y, m))
    };
    (
        reset_instant(start_ym.0, start_ym.1, reset_day),
        reset_instant(end_ym.0, end_ym.1, reset_day),
    )
}

/// Usage counted against a quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub requests: u64,
    pub bytes: u64,
    /// Requests of the current UTC day.
    pub today_requests: u64,
    /// Requests admitted by checks whose events have not been ingested
    /// yet (see [`crate::reservation`]), in the period and today.
    pub reserved: u64,
    pub today_reserved: u64,
}

/// `GET /v1/clients/{id}/quota/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaStatus {
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub requests_used: u64,
    /// Admitted by checks, not yet ingested: counted against the limits
    /// (so concurrent checks cannot overshoot), not in `requests_used`
    /// (which is what the usage queries say).
    pub requests_reserved: u64,
    pub requests_limit: Option<u64>,
    pub requests_remaining: Option<u64>,
    pub data_transfer_used: u64,
    pub data_transfer_limit: Option<u64>,
    pub data_transfer_remaining: Option<u64>,
    pub daily_requests_used: u64,
    pub daily_requests_reserved: u64,
    pub daily_request_limit: Option<u64>,
    /// The highest share used of any configured allowance.
    pub percent_used: f64,
    pub is_warning: bool,
    pub is_exceeded: bool,
}

impl QuotaStatus {
    pub fn compute(config: &QuotaConfig, usage: &QuotaUsage, at_ms: i64) -> QuotaStatus {
        let (start, end) = period(at_ms, config.reset_day);
        let pairs = [
            (usage.requests, config.monthly_request_limit),
            (usage.bytes, config.monthly_data_transfer_bytes),
            (usage.today_requests, config.daily_request_limit),
        ];
        let percent_used = pairs
            .iter()
            .filter_map(|&(used, limit)| limit.map(|l| percent(used, l)))
            .fold(0.0, f64::max);
        let is_exceeded = pairs
            .iter()
            .any(|&(used, limit)| limit.is_some_and(|l| used >= l));
        QuotaStatus {
            period_start_ms: start,
            period_end_ms: end,
            requests_used: usage.requests,
            requests_reserved: usage.reserved,
            requests_limit: config.monthly_request_limit,
            requests_remaining: config
                .monthly_request_limit
                .map(|l| l.saturating_sub(usage.requests.saturating_add(usage.reserved))),
            data_transfer_used: usage.bytes,
            data_transfer_limit: config.monthly_data_transfer_bytes,
            data_transfer_remaining: config
                .monthly_data_transfer_bytes
                .map(|l| l.saturating_sub(usage.bytes)),
            daily_requests_used: usage.today_requests,
            daily_requests_reserved: usage.today_reserved,
            daily_request_limit: config.daily_request_limit,
            percent_used,
            is_warning: percent_used >= f64::from(config.warning_threshold_percent),
            is_exceeded,
        }
    }

    /// Whether a check of `cost` requests fits: used plus reserved plus
    /// the cost within every request allowance, and the data allowance not
    /// used up (a check does not know its bytes yet).
    pub fn admits(&self, cost: u64) -> bool {
        let fits = |used: u64, reserved: u64, limit: Option<u64>| {
            limit.is_none_or(|l| used.saturating_add(reserved).saturating_add(cost) <= l)
        };
        fits(
            self.requests_used,
            self.requests_reserved,
            self.requests_limit,
        ) && fits(
            self.daily_requests_used,
            self.daily_requests_reserved,
            self.daily_request_limit,
        ) && self
            .data_transfer_limit
            .is_none_or(|l| self.data_transfer_used < l)
    }

    /// When a denied check may succeed again: the end of the day for the
    /// daily allowance, else the end of the period.
    pub fn retry_at_ms(&self, config: &QuotaConfig, at_ms: i64) -> i64 {
        let monthly_out = [
            (
                self.requests_used.saturating_add(self.requests_reserved),
                config.monthly_request_limit,
            ),
            (self.data_transfer_used, config.monthly_data_transfer_bytes),
        ]
        .iter()
        .any(|&(u, l)| l.is_some_and(|l| u >= l));
        if monthly_out {
            self.period_end_ms
        } else {
            Granularity::Day.bucket_start(at_ms) + DAY_MS
        }
    }
}

fn percent(used: u64, limit: u64) -> f64 {
    if limit == 0 {
        100.0
    } else {
        // Rounded to 0.01 % so answers are stable.
        ((used as f64 / limit as f64) * 10_000.0).round() / 100.0
    }
}

/// A quota event, raised once per period each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QuotaEvent {
    QuotaWarning,
    QuotaExceeded,
}

/// What a client's quota keeps between flushes (persisted with them): the
/// events raised this period and the requests reserved by checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaMarks {
    pub alerts: QuotaAlerts,
    pub reservations: crate::reservation::QuotaReservations,
}

/// Which events a client has had in the current period (persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaAlerts {
    pub period_start_ms: i64,
    pub warned: bool,
    pub exceeded: bool,
}

impl QuotaAlerts {
    /// The events `status` raises that this period has not had yet.
    pub fn observe(&mut self, status: &QuotaStatus) -> Vec<QuotaEvent> {
        if self.period_start_ms != status.period_start_ms {
            *self = QuotaAlerts {
                period_start_ms: status.period_start_ms,
                ..QuotaAlerts::default()
            };
        }
        let mut events = Vec::new();
        if status.is_warning && !self.warned {
            self.warned = true;
            events.push(QuotaEvent::QuotaWarning);
        }
        if status.is_exceeded && !self.exceeded {
            self.exceeded = true;
            events.push(QuotaEvent::QuotaExceeded);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{format_rfc3339_ms, parse_rfc3339_ms};

    fn ms(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    fn bounds(at: &str, reset_day: u8) -> (String, String) {
        let (s, e) = period(ms(at), reset_day);
        (format_rfc3339_ms(s), format_rfc3339_ms(e))
    }

    #[test]
    fn periods_across_month_ends_and_short_months() {
        let cases = [
            // (at, reset_day, start, end), worked out on a calendar.
            ("2026-03-15T12:00:00Z", 1, "2026-03-01", "2026-04-01"),
            ("2026-03-31T23:59:59.999Z", 1, "2026-03-01", "2026-04-01"),
            ("2026-04-01T00:00:00Z", 1, "2026-04-01", "2026-05-01"),
            // reset_day 31: February (28 days in 2026) resets on the 28th.
            ("2026-02-27T10:00:00Z", 31, "2026-01-31", "2026-02-28"),
            ("2026-02-28T00:00:00Z", 31, "2026-02-28", "2026-03-31"),
            ("2026-03-30T00:00:00Z", 31, "2026-02-28", "2026-03-31"),
            ("2026-03-31T00:00:00Z", 31, "2026-03-31", "2026-04-30"),
            // Leap year: February 2028 has 29 days.
            ("2028-02-29T05:00:00Z", 31, "2028-02-29", "2028-03-31"),
            ("2028-02-29T05:00:00Z", 30, "2028-02-29", "2028-03-30"),
            // Across the year end.
            ("2026-12-20T00:00:00Z", 15, "2026-12-15", "2027-01-15"),
            ("2027-01-10T00:00:00Z", 15, "2026-12-15", "2027-01-15"),
        ];
        for (at, day, start, end) in cases {
            assert_eq!(
                bounds(at, day),
                (
                    format!("{start}T00:00:00.000Z"),
                    format!("{end}T00:00:00.000Z")
                ),
                "{at} reset_day {day}"
            );
        }
    }

    #[test]
    fn status_and_events_once_per_period() {
        let config = QuotaConfig {
            monthly_request_limit: Some(100),
            monthly_data_transfer_bytes: Some(1_000),
            daily_request_limit: None,
            warning_threshold_percent: 80,
            hard_limit: true,
            reset_day: 1,
        };
        let at = ms("2026-03-10T00:00:00Z");
        let mut alerts = QuotaAlerts::default();
        let mut seen = Vec::new();
        for (requests, bytes) in [
            (10, 10),
            (79, 100),
            (80, 100),
            (90, 850),
            (100, 900),
            (120, 2_000),
        ] {
            let usage = QuotaUsage {
                requests,
                bytes,
                ..QuotaUsage::default()
            };
            let status = QuotaStatus::compute(&config, &usage, at);
            seen.push((requests, alerts.observe(&status)));
        }
        assert_eq!(
            seen,
            vec![
                (10, vec![]),
                (79, vec![]),
                (80, vec![QuotaEvent::QuotaWarning]),
                (90, vec![]),
                (100, vec![QuotaEvent::QuotaExceeded]),
                (120, vec![]),
            ]
        );
        // A new period raises them again.
        let next = QuotaStatus::compute(
            &config,
            &QuotaUsage {
                requests: 100,
                ..QuotaUsage::default()
            },
            ms("2026-04-02T00:00:00Z"),
        );
        assert_eq!(
            alerts.observe(&next),
            vec![QuotaEvent::QuotaWarning, QuotaEvent::QuotaExceeded]
        );
        let s = QuotaStatus::compute(
            &config,
            &QuotaUsage {
                requests: 85,
                bytes: 500,
                ..QuotaUsage::default()
            },
            at,
        );
        assert_eq!(
            (s.percent_used, s.is_warning, s.is_exceeded),
            (85.0, true, false)
        );
        assert_eq!(
            (s.requests_remaining, s.data_transfer_remaining),
            (Some(15), Some(500))
        );
    }

    #[test]
    fn reserved_requests_count_against_admission_not_against_usage() {
        let config = QuotaConfig {
            monthly_request_limit: Some(100),
            monthly_data_transfer_bytes: None,
            daily_request_limit: Some(50),
            warning_threshold_percent: 80,
            hard_limit: true,
            reset_day: 1,
        };
        let at = ms("2026-03-10T12:00:00Z");
        let status = |requests, reserved, today, today_reserved| {
            QuotaStatus::compute(
                &config,
                &QuotaUsage {
                    requests,
                    bytes: 0,
                    today_requests: today,
                    reserved,
                    today_reserved,
                },
                at,
            )
        };
        let s = status(60, 39, 0, 0);
        assert!(s.admits(1));
        assert!(!s.admits(2));
        assert_eq!((s.requests_used, s.requests_remaining), (60, Some(1)));
        assert!(!s.is_exceeded, "exceeded follows ingested usage only");
        // The daily allowance binds first here: 30 + 20 reserved = 50.
        assert!(!status(30, 0, 30, 20).admits(1));
        assert!(status(30, 0, 30, 19).admits(1));
    }

    #[test]
    fn problems_are_all_reported() {
        let c = QuotaConfig {
            monthly_request_limit: None,
            monthly_data_transfer_bytes: None,
            daily_request_limit: None,
            warning_threshold_percent: 0,
            hard_limit: true,
            reset_day: 32,
        };
        assert_eq!(c.problems().len(), 3);
    }
}
