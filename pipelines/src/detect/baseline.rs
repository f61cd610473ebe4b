//! Online baselines: exponentially weighted mean and variance.
//!
//! Chosen over median/MAD over a ring of recent buckets because it costs
//! three numbers per client and metric instead of a ring per client (100k
//! clients × several metrics), updates in O(1) when a bucket closes, and
//! forgets old behaviour smoothly. Its weakness, sensitivity to outliers,
//! is handled by the detector: a bucket judged anomalous does not update
//! the baseline of the metric it was anomalous in.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    mean: f64,
    variance: f64,
    samples: u32,
}

impl Ewma {
    pub fn mean(&self) -> f64 {
        self.mean
    }

    pub fn std_dev(&self) -> f64 {
        self.variance.max(0.0).sqrt()
    }

    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// Adds one observation with weight `alpha` in (0, 1].
    pub fn update(&mut self, x: f64, alpha: f64) {
        if !x.is_finite() {
            return;
        }
        if self.samples == 0 {
            self.mean = x;
            self.variance = 0.0;
        } else {
            let d = x - self.mean;
            self.mean += alpha * d;
            self.variance = (1.0 - alpha) * (self.variance + alpha * d * d);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// How many (floored) standard deviations `x` lies above the mean.
    /// `floor` keeps a perfectly flat history from turning any blip into
    /// an infinite score.
    pub fn score(&self, x: f64, floor: f64) -> f64 {
        (x - self.mean) / self.std_dev().max(floor).max(f64::MIN_POSITIVE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_variance_follow_the_hand_computed_recurrence() {
        let mut e = Ewma::default();
        // alpha 0.5: x = 10 -> mean 10, var 0; x = 20 -> d = 10,
        // mean 15, var 0.5 * (0 + 0.5 * 100) = 25; x = 15 -> d = 0,
        // mean 15, var 0.5 * 25 = 12.5.
        e.update(10.0, 0.5);
        e.update(20.0, 0.5);
        assert_eq!((e.mean(), e.std_dev()), (15.0, 5.0));
        e.update(15.0, 0.5);
        assert_eq!(e.mean(), 15.0);
        assert!((e.std_dev() - 12.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(e.score(25.0, 0.0), 10.0 / 12.5f64.sqrt());
        assert_eq!(e.score(25.0, 5.0), 2.0, "the floor applies when larger");
        e.update(f64::NAN, 0.5);
        assert_eq!(e.samples(), 3, "non-finite observations are ignored");
    }
}
