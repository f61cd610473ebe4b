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

/// The running totals and ranking of one period.
///
/// Each metric has its own ordered index of `(value descending, client
/// ascending)`; an update moves the client's entry in each (O(log n)).
/// Client names are shared (`Arc<str>`) between the map and the indexes.
#[derive(Debug, Default)]
pub struct PeriodRanking {
    totals: HashMap<Arc<str>, PeriodTotals>,
    order: [BTreeSet<(Reverse<u128>, Arc<str>)>; 4],
    sum: PeriodTotals,
}

impl PeriodRanking {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` to `client`'s totals.
    pub fn add(&mut self, client: &str, delta: &PeriodTotals) {
        self.sum.add(delta);
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
    /// client id). Clients whose value is zero are not consumers of that
    /// metric and are left out.
    pub fn top(&self, metric: TopMetric, limit: usize) -> Vec<(String, u128)> {
        self.order[metric.index()]
            .iter()
            .take_while(|(Reverse(v), _)| *v > 0)
            .take(limit)
            .map(|(Reverse(v), c)| (c.to_string(), *v))
            .collect()
    }

    /// The sum over every client.
    pub fn total(&self, metric: TopMetric) -> u128 {
        self.sum.get(metric)
    }

    pub fn get(&self, client: &str) -> Option<&PeriodTotals> {
        self.totals.get(client)
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
            r.top(TopMetric::RequestCount, 10),
            vec![("a".into(), 8), ("b".into(), 7), ("c".into(), 5)]
        );
        assert_eq!(r.top(TopMetric::RequestCount, 2).len(), 2);
        assert_eq!(r.total(TopMetric::RequestCount), 20);
        assert_eq!(r.total(TopMetric::DataTransferBytes), 2000);
        // errors: a 0 + 0, b 0, c 0 -> nobody consumes errors.
        assert!(r.top(TopMetric::ErrorCount, 10).is_empty());
        assert!(r.top(TopMetric::ComputeUnits, 10).is_empty());
        r.add("c", &requests(10)); // c: 15, errors 1
        assert_eq!(r.top(TopMetric::RequestCount, 1), vec![("c".into(), 15)]);
        assert_eq!(r.top(TopMetric::ErrorCount, 5), vec![("c".into(), 1)]);
        assert_eq!(r.clients(), 3);
    }

    #[test]
    fn ties_rank_by_client_id() {
        let mut r = PeriodRanking::new();
        for c in ["z", "m", "a"] {
            r.add(c, &requests(4));
        }
        let names: Vec<String> = r
            .top(TopMetric::RequestCount, 3)
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
                prop_assert_eq!(r.top(m, limit), want);
                let total: u128 = reference.values().map(|v| v[i]).sum();
                prop_assert_eq!(r.total(m), total);
            }
        }
    }
}
