//! A shard whose flush fails mid-stream is restarted from its last flush;
//! the Kafka source then reads its partition again from the stored
//! position, instead of fetching and dropping every later batch until a
//! rebalance. The engine and source run in this process over RocksDB with
//! fault injection, against a real broker (tansu).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::kafka::{produce_all, records, Broker};
use support::*;
use tally_actors::kafka::source::{KafkaConfig, KafkaSource};
use tally_actors::{Engine, ShardConfig};
use tally_pipelines::event::ValidationContext;
use tally_pipelines::time::{Granularity, DAY_MS};
use tally_state::engine::faulty::Faults;
use tally_state::{Store, StoreOptions};

const TOPIC: &str = "tally.requests";
const PARTITIONS: u16 = 4;

fn stored_total(store: &Store, client: &str) -> u64 {
    let p = store.partition_of(client);
    store
        .read_buckets(
            p,
            client,
            Granularity::Day,
            START_MS - DAY_MS,
            START_MS + 2 * DAY_MS,
        )
        .map(|buckets| buckets.iter().map(|(_, b)| b.totals().requests).sum())
        .unwrap_or(0)
}

fn want_of(lines: &[Line], client: &str) -> u64 {
    lines
        .iter()
        .filter(|l| l.kind == Kind::Good && l.client == client)
        .count() as u64
}

/// A store on disk (behind `faults` if given) and an engine over it.
fn open_engine(dir: &std::path::Path, faults: Option<Arc<Faults>>) -> (Arc<Store>, Engine) {
    let store = Arc::new(
        Store::open(
            dir,
            StoreOptions {
                partitions: PARTITIONS,
                faults,
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    let engine = start_engine(&store);
    (store, engine)
}

/// An engine over `store` whose shards flush every 50 ms.
fn start_engine(store: &Arc<Store>) -> Engine {
    Engine::start(
        store.clone(),
        ShardConfig {
            flush_interval: Duration::from_millis(50),
            ..ShardConfig::default()
        },
        2,
    )
    .unwrap()
}

fn kafka_config(broker: &Broker, group: &str, dead_letter_topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: broker.bootstrap(),
        group: group.into(),
        topic: TOPIC.into(),
        telemetry_topic: format!("{TOPIC}.telemetry"),
        dead_letter_topic: dead_letter_topic.into(),
        batch_max: 500,
        batch_linger: Duration::from_millis(20),
        session_timeout: Duration::from_secs(10),
        changelog_interval: Duration::from_secs(1),
        restore_memory_bytes: 64 << 20,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_mid_stream_does_not_stall_its_partition() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let broker = Broker::start();
    broker.create_topic(TOPIC, u32::from(PARTITIONS));
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let lines = dataset(20_000, 40, 83);
    let (first, second) = lines.split_at(10_000);
    let clients: Vec<String> = clients_of(&lines).into_iter().collect();

    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let (store, engine) = open_engine(dir.path(), Some(faults.clone()));
    let config = kafka_config(&broker, "tally-shard-restart", &format!("{TOPIC}.dlq"));
    KafkaSource::ensure_topics(&config, PARTITIONS)
        .await
        .unwrap();
    let source = KafkaSource::start(
        config,
        engine.router(),
        store.clone(),
        "http://127.0.0.1:9".into(),
        ValidationContext::lenient,
    )
    .unwrap();

    produce_all(&broker.bootstrap(), TOPIC, &records(first)).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while clients.iter().map(|c| stored_total(&store, c)).sum::<u64>() == 0 {
        assert!(Instant::now() < deadline, "nothing consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next write fails: the flushing shard loses what it applied since
    // its last flush, and is restarted from that flush.
    faults.fail_write_in(1);
    produce_all(&broker.bootstrap(), TOPIC, &records(second)).await;

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let behind: Vec<(&String, u64, u64)> = clients
            .iter()
            .map(|c| (c, stored_total(&store, c), want_of(&lines, c)))
            .filter(|(_, got, want)| got != want)
            .collect();
        for (client, got, want) in &behind {
            assert!(
                got <= want,
                "{client}: counted {got} of {want}: double counting"
            );
        }
        if behind.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} clients never caught up after the failed flush, e.g. {:?}; shard restarts {:?}",
            behind.len(),
            behind.first(),
            engine
                .router()
                .health()
                .iter()
                .map(|h| h.restarts)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restarts: u64 = engine.router().health().iter().map(|h| h.restarts).sum();
    assert_eq!(
        restarts, 1,
        "exactly one shard restarted (the failed flush)"
    );
    source.stop().await;
    engine.shutdown().await.unwrap();
}
