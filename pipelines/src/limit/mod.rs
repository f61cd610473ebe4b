//! Rate-limit algorithms: pure decisions over explicit time.
//!
//! - [`fixed_window`]: a counter per window aligned to the epoch.
//! - [`sliding_window`]: previous + current window counters, the previous
//!   one weighted by how much of it still overlaps the sliding window.
//! - [`token_bucket`]: tokens refilled at a constant rate, bursts up to the
//!   capacity.
//! - [`policy`]: a client's configuration (global and per-endpoint
//!   limits, shadow mode) and the limiter that applies it.
//! - [`leaky_bucket`]: a meter draining at a constant rate; a request is
//!   admitted when it fits in the remaining room.
//!
//! Conventions shared by every algorithm:
//! - Time is `now_ms`, epoch milliseconds, always passed in. A state only
//!   moves forward: the effective time is `max(now_ms, latest time seen)`,
//!   so a clock going backwards counts as no time elapsed.
//! - `check` is all-or-nothing: it consumes `cost` only when allowed. `peek`
//!   returns the very same [`Decision`] without consuming anything. A cost
//!   of 0 passes unless usage already exceeds a since-tightened limit.
//! - `remaining` is what is left after the request if allowed, what is left
//!   now if denied.
//! - Arithmetic is exact integer arithmetic (no floats in decisions), so a
//!   replay gives identical answers. Windows longer than `i64::MAX` ms
//!   (292 million years) are capped there; `0` in `requests` or
//!   `window_seconds` is treated as `1`. Nothing panics or overflows.
//! - `retry_after_ms` is `0` when allowed; when denied it is the exact
//!   smallest wait (from the effective time) after which the same cost
//!   would pass if nothing else consumes in between. [`RETRY_NEVER`]
//!   (`i64::MAX`) when the cost exceeds the limit or capacity, so no wait
//!   helps; waits beyond `i64` also saturate to `i64::MAX`.
//! - `reset_ms` saturates at `i64::MAX`.
//! - An adaptive factor is applied by the caller: [`Limit::scaled`].

use serde::{Deserialize, Serialize};

pub mod fixed_window;
pub mod leaky_bucket;
pub mod policy;
pub mod sliding_window;
pub mod token_bucket;

#[cfg(test)]
pub(crate) mod testing;

pub use fixed_window::FixedWindow;
pub use leaky_bucket::LeakyBucket;
pub use sliding_window::SlidingWindow;
pub use token_bucket::TokenBucket;

/// `retry_after_ms` of a request that can never pass (cost above the limit).
pub const RETRY_NEVER: i64 = i64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Algorithm {
    FixedWindow,
    SlidingWindow,
    TokenBucket,
    LeakyBucket,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
    ];
}

/// `requests` per `window_seconds`; the buckets hold up to
/// `burst_allowance` (when > 0, else `requests`). Validated elsewhere
/// (requests >= 1, window_seconds >= 1); zeros are read as 1 here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limit {
    pub requests: u64,
    pub window_seconds: u64,
    pub burst_allowance: u64,
}

impl Limit {
    pub fn new(requests: u64, window_seconds: u64, burst_allowance: u64) -> Self {
        Limit {
            requests,
            window_seconds,
            burst_allowance,
        }
    }

    /// The limit tightened by an adaptive `factor` in (0, 1]: `requests`
    /// and `burst_allowance` are multiplied and floored. `requests` stays at
    /// least 1, and a non-zero burst stays at least 1 (a burst of 0 would
    /// mean "capacity = requests", possibly looser than the burst it
    /// replaces). A factor that is NaN, infinite or <= 0 is read as 1.0 (no
    /// change: a broken signal must not block all traffic) and one above 1
    /// is capped at 1.0, so scaling never loosens the configured limit.
    pub fn scaled(&self, factor: f64) -> Limit {
        let factor = if factor.is_finite() && factor > 0.0 {
            factor.min(1.0)
        } else {
            1.0
        };
        if factor >= 1.0 {
            return *self;
        }
        // `as u64` saturates; `min(n)` guards against the f64 rounding of
        // large counts up past the original.
        let scale = |n: u64| ((n as f64 * factor).floor() as u64).min(n);
        Limit {
            requests: scale(self.requests).max(1),
            window_seconds: self.window_seconds,
            burst_allowance: if self.burst_allowance == 0 {
                0
            } else {
                scale(self.burst_allowance).max(1)
            },
        }
    }

    /// Capacity of the buckets: `burst_allowance` if > 0, else `requests`.
    pub fn capacity(&self) -> u64 {
        if self.burst_allowance > 0 {
            self.burst_allowance
        } else {
            self.quota()
        }
    }

    /// `requests`, with 0 read as 1.
    pub(crate) fn quota(&self) -> u64 {
        self.requests.max(1)
    }

    /// Window length in ms, in `1_000..=i64::MAX`, so a product with any
    /// u64 count stays below 2^127.
    pub(crate) fn window_ms(&self) -> u64 {
        self.window_seconds
            .max(1)
            .saturating_mul(1000)
            .min(i64::MAX as u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    /// The limit the decision was taken against: `requests` for the
    /// windows, the capacity for the buckets.
    pub limit: u64,
    /// Units left after this request (if allowed) at the effective time.
    pub remaining: u64,
    /// Epoch ms: end of the current window (windows), when the bucket is
    /// full again (token) or empty (leaky).
    pub reset_ms: i64,
    /// 0 when allowed; see the module docs.
    pub retry_after_ms: i64,
}

impl Decision {
    pub(crate) fn allow(limit: u64, remaining: u64, reset_ms: i64) -> Self {
        Decision {
            allowed: true,
            limit,
            remaining,
            reset_ms,
            retry_after_ms: 0,
        }
    }

    pub(crate) fn deny(limit: u64, remaining: u64, reset_ms: i64, retry_after_ms: i64) -> Self {
        Decision {
            allowed: false,
            limit,
            remaining,
            reset_ms,
            retry_after_ms,
        }
    }
}

/// The persisted state of one limited key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LimiterState {
    Fixed(FixedWindow),
    Sliding(SlidingWindow),
    Token(TokenBucket),
    Leaky(LeakyBucket),
}

impl LimiterState {
    pub fn new(algorithm: Algorithm, limit: &Limit, now_ms: i64) -> Self {
        match algorithm {
            Algorithm::FixedWindow => LimiterState::Fixed(FixedWindow::new(limit, now_ms)),
            Algorithm::SlidingWindow => LimiterState::Sliding(SlidingWindow::new(limit, now_ms)),
            Algorithm::TokenBucket => LimiterState::Token(TokenBucket::new(limit, now_ms)),
            Algorithm::LeakyBucket => LimiterState::Leaky(LeakyBucket::new(limit, now_ms)),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            LimiterState::Fixed(_) => Algorithm::FixedWindow,
            LimiterState::Sliding(_) => Algorithm::SlidingWindow,
            LimiterState::Token(_) => Algorithm::TokenBucket,
            LimiterState::Leaky(_) => Algorithm::LeakyBucket,
        }
    }

    /// Decides and, only when allowed, consumes `cost`.
    pub fn check(&mut self, limit: &Limit, now_ms: i64, cost: u64) -> Decision {
        match self {
            LimiterState::Fixed(s) => s.check(limit, now_ms, cost),
            LimiterState::Sliding(s) => s.check(limit, now_ms, cost),
            LimiterState::Token(s) => s.check(limit, now_ms, cost),
            LimiterState::Leaky(s) => s.check(limit, now_ms, cost),
        }
    }

    /// The decision `check` would return, consuming nothing.
    pub fn peek(&self, limit: &Limit, now_ms: i64, cost: u64) -> Decision {
        match self {
            LimiterState::Fixed(s) => s.peek(limit, now_ms, cost),
            LimiterState::Sliding(s) => s.peek(limit, now_ms, cost),
            LimiterState::Token(s) => s.peek(limit, now_ms, cost),
            LimiterState::Leaky(s) => s.peek(limit, now_ms, cost),
        }
    }

    /// Forgets all usage, as if created at `now_ms`.
    pub fn reset(&mut self, now_ms: i64) {
        match self {
            LimiterState::Fixed(s) => s.reset(now_ms),
            LimiterState::Sliding(s) => s.reset(now_ms),
            LimiterState::Token(s) => s.reset(now_ms),
            LimiterState::Leaky(s) => s.reset(now_ms),
        }
    }
}

// Shared exact-arithmetic helpers.

/// Start of the window of length `w` holding `t`, aligned to the epoch.
/// i128 because it can lie below `i64::MIN`.
pub(crate) fn window_start(t: i64, w: u64) -> i128 {
    let t = i128::from(t);
    t - t.rem_euclid(i128::from(w.max(1)))
}

pub(crate) fn sat_i64(x: i128) -> i64 {
    i64::try_from(x).unwrap_or(if x < 0 { i64::MIN } else { i64::MAX })
}

pub(crate) fn sat_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// A duration in ms, saturated at `i64::MAX`.
pub(crate) fn duration_ms(ms: u128) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// `now + ms`, saturated.
pub(crate) fn after(now: i64, ms: u128) -> i64 {
    sat_i64(i128::from(now) + i128::from(duration_ms(ms)))
}

/// Milliseconds from `from` to `to` (0 if `to` is earlier).
pub(crate) fn elapsed_ms(from: i64, to: i64) -> u128 {
    u128::try_from(i128::from(to) - i128::from(from)).unwrap_or(0)
}

/// `ceil(a / b)`; a zero divisor is read as 1 (callers never pass one).
pub(crate) fn ceil_div(a: u128, b: u128) -> u128 {
    a.div_ceil(b.max(1))
}

/// Converts an amount kept in units of `1/from` to units of `1/to`,
/// rounding down or up, saturating. Exact for amounts below 2^127.
pub(crate) fn rescale(units: u128, from: u64, to: u64, round_up: bool) -> u128 {
    let (from, to) = (u128::from(from.max(1)), u128::from(to.max(1)));
    if from == to {
        return units;
    }
    // Split so neither product overflows: r < from < 2^64, to < 2^64.
    let (q, r) = (units / from, units % from);
    let frac = if round_up {
        ceil_div(r * to, from)
    } else {
        r * to / from
    };
    q.saturating_mul(to).saturating_add(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_floors_and_keeps_minimums() {
        let l = Limit::new(10, 60, 15);
        assert_eq!(l.scaled(0.5), Limit::new(5, 60, 7));
        assert_eq!(l.scaled(0.01), Limit::new(1, 60, 1));
        assert_eq!(Limit::new(10, 60, 0).scaled(0.01), Limit::new(1, 60, 0));
        assert_eq!(l.scaled(1e-300), Limit::new(1, 60, 1));
        let max = Limit::new(u64::MAX, 60, u64::MAX);
        let half = max.scaled(0.5);
        assert!(half.requests <= u64::MAX / 2 + 1 && half.requests > u64::MAX / 3);
        // f64 rounds 2^54 - 1 up to 2^54: the result must still not exceed it.
        let odd = Limit::new((1 << 54) - 1, 60, 0);
        assert!(odd.scaled(1.0 - f64::EPSILON / 2.0).requests <= odd.requests);
    }

    #[test]
    fn scaled_ignores_broken_factors() {
        let l = Limit::new(10, 60, 15);
        for f in [
            1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            -0.5,
            2.0,
            f64::MAX,
        ] {
            assert_eq!(l.scaled(f), l, "factor {f}");
        }
    }

    #[test]
    fn capacity_and_zero_guards() {
        assert_eq!(Limit::new(10, 60, 0).capacity(), 10);
        assert_eq!(Limit::new(10, 60, 25).capacity(), 25);
        assert_eq!(Limit::new(0, 0, 0).capacity(), 1);
        assert_eq!(Limit::new(0, 0, 0).window_ms(), 1000);
        assert_eq!(Limit::new(1, u64::MAX, 0).window_ms(), i64::MAX as u64);
    }

    #[test]
    fn algorithm_serde_names() {
        let names: Vec<String> = Algorithm::ALL
            .iter()
            .map(|a| serde_json::to_string(a).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "\"FIXED_WINDOW\"",
                "\"SLIDING_WINDOW\"",
                "\"TOKEN_BUCKET\"",
                "\"LEAKY_BUCKET\""
            ]
        );
        let a: Algorithm = serde_json::from_str("\"LEAKY_BUCKET\"").unwrap();
        assert_eq!(a, Algorithm::LeakyBucket);
    }

    #[test]
    fn states_round_trip_through_serde() {
        let limit = Limit::new(u64::MAX, u64::MAX, 0);
        for algorithm in Algorithm::ALL {
            let mut s = LimiterState::new(algorithm, &limit, 1_700_000_000_123);
            s.check(&limit, 1_700_000_000_124, 3);
            let json = serde_json::to_string(&s).unwrap();
            let back: LimiterState = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s, "{json}");
            assert_eq!(back.algorithm(), algorithm);
        }
    }

    #[test]
    fn zero_limit_never_panics() {
        let limit = Limit::new(0, 0, 0);
        for algorithm in Algorithm::ALL {
            let mut s = LimiterState::new(algorithm, &limit, 0);
            assert!(s.check(&limit, 0, 1).allowed, "{algorithm:?}");
            assert!(!s.check(&limit, 0, 1).allowed, "{algorithm:?}");
        }
    }

    proptest::proptest! {
        /// Any limits, times (in any order) and costs: no panic, peek agrees
        /// with check, and the retry is 0 exactly when allowed.
        #[test]
        fn never_panics(
            limits in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY, proptest::num::u64::ANY), 1..4),
            steps in proptest::collection::vec((proptest::num::i64::ANY, proptest::num::u64::ANY, 0usize..4), 1..30),
        ) {
            for algorithm in Algorithm::ALL {
                let (r, w, b) = limits[0];
                let mut s = LimiterState::new(algorithm, &Limit::new(r, w, b), steps[0].0);
                for &(t, cost, li) in &steps {
                    let (r, w, b) = limits[li % limits.len()];
                    let limit = Limit::new(r, w, b);
                    let cost = if li == 3 { cost % 4 } else { cost };
                    let peeked = s.peek(&limit, t, cost);
                    let d = s.check(&limit, t, cost);
                    proptest::prop_assert_eq!(peeked, d);
                    proptest::prop_assert_eq!(d.allowed, d.retry_after_ms == 0);
                    if t % 7 == 0 {
                        s.reset(t);
                    }
                }
            }
        }
    }

    #[test]
    fn rescale_rounds_as_asked() {
        assert_eq!(rescale(7, 2, 4, false), 14);
        assert_eq!(rescale(7, 4, 2, false), 3);
        assert_eq!(rescale(7, 4, 2, true), 4);
        assert_eq!(rescale(u128::MAX, 1, 3, false), u128::MAX);
        assert_eq!(rescale(u128::MAX, 3, 3, true), u128::MAX);
    }
}
