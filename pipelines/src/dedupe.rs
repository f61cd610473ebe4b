//! The de-duplication index of one partition: which event ids were counted
//! within the dedupe window of event time.
//!
//! Ids are kept as 128-bit fingerprints (XXH3-128): a false "duplicate"
//! needs a fingerprint collision, about 2^-128 per pair, so one in 10^20
//! even across 10^9 ids in a window. The index lives in memory for
//! nanosecond lookups and is made durable as one segment per flush
//! ([`DedupeIndex::take_new_claims`]), written in the same batch as the
//! state it guards; a restart rebuilds it from the live segments.
//!
//! Memory is bounded: past `max_ids`, the oldest claims are evicted early
//! (the effective window shrinks, counted in `evicted`), instead of growing
//! without bound under a traffic spike.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::time::Granularity;

pub type Fingerprint = u128;

pub fn fingerprint(event_id: &str) -> Fingerprint {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

/// Fingerprints are already uniformly distributed; hashing them again
/// would only cost time.
#[derive(Default)]
pub struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type FingerprintMap<V> = HashMap<Fingerprint, V, BuildHasherDefault<FingerprintHasher>>;

#[derive(Debug)]
pub struct DedupeIndex {
    /// fingerprint -> event time of the claim
    claims: FingerprintMap<i64>,
    /// minute of event time -> fingerprints claimed in it (for expiry)
    by_minute: BTreeMap<i64, Vec<Fingerprint>>,
    /// claims since the last flush
    new_claims: Vec<(Fingerprint, i64)>,
    max_ids: usize,
    evicted: u64,
}

impl DedupeIndex {
    pub fn new(max_ids: usize) -> Self {
        Self {
            claims: FingerprintMap::default(),
            by_minute: BTreeMap::new(),
            new_claims: Vec::new(),
            max_ids: max_ids.max(1),
            evicted: 0,
        }
    }

    /// Rebuilds from durable claims (already filtered to the window).
    pub fn restore(&mut self, claims: impl IntoIterator<Item = (Fingerprint, i64)>) {
        for (fp, ts) in claims {
            self.insert(fp, ts);
        }
        self.new_claims.clear();
        self.enforce_cap();
    }

    /// The event time of the live claim on `fp`, if any.
    pub fn claim_of(&self, fp: Fingerprint) -> Option<i64> {
        self.claims.get(&fp).copied()
    }

    pub fn claim(&mut self, fp: Fingerprint, event_ms: i64) {
        self.insert(fp, event_ms);
        self.new_claims.push((fp, event_ms));
        if self.claims.len() > self.max_ids {
            self.enforce_cap();
        }
    }

    fn insert(&mut self, fp: Fingerprint, event_ms: i64) {
        let previous = self.claims.insert(fp, event_ms);
        // A re-claim (after expiry of the old one) is indexed under its new
        // minute; the stale entry is skipped at expiry time.
        if previous != Some(event_ms) {
            self.by_minute
                .entry(Granularity::Minute.bucket_start(event_ms))
                .or_default()
                .push(fp);
        }
    }

    /// Forgets claims with event time before `cutoff_ms`.
    pub fn expire(&mut self, cutoff_ms: i64) {
        while let Some(entry) = self.by_minute.first_entry() {
            if *entry.key() + Granularity::Minute.width_ms() > cutoff_ms {
                break;
            }
            for fp in entry.remove() {
                if self.claims.get(&fp).is_some_and(|&ts| ts < cutoff_ms) {
                    self.claims.remove(&fp);
                }
            }
        }
    }

    fn enforce_cap(&mut self) {
        while self.claims.len() > self.max_ids {
            let Some((_, fps)) = self.by_minute.pop_first() else {
                break;
            };
            for fp in fps {
                if self.claims.remove(&fp).is_some() {
                    self.evicted += 1;
                }
            }
        }
    }

    /// Claims made since the last call (what the next flush must persist).
    pub fn take_new_claims(&mut self) -> Vec<(Fingerprint, i64)> {
        std::mem::take(&mut self.new_claims)
    }

    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Claims dropped before their window ended because of `max_ids`.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_found_until_they_expire() {
        let mut d = DedupeIndex::new(100);
        let a = fingerprint("a");
        d.claim(a, 90_000);
        assert_eq!(d.claim_of(a), Some(90_000));
        assert_eq!(d.claim_of(fingerprint("b")), None);
        d.expire(60_000);
        assert_eq!(d.claim_of(a), Some(90_000));
        d.expire(120_001);
        assert_eq!(d.claim_of(a), None);
        assert!(d.is_empty());
    }

    #[test]
    fn new_claims_are_handed_out_once() {
        let mut d = DedupeIndex::new(100);
        d.claim(1, 5);
        d.claim(2, 6);
        assert_eq!(d.take_new_claims(), vec![(1, 5), (2, 6)]);
        assert!(d.take_new_claims().is_empty());
        d.restore([(3, 7)]);
        assert!(d.take_new_claims().is_empty());
        assert_eq!(d.claim_of(3), Some(7));
    }

    #[test]
    fn memory_cap_evicts_the_oldest_minutes_first() {
        let mut d = DedupeIndex::new(3);
        d.claim(1, 0);
        d.claim(2, 60_000);
        d.claim(3, 120_000);
        d.claim(4, 180_000);
        assert_eq!(d.len(), 3);
        assert_eq!(d.claim_of(1), None);
        assert_eq!(d.claim_of(4), Some(180_000));
        assert_eq!(d.evicted(), 1);
    }

    #[test]
    fn reclaim_after_expiry_is_kept_under_its_new_time() {
        let mut d = DedupeIndex::new(100);
        d.claim(7, 0);
        d.expire(60_000);
        d.claim(7, 3_600_000);
        d.expire(120_000);
        assert_eq!(d.claim_of(7), Some(3_600_000));
    }

    #[test]
    fn distinct_ids_have_distinct_fingerprints() {
        let fps: std::collections::HashSet<Fingerprint> = (0..100_000)
            .map(|i| fingerprint(&format!("evt-{i}")))
            .collect();
        assert_eq!(fps.len(), 100_000);
    }
}
