//! A mergeable sketch of a series' values for its median and percentiles,
//! within 1 % relative error, for values of any sign: the latency sketch's
//! logarithmic bins (ratio `GAMMA`), one set for positive values and one
//! for the magnitudes of negative ones, and an exact count of zeros.
//! Bins are `i32`, so every finite non-zero `f64` has its own (no floor
//! below which small values count as zero, as latencies have).

use serde::{Deserialize, Serialize};

use crate::sketch::merge_sorted_bins;

/// Guaranteed relative error of any reported quantile (half the 1 % the
/// API promises, leaving room for float rounding at bin edges).
pub const RELATIVE_ACCURACY: f64 = 0.005;
const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);

fn bin_of(magnitude: f64) -> i32 {
    (magnitude.ln() / GAMMA.ln()).ceil() as i32
}

/// The value a bin reports: within `RELATIVE_ACCURACY` of all it holds.
fn representative(bin: i32) -> f64 {
    2.0 * (f64::from(bin) * GAMMA.ln()).exp() / (GAMMA + 1.0)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueSketch {
    zero: u64,
    /// `(bin, count)` sorted by bin, no zero counts.
    positive: Vec<(i32, u64)>,
    /// Of the magnitudes of negative values, likewise.
    negative: Vec<(i32, u64)>,
}

fn add(bins: &mut Vec<(i32, u64)>, bin: i32, n: u64) {
    match bins.binary_search_by_key(&bin, |&(k, _)| k) {
        Ok(i) => bins[i].1 = bins[i].1.saturating_add(n),
        Err(i) => bins.insert(i, (bin, n)),
    }
}

impl ValueSketch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a finite value (validated before; anything else counts as 0).
    pub fn insert(&mut self, value: f64) {
        if value == 0.0 || !value.is_finite() {
            self.zero = self.zero.saturating_add(1);
        } else if value > 0.0 {
            add(&mut self.positive, bin_of(value), 1);
        } else {
            add(&mut self.negative, bin_of(-value), 1);
        }
    }

    pub fn merge(&mut self, other: &ValueSketch) {
        self.zero = self.zero.saturating_add(other.zero);
        merge_sorted_bins(&mut self.positive, &other.positive);
        merge_sorted_bins(&mut self.negative, &other.negative);
    }

    pub fn count(&self) -> u64 {
        let sum = |bins: &[(i32, u64)]| bins.iter().fold(0u64, |a, &(_, c)| a.saturating_add(c));
        self.zero
            .saturating_add(sum(&self.positive))
            .saturating_add(sum(&self.negative))
    }

    /// The `q`-quantile by nearest rank (the value at 0-based rank
    /// `ceil(q·n) - 1` of the sorted values), within `RELATIVE_ACCURACY`;
    /// `None` when empty.
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
        let mut seen = 0u64;
        // Ascending: the largest magnitudes of negatives first.
        for &(bin, count) in self.negative.iter().rev() {
            seen = seen.saturating_add(count);
            if rank < seen {
                return Some(-representative(bin));
            }
        }
        seen = seen.saturating_add(self.zero);
        if rank < seen {
            return Some(0.0);
        }
        for &(bin, count) in &self.positive {
            seen = seen.saturating_add(count);
            if rank < seen {
                return Some(representative(bin));
            }
        }
        self.positive.last().map(|&(bin, _)| representative(bin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(values: &[f64], q: f64) -> f64 {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n) - 1;
        sorted[rank as usize]
    }

    #[test]
    fn hand_worked_quantiles_across_zero() {
        // -50..=49: the median (rank 49) is -1, p99 (rank 98) is 48.
        let mut s = ValueSketch::new();
        for v in -50..50 {
            s.insert(f64::from(v));
        }
        assert_eq!(s.count(), 100);
        for (q, want) in [(0.5, -1.0), (0.99, 48.0), (0.0, -50.0), (0.51, 0.0)] {
            let got = s.quantile(q).unwrap();
            assert!(
                (got - want).abs() <= want.abs() * 0.01,
                "q={q}: {got} vs {want}"
            );
        }
        assert_eq!(ValueSketch::new().quantile(0.5), None);
    }

    #[test]
    fn tiny_and_huge_magnitudes_keep_their_own_bins() {
        let mut s = ValueSketch::new();
        for v in [1e-300, -1e-12, 1e300, -1e300] {
            s.insert(v);
        }
        for (q, want) in [(0.25, -1e300), (0.5, -1e-12), (0.75, 1e-300), (1.0, 1e300)] {
            let got = s.quantile(q).unwrap();
            assert!(
                ((got - want) / want).abs() <= 0.01,
                "q={q}: {got} vs {want}"
            );
        }
    }

    proptest! {
        #[test]
        fn quantiles_of_any_sign_are_within_one_percent(
            values in proptest::collection::vec(prop_oneof![-1e9f64..1e9, Just(0.0), -1e-3f64..1e-3], 1..400),
            q in 0.0f64..=1.0,
        ) {
            let mut s = ValueSketch::new();
            for &v in &values { s.insert(v); }
            let (got, want) = (s.quantile(q).unwrap(), exact(&values, q));
            prop_assert!((got - want).abs() <= want.abs() * 0.01, "{} vs {}", got, want);
        }

        #[test]
        fn merged_sketches_equal_one_over_everything(
            a in proptest::collection::vec(-1e4f64..1e4, 0..200),
            b in proptest::collection::vec(-1e4f64..1e4, 0..200),
        ) {
            let (mut sa, mut sb, mut all) = (ValueSketch::new(), ValueSketch::new(), ValueSketch::new());
            for &v in &a { sa.insert(v); all.insert(v); }
            for &v in &b { sb.insert(v); all.insert(v); }
            let mut ab = sa.clone();
            ab.merge(&sb);
            sb.merge(&sa);
            prop_assert_eq!(&ab, &all);
            prop_assert_eq!(&sb, &all);
            // A subset merged in place.
            let mut again = all.clone();
            again.merge(&sa);
            sa.merge(&all);
            prop_assert_eq!(again, sa);
        }
    }
}
