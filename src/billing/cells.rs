//! The usage of a client over a billing period, read as cells that no
//! boundary cuts: hours where every boundary (the period's ends, the
//! zone's midnights, plan changes) falls on an hour, minutes in the hours
//! that one falls inside. Each cell then belongs to exactly one day and
//! one plan segment, so every split of the period sums to its total.

use std::collections::BTreeSet;

use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::time::{Granularity, HOUR_MS};
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
    let first_hour = Granularity::Hour.bucket_start(start);
    let hours = store.read_buckets(partition, client, Granularity::Hour, first_hour, end)?;
    // Hours a boundary falls strictly inside (the period's own ends
    // included) are read by the minute.
    let cut: BTreeSet<i64> = boundaries
        .iter()
        .chain([start, end].iter())
        .filter(|b| b.rem_euclid(HOUR_MS) != 0)
        .map(|b| Granularity::Hour.bucket_start(*b))
        .collect();
    let mut out = Vec::with_capacity(hours.len());
    for (hour, stats) in hours {
        if !cut.contains(&hour) {
            if hour >= start && hour < end {
                out.push((hour, stats));
            }
            continue;
        }
        let minutes = store.read_buckets(
            partition,
            client,
            Granularity::Minute,
            hour.max(start),
            (hour + HOUR_MS).min(end),
        )?;
        if minutes.is_empty() && !stats.is_empty() {
            // Minutes expired (retention.minute): the hour is counted
            // where it starts, if that is inside the period.
            if hour >= start {
                out.push((hour, stats));
            }
            continue;
        }
        out.extend(minutes);
    }
    Ok(out)
}
