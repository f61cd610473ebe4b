//! Signals on a series' values as they arrive: an anomaly index (a point
//! beyond k standard deviations of the series' running statistics) and
//! drift, a lasting change of level, by two-sided CUSUM or Page-Hinkley.
//!
//! Both learn a baseline first (`warmup` points), judge each later point
//! against it, and after a drift signal learn the new level afresh (so a
//! shift is reported once, not on every point after it).

use serde::{Deserialize, Serialize};

use super::Moments;

/// Which way a drift went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Up,
    Down,
}

/// A drift signal: when, which way, and the baseline it left.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    pub at_ms: i64,
    pub direction: Direction,
    pub baseline_mean: f64,
    pub baseline_stddev: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum DriftMethod {
    /// Sums of deviations beyond `k` sigmas; signals past `h` sigmas.
    Cusum { k_sigmas: f64, h_sigmas: f64 },
    /// Cumulative deviation from the running mean less `delta` sigmas,
    /// against its extreme so far; signals past `lambda` sigmas.
    PageHinkley {
        delta_sigmas: f64,
        lambda_sigmas: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DriftConfig {
    pub method: DriftMethod,
    /// Points learnt before any judgement.
    pub warmup: u32,
}

impl Default for DriftConfig {
    /// CUSUM with k = 0.5σ, h = 10σ after 100 points: a 2σ shift is
    /// signalled within about 7 points; on steady Gaussian noise the
    /// expected run between false alarms is about 70,000 points
    /// (Siegmund's approximation, two-sided; the tests measure it).
    fn default() -> Self {
        DriftConfig {
            method: DriftMethod::Cusum {
                k_sigmas: 0.5,
                h_sigmas: 10.0,
            },
            warmup: 100,
        }
    }
}

/// Points the baseline goes on learning from after the warm-up.
const LEARN_POINTS: u64 = 5_000;

/// One series' drift detector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftDetector {
    baseline: Moments,
    /// CUSUM: the upward and downward sums (in value units). Page-Hinkley:
    /// the cumulative sums and their extremes.
    up: f64,
    down: f64,
    up_extreme: f64,
    down_extreme: f64,
    judged: u64,
}

impl DriftDetector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Observes one point; a drift when one is signalled by it.
    pub fn observe(&mut self, config: &DriftConfig, at_ms: i64, value: f64) -> Option<Drift> {
        if self.baseline.count() < u64::from(config.warmup.max(2)) {
            self.baseline.insert(at_ms, value);
            return None;
        }
        let mean = self.baseline.mean()?;
        // A flat baseline would make every change infinitely many sigmas.
        let sigma = self
            .baseline
            .stddev()
            .filter(|s| *s > 0.0)
            .unwrap_or(f64::EPSILON * mean.abs().max(1.0));
        self.judged += 1;
        // A deviation counts for at most half the signal threshold: one
        // outlier is an anomaly, not a change of level; a real shift
        // still signals within a few points. Such an outlier is also kept
        // out of the baseline, whose spread it would inflate.
        let bound = 0.5
            * sigma
            * match config.method {
                DriftMethod::Cusum { h_sigmas, .. } => h_sigmas,
                DriftMethod::PageHinkley { lambda_sigmas, .. } => lambda_sigmas,
            };
        let raw = value - mean;
        let deviation = raw.clamp(-bound, bound);
        let signal = match config.method {
            DriftMethod::Cusum { k_sigmas, h_sigmas } => {
                let k = k_sigmas * sigma;
                self.up = (self.up + deviation - k).max(0.0);
                self.down = (self.down - deviation - k).max(0.0);
                let h = h_sigmas * sigma;
                if self.up > h {
                    Some(Direction::Up)
                } else if self.down > h {
                    Some(Direction::Down)
                } else {
                    None
                }
            }
            DriftMethod::PageHinkley {
                delta_sigmas,
                lambda_sigmas,
            } => {
                let delta = delta_sigmas * sigma;
                self.up += deviation - delta;
                self.up_extreme = self.up_extreme.min(self.up);
                self.down += deviation + delta;
                self.down_extreme = self.down_extreme.max(self.down);
                let lambda = lambda_sigmas * sigma;
                if self.up - self.up_extreme > lambda {
                    Some(Direction::Up)
                } else if self.down_extreme - self.down > lambda {
                    Some(Direction::Down)
                } else {
                    None
                }
            }
        };
        // The baseline keeps learning from every point up to a bound: a
        // level known from few points is known roughly, and its error
        // alone would sum to false alarms. A real shift still signals
        // first: it fills a sum in a few points, and moves a mean of
        // hundreds of points little.
        if signal.is_none() && raw.abs() <= bound && self.baseline.count() < LEARN_POINTS {
            self.baseline.insert(at_ms, value);
        }
        let direction = signal?;
        let drift = Drift {
            at_ms,
            direction,
            baseline_mean: mean,
            baseline_stddev: sigma,
        };
        // Learn the new level from here.
        *self = DriftDetector::new();
        self.baseline.insert(at_ms, value);
        Some(drift)
    }
}

/// The anomaly index of a value against a series' running statistics:
/// how many standard deviations it lies from the mean (`None` before two
/// points or on a flat series).
pub fn anomaly_index(stats: &Moments, value: f64) -> Option<f64> {
    let mean = stats.mean()?;
    let sigma = stats.stddev().filter(|s| *s > 0.0)?;
    Some((value - mean) / sigma)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard normal noise, deterministic (xorshift + Box-Muller).
    struct Noise(u64);

    impl Noise {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    fn methods() -> [DriftConfig; 2] {
        [
            DriftConfig::default(),
            DriftConfig {
                method: DriftMethod::PageHinkley {
                    delta_sigmas: 0.5,
                    lambda_sigmas: 10.0,
                },
                warmup: 100,
            },
        ]
    }

    #[test]
    fn a_shift_of_two_sigmas_is_found_soon_after_it_and_once() {
        for config in methods() {
            for (shift, direction) in [(2.0, Direction::Up), (-2.0, Direction::Down)] {
                let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
                let mut d = DriftDetector::new();
                let mut found = Vec::new();
                for i in 0..2_000i64 {
                    let level = if i >= 1_000 {
                        100.0 + 5.0 * shift
                    } else {
                        100.0
                    };
                    if let Some(drift) = d.observe(&config, i, level + 5.0 * noise.normal()) {
                        found.push(drift);
                    }
                }
                assert_eq!(found.len(), 1, "{config:?} {shift}: {found:?}");
                let drift = found[0];
                assert_eq!(drift.direction, direction);
                // Within 20 points of the shift, never before it.
                assert!(
                    (1_000..1_020).contains(&drift.at_ms),
                    "{config:?}: found at {}",
                    drift.at_ms
                );
                assert!((drift.baseline_mean - 100.0).abs() < 2.0);
            }
        }
    }

    #[test]
    fn false_alarms_on_steady_noise_are_rare() {
        // 200,000 points of steady Gaussian noise: about 3 expected with
        // the defaults (one per ~70,000 points); at most one per 25,000
        // is what the defaults promise.
        for config in methods() {
            let mut noise = Noise(42);
            let mut d = DriftDetector::new();
            let alarms = (0..200_000i64)
                .filter(|i| d.observe(&config, *i, 10.0 + noise.normal()).is_some())
                .count();
            println!("{config:?}: {alarms} false alarms in 200,000 points");
            assert!(alarms <= 8, "{config:?}: {alarms} false alarms");
        }
    }

    #[test]
    fn the_anomaly_index_counts_standard_deviations() {
        let mut m = Moments::new();
        for (i, v) in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].iter().enumerate() {
            m.insert(i as i64, *v);
        }
        // Mean 5, sample stddev sqrt(32 / 7).
        let sigma = (32.0f64 / 7.0).sqrt();
        assert!((anomaly_index(&m, 5.0 + 3.0 * sigma).unwrap() - 3.0).abs() < 1e-12);
        assert!((anomaly_index(&m, 5.0).unwrap()).abs() < 1e-12);
        let mut flat = Moments::new();
        flat.insert(0, 1.0);
        flat.insert(1, 1.0);
        assert_eq!(anomaly_index(&flat, 9.0), None);
    }
}
