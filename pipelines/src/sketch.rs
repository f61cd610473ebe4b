//! A mergeable latency sketch with bounded relative error that costs bytes
//! in proportion to what it holds.
//!
//! Values are mapped to logarithmic bins of ratio `GAMMA` (the DDSketch
//! mapping): bin `k` holds values in `(GAMMA^(k-1), GAMMA^k]` and reports
//! the value `2·GAMMA^k / (GAMMA + 1)`, which is within `RELATIVE_ACCURACY`
//! of every value in the bin. Only non-empty bins are stored, as a sorted
//! vector, so a (client, endpoint, minute) cell with three events costs three
//! bins, not the kilobytes a dense histogram (such as HdrHistogram with the
//! same precision) allocates up front. Counts are exact, so merging is exact
//! and independent of order.

use serde::{Deserialize, Serialize};

/// Guaranteed relative error of any reported quantile (0.5 %, half of the
/// 1 % the API promises, to leave room for float rounding at bin edges).
pub const RELATIVE_ACCURACY: f64 = 0.005;
const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);
/// Values below this (in milliseconds: one microsecond) count as zero.
const MIN_TRACKED: f64 = 1e-3;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySketch {
    /// Values below `MIN_TRACKED`.
    zero: u64,
    /// `(bin index, count)`, sorted by bin index, no zero counts.
    bins: Vec<(i16, u64)>,
}

fn ln_gamma() -> f64 {
    GAMMA.ln()
}

fn bin_of(value: f64) -> i16 {
    let k = (value.ln() / ln_gamma()).ceil();
    // Latencies from 1 µs to far beyond a year fit; clamp instead of wrapping.
    k.clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
}

fn representative(bin: i16) -> f64 {
    2.0 * (f64::from(bin) * ln_gamma()).exp() / (GAMMA + 1.0)
}

/// Whether every key of `from` is one of `into`'s (both sorted).
fn holds_bins<K: Ord + Copy>(into: &[(K, u64)], from: &[(K, u64)]) -> bool {
    if from.len() > into.len() {
        return false;
    }
    let mut i = 0;
    from.iter().all(|&(k, _)| {
        while i < into.len() && into[i].0 < k {
            i += 1;
        }
        i < into.len() && into[i].0 == k
    })
}

/// Adds the counts of `from` to `into`, both sorted by key without
/// repeats (the bins of a logarithmic sketch; shared by the latency and
/// the telemetry sketch).
pub(crate) fn merge_sorted_bins<K: Ord + Copy>(into: &mut Vec<(K, u64)>, from: &[(K, u64)]) {
    if from.is_empty() {
        return;
    }
    if into.is_empty() {
        *into = from.to_vec();
        return;
    }
    // Merging many similar sketches (a month of days), the running one
    // soon holds every bin the next brings: add in place then, with no
    // new vector.
    if holds_bins(into, from) {
        let mut i = 0;
        for &(k, c) in from {
            while into[i].0 < k {
                i += 1;
            }
            into[i].1 = into[i].1.saturating_add(c);
        }
        return;
    }
    let mut merged = Vec::with_capacity(into.len() + from.len());
    let (mut a, mut b) = (into.iter().peekable(), from.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(&&(ka, ca)), Some(&&(kb, cb))) => {
                if ka == kb {
                    merged.push((ka, ca.saturating_add(cb)));
                    a.next();
                    b.next();
                } else if ka < kb {
                    merged.push((ka, ca));
                    a.next();
                } else {
                    merged.push((kb, cb));
                    b.next();
                }
            }
            (Some(&&x), None) => {
                merged.push(x);
                a.next();
            }
            (None, Some(&&x)) => {
                merged.push(x);
                b.next();
            }
            (None, None) => break,
        }
    }
    *into = merged;
}

impl LatencySketch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one latency in milliseconds. Negative and non-finite values
    /// are rejected by validation before they reach a sketch; here they are
    /// counted as zero rather than corrupting the bins.
    pub fn insert(&mut self, value_ms: f64) {
        self.insert_n(value_ms, 1);
    }

    pub fn insert_n(&mut self, value_ms: f64, n: u64) {
        // NaN fails both comparisons and lands here too.
        if value_ms.is_nan() || value_ms < MIN_TRACKED || value_ms.is_infinite() {
            self.zero = self.zero.saturating_add(n);
            return;
        }
        let key = bin_of(value_ms);
        match self.bins.binary_search_by_key(&key, |&(k, _)| k) {
            Ok(i) => self.bins[i].1 = self.bins[i].1.saturating_add(n),
            Err(i) => self.bins.insert(i, (key, n)),
        }
    }

    pub fn count(&self) -> u64 {
        self.bins
            .iter()
            .fold(self.zero, |acc, &(_, c)| acc.saturating_add(c))
    }

    pub fn is_empty(&self) -> bool {
        self.zero == 0 && self.bins.is_empty()
    }

    /// Number of stored bins (memory is proportional to it).
    pub fn bin_count(&self) -> usize {
        self.bins.len()
    }

    pub fn merge(&mut self, other: &LatencySketch) {
        self.zero = self.zero.saturating_add(other.zero);
        merge_sorted_bins(&mut self.bins, &other.bins);
    }

    /// Whether every bin of `other` is one of these.
    #[cfg(test)]
    fn holds_bins_of(&self, other: &LatencySketch) -> bool {
        holds_bins(&self.bins, &other.bins)
    }

    /// The `q`-quantile (nearest-rank definition: the value at 0-based rank
    /// `ceil(q·n) - 1` of the sorted values), within `RELATIVE_ACCURACY` of
    /// the exact one. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            1.0
        };
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n) - 1;
        let mut seen = self.zero;
        if rank < seen {
            return Some(0.0);
        }
        for &(key, count) in &self.bins {
            seen = seen.saturating_add(count);
            if rank < seen {
                return Some(representative(key));
            }
        }
        self.bins.last().map(|&(k, _)| representative(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact_quantile(values: &[f64], q: f64) -> f64 {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n) - 1;
        sorted[rank as usize]
    }

    #[test]
    fn empty_sketch_has_no_quantile() {
        assert_eq!(LatencySketch::new().quantile(0.95), None);
    }

    #[test]
    fn hand_worked_quantiles_of_one_to_hundred() {
        let mut s = LatencySketch::new();
        for v in 1..=100 {
            s.insert(f64::from(v));
        }
        // Nearest rank: p95 of 1..=100 is 95, p99 is 99, p50 is 50.
        for (q, exact) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0), (1.0, 100.0)] {
            let got = s.quantile(q).unwrap();
            assert!((got - exact).abs() / exact <= 0.01, "q={q} got {got}");
        }
    }

    #[test]
    fn sparse_cell_costs_one_bin_per_distinct_value() {
        let mut s = LatencySketch::new();
        s.insert(12.0);
        s.insert(12.0);
        s.insert(250.0);
        assert_eq!(s.bin_count(), 2);
        assert_eq!(s.count(), 3);
    }

    #[test]
    fn zero_latency_is_counted() {
        let mut s = LatencySketch::new();
        s.insert(0.0);
        s.insert(0.0);
        s.insert(5.0);
        assert_eq!(s.count(), 3);
        assert_eq!(s.quantile(0.5), Some(0.0));
    }

    #[test]
    fn counts_saturate_instead_of_overflowing() {
        let mut s = LatencySketch::new();
        s.insert_n(3.0, u64::MAX);
        s.insert(3.0);
        assert_eq!(s.count(), u64::MAX);
    }

    proptest! {
        #[test]
        fn quantiles_are_within_one_percent(values in proptest::collection::vec(0.001f64..100_000.0, 1..400), q in 0.0f64..=1.0) {
            let mut s = LatencySketch::new();
            for &v in &values { s.insert(v); }
            let exact = exact_quantile(&values, q);
            let got = s.quantile(q).unwrap();
            prop_assert!((got - exact).abs() <= exact * 0.01, "exact {} got {}", exact, got);
        }

        #[test]
        fn merge_equals_inserting_everything(a in proptest::collection::vec(0.0f64..5_000.0, 0..100), b in proptest::collection::vec(0.0f64..5_000.0, 0..100)) {
            let (mut sa, mut sb, mut all) = (LatencySketch::new(), LatencySketch::new(), LatencySketch::new());
            for &v in &a { sa.insert(v); all.insert(v); }
            for &v in &b { sb.insert(v); all.insert(v); }
            let mut ab = sa.clone();
            ab.merge(&sb);
            sb.merge(&sa);
            prop_assert_eq!(&ab, &all);
            prop_assert_eq!(&sb, &all);
        }

        #[test]
        fn merging_a_sketch_whose_bins_are_all_held_adds_their_counts(a in proptest::collection::vec(0.0f64..5_000.0, 1..100), picks in proptest::collection::vec(0usize..1000, 0..50)) {
            // `b` draws its values from `a`: all its bins are in `a`'s.
            let b: Vec<f64> = picks.iter().map(|i| a[i % a.len()]).collect();
            let (mut sa, mut sb, mut all) = (LatencySketch::new(), LatencySketch::new(), LatencySketch::new());
            for &v in &a { sa.insert(v); all.insert(v); }
            for &v in &b { sb.insert(v); all.insert(v); }
            prop_assert!(sa.holds_bins_of(&sb));
            sa.merge(&sb);
            prop_assert_eq!(&sa, &all);
        }
    }
}
