//! Billing across a cluster: two instances against a real broker (tansu).
//!
//! Clients with awkward ids, spread over both instances' partitions, use
//! the previous (closed) month. `GET /v1/reports/billing` at either
//! instance exports every client, each line the bytes the client's own
//! report answers, its totals equal to a plain count of the events sent;
//! `<topic>.billing` carries one `BILLING_PERIOD_CLOSED` per client, keyed
//! by client; and once one instance is killed, the survivor, which took
//! its partitions, answers the closed reports byte for byte.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{Datelike, TimeZone};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use support::kafka::{owned, produce_all, wait_for_split, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const PARTITIONS: u16 = 12;

fn cluster_args(broker: &Broker) -> Vec<String> {
    [
        "--kafka-brokers",
        &broker.bootstrap(),
        "--kafka-group",
        "tally-billing",
        "--kafka-changelog-interval",
        "300ms",
        "--allowed-lateness",
        "1m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The previous calendar month, UTC: `[start, end)` in ms.
fn previous_month() -> (i64, i64) {
    let now = chrono::Utc::now();
    let this = chrono::Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let (y, m) = if now.month() == 1 {
        (now.year() - 1, 12)
    } else {
        (now.year(), now.month() - 1)
    };
    let prev = chrono::Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap();
    (prev.timestamp_millis(), this.timestamp_millis())
}

/// Every `BILLING_PERIOD_CLOSED` on `topic` so far: (key, event).
fn read_billing_topic(bootstrap: &str, topic: &str) -> Vec<(String, Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "billing-inspector")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut out = Vec::new();
    for p in partitions {
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
        // To the partition's end (tansu reports the high watermark as the
        // last batch's base offset + 1: records may follow it).
        let mut next = low;
        loop {
            assert!(Instant::now() < deadline, "{topic}[{p}] stuck at {next}");
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    next = m.offset() + 1;
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                    let event: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                    out.push((key, event));
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) if next >= high => break,
                _ => {}
            }
        }
    }
    out
}

async fn export(c: &reqwest::Client, at: &Server, q: &str) -> BTreeMap<String, Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .get(at.url(&format!("/v1/reports/billing?{q}")))
            .send()
            .await
            .unwrap();
        // A partition moving answers 503 before the stream starts.
        if r.status() == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        let mut out = BTreeMap::new();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(line).unwrap();
            let client = v["client_id"].as_str().unwrap().to_string();
            assert!(
                out.insert(client.clone(), line.to_vec()).is_none(),
                "{client} twice"
            );
        }
        return out;
    }
}

async fn report(c: &reqwest::Client, at: &Server, client: &str, q: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .get(at.url(&format!(
                "/v1/clients/{}/reports/billing?{q}",
                encode_path(client)
            )))
            .send()
            .await
            .unwrap();
        if r.status() == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert_eq!(r.status(), 200, "{client}");
        return r.bytes().await.unwrap().to_vec();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_export_is_whole_announced_once_and_survives_a_partition_move() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, u32::from(PARTITIONS));
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let (start, end) = previous_month();
    let clients: Vec<String> = (0..16)
        .map(|i| match i % 4 {
            0 => format!("acme/eu west {i}"),
            1 => format!("ünï-{i}, \"quoted\""),
            2 => format!("tenant:{i}?x=1&y=2"),
            _ => format!("plain-{i}"),
        })
        .collect();
    let partitioner = tally_pipelines::partitioner::Partitioner::Murmur2;
    // Events over the month in time order, a different count per client.
    let mut events: Vec<(i64, String)> = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let n = 40 + 7 * i as i64;
        for k in 0..n {
            events.push((start + (end - start) * k / n + i as i64, client.clone()));
        }
    }
    events.sort();
    let want: BTreeMap<String, u64> = clients
        .iter()
        .map(|c| {
            (
                c.clone(),
                events.iter().filter(|(_, e)| e == c).count() as u64,
            )
        })
        .collect();
    let records: Vec<(String, String)> = events
        .iter()
        .enumerate()
        .map(|(i, (ts, client))| {
            let line = json!({"event_id": format!("b{i}"), "client_id": client,
                "endpoint": "/v1/items/{id}", "status": if i % 9 == 0 { 503 } else { 200 },
                "request_bytes": 100, "response_bytes": 10, "latency_ms": 4.0, "timestamp": ts});
            (client.clone(), line.to_string())
        })
        .collect();
    produce_all(&broker.bootstrap(), TOPIC, &records).await;

    let dir = tempfile::tempdir().unwrap();
    let args = cluster_args(&broker);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Server::start(&dir.path().join("a"), &args);
    let b = Server::start(&dir.path().join("b"), &args);
    let c = client();
    let split = wait_for_split(&c, &[&a, &b], PARTITIONS).await;
    let at_a = clients
        .iter()
        .filter(|c| split[0].contains(&partitioner.partition(c, PARTITIONS)))
        .count();
    assert!(
        at_a > 0 && at_a < clients.len(),
        "the clients should span both instances ({split:?})"
    );

    // Every event applied (at the clients' owners) before the month is
    // asked for: the export then closes it.
    let mid = tally_pipelines::time::format_rfc3339_ms(start + (end - start) / 2);
    let deadline = Instant::now() + Duration::from_secs(120);
    for (client, n) in &want {
        loop {
            let r = c
                .get(a.url(&format!(
                    "/v1/clients/{}/usage?period=month&at={mid}",
                    encode_path(client)
                )))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if v["total_requests"].as_u64() == Some(*n) {
                break;
            }
            assert!(Instant::now() < deadline, "{client}: {v}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    let period = format!("period={}", &mid[..10]);
    let from_a = export(&c, &a, &period).await;
    assert_eq!(
        from_a.keys().cloned().collect::<Vec<_>>(),
        want.keys().cloned().collect::<Vec<_>>()
    );
    for (client, bytes) in &from_a {
        let r: Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(r["status"], "closed", "{client}");
        assert_eq!(r["summary"]["total_requests"].as_u64(), Some(want[client]));
        // The client's own report, asked at the other instance.
        assert_eq!(&report(&c, &b, client, &period).await, bytes, "{client}");
    }
    assert_eq!(export(&c, &b, &period).await, from_a);
    // CSV across the cluster: one header, the rows of every client.
    let csv = c
        .get(b.url(&format!("/v1/reports/billing?{period}&format=csv")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("client_id,plan_id,"));
    assert_eq!(csv.matches("client_id,plan_id,").count(), 1);

    // One announcement per client on the billing topic, keyed by client,
    // with the totals of the stored report.
    let topic = format!("{TOPIC}.billing");
    let deadline = Instant::now() + Duration::from_secs(60);
    let announced = loop {
        let got = read_billing_topic(&broker.bootstrap(), &topic);
        if got.len() >= clients.len() || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut by_client: BTreeMap<String, u64> = BTreeMap::new();
    for (key, event) in &announced {
        assert_eq!(event["event_type"], "BILLING_PERIOD_CLOSED");
        assert_eq!(event["client_id"].as_str(), Some(key.as_str()));
        assert_eq!(
            event["details"]["billable_metrics"]["total_requests"].as_u64(),
            Some(want[key])
        );
        *by_client.entry(key.clone()).or_default() += 1;
    }
    assert_eq!(by_client, want.keys().map(|c| (c.clone(), 1)).collect());

    // A dies; B takes its partitions with their closed reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.kill();
    let deadline = Instant::now() + Duration::from_secs(240);
    while owned(&c, &b).await.len() != usize::from(PARTITIONS) {
        assert!(Instant::now() < deadline, "B never took every partition");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (client, bytes) in &from_a {
        assert_eq!(&report(&c, &b, client, &period).await, bytes, "{client}");
    }
    assert_eq!(export(&c, &b, &period).await, from_a);
    b.stop();
}
