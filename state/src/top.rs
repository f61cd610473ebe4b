//! Period totals of each client (hour, day, week, month), for the
//! top-consumer ranking: written with every flush next to the buckets, in
//! the `stats` column family (so they move with the partition's
//! changelog), and read back one period of one partition at a time.

use tally_pipelines::time::Period;
use tally_pipelines::top::PeriodTotals;

use crate::codec::decode;
use crate::engine::Scan;
use crate::keys::{self, CF_STATS};
use crate::store::Store;
use crate::Result;

/// The periods totals are kept for.
pub const PERIODS: [Period; 4] = [Period::Hour, Period::Day, Period::Week, Period::Month];

impl Store {
    /// Every client's totals in one period of a partition (one sequential
    /// range read), excluding periods past retention.
    pub fn period_totals(
        &self,
        partition: u16,
        period: Period,
        period_start_ms: i64,
    ) -> Result<Vec<(String, PeriodTotals)>> {
        if self
            .retention()
            .period_expired(period, period_start_ms, self.partition_clock(partition))
        {
            return Ok(Vec::new());
        }
        let prefix = keys::period_totals_prefix(partition, period, period_start_ms);
        let end = keys::prefix_end(&prefix);
        let mut out = Vec::new();
        for item in self.engine.scan(CF_STATS, Scan::range(prefix, end))? {
            let (key, value) = item?;
            let Some(k) = keys::decode_period_totals_key(&key) else {
                continue;
            };
            out.push((k.client_id, decode(&value)?));
        }
        Ok(out)
    }

    /// One client's totals in one period.
    pub fn client_period_totals(
        &self,
        partition: u16,
        period: Period,
        period_start_ms: i64,
        client_id: &str,
    ) -> Result<PeriodTotals> {
        if self
            .retention()
            .period_expired(period, period_start_ms, self.partition_clock(partition))
        {
            return Ok(PeriodTotals::default());
        }
        let key = keys::period_totals_key(partition, period, period_start_ms, client_id);
        match self.engine.get(CF_STATS, &key)? {
            Some(v) => decode(&v),
            None => Ok(PeriodTotals::default()),
        }
    }

    /// Many clients' totals at once (one batched read), each of its own
    /// period: `(period, period start, client)`.
    pub fn period_totals_of(
        &self,
        partition: u16,
        wanted: &[(Period, i64, &str)],
    ) -> Result<Vec<PeriodTotals>> {
        let keys: Vec<Vec<u8>> = wanted
            .iter()
            .map(|(period, start, client)| {
                keys::period_totals_key(partition, *period, *start, client)
            })
            .collect();
        let clock = self.partition_clock(partition);
        self.engine
            .multi_get(CF_STATS, &keys)?
            .into_iter()
            .zip(wanted)
            .map(|(value, (period, start, _))| {
                if self.retention().period_expired(*period, *start, clock) {
                    return Ok(PeriodTotals::default());
                }
                match value {
                    Some(v) => decode(&v),
                    None => Ok(PeriodTotals::default()),
                }
            })
            .collect()
    }
}
