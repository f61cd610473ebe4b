//! Billing periods and days in a client's time zone: a period starts at
//! local midnight of the reset day (clamped to the month's length, so a
//! reset day of 31 is February's last day), and the report's days are
//! that zone's calendar days, 23 or 25 hours long across a DST change.

use chrono::{Datelike, Days, LocalResult, Months, NaiveDate, TimeZone};
use chrono_tz::Tz;

/// A zone by its IANA name (`Europe/Berlin`), or why not.
pub fn zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("{name:?} is not an IANA time zone name (e.g. Europe/Berlin)"))
}

/// The instant (epoch ms) a local calendar day begins in `tz`: its
/// midnight, or where midnight falls in a DST gap, the first instant
/// after it.
pub fn day_start(tz: Tz, date: NaiveDate) -> i64 {
    let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&midnight) {
        LocalResult::Single(t) => t.timestamp_millis(),
        LocalResult::Ambiguous(first, _) => first.timestamp_millis(),
        LocalResult::None => {
            // A gap at midnight (a few zones shift there): the first local
            // minute that exists.
            (1..=180)
                .find_map(|m| {
                    let t = midnight + chrono::Duration::minutes(m);
                    tz.from_local_datetime(&t).earliest()
                })
                .map_or(0, |t| t.timestamp_millis())
        }
    }
}

/// The local date of an instant in `tz`.
pub fn local_date(tz: Tz, at_ms: i64) -> NaiveDate {
    tz.timestamp_millis_opt(at_ms)
        .earliest()
        .map(|t| t.date_naive())
        .unwrap_or_default()
}

/// The date a period with `reset_day` starts on in `year`/`month`.
fn reset_date(year: i32, month: u32, reset_day: u8) -> NaiveDate {
    let first = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or_default();
    let last = first
        .checked_add_months(Months::new(1))
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day());
    let day = u32::from(reset_day).clamp(1, last);
    NaiveDate::from_ymd_opt(year, month, day).unwrap_or(first)
}

/// A billing period: `[start_ms, end_ms)`, and its first and last-plus-one
/// local dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillingPeriod {
    pub start_ms: i64,
    pub end_ms: i64,
    pub first_day: NaiveDate,
    pub end_day: NaiveDate,
}

impl BillingPeriod {
    /// The period containing `at_ms`.
    pub fn containing(tz: Tz, reset_day: u8, at_ms: i64) -> BillingPeriod {
        let date = local_date(tz, at_ms);
        let this = reset_date(date.year(), date.month(), reset_day);
        let start_month = if date >= this {
            NaiveDate::from_ymd_opt(date.year(), date.month(), 1)
        } else {
            NaiveDate::from_ymd_opt(date.year(), date.month(), 1)
                .and_then(|d| d.checked_sub_months(Months::new(1)))
        }
        .unwrap_or_default();
        Self::from_month(tz, reset_day, start_month)
    }

    fn from_month(tz: Tz, reset_day: u8, month: NaiveDate) -> BillingPeriod {
        let next = month.checked_add_months(Months::new(1)).unwrap_or(month);
        let first_day = reset_date(month.year(), month.month(), reset_day);
        let end_day = reset_date(next.year(), next.month(), reset_day);
        BillingPeriod {
            start_ms: day_start(tz, first_day),
            end_ms: day_start(tz, end_day),
            first_day,
            end_day,
        }
    }

    /// The period `by` periods after this one (negative: before).
    pub fn shifted(&self, tz: Tz, reset_day: u8, by: i32) -> BillingPeriod {
        let month = NaiveDate::from_ymd_opt(self.first_day.year(), self.first_day.month(), 1)
            .unwrap_or_default();
        let month = if by >= 0 {
            month.checked_add_months(Months::new(by.unsigned_abs()))
        } else {
            month.checked_sub_months(Months::new(by.unsigned_abs()))
        }
        .unwrap_or(month);
        Self::from_month(tz, reset_day, month)
    }

    /// Its local days: `(date, start_ms, end_ms)`.
    pub fn days(&self, tz: Tz) -> Vec<(NaiveDate, i64, i64)> {
        let mut out = Vec::new();
        let mut day = self.first_day;
        while day < self.end_day {
            let Some(next) = day.checked_add_days(Days::new(1)) else {
                break;
            };
            out.push((day, day_start(tz, day), day_start(tz, next)));
            day = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339_ms;

    fn ms(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    #[test]
    fn a_reset_day_of_31_falls_on_februarys_last_day() {
        let utc = zone("UTC").unwrap();
        let p = BillingPeriod::containing(utc, 31, ms("2026-02-15T12:00:00Z"));
        // January 31 to February 28 (2026 is not a leap year), then to
        // March 31.
        assert_eq!(p.start_ms, ms("2026-01-31T00:00:00Z"));
        assert_eq!(p.end_ms, ms("2026-02-28T00:00:00Z"));
        let next = p.shifted(utc, 31, 1);
        assert_eq!(
            (next.start_ms, next.end_ms),
            (ms("2026-02-28T00:00:00Z"), ms("2026-03-31T00:00:00Z"))
        );
        assert_eq!(next.days(utc).len(), 31);
        // 2028 is a leap year: the 29th.
        let leap = BillingPeriod::containing(utc, 31, ms("2028-02-10T00:00:00Z"));
        assert_eq!(leap.end_ms, ms("2028-02-29T00:00:00Z"));
        // The instant of the reset itself starts the new period.
        let at = BillingPeriod::containing(utc, 31, ms("2026-02-28T00:00:00Z"));
        assert_eq!(at.start_ms, ms("2026-02-28T00:00:00Z"));
        let before = BillingPeriod::containing(utc, 31, ms("2026-02-27T23:59:59.999Z"));
        assert_eq!(before.start_ms, ms("2026-01-31T00:00:00Z"));
    }

    #[test]
    fn days_in_a_dst_zone_are_23_and_25_hours_long_across_the_changes() {
        let berlin = zone("Europe/Berlin").unwrap();
        // March 2026: DST starts on Sunday the 29th (02:00 -> 03:00).
        let march = BillingPeriod::containing(berlin, 1, ms("2026-03-15T00:00:00Z"));
        assert_eq!(march.start_ms, ms("2026-02-28T23:00:00Z")); // 00:00 CET
        assert_eq!(march.end_ms, ms("2026-03-31T22:00:00Z")); // 00:00 CEST
        let days = march.days(berlin);
        assert_eq!(days.len(), 31);
        let hours = |d: &(NaiveDate, i64, i64)| (d.2 - d.1) / 3_600_000;
        assert_eq!(hours(&days[28]), 23, "{:?}", days[28].0);
        assert!(days
            .iter()
            .enumerate()
            .all(|(i, d)| i == 28 || hours(d) == 24));
        // October 25th 2026: 25 hours.
        let october = BillingPeriod::containing(berlin, 1, ms("2026-10-10T00:00:00Z"));
        let days = october.days(berlin);
        assert_eq!(hours(&days[24]), 25, "{:?}", days[24].0);
        // The days tile the period exactly.
        assert_eq!(days[0].1, october.start_ms);
        assert_eq!(days.last().unwrap().2, october.end_ms);
        assert!(days.windows(2).all(|w| w[0].2 == w[1].1));
        // Just before local midnight on the 1st is still September's period.
        let sept = BillingPeriod::containing(berlin, 1, ms("2026-09-30T21:59:59Z"));
        assert_eq!(sept.end_ms, ms("2026-09-30T22:00:00Z"));
    }

    #[test]
    fn an_unknown_zone_is_refused_by_name() {
        assert!(zone("Mars/Olympus").unwrap_err().contains("Mars/Olympus"));
        assert!(zone("America/New_York").is_ok());
    }
}
