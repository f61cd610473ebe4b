//! Changelogs stay bounded by live keys: twelve simulated hours of traffic
//! with retention shortened to minutes, published round by round exactly
//! as the Kafka writer does (changes, marker, tombstones), then compacted
//! the way Kafka compacts a topic (the last record of each key; tombstones
//! gone once old enough). The compacted log must hold no more records than
//! the source's live keys plus one round, while the log of every key ever
//! written is many times larger; a restore of it on another store, in
//! memory or streamed, must answer exactly what the source answers.

use std::collections::BTreeMap;
use std::time::Instant;

use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::event::RequestEvent;
use tally_pipelines::ingest::{FlushContent, StatsDelta};
use tally_pipelines::time::{Granularity, Period, HOUR_MS, MINUTE_MS};
use tally_state::changelog::{StateStore, STATE_STORES};
use tally_state::engine::Scan;
use tally_state::keys::{self, CF_DEDUPE, CF_STATS};
use tally_state::restore::Restore;
use tally_state::{Checkpoint, Retention, Store, StoreOptions};

const P: u16 = 3;
const CLIENTS: usize = 30;
const HOURS: i64 = 12;
const ROUND_EVERY_MINUTES: i64 = 5;

fn retention() -> Retention {
    Retention {
        minute_ms: 20 * MINUTE_MS,
        hour_ms: 2 * HOUR_MS,
        day_ms: 4 * HOUR_MS,
        dedupe_window_ms: 10 * MINUTE_MS,
        ..Retention::default()
    }
}

fn open(dir: &std::path::Path) -> Store {
    let store = Store::open(
        dir,
        StoreOptions {
            retention: retention(),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    store.track_changes();
    store
}

fn event(client: &str, ts: i64) -> RequestEvent {
    RequestEvent {
        request_bytes: 10,
        response_bytes: 90,
        latency_ms: 3.0,
        ..RequestEvent::new(client, "/v1/x", 200, ts)
    }
}

type Record = (StateStore, Vec<u8>, Option<Vec<u8>>);

/// Kafka's compaction of one partition: the last record of each key, and
/// no tombstones (after `delete.retention.ms`).
fn compact(log: &[Record]) -> Vec<Record> {
    let mut last: BTreeMap<(StateStore, &[u8]), usize> = BTreeMap::new();
    for (i, (s, k, _)) in log.iter().enumerate() {
        last.insert((*s, k), i);
    }
    log.iter()
        .enumerate()
        .filter(|(i, (s, k, v))| last[&(*s, k.as_slice())] == *i && v.is_some())
        .map(|(_, r)| r.clone())
        .collect()
}

fn physical_keys(store: &Store) -> usize {
    let snapshot = store.snapshot();
    [CF_STATS, CF_DEDUPE]
        .into_iter()
        .map(|cf| {
            snapshot
                .scan(
                    cf,
                    Scan::range(keys::partition_start(P), keys::partition_end(P)),
                )
                .unwrap()
                .count()
        })
        .sum()
}

#[test]
fn a_compacted_changelog_holds_live_keys_plus_one_round_and_restores_exactly() {
    let (src_dir, full_dir, streamed_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let src = open(src_dir.path());
    let start = 100 * 24 * HOUR_MS;
    let mut checkpoint = Checkpoint::default();
    let mut log: Vec<Record> = Vec::new();
    let mut at_marker = src.snapshot();
    let mut swept = tally_state::round::Swept::default();
    let mut round = 1;
    let mut last_round_records = 0;
    let mut position = 0u64;
    let mut fingerprint = 0u128;
    for minute in 0..HOURS * 60 {
        let ts = start + minute * MINUTE_MS;
        // A third of the clients are active in any minute, in turn.
        let stats = (0..CLIENTS)
            .filter(|c| (*c as i64 + minute) % 3 == 0)
            .map(|c| {
                let client = format!("client-{c}");
                let mut stats = BucketStats::default();
                stats.record(&event(&client, ts), 1);
                StatsDelta {
                    client_id: client,
                    minute_start_ms: ts,
                    stats,
                }
            })
            .collect::<Vec<_>>();
        fingerprint += 1;
        position += stats.len() as u64;
        checkpoint.positions.insert("kafka:t".into(), position);
        let content = FlushContent {
            dedupe_claims: vec![(fingerprint, ts)],
            dedupe_cutoff_ms: Some(ts - retention().dedupe_window_ms),
            event_clock_ms: Some(ts),
            stats,
            ..FlushContent::default()
        };
        src.commit(P, &content, &mut checkpoint, false).unwrap();
        if (minute + 1) % ROUND_EVERY_MINUTES == 0 {
            let prepared = src
                .prepare_round(P, &at_marker, round, "kafka:t", swept, &[])
                .unwrap();
            let before = log.len();
            for (store, key, value) in &prepared.changes {
                log.push((*store, key.clone(), Some(value.clone())));
            }
            log.push((
                StateStore::Stats,
                keys::changelog_marker_key(P),
                Some(prepared.marker.clone()),
            ));
            for (store, key) in &prepared.tombstones {
                log.push((*store, key.clone(), None));
            }
            last_round_records = last_round_records.max(log.len() - before);
            src.round_delivered(P, &prepared);
            swept.stats = prepared.swept_at.or(swept.stats);
            at_marker = prepared.snapshot;
            round += 1;
            // RocksDB compacts when it likes; here, every hour.
            if (minute + 1) % 60 == 0 {
                src.compact().unwrap();
            }
        }
    }
    src.compact().unwrap();

    let compacted = compact(&log);
    let ever: std::collections::BTreeSet<(StateStore, &[u8])> =
        log.iter().map(|(s, k, _)| (*s, k.as_slice())).collect();
    let live = physical_keys(&src);
    println!(
        "log {} records, {} keys ever written, compacted {} records, {} live keys, largest round {} records",
        log.len(),
        ever.len(),
        compacted.len(),
        live,
        last_round_records
    );
    assert!(
        compacted.len() <= live + last_round_records + 1,
        "compacted {} > live {live} + one round {last_round_records} + 1",
        compacted.len()
    );
    // The bound means something: without tombstones the compacted log
    // would keep every key ever written.
    assert!(ever.len() > 4 * (live + last_round_records));

    let clients: Vec<String> = (0..CLIENTS).map(|c| format!("client-{c}")).collect();
    for (dir, budget) in [(&full_dir, usize::MAX), (&streamed_dir, 4096)] {
        let dst = open(dir.path());
        let started = Instant::now();
        let mut restore = Restore::replacing(&dst, P, budget);
        for (store, key, value) in &compacted {
            restore.apply(*store, key, value.as_deref()).unwrap();
        }
        let restored = restore.finish([0; STATE_STORES]).unwrap();
        println!(
            "restore of {} records (budget {budget} B, streamed: {}) took {:?}",
            restored.records,
            restored.spilled,
            started.elapsed()
        );
        assert_eq!(restored.spilled, budget != usize::MAX);
        assert_eq!(restored.round, Some(round - 1));
        for client in &clients {
            for g in Granularity::ALL {
                assert_eq!(
                    dst.read_buckets(P, client, g, 0, i64::MAX / 2).unwrap(),
                    src.read_buckets(P, client, g, 0, i64::MAX / 2).unwrap(),
                    "{client} {g:?} budget {budget}"
                );
            }
        }
        let end = start + HOURS * HOUR_MS - MINUTE_MS;
        for period in [Period::Hour, Period::Day, Period::Week, Period::Month] {
            for at in [end, end - HOUR_MS, start] {
                let (period_start, _) = period.bounds(at);
                let mut a = dst.period_totals(P, period, period_start).unwrap();
                let mut b = src.period_totals(P, period, period_start).unwrap();
                a.sort_by(|x, y| x.0.cmp(&y.0));
                b.sort_by(|x, y| x.0.cmp(&y.0));
                assert_eq!(a, b, "{period:?} at {at}");
            }
        }
        let claims = |s: &Store| {
            let mut c: Vec<u128> = s
                .load_dedupe_claims(P, Some(end - retention().dedupe_window_ms))
                .unwrap()
                .into_iter()
                .map(|c| c.0)
                .collect();
            c.sort_unstable();
            c
        };
        assert_eq!(claims(&dst), claims(&src));
        assert!(!claims(&dst).is_empty());
        assert_eq!(
            dst.load_checkpoint(P).unwrap(),
            src.load_checkpoint(P).unwrap()
        );
    }
}
