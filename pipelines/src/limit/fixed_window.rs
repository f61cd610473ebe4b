//! Fixed window: one counter per window `[k * w, (k + 1) * w)`, windows
//! aligned to multiples of `window_seconds` since the epoch, so every
//! replica and every key agrees on the boundaries. The counter restarts at
//! each boundary, which allows up to twice the limit across one boundary:
//! the price of the simplest, cheapest algorithm.

use serde::{Deserialize, Serialize};

use super::{sat_i64, window_start, Decision, Limit, RETRY_NEVER};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedWindow {
    /// Start of the counted window, saturated to i64 (only the one window
    /// holding `i64::MIN` can start below it, so this stays unambiguous).
    window_start_ms: i64,
    count: u64,
    last_ms: i64,
}

impl FixedWindow {
    pub fn new(limit: &Limit, now_ms: i64) -> Self {
        FixedWindow {
            window_start_ms: sat_i64(window_start(now_ms, limit.window_ms())),
            count: 0,
            last_ms: now_ms,
        }
    }

    pub fn check(&mut self, limit: &Limit, now_ms: i64, cost: u64) -> Decision {
        let (decision, next) = self.evaluate(limit, now_ms, cost);
        *self = next;
        decision
    }

    pub fn peek(&self, limit: &Limit, now_ms: i64, cost: u64) -> Decision {
        self.evaluate(limit, now_ms, cost).0
    }

    pub fn reset(&mut self, now_ms: i64) {
        self.count = 0;
        self.last_ms = now_ms;
    }

    /// The decision at `now_ms` and the state after it. A window that is not
    /// the stored one (later, or a changed `window_seconds`) starts at 0.
    fn evaluate(&self, limit: &Limit, now_ms: i64, cost: u64) -> (Decision, Self) {
        let quota = limit.quota();
        let w = limit.window_ms();
        let now = now_ms.max(self.last_ms);
        let start = window_start(now, w);
        let key = sat_i64(start);
        let used = if key == self.window_start_ms {
            self.count
        } else {
            0
        };
        let end = start + i128::from(w);
        let reset_ms = sat_i64(end);
        let mut next = FixedWindow {
            window_start_ms: key,
            count: used,
            last_ms: now,
        };
        match used.checked_add(cost).filter(|&total| total <= quota) {
            Some(total) => {
                next.count = total;
                (Decision::allow(quota, quota - total, reset_ms), next)
            }
            None => {
                // Nothing frees up before the boundary; after it the counter
                // is 0, so any cost within the quota passes right there.
                let retry = if cost > quota {
                    RETRY_NEVER
                } else {
                    sat_i64(end - i128::from(now))
                };
                (
                    Decision::deny(quota, quota.saturating_sub(used), reset_ms, retry),
                    next,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_retry_exact, events, run_table, small_limit, Row};
    use super::super::{Algorithm, LimiterState};
    use super::*;
    use proptest::prelude::*;

    const FIXED: Algorithm = Algorithm::FixedWindow;

    #[test]
    fn window_edges_cost_and_never() {
        // 10 per 60 s: windows [0, 60 000), [60 000, 120 000), ...
        let limit = Limit::new(10, 60, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // t       cost allowed rem reset    retry
            (0,        7,  true,  3, 60_000,  0),      // used 7
            (59_999,   3,  true,  0, 60_000,  0),      // boundary - 1 ms: used 10
            (59_999,   1,  false, 0, 60_000,  1),      // full: 1 ms to the boundary
            (59_999,   0,  true,  0, 60_000,  0),      // cost 0 always fits
            (60_000,   1,  true,  9, 120_000, 0),      // boundary: counter restarts
            (60_001,   9,  true,  0, 120_000, 0),      // boundary + 1 ms: used 10
            (90_000,   2,  false, 0, 120_000, 30_000), // wait for 120 000
            (90_000,   11, false, 0, 120_000, RETRY_NEVER), // 11 > 10 never fits
            (300_000,  10, true,  0, 360_000, 0),      // windows skipped: fresh
        ];
        run_table(FIXED, &limit, rows);
    }

    #[test]
    fn windows_align_to_the_epoch_not_the_first_request() {
        // 1 700 000 030 000 = 28 333 333 * 60 000 + 50 000: the window is
        // [1 699 999 980 000, 1 700 000 040 000), not 60 s from creation.
        let limit = Limit::new(10, 60, 0);
        let t0 = 1_700_000_030_000;
        let end = 1_700_000_040_000;
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (t0,      10, true,  0,  end,          0),
            (end - 1, 1,  false, 0,  end,          1),
            (end,     1,  true,  9,  end + 60_000, 0),
        ];
        run_table(FIXED, &limit, rows);
    }

    #[test]
    fn peek_does_not_consume_and_reset_forgets() {
        let limit = Limit::new(3, 1, 0);
        let mut s = LimiterState::new(FIXED, &limit, 0);
        for _ in 0..100 {
            assert!(s.peek(&limit, 10, 1).allowed);
        }
        assert_eq!(s.check(&limit, 10, 3).remaining, 0);
        assert!(!s.peek(&limit, 10, 1).allowed);
        s.reset(20);
        assert_eq!(s.check(&limit, 20, 3), Decision::allow(3, 0, 1_000));
    }

    #[test]
    fn u64_extremes() {
        let limit = Limit::new(u64::MAX, 1, 0);
        let mut s = LimiterState::new(FIXED, &limit, 0);
        assert_eq!(
            s.check(&limit, 0, u64::MAX),
            Decision::allow(u64::MAX, 0, 1_000)
        );
        // The counter is at u64::MAX: adding must not overflow.
        assert_eq!(
            s.check(&limit, 999, u64::MAX),
            Decision::deny(u64::MAX, 0, 1_000, 1)
        );
        assert_eq!(
            s.check(&limit, 999, 1),
            Decision::deny(u64::MAX, 0, 1_000, 1)
        );
        let small = Limit::new(10, 1, 0);
        let mut s = LimiterState::new(FIXED, &small, 0);
        assert_eq!(
            s.check(&small, 0, u64::MAX),
            Decision::deny(10, 10, 1_000, RETRY_NEVER)
        );
    }

    #[test]
    fn huge_windows_and_extreme_times() {
        // window_seconds = u64::MAX is capped to i64::MAX ms: the window
        // [0, i64::MAX) holds every non-negative time, reset saturates.
        let limit = Limit::new(2, u64::MAX, 0);
        let mut s = LimiterState::new(FIXED, &limit, 1_000);
        assert!(s.check(&limit, 1_000, 2).allowed);
        assert_eq!(
            s.check(&limit, 1_000, 1),
            Decision::deny(2, 0, i64::MAX, i64::MAX - 1_000)
        );
        for t in [i64::MIN, -1, 0, i64::MAX] {
            for l in [limit, Limit::new(1, 1, 0)] {
                let mut s = LimiterState::new(FIXED, &l, t);
                s.check(&l, t, 1);
                s.check(&l, t, 1);
                s.check(&l, i64::MAX, 1);
                s.check(&l, i64::MIN, u64::MAX);
            }
        }
    }

    #[test]
    fn backwards_time_counts_as_no_time() {
        let limit = Limit::new(10, 60, 0);
        let mut s = LimiterState::new(FIXED, &limit, 61_000);
        assert!(s.check(&limit, 61_000, 10).allowed);
        // 59 000 would be the previous, empty window: it is read as 61 000.
        assert_eq!(
            s.check(&limit, 59_000, 1),
            Decision::deny(10, 0, 120_000, 59_000)
        );
        assert!(s.check(&limit, 120_000, 10).allowed);
    }

    proptest! {
        /// Against a naive recount over every admitted event: same
        /// decisions, same remaining, and no window ever over its quota.
        #[test]
        fn matches_naive_recount(limit in small_limit(), events in events()) {
            let w = limit.window_seconds as i64 * 1000;
            let mut s = LimiterState::new(FIXED, &limit, events[0].0);
            let mut admitted: Vec<(i64, u64)> = Vec::new();
            for &(t, cost) in &events {
                let used: u64 = admitted.iter().filter(|(at, _)| at.div_euclid(w) == t.div_euclid(w)).map(|a| a.1).sum();
                let fits = used + cost <= limit.requests;
                let d = s.check(&limit, t, cost);
                prop_assert_eq!(d.allowed, fits);
                prop_assert_eq!(d.remaining, limit.requests - used - if fits { cost } else { 0 });
                prop_assert_eq!(d.reset_ms, (t.div_euclid(w) + 1) * w);
                assert_retry_exact(&s, &limit, t, cost, &d);
                if fits {
                    admitted.push((t, cost));
                }
            }
            let mut per_window = std::collections::BTreeMap::new();
            for (t, c) in admitted {
                *per_window.entry(t.div_euclid(w)).or_insert(0) += c;
            }
            prop_assert!(per_window.values().all(|&n| n <= limit.requests));
        }
    }
}
