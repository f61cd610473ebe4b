//! Shared by the telemetry tests: points, posting and reading them, and
//! the reference statistics of a step computed from the points the test
//! sent (shares no code with the engine).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{nearest_rank, Server};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Midnight UTC at least two days back: a whole day of points is in the
/// past, so none is ahead of the ingest clock.
pub fn day_start() -> i64 {
    let day = 86_400_000;
    (now_ms() / day - 2) * day
}

pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Clone, Debug)]
pub struct P {
    pub series: &'static str,
    pub tags: Option<BTreeMap<&'static str, &'static str>>,
    pub ts: i64,
    pub value: f64,
    pub id: Option<String>,
}

pub fn line(p: &P) -> String {
    let mut v = json!({"series": p.series, "timestamp": p.ts, "value": p.value});
    if let Some(tags) = &p.tags {
        v["tags"] = json!(tags);
    }
    if let Some(id) = &p.id {
        v["point_id"] = json!(id);
    }
    v.to_string()
}

pub async fn post(c: &reqwest::Client, server: &Server, points: &[P]) -> Value {
    let body: String = points.iter().map(|p| line(p) + "\n").collect();
    let resp = c
        .post(server.url("/v1/telemetry"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let json: Value = resp.json().await.unwrap();
    assert_eq!(status, 202, "{json}");
    json
}

pub async fn get(c: &reqwest::Client, url: String) -> (u16, Value) {
    let resp = c.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The reference of one step: the values of the points inside it.
pub fn reference(values: &[(i64, f64)], agg: &str) -> Option<f64> {
    let n = values.len() as f64;
    // Deviations from the first value are exact for values that close
    // (near 1e9 with 1e-3 noise), so the mean and the spread are too.
    let shift = values[0].1;
    let mean_dev = values.iter().map(|v| v.1 - shift).sum::<f64>() / n;
    let mean = shift + mean_dev;
    let mut sorted: Vec<f64> = values.iter().map(|v| v.1).collect();
    sorted.sort_by(f64::total_cmp);
    // First and last by time, then value (the engine's order for ties).
    let by_time = |a: &&(i64, f64), b: &&(i64, f64)| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1));
    Some(match agg {
        "mean" => mean,
        "sum" => values.iter().map(|v| v.1).sum(),
        "count" => n,
        "min" => sorted[0],
        "max" => sorted[sorted.len() - 1],
        "first" => values.iter().min_by(by_time)?.1,
        "last" => values.iter().max_by(by_time)?.1,
        "stddev" => {
            if values.len() < 2 {
                return None;
            }
            (values
                .iter()
                .map(|v| (v.1 - shift - mean_dev).powi(2))
                .sum::<f64>()
                / (n - 1.0))
                .sqrt()
        }
        "median" => nearest_rank(&sorted, 0.5),
        "p95" => nearest_rank(&sorted, 0.95),
        "p99" => nearest_rank(&sorted, 0.99),
        _ => unreachable!(),
    })
}

pub fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-12)
}

/// Checks every step of a query against the reference over `points`.
pub fn check_steps(json: &Value, points: &[(i64, f64)], step: i64, agg: &str, ctx: &str) {
    let mut windows: BTreeMap<i64, Vec<(i64, f64)>> = BTreeMap::new();
    for &(ts, v) in points {
        windows
            .entry(ts - ts.rem_euclid(step))
            .or_default()
            .push((ts, v));
    }
    let got = json["points"].as_array().unwrap();
    assert_eq!(got.len(), windows.len(), "{ctx}: step count");
    let quantile = matches!(agg, "median" | "p95" | "p99");
    for (g, (start, values)) in got.iter().zip(&windows) {
        assert_eq!(g["timestamp"], rfc3339(*start), "{ctx}");
        assert_eq!(g["count"], values.len() as u64, "{ctx}");
        let want = reference(values, agg);
        match (g["value"].as_f64(), want) {
            (None, None) => {}
            (Some(got), Some(want)) => {
                // Quantiles within the sketch's 1 %; the rest as exact as
                // floating point allows.
                let rel = if quantile { 0.01 } else { 1e-9 };
                assert!(close(got, want, rel), "{ctx} at {start}: {got} vs {want}");
            }
            other => panic!("{ctx} at {start}: {other:?}"),
        }
    }
}
