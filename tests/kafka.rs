//! Consuming from a real Kafka-protocol broker (tansu): exact numbers
//! against the reference, dead letters for bad messages, and SIGKILL of the
//! consuming instance mid-stream without loss or double counting.

mod support;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::Value;
use support::kafka::{produce_all, records, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const DLQ: &str = "tally.requests.dlq";

/// Sum of a counter over all its label sets with `source="kafka"`.
async fn kafka_counter(c: &reqwest::Client, server: &Server, name: &str) -> u64 {
    metric_value(&metrics_text(c, server).await, name, "source=\"kafka\"").unwrap_or(0.0) as u64
}

/// Waits until the reference totals of every client are served.
async fn wait_for_totals(c: &reqwest::Client, server: &mut Server, lines: &[Line]) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let want: u64 = count_kind(lines, Kind::Good);
    loop {
        let mut got = 0;
        let mut short = Vec::new();
        for client in clients_of(lines) {
            let url = server.url(&format!(
                "/v1/clients/{}/usage?period=month&at={START_MS}",
                encode_path(&client)
            ));
            let mut n = 0;
            if let Ok(r) = c.get(url).send().await {
                n = r
                    .json::<Value>()
                    .await
                    .map(|v| v["total_requests"].as_u64().unwrap_or(0))
                    .unwrap_or(0);
            }
            got += n;
            let expected = lines
                .iter()
                .filter(|l| l.kind == Kind::Good && l.client == client)
                .count() as u64;
            if n != expected {
                short.push(format!("{client}: {n} of {expected}"));
            }
        }
        if got == want {
            return;
        }
        assert!(
            got <= want,
            "counted {got} events, more than the {want} sent: double counting"
        );
        if Instant::now() >= deadline {
            let late = c
                .get(server.url("/v1/dead-letters?limit=1000"))
                .send()
                .await
                .ok();
            let late = match late {
                Some(r) => r.text().await.unwrap_or_default(),
                None => String::new(),
            };
            panic!(
                "only {got} of {want} events counted after 180 s; clients short: {short:?}; late dead letters: {}; {}",
                &late[..late.len().min(2000)],
                server.report()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn check_every_client(c: &reqwest::Client, server: &Server, lines: &[Line]) {
    for client in clients_of(lines) {
        let url = server.url(&format!(
            "/v1/clients/{}/usage?period=day&at={START_MS}",
            encode_path(&client)
        ));
        let got: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        check_usage(
            &got,
            &expected(lines, &client, START_MS, START_MS + DAY),
            &client,
        );
    }
}

fn kafka_args(broker: &Broker) -> Vec<String> {
    vec![
        "--kafka-brokers".into(),
        broker.bootstrap(),
        "--kafka-group".into(),
        "tally-test".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumes_exactly_through_sigkill_and_sends_bad_messages_to_the_dead_letter_topic() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 12);
    broker.create_topic(DLQ, 1);
    let lines = dataset(1_000_000, 500, 23);
    produce_all(&broker.bootstrap(), TOPIC, &records(&lines)).await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Tiny mailboxes: shards fall behind, so partitions get paused and
    // resumed all along, and the numbers must still be exact.
    let mut args = kafka_args(&broker);
    args.extend(["--mailbox-capacity".to_string(), "1".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = client();

    // Kill the consumer as soon as it has applied something, twice.
    for _ in 0..2 {
        let server = Server::start(&data, &args);
        let deadline = Instant::now() + Duration::from_secs(120);
        let before = kafka_counter(&c, &server, "tally_events_accepted_total").await;
        while kafka_counter(&c, &server, "tally_events_accepted_total").await <= before {
            assert!(Instant::now() < deadline, "nothing consumed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill();
    }

    let mut server = Server::start(&data, &args);
    wait_for_totals(&c, &mut server, &lines).await;
    check_every_client(&c, &server, &lines).await;
    let metrics = metrics_text(&c, &server).await;
    let pauses = metric_value(&metrics, "tally_kafka_partition_pauses_total", "").unwrap_or(0.0);
    assert!(pauses > 0.0, "slow shards never paused their partitions");

    // Every malformed message is in the dead-letter topic with its reason
    // and origin (at least once: a kill may repeat a few).
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[DLQ]).unwrap();
    let want = count_kind(&lines, Kind::Malformed) as usize;
    let mut origins = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while origins.len() < want {
        let m = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("dead letters missing")
            .unwrap();
        let headers = m.headers().expect("dead letter without headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
                .unwrap_or_else(|| panic!("header {name} missing"))
        };
        assert!(!header("tally-reason").is_empty());
        origins.insert((
            header("tally-source-partition"),
            header("tally-source-offset"),
        ));
        assert!(Instant::now() < deadline);
    }
    assert_eq!(origins.len(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_in_kafka_mode_goes_through_the_topic() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 12);
    broker.create_topic(DLQ, 1);
    let dir = tempfile::tempdir().unwrap();
    let args = kafka_args(&broker);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir.path().join("data"), &args);
    let c = client();
    let lines: Vec<Line> = dataset(3_000, 40, 5)
        .into_iter()
        .filter(|l| l.kind == Kind::Good)
        .collect();
    let resp = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson(&lines))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["accepted"].as_u64(), Some(lines.len() as u64));
    // Produced, then consumed by the same instance's Kafka source.
    wait_for_totals(&c, &mut server, &lines).await;
    check_every_client(&c, &server, &lines).await;

    // The event channel is also on the alert topic: a client made rate
    // limited shows up there, keyed by its id.
    let one = serde_json::json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 1, "window_seconds": 3600}});
    let r = c
        .put(server.url("/v1/clients/noisy/limits"))
        .json(&one)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for want in [200, 429] {
        let r = c
            .post(server.url("/v1/check"))
            .json(&serde_json::json!({"client_id": "noisy", "endpoint": "/x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "alert-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{TOPIC}.alerts")]).unwrap();
    let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("no event on the alert topic")
        .unwrap();
    assert_eq!(m.key(), Some(&b"noisy"[..]));
    let event: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
    assert_eq!(event["event_type"], "RATE_LIMITED");
    assert_eq!(event["client_id"], "noisy");
    assert!(event["event_id"].as_u64().unwrap() >= 1);
    let at = event["timestamp"].as_str().unwrap();
    assert!(tally_pipelines::time::parse_rfc3339_ms(at).is_ok(), "{at}");
}

async fn status(c: &reqwest::Client, url: String) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_flips_readiness_and_consumption_resumes_exactly() {
    let broker_dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_persistent(broker_dir.path());
    broker.create_topic(TOPIC, 12);
    broker.create_topic(DLQ, 1);
    let lines = dataset(20_000, 100, 31);
    let (first, second) = lines.split_at(10_000);
    produce_all(&broker.bootstrap(), TOPIC, &records(first)).await;

    let dir = tempfile::tempdir().unwrap();
    let mut args = kafka_args(&broker);
    args.extend(["--kafka-outage-grace".to_string(), "3s".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&dir.path().join("data"), &args);
    let c = client();
    wait_for_totals(&c, &mut server, first).await;
    assert_eq!(status(&c, server.url("/health/ready")).await.0, 200);

    // Broker down for 20 s: readiness turns false with the reason, queries
    // keep answering from local state. Shorter than the 30 s message
    // timeout of Tally's idempotent producers on purpose: a longer outage
    // makes librdkafka bump their epoch (KIP-360), and tansu 0.6's SQLite
    // storage panics on the bumped epoch ("more or less than one row",
    // lite.rs:503) and answers nothing after; a Kafka broker accepts it.
    broker.stop();
    let stopped_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(18);
    let (code, body) = loop {
        let (code, body) = status(&c, server.url("/health/ready")).await;
        if code == 503 || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(code, 503, "readiness did not flip: {body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Kafka"),
        "{body}"
    );
    let (code, detail) = status(&c, server.url("/health/detailed")).await;
    assert_eq!(code, 503);
    assert_eq!(detail["kafka"]["connected"], false, "{detail}");
    check_every_client(&c, &server, first).await;
    tokio::time::sleep_until((stopped_at + Duration::from_secs(20)).into()).await;

    // Back: consumption resumes by itself, nothing lost or doubled.
    broker.restart();
    produce_all(&broker.bootstrap(), TOPIC, &records(second)).await;
    wait_for_totals(&c, &mut server, &lines).await;
    check_every_client(&c, &server, &lines).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&c, server.url("/health/ready")).await.0 != 200 {
        assert!(Instant::now() < deadline, "readiness did not recover");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A topic produced with librdkafka's default partitioner (CRC-32, as
/// confluent-kafka, node-rdkafka and the Rust rdkafka crate use) while
/// Tally expects murmur2: within the first records readiness turns false
/// naming crc32, nothing is dead-lettered for its partition, and restarted
/// with `--partitioner crc32` Tally is ready, settles consistent and lists
/// the malformed records, and counts every good event exactly, per client
/// (the state the first instance applied comes back from its changelog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_librdkafka_default_producer_is_recognized_and_nothing_is_dead_lettered() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 12);
    broker.create_topic(DLQ, 1);
    let lines = dataset(6_000, 60, 47);
    support::kafka::produce_all_partitioning(&broker.bootstrap(), TOPIC, &records(&lines), None)
        .await;

    let dir = tempfile::tempdir().unwrap();
    let args = kafka_args(&broker);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&dir.path().join("data"), &args);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(90);
    let body = loop {
        let (code, body) = status(&c, server.url("/health/ready")).await;
        if code == 503 && body["detail"].as_str().unwrap_or("").contains("crc32") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never named crc32: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("--partitioner crc32"), "{detail}");
    let (_, health) = status(&c, server.url("/health/detailed")).await;
    let partitioning = &health["kafka"]["partitioning"];
    assert_eq!(partitioning["verdict"], "mismatched", "{health}");
    assert_eq!(partitioning["producers_use"], "crc32", "{health}");
    assert_eq!(partitioning["configured"], "murmur2", "{health}");
    // Held, not dead-lettered: whatever reached the dead-letter topic is
    // malformed input, never a good event for its partition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, dead) = status(&c, server.url("/v1/dead-letters/kafka?limit=10000")).await;
    assert_eq!(code, 200, "{dead}");
    let malformed = count_kind(&lines, Kind::Malformed) as usize;
    let listed = dead["dead_letters"].as_array().unwrap();
    assert!(listed.len() <= malformed, "{} dead letters", listed.len());
    for d in listed {
        let reason = d["reason"].as_str().unwrap_or("");
        assert!(
            !reason.contains("partition"),
            "a good event dead-lettered: {d}"
        );
        assert_eq!(d["source_topic"], TOPIC, "{d}");
    }
    server.stop();

    // Restarted with the producers' partitioner (a new data directory:
    // the old one lays clients out by murmur2): every event, exactly.
    let mut server = Server::start(
        &dir.path().join("data-crc32"),
        &[args.as_slice(), &["--partitioner", "crc32"]].concat(),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, ready) = status(&c, server.url("/health/ready")).await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {ready}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    loop {
        let (_, health) = status(&c, server.url("/health/detailed")).await;
        if health["kafka"]["partitioning"]["verdict"] == "consistent" {
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {health}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every malformed record is listed, with its reason and origin.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, dead) = status(&c, server.url("/v1/dead-letters/kafka?limit=10000")).await;
        let listed = dead["dead_letters"].as_array().cloned().unwrap_or_default();
        let origins: std::collections::HashSet<(String, String)> = listed
            .iter()
            .map(|d| {
                assert!(!d["reason"].as_str().unwrap_or("").is_empty(), "{d}");
                (
                    d["source_partition"].as_str().unwrap_or("").to_string(),
                    d["source_offset"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        if origins.len() == malformed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {malformed} malformed records listed",
            origins.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_totals(&c, &mut server, &lines).await;
    check_every_client(&c, &server, &lines).await;
}
