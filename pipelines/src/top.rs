//! Top consumers: per-period totals of each client and a ranking kept
//! up to date as flushes add to them, so the top N of a period with 100k
//! clients is read off an ordered index (O(N log clients)) instead of
//! sorting every client on each query.
//!
//! A period's totals are sums, so they merge exactly and in any order,
//! like the buckets they come from.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::aggregate::BucketStats;

/// What clients are ranked by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopMetric {
    RequestCount,
    DataTransferBytes,
    ComputeUnits,
    /// Requests answered with status >= 400 (the usage queries' failed
    /// requests).
    ErrorCount,
}

impl TopMetric {
    pub const ALL: [TopMetric; 4] = [
        TopMetric::RequestCount,
        TopMetric::DataTransferBytes,
        TopMetric::ComputeUnits,
        TopMetric::ErrorCount,
    ];

    pub fn parse(s: &str) -> Option<TopMetric> {
        TopMetric::ALL.into_iter().find(|m| m.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TopMetric::RequestCount => "request_count",
            TopMetric::DataTransferBytes => "data_transfer_bytes",
            TopMetric::ComputeUnits => "compute_units",
            TopMetric::ErrorCount => "error_count",
        }
    }

    fn index(self) -> usize {
        match self {
            TopMetric::RequestCount => 0,
            TopMetric::DataTransferBytes => 1,
            TopMetric::ComputeUnits => 2,
            TopMetric::ErrorCount => 3,
        }
    }
}

/// One client's totals over one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodTotals {
    pub requests: u64,
    pub bytes: u128,
    pub compute_units: u128,
    pub errors: u64,
}

impl PeriodTotals {
    /// The totals of a bucket (without touching its latency sketches).
    pub fn of(bucket: &BucketStats) -> PeriodTotals {
        let mut t = PeriodTotals::default();
        for (_, e) in bucket.endpoints() {
            t.requests = t.requests.saturating_add(e.requests);
            t.bytes = t.bytes.saturating_add(e.bytes);
            t.compute_units = t.compute_units.saturating_add(e.compute_units);
            t.errors = t.errors.saturating_add(e.failed);
        }
        t
    }

    pub fn add(&mut self, other: &PeriodTotals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.compute_units = self.compute_units.saturating_add(other.compute_units);
        self.errors = self.errors.saturating_add(other.errors);
    }

    pub fn get(&self, metric: TopMetric) -> u128 {
        match metric {
            TopMetric::RequestCount => u128::from(self.requests),
            TopMetric::DataTransferBytes => self.bytes,
            TopMetric::ComputeUnits => self.compute_units,
            TopMetric::ErrorCount => u128::from(self.errors),
        }
    }
}

/// The running totals and ranking of one period, over at most `capacity`
/// clients.
///
/// Each metric has its own ordered index of `(value descending, client
/// ascending)`; an update moves the client's entry in each (O(log n)).
/// Client names are shared (`Arc<str>`) between the map and the indexes.
///
/// Memory is bounded: past `capacity` clients, the one with the fewest
/// requests leaves, and `ceiling` keeps, per metric, an upper bound of
/// every client that is not held. A top N is then exact from memory when
/// its N-th value is above the ceiling; otherwise the caller answers from
/// the stored totals, which are exact ([`PeriodRanking::top`] says which).
/// A client that is not held comes back with its exact stored total
/// ([`PeriodRanking::admit`]), never with a delta mistaken for a total.
#[derive(Debug)]
pub struct PeriodRanking {
    totals: HashMap<Arc<str>, PeriodTotals>,
    order: [BTreeSet<(Reverse<u128>, Arc<str>)>; 4],
    sum: PeriodTotals,
    capacity: usize,
    /// Some client was let go (or never held): `ceiling` bounds them all.
    overflowed: bool,
    ceiling: [u128; 4],
}

impl Default for PeriodRanking {
    fn default() -> Self {
        Self::bounded(usize::MAX)
    }
}

/// What [`PeriodRanking::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Ranked,
    /// The client is not held and its total is not known here: admit it
    /// with its exact (stored) total.
    NeedsTotal,
}

impl PeriodRanking {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bounded(capacity: usize) -> Self {
        Self {
            totals: HashMap::new(),
            order: Default::default(),
            sum: PeriodTotals::default(),
            capacity: capacity.max(1),
            overflowed: false,
            ceiling: [0; 4],
        }
    }

    /// Adds `delta` to `client`'s totals (and always to the period's sum).
    pub fn add(&mut self, client: &str, delta: &PeriodTotals) -> Added {
        self.sum.add(delta);
        if !self.totals.contains_key(client) {
            if self.overflowed {
                return Added::NeedsTotal;
            }
            // Never let go of anyone: a client not held is new.
            self.admit(client, *delta);
            return Added::Ranked;
        }
        self.update(client, delta);
        Added::Ranked
    }

    /// Holds `client` with its exact `total` if it ranks above the client
    /// with the fewest requests (who then leaves), else raises the ceiling.
    pub fn admit(&mut self, client: &str, total: PeriodTotals) {
        if self.totals.contains_key(client) {
            return;
        }
        if self.totals.len() >= self.capacity {
            let weakest = self.order[TopMetric::RequestCount.index()]
                .iter()
                .next_back()
                .map(|(_, c)| c.clone());
            let Some(weakest) = weakest else {
                return;
            };
            let weakest_total = self.totals.get(&weakest).copied().unwrap_or_default();
            self.overflowed = true;
            if total.requests <= weakest_total.requests {
                self.raise_ceiling(&total);
                return;
            }
            self.remove(&weakest);
            self.raise_ceiling(&weakest_total);
        }
        let name: Arc<str> = Arc::from(client);
        for m in TopMetric::ALL {
            self.order[m.index()].insert((Reverse(total.get(m)), name.clone()));
        }
        self.totals.insert(name, total);
    }

    /// Loads a period from stored totals: the sum is everyone's; the
    /// ranking holds as many as fit.
    pub fn load(&mut self, client: &str, total: &PeriodTotals) {
        self.sum.add(total);
        self.admit(client, *total);
    }

    fn raise_ceiling(&mut self, t: &PeriodTotals) {
        for m in TopMetric::ALL {
            self.ceiling[m.index()] = self.ceiling[m.index()].max(t.get(m));
        }
    }

    fn remove(&mut self, client: &Arc<str>) {
        if let Some(t) = self.totals.remove(client) {
            for m in TopMetric::ALL {
                self.order[m.index()].remove(&(Reverse(t.get(m)), client.clone()));
            }
        }
    }

    fn update(&mut self, client: &str, delta: &PeriodTotals) {
        match self.totals.get_key_value(client) {
            Some((name, old)) => {
                let name = name.clone();
                let old = *old;
                let mut new = old;
                new.add(delta);
                for m in TopMetric::ALL {
                    if old.get(m) != new.get(m) {
                        let index = &mut self.order[m.index()];
                        index.remove(&(Reverse(old.get(m)), name.clone()));
                        index.insert((Reverse(new.get(m)), name.clone()));
                    }
                }
                self.totals.insert(name, new);
            }
            None => {
                let name: Arc<str> = Arc::from(client);
                for m in TopMetric::ALL {
                    self.order[m.index()].insert((Reverse(delta.get(m)), name.clone()));
                }
                self.totals.insert(name, *delta);
            }
        }
    }

    /// The `limit` highest clients by `metric`, highest first (ties by
    /// client id), if memory alone answers it exactly: every client held,
    /// or the `limit`-th value above what any client not held can have.
    /// Clients whose value is zero are not consumers of that metric and
    /// are left out.
    pub fn top(&self, metric: TopMetric, limit: usize) -> Option<Vec<(String, u128)>> {
        let top: Vec<(String, u128)> = self.order[metric.index()]
            .iter()
            .take_while(|(Reverse(v), _)| *v > 0)
            .take(limit)
            .map(|(Reverse(v), c)| (c.to_string(), *v))
            .collect();
        let exact = !self.overflowed
            || (top.len() == limit
                && top
                    .last()
                    .is_some_and(|(_, v)| *v > self.ceiling[metric.index()]));
        exact.then_some(top)
    }

    /// Whether every client of the period is held.
    pub fn complete(&self) -> bool {
        !self.overflowed
    }

    /// The sum over every client.
    pub fn total(&self, metric: TopMetric) -> u128 {
        self.sum.get(metric)
    }

    /// A client's totals, if known here: held, or (with every client
    /// held) zero.
    pub fn get(&self, client: &str) -> Option<PeriodTotals> {
        match self.totals.get(client) {
            Some(t) => Some(*t),
            None if !self.overflowed => Some(PeriodTotals::default()),
            None => None,
        }
    }

    pub fn clients(&self) -> usize {
        self.totals.len()
    }
}

/// Direction of a consumer's usage against the previous period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Trend {
    Increasing,
    Stable,
    Decreasing,
}

/// Compares `current` with `previous` scaled by `elapsed` (the share of the
/// current period that has happened, 0..=1): a period in progress is
/// compared with the same share of the previous one, not with all of it.
/// A change beyond `threshold` (0.10 = ±10 %) is a trend.
pub fn trend(current: u128, previous: u128, elapsed: f64, threshold: f64) -> Trend {
    let expected = previous as f64 * elapsed.clamp(0.0, 1.0);
    let current = current as f64;
    if expected <= 0.0 {
        return if current > 0.0 {
            Trend::Increasing
        } else {
            Trend::Stable
        };
    }
    let change = (current - expected) / expected;
    if change > threshold {
        Trend::Increasing
    } else if change < -threshold {
        Trend::Decreasing
    } else {
        Trend::Stable
    }
}

/// Merges per-partition top lists (disjoint clients) into the overall top.
pub fn merge_top<T>(mut parts: Vec<(String, u128, T)>, limit: usize) -> Vec<(String, u128, T)> {
    parts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    parts.truncate(limit);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn requests(n: u64) -> PeriodTotals {
        PeriodTotals {
            requests: n,
            bytes: u128::from(n) * 100,
            compute_units: 0,
            errors: n / 10,
        }
    }

    #[test]
    fn hand_worked_ranking() {
        let mut r = PeriodRanking::new();
        r.add("a", &requests(5));
        r.add("b", &requests(7));
        r.add("c", &requests(5));
        r.add("a", &requests(3)); // a: 8
        assert_eq!(
            r.top(TopMetric::RequestCount, 10).unwrap(),
            vec![("a".into(), 8), ("b".into(), 7), ("c".into(), 5)]
        );
        assert_eq!(r.top(TopMetric::RequestCount, 2).unwrap().len(), 2);
        assert_eq!(r.total(TopMetric::RequestCount), 20);
        assert_eq!(r.total(TopMetric::DataTransferBytes), 2000);
        // errors: a 0 + 0, b 0, c 0 -> nobody consumes errors.
        assert!(r.top(TopMetric::ErrorCount, 10).unwrap().is_empty());
        assert!(r.top(TopMetric::ComputeUnits, 10).unwrap().is_empty());
        r.add("c", &requests(10)); // c: 15, errors 1
        assert_eq!(
            r.top(TopMetric::RequestCount, 1).unwrap(),
            vec![("c".into(), 15)]
        );
        assert_eq!(
            r.top(TopMetric::ErrorCount, 5).unwrap(),
            vec![("c".into(), 1)]
        );
        assert_eq!(r.clients(), 3);
    }

    /// A few heavy clients among many light ones beyond the capacity: the
    /// heavy ones stay held and the top is answered from memory; a top
    /// that reaches into the light ones is not (the store answers it).
    #[test]
    fn a_bounded_ranking_keeps_the_heavy_clients_and_knows_its_limits() {
        let mut r = PeriodRanking::bounded(10);
        let mut truth: HashMap<String, PeriodTotals> = HashMap::new();
        for round in 0..5u64 {
            for c in 0..100u64 {
                let n = if c < 3 { 1000 + c } else { 1 + (c + round) % 4 };
                let client = format!("c{c}");
                truth.entry(client.clone()).or_default().add(&requests(n));
                if r.add(&client, &requests(n)) == Added::NeedsTotal {
                    r.admit(&client, truth[&client]);
                }
            }
        }
        assert_eq!(r.clients(), 10);
        assert!(!r.complete());
        let top = r
            .top(TopMetric::RequestCount, 3)
            .expect("answered from memory");
        assert_eq!(
            top,
            vec![
                ("c2".into(), 5010),
                ("c1".into(), 5005),
                ("c0".into(), 5000)
            ]
        );
        assert_eq!(r.top(TopMetric::RequestCount, 50), None);
        assert_eq!(
            r.total(TopMetric::RequestCount),
            truth.values().map(|t| u128::from(t.requests)).sum::<u128>()
        );
        assert_eq!(r.get("c1").map(|t| t.requests), Some(5005));
    }

    #[test]
    fn ties_rank_by_client_id() {
        let mut r = PeriodRanking::new();
        for c in ["z", "m", "a"] {
            r.add(c, &requests(4));
        }
        let names: Vec<String> = r
            .top(TopMetric::RequestCount, 3)
            .unwrap()
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        assert_eq!(names, vec!["a", "m", "z"]);
    }

    #[test]
    fn trends_hand_worked() {
        // Whole periods: ±10 % is stable, beyond is a trend.
        assert_eq!(trend(110, 100, 1.0, 0.1), Trend::Stable);
        assert_eq!(trend(111, 100, 1.0, 0.1), Trend::Increasing);
        assert_eq!(trend(90, 100, 1.0, 0.1), Trend::Stable);
        assert_eq!(trend(89, 100, 1.0, 0.1), Trend::Decreasing);
        assert_eq!(trend(1, 0, 1.0, 0.1), Trend::Increasing);
        assert_eq!(trend(0, 0, 1.0, 0.1), Trend::Stable);
        // Half-way through: 50 so far against 100 last time is on track.
        assert_eq!(trend(50, 100, 0.5, 0.1), Trend::Stable);
        assert_eq!(trend(60, 100, 0.5, 0.1), Trend::Increasing);
        assert_eq!(trend(40, 100, 0.5, 0.1), Trend::Decreasing);
    }

    #[test]
    fn merge_keeps_the_overall_top() {
        let parts = vec![
            ("b".to_string(), 5, ()),
            ("a".to_string(), 9, ()),
            ("c".to_string(), 5, ()),
            ("d".to_string(), 1, ()),
        ];
        let names: Vec<String> = merge_top(parts, 3).into_iter().map(|p| p.0).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
    }

    proptest! {
        /// A bounded ranking fed like a shard feeds it (a client it does not
        /// hold comes back with its exact total) never answers wrong: when
        /// it answers from memory, it equals sorting the true totals.
        #[test]
        fn a_bounded_ranking_answers_exactly_or_not_at_all(
            adds in proptest::collection::vec((0u8..60, 0u64..50, 0u64..5000), 0..400),
            capacity in 1usize..20,
            limit in 1usize..10,
        ) {
            let mut r = PeriodRanking::bounded(capacity);
            let mut reference: HashMap<String, PeriodTotals> = HashMap::new();
            for (c, n, bytes) in &adds {
                let client = format!("client-{c}");
                let delta = PeriodTotals { requests: *n, bytes: u128::from(*bytes), compute_units: 0, errors: n / 3 };
                reference.entry(client.clone()).or_default().add(&delta);
                if r.add(&client, &delta) == Added::NeedsTotal {
                    r.admit(&client, reference[&client]);
                }
                prop_assert!(r.clients() <= capacity);
            }
            for (i, m) in TopMetric::ALL.into_iter().enumerate() {
                let _ = i;
                let mut want: Vec<(String, u128)> = reference
                    .iter()
                    .filter(|(_, v)| v.get(m) > 0)
                    .map(|(c, v)| (c.clone(), v.get(m)))
                    .collect();
                want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                want.truncate(limit);
                if let Some(got) = r.top(m, limit) {
                    prop_assert_eq!(got, want);
                }
                let total: u128 = reference.values().map(|v| v.get(m)).sum();
                prop_assert_eq!(r.total(m), total);
            }
        }

        /// Any sequence of additions ranks like sorting the final totals.
        #[test]
        fn ranking_equals_sorting_the_totals(
            adds in proptest::collection::vec((0u8..40, 0u64..50, 0u64..5000, 0u64..9), 0..400),
            limit in 1usize..15,
        ) {
            let mut r = PeriodRanking::new();
            let mut reference: HashMap<String, [u128; 4]> = HashMap::new();
            for (c, n, bytes, cu) in &adds {
                let client = format!("client-{c}");
                let delta = PeriodTotals { requests: *n, bytes: u128::from(*bytes), compute_units: u128::from(*cu), errors: n / 3 };
                r.add(&client, &delta);
                let e = reference.entry(client).or_default();
                e[0] += u128::from(*n);
                e[1] += u128::from(*bytes);
                e[2] += u128::from(*cu);
                e[3] += u128::from(n / 3);
            }
            for (i, m) in TopMetric::ALL.into_iter().enumerate() {
                let mut want: Vec<(String, u128)> = reference
                    .iter()
                    .filter(|(_, v)| v[i] > 0)
                    .map(|(c, v)| (c.clone(), v[i]))
                    .collect();
                want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                want.truncate(limit);
                prop_assert_eq!(r.top(m, limit), Some(want));
                let total: u128 = reference.values().map(|v| v[i]).sum();
                prop_assert_eq!(r.total(m), total);
            }
        }
    }
}
