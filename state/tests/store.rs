//! The RocksDB store against a real database on disk.

use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::event::RequestEvent;
use tally_pipelines::ingest::{DeadLetter, FlushContent, StatsDelta};
use tally_pipelines::time::{Granularity, DAY_MS, HOUR_MS, MINUTE_MS};
use tally_state::{Checkpoint, Error, Retention, Store, StoreOptions};

fn event(client: &str, status: u16, latency: f64, ts: i64) -> RequestEvent {
    RequestEvent {
        event_id: None,
        client_id: client.into(),
        api_key_id: None,
        endpoint: "/v1/x".into(),
        method: None,
        status,
        request_bytes: 10,
        response_bytes: 90,
        latency_ms: latency,
        compute_units: None,
        timestamp_ms: ts,
        metadata: None,
        source: None,
    }
}

fn delta(client: &str, minute: i64, events: &[RequestEvent]) -> StatsDelta {
    let mut stats = BucketStats::default();
    for e in events {
        stats.record(e, 1);
    }
    StatsDelta {
        client_id: client.into(),
        minute_start_ms: minute,
        stats,
    }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap()
}

#[test]
fn commits_merge_into_the_stored_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut cp = Checkpoint::default();
    let t = 10 * DAY_MS;
    for status in [200, 500] {
        let content = FlushContent {
            stats: vec![delta("c", t, &[event("c", status, 5.0, t)])],
            event_clock_ms: Some(t),
            ..Default::default()
        };
        store.commit(3, &content, &mut cp, false).unwrap();
    }
    let buckets = store
        .read_buckets(3, "c", Granularity::Minute, t, t + MINUTE_MS)
        .unwrap();
    assert_eq!(buckets.len(), 1);
    let totals = buckets[0].1.totals();
    assert_eq!(
        (totals.requests, totals.server_errors, totals.bytes),
        (2, 1, 200)
    );
    // Other partitions and clients see nothing.
    assert!(store
        .read_buckets(4, "c", Granularity::Minute, 0, i64::MAX / 2)
        .unwrap()
        .is_empty());
    assert!(store
        .read_buckets(3, "cc", Granularity::Minute, 0, i64::MAX / 2)
        .unwrap()
        .is_empty());
}

#[test]
fn checkpoint_dedupe_and_dead_letters_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let t = 100 * DAY_MS;
    {
        let store = open(dir.path());
        let mut cp = Checkpoint::default();
        cp.positions.insert("file:/x".into(), 41);
        let content = FlushContent {
            dedupe_claims: vec![(11, t), (12, t - 2 * HOUR_MS)],
            dedupe_cutoff_ms: Some(t - HOUR_MS),
            dead_letters: vec![DeadLetter {
                reason: "late: test".into(),
                event_json: "{}".into(),
                event_ms: t - HOUR_MS,
            }],
            event_clock_ms: Some(t),
            ..Default::default()
        };
        store.commit(0, &content, &mut cp, true).unwrap();
        assert_eq!(cp.dead_letter_seq, 1);
    }
    let store = open(dir.path());
    let cp = store.load_checkpoint(0).unwrap();
    assert_eq!(cp.event_clock_ms, Some(t));
    assert_eq!(cp.positions.get("file:/x"), Some(&41));
    // Claims before the cutoff are not restored; other partitions have none.
    assert_eq!(
        store.load_dedupe_claims(0, Some(t - HOUR_MS)).unwrap(),
        vec![(11, t)]
    );
    assert_eq!(store.load_dedupe_claims(0, None).unwrap().len(), 2);
    assert!(store.load_dedupe_claims(1, None).unwrap().is_empty());
    let dl = store.dead_letters(0, None, 10).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, "late: test");
    assert_eq!(store.partition_clock(0), Some(t));
}

#[test]
fn expired_dedupe_segments_are_deleted_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut cp = Checkpoint::default();
    let t = 200 * DAY_MS;
    for (i, ts) in [t, t + HOUR_MS, t + 3 * HOUR_MS].into_iter().enumerate() {
        let content = FlushContent {
            dedupe_claims: vec![(i as u128, ts)],
            dedupe_cutoff_ms: Some(ts - HOUR_MS),
            event_clock_ms: Some(ts),
            ..Default::default()
        };
        store.commit(5, &content, &mut cp, false).unwrap();
    }
    // The last commit's cutoff (t + 2h) deleted the segments of t and t + 1h.
    assert_eq!(
        store.load_dedupe_claims(5, None).unwrap(),
        vec![(2, t + 3 * HOUR_MS)]
    );
    assert_eq!(cp.dedupe_seq, 3);
}

#[test]
fn reopening_with_another_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let err = Store::open(
        dir.path(),
        StoreOptions {
            partitions: 6,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(
        err,
        Error::PartitionMismatch {
            stored: 12,
            configured: 6
        }
    ));
}

#[test]
fn reopening_with_another_partitioner_is_refused_and_the_same_one_opens() {
    use tally_pipelines::partitioner::Partitioner;
    let dir = tempfile::tempdir().unwrap();
    let with = |partitioner| {
        Store::open(
            dir.path(),
            StoreOptions {
                partitioner,
                ..Default::default()
            },
        )
    };
    drop(with(Partitioner::Crc32).unwrap());
    let err = with(Partitioner::Murmur2).err().unwrap();
    assert!(
        matches!(
            err,
            Error::PartitionerMismatch {
                stored: Partitioner::Crc32,
                configured: Partitioner::Murmur2
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--partitioner crc32"), "{err}");
    let store = with(Partitioner::Crc32).unwrap();
    assert_eq!(store.partition_of("123456789"), 2, "crc32 mod 12");
}

#[test]
fn a_data_directory_keeps_its_instance_id_and_another_directory_has_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let open = |path: &std::path::Path| Store::open(path, StoreOptions::default()).unwrap();
    let store = open(dir.path());
    let id = store.instance_id().unwrap();
    assert_eq!(id.len(), 16, "{id}");
    assert_eq!(store.instance_id().unwrap(), id, "asked twice");
    drop(store);
    assert_eq!(
        open(dir.path()).instance_id().unwrap(),
        id,
        "after reopening"
    );
    assert_ne!(open(other.path()).instance_id().unwrap(), id);
}

#[test]
fn expired_minute_buckets_are_excluded_before_and_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            retention: Retention {
                minute_ms: 2 * HOUR_MS,
                ..Retention::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let mut cp = Checkpoint::default();
    let old = 50 * DAY_MS;
    let content = FlushContent {
        stats: vec![delta("c", old, &[event("c", 200, 1.0, old)])],
        event_clock_ms: Some(old),
        ..Default::default()
    };
    store.commit(0, &content, &mut cp, false).unwrap();
    assert_eq!(
        store
            .read_buckets(0, "c", Granularity::Minute, 0, i64::MAX / 2)
            .unwrap()
            .len(),
        1
    );
    // Three hours of event time later the minute bucket is past retention;
    // the hour bucket (90 days) is not.
    let later = old + 3 * HOUR_MS;
    let content = FlushContent {
        stats: vec![delta("c", later, &[event("c", 200, 1.0, later)])],
        event_clock_ms: Some(later),
        ..Default::default()
    };
    store.commit(0, &content, &mut cp, false).unwrap();
    let minutes = store
        .read_buckets(0, "c", Granularity::Minute, 0, i64::MAX / 2)
        .unwrap();
    assert_eq!(
        minutes.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        vec![later]
    );
    let hours = store
        .read_buckets(0, "c", Granularity::Hour, 0, i64::MAX / 2)
        .unwrap();
    assert_eq!(
        hours.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        vec![old, later]
    );
    let days = store
        .read_buckets(0, "c", Granularity::Day, 0, i64::MAX / 2)
        .unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].1.totals().requests, 2);
    store.compact().unwrap();
    let minutes = store
        .read_buckets(0, "c", Granularity::Minute, 0, i64::MAX / 2)
        .unwrap();
    assert_eq!(minutes.len(), 1);
}

/// A changelog round sees exactly the keys committed since the last round;
/// publishing them (before, after) and restoring on another store yields
/// the same state, leaving that store's other partitions alone.
#[test]
fn a_published_round_rebuilds_the_partition_elsewhere() {
    use tally_state::changelog::{StateStore, STATE_STORES};
    use tally_state::restore::Restore;

    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (open(src_dir.path()), open(dst_dir.path()));
    src.track_changes();
    dst.track_changes();
    let t = 10 * DAY_MS;
    let mut cp = Checkpoint::default();
    let commit = |store: &Store, cp: &mut Checkpoint, p: u16, client: &str, ts: i64, pos: u64| {
        cp.positions.insert("kafka:t".into(), pos);
        let content = FlushContent {
            stats: vec![delta(client, ts, &[event(client, 200, 5.0, ts)])],
            dedupe_claims: vec![(u128::from(pos), ts)],
            event_clock_ms: Some(ts),
            ..Default::default()
        };
        store.commit(p, &content, cp, false).unwrap();
    };
    // The destination holds stale state of partition 2 and live state of 5.
    let mut other = Checkpoint::default();
    commit(&dst, &mut other, 2, "stale", t, 1);
    commit(&dst, &mut other, 5, "keep", t, 1);

    let mut log: Vec<(StateStore, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut prev = src.snapshot();
    let mut swept = tally_state::round::Swept::default();
    let mut round = 1;
    for batch in [
        [("a", t, 10), ("b", t + MINUTE_MS, 11)],
        [("a", t + HOUR_MS, 12), ("a", t, 13)],
    ] {
        for (client, ts, pos) in batch {
            commit(&src, &mut cp, 2, client, ts, pos);
        }
        let prepared = src
            .prepare_round(2, &prev, round, "kafka:t", swept, &[])
            .unwrap();
        // Round 1: (a, b) x (minute, hour, day) buckets, different clients
        // share nothing = 6, plus (a, b) x (hour, day, week, month) period
        // totals = 8: 14 stats keys + 2 dedupe segments. Round 2: a's
        // minute and hour at t + 1 h, its minute and hour at t, its one
        // day = 5, plus its totals of two hours, the day, week and month
        // = 5: 10 stats keys + 2 segments. Nothing has expired.
        let changes = &prepared.changes;
        let stats = changes
            .iter()
            .filter(|(s, _, _)| *s == StateStore::Stats)
            .count();
        assert_eq!(stats, if round == 1 { 14 } else { 10 }, "round {round}");
        assert_eq!(changes.len() - stats, 2, "round {round}");
        assert!(prepared.tombstones.is_empty());
        for (store, key, value) in changes {
            log.push((*store, key.clone(), Some(value.clone())));
        }
        log.push((
            StateStore::Stats,
            tally_state::keys::changelog_marker_key(2),
            Some(prepared.marker.clone()),
        ));
        src.round_delivered(2, &prepared);
        swept.stats = prepared.swept_at.or(swept.stats);
        prev = prepared.snapshot;
        round += 1;
    }
    let empty = src
        .prepare_round(2, &prev, round, "kafka:t", swept, &[])
        .unwrap();
    assert!(empty.is_empty(), "a round drains the changed keys");

    let mut restore = Restore::replacing(&dst, 2, usize::MAX);
    for (store, key, value) in &log {
        restore.apply(*store, key, value.as_deref()).unwrap();
    }
    let restored = restore.finish([0; STATE_STORES]).unwrap();
    assert_eq!(restored.round, Some(2));

    for g in Granularity::ALL {
        for client in ["a", "b", "stale"] {
            assert_eq!(
                dst.read_buckets(2, client, g, 0, i64::MAX / 2).unwrap(),
                src.read_buckets(2, client, g, 0, i64::MAX / 2).unwrap(),
                "{client} {g:?}"
            );
        }
    }
    let a_day = dst
        .read_buckets(2, "a", Granularity::Day, 0, i64::MAX / 2)
        .unwrap();
    assert_eq!(a_day[0].1.totals().requests, 3);
    assert_eq!(
        dst.load_checkpoint(2).unwrap().positions.get("kafka:t"),
        Some(&13)
    );
    let mut claims: Vec<u128> = dst
        .load_dedupe_claims(2, None)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    claims.sort_unstable();
    assert_eq!(claims, vec![10, 11, 12, 13]);
    assert_eq!(
        dst.read_buckets(5, "keep", Granularity::Day, 0, i64::MAX / 2)
            .unwrap()
            .len(),
        1
    );
    // The restore itself is no change to republish.
    assert!(dst.begin_round(2).1.is_empty());
}

/// The alert log forgets entries logged before its retention (wall clock)
/// at compaction, and never hands out a sequence number twice, even once
/// retention has emptied it.
#[test]
fn alert_log_retention_and_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let now = tally_state::retention::wall_clock_ms();
    {
        let store = Store::open(
            dir.path(),
            StoreOptions {
                retention: Retention {
                    alerts_ms: DAY_MS,
                    ..Retention::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(store.next_alert_sequence().unwrap(), 1);
        store.append_alert(1, now - 2 * DAY_MS, "old-1").unwrap();
        store.append_alert(2, now - 2 * DAY_MS, "old-2").unwrap();
        store.append_alert(3, now, "new-3").unwrap();
        assert_eq!(store.alerts_after(0, 10).unwrap().len(), 3);
        assert_eq!(
            store.alerts_after(1, 10).unwrap()[0],
            (2, "old-2".to_string())
        );
        store.compact().unwrap();
        assert_eq!(
            store.alerts_after(0, 10).unwrap(),
            vec![(3, "new-3".to_string())]
        );
        assert_eq!(store.next_alert_sequence().unwrap(), 4);
    }
    // Retention of everything, then a restart: numbering goes on.
    let store = Store::open(
        dir.path(),
        StoreOptions {
            retention: Retention {
                alerts_ms: 0,
                ..Retention::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    store.compact().unwrap();
    assert!(store.alerts_after(0, 10).unwrap().is_empty());
    assert_eq!(store.next_alert_sequence().unwrap(), 4);
}

/// A judged minute's mark is deleted by the next flush: the round after
/// publishes it as removed and tombstones it, so compaction drops it.
#[test]
fn a_judged_minute_mark_becomes_a_tombstone() {
    use tally_state::changelog::StateStore;
    use tally_state::limits::LimitWrites;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.track_changes();
    let mut cp = Checkpoint::default();
    let t = 10 * DAY_MS;
    let mark = tally_state::keys::open_minute_key(2, t, "a");
    let mut at_marker = store.snapshot();
    for (round, writes) in [
        LimitWrites {
            open_minutes: vec![(t, "a".into())],
            ..LimitWrites::default()
        },
        LimitWrites {
            closed_minutes: vec![(t, "a".into())],
            ..LimitWrites::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        store
            .commit_with(2, &FlushContent::default(), &writes, &mut cp, false)
            .unwrap();
        let prepared = store
            .prepare_round(
                2,
                &at_marker,
                round as u64 + 1,
                "kafka:t",
                Default::default(),
                &[],
            )
            .unwrap();
        let published: Vec<&Vec<u8>> = prepared.changes.iter().map(|(_, k, _)| k).collect();
        assert_eq!(published, vec![&mark], "round {round}");
        let buried = prepared
            .tombstones
            .contains(&(StateStore::Limits, mark.clone()));
        assert_eq!(buried, round == 1, "round {round}");
        at_marker = prepared.snapshot;
    }
}
