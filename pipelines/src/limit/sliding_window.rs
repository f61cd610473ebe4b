//! Sliding window, the approximation of Cloudflare's "counting things":
//! keep the counts of the previous and the current aligned window and
//! estimate the last `w` ms as
//!
//! `estimate = previous * (w - elapsed) / w + current`
//!
//! where `elapsed` is the time into the current window (the previous
//! window's events are assumed evenly spread). A request passes when
//! `estimate + cost <= requests`. To stay exact the comparison is done
//! multiplied by `w`, in u128:
//!
//! `previous * (w - elapsed) + (current + cost) * w <= requests * w`
//!
//! With `w <= i64::MAX` (< 2^63) and counts below 2^64 each product is
//! below 2^127, so the sum cannot overflow.

use serde::{Deserialize, Serialize};

use super::{ceil_div, sat_i64, sat_u64, window_start, Decision, Limit, RETRY_NEVER};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// Start of the current window, saturated to i64.
    window_start_ms: i64,
    previous: u64,
    current: u64,
    last_ms: i64,
}

impl SlidingWindow {
    pub fn new(limit: &Limit, now_ms: i64) -> Self {
        SlidingWindow {
            window_start_ms: sat_i64(window_start(now_ms, limit.window_ms())),
            previous: 0,
            current: 0,
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
        self.previous = 0;
        self.current = 0;
        self.last_ms = now_ms;
    }

    fn evaluate(&self, limit: &Limit, now_ms: i64, cost: u64) -> (Decision, Self) {
        let quota = limit.quota();
        let w = limit.window_ms();
        let now = now_ms.max(self.last_ms);
        let start = window_start(now, w);
        let key = sat_i64(start);
        // Same window, the next one (current becomes previous), or further
        // away / a changed window length: nothing overlaps any more.
        let (previous, current) = if key == self.window_start_ms {
            (self.previous, self.current)
        } else if sat_i64(start - i128::from(w)) == self.window_start_ms {
            (self.current, 0)
        } else {
            (0, 0)
        };
        let mut next = SlidingWindow {
            window_start_ms: key,
            previous,
            current,
            last_ms: now,
        };
        let elapsed = u128::try_from(i128::from(now) - start).unwrap_or(0);
        let w = u128::from(w);
        let reset_ms = sat_i64(start + w as i128);
        // The previous window's share of the estimate, in units of 1/w.
        let carried = u128::from(previous) * (w - elapsed);
        let fits = |used: u64| carried + u128::from(used) * w <= u128::from(quota) * w;
        let remaining = |used: u64| {
            sat_u64(u128::from(quota).saturating_sub(u128::from(used) + ceil_div(carried, w)))
        };
        match current
            .checked_add(cost)
            .filter(|&total| total <= quota && fits(total))
        {
            Some(total) => {
                next.current = total;
                (Decision::allow(quota, remaining(total), reset_ms), next)
            }
            None => {
                let retry = if cost > quota {
                    RETRY_NEVER
                } else {
                    let at = pass_offset(previous, current, cost, quota, w);
                    sat_i64(at as i128 - elapsed as i128)
                };
                (
                    Decision::deny(quota, remaining(current), reset_ms, retry),
                    next,
                )
            }
        }
    }
}

/// The earliest offset from the current window's start at which `cost`
/// (<= quota) passes, given it is denied now. The estimate only falls with
/// time (continuously across the boundary: at its end the previous weight
/// is 0 and the current count becomes the next window's previous with
/// weight 1), so the first passing time is well defined.
fn pass_offset(previous: u64, current: u64, cost: u64, quota: u64, w: u128) -> u128 {
    match current.checked_add(cost).filter(|&total| total <= quota) {
        // Passes in this window once previous * (w - e) <= (quota - total) * w,
        // i.e. w - e <= k with k = floor((quota - total) * w / previous). If
        // k = 0 that is e = w: the next window's start, where the estimate
        // is current + cost <= quota, so it passes there.
        Some(total) => {
            let k = u128::from(quota - total) * w / u128::from(previous.max(1));
            w - k.min(w)
        }
        // Not before the next window: there previous' = current, current' = 0
        // and it passes once current * (w - e) <= (quota - cost) * w; with
        // k = 0 only at the window after that, where nothing is left.
        None => {
            let k = u128::from(quota - cost) * w / u128::from(current.max(1));
            w + (w - k.min(w))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_retry_exact, events, run_table, small_limit, Row};
    use super::super::{Algorithm, LimiterState};
    use super::*;
    use proptest::prelude::*;

    const SLIDING: Algorithm = Algorithm::SlidingWindow;

    #[test]
    fn weighted_previous_window() {
        // 10 per 60 s. 7 at t = 0. At t = 90 000 (30 s into [60 000,
        // 120 000)) the previous 7 weigh 7 * 0.5 = 3.5, so 7 more would be
        // 10.5 > 10 (remaining = 10 - ceil(3.5) = 6). 7 passes once
        // 7 * (60 000 - e) <= 3 * 60 000, e >= 60 000 - floor(180 000 / 7)
        // = 60 000 - 25 714 = 34 286, so at 94 286: retry 4 286.
        let limit = Limit::new(10, 60, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // t      cost allowed rem reset    retry
            (0,       7,   true,  3, 60_000,  0),
            (90_000,  7,   false, 6, 120_000, 4_286),
            // 7 * 25 715 = 180 005 > 180 000: 1 ms short.
            (94_285,  7,   false, 6, 120_000, 1),
            // 7 * 25 714 = 179 998: passes; 2.99997 -> ceil 3, rem 10 - 7 - 3.
            (94_286,  7,   true,  0, 120_000, 0),
        ];
        run_table(SLIDING, &limit, rows);
    }

    #[test]
    fn window_edges() {
        let limit = Limit::new(10, 60, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // t      cost allowed rem reset    retry
            (0,       7,   true,  3, 60_000,  0),
            (30_000,  3,   true,  0, 60_000,  0),     // current 10
            // 11 > 10 in this window. Next window: 10 * (60 000 - e) <=
            // 9 * 60 000 at e = 6 000, i.e. t = 66 000: retry 66 000 - 59 999.
            (59_999,  1,   false, 0, 60_000,  6_001),
            (60_000,  1,   false, 0, 120_000, 6_000), // previous 10, weight 1
            (60_001,  1,   false, 0, 120_000, 5_999), // 10 * 59 999/60 000 + 1
            (65_999,  1,   false, 0, 120_000, 1),     // 9.00017 + 1 > 10
            (66_000,  1,   true,  0, 120_000, 0),     // 9 + 1 = 10 exactly
            (90_000,  0,   true,  4, 120_000, 0),     // 5 + 1: rem 10 - 1 - 5
            // 5 + 1 + 5 = 11. Needs 10 * (60 000 - e) <= 4 * 60 000:
            // e >= 36 000, t = 96 000.
            (90_000,  5,   false, 4, 120_000, 6_000),
            (96_000,  5,   true,  0, 120_000, 0),     // 4 + 6 = 10
            (96_000,  11,  false, 0, 120_000, RETRY_NEVER),
            // [120 000, 180 000) is skipped: nothing overlaps 180 000.
            (180_000, 10,  true,  0, 240_000, 0),
        ];
        run_table(SLIDING, &limit, rows);
    }

    #[test]
    fn retry_two_windows_ahead() {
        // 10 per 1 s, 10 at t = 500. At 900, cost 10: the next window
        // starts with the previous 10 at weight 1 and 10 * (1 000 - e) <=
        // 0 only at e = 1 000: the window after, t = 2 000.
        let limit = Limit::new(10, 1, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (500,   10, true,  0, 1_000, 0),
            (900,   10, false, 0, 1_000, 1_100),
            // previous 10 * 1/1 000 = 0.01: rem 10 - ceil(0.01) = 9.
            (1_999, 10, false, 9, 2_000, 1),
            (2_000, 10, true,  0, 3_000, 0),
        ];
        run_table(SLIDING, &limit, rows);
    }

    #[test]
    fn peek_does_not_consume_and_reset_forgets() {
        let limit = Limit::new(3, 1, 0);
        let mut s = LimiterState::new(SLIDING, &limit, 0);
        for _ in 0..100 {
            assert!(s.peek(&limit, 10, 3).allowed);
        }
        assert!(s.check(&limit, 10, 3).allowed);
        // At 1 500 the previous 3 weigh 1.5: 1.5 + 2 > 3.
        assert!(!s.peek(&limit, 1_500, 2).allowed);
        s.reset(1_500);
        assert_eq!(s.check(&limit, 1_500, 3), Decision::allow(3, 0, 2_000));
    }

    #[test]
    fn u64_extremes() {
        // quota u64::MAX per 1 s, all used at t = 0. At 1 000 the previous
        // u64::MAX weighs fully: 1 more fails by exactly 1 unit of 1/1000,
        // at 1 001: MAX * 999 + 1 000 <= MAX * 1 000.
        let limit = Limit::new(u64::MAX, 1, 0);
        let mut s = LimiterState::new(SLIDING, &limit, 0);
        assert!(s.check(&limit, 0, u64::MAX).allowed);
        assert_eq!(
            s.check(&limit, 1_000, 1),
            Decision::deny(u64::MAX, 0, 2_000, 1)
        );
        assert!(s.check(&limit, 1_001, 1).allowed);
        assert!(!s.check(&limit, 1_001, u64::MAX).allowed);
        let small = Limit::new(10, 1, 0);
        let s = LimiterState::new(SLIDING, &small, 0);
        assert_eq!(
            s.peek(&small, 0, u64::MAX),
            Decision::deny(10, 10, 1_000, RETRY_NEVER)
        );
    }

    #[test]
    fn huge_windows_and_extreme_times() {
        let huge = Limit::new(u64::MAX, u64::MAX, 0);
        for l in [huge, Limit::new(1, 1, 0), Limit::new(3, u64::MAX, 0)] {
            for t in [i64::MIN, -1, 0, i64::MAX] {
                let mut s = LimiterState::new(SLIDING, &l, t);
                s.check(&l, t, u64::MAX);
                s.check(&l, t, 1);
                s.check(&l, i64::MAX, u64::MAX);
                s.check(&l, i64::MAX, 1);
                s.check(&l, i64::MIN, 1);
            }
        }
    }

    #[test]
    fn backwards_time_counts_as_no_time() {
        // 10 per 60 s, 10 at 61 000. Going back to 1 000 (the previous,
        // empty window) is read as 61 000: still denied, retry as from 61 000.
        let limit = Limit::new(10, 60, 0);
        let mut s = LimiterState::new(SLIDING, &limit, 61_000);
        assert!(s.check(&limit, 61_000, 10).allowed);
        let at_61 = s.peek(&limit, 61_000, 1);
        assert!(!at_61.allowed);
        assert_eq!(s.check(&limit, 1_000, 1), at_61);
    }

    proptest! {
        /// Against a recount over every admitted event: same decisions and
        /// no aligned window ever over its quota.
        #[test]
        fn matches_recount(limit in small_limit(), events in events()) {
            let w = limit.window_seconds as i64 * 1000;
            let q = u128::from(limit.requests);
            let mut s = LimiterState::new(SLIDING, &limit, events[0].0);
            let mut admitted: Vec<(i64, u64)> = Vec::new();
            for &(t, cost) in &events {
                let k = t.div_euclid(w);
                let sum = |win: i64| -> u128 {
                    admitted.iter().filter(|(at, _)| at.div_euclid(w) == win).map(|a| u128::from(a.1)).sum()
                };
                let (prev, cur) = (sum(k - 1), sum(k));
                let e = (t - k * w) as u128;
                let wu = w as u128;
                let fits = prev * (wu - e) + (cur + u128::from(cost)) * wu <= q * wu;
                let d = s.check(&limit, t, cost);
                prop_assert_eq!(d.allowed, fits);
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
