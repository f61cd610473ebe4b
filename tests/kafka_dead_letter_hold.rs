//! A dead letter the dead-letter topic does not take holds its partition
//! at that record: nothing after it is counted or committed, readiness
//! says which partition is held and why, and restarted with a writable
//! dead-letter topic the instance writes every dead letter once and counts
//! every good event exactly once. Real `tally serve` processes against a
//! real broker (tansu).

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::kafka::{kafka_dead_letter_origins, produce_all, records, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const DLQ: &str = "tally.requests.dlq";

async fn get(c: &reqwest::Client, url: String) -> (u16, Value) {
    match c.get(url).send().await {
        Ok(r) => {
            let code = r.status().as_u16();
            (code, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

async fn total_of(c: &reqwest::Client, server: &Server, clients: &[String]) -> u64 {
    let mut got = 0;
    for client in clients {
        got += month_total(c, server, client).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_topic_holds_its_partition_and_says_so() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    broker.create_topic(DLQ, 1);
    let lines = dataset(8_000, 40, 97);
    let clients: Vec<String> = clients_of(&lines).into_iter().collect();
    let want = count_kind(&lines, Kind::Good);
    let malformed = count_kind(&lines, Kind::Malformed) as usize;
    assert!(malformed > 10);
    produce_all(&broker.bootstrap(), TOPIC, &records(&lines)).await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bootstrap = broker.bootstrap();
    let args = [
        "--kafka-brokers",
        bootstrap.as_str(),
        "--kafka-group",
        "tally-dlq-hold",
        "--partitions",
        "4",
        "--kafka-outage-grace",
        "2s",
    ];
    // A topic name the broker refuses: every dead-letter write fails.
    let mut server = Server::start(
        &data,
        &[args.as_slice(), &["--kafka-dlq-topic", "no such topic!"]].concat(),
    );
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(90);
    while total_of(&c, &server, &clients).await == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing consumed; {}",
            server.report()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not ready, naming the held partitions and the dead-letter topic.
    let deadline = Instant::now() + Duration::from_secs(120);
    let detail = loop {
        let (code, body) = get(&c, server.url("/health/ready")).await;
        let detail = body["detail"].as_str().unwrap_or("").to_string();
        if code == 503 && detail.contains("dead-letter topic") {
            break detail;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never named the held partition: {code} {body}; {}",
            server.report()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(detail.contains("held at offset"), "{detail}");
    let (_, health) = get(&c, server.url("/health/detailed")).await;
    let held = health["kafka"]["held_partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!held.is_empty(), "{health}");
    for h in &held {
        assert!(h["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}");
        assert!(h["offset"].as_i64().is_some(), "{h}");
    }
    let gauge = metric_value(
        &metrics_text(&c, &server).await,
        "tally_kafka_partitions_held",
        "",
    );
    assert_eq!(gauge, Some(held.len() as f64));

    // Held: the count stops short and stays there.
    let held_total = total_of(&c, &server, &clients).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        total_of(&c, &server, &clients).await,
        held_total,
        "the count moved on past an unwritten dead letter"
    );
    assert!(
        held_total < want,
        "every event counted although no dead letter was written"
    );
    let status = server.stop();
    assert!(status.success(), "the held instance did not stop cleanly");

    // Restarted with a writable dead-letter topic: every dead letter once,
    // every good event once.
    let mut server = Server::start(&data, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = total_of(&c, &server, &clients).await;
        assert!(got <= want, "counted {got} of {want}: double counting");
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {want} counted after the restart; {}",
            server.report()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for client in &clients {
        let expected = lines
            .iter()
            .filter(|l| l.kind == Kind::Good && &l.client == client)
            .count() as u64;
        assert_eq!(month_total(&c, &server, client).await, expected, "{client}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (listed, origins) = kafka_dead_letter_origins(&c, &server).await;
        assert_eq!(origins.len(), listed, "a record dead-lettered twice");
        if listed == malformed {
            break;
        }
        assert!(
            listed < malformed && Instant::now() < deadline,
            "{listed} dead letters listed for {malformed} malformed records"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = get(&c, server.url("/health/ready")).await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (_, health) = get(&c, server.url("/health/detailed")).await;
    assert_eq!(
        health["kafka"]["held_partitions"],
        serde_json::json!([]),
        "{health}"
    );
}
