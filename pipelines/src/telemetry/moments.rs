//! Count, sum, min, max, first, last, mean and variance of a series'
//! values in one pass: Welford's update for each point, Chan's formula to
//! merge two sets, so a coarser bucket or a query step is an exact merge
//! of finer ones, never a re-read of points.
//!
//! Precision: values far from zero with small spread (1e9 ± 1e-3) lose
//! everything in a naive sum of squares and much in plain Welford, whose
//! error grows with mean² / variance. Values are therefore accumulated
//! relative to a shift (the first value a set saw): the deviations are
//! then small numbers computed exactly (Sterbenz), and the variance keeps
//! full precision. The sum is a compensated (Neumaier) sum of the values.
//! `Moments` is `Copy` and never allocates.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    count: u64,
    /// What the set's values are taken relative to (its first value).
    shift: f64,
    /// Mean of `value - shift`.
    mean: f64,
    /// Sum of squared deviations from the mean.
    m2: f64,
    /// Neumaier sum of the values and its running compensation.
    sum: f64,
    compensation: f64,
    min: f64,
    max: f64,
    /// The point with the least `(timestamp, value)`, and the greatest:
    /// ties on time are broken by value, so the answer does not depend on
    /// the order points arrived in.
    first: (i64, f64),
    last: (i64, f64),
}

fn earlier(a: (i64, f64), b: (i64, f64)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1.total_cmp(&b.1).is_lt())
}

impl Moments {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one point (`value` finite: points are validated before).
    pub fn insert(&mut self, timestamp_ms: i64, value: f64) {
        if self.count == 0 {
            *self = Moments {
                count: 1,
                shift: value,
                mean: 0.0,
                m2: 0.0,
                sum: value,
                compensation: 0.0,
                min: value,
                max: value,
                first: (timestamp_ms, value),
                last: (timestamp_ms, value),
            };
            return;
        }
        self.count += 1;
        let y = value - self.shift;
        let delta = y - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (y - self.mean);
        self.add_to_sum(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        let point = (timestamp_ms, value);
        if earlier(point, self.first) {
            self.first = point;
        }
        if earlier(self.last, point) {
            self.last = point;
        }
    }

    /// Neumaier's step: the compensation keeps what `sum` cannot hold.
    fn add_to_sum(&mut self, value: f64) {
        let t = self.sum + value;
        if self.sum.abs() >= value.abs() {
            self.compensation += (self.sum - t) + value;
        } else {
            self.compensation += (value - t) + self.sum;
        }
        self.sum = t;
    }

    /// Merges another set (Chan et al.): the result is the set of both.
    pub fn merge(&mut self, other: &Moments) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        // The difference of the two means, in this set's shift: the shifts
        // of one series are close, so their difference is exact.
        let delta = (other.shift - self.shift) + (other.mean - self.mean);
        self.mean += delta * (nb / n);
        self.m2 += other.m2 + delta * delta * (na * nb / n);
        self.count += other.count;
        self.add_to_sum(other.sum);
        self.add_to_sum(other.compensation);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if earlier(other.first, self.first) {
            self.first = other.first;
        }
        if earlier(self.last, other.last) {
            self.last = other.last;
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn sum(&self) -> f64 {
        self.sum + self.compensation
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.shift + self.mean)
    }

    /// The sample variance (n - 1); `None` below two points.
    pub fn variance(&self) -> Option<f64> {
        (self.count > 1).then(|| (self.m2 / (self.count - 1) as f64).max(0.0))
    }

    /// The population variance (n).
    pub fn population_variance(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2 / self.count as f64).max(0.0))
    }

    /// The sample standard deviation.
    pub fn stddev(&self) -> Option<f64> {
        self.variance().map(f64::sqrt)
    }

    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    /// `(timestamp_ms, value)` of the earliest point.
    pub fn first(&self) -> Option<(i64, f64)> {
        (self.count > 0).then_some(self.first)
    }

    /// `(timestamp_ms, value)` of the latest point.
    pub fn last(&self) -> Option<(i64, f64)> {
        (self.count > 0).then_some(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rel(got: f64, want: f64) -> f64 {
        if want == 0.0 {
            got.abs()
        } else {
            ((got - want) / want).abs()
        }
    }

    fn of(values: &[f64]) -> Moments {
        let mut m = Moments::new();
        for (i, v) in values.iter().enumerate() {
            m.insert(i as i64, *v);
        }
        m
    }

    /// Exact reference for values `base + k / 1024` (all exactly
    /// representable): the variance of the `k`, in integers.
    fn exact_variance(ks: &[i64]) -> f64 {
        let n = ks.len() as i128;
        let s: i128 = ks.iter().map(|&k| i128::from(k)).sum();
        let s2: i128 = ks.iter().map(|&k| i128::from(k) * i128::from(k)).sum();
        // (n Σk² - (Σk)²) / (n (n - 1)), over 1024².
        let num = n * s2 - s * s;
        num as f64 / (n * (n - 1)) as f64 / (1024.0 * 1024.0)
    }

    #[test]
    fn values_near_1e9_with_noise_of_1e_3_keep_full_precision() {
        // Noise of about 1e-3 (multiples of 2^-10) on 1e9: exact in f64.
        let mut state = 7u64;
        let ks: Vec<i64> = (0..10_000)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 33) as i64 % 11 - 5
            })
            .collect();
        let values: Vec<f64> = ks.iter().map(|&k| 1e9 + k as f64 / 1024.0).collect();
        let m = of(&values);
        let want = exact_variance(&ks);
        assert!(want > 0.0);
        let got = m.variance().unwrap();
        assert!(rel(got, want) < 1e-9, "variance {got} vs {want}");
        let mean_k = ks.iter().sum::<i64>() as f64 / ks.len() as f64;
        let want_mean = 1e9 + mean_k / 1024.0;
        assert!(rel(m.mean().unwrap(), want_mean) < 1e-15);
        // The same split in 7 parts and merged.
        let mut merged = Moments::new();
        for chunk in values.chunks(1_500) {
            merged.merge(&of(chunk));
        }
        assert!(rel(merged.variance().unwrap(), want) < 1e-9);
        assert_eq!(merged.count(), 10_000);
    }

    #[test]
    fn the_textbook_cancellation_case_is_exact() {
        // 1e8 + {4, 7, 13, 16}: the variance is 30 (a naive sum of
        // squares answers garbage here).
        let m = of(&[1e8 + 4.0, 1e8 + 7.0, 1e8 + 13.0, 1e8 + 16.0]);
        assert_eq!(m.variance(), Some(30.0));
        assert_eq!(m.mean(), Some(1e8 + 10.0));
        assert_eq!(m.population_variance(), Some(22.5));
    }

    #[test]
    fn one_point_and_all_equal_points() {
        let one = of(&[-3.5]);
        assert_eq!(
            (one.count(), one.mean(), one.variance()),
            (1, Some(-3.5), None)
        );
        assert_eq!(
            (one.min(), one.max(), one.sum()),
            (Some(-3.5), Some(-3.5), -3.5)
        );
        let same = of(&[2.25; 1000]);
        assert_eq!(same.variance(), Some(0.0));
        assert_eq!(same.mean(), Some(2.25));
        assert_eq!(same.sum(), 2250.0);
        assert_eq!(Moments::new().mean(), None);
    }

    #[test]
    fn first_and_last_go_by_time_then_value_whatever_the_arrival_order() {
        let mut a = Moments::new();
        for (t, v) in [(5, 1.0), (1, 9.0), (1, -2.0), (9, 4.0), (9, 3.0)] {
            a.insert(t, v);
        }
        assert_eq!(a.first(), Some((1, -2.0)));
        assert_eq!(a.last(), Some((9, 4.0)));
        let mut b = Moments::new();
        for (t, v) in [(9, 3.0), (9, 4.0), (1, -2.0), (5, 1.0), (1, 9.0)] {
            b.insert(t, v);
        }
        assert_eq!((b.first(), b.last()), (a.first(), a.last()));
    }

    #[test]
    fn a_compensated_sum_keeps_what_a_plain_one_drops() {
        // 1e16 + 1 + 1 ... : a plain f64 sum never moves off 1e16.
        let mut values = vec![1e16];
        values.extend(std::iter::repeat_n(1.0, 1000));
        values.push(-1e16);
        assert_eq!(of(&values).sum(), 1000.0);
    }

    /// Two passes, the corrected form, as a reference.
    fn two_pass(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let (mut s, mut c) = (0.0, 0.0);
        for v in values {
            s += (v - mean) * (v - mean);
            c += v - mean;
        }
        (mean + c / n, (s - c * c / n) / (n - 1.0))
    }

    proptest! {
        #[test]
        fn merging_any_split_equals_one_pass_and_two_passes(
            values in proptest::collection::vec(-1e6f64..1e6, 2..300),
            cuts in proptest::collection::vec(0usize..300, 0..6),
        ) {
            let direct = of(&values);
            let (mean, variance) = two_pass(&values);
            prop_assert!(rel(direct.mean().unwrap(), mean) < 1e-9 || (direct.mean().unwrap() - mean).abs() < 1e-6);
            prop_assert!(rel(direct.variance().unwrap(), variance) < 1e-9);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % values.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut merged = Moments::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([values.len()]) {
                let mut part = Moments::new();
                for (i, v) in values.iter().enumerate().take(cut).skip(from) {
                    part.insert(i as i64, *v);
                }
                merged.merge(&part);
                from = cut.max(from);
            }
            prop_assert_eq!(merged.count(), direct.count());
            prop_assert_eq!((merged.min(), merged.max()), (direct.min(), direct.max()));
            prop_assert_eq!((merged.first(), merged.last()), (direct.first(), direct.last()));
            prop_assert!(rel(merged.variance().unwrap(), variance) < 1e-9);
            prop_assert!((merged.sum() - direct.sum()).abs() <= 1e-9 * direct.sum().abs().max(1.0));
        }
    }
}
