//! The engine's failure paths against RocksDB on disk behind fault
//! injection: flushes that fail, state that cannot be read, partial
//! ingests, and minutes judged once. Time is a manual clock; nothing here
//! sleeps to guess at flush timing (the shards' flush interval is short and
//! each step waits for an observable outcome).

use std::sync::Arc;
use std::time::Duration;

use tally_actors::anomaly::DetectSettings;
use tally_actors::{Engine, Error, ShardConfig, Source};
use tally_pipelines::detect::DetectorConfig;
use tally_pipelines::event::RequestEvent;
use tally_pipelines::partitioner::partition_for;
use tally_pipelines::time::{Granularity, DAY_MS, MINUTE_MS};
use tally_state::clock::ManualClock;
use tally_state::engine::faulty::Faults;
use tally_state::keys::{self, CF_META};
use tally_state::{Store, StoreOptions};

/// Monday 2026-03-02T00:00:00Z.
const T0: i64 = 1_772_409_600_000;

fn event(client: &str, ts: i64) -> RequestEvent {
    RequestEvent {
        event_id: None,
        client_id: client.into(),
        api_key_id: None,
        endpoint: "/v1/x".into(),
        method: None,
        status: 200,
        request_bytes: 1,
        response_bytes: 2,
        latency_ms: 3.0,
        compute_units: None,
        timestamp_ms: ts,
        metadata: None,
        source: None,
    }
}

/// Opens the store; a previous engine's shard threads may still be
/// letting go of it (RocksDB's lock), so wait for that.
fn store(
    dir: &std::path::Path,
    faults: Option<Arc<Faults>>,
    clock: Arc<ManualClock>,
) -> Arc<Store> {
    for _ in 0..500 {
        let opened = Store::open(
            dir,
            StoreOptions {
                partitions: 4,
                faults: faults.clone(),
                clock: clock.clone(),
                ..StoreOptions::default()
            },
        );
        match opened {
            Ok(s) => return Arc::new(s),
            Err(e) if e.to_string().contains("lock") => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the store stayed locked");
}

fn config(clock: Arc<ManualClock>) -> ShardConfig {
    ShardConfig {
        flush_interval: Duration::from_millis(20),
        clock,
        ..ShardConfig::default()
    }
}

fn day_total(store: &Store, client: &str) -> u64 {
    let p = partition_for(client, store.partitions());
    store
        .read_buckets(p, client, Granularity::Day, T0 - DAY_MS, T0 + DAY_MS)
        .unwrap()
        .iter()
        .map(|(_, b)| b.totals().requests)
        .sum()
}

/// Two client names on different partitions of 4.
fn clients_on_two_partitions() -> (String, String) {
    let a = "client-a".to_string();
    let pa = partition_for(&a, 4);
    let b = (0..)
        .map(|i| format!("client-{i}"))
        .find(|c| partition_for(c, 4) != pa)
        .unwrap();
    (a, b)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_applies_nothing_answers_the_waiter_and_the_shard_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let faults = Faults::new();
    let store = store(dir.path(), Some(faults.clone()), clock.clone());
    let engine = Engine::start(store.clone(), config(clock.clone()), 2).unwrap();
    let router = engine.router();
    let (a, _) = clients_on_two_partitions();
    let ok = router
        .ingest_durable(vec![event(&a, T0)], Source::Http)
        .await
        .unwrap();
    assert_eq!(ok.accepted, 1);
    faults.fail_write_in(1);
    let failed = router
        .ingest_durable(vec![event(&a, T0 + 1), event(&a, T0 + 2)], Source::Http)
        .await;
    assert!(
        matches!(
            failed,
            Err(Error::Storage(_)) | Err(Error::ShardRestarted { .. })
        ),
        "{failed:?}"
    );
    assert_eq!(
        day_total(&store, &a),
        1,
        "nothing of the failed batch is durable"
    );
    // The supervisor restarted the shard from its last flush; it takes
    // batches again and its restart is counted.
    let again = router
        .ingest_durable(vec![event(&a, T0 + 3)], Source::Http)
        .await
        .unwrap();
    assert_eq!(again.accepted, 1);
    assert_eq!(day_total(&store, &a), 2);
    let p = partition_for(&a, 4);
    let health = &router.health()[usize::from(p)];
    assert_eq!(health.restarts, 1);
    assert!(!health.tripped());
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_partition_ingest_reports_exactly_the_partitions_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let faults = Faults::new();
    let store = store(dir.path(), Some(faults.clone()), clock.clone());
    let engine = Engine::start(store.clone(), config(clock.clone()), 1).unwrap();
    let router = engine.router();
    let (a, b) = clients_on_two_partitions();
    // One shard thread: the two partitions flush one after the other, and
    // the first of the two writes fails.
    faults.fail_write_in(1);
    let ingested = router
        .ingest_durable_parts(vec![event(&a, T0), event(&b, T0)], Source::Http)
        .await
        .unwrap();
    assert_eq!(ingested.failed.len(), 1, "{:?}", ingested.failed);
    assert_eq!(ingested.outcome.accepted, 1);
    let failed_partition = ingested.failed[0].partition;
    assert_eq!(ingested.failed[0].positions.len(), 1);
    let (failed_client, applied_client) = if failed_partition == partition_for(&a, 4) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(day_total(&store, failed_client), 0);
    assert_eq!(day_total(&store, applied_client), 1);
    engine.shutdown().await.unwrap();
}

/// Reproduced on an earlier main: a checkpoint that could not be read was
/// replaced by a default one at the next flush, so sources replayed from
/// the start. Now the shard stops, says why, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_checkpoint_stops_the_shard_and_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (a, b) = clients_on_two_partitions();
    let pa = partition_for(&a, 4);
    {
        let store = store(dir.path(), None, clock.clone());
        let engine = Engine::start(store.clone(), config(clock.clone()), 2).unwrap();
        let source = Source::Replay {
            id: "file:x".into(),
        };
        let rx = engine
            .router()
            .send_positioned(pa, source.clone(), vec![event(&a, T0)], vec![41], None)
            .await
            .unwrap();
        engine.router().flush_all(Some(source)).await.unwrap();
        rx.await.unwrap().unwrap();
        engine.shutdown().await.unwrap();
    }
    let before = {
        let s = store(dir.path(), None, clock.clone());
        s.load_checkpoint(pa).unwrap()
    };
    assert_eq!(before.positions.get("file:x"), Some(&41));

    let faults = Faults::new();
    faults.fail_reads(CF_META, keys::checkpoint_key(pa));
    let store = store(dir.path(), Some(faults.clone()), clock.clone());
    let engine = Engine::start(store.clone(), config(clock.clone()), 2).unwrap();
    let router = engine.router();
    until("the shard to stop", || {
        router.health()[usize::from(pa)].tripped()
    })
    .await;
    let health = router.health()[usize::from(pa)].clone();
    let reason = health.reason().unwrap();
    assert!(reason.contains(&format!("partition {pa}")), "{reason}");
    assert!(reason.contains("injected read failure"), "{reason}");
    // Its batches are refused; other partitions work.
    let refused = router
        .ingest_durable(vec![event(&a, T0 + 5)], Source::Http)
        .await;
    assert!(
        matches!(refused, Err(Error::ShardFailed { .. })),
        "{refused:?}"
    );
    assert_eq!(
        router
            .ingest_durable(vec![event(&b, T0 + 5)], Source::Http)
            .await
            .unwrap()
            .accepted,
        1
    );
    engine.shutdown().await.ok();
    faults.heal();
    assert_eq!(
        store.load_checkpoint(pa).unwrap(),
        before,
        "the stored checkpoint is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stored_bucket_stops_the_shard_that_judges_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 10 * MINUTE_MS);
    let faults = Faults::new();
    let store = store(dir.path(), Some(faults.clone()), clock.clone());
    let mut cfg = config(clock.clone());
    cfg.detect = DetectSettings {
        idle_close: Duration::from_secs(60),
        ..DetectSettings::default()
    };
    let engine = Engine::start(store.clone(), cfg, 2).unwrap();
    let router = engine.router();
    let (a, _) = clients_on_two_partitions();
    let pa = partition_for(&a, 4);
    router
        .ingest_durable(vec![event(&a, T0 + 10 * MINUTE_MS)], Source::Http)
        .await
        .unwrap();
    faults.corrupt(
        tally_state::keys::CF_STATS,
        keys::stats_key(pa, Granularity::Minute, &a, T0 + 10 * MINUTE_MS),
    );
    // Quiet for longer than the idle close: the minute is judged, its
    // bucket read back, and found corrupt.
    clock.advance_ms(2 * MINUTE_MS);
    until("the shard to stop", || {
        router.health()[usize::from(pa)].tripped()
    })
    .await;
    let reason = router.health()[usize::from(pa)].reason().unwrap();
    assert!(reason.contains("cannot be decoded"), "{reason}");
    engine.shutdown().await.ok();
}

/// A minute closed by the idle timer that then receives on-time events is
/// judged (and learned from) once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_closed_by_the_idle_timer_is_judged_once() {
    let dir = tempfile::tempdir().unwrap();
    let start = T0 + 10 * MINUTE_MS;
    let clock = ManualClock::new(start + 5_000);
    let store = store(dir.path(), None, clock.clone());
    let mut cfg = config(clock.clone());
    cfg.detect = DetectSettings {
        config: DetectorConfig::default(),
        idle_close: Duration::from_secs(60),
        ..DetectSettings::default()
    };
    let engine = Engine::start(store.clone(), cfg, 2).unwrap();
    let router = engine.router();
    let (a, _) = clients_on_two_partitions();
    let pa = partition_for(&a, 4);
    let judged = |store: &Store| {
        store
            .detector(pa, &a)
            .unwrap()
            .map_or(0, |d| d.buckets_seen())
    };
    router
        .ingest_durable(vec![event(&a, start + 1_000)], Source::Http)
        .await
        .unwrap();
    clock.advance_ms(2 * MINUTE_MS);
    until("the idle close to judge the minute", || {
        // Judged minutes' detectors go with the next flush.
        judged(&store) == 1
    })
    .await;
    // The producer catches up: on time (the watermark is 5 min behind),
    // counted, but the minute is not judged again.
    router
        .ingest_durable(vec![event(&a, start + 2_000)], Source::Http)
        .await
        .unwrap();
    clock.advance_ms(2 * MINUTE_MS);
    // Another minute, so that something else is judged after it.
    router
        .ingest_durable(vec![event(&a, start + 3 * MINUTE_MS)], Source::Http)
        .await
        .unwrap();
    clock.advance_ms(2 * MINUTE_MS);
    until("the next minute to be judged", || judged(&store) >= 2).await;
    assert_eq!(judged(&store), 2, "the idle-closed minute was judged twice");
    assert_eq!(day_total(&store, &a), 3);
    engine.shutdown().await.unwrap();
}

/// A minute with more clients than a shard lists in memory is read back
/// from its marks in the store: every client is judged, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_with_more_clients_than_memory_lists_judges_every_client() {
    let dir = tempfile::tempdir().unwrap();
    let start = T0 + 10 * MINUTE_MS;
    let clock = ManualClock::new(start + 5_000);
    let store = store(dir.path(), None, clock.clone());
    let mut cfg = config(clock.clone());
    cfg.detect = DetectSettings {
        idle_close: Duration::from_secs(60),
        max_detectors: 2,
        ..DetectSettings::default()
    };
    let engine = Engine::start(store.clone(), cfg, 2).unwrap();
    let router = engine.router();
    let clients: Vec<String> = (0..24).map(|i| format!("small-{i}")).collect();
    // Two flushes, so the second sees the first one's clients (listed or
    // not) again.
    for round in 0..2 {
        router
            .ingest_durable(
                clients
                    .iter()
                    .map(|c| event(c, start + 1_000 + round))
                    .collect(),
                Source::Http,
            )
            .await
            .unwrap();
    }
    clock.advance_ms(2 * MINUTE_MS);
    let judged = |store: &Store, c: &str| {
        store
            .detector(partition_for(c, 4), c)
            .unwrap()
            .map_or(0, |d| d.buckets_seen())
    };
    until("every client's minute to be judged", || {
        clients.iter().all(|c| judged(&store, c) >= 1)
    })
    .await;
    for c in &clients {
        assert_eq!(judged(&store, c), 1, "{c} judged once");
        assert_eq!(day_total(&store, c), 2, "{c}");
    }
    engine.shutdown().await.unwrap();
}

/// After a failed flush nothing more is stored until the shard has
/// restarted: a write in between would store the lost batch's position
/// without its events (seen in `tests/kafka_shard_restart.rs`: the stored
/// offset jumped past ~1,500 events that were never counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_flush_the_stored_position_stays_at_the_last_flush() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let faults = Faults::new();
    let store = store(dir.path(), Some(faults.clone()), clock.clone());
    // Batches of 10 each fill a flush: the one queued behind the failing
    // batch flushes by itself before the shard has restarted.
    let engine = Engine::start(
        store.clone(),
        ShardConfig {
            flush_max_events: 10,
            ..config(clock.clone())
        },
        2,
    )
    .unwrap();
    let router = engine.router();
    let (a, _) = clients_on_two_partitions();
    let p = partition_for(&a, 4);
    let source = Source::Kafka {
        id: "kafka:t".into(),
    };
    let batch = |from: u64, to: u64| -> (Vec<RequestEvent>, Vec<u64>) {
        (
            (from..to).map(|i| event(&a, T0 + i as i64)).collect(),
            (from..to).collect(),
        )
    };
    let stored = |store: &Store| {
        store
            .load_checkpoint(p)
            .unwrap()
            .positions
            .get("kafka:t")
            .copied()
    };
    let (events, positions) = batch(0, 10);
    let rx = router
        .send_positioned(p, source.clone(), events, positions, None)
        .await
        .unwrap();
    rx.await.unwrap().unwrap();
    assert_eq!(stored(&store), Some(9));

    for round in 0..20u64 {
        faults.fail_write_in(1);
        // Always the events after the stored position: nothing was lost
        // for good, only not applied.
        let (events, positions) = batch(10, 20);
        let failing = router
            .send_positioned(p, source.clone(), events, positions, None)
            .await
            .unwrap();
        let (events, positions) = batch(20, 30);
        let behind = router
            .send_positioned(p, source.clone(), events, positions, None)
            .await
            .unwrap();
        assert!(
            failing.await.unwrap().is_err(),
            "round {round}: the failed flush was acknowledged"
        );
        assert!(
            behind.await.unwrap().is_err(),
            "round {round}: a batch after lost ones was applied"
        );
        faults.heal();
        // Whatever the shard flushed between the failure and its restart,
        // the stored position and the counted events still agree.
        until("the shard's restart", || {
            router.health()[usize::from(p)].restarts == round + 1
        })
        .await;
        let _ = router.flush_all(None).await;
        assert_eq!(
            stored(&store),
            Some(9),
            "round {round}: the position moved past lost events"
        );
        assert_eq!(day_total(&store, &a), 10, "round {round}");
        // The source reads again from the stored position (as the Kafka
        // source does): the shard takes its batches again.
        router
            .control(
                p,
                tally_actors::messages::PartitionControl::Resume {
                    from_epoch: 0,
                    epoch: 0,
                },
            )
            .await
            .unwrap();
    }
    engine.shutdown().await.unwrap();
}
