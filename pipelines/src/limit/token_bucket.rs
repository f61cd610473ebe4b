//! Token bucket: holds up to `capacity` tokens (`burst_allowance` if > 0,
//! else `requests`), refilled at `requests / window_seconds` per second,
//! starting full. A request of cost `c` takes `c` tokens or nothing.
//!
//! Fixed point without rounding: tokens are counted in units of
//! `1 / window_ms` token, so the refill is exactly `requests` units per ms
//! (10 per 60 s: 10 units per ms, 60 000 units per token, one token per
//! 6 000 ms) and fractions of a token carry over exactly between calls.
//! The unit depends on the window only, not on `requests`, so an adaptive
//! factor never forces a conversion; a changed window converts the stored
//! tokens, rounding down (never creates tokens).

use serde::{Deserialize, Serialize};

use super::{
    after, ceil_div, duration_ms, elapsed_ms, rescale, sat_u64, Decision, Limit, RETRY_NEVER,
};

/// `tokens` value meaning "full, whatever the capacity": `reset` does not
/// know the limit, and the refill clamps it to the capacity on next use.
const FULL: u128 = u128::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Tokens in units of `1 / unit_ms` token.
    tokens: u128,
    /// The window length (ms) the units were counted in.
    unit_ms: u64,
    /// Time up to which the refill is accounted.
    last_ms: i64,
}

impl TokenBucket {
    pub fn new(limit: &Limit, now_ms: i64) -> Self {
        let unit_ms = limit.window_ms();
        TokenBucket {
            tokens: u128::from(limit.capacity()) * u128::from(unit_ms),
            unit_ms,
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

    /// Refills the bucket completely.
    pub fn reset(&mut self, now_ms: i64) {
        self.tokens = FULL;
        self.last_ms = now_ms;
    }

    fn evaluate(&self, limit: &Limit, now_ms: i64, cost: u64) -> (Decision, Self) {
        let capacity = limit.capacity();
        let rate = u128::from(limit.quota());
        let unit_ms = limit.window_ms();
        let unit = u128::from(unit_ms);
        // < 2^64 * 2^63: every amount below stays under 2^127.
        let cap = u128::from(capacity) * unit;
        let now = now_ms.max(self.last_ms);
        let held = if self.tokens == FULL {
            cap
        } else {
            rescale(self.tokens, self.unit_ms, unit_ms, false)
        };
        // A lowered capacity (adaptive factor) clamps the tokens held.
        let tokens = held
            .saturating_add(elapsed_ms(self.last_ms, now).saturating_mul(rate))
            .min(cap);
        let need = u128::from(cost) * unit;
        let mut next = TokenBucket {
            tokens,
            unit_ms,
            last_ms: now,
        };
        if need <= tokens {
            let left = tokens - need;
            next.tokens = left;
            let reset_ms = after(now, ceil_div(cap - left, rate));
            (
                Decision::allow(capacity, sat_u64(left / unit), reset_ms),
                next,
            )
        } else {
            let reset_ms = after(now, ceil_div(cap - tokens, rate));
            let retry = if cost > capacity {
                RETRY_NEVER
            } else {
                duration_ms(ceil_div(need - tokens, rate))
            };
            (
                Decision::deny(capacity, sat_u64(tokens / unit), reset_ms, retry),
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

    const TOKEN: Algorithm = Algorithm::TokenBucket;

    #[test]
    fn refill_one_token_per_six_seconds() {
        // 10 per 60 s, capacity 10: one token per 6 000 ms, 60 000 ms from
        // empty to full.
        let limit = Limit::new(10, 60, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // t        cost allowed rem reset      retry
            (0,         10,  true,  0,  60_000,    0),
            (5_999,     1,   false, 0,  60_000,    1),  // 0.99983 tokens
            (6_000,     1,   true,  0,  66_000,    0),  // exactly 1 token
            (6_000,     0,   true,  0,  66_000,    0),  // cost 0 always fits
            (18_000,    3,   false, 2,  66_000,    6_000), // 2 tokens, 1 short
            (24_000,    3,   true,  0,  84_000,    0),
            (24_000,    11,  false, 0,  84_000,    RETRY_NEVER), // 11 > capacity
            (1_000_000, 10,  true,  0,  1_060_000, 0),  // refill stops at 10
        ];
        run_table(TOKEN, &limit, rows);
    }

    #[test]
    fn fractions_carry_over_without_drift() {
        // 3 per 10 s: a token every 3 333.3 ms, 3 units per ms, 10 000
        // units per token. The k-th token arrives at ceil(k * 10 000 / 3).
        let limit = Limit::new(3, 10, 0);
        #[rustfmt::skip]
        let rows: &[Row] = &[
            (0,     3, true,  0, 10_000, 0),
            (3_333, 1, false, 0, 10_000, 1), // 9 999 units
            (3_334, 1, true,  0, 13_334, 0), // 10 002 - 10 000: 2 units kept
            (6_666, 1, false, 0, 13_334, 1), // 2 + 9 996 = 9 998
            // 2 + 10 000 - 10 000 = 1 unit left; full in ceil(29 999 / 3).
            (6_667, 1, true,  0, 16_667, 0),
        ];
        run_table(TOKEN, &limit, rows);
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
        let s = run_table(TOKEN, &limit, rows);
        assert_eq!(s.peek(&limit, 6_000, 1).limit, 20);
    }

    #[test]
    fn peek_does_not_consume_and_reset_refills() {
        let limit = Limit::new(3, 1, 0);
        let mut s = LimiterState::new(TOKEN, &limit, 0);
        for _ in 0..100 {
            assert!(s.peek(&limit, 0, 3).allowed);
        }
        assert!(s.check(&limit, 0, 3).allowed);
        assert!(!s.peek(&limit, 0, 1).allowed);
        s.reset(5);
        assert_eq!(s.check(&limit, 5, 3), Decision::allow(3, 0, 1_005));
    }

    #[test]
    fn tightening_clamps_and_window_change_converts() {
        // 8 of 10 used leaves 2; halving the limit (capacity 5) keeps the 2.
        let limit = Limit::new(10, 60, 0);
        let mut s = LimiterState::new(TOKEN, &limit, 0);
        s.check(&limit, 0, 8);
        let half = limit.scaled(0.5);
        assert_eq!(s.check(&half, 0, 2), Decision::allow(5, 0, 60_000));
        // A full bucket under a halved limit holds 5, not 10.
        let mut s = LimiterState::new(TOKEN, &limit, 0);
        assert_eq!(s.check(&half, 0, 6), Decision::deny(5, 5, 0, RETRY_NEVER));
        // 5 tokens kept in 1/60 000 units read as 5 in 1/120 000 units.
        let mut s = LimiterState::new(TOKEN, &limit, 0);
        s.check(&limit, 0, 5);
        let longer = Limit::new(10, 120, 0);
        assert_eq!(s.check(&longer, 0, 5), Decision::allow(10, 0, 120_000));
    }

    #[test]
    fn u64_extremes_and_huge_windows() {
        let limit = Limit::new(u64::MAX, u64::MAX, 0);
        let mut s = LimiterState::new(TOKEN, &limit, 0);
        assert!(s.check(&limit, 0, u64::MAX).allowed);
        // One token = i64::MAX units at u64::MAX units per ms: 1 ms.
        assert_eq!(
            s.check(&limit, 0, 1),
            Decision::deny(u64::MAX, 0, i64::MAX, 1)
        );
        // Refill across the whole i64 range must not overflow.
        for l in [
            limit,
            Limit::new(1, 1, u64::MAX),
            Limit::new(u64::MAX, 1, 1),
        ] {
            let mut s = LimiterState::new(TOKEN, &l, i64::MIN);
            s.check(&l, i64::MIN, u64::MAX);
            s.check(&l, i64::MAX, u64::MAX);
            s.check(&l, i64::MAX, 1);
            s.reset(i64::MIN);
            s.check(&l, i64::MAX, u64::MAX);
        }
        let small = Limit::new(10, 60, 0);
        let s = LimiterState::new(TOKEN, &small, 0);
        assert_eq!(
            s.peek(&small, 0, u64::MAX),
            Decision::deny(10, 10, 0, RETRY_NEVER)
        );
    }

    #[test]
    fn backwards_time_refills_nothing() {
        let limit = Limit::new(10, 60, 0);
        let mut s = LimiterState::new(TOKEN, &limit, 60_000);
        assert!(s.check(&limit, 60_000, 10).allowed);
        assert_eq!(s.check(&limit, 0, 1), Decision::deny(10, 0, 120_000, 6_000));
        assert!(!s.check(&limit, 65_999, 1).allowed);
        assert!(s.check(&limit, 66_000, 1).allowed);
    }

    proptest! {
        /// Against GCRA (virtual scheduling, an independent formulation of
        /// the same bucket) in exact integers, with time scaled by
        /// `requests` so one token is `window_ms` time units: same decisions
        /// and remaining. And the admitted units of any span [t_i, t_j]
        /// never exceed capacity + rate * (t_j - t_i).
        #[test]
        fn matches_gcra(limit in small_limit(), events in events()) {
            let (r, w, c) = (limit.requests as i128, limit.window_seconds as i128 * 1000, limit.capacity() as i128);
            let mut s = LimiterState::new(TOKEN, &limit, events[0].0);
            let mut tat = events[0].0 as i128 * r;
            let mut admitted: Vec<(i64, u64)> = Vec::new();
            for &(t, cost) in &events {
                let tr = t as i128 * r;
                let new_tat = tat.max(tr) + cost as i128 * w;
                let fits = new_tat - tr <= c * w;
                if fits {
                    tat = new_tat;
                }
                let d = s.check(&limit, t, cost);
                prop_assert_eq!(d.allowed, fits);
                prop_assert_eq!(d.remaining as i128, (c * w - (tat - tr).max(0)) / w);
                assert_retry_exact(&s, &limit, t, cost, &d);
                if fits {
                    admitted.push((t, cost));
                }
            }
            for i in 0..admitted.len() {
                let mut units = 0i128;
                for j in i..admitted.len() {
                    units += admitted[j].1 as i128 * w;
                    let span = (admitted[j].0 - admitted[i].0) as i128;
                    prop_assert!(units <= c * w + r * span);
                }
            }
        }
    }
}
