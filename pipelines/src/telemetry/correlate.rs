//! Correlating two series: their points joined by time within a
//! tolerance, and Pearson's r of the pairs in one pass (co-moments updated
//! Welford's way, so no second read and no cancellation of large sums).

/// A matched pair: `(a's time, a's value, b's time, b's value)`.
pub type Pair = (i64, f64, i64, f64);

/// Joins two time-sorted series: each point of `a` is paired with the
/// nearest unpaired point of `b` within `tolerance_ms` (the earlier on a
/// tie); every point is used at most once. Linear in both lengths.
pub fn join(a: &[(i64, f64)], b: &[(i64, f64)], tolerance_ms: i64) -> Vec<Pair> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(ta, va) in a {
        // Points of b too early for this (and so every later) point of a.
        while j < b.len() && b[j].0 < ta - tolerance_ms {
            j += 1;
        }
        if j == b.len() {
            break;
        }
        let candidate = |k: usize| (b[k].0 - ta).abs();
        if candidate(j) > tolerance_ms {
            continue;
        }
        // The nearest of b from j on (b is sorted: distance falls, then
        // rises).
        let mut best = j;
        while best + 1 < b.len() && candidate(best + 1) < candidate(best) {
            best += 1;
        }
        out.push((ta, va, b[best].0, b[best].1));
        j = best + 1;
    }
    out
}

/// Running co-moments of pairs `(x, y)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Correlation {
    n: u64,
    mean_x: f64,
    mean_y: f64,
    m2_x: f64,
    m2_y: f64,
    c_xy: f64,
}

impl Correlation {
    pub fn add(&mut self, x: f64, y: f64) {
        self.n += 1;
        let n = self.n as f64;
        let dx = x - self.mean_x;
        self.mean_x += dx / n;
        let dy = y - self.mean_y;
        self.mean_y += dy / n;
        // The new mean on one side, the old on the other: exact Welford.
        self.m2_x += dx * (x - self.mean_x);
        self.m2_y += dy * (y - self.mean_y);
        self.c_xy += dx * (y - self.mean_y);
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// Pearson's r; `None` below two pairs or when either side is
    /// constant (r is undefined then, not 0).
    pub fn pearson(&self) -> Option<f64> {
        if self.n < 2 || self.m2_x <= 0.0 || self.m2_y <= 0.0 {
            return None;
        }
        Some((self.c_xy / (self.m2_x.sqrt() * self.m2_y.sqrt())).clamp(-1.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_worked_join_within_the_tolerance() {
        let a = [(0, 1.0), (100, 2.0), (205, 3.0), (1000, 4.0)];
        let b = [
            (3, 10.0),
            (98, 20.0),
            (104, 21.0),
            (290, 30.0),
            (2000, 40.0),
        ];
        // 0~3; 100 nearest is 98 (2 ms) not 104; 205: 290 is 85 ms off,
        // beyond 50; 1000: nothing near.
        assert_eq!(
            join(&a, &b, 50),
            vec![(0, 1.0, 3, 10.0), (100, 2.0, 98, 20.0)]
        );
        // Each point of b once: two points of a near one of b.
        let a = [(10, 1.0), (12, 2.0)];
        let b = [(11, 5.0)];
        assert_eq!(join(&a, &b, 5), vec![(10, 1.0, 11, 5.0)]);
        assert!(join(&[], &b, 5).is_empty());
    }

    #[test]
    fn perfect_inverse_and_undefined_correlations() {
        let mut up = Correlation::default();
        let mut down = Correlation::default();
        let mut flat = Correlation::default();
        for i in 0..50 {
            let x = f64::from(i);
            up.add(x, 3.0 * x + 7.0);
            down.add(x, -0.5 * x);
            flat.add(x, 2.0);
        }
        assert!((up.pearson().unwrap() - 1.0).abs() < 1e-12);
        assert!((down.pearson().unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(flat.pearson(), None);
        let mut one = Correlation::default();
        one.add(1.0, 1.0);
        assert_eq!(one.pearson(), None);
    }

    fn two_pass(pairs: &[(f64, f64)]) -> Option<f64> {
        let n = pairs.len() as f64;
        let mx = pairs.iter().map(|p| p.0).sum::<f64>() / n;
        let my = pairs.iter().map(|p| p.1).sum::<f64>() / n;
        let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
        for (x, y) in pairs {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx) * (x - mx);
            syy += (y - my) * (y - my);
        }
        (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx.sqrt() * syy.sqrt()))
    }

    proptest! {
        #[test]
        fn one_pass_equals_two_passes(pairs in proptest::collection::vec((-1e3f64..1e3, -1e3f64..1e3), 3..300)) {
            let mut c = Correlation::default();
            for &(x, y) in &pairs { c.add(x + 1e6, y - 5e5); }
            let want = two_pass(&pairs);
            match (c.pearson(), want) {
                (Some(got), Some(want)) => prop_assert!((got - want).abs() < 1e-9, "{} vs {}", got, want),
                (got, want) => prop_assert_eq!(got.is_some(), want.is_some()),
            }
        }

        #[test]
        fn a_join_pairs_only_points_within_the_tolerance_and_each_once(
            mut a in proptest::collection::vec(0i64..10_000, 0..100),
            mut b in proptest::collection::vec(0i64..10_000, 0..100),
            tolerance in 0i64..200,
        ) {
            a.sort_unstable();
            b.sort_unstable();
            let a: Vec<(i64, f64)> = a.into_iter().map(|t| (t, 0.0)).collect();
            let b: Vec<(i64, f64)> = b.into_iter().enumerate().map(|(i, t)| (t, i as f64)).collect();
            let pairs = join(&a, &b, tolerance);
            let mut used = std::collections::BTreeSet::new();
            for &(ta, _, tb, vb) in &pairs {
                prop_assert!((ta - tb).abs() <= tolerance);
                prop_assert!(used.insert(vb as usize), "a point of b twice");
            }
            // In time order on both sides.
            prop_assert!(pairs.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].2 <= w[1].2));
        }
    }
}
