//! A partition's telemetry carried by its changelog: rounds publish the
//! buckets, point ids, checkpoint, registry and watches a flush changed,
//! expired buckets and deleted point-id segments as removals, and a
//! restore elsewhere rebuilds exactly the source's telemetry of that
//! partition, replacing what the destination held of it and nothing else.

use tally_pipelines::dedupe::DedupeIndex;
use tally_pipelines::ingest::{FlushContent, PartitionRules};
use tally_pipelines::telemetry::ingest::{PartitionTelemetry, TelemetryRules};
use tally_pipelines::telemetry::Point;
use tally_state::changelog::{StateStore, STATE_STORES};
use tally_state::commit::TelemetryWrite;
use tally_state::keys;
use tally_state::limits::LimitWrites;
use tally_state::restore::Restore;
use tally_state::round::Swept;
use tally_state::telemetry::TelemetryCheckpoint;
use tally_state::{Checkpoint, Store, StoreOptions};

const DAY: i64 = 86_400_000;
const P: u16 = 2;

/// A partition's telemetry as a shard keeps it between flushes.
struct Writer {
    ingest: PartitionTelemetry,
    rules: TelemetryRules,
    checkpoint: Checkpoint,
    telemetry: TelemetryCheckpoint,
}

impl Writer {
    fn new() -> Self {
        let rules = TelemetryRules::default();
        Writer {
            ingest: PartitionTelemetry::new(
                PartitionRules {
                    allowed_lateness_ms: 60_000,
                    dedupe_window_ms: 3_600_000,
                },
                rules.clone(),
                None,
                DedupeIndex::new(10_000),
                Vec::<String>::new(),
            ),
            rules,
            checkpoint: Checkpoint::default(),
            telemetry: TelemetryCheckpoint::default(),
        }
    }

    /// Applies and flushes `points` (series, ts, value, id) with a watch.
    fn flush(&mut self, store: &Store, p: u16, points: &[Flushed<'_>]) {
        for (series, ts, value, id) in points {
            let point = Point {
                series: (*series).into(),
                timestamp_ms: *ts,
                value: *value,
                point_id: id.map(str::to_string),
            };
            self.ingest.apply(&point, i64::MAX / 4);
        }
        let flush = self.ingest.take_flush();
        let detectors: Vec<(String, Vec<u8>)> = points
            .iter()
            .map(|(s, ts, _, _)| (s.to_string(), ts.to_be_bytes().to_vec()))
            .collect();
        store
            .commit_flush(
                p,
                &FlushContent::default(),
                &LimitWrites::default(),
                Some(TelemetryWrite {
                    flush: &flush,
                    rules: &self.rules,
                    detectors: &detectors,
                    checkpoint: &mut self.telemetry,
                }),
                &mut self.checkpoint,
                false,
            )
            .expect("commit");
    }
}

fn open(dir: &std::path::Path) -> Store {
    let store = Store::open(
        dir,
        StoreOptions {
            partitions: 8,
            ..Default::default()
        },
    )
    .expect("open");
    store.track_changes();
    store
}

/// Everything the store holds of `p`'s telemetry, for comparison.
/// A partition's telemetry: checkpoint, registry, watches, point-id claims
/// and a line per bucket.
#[derive(Debug, PartialEq)]
struct Held {
    checkpoint: TelemetryCheckpoint,
    series: Vec<String>,
    watches: Vec<(String, Vec<u8>)>,
    claims: Vec<(u128, i64)>,
    buckets: Vec<String>,
}

/// One flushed point: series, timestamp, value, id.
type Flushed<'a> = (&'a str, i64, f64, Option<&'a str>);

fn telemetry_of(store: &Store, p: u16) -> Held {
    let series = store.telemetry_series(p).expect("series");
    let mut buckets = Vec::new();
    for s in &series {
        for resolution in [10_000u32, 60_000, 3_600_000, 86_400_000] {
            for (start, b) in store
                .read_telemetry(p, s, resolution, 0, i64::MAX / 2)
                .expect("read")
            {
                buckets.push(format!(
                    "{s} {resolution} {start} {} {:?} {:?}",
                    b.moments.count(),
                    b.moments.min(),
                    b.moments.max()
                ));
            }
        }
    }
    Held {
        checkpoint: store.load_telemetry_checkpoint(p).expect("checkpoint"),
        series,
        watches: store.telemetry_detectors(p).expect("detectors"),
        claims: store.load_telemetry_dedupe_claims(p, None).expect("claims"),
        buckets,
    }
}

#[test]
fn a_partitions_telemetry_is_rebuilt_from_its_changelog_elsewhere() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (src, dst) = (open(src_dir.path()), open(dst_dir.path()));
    let t0 = 20_000 * DAY;
    // The destination holds stale telemetry of partition P and live
    // telemetry of partition 5.
    let mut stale = Writer::new();
    stale.flush(&dst, P, &[("stale", t0, 1.0, Some("x"))]);
    let mut live = Writer::new();
    live.flush(&dst, 5, &[("keep", t0, 2.0, Some("y"))]);
    let keep_before = telemetry_of(&dst, 5);

    let mut w = Writer::new();
    let mut log: Vec<(StateStore, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let mut at_marker = src.snapshot();
    let mut swept = Swept::default();
    let rounds: Vec<Vec<Flushed<'_>>> = vec![
        vec![
            ("cpu{host=a}", t0, 1.5, Some("p1")),
            ("cpu{host=a}", t0 + 11_000, -3.0, Some("p2")),
            ("mem", t0 + 5_000, 0.0, None),
        ],
        vec![("cpu{host=a}", t0 + 20_000, 4.0, Some("p3"))],
        // Three days on: the first 10 s buckets expire (kept 48 h), and
        // the point-id segments before the window are deleted.
        vec![("mem", t0 + 3 * DAY, 9.0, Some("p4"))],
    ];
    let mut expired_removed = 0;
    let mut segments_removed = 0;
    for (round, points) in rounds.iter().enumerate() {
        let round = round as u64 + 1;
        w.flush(&src, P, points);
        let prepared = src
            .prepare_round(P, &at_marker, round, "kafka:t", swept, &[])
            .expect("round");
        let telemetry_keys = prepared
            .changes
            .iter()
            .filter(|(s, _, _)| *s == StateStore::Telemetry)
            .count();
        // The checkpoint and each touched series' watch, plus the
        // registry entries of new series.
        let new_series = if round == 1 { 2 } else { 0 };
        let touched = points
            .iter()
            .map(|p| p.0)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert_eq!(telemetry_keys, 1 + touched + new_series, "round {round}");
        for (store, key) in &prepared.tombstones {
            if *store == StateStore::Stats && keys::is_telemetry_key(key) {
                expired_removed += 1;
            }
            if *store == StateStore::Dedupe {
                segments_removed += 1;
            }
        }
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
        src.round_delivered(P, &prepared);
        swept.stats = prepared.swept_at.or(swept.stats);
        swept.telemetry = prepared.telemetry_swept_at.or(swept.telemetry);
        at_marker = prepared.snapshot;
    }
    // cpu's three 10 s buckets and mem's first expired by the last
    // round's clock; the first two rounds' point-id segments are before
    // the window.
    assert_eq!(expired_removed, 4, "expired telemetry buckets tombstoned");
    assert_eq!(segments_removed, 2, "deleted point-id segments tombstoned");
    let again = src
        .prepare_round(P, &at_marker, 4, "kafka:t", swept, &[])
        .expect("round");
    assert!(again.is_empty(), "a round drains the changed keys");

    let mut restore = Restore::replacing(&dst, P, usize::MAX);
    for (store, key, value) in &log {
        restore.apply(*store, key, value.as_deref()).expect("apply");
    }
    restore.finish([0; STATE_STORES]).expect("finish");

    let (got, want) = (telemetry_of(&dst, P), telemetry_of(&src, P));
    assert_eq!(got, want);
    assert_eq!(
        got.series,
        ["cpu{host=a}", "mem"],
        "the stale series is gone"
    );
    assert_eq!(got.checkpoint.event_clock_ms, Some(t0 + 3 * DAY));
    assert_eq!(
        got.claims.len(),
        1,
        "only the last segment is inside the window"
    );
    assert_eq!(telemetry_of(&dst, 5), keep_before, "other partitions alone");
    // The restored telemetry clock governs retention there too.
    assert!(dst
        .read_telemetry(P, "cpu{host=a}", 10_000, 0, i64::MAX / 2)
        .expect("read")
        .is_empty());
}
