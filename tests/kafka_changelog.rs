//! Changelogs against a real broker: five hours of event time with
//! retention shortened to minutes. Every key that leaves the store reaches
//! the changelog topics as a tombstone (a record with a null payload), so
//! compaction (computed here the way Kafka compacts: the last record of
//! each key, tombstones gone) leaves a small fraction of the keys ever
//! written. Then the partitions move to an instance with an empty data
//! directory and a 4 KiB restore budget: it streams every partition from
//! the changelogs into its store and answers exactly what the first one
//! answered. (The exact bound, live keys plus one round, is proven in
//! `state/tests/changelog_bounds.rs`; tansu does not compact topics.)

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use support::kafka::{produce_all, records, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const PARTITIONS: i32 = 12;

/// Every record of one changelog topic: `(partition, key, has payload)`.
fn read_changelog(bootstrap: &str, topic: &str) -> Vec<(i32, Vec<u8>, bool)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "changelog-inspector")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // To the partition end event: tansu 0.6 reports the high
        // watermark as the last batch's base offset + 1, so records follow
        // it (actors/src/kafka/log_end.rs).
        let mut next = low;
        loop {
            assert!(
                Instant::now() < deadline,
                "{topic}[{p}] stuck at {next} of {high}"
            );
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    next = m.offset() + 1;
                    if let Some(key) = m.key() {
                        out.push((p, key.to_vec(), m.payload().is_some()));
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) if next >= high => break,
                _ => {}
            }
        }
    }
    out
}

/// `GET /v1/clients/{client}/usage{rest}`.
async fn usage(c: &reqwest::Client, server: &Server, client: &str, rest: &str) -> (u16, Value) {
    let url = server.url(&format!("/v1/clients/{}/usage{rest}", encode_path(client)));
    let r = c.get(url).send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_bound_the_changelogs_and_a_streamed_restore_is_exact() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, PARTITIONS as u32);
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    // 72,000 lines at 4 per second of event time: five hours.
    let lines = dataset(72_000, 20, 29);
    let clients: Vec<String> = clients_of(&lines).into_iter().collect();
    let last_ts = lines.iter().map(|l| l.ts).max().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let retention = "[retention]\nminute = \"20m\"\nhour = \"2h\"\n";
    let (short, small_budget) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    std::fs::write(&short, retention).unwrap();
    std::fs::write(
        &small_budget,
        format!("{retention}[memory]\nrestore_bytes = 4096\n"),
    )
    .unwrap();
    let bootstrap = broker.bootstrap();
    let common = [
        "--kafka-brokers",
        &bootstrap,
        "--kafka-group",
        "tally-changelog",
        "--kafka-changelog-interval",
        "200ms",
        "--kafka-session-timeout",
        "10s",
    ];
    let c = client();
    let mut args = common.to_vec();
    args.extend(["--config", short.to_str().unwrap()]);
    let mut first = Server::start(&dir.path().join("a"), &args);
    produce_all(&bootstrap, TOPIC, &records(&lines)).await;

    // Exact on the first instance: the month total of every client.
    let want: HashMap<&str, u64> = clients
        .iter()
        .map(|client| {
            let n = lines
                .iter()
                .filter(|l| l.kind == Kind::Good && &l.client == client)
                .count() as u64;
            (client.as_str(), n)
        })
        .collect();
    let month = format!("?period=month&at={START_MS}");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut done = true;
        for client in &clients {
            let (code, body) = usage(&c, &first, client, &month).await;
            done &= code == 200 && body["total_requests"].as_u64() == Some(want[client.as_str()]);
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not exact on the first instance; {}",
            first.report()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Minutes of the last quarter hour and hours of the whole run: the
    // retained ones must move with the partitions, the expired ones not
    // come back.
    let histories = [
        format!(
            "/history?from={}&to={}&granularity=minute",
            last_ts - 15 * 60_000,
            last_ts + 60_000
        ),
        format!(
            "/history?from={START_MS}&to={}&granularity=hour",
            last_ts + 60_000
        ),
    ];
    let mut answers = HashMap::new();
    for client in &clients {
        for (i, history) in histories.iter().enumerate() {
            let (code, body) = usage(&c, &first, client, history).await;
            assert_eq!(code, 200, "{body}");
            let points = body["points"].as_array().map_or(0, Vec::len);
            assert!(points > 0 && (i == 0 || points <= 3), "{client}: {body}");
            answers.insert((client.clone(), i), body);
        }
    }
    // A clean stop publishes the last rounds.
    assert!(first.stop().success());

    let mut ever = 0;
    let mut compacted = 0;
    let mut tombstones = 0;
    for store in ["stats", "dedupe", "limits", "anomalies"] {
        let topic = format!("{TOPIC}.changelog.{store}");
        let log = read_changelog(&bootstrap, &topic);
        let mut last: HashMap<(i32, &[u8]), bool> = HashMap::new();
        for (p, key, has_payload) in &log {
            last.insert((*p, key), *has_payload);
            tombstones += usize::from(!has_payload);
        }
        let live = last.values().filter(|v| **v).count();
        eprintln!(
            "{topic}: {} records, {} keys ever, {live} after compaction",
            log.len(),
            last.len()
        );
        ever += last.len();
        compacted += live;
    }
    assert!(tombstones > 0, "no tombstone reached the changelogs");
    assert!(
        compacted * 4 < ever,
        "compaction would keep {compacted} of {ever} keys: expired keys are not tombstoned"
    );

    // The partitions move to an instance that has nothing: it restores
    // every partition, streaming (4 KiB budget), and answers the same.
    let moved_at = Instant::now();
    let mut args = common.to_vec();
    args.extend(["--config", small_budget.to_str().unwrap()]);
    let mut second = Server::start(&dir.path().join("b"), &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    let restored_after = loop {
        let mut done = true;
        for client in &clients {
            let (code, body) = usage(&c, &second, client, &month).await;
            done &= code == 200 && body["total_requests"].as_u64() == Some(want[client.as_str()]);
        }
        if done {
            break moved_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the restored instance is not exact; {}",
            second.report()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for client in &clients {
        for (i, history) in histories.iter().enumerate() {
            let (code, body) = usage(&c, &second, client, history).await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(
                &body,
                &answers[&(client.clone(), i)],
                "{client}: {history} after the move"
            );
        }
    }
    let metrics = metrics_text(&c, &second).await;
    let streamed =
        metric_value(&metrics, "tally_changelog_restores_streamed_total", "").unwrap_or(0.0);
    let restored_records =
        metric_value(&metrics, "tally_changelog_restored_records_total", "").unwrap_or(0.0);
    eprintln!(
        "moved: exact on the new instance {restored_after:?} after it started; {streamed} of {PARTITIONS} restores streamed, {restored_records} records read"
    );
    assert!(streamed >= 1.0, "no restore streamed with a 4 KiB budget");
    assert!(second.stop().success());
}
