//! Quota reservations: how a hard quota stays hard under concurrent
//! checks.
//!
//! A check that admits a request reserves its cost at once, so N
//! concurrent checks with R requests remaining admit exactly R. The
//! reservation stands in for the request's event until that event is
//! ingested: each request the client's flushed usage gains in the period
//! settles the oldest outstanding reservation, so used + reserved counts
//! each request once. A reservation whose event never arrives (the gateway
//! dropped the request, or does not report it) expires after a time to
//! live, and reservations never outlive their billing period.
//!
//! Reservations are kept per minute of the check (a client checking at
//! thousands per second holds a handful of entries, not thousands).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::time::Granularity;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaReservations {
    /// (minute of the checks, requests reserved in it and not settled),
    /// oldest first.
    pending: VecDeque<(i64, u64)>,
}

impl QuotaReservations {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Reserves `cost` requests for a check at `now_ms`.
    pub fn reserve(&mut self, now_ms: i64, cost: u64) {
        if cost == 0 {
            return;
        }
        let minute = Granularity::Minute.bucket_start(now_ms);
        match self.pending.back_mut() {
            Some((m, n)) if *m == minute => *n = n.saturating_add(cost),
            _ => self.pending.push_back((minute, cost)),
        }
    }

    /// `requests` of the client were ingested: they settle the oldest
    /// reservations (requests beyond them were never checked).
    pub fn settle(&mut self, mut requests: u64) {
        while requests > 0 {
            let Some((_, n)) = self.pending.front_mut() else {
                return;
            };
            let taken = (*n).min(requests);
            *n -= taken;
            requests -= taken;
            if *n == 0 {
                self.pending.pop_front();
            }
        }
    }

    /// Drops reservations made before `since_ms` (expired, or of an
    /// earlier period); whether anything was dropped.
    pub fn drop_before(&mut self, since_ms: i64) -> bool {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|(m, _)| *m < since_ms) {
            self.pending.pop_front();
        }
        self.pending.len() != before
    }

    /// Requests reserved at or after `from_ms`.
    pub fn outstanding_since(&self, from_ms: i64) -> u64 {
        self.pending
            .iter()
            .filter(|(m, _)| *m >= from_ms)
            .fold(0u64, |acc, (_, n)| acc.saturating_add(*n))
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding_since(i64::MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60_000;

    #[test]
    fn reservations_settle_oldest_first_and_expire() {
        let mut r = QuotaReservations::default();
        r.reserve(10 * M, 3);
        r.reserve(10 * M + 59_999, 2);
        r.reserve(11 * M, 4);
        assert_eq!(r.outstanding(), 9);
        assert_eq!(r.pending.len(), 2, "one entry per minute");
        r.settle(4);
        assert_eq!(r.outstanding(), 5);
        assert_eq!(r.outstanding_since(11 * M), 4);
        r.settle(1);
        assert_eq!(r.outstanding(), 4);
        assert!(r.drop_before(12 * M));
        assert!(r.is_empty());
        r.settle(10);
        assert_eq!(
            r.outstanding(),
            0,
            "settling without reservations is a no-op"
        );
    }

    /// Used + reserved counts each checked request once, however the
    /// events and flushes interleave with the checks: a reference loop
    /// over random interleavings.
    #[test]
    fn used_plus_reserved_counts_each_checked_request_once() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut r = QuotaReservations::default();
            let (mut checked, mut ingested, mut in_flight) = (0u64, 0u64, 0u64);
            for step in 0..200 {
                match next() % 3 {
                    0 => {
                        r.reserve(step * M / 10, 1);
                        checked += 1;
                        in_flight += 1;
                    }
                    1 if in_flight > 0 => {
                        // The gateway's events arrive, one flush at a time.
                        let n = 1 + next() % in_flight;
                        in_flight -= n;
                        ingested += n;
                        r.settle(n);
                    }
                    _ => {}
                }
                assert_eq!(ingested + r.outstanding(), checked);
            }
        }
    }
}
