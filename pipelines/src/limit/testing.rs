//! Test helpers shared by the algorithms' tests: table runner, exact
//! retry check and proptest strategies.

use super::{Algorithm, Decision, Limit, LimiterState, RETRY_NEVER};
use proptest::prelude::*;

/// One row of a hand-worked table:
/// `(t_ms, cost, allowed, remaining, reset_ms, retry_after_ms)`.
pub type Row = (i64, u64, bool, u64, i64, i64);

/// Runs `rows` against a fresh state created at the first row's time,
/// checking that `peek` agrees with `check` on every row.
pub fn run_table(algorithm: Algorithm, limit: &Limit, rows: &[Row]) -> LimiterState {
    let mut state = LimiterState::new(algorithm, limit, rows.first().map_or(0, |r| r.0));
    for (i, &(t, cost, allowed, remaining, reset_ms, retry_after_ms)) in rows.iter().enumerate() {
        let peeked = state.peek(limit, t, cost);
        let got = state.check(limit, t, cost);
        assert_eq!(peeked, got, "row {i}: peek differs from check");
        let want = Decision {
            allowed,
            limit: got.limit,
            remaining,
            reset_ms,
            retry_after_ms,
        };
        assert_eq!(got, want, "row {i} (t = {t}, cost = {cost})");
    }
    state
}

/// A denial's `retry_after_ms` must be exact: one ms earlier is still
/// denied, at that time the same cost passes.
pub fn assert_retry_exact(state: &LimiterState, limit: &Limit, now: i64, cost: u64, d: &Decision) {
    if d.allowed || d.retry_after_ms == RETRY_NEVER {
        return;
    }
    let at = now + d.retry_after_ms;
    assert!(d.retry_after_ms >= 1, "{d:?}");
    assert!(
        !state.peek(limit, at - 1, cost).allowed,
        "passes before retry: {d:?}"
    );
    assert!(
        state.peek(limit, at, cost).allowed,
        "still denied at retry: {d:?}"
    );
}

/// Small limits and dense traffic, so both sides of every edge occur.
pub fn small_limit() -> impl Strategy<Value = Limit> {
    (1u64..=10, 1u64..=4, 0u64..=15).prop_map(|(r, w, b)| Limit::new(r, w, b))
}

/// `(time, cost)` events at non-decreasing times from an unaligned start.
pub fn events() -> impl Strategy<Value = Vec<(i64, u64)>> {
    (
        0i64..10_000_000,
        prop::collection::vec((0i64..3_000, 0u64..=6), 1..80),
    )
        .prop_map(|(start, steps)| {
            let mut t = start;
            steps
                .into_iter()
                .map(|(dt, c)| {
                    t += dt;
                    (t, c)
                })
                .collect()
        })
}
