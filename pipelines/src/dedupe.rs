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
//! Memory is bounded by one budget shared by every partition's index
//! ([`DedupeBudget`]): a partition whose claim takes the total past it
//! evicts its own oldest claims early (its effective window shrinks,
//! counted in `evicted`), instead of the instance growing without bound
//! under a traffic spike. A quiet partition never pays for a busy one.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::time::Granularity;

pub type Fingerprint = u128;

/// The identity of an event for de-duplication: its `event_id` within its
/// client and, for CloudEvents, within its `source` (CloudEvents ids are
/// unique per source only). Two clients that both send `"e1"` are two
/// events. Each part is hashed on its own into the seed of the next (three
/// one-shot hashes, cheaper than a streaming one for short strings), so no
/// two different triples collide but by chance.
pub fn event_fingerprint(client_id: &str, source: Option<&str>, event_id: &str) -> Fingerprint {
    use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64, xxh3_64_with_seed};
    let seed = xxh3_64(client_id.as_bytes());
    let seed = match source {
        // Tells "no source" from an empty one (which validation refuses).
        None => seed ^ 0x9E37_79B9_7F4A_7C15,
        Some(s) => xxh3_64_with_seed(s.as_bytes(), seed),
    };
    xxh3_128_with_seed(event_id.as_bytes(), seed)
}

/// The `event_id` of an event sent without one in a body with an
/// `Idempotency-Key`: derived from the key, the event's position in the
/// body and its content, so the same body retried with the same key
/// carries the same ids (and is counted once), while another body sent
/// with the same key by mistake is not mistaken for it.
pub fn derived_event_id(key: &str, index: usize, event: &crate::event::RequestEvent) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    h.update(&(index as u64).to_le_bytes());
    h.update(event.to_wire_json().as_bytes());
    format!("idem-{:032x}", h.digest128())
}

/// The `point_id` of a telemetry point sent without one in a body with an
/// `Idempotency-Key`, as [`derived_event_id`] does for events.
pub fn derived_point_id(key: &str, index: usize, point: &crate::telemetry::Point) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    h.update(&(index as u64).to_le_bytes());
    h.update(&(point.series.len() as u64).to_le_bytes());
    h.update(point.series.as_bytes());
    h.update(&point.timestamp_ms.to_le_bytes());
    h.update(&point.value.to_bits().to_le_bytes());
    format!("idem-{:032x}", h.digest128())
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

/// Event ids every partition's index may hold together.
#[derive(Debug)]
pub struct DedupeBudget {
    max_ids: usize,
    held: AtomicUsize,
}

impl DedupeBudget {
    pub fn new(max_ids: usize) -> Arc<DedupeBudget> {
        Arc::new(DedupeBudget {
            max_ids: max_ids.max(1),
            held: AtomicUsize::new(0),
        })
    }

    /// Ids held over all indexes.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.held() > self.max_ids
    }
}

#[derive(Debug)]
pub struct DedupeIndex {
    /// fingerprint -> event time of the claim
    claims: FingerprintMap<i64>,
    /// minute of event time -> fingerprints claimed in it (for expiry)
    by_minute: BTreeMap<i64, Vec<Fingerprint>>,
    /// claims since the last flush
    new_claims: Vec<(Fingerprint, i64)>,
    budget: Arc<DedupeBudget>,
    evicted: u64,
}

impl Drop for DedupeIndex {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(self.claims.len(), Ordering::Relaxed);
    }
}

impl DedupeIndex {
    /// An index with a budget of its own (tools, tests).
    pub fn new(max_ids: usize) -> Self {
        Self::within(DedupeBudget::new(max_ids))
    }

    /// An index sharing `budget` with others.
    pub fn within(budget: Arc<DedupeBudget>) -> Self {
        Self {
            claims: FingerprintMap::default(),
            by_minute: BTreeMap::new(),
            new_claims: Vec::new(),
            budget,
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
        if self.budget.over() {
            self.enforce_cap();
        }
    }

    fn insert(&mut self, fp: Fingerprint, event_ms: i64) {
        let previous = self.claims.insert(fp, event_ms);
        if previous.is_none() {
            self.budget.held.fetch_add(1, Ordering::Relaxed);
        }
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
                    self.budget.held.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Evicts this index's oldest minutes while the shared budget is
    /// exceeded (the index that grows is the one that pays).
    fn enforce_cap(&mut self) {
        while self.budget.over() {
            let Some((_, fps)) = self.by_minute.pop_first() else {
                break;
            };
            for fp in fps {
                if self.claims.remove(&fp).is_some() {
                    self.evicted += 1;
                    self.budget.held.fetch_sub(1, Ordering::Relaxed);
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
        let a = event_fingerprint("c", None, "a");
        d.claim(a, 90_000);
        assert_eq!(d.claim_of(a), Some(90_000));
        assert_eq!(d.claim_of(event_fingerprint("c", None, "b")), None);
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
    fn one_budget_bounds_every_index_and_the_growing_one_pays() {
        let budget = DedupeBudget::new(4);
        let mut quiet = DedupeIndex::within(budget.clone());
        let mut busy = DedupeIndex::within(budget.clone());
        quiet.claim(1, 0);
        quiet.claim(2, 60_000);
        for (i, fp) in (10..16).enumerate() {
            busy.claim(fp, i as i64 * 60_000);
        }
        assert_eq!(budget.held(), 4);
        assert_eq!(quiet.len(), 2, "the quiet index keeps its ids");
        assert_eq!(busy.len(), 2);
        assert_eq!(busy.evicted(), 4);
        drop(busy);
        assert_eq!(budget.held(), 2, "a dropped index gives its share back");
        quiet.expire(120_000);
        assert_eq!(budget.held(), 0);
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
            .map(|i| event_fingerprint("c", None, &format!("evt-{i}")))
            .collect();
        assert_eq!(fps.len(), 100_000);
    }

    #[test]
    fn derived_ids_repeat_for_the_same_body_and_key_only() {
        let e = crate::event::decode_event(
            r#"{"client_id":"c","endpoint":"/x","status":200,"latency_ms":1,"timestamp":5}"#,
            &crate::event::ValidationContext::lenient(),
        )
        .unwrap();
        let id = derived_event_id("k1", 0, &e);
        assert_eq!(id, derived_event_id("k1", 0, &e));
        assert_ne!(id, derived_event_id("k2", 0, &e), "another key");
        assert_ne!(id, derived_event_id("k1", 1, &e), "another position");
        let mut other = e.clone();
        other.status = 500;
        assert_ne!(id, derived_event_id("k1", 0, &other), "another event");
    }

    #[test]
    fn the_same_id_of_two_clients_or_two_sources_is_two_identities() {
        let a = event_fingerprint("alice", None, "e1");
        assert_eq!(a, event_fingerprint("alice", None, "e1"));
        assert_ne!(a, event_fingerprint("bob", None, "e1"));
        assert_ne!(a, event_fingerprint("alice", Some("gw-1"), "e1"));
        assert_ne!(
            event_fingerprint("alice", Some("gw-1"), "e1"),
            event_fingerprint("alice", Some("gw-2"), "e1")
        );
        // Boundaries are unambiguous: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            event_fingerprint("ab", None, "c"),
            event_fingerprint("a", None, "bc")
        );
    }
}
