//! Shards and routing over a real RocksDB store.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::{Actor, Context, Handler};
use tally_actors::messages::{ApplyBatch, FlushNow, PartitionControl};
use tally_actors::router::{ShardEndpoint, ShardRouter};
use tally_actors::status::ShardStatus;
use tally_actors::{Engine, Error, ShardConfig, Source};
use tally_pipelines::event::RequestEvent;
use tally_pipelines::partitioner::partition_for;
use tally_pipelines::time::{Granularity, DAY_MS};
use tally_state::{Store, StoreOptions};

const T0: i64 = 400 * DAY_MS;

fn event(client: &str, id: u64) -> RequestEvent {
    RequestEvent {
        event_id: Some(format!("ev-{id}")),
        client_id: client.into(),
        api_key_id: None,
        endpoint: "/v1/x".into(),
        method: None,
        status: 200,
        request_bytes: 1,
        response_bytes: 2,
        latency_ms: 3.0,
        compute_units: None,
        timestamp_ms: T0 + id as i64,
        metadata: None,
        source: None,
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

/// Lets go of the store on the test thread once the shard threads have:
/// a RocksDB closed by a thread racing the process exit aborts in its
/// destructor ("pthread lock: Invalid argument"; seen once in CI).
async fn close(store: Arc<Store>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Arc::strong_count(&store) > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_ingest_is_readable_as_soon_as_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let engine = Engine::start(store.clone(), ShardConfig::default(), 2).unwrap();
    let events: Vec<RequestEvent> = (0..500)
        .map(|i| event(&format!("c{}", i % 37), i))
        .collect();
    let outcome = engine
        .router()
        .ingest_durable(events, Source::Http)
        .await
        .unwrap();
    assert_eq!(outcome.accepted, 500);
    let total: u64 = (0..37).map(|c| day_total(&store, &format!("c{c}"))).sum();
    assert_eq!(total, 500);
    engine.shutdown().await.unwrap();
    close(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_skips_source_positions_it_already_applied_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let source = Source::Replay {
        id: "file:/test".into(),
    };
    let send = |engine: &Engine, range: std::ops::Range<u64>| {
        let router = engine.router();
        let source = source.clone();
        async move {
            let events: Vec<RequestEvent> = range.clone().map(|i| event("one-client", i)).collect();
            let p = router.partition_of("one-client");
            let rx = router
                .send_positioned(p, source.clone(), events, range.collect(), None)
                .await
                .unwrap();
            router.flush_all(Some(source)).await.unwrap();
            rx.await.unwrap().unwrap()
        }
    };
    let engine = Engine::start(store.clone(), ShardConfig::default(), 1).unwrap();
    let first = send(&engine, 0..100).await;
    assert_eq!(first.accepted, 100);
    engine.shutdown().await.unwrap();

    // A restarted engine re-reads from line 50: 50 already applied.
    let engine = Engine::start(store.clone(), ShardConfig::default(), 1).unwrap();
    let second = send(&engine, 50..150).await;
    assert_eq!((second.already_applied, second.accepted), (50, 50));
    assert_eq!(day_total(&store, "one-client"), 150);
    engine.shutdown().await.unwrap();
    close(store).await;
}

/// A neighbour that takes batches and never answers, like a stuck shard.
struct StuckShard {
    held: Vec<ApplyBatch>,
}

impl Actor for StuckShard {
    type Context = Context<Self>;
}

impl Handler<ApplyBatch> for StuckShard {
    type Result = ();
    fn handle(&mut self, msg: ApplyBatch, _: &mut Context<Self>) {
        self.held.push(msg);
    }
}

impl Handler<FlushNow> for StuckShard {
    type Result = ();
    fn handle(&mut self, _: FlushNow, _: &mut Context<Self>) {}
}

impl Handler<PartitionControl> for StuckShard {
    type Result = Result<(), Error>;
    fn handle(&mut self, _: PartitionControl, _: &mut Context<Self>) -> Self::Result {
        Ok(())
    }
}

#[actix_rt::test]
async fn ingest_is_refused_whole_when_a_shard_mailbox_is_full() {
    let status = Arc::new(ShardStatus::default());
    let stuck = StuckShard { held: Vec::new() }.start();
    let router = ShardRouter::new(
        vec![ShardEndpoint {
            apply: stuck.clone().recipient(),
            flush: stuck.clone().recipient(),
            control: stuck.recipient(),
            limits: Arc::new(std::sync::Mutex::new(
                tally_actors::limits::ShardLimits::new(0, Default::default()),
            )),
            top: Arc::new(std::sync::Mutex::new(tally_actors::top::ShardTop::new(
                0, 100,
            ))),
            status: status.clone(),
            config_writes: Arc::default(),
        }],
        2,
        Default::default(),
    );
    // Two batches fill the mailbox (their acks never come).
    for i in 0..2 {
        let r = router.clone();
        actix_rt::spawn(async move {
            let _ = r.ingest_durable(vec![event("c", i)], Source::Http).await;
        });
    }
    while status.queued.load(Ordering::Relaxed) < 2 {
        actix_rt::task::yield_now().await;
    }
    let refused = router
        .ingest_durable(vec![event("c", 9)], Source::Http)
        .await;
    assert_eq!(refused, Err(Error::Overloaded { shard: 0 }));
    // The refusal reserved nothing.
    assert_eq!(status.queued.load(Ordering::Relaxed), 2);
}
