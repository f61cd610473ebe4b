//! Telemetry through failures and on the event channel, over a real
//! socket with RocksDB on disk: a kill -9 in the middle of a burst, and
//! drift and anomaly signals found at the right point.

mod support;

use std::time::Duration;

use support::sse::SseReader;
use support::telemetry::*;
use support::{client, encode_path, Rng, Server, MINUTE};

/// kill -9 in the middle of a burst sent with point ids; the sender then
/// resends every body (as a producer retries what it saw no answer for):
/// the statistics are exactly those of the points, each counted once,
/// and equal to an uninterrupted run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_burst_loses_nothing_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let start = day_start();
    let mut rng = Rng::new(99);
    let mut bodies: Vec<Vec<P>> = Vec::new();
    let series = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];
    let mut id = 0u64;
    for b in 0..200 {
        let mut body = Vec::new();
        for _ in 0..2_000 {
            id += 1;
            body.push(P {
                series: series[rng.below(8) as usize],
                tags: None,
                ts: start + b * 18_000 + rng.below(18_000) as i64,
                value: rng.unit() * 1_000.0 - 500.0,
                id: Some(id.to_string()),
            });
        }
        bodies.push(body);
    }
    let killed = Server::start(&dir.path().join("killed"), &[]);
    let url = killed.url("/v1/telemetry");
    let sender = {
        let (c, bodies) = (c.clone(), bodies.clone());
        tokio::spawn(async move {
            let mut acknowledged = 0;
            for body in &bodies {
                let text: String = body.iter().map(|p| line(p) + "\n").collect();
                match c.post(&url).body(text).send().await {
                    Ok(r) if r.status() == 202 => acknowledged += 1,
                    _ => break,
                }
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    killed.kill();
    let acknowledged = sender.await.unwrap();
    // The kill fell inside the burst.
    assert!(
        (1..bodies.len()).contains(&acknowledged),
        "{acknowledged} of {} bodies acknowledged before the kill",
        bodies.len()
    );
    let restarted = Server::start(&dir.path().join("killed"), &[]);
    let whole = Server::start(&dir.path().join("whole"), &[]);
    for body in &bodies {
        post(&c, &restarted, body).await;
        post(&c, &whole, body).await;
    }
    let range = format!(
        "from={}&to={}",
        encode_path(&rfc3339(start)),
        encode_path(&rfc3339(start + 60 * MINUTE))
    );
    for s in series {
        let values: Vec<(i64, f64)> = bodies
            .iter()
            .flatten()
            .filter(|p| p.series == s)
            .map(|p| (p.ts, p.value))
            .collect();
        for agg in [
            "count", "sum", "min", "max", "first", "last", "stddev", "p99",
        ] {
            let path = format!("/v1/telemetry/{s}?{range}&step=1m&agg={agg}");
            let (_, got) = get(&c, restarted.url(&path)).await;
            check_steps(
                &got,
                &values,
                MINUTE,
                agg,
                &format!("{s} {agg} after the kill"),
            );
            let (_, want) = get(&c, whole.url(&path)).await;
            assert_eq!(got["summary"]["count"], want["summary"]["count"]);
            assert_eq!(got["summary"]["min"], want["summary"]["min"]);
            assert_eq!(got["summary"]["max"], want["summary"]["max"]);
            assert_eq!(got["summary"]["p99"], want["summary"]["p99"]);
            let (a, b) = (
                got["summary"]["variance"].as_f64().unwrap(),
                want["summary"]["variance"].as_f64().unwrap(),
            );
            assert!(close(a, b, 1e-12), "{s}: {a} vs {b}");
        }
    }
}

/// A level shift raises `TELEMETRY_DRIFT` at the shift and an outlier
/// `TELEMETRY_ANOMALY` at the outlier, on the event channel, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_and_anomalies_go_on_the_event_channel_at_the_right_point() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let start = day_start();
    let mut rng = Rng::new(5);
    let gauss = |rng: &mut Rng| {
        let (u1, u2) = (rng.unit().max(1e-300), rng.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let mut points = Vec::new();
    for i in 0..2_000i64 {
        let ts = start + i * 1_000;
        let mut value = 100.0 + gauss(&mut rng);
        if i == 700 {
            value = 160.0; // sixty sigmas: an outlier
        }
        if i >= 1_500 {
            value += 4.0; // a lasting shift of four sigmas
        }
        points.push(P {
            series: "latency",
            tags: None,
            ts,
            value,
            id: None,
        });
    }
    for chunk in points.chunks(500) {
        post(&c, &server, chunk).await;
    }
    let mut reader = SseReader::open(
        &c,
        server.url("/v1/alerts/stream?types=TELEMETRY_ANOMALY,TELEMETRY_DRIFT"),
        Some(0),
    )
    .await;
    let mut events = reader.take(2).await;
    while let Some(e) = reader.next_within(Duration::from_secs(2)).await {
        events.push(e);
    }
    let kinds: Vec<(&str, i64)> = events
        .iter()
        .map(|(_, kind, data)| {
            let at = chrono::DateTime::parse_from_rfc3339(data["timestamp"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            (kind.as_str(), (at - start) / 1_000)
        })
        .collect();
    let anomaly: Vec<i64> = kinds
        .iter()
        .filter(|k| k.0 == "TELEMETRY_ANOMALY")
        .map(|k| k.1)
        .collect();
    let drift: Vec<i64> = kinds
        .iter()
        .filter(|k| k.0 == "TELEMETRY_DRIFT")
        .map(|k| k.1)
        .collect();
    assert!(anomaly.contains(&700), "{kinds:?}");
    assert_eq!(drift.len(), 1, "{kinds:?}");
    assert!((1_500..1_520).contains(&drift[0]), "{kinds:?}");
    let data = &events.iter().find(|e| e.1 == "TELEMETRY_DRIFT").unwrap().2;
    assert_eq!(data["details"]["direction"], "up", "{data}");
    assert_eq!(data["client_id"], "latency");
}
