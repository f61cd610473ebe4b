//! The restore rule, cut by cut, in memory and streamed.

use super::*;
use crate::keys::CF_LIMITS;
use crate::StoreOptions;
use std::collections::BTreeMap;

const P: u16 = 2;

fn key(name: &str) -> Vec<u8> {
    let mut k = P.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn change(round: u64, before: Option<&str>, after: Option<&str>) -> Vec<u8> {
    encode(&ChangelogValue::Change {
        round,
        source_offset: None,
        before: before.map(|s| s.as_bytes().to_vec()),
        after: after.map(|s| s.as_bytes().to_vec()),
    })
    .unwrap()
}

fn marker(round: u64, position: u64) -> Vec<u8> {
    let mut checkpoint = Checkpoint::default();
    checkpoint.positions.insert("kafka:t".into(), position);
    encode(&ChangelogValue::Marker { round, checkpoint }).unwrap()
}

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.track_changes();
    (dir, store)
}

/// The partition's `limits` keys as names and values.
fn state(store: &Store) -> BTreeMap<String, String> {
    let scan = crate::engine::Scan::range(keys::partition_start(P), keys::partition_end(P));
    store
        .engine
        .scan(CF_LIMITS, scan)
        .unwrap()
        .map(|item| {
            let (k, v) = item.unwrap();
            (
                String::from_utf8(k[2..].to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect()
}

type Log = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn restore(store: &Store, log: &[(Vec<u8>, Option<Vec<u8>>)], budget: usize) -> Restored {
    let mut r = Restore::replacing(store, P, budget);
    for (k, v) in log {
        // Markers live in the stats changelog, the rest in limits'.
        let s = if k == &keys::changelog_marker_key(P) {
            StateStore::Stats
        } else {
            StateStore::Limits
        };
        r.apply(s, k, v.as_deref()).unwrap();
    }
    r.finish([0; STATE_STORES]).unwrap()
}

fn expected(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A log of three writers: A completes rounds 1 and 2 and dies inside
/// round 3; B restores (state at round 2), republishes A's stray key
/// and its own change in round 3, commits it and tombstones the key
/// it deleted; C dies inside round 4. At every cut of the log, and
/// whether the restore fits in memory or streams (budget 0: it spills
/// after every record), the restored state must equal the state at the
/// last marker, computed by hand next to each step.
/// Per cut: where the log was cut, the state at its last marker, its round.
type Cuts = Vec<(usize, BTreeMap<String, String>, Option<u64>)>;

fn three_writers() -> (Log, Cuts) {
    let m = keys::changelog_marker_key(P);
    let some = |v: Vec<u8>| Some(v);
    let log: Log = vec![
        (key("a"), some(change(1, None, Some("a1")))),
        (key("b"), some(change(1, None, Some("b1")))),
        (key("d"), some(change(1, None, Some("d1")))),
        (m.clone(), some(marker(1, 10))), // {a1, b1, d1} @10
        (key("a"), some(change(2, Some("a1"), Some("a2")))),
        (m.clone(), some(marker(2, 20))), // {a2, b1, d1} @20
        (key("b"), some(change(3, Some("b1"), Some("b3-stray")))), // A dies
        // B restored {a2, b1, d1} @20, republishes the stray key b,
        // adds c and deletes d.
        (key("b"), some(change(3, Some("b1"), Some("b1")))),
        (key("c"), some(change(3, None, Some("c3")))),
        (key("d"), some(change(3, Some("d1"), None))),
        (m.clone(), some(marker(3, 30))), // {a2, b1, c3} @30
        (key("d"), None),                 // d's tombstone
        (key("a"), some(change(4, Some("a2"), Some("a4-stray")))), // C dies
    ];
    let at_1 = expected(&[("a", "a1"), ("b", "b1"), ("d", "d1")]);
    let at_2 = expected(&[("a", "a2"), ("b", "b1"), ("d", "d1")]);
    let at_3 = expected(&[("a", "a2"), ("b", "b1"), ("c", "c3")]);
    let cuts = vec![
        (3, BTreeMap::new(), None),
        (4, at_1, Some(10)),
        (6, at_2.clone(), Some(20)),
        (7, at_2.clone(), Some(20)),
        (10, at_2, Some(20)),
        (11, at_3.clone(), Some(30)),
        (12, at_3.clone(), Some(30)),
        (13, at_3, Some(30)),
    ];
    (log, cuts)
}

#[test]
fn a_restore_equals_the_state_at_the_last_marker_at_every_cut_in_memory_or_streamed() {
    let (log, cuts) = three_writers();
    for budget in [usize::MAX, 0] {
        for (cut, want, position) in &cuts {
            let (_dir, store) = open();
            // Stale local state of the partition, replaced by the restore.
            store.put_raw(CF_LIMITS, &key("stale"), b"x").unwrap();
            let restored = restore(&store, &log[..*cut], budget);
            assert_eq!(
                &state(&store),
                want,
                "cut after {cut} records, budget {budget}"
            );
            let checkpoint = store.load_checkpoint(P).unwrap();
            assert_eq!(
                checkpoint.positions.get("kafka:t").copied(),
                *position,
                "cut {cut}, budget {budget}"
            );
            assert_eq!(restored.spilled, budget == 0 && *cut > 0);
            assert_eq!(
                store.load_changelog_mark(P).unwrap(),
                Some(restored.mark.clone())
            );
        }
    }
}

#[test]
fn a_cut_short_round_is_republished_and_a_deletion_without_tombstone_is_handed_on() {
    let (log, _) = three_writers();
    for budget in [usize::MAX, 0] {
        // Cut inside B's round 3: b's stray record is uncommitted, and
        // the mark must not count the state as the changelog's.
        let (_dir, store) = open();
        let restored = restore(&store, &log[..8], budget);
        assert_eq!(restored.round, Some(2));
        assert_eq!(restored.next_round(), 3);
        assert_eq!(restored.uncommitted, 1);
        assert_eq!(restored.mark.ends, None);
        let (_, changed) = store.begin_round(P);
        assert_eq!(changed, vec![(StateStore::Limits, key("b"))]);
        // Cut after round 3's marker but before d's tombstone: d must
        // be tombstoned by the next owner.
        let (_dir, store) = open();
        let restored = restore(&store, &log[..11], budget);
        assert_eq!(restored.unburied, vec![(StateStore::Limits, key("d"))]);
        assert_eq!(restored.mark.ends, Some([0; STATE_STORES]));
        // After the tombstone nothing is left to bury.
        let (_dir, store) = open();
        assert!(restore(&store, &log[..12], budget).unburied.is_empty());
    }
}

#[test]
fn compaction_of_the_log_keeps_the_outcome() {
    // Compaction keeps the last record of each key and, once old
    // enough, drops tombstones and the records they end.
    let (log, _) = three_writers();
    let mut last: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for (i, (k, _)) in log.iter().enumerate() {
        last.insert(k.clone(), i);
    }
    let compacted: Log = log
        .iter()
        .enumerate()
        .filter(|(i, (k, v))| last[k] == *i && v.is_some())
        .map(|(_, r)| r.clone())
        .collect();
    assert!(compacted.len() < log.len());
    let (_d1, full) = open();
    let (_d2, small) = open();
    restore(&full, &log, usize::MAX);
    restore(&small, &compacted, 0);
    assert_eq!(state(&full), state(&small));
    assert_eq!(
        state(&full),
        expected(&[("a", "a2"), ("b", "b1"), ("c", "c3")])
    );
}

#[test]
fn a_continued_restore_reads_only_the_tail_and_equals_a_full_one() {
    let (log, _) = three_writers();
    // The instance published (or restored) up to round 2's marker and
    // kept that state; then B and C wrote on.
    let (_d1, local) = open();
    let first = restore(&local, &log[..6], usize::MAX);
    let mark = local.load_changelog_mark(P).unwrap().unwrap();
    assert_eq!(mark, first.mark);
    for budget in [usize::MAX, 0] {
        let (_d2, fresh) = open();
        restore(&fresh, &log, usize::MAX);
        let (_d3, cont) = open();
        restore(&cont, &log[..6], usize::MAX);
        let mut r = Restore::continuing(&cont, P, &mark, budget);
        for (k, v) in &log[6..] {
            let s = if k == &keys::changelog_marker_key(P) {
                StateStore::Stats
            } else {
                StateStore::Limits
            };
            r.apply(s, k, v.as_deref()).unwrap();
        }
        let restored = r.finish([0; STATE_STORES]).unwrap();
        assert_eq!(restored.records, 7);
        assert_eq!(state(&cont), state(&fresh), "budget {budget}");
        assert_eq!(restored.round, Some(3));
        assert_eq!(
            cont.load_checkpoint(P).unwrap(),
            fresh.load_checkpoint(P).unwrap()
        );
    }
}

#[test]
fn without_a_marker_the_state_is_empty_and_garbage_is_counted() {
    let (_dir, store) = open();
    let mut r = Restore::replacing(&store, P, usize::MAX);
    r.apply(
        StateStore::Limits,
        &key("x"),
        Some(&change(1, None, Some("x1"))),
    )
    .unwrap();
    r.apply(StateStore::Limits, &key("y"), Some(b"\x01garbage"))
        .unwrap();
    let restored = r.finish([0; STATE_STORES]).unwrap();
    assert!(state(&store).is_empty());
    assert_eq!(restored.round, None);
    assert_eq!(restored.next_round(), 1);
    assert_eq!(restored.undecodable, 1);
    assert_eq!(restored.uncommitted, 1);
}

#[test]
fn a_streamed_restore_holds_one_round_in_memory() {
    // 50 rounds of 100 keys each, budget of about 20 keys: every
    // committed round is written out, so what is held never grows
    // past the open round.
    let (_dir, store) = open();
    let mut r = Restore::replacing(&store, P, 2_000);
    let mut peak = 0;
    for round in 1..=50u64 {
        for i in 0..100 {
            let v = format!("v{round}");
            r.apply(
                StateStore::Limits,
                &key(&format!("k{i:03}-{round}")),
                Some(&change(round, None, Some(&v))),
            )
            .unwrap();
            peak = peak.max(r.pending.len());
        }
        r.apply(
            StateStore::Stats,
            &keys::changelog_marker_key(P),
            Some(&marker(round, round)),
        )
        .unwrap();
    }
    let restored = r.finish([0; STATE_STORES]).unwrap();
    assert!(restored.spilled);
    assert!(peak <= 200, "held {peak} keys");
    assert_eq!(state(&store).len(), 5_000);
}
