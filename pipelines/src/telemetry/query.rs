//! Query-time steps over stored buckets: which stored resolution a step
//! reads (the coarsest that divides it), the points of each step as
//! merges of whole buckets, any aggregation of them, and the range's
//! summary. Nothing here reads a point: steps are exact merges.

use serde::Serialize;

use super::Bucket;

/// The resolutions stored by default, finest first (ms).
pub const DEFAULT_RESOLUTIONS_MS: [i64; 4] = [10_000, 60_000, 3_600_000, 86_400_000];

/// What one step's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Mean,
    Median,
    Min,
    Max,
    First,
    Last,
    Sum,
    Count,
    Stddev,
    P95,
    P99,
}

impl Agg {
    pub const ALL: [Agg; 11] = [
        Agg::Mean,
        Agg::Median,
        Agg::Min,
        Agg::Max,
        Agg::First,
        Agg::Last,
        Agg::Sum,
        Agg::Count,
        Agg::Stddev,
        Agg::P95,
        Agg::P99,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Agg::Mean => "mean",
            Agg::Median => "median",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::First => "first",
            Agg::Last => "last",
            Agg::Sum => "sum",
            Agg::Count => "count",
            Agg::Stddev => "stddev",
            Agg::P95 => "p95",
            Agg::P99 => "p99",
        }
    }

    pub fn parse(name: &str) -> Option<Agg> {
        Agg::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The aggregation of a (merged) bucket; `None` where it has no value
    /// (an empty step, the deviation of one point).
    pub fn of(self, b: &Bucket) -> Option<f64> {
        let m = &b.moments;
        match self {
            Agg::Mean => m.mean(),
            Agg::Median => b.sketch.quantile(0.5),
            Agg::Min => m.min(),
            Agg::Max => m.max(),
            Agg::First => m.first().map(|p| p.1),
            Agg::Last => m.last().map(|p| p.1),
            Agg::Sum => (!m.is_empty()).then(|| m.sum()),
            Agg::Count => Some(m.count() as f64),
            Agg::Stddev => m.stddev(),
            Agg::P95 => b.sketch.quantile(0.95),
            Agg::P99 => b.sketch.quantile(0.99),
        }
    }
}

/// The stored resolution a step reads: the coarsest of `resolutions`
/// that divides it; `None` when none does (the step is refused with the
/// resolutions it may be a multiple of).
pub fn resolution_for(step_ms: i64, resolutions: &[i64]) -> Option<i64> {
    resolutions
        .iter()
        .copied()
        .filter(|r| *r > 0 && step_ms > 0 && step_ms % r == 0)
        .max()
}

/// The range's statistics, as a query answers them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean: Option<f64>,
    /// Sample variance (n - 1).
    pub variance: Option<f64>,
    pub stddev: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

impl Summary {
    pub fn of(b: &Bucket) -> Summary {
        let m = &b.moments;
        Summary {
            count: m.count(),
            mean: m.mean(),
            variance: m.variance(),
            stddev: m.stddev(),
            min: m.min(),
            max: m.max(),
            p50: b.sketch.quantile(0.5),
            p95: b.sketch.quantile(0.95),
            p99: b.sketch.quantile(0.99),
        }
    }
}

/// Steps of `step_ms` from `from_ms` (rounded down to a multiple of the
/// step) up to `to_ms`, each the merge of the buckets starting inside it
/// (`buckets`: `(start, bucket)` in time order, at a resolution dividing
/// the step), with the merge of all of them. Empty steps are left out.
pub fn steps<'a>(
    buckets: impl IntoIterator<Item = &'a (i64, Bucket)>,
    from_ms: i64,
    to_ms: i64,
    step_ms: i64,
) -> (Vec<(i64, Bucket)>, Bucket) {
    steps_of(buckets.into_iter().cloned(), from_ms, to_ms, step_ms)
}

/// [`steps`] of buckets taken by value (a query's own read): a step of
/// one bucket is that bucket, not a copy.
pub fn steps_of(
    buckets: impl IntoIterator<Item = (i64, Bucket)>,
    from_ms: i64,
    to_ms: i64,
    step_ms: i64,
) -> (Vec<(i64, Bucket)>, Bucket) {
    let mut out: Vec<(i64, Bucket)> = Vec::new();
    let mut all = Bucket::default();
    if step_ms <= 0 {
        return (out, all);
    }
    let first = from_ms - from_ms.rem_euclid(step_ms);
    for (start, b) in buckets {
        if start < first || start >= to_ms {
            continue;
        }
        all.merge(&b);
        let window = start - (start - first).rem_euclid(step_ms);
        match out.last_mut() {
            Some((w, merged)) if *w == window => merged.merge(&b),
            _ => out.push((window, b)),
        }
    }
    (out, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_reads_the_coarsest_resolution_that_divides_it() {
        let r = DEFAULT_RESOLUTIONS_MS;
        assert_eq!(resolution_for(10_000, &r), Some(10_000));
        assert_eq!(resolution_for(30_000, &r), Some(10_000));
        assert_eq!(resolution_for(300_000, &r), Some(60_000));
        assert_eq!(resolution_for(7_200_000, &r), Some(3_600_000));
        assert_eq!(resolution_for(7 * 86_400_000, &r), Some(86_400_000));
        assert_eq!(resolution_for(15_000, &r), None);
        assert_eq!(resolution_for(0, &r), None);
    }

    /// A day of points, irregular in time, of both signs.
    fn points() -> Vec<(i64, f64)> {
        let mut state = 11u64;
        let mut t = 0i64;
        let mut out = Vec::new();
        while t < 86_400_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            t += 1 + (state % 20_000) as i64;
            let v = ((state >> 20) % 10_000) as f64 / 100.0 - 30.0;
            out.push((t, v));
        }
        out.retain(|p| p.0 < 86_400_000);
        out
    }

    fn stored(points: &[(i64, f64)], resolution: i64) -> Vec<(i64, Bucket)> {
        let mut buckets: Vec<(i64, Bucket)> = Vec::new();
        for &(t, v) in points {
            let start = t - t.rem_euclid(resolution);
            match buckets.last_mut() {
                Some((s, b)) if *s == start => b.insert(t, v),
                _ => {
                    let mut b = Bucket::default();
                    b.insert(t, v);
                    buckets.push((start, b));
                }
            }
        }
        buckets
    }

    fn nearest_rank(values: &mut [f64], q: f64) -> f64 {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        values[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
    }

    /// The aggregation of the points themselves.
    fn reference(agg: Agg, pts: &[(i64, f64)]) -> Option<f64> {
        let mut values: Vec<f64> = pts.iter().map(|p| p.1).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        Some(match agg {
            Agg::Mean => mean,
            Agg::Sum => values.iter().sum(),
            Agg::Count => n,
            Agg::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
            Agg::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Agg::First => pts.first()?.1,
            Agg::Last => pts.last()?.1,
            Agg::Stddev => {
                if pts.len() < 2 {
                    return None;
                }
                (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
            }
            Agg::Median => nearest_rank(&mut values, 0.5),
            Agg::P95 => nearest_rank(&mut values, 0.95),
            Agg::P99 => nearest_rank(&mut values, 0.99),
        })
    }

    #[test]
    fn every_aggregation_at_every_step_equals_the_points_own() {
        let pts = points();
        let ten_seconds = stored(&pts, 10_000);
        let (from, to) = (3_600_000 + 5_000, 20 * 3_600_000);
        for step in [10_000, 60_000, 300_000, 3_600_000] {
            let (got, all) = steps(&ten_seconds, from, to, step);
            let first = from - from.rem_euclid(step);
            let in_range: Vec<(i64, f64)> = pts
                .iter()
                .copied()
                .filter(|p| p.0 >= first && p.0 < to)
                .collect();
            assert_eq!(all.moments.count() as usize, in_range.len());
            let mut windows: Vec<i64> = in_range
                .iter()
                .map(|p| p.0 - (p.0 - first) % step)
                .collect();
            windows.dedup();
            assert_eq!(
                got.iter().map(|w| w.0).collect::<Vec<_>>(),
                windows,
                "step {step}"
            );
            for (w, merged) in &got {
                let mine: Vec<(i64, f64)> = in_range
                    .iter()
                    .copied()
                    .filter(|p| p.0 >= *w && p.0 < w + step)
                    .collect();
                for agg in Agg::ALL {
                    let (g, want) = (agg.of(merged), reference(agg, &mine));
                    match (g, want) {
                        (Some(g), Some(want)) => {
                            let exact = !matches!(agg, Agg::Median | Agg::P95 | Agg::P99);
                            let tolerance = if exact { 1e-9 } else { 0.01 };
                            assert!(
                                (g - want).abs() <= tolerance * want.abs().max(1e-9),
                                "step {step} window {w} {}: {g} vs {want}",
                                agg.name()
                            );
                        }
                        (g, want) => assert_eq!(g.is_some(), want.is_some(), "{}", agg.name()),
                    }
                }
            }
        }
    }

    #[test]
    fn coarser_buckets_merged_from_finer_ones_equal_direct_ones() {
        let pts = points();
        let direct = stored(&pts, 3_600_000);
        let (merged, _) = steps(&stored(&pts, 10_000), 0, 86_400_000, 3_600_000);
        assert_eq!(direct.len(), merged.len());
        for ((s1, a), (s2, b)) in direct.iter().zip(&merged) {
            assert_eq!(s1, s2);
            assert_eq!(a.sketch, b.sketch);
            let (a, b) = (&a.moments, &b.moments);
            assert_eq!((a.count(), a.min(), a.max()), (b.count(), b.min(), b.max()));
            assert_eq!((a.first(), a.last()), (b.first(), b.last()));
            let rel = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-12);
            assert!(rel(a.mean().unwrap(), b.mean().unwrap()) < 1e-9);
            assert!(rel(a.variance().unwrap(), b.variance().unwrap()) < 1e-9);
        }
        let summary = Summary::of(&steps(&direct, 0, 86_400_000, 86_400_000).1);
        assert_eq!(summary.count as usize, pts.len());
    }
}
