//! Top consumers end to end: a skewed three-day stream over 400 clients is
//! ingested over HTTP; every period kind, every metric and several limits
//! are compared with a reference computed from the events by a plain loop
//! (totals per client, sorted), both for the newest periods (answered from
//! the shards' in-memory rankings) and older ones (answered from stored
//! totals), and again after a restart (rankings reloaded from the store).

mod support;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::*;
use tally_pipelines::time::{format_rfc3339_ms, Period, DAY_MS};

#[derive(Debug, Clone)]
struct Ev {
    client: String,
    ts: i64,
    status: u16,
    bytes: u64,
    units: u64,
}

/// Events from midnight two days ago until a minute ago, in time order.
/// Client `k` sends about `400 / k` times as much as client 400 (Zipf-ish),
/// and a few clients change pace between days so trends differ.
fn stream(now: i64) -> Vec<Ev> {
    let start = now / DAY_MS * DAY_MS - 2 * DAY_MS;
    let end = now - MINUTE;
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let mut ts = start;
    let step = (end - start) / 40_000;
    while ts < end {
        let k = 1 + (400.0 * rng.unit().powi(3)) as u64;
        let day = (ts - start) / DAY_MS;
        // c-2 doubles every day, c-3 halves: their trends are certain.
        let skip = match k {
            2 => rng.below(4) >= 1 << day,
            3 => rng.below(4) < (1 << day) - 1,
            _ => false,
        };
        if !skip {
            let status = match rng.below(20) {
                0 => 500,
                1 => 404,
                _ => 200,
            };
            out.push(Ev {
                client: format!("c-{k}"),
                ts,
                status,
                bytes: rng.below(10_000),
                units: rng.below(5),
            });
        }
        ts += step;
    }
    out
}

fn ndjson_of(events: &[Ev]) -> Vec<String> {
    events
        .chunks(5_000)
        .map(|chunk| {
            chunk
                .iter()
                .map(|e| {
                    format!(
                        r#"{{"client_id":"{}","endpoint":"/v1/x","status":{},"request_bytes":{},"response_bytes":0,"latency_ms":1,"compute_units":{},"timestamp":{}}}"#,
                        e.client, e.status, e.bytes, e.units, e.ts
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn value(e: &Ev, metric: &str) -> u128 {
    match metric {
        "request_count" => 1,
        "data_transfer_bytes" => u128::from(e.bytes),
        "compute_units" => u128::from(e.units),
        _ => u128::from(e.status >= 400),
    }
}

fn totals(events: &[Ev], metric: &str, from: i64, to: i64) -> HashMap<String, u128> {
    let mut t: HashMap<String, u128> = HashMap::new();
    for e in events.iter().filter(|e| e.ts >= from && e.ts < to) {
        *t.entry(e.client.clone()).or_default() += value(e, metric);
    }
    t
}

/// One reference row: `(client, value, previous, percent, trend)`.
type Row = (String, u128, u128, f64, &'static str);

/// The reference answer.
fn reference(
    events: &[Ev],
    period: Period,
    at: i64,
    metric: &str,
    limit: usize,
) -> (u128, Vec<Row>) {
    let (start, end) = period.bounds(at);
    let (previous_start, previous_end) = period.bounds(start - 1);
    let current = totals(events, metric, start, end);
    let previous = totals(events, metric, previous_start, previous_end);
    let total: u128 = current.values().sum();
    let newest = events.iter().map(|e| e.ts).max().unwrap();
    let elapsed = if newest < end {
        (newest + 1 - start) as f64 / (end - start) as f64
    } else {
        1.0
    };
    let mut ranked: Vec<(String, u128)> = current.into_iter().filter(|(_, v)| *v > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(limit);
    let rows = ranked
        .into_iter()
        .map(|(c, v)| {
            let p = previous.get(&c).copied().unwrap_or(0);
            let expected = p as f64 * elapsed;
            let trend = if expected == 0.0 {
                if v > 0 {
                    "INCREASING"
                } else {
                    "STABLE"
                }
            } else if (v as f64 - expected) / expected > 0.1 {
                "INCREASING"
            } else if (v as f64 - expected) / expected < -0.1 {
                "DECREASING"
            } else {
                "STABLE"
            };
            let percent = v as f64 * 100.0 / total as f64;
            (c, v, p, percent, trend)
        })
        .collect();
    (total, rows)
}

async fn check_all(c: &reqwest::Client, server: &Server, events: &[Ev], now: i64, ctx: &str) {
    let today = now / DAY_MS * DAY_MS;
    let queries = [
        (Period::Day, today + HOUR, "request_count", 10),
        (Period::Day, today - DAY_MS + 5 * HOUR, "request_count", 10),
        (Period::Day, today - DAY_MS, "data_transfer_bytes", 25),
        (Period::Day, today - 2 * DAY_MS, "error_count", 5),
        (Period::Hour, now - 2 * HOUR, "compute_units", 10),
        (Period::Hour, now - MINUTE, "request_count", 7),
        (Period::Week, now, "request_count", 10),
        (Period::Month, now, "data_transfer_bytes", 3),
        (Period::Month, now, "error_count", 400),
    ];
    for (period, at, metric, limit) in queries {
        let path = format!(
            "/v1/usage/top?period={}&at={}&metric={metric}&limit={limit}",
            period.as_str(),
            format_rfc3339_ms(at).replace('+', "%2B")
        );
        let r = c.get(server.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{ctx} {path}");
        let body: Value = r.json().await.unwrap();
        let (total, want) = reference(events, period, at, metric, limit);
        let what = format!("{ctx} {path}");
        assert_eq!(
            body["total"].as_u64().map(u128::from),
            Some(total),
            "{what}"
        );
        assert_eq!(body["metric"], metric, "{what}");
        let (start, end) = period.bounds(at);
        assert_eq!(
            body["period_start"].as_str(),
            Some(format_rfc3339_ms(start).as_str())
        );
        assert_eq!(
            body["period_end"].as_str(),
            Some(format_rfc3339_ms(end).as_str())
        );
        let got = body["top"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{what}: {body}");
        for (g, (client, v, p, percent, trend)) in got.iter().zip(&want) {
            assert_eq!(g["client_id"].as_str(), Some(client.as_str()), "{what}");
            assert_eq!(
                g["metric_value"].as_u64().map(u128::from),
                Some(*v),
                "{what}"
            );
            assert_eq!(
                g["previous_value"].as_u64().map(u128::from),
                Some(*p),
                "{what}"
            );
            assert!(
                (g["percent_of_total"].as_f64().unwrap() - percent).abs() <= 0.006,
                "{what}: {g} vs {percent}"
            );
            assert_eq!(g["trend"].as_str(), Some(*trend), "{what}: {g}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_consumers_agree_with_a_reference_before_and_after_a_restart() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let events = stream(now);
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let server = Server::start(dir.path(), &[]);
    for body in ndjson_of(&events) {
        let r = c
            .post(server.url("/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let counts: Value = r.json().await.unwrap();
        assert_eq!(counts["rejected"], 0);
        assert_eq!(counts["late"], 0);
    }
    check_all(&c, &server, &events, now, "live").await;

    // The certain trends, stated by hand: c-2 doubles daily, c-3 halves.
    let yesterday = format_rfc3339_ms(now / DAY_MS * DAY_MS - DAY_MS + HOUR).replace('+', "%2B");
    let body: Value = c
        .get(server.url(&format!(
            "/v1/usage/top?period=day&at={yesterday}&limit=400"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let trend_of = |client: &str| {
        body["top"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["client_id"] == client)
            .map(|e| e["trend"].as_str().unwrap().to_string())
    };
    assert_eq!(trend_of("c-2").as_deref(), Some("INCREASING"));
    assert_eq!(trend_of("c-3").as_deref(), Some("DECREASING"));

    // Problems are reported together.
    let r = c
        .get(server.url("/v1/usage/top?period=year&metric=likes&limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["period", "limit", "metric"], "{problem}");

    assert!(server.stop().success());
    let server = Server::start(dir.path(), &[]);
    check_all(&c, &server, &events, now, "after restart").await;
}
