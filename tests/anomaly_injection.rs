//! Injected anomalies end to end: `tally gen` writes a stream with
//! anomalies of every type injected at known minutes, `tally replay` feeds
//! it through the engine into RocksDB, and `tally serve` answers
//! `GET /v1/anomalies` over a real socket. Each injection must be found
//! with its type, client and minute; bigger injections must not be less
//! severe (and the biggest strictly more severe than the smallest); and
//! everything else found counts as a false alarm, of which only a few are
//! allowed.
//!
//! The injected clients are steady clients (`steady-0001`, ...: Poisson 60
//! requests a minute), so their baselines are known: warm after 30
//! minutes, above the 20 requests a minute the statistical detectors need.
//! One spike goes on the busiest Zipf client. The Zipf background is light
//! (2 events/s over 10,000 clients) and uses 4 endpoint templates: with 20,
//! its few warm low-volume clients meet endpoints they had not used in
//! their first 30 minutes and raise UNUSUAL_ENDPOINT_ACCESS (about 14 in
//! this stream), which is a property of the detector measured by
//! `benches/false_alarms.sh`, not of the injections tested here.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::*;
use tally_pipelines::time::format_rfc3339_ms;

struct Injected {
    /// `tally gen --inject` argument.
    spec: &'static str,
    client: &'static str,
    anomaly_type: &'static str,
    /// Minutes after the start that must be judged anomalous.
    minutes: &'static [i64],
}

const INJECTED: [Injected; 13] = [
    // Spikes of 2.5x, 5x and 30x the same 60/min baseline. A 2x spike
    // would sit exactly on the detector's 2x minimum ratio.
    Injected {
        spec: "spike:client=steady-0001,at=+34m,size=2.5",
        client: "steady-0001",
        anomaly_type: "SPIKE_IN_REQUESTS",
        minutes: &[34],
    },
    Injected {
        spec: "spike:client=steady-0002,at=+34m,size=5",
        client: "steady-0002",
        anomaly_type: "SPIKE_IN_REQUESTS",
        minutes: &[34],
    },
    Injected {
        spec: "spike:client=steady-0003,at=+34m,size=30",
        client: "steady-0003",
        anomaly_type: "SPIKE_IN_REQUESTS",
        minutes: &[34],
    },
    Injected {
        spec: "spike:client=client-00001,at=+36m,size=3",
        client: "client-00001",
        anomaly_type: "SPIKE_IN_REQUESTS",
        minutes: &[36],
    },
    Injected {
        spec: "errors:client=steady-0004,at=+36m,size=0.2",
        client: "steady-0004",
        anomaly_type: "SPIKE_IN_ERRORS",
        minutes: &[36],
    },
    // Two minutes: an anomalous minute does not teach the baseline, so
    // the second is judged against the same normal.
    Injected {
        spec: "errors:client=steady-0005,at=+36m,size=0.9,minutes=2",
        client: "steady-0005",
        anomaly_type: "SPIKE_IN_ERRORS",
        minutes: &[36, 37],
    },
    // Both on one client: latency severities are in EWMA deviations of a
    // noisy p95, which differ more between clients than between sizes.
    // The anomalous minute 38 does not teach the baseline. (2.5x is found
    // with 19 of seeds 1 to 20; with seed 12 that minute's own p95 was
    // low enough to stay under 4 deviations.)
    Injected {
        spec: "latency:client=steady-0006,at=+38m,size=2.5",
        client: "steady-0006",
        anomaly_type: "LATENCY_DEGRADATION",
        minutes: &[38],
    },
    Injected {
        spec: "latency:client=steady-0006,at=+40m,size=20",
        client: "steady-0006",
        anomaly_type: "LATENCY_DEGRADATION",
        minutes: &[40],
    },
    Injected {
        spec: "unusual-endpoint:client=steady-0008,at=+40m,size=3,endpoint=/admin/export",
        client: "steady-0008",
        anomaly_type: "UNUSUAL_ENDPOINT_ACCESS",
        minutes: &[40],
    },
    Injected {
        spec: "unusual-endpoint:client=steady-0009,at=+40m,size=30,endpoint=/admin/export",
        client: "steady-0009",
        anomaly_type: "UNUSUAL_ENDPOINT_ACCESS",
        minutes: &[40],
    },
    // Fresh endpoints every minute: both minutes are enumeration.
    Injected {
        spec: "enumeration:client=steady-0010,at=+42m,size=2,minutes=2",
        client: "steady-0010",
        anomaly_type: "POTENTIAL_ABUSE",
        minutes: &[42, 43],
    },
    // 401/403 bursts need no baseline: clients with no other traffic.
    Injected {
        spec: "auth-burst:client=intruder-a,at=+42m,size=1.5",
        client: "intruder-a",
        anomaly_type: "POTENTIAL_ABUSE",
        minutes: &[42],
    },
    Injected {
        spec: "auth-burst:client=intruder-b,at=+42m,size=5",
        client: "intruder-b",
        anomaly_type: "POTENTIAL_ABUSE",
        minutes: &[42],
    },
];

/// Anomalies found outside the injected (client, minute, type) cells, of
/// roughly 370 warm buckets judged (12 steady clients and the top dozen
/// Zipf clients, minutes 30 to 47). Measured: 4 with this stream (seed
/// 42), all LATENCY_DEGRADATION at LOW (three steady clients and
/// client-00006); 1 to 10 (mean 5) with seeds 1 to 20, all but two of
/// them LATENCY_DEGRADATION, mostly LOW. The p95 of a few dozen lognormal
/// latencies (sigma 0.8) swings by 20 % and more from minute to minute,
/// and the latency detector has no minimum request count. The bound
/// leaves room for that rate, not for a detector that alarms routinely.
const FALSE_ALARMS_ALLOWED: usize = 10;

fn severity_rank(a: &Value) -> u8 {
    match a["severity"].as_str() {
        Some("LOW") => 1,
        Some("MEDIUM") => 2,
        Some("HIGH") => 3,
        Some("CRITICAL") => 4,
        other => panic!("severity {other:?} in {a}"),
    }
}

/// What the stream holds per (client, minute after `start`), counted here
/// from the generated file.
#[derive(Default)]
struct Cell {
    requests: u64,
    server_errors: u64,
    latencies: Vec<f64>,
}

fn cells(ndjson: &str, start: i64) -> BTreeMap<(String, i64), Cell> {
    let mut out: BTreeMap<(String, i64), Cell> = BTreeMap::new();
    for line in ndjson.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let minute = (e["timestamp"].as_i64().unwrap() - start).div_euclid(MINUTE);
        let cell = out
            .entry((e["client_id"].as_str().unwrap().to_string(), minute))
            .or_default();
        cell.requests += 1;
        if e["status"].as_u64().unwrap() >= 500 {
            cell.server_errors += 1;
        }
        cell.latencies.push(e["latency_ms"].as_f64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_anomalies_are_found_by_type_client_and_minute_and_graded_by_size() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Two hours back, so every event is well within the anomaly lookback
    // and nowhere near the future limit.
    let start = (now - 2 * HOUR) / MINUTE * MINUTE;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stream.ndjson");
    let data = dir.path().join("data");

    let mut gen = Command::new(tally_bin());
    gen.arg("gen")
        .args(["--start", &start.to_string(), "--duration", "50m"])
        .args(["--rate", "2", "--clients", "10000", "--endpoints", "4"])
        .args(["--steady-clients", "12", "--steady-rate", "60"])
        .arg("--out")
        .arg(&file);
    for i in &INJECTED {
        gen.args(["--inject", i.spec]);
    }
    let out = gen.output().unwrap();
    assert!(
        out.status.success(),
        "gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ndjson = std::fs::read_to_string(&file).unwrap();
    let lines = ndjson.lines().count() as u64;

    // Lateness 1 minute: the last events (minute 49) close minutes up to
    // 47, past every injection.
    let out = Command::new(tally_bin())
        .arg("replay")
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--allowed-lateness", "1m", "--json", "--log-format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["accepted"].as_u64(), Some(lines), "{summary}");

    let server = Server::start(&data, &[]);
    let c = client();
    let body: Value = c
        .get(server.url("/v1/anomalies?lookback_hours=24"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let found = body["anomalies"].as_array().cloned().unwrap_or_default();
    let minute_of = |a: &Value| {
        let at = a["detected_at"].as_str().unwrap();
        (0..60)
            .find(|m| format_rfc3339_ms(start + (m + 1) * MINUTE) == at)
            .unwrap_or(-1)
    };

    // Every injected minute is found once, with its type and client.
    let mut matched = vec![false; found.len()];
    let mut by_injection: Vec<Vec<&Value>> = Vec::new();
    for i in &INJECTED {
        let mut hits = Vec::new();
        for &m in i.minutes {
            let at: Vec<usize> = (0..found.len())
                .filter(|&k| {
                    found[k]["client_id"] == i.client
                        && found[k]["anomaly_type"] == i.anomaly_type
                        && minute_of(&found[k]) == m
                })
                .collect();
            assert_eq!(
                at.len(),
                1,
                "{} at minute {m}: found {:#?}",
                i.spec,
                found
                    .iter()
                    .filter(|a| a["client_id"] == i.client)
                    .collect::<Vec<_>>()
            );
            matched[at[0]] = true;
            hits.push(&found[at[0]]);
        }
        by_injection.push(hits);
    }
    let false_alarms: Vec<&Value> = (0..found.len())
        .filter(|&k| !matched[k])
        .map(|k| &found[k])
        .collect();
    assert!(
        false_alarms.len() <= FALSE_ALARMS_ALLOWED,
        "{} false alarms: {false_alarms:#?}",
        false_alarms.len()
    );
    eprintln!(
        "{} injected anomalies found; {} false alarms: {:?}",
        found.len() - false_alarms.len(),
        false_alarms.len(),
        false_alarms
            .iter()
            .map(|a| format!("{} {} {}", a["client_id"], a["anomaly_type"], a["severity"]))
            .collect::<Vec<_>>()
    );

    // Severity grows with the size: spikes 2.5x <= 5x <= 30x with
    // 2.5x < 30x; errors 20 % < 90 %; latency 2.5x < 20x; 3 < 30 requests
    // a minute to the unusual endpoint.
    let severity = |i: usize| severity_rank(by_injection[i][0]);
    let spikes = [severity(0), severity(1), severity(2)];
    assert!(spikes.windows(2).all(|w| w[0] <= w[1]), "{spikes:?}");
    assert!(spikes[0] < spikes[2], "{spikes:?}");
    for (small, big) in [(4, 5), (6, 7), (8, 9)] {
        assert!(
            severity(small) < severity(big),
            "{} vs {}",
            by_injection[small][0],
            by_injection[big][0]
        );
    }

    // Observed values match what the file holds, counted here.
    let cells = cells(&ndjson, start);
    let cell = |client: &str, minute: i64| &cells[&(client.to_string(), minute)];
    for (i, client) in [(0, "steady-0001"), (1, "steady-0002"), (2, "steady-0003")] {
        assert_eq!(
            by_injection[i][0]["observed"].as_f64(),
            Some(cell(client, 34).requests as f64)
        );
    }
    for (k, minute) in [36, 37].into_iter().enumerate() {
        let c = cell("steady-0005", minute);
        let rate = c.server_errors as f64 / c.requests as f64;
        let observed = by_injection[5][k]["observed"].as_f64().unwrap();
        assert!((observed - rate).abs() < 1e-9, "{observed} vs {rate}");
    }
    // The engine's p95 comes from a sketch with <= 0.5 % error.
    let p95 = nearest_rank(&cell("steady-0006", 40).latencies, 0.95);
    assert_close(
        "steady-0006 p95",
        by_injection[7][0]["observed"].as_f64().unwrap(),
        p95,
        0.01,
    );
    // The unusual endpoint is named, and only the injected calls use it.
    for (i, calls) in [(8, 3.0), (9, 30.0)] {
        assert_eq!(by_injection[i][0]["endpoint"], "/admin/export");
        assert_eq!(by_injection[i][0]["observed"].as_f64(), Some(calls));
    }
    // Rule-based scores in multiples of the trigger: 20 endpoints / 10 =
    // 2 (MEDIUM from 2); 30 failures / 20 = 1.5 (LOW below 2); 100 / 20 =
    // 5 (HIGH from 4 to 8).
    for hit in &by_injection[10] {
        assert_eq!(hit["observed"].as_f64(), Some(20.0));
        assert_eq!(hit["severity"], "MEDIUM");
    }
    assert_eq!(by_injection[11][0]["observed"].as_f64(), Some(30.0));
    assert_eq!(by_injection[11][0]["severity"], "LOW");
    assert_eq!(by_injection[12][0]["observed"].as_f64(), Some(100.0));
    assert_eq!(by_injection[12][0]["severity"], "HIGH");

    // The per-client route agrees.
    let own: Value = c
        .get(server.url("/v1/clients/intruder-b/anomalies?lookback_hours=24"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(own["anomalies"].as_array().map(Vec::len), Some(1), "{own}");
    assert!(server.stop().success());
}
