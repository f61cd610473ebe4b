//! What a series is watched for as its points arrive: anomalous points
//! (beyond `k` standard deviations of the series' running statistics) and
//! drift (see [`super::drift`]), with the method chosen per series
//! pattern. The state of one series is small, `Copy`-free but
//! allocation-free to update, and stored with the flush that applied its
//! points, so a restart judges the points it replays exactly as an
//! uninterrupted run would have.

use serde::{Deserialize, Serialize};

use super::drift::{anomaly_index, Drift, DriftConfig, DriftDetector};
use super::Moments;

#[derive(Debug, Clone, PartialEq)]
pub struct WatchRules {
    /// A point is anomalous beyond this many standard deviations.
    pub anomaly_k: f64,
    /// Points a series' statistics hold before any point is judged.
    pub anomaly_min_points: u64,
    /// At most one anomaly signal per series within this much event time
    /// (a burst of outliers is one incident, not a flood).
    pub anomaly_cooldown_ms: i64,
    /// Drift detection by series pattern, first match wins; `None` turns
    /// it off for the matching series. A pattern is a series key, or a
    /// prefix followed by `*`.
    pub drift: Vec<(String, Option<DriftConfig>)>,
    /// For series no pattern matches.
    pub default_drift: Option<DriftConfig>,
}

impl Default for WatchRules {
    fn default() -> Self {
        WatchRules {
            anomaly_k: 4.0,
            anomaly_min_points: 30,
            anomaly_cooldown_ms: 60_000,
            drift: Vec::new(),
            default_drift: Some(DriftConfig::default()),
        }
    }
}

impl WatchRules {
    pub fn drift_for(&self, series: &str) -> Option<&DriftConfig> {
        for (pattern, config) in &self.drift {
            let matches = match pattern.strip_suffix('*') {
                Some(prefix) => series.starts_with(prefix),
                None => series == pattern,
            };
            if matches {
                return config.as_ref();
            }
        }
        self.default_drift.as_ref()
    }
}

/// A signal raised by one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    Anomaly {
        at_ms: i64,
        value: f64,
        index: f64,
        mean: f64,
        stddev: f64,
    },
    Drift(Drift),
}

/// One series' watch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesWatch {
    running: Moments,
    drift: DriftDetector,
    last_anomaly_ms: Option<i64>,
}

impl SeriesWatch {
    /// Observes one accepted point; at most one signal of each kind.
    pub fn observe(
        &mut self,
        rules: &WatchRules,
        drift: Option<&DriftConfig>,
        at_ms: i64,
        value: f64,
    ) -> [Option<Signal>; 2] {
        let mut anomaly = None;
        if self.running.count() >= rules.anomaly_min_points.max(2) {
            if let Some(index) = anomaly_index(&self.running, value) {
                let cooled = self
                    .last_anomaly_ms
                    .is_none_or(|last| at_ms.saturating_sub(last) >= rules.anomaly_cooldown_ms);
                if index.abs() > rules.anomaly_k && cooled {
                    self.last_anomaly_ms = Some(at_ms);
                    anomaly = Some(Signal::Anomaly {
                        at_ms,
                        value,
                        index,
                        mean: self.running.mean().unwrap_or(0.0),
                        stddev: self.running.stddev().unwrap_or(0.0),
                    });
                }
            }
        }
        self.running.insert(at_ms, value);
        let drifted = drift
            .and_then(|config| self.drift.observe(config, at_ms, value))
            .map(Signal::Drift);
        if drifted.is_some() {
            // The series lives at a new level: judge outliers against it.
            self.running = Moments::new();
            self.running.insert(at_ms, value);
        }
        [anomaly, drifted]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic standard normal noise (xorshift, Box-Muller).
    fn noise(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.max(1);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        move || {
            let (u1, u2) = (next().max(1e-300), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    #[test]
    fn an_outlier_is_flagged_once_within_the_cooldown() {
        let rules = WatchRules {
            default_drift: None,
            ..WatchRules::default()
        };
        let mut w = SeriesWatch::default();
        let mut n = noise(7);
        for i in 0..200 {
            let [a, d] = w.observe(&rules, None, i * 1_000, 50.0 + n());
            assert!(a.is_none() && d.is_none(), "steady point {i} flagged");
        }
        // 30 sigmas out: flagged, with the index it had.
        let [a, _] = w.observe(&rules, None, 200_000, 80.0);
        match a {
            Some(Signal::Anomaly { index, at_ms, .. }) => {
                assert_eq!(at_ms, 200_000);
                assert!(index > 20.0, "{index}");
            }
            other => panic!("no anomaly: {other:?}"),
        }
        // Within the minute: the same incident, not signalled again.
        assert!(w.observe(&rules, None, 230_000, 80.0)[0].is_none());
        assert!(w.observe(&rules, None, 261_000, 20.0)[0].is_some());
    }

    #[test]
    fn drift_methods_follow_the_first_matching_pattern() {
        let page = DriftConfig {
            method: super::super::drift::DriftMethod::PageHinkley {
                delta_sigmas: 0.5,
                lambda_sigmas: 20.0,
            },
            warmup: 50,
        };
        let rules = WatchRules {
            drift: vec![
                ("cpu{host=quiet}".into(), None),
                ("cpu*".into(), Some(page)),
            ],
            ..WatchRules::default()
        };
        assert_eq!(rules.drift_for("cpu{host=quiet}"), None);
        assert_eq!(rules.drift_for("cpu{host=a}"), Some(&page));
        assert_eq!(rules.drift_for("mem"), Some(&DriftConfig::default()));
    }

    #[test]
    fn a_level_shift_drifts_soon_after_it_and_steady_noise_rarely_does() {
        let rules = WatchRules::default();
        let config = DriftConfig::default();
        // Steady noise: false alarms over 200,000 points.
        let mut w = SeriesWatch::default();
        let mut n = noise(11);
        let mut false_alarms = 0;
        for i in 0..200_000i64 {
            if w.observe(&rules, Some(&config), i, 10.0 + n())[1].is_some() {
                false_alarms += 1;
            }
        }
        // The stated rate is about one per 70,000 points.
        eprintln!("false drifts on steady noise: {false_alarms} in 200,000 points");
        assert!(false_alarms <= 8, "{false_alarms} false alarms");
        // A 3-sigma shift at point 1,000: signalled within 20 points.
        let mut w = SeriesWatch::default();
        let mut n = noise(5);
        let mut found = None;
        for i in 0..2_000i64 {
            let shift = if i >= 1_000 { 3.0 } else { 0.0 };
            if let [_, Some(Signal::Drift(d))] = w.observe(&rules, Some(&config), i, n() + shift) {
                found.get_or_insert(d);
            }
        }
        let d = found.expect("drift found");
        assert!((1_000..1_020).contains(&d.at_ms), "found at {}", d.at_ms);
        assert_eq!(d.direction, super::super::drift::Direction::Up);
    }
}
