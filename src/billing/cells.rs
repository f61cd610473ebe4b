//! The usage of a client over a billing period, read as cells that no
//! boundary cuts: the coarsest stored buckets (days, then hours, then
//! minutes) inside which no boundary falls (the period's ends, the zone's
//! midnights, plan changes). Each cell then belongs to exactly one day and
//! one plan segment, so every split of the period sums to its total; and a
//! UTC client's month is 30 day buckets, not 720 hours.

use std::collections::BTreeSet;

use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::time::{Granularity, DAY_MS, HOUR_MS};
use tally_state::Store;

/// `(start_ms, stats)` of the cells of `[start, end)`, in time order.
pub fn read_cells(
    store: &Store,
    partition: u16,
    client: &str,
    start: i64,
    end: i64,
    boundaries: &BTreeSet<i64>,
) -> tally_state::Result<Vec<(i64, BucketStats)>> {
    let mut cuts = boundaries.clone();
    cuts.insert(start);
    cuts.insert(end);
    // Whether `[from, from + width)` lies in the period, uncut.
    let whole = |from: i64, width: i64| {
        from >= start && from + width <= end && cuts.range(from + 1..from + width).next().is_none()
    };
    let read =
        |g: Granularity, from: i64, to: i64| store.read_buckets(partition, client, g, from, to);
    let mut out = Vec::new();
    let first_day = Granularity::Day.bucket_start(start);
    let days = read(Granularity::Day, first_day, end)?;
    let mut days = days.into_iter().peekable();
    let mut day = first_day;
    while day < end {
        // Skip stored days before this one.
        while days.peek().is_some_and(|(ts, _)| *ts < day) {
            days.next();
        }
        if whole(day, DAY_MS) {
            if let Some((_, stats)) = days.next_if(|(ts, _)| *ts == day) {
                out.push((day, stats));
            }
            day += DAY_MS;
            continue;
        }
        let (from, to) = (day.max(start), (day + DAY_MS).min(end));
        for (hour, stats) in read(Granularity::Hour, Granularity::Hour.bucket_start(from), to)? {
            if whole(hour, HOUR_MS) {
                out.push((hour, stats));
                continue;
            }
            let minutes = read(
                Granularity::Minute,
                hour.max(start),
                (hour + HOUR_MS).min(end),
            )?;
            if minutes.is_empty() {
                // Minutes expired (retention.minute): the hour counts
                // where it begins, if that is inside the period.
                if hour >= start {
                    out.push((hour, stats));
                }
                continue;
            }
            out.extend(minutes);
        }
        day += DAY_MS;
    }
    Ok(out)
}
