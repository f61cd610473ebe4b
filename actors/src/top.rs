//! A shard's top-consumer index: the rankings of the newest hour, day,
//! week and month of its partition and of the period before each (the
//! "previous" a trend compares with, and yesterday's top), updated after
//! every flush from what the flush wrote, so that a query reads the top N
//! off ordered indexes instead of visiting every client.
//!
//! The index is loaded from the stored period totals when the shard
//! (re)loads its state, and only ever by the shard itself, between two
//! flushes: loading can then never count a flush twice. Older periods (or
//! a period a shard has not reached yet) are answered from the stored
//! totals by the caller.
//!
//! Each ranking holds at most `capacity` clients (see
//! `tally_pipelines::top::PeriodRanking`): a client it let go that is seen
//! again is admitted with its exact stored total, read by the shard after
//! the flush commits ([`ShardTop::note_flushed`] says which), and a query
//! memory cannot answer exactly goes to the stored totals.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tally_pipelines::ingest::FlushContent;
use tally_pipelines::time::Period;
use tally_pipelines::top::{Added, PeriodRanking, PeriodTotals, TopMetric};
use tally_state::top::PERIODS;
use tally_state::Store;

use crate::Error;

/// A shard's index, shared with the HTTP handlers.
pub type SharedTop = Arc<Mutex<ShardTop>>;

/// Locks a shard's index (an update is a few map operations; a panic in
/// one cannot leave it worse than one delta off, so poisoning is ignored).
pub fn lock_top(top: &SharedTop) -> MutexGuard<'_, ShardTop> {
    top.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct ShardTop {
    partition: u16,
    /// `(period start, ranking)` of the newest period of each kind, in
    /// [`PERIODS`] order; `None` until loaded.
    current: [Option<(i64, PeriodRanking)>; 4],
    /// The period just before each `current` one, while it is kept.
    previous: [Option<(i64, PeriodRanking)>; 4],
    loaded: bool,
    /// Clients each ranking holds.
    capacity: usize,
}

/// A client a ranking let go, seen again: its stored total is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalNeeded {
    pub period: Period,
    pub period_start_ms: i64,
    pub client: String,
}

/// One partition's share of a top query.
#[derive(Debug, Clone, Default)]
pub struct PartitionTop {
    pub total: u128,
    pub entries: Vec<(String, u128)>,
}

fn slot(period: Period) -> usize {
    match period {
        Period::Hour => 0,
        Period::Day => 1,
        Period::Week => 2,
        Period::Month => 3,
    }
}

impl ShardTop {
    pub fn new(partition: u16, capacity: usize) -> Self {
        Self {
            partition,
            current: Default::default(),
            previous: Default::default(),
            loaded: false,
            capacity,
        }
    }

    /// Forgets the index (the partition was released).
    pub fn clear(&mut self) {
        self.current = Default::default();
        self.previous = Default::default();
        self.loaded = false;
    }

    /// Loads the periods containing the partition's clock from the store.
    /// Called by the shard only, between flushes.
    pub fn load(&mut self, store: &Store) -> Result<(), Error> {
        self.clear();
        if let Some(clock) = store.partition_clock(self.partition) {
            for period in PERIODS {
                let (start, _) = period.bounds(clock);
                let (before, _) = period.bounds(start - 1);
                let capacity = self.capacity;
                let load = |start: i64| -> Result<PeriodRanking, Error> {
                    let mut ranking = PeriodRanking::bounded(capacity);
                    for (client, totals) in store.period_totals(self.partition, period, start)? {
                        ranking.load(&client, &totals);
                    }
                    Ok(ranking)
                };
                self.current[slot(period)] = Some((start, load(start)?));
                self.previous[slot(period)] = Some((before, load(before)?));
            }
        }
        self.loaded = true;
        Ok(())
    }

    /// Adds what a committed flush wrote. A delta of a newer period starts
    /// that period's ranking (the store holds nothing of it yet), and the
    /// current one becomes the previous if it is the one just before; a
    /// delta of an older period is only in the store. Returns the clients
    /// whose stored totals the rankings need ([`ShardTop::admit`]).
    pub fn note_flushed(&mut self, content: &FlushContent) -> Vec<TotalNeeded> {
        let mut needed = Vec::new();
        if !self.loaded {
            return needed;
        }
        // Summed per client and period first: a client's minutes in one
        // flush mostly share their periods, and each ranking update moves
        // the client in four ordered indexes.
        let mut sums: HashMap<(usize, i64, &str), PeriodTotals> = HashMap::new();
        for delta in &content.stats {
            let totals = PeriodTotals::of(&delta.stats);
            for (i, period) in PERIODS.into_iter().enumerate() {
                let (start, _) = period.bounds(delta.minute_start_ms);
                sums.entry((i, start, delta.client_id.as_str()))
                    .or_default()
                    .add(&totals);
            }
        }
        // Oldest first, so that a newer period replaces an older one.
        let mut sums: Vec<_> = sums.into_iter().collect();
        sums.sort_unstable_by_key(|((i, start, _), _)| (*i, *start));
        for ((i, start, client), totals) in sums {
            let current_start = self.current[i].as_ref().map(|(s, _)| *s);
            let previous_start = self.previous[i].as_ref().map(|(s, _)| *s);
            let added = if current_start == Some(start) {
                self.current[i]
                    .as_mut()
                    .map(|(_, r)| r.add(client, &totals))
            } else if previous_start == Some(start) {
                self.previous[i]
                    .as_mut()
                    .map(|(_, r)| r.add(client, &totals))
            } else if current_start.is_none_or(|s| start > s) {
                let (before, _) = PERIODS[i].bounds(start - 1);
                let old = self.current[i].take();
                self.previous[i] = old.filter(|(s, _)| *s == before);
                let mut ranking = PeriodRanking::bounded(self.capacity);
                ranking.add(client, &totals);
                self.current[i] = Some((start, ranking));
                None
            } else {
                None
            };
            if added == Some(Added::NeedsTotal) {
                needed.push(TotalNeeded {
                    period: PERIODS[i],
                    period_start_ms: start,
                    client: client.to_string(),
                });
            }
        }
        needed
    }

    /// Admits a client with its stored total (after [`ShardTop::note_flushed`]).
    pub fn admit(&mut self, needed: &TotalNeeded, total: PeriodTotals) {
        let i = slot(needed.period);
        for (start, ranking) in [&mut self.current[i], &mut self.previous[i]]
            .into_iter()
            .flatten()
        {
            if *start == needed.period_start_ms {
                ranking.admit(&needed.client, total);
            }
        }
    }

    fn ranking(&self, period: Period, start: i64) -> Option<&PeriodRanking> {
        if !self.loaded {
            return None;
        }
        [&self.current[slot(period)], &self.previous[slot(period)]]
            .into_iter()
            .flatten()
            .find(|(s, _)| *s == start)
            .map(|(_, ranking)| ranking)
    }

    /// The partition's top of a period, if memory answers it exactly.
    pub fn top(
        &self,
        period: Period,
        start: i64,
        metric: TopMetric,
        limit: usize,
    ) -> Option<PartitionTop> {
        let r = self.ranking(period, start)?;
        Some(PartitionTop {
            total: r.total(metric),
            entries: r.top(metric, limit)?,
        })
    }

    /// A client's totals of a period, if memory knows them.
    pub fn totals(&self, period: Period, start: i64, client: &str) -> Option<PeriodTotals> {
        self.ranking(period, start)?.get(client)
    }

    /// Clients ranked in memory (all periods), for the memory gauge.
    pub fn indexed_clients(&self) -> usize {
        self.current
            .iter()
            .chain(self.previous.iter())
            .flatten()
            .map(|(_, r)| r.clients())
            .sum()
    }
}

/// A partition's top of a period from the stored totals (one range read).
pub fn stored_top(
    store: &Store,
    partition: u16,
    period: Period,
    start: i64,
    metric: TopMetric,
    limit: usize,
) -> Result<PartitionTop, Error> {
    let mut total = 0u128;
    let mut entries: Vec<(String, u128)> = Vec::new();
    for (client, totals) in store.period_totals(partition, period, start)? {
        let v = totals.get(metric);
        total = total.saturating_add(v);
        if v > 0 {
            entries.push((client, v));
        }
    }
    let entries = tally_pipelines::top::merge_top(
        entries.into_iter().map(|(c, v)| (c, v, ())).collect(),
        limit,
    )
    .into_iter()
    .map(|(c, v, ())| (c, v))
    .collect();
    Ok(PartitionTop { total, entries })
}
