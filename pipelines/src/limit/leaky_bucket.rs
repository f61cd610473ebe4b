//! Leaky bucket as a meter: a level that drains continuously at
//! `requests / window_seconds` per second, of capacity `burst_allowance`
//! if > 0, else `requests`. A request of cost `c` is admitted when
//! `level + c <= capacity`, raising the level by `c`; starts empty.
//!
//! The level is counted in units of `1 / window_ms` request, so the drain
//! is exactly `requests` units per ms and no rounding ever accumulates. A
//! changed window converts the stored level rounding up (never loses fill).
//!
//! Against the token bucket (its mirror image while the limit is fixed) the
//! difference shows when the limit is tightened: the level is kept, so a
//! bucket fuller than the new capacity denies until it has drained below it,
//! where the token bucket clamps its tokens and admits at once.

use serde::{Deserialize, Serialize};

use super::{
    after, ceil_div, duration_ms, elapsed_ms, rescale, sat_u64, Decision, Limit, RETRY_NEVER,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeakyBucket {
    /// Level in units of `1 / unit_ms` request.
    level: u128,
    /// The window length (ms) the units were counted in.
    unit_ms: u64,
    /// Time up to which the drain is accounted.
    last_ms: i64,
}

impl LeakyBucket {
    pub fn new(limit: &Limit, now_ms: i64) -> Self {
        LeakyBucket {
            level: 0,
            unit_ms: limit.window_ms(),
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

    /// Empties the bucket.
    pub fn reset(&mut self, now_ms: i64) {
        self.level = 0;
        self.last_ms = now_ms;
    }

    fn evaluate(&self, limit: &Limit, now_ms: i64, cost: u64) -> (Decision, Self) {
        let capacity = limit.capacity();
        let rate = u128::from(limit.quota());
        let unit_ms = limit.window_ms();
        let unit = u128::from(unit_ms);
        // < 2^127; the level itself stays below the largest capacity ever
        // used, so level + need cannot overflow either (saturating anyway).
        let cap = u128::from(capacity) * unit;
        let now = now_ms.max(self.last_ms);
        let held = rescale(self.level, self.unit_ms, unit_ms, true);
        let level = held.saturating_sub(elapsed_ms(self.last_ms, now).saturating_mul(rate));
        let need = u128::from(cost) * unit;
        let room =
            |level: u128| sat_u64(u128::from(capacity).saturating_sub(ceil_div(level, unit)));
        let mut next = LeakyBucket {
            level,
            unit_ms,
            last_ms: now,
        };
        let filled = level.saturating_add(need);
        if filled <= cap {
            next.level = filled;
            (
                Decision::allow(capacity, room(filled), after(now, ceil_div(filled, rate))),
                next,
            )
        } else {
            // Drains to cap - need at the same rate; never if need > cap.
            let retry = if cost > capacity {
                RETRY_NEVER
            } else {
                duration_ms(ceil_div(filled - cap, rate))
            };
            (
                Decision::deny(
                    capacity,
                    room(level),
                    after(now, ceil_div(level, rate)),
                    retry,
                ),
                next,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_retry_exact, events, run_table, small_limit, Row};
    use super::super::{Algorithm, LimiterState};
    use super::*;
    use proptest::prelude::*;

    const LEAKY: Algorithm = Algorithm::LeakyBucket;

    #[test]
    fn drains_one_request_per_six_seconds() {
        // 10 per 60 s, capacity 10: drains one request per 6 000 ms,
        // 60 000 ms from full to empty.
        let limit = Limit::new(10, 60, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // t        cost allowed rem reset      retry
            (0,         10,  true,  0,  60_000,    0),
            (5_999,     1,   false, 0,  60_000,    1),  // level 9.0002 -> 0 room
            (6_000,     1,   true,  0,  66_000,    0),  // level exactly 9, + 1
            (6_000,     0,   true,  0,  66_000,    0),  // cost 0 always fits
            (18_000,    3,   false, 2,  66_000,    6_000), // level 8: 1 short
            (24_000,    3,   true,  0,  84_000,    0),
            (24_000,    11,  false, 0,  84_000,    RETRY_NEVER), // 11 > capacity
            (1_000_000, 10,  true,  0,  1_060_000, 0),  // drained to 0, not below
        ];
        run_table(LEAKY, &limit, rows);
    }

    #[test]
    fn fractions_carry_over_without_drift() {
        // 3 per 10 s: 3 units per ms, 10 000 units per request.
        let limit = Limit::new(3, 10, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (0,     3, true,  0, 10_000, 0), // level 30 000
            (3_333, 1, false, 0, 10_000, 1), // 20 001: 1 unit over, 1 ms
            (3_334, 1, true,  0, 13_334, 0), // 19 998 + 10 000 = 29 998
            (6_666, 1, false, 0, 13_334, 1), // 29 998 - 9 996 = 20 002
            (6_667, 1, true,  0, 16_667, 0), // 19 999 + 10 000, empty in 10 000
        ];
        run_table(LEAKY, &limit, rows);
    }

    #[test]
    fn burst_allowance_is_the_capacity() {
        let limit = Limit::new(10, 60, 20);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (0,     20, true,  0, 120_000, 0),
            (0,     1,  false, 0, 120_000, 6_000),
            (6_000, 1,  true,  0, 126_000, 0),
        ];
        let s = run_table(LEAKY, &limit, rows);
        assert_eq!(s.peek(&limit, 6_000, 1).limit, 20);
    }

    #[test]
    fn peek_does_not_consume_and_reset_empties() {
        let limit = Limit::new(3, 1, 0);
        let mut s = LimiterState::new(LEAKY, &limit, 0);
        for _ in 0..100 {
            assert!(s.peek(&limit, 0, 3).allowed);
        }
        assert!(s.check(&limit, 0, 3).allowed);
        assert!(!s.peek(&limit, 0, 1).allowed);
        s.reset(5);
        assert_eq!(s.check(&limit, 5, 3), Decision::allow(3, 0, 1_005));
    }

    #[test]
    fn tightening_keeps_the_level() {
        // Level 8 of 10. Halved: capacity 5, draining 5 per 60 s (one per
        // 12 000 ms). 8 + 1 > 5 until the level is 4: 4 requests to drain,
        // 48 000 ms; empty after 8 * 12 000 = 96 000 ms.
        let limit = Limit::new(10, 60, 0);
        let half = limit.scaled(0.5);
        let mut s = LimiterState::new(LEAKY, &limit, 0);
        s.check(&limit, 0, 8);
        assert_eq!(s.check(&half, 0, 1), Decision::deny(5, 0, 96_000, 48_000));
        assert!(!s.check(&half, 47_999, 1).allowed);
        assert!(s.check(&half, 48_000, 1).allowed);
        // A changed window keeps the level: 5 in 1/60 000 is 5 in 1/120 000.
        let mut s = LimiterState::new(LEAKY, &limit, 0);
        s.check(&limit, 0, 5);
        let longer = Limit::new(10, 120, 0);
        assert_eq!(s.check(&longer, 0, 5), Decision::allow(10, 0, 120_000));
    }

    #[test]
    fn u64_extremes_and_huge_windows() {
        let limit = Limit::new(u64::MAX, u64::MAX, 0);
        let mut s = LimiterState::new(LEAKY, &limit, 0);
        assert!(s.check(&limit, 0, u64::MAX).allowed);
        assert_eq!(
            s.check(&limit, 0, 1),
            Decision::deny(u64::MAX, 0, i64::MAX, 1)
        );
        for l in [
            limit,
            Limit::new(1, 1, u64::MAX),
            Limit::new(u64::MAX, 1, 1),
        ] {
            let mut s = LimiterState::new(LEAKY, &l, i64::MIN);
            s.check(&l, i64::MIN, u64::MAX);
            s.check(&l, i64::MIN, u64::MAX);
            s.check(&l, i64::MAX, u64::MAX);
            s.check(&l, i64::MAX, 1);
            s.reset(i64::MAX);
            s.check(&l, i64::MIN, u64::MAX);
        }
        let small = Limit::new(10, 60, 0);
        let s = LimiterState::new(LEAKY, &small, 0);
        assert_eq!(
            s.peek(&small, 0, u64::MAX),
            Decision::deny(10, 10, 0, RETRY_NEVER)
        );
    }

    #[test]
    fn backwards_time_drains_nothing() {
        let limit = Limit::new(10, 60, 0);
        let mut s = LimiterState::new(LEAKY, &limit, 60_000);
        assert!(s.check(&limit, 60_000, 10).allowed);
        assert_eq!(s.check(&limit, 0, 1), Decision::deny(10, 0, 120_000, 6_000));
        assert!(!s.check(&limit, 65_999, 1).allowed);
        assert!(s.check(&limit, 66_000, 1).allowed);
    }

    proptest! {
        /// Against the closed form of the meter (Lindley): the level at t
        /// is the largest excess, over every suffix of the admitted events,
        /// of their units over what drained since the suffix began, or 0.
        /// Same decisions and remaining; the level never exceeds capacity.
        #[test]
        fn matches_closed_form(limit in small_limit(), events in events()) {
            let (r, w, c) = (limit.requests as i128, limit.window_seconds as i128 * 1000, limit.capacity() as i128);
            let mut s = LimiterState::new(LEAKY, &limit, events[0].0);
            let mut admitted: Vec<(i64, u64)> = Vec::new();
            let level_at = |admitted: &[(i64, u64)], t: i64| -> i128 {
                let mut best = 0i128;
                let mut units = 0i128;
                for &(at, cost) in admitted.iter().rev() {
                    units += cost as i128 * w;
                    best = best.max(units - r * (t - at) as i128);
                }
                best
            };
            for &(t, cost) in &events {
                let level = level_at(&admitted, t);
                let fits = level + cost as i128 * w <= c * w;
                let d = s.check(&limit, t, cost);
                prop_assert_eq!(d.allowed, fits);
                if fits {
                    admitted.push((t, cost));
                }
                let after = level_at(&admitted, t);
                prop_assert!(after <= c * w);
                prop_assert_eq!(d.remaining as i128, c - (after + w - 1) / w);
                assert_retry_exact(&s, &limit, t, cost, &d);
            }
        }
    }
}
