//! Event time: bucket boundaries, query periods and their UTC calendar
//! arithmetic (weeks start Monday, months are calendar months).

use chrono::{DateTime, Datelike, Duration, NaiveDate, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// 9999-12-31T23:59:59.999Z
pub const MAX_EPOCH_MS: i64 = 253_402_300_799_999;

pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| e.to_string())
}

/// Parses a query time: RFC 3339 or epoch milliseconds.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return if (0..=MAX_EPOCH_MS).contains(&ms) {
            Ok(ms)
        } else {
            Err(format!("{ms} is outside the supported epoch-ms range"))
        };
    }
    parse_rfc3339_ms(s)
        .map_err(|e| format!("{s:?} is neither RFC 3339 nor epoch milliseconds ({e})"))
}

pub fn format_rfc3339_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => ms.to_string(),
    }
}

/// Stored bucket sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn width_ms(self) -> i64 {
        match self {
            Granularity::Minute => MINUTE_MS,
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }

    pub fn bucket_start(self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.width_ms())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(Granularity::Minute),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }
}

/// Query periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
}

impl Period {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The stored granularity a period is assembled from.
    pub fn granularity(self) -> Granularity {
        match self {
            Period::Hour => Granularity::Hour,
            Period::Day | Period::Week | Period::Month => Granularity::Day,
        }
    }

    /// `[start, end)` of the period containing `at_ms`, in epoch ms UTC.
    pub fn bounds(self, at_ms: i64) -> (i64, i64) {
        match self {
            Period::Hour => {
                let s = Granularity::Hour.bucket_start(at_ms);
                (s, s + HOUR_MS)
            }
            Period::Day => {
                let s = Granularity::Day.bucket_start(at_ms);
                (s, s + DAY_MS)
            }
            Period::Week => {
                let day = Granularity::Day.bucket_start(at_ms);
                // 1970-01-01 was a Thursday: days since a Monday = (days + 3) mod 7.
                let days = day.div_euclid(DAY_MS);
                let s = day - (days + 3).rem_euclid(7) * DAY_MS;
                (s, s + 7 * DAY_MS)
            }
            Period::Month => {
                let date = Utc
                    .timestamp_millis_opt(at_ms)
                    .single()
                    .map(|t| t.date_naive())
                    .unwrap_or_default();
                let first = month_start(date.year(), date.month());
                let next = if date.month() == 12 {
                    month_start(date.year() + 1, 1)
                } else {
                    month_start(date.year(), date.month() + 1)
                };
                (first, next)
            }
        }
    }
}

fn month_start(year: i32, month: u32) -> i64 {
    NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(0)
}

/// Adds whole days (used by tests and generators).
pub fn add_days(ms: i64, days: i64) -> i64 {
    ms + Duration::days(days).num_milliseconds()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    #[test]
    fn week_starts_monday_utc() {
        // 2026-11-22 is a Sunday; its week started Monday 2026-11-16.
        let (s, e) = Period::Week.bounds(ms("2026-11-22T23:59:59Z"));
        assert_eq!(s, ms("2026-11-16T00:00:00Z"));
        assert_eq!(e, ms("2026-11-23T00:00:00Z"));
        let (s, _) = Period::Week.bounds(ms("2026-11-16T00:00:00Z"));
        assert_eq!(s, ms("2026-11-16T00:00:00Z"));
    }

    #[test]
    fn months_are_calendar_months() {
        let (s, e) = Period::Month.bounds(ms("2024-02-29T12:00:00Z"));
        assert_eq!(s, ms("2024-02-01T00:00:00Z"));
        assert_eq!(e, ms("2024-03-01T00:00:00Z"));
        let (s, e) = Period::Month.bounds(ms("2026-12-31T23:59:59.999Z"));
        assert_eq!(s, ms("2026-12-01T00:00:00Z"));
        assert_eq!(e, ms("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn hour_and_day_bounds() {
        let at = ms("2026-03-04T05:06:07.089Z");
        assert_eq!(
            Period::Hour.bounds(at),
            (ms("2026-03-04T05:00:00Z"), ms("2026-03-04T06:00:00Z"))
        );
        assert_eq!(
            Period::Day.bounds(at),
            (ms("2026-03-04T00:00:00Z"), ms("2026-03-05T00:00:00Z"))
        );
    }

    #[test]
    fn instants_parse_from_both_forms() {
        assert_eq!(parse_instant("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_instant("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        assert!(parse_instant("last tuesday").is_err());
        assert_eq!(
            format_rfc3339_ms(1_700_000_000_000),
            "2023-11-14T22:13:20.000Z"
        );
    }
}
