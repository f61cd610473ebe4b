//! Telemetry end to end (run with `cargo bench --bench telemetry_http`):
//!
//! 1. A burst of 1M points (1,000 series, `tally gen --telemetry`) posted
//!    over HTTP as NDJSON bodies of 10,000 points on 4 connections to a
//!    fresh server: points/s and the server's peak RSS; beside it, in the
//!    same run, the same harness posting 1M request events (`tally gen`)
//!    to `/v1/events` of another fresh server (the peer path).
//! 2. One series with a point every second for a day (86,400 points),
//!    then `GET /v1/telemetry/{series}` over the day at a 1-minute step,
//!    N times (default 300): p50/p99/max; beside it the usage history of
//!    a client with a day of minute buckets (1,440, the request-side
//!    query of the same shape) and `/health/live` (the HTTP round trip).
//!
//! Knobs: TALLY_BENCH_POINTS (1000000), TALLY_BENCH_SERIES (1000),
//! TALLY_BENCH_BODY (10000 lines), TALLY_BENCH_CONNECTIONS (4),
//! TALLY_BENCH_REQUESTS (300).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_or, percentile, start_tally, tally_bin, vm_hwm_kib};

fn lines_of(file: &Path, per_body: usize) -> Vec<String> {
    let text = std::fs::read_to_string(file).expect("read generated file");
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(per_body)
        .map(|c| {
            let mut body = c.join("\n");
            body.push('\n');
            body
        })
        .collect()
}

/// Posts every body on `connections` connections; answers the seconds
/// it took and the items the server accepted.
async fn burst(base: &str, path: &str, bodies: Arc<Vec<String>>, connections: usize) -> (f64, u64) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (bodies, next, url) = (bodies.clone(), next.clone(), format!("{base}{path}"));
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut accepted = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let resp = c
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("post");
                assert_eq!(resp.status(), 202, "body {i} refused");
                let json: serde_json::Value = resp.json().await.expect("json");
                accepted += json["accepted"].as_u64().unwrap_or(0);
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.expect("task");
    }
    (started.elapsed().as_secs_f64(), accepted)
}

async fn latencies(c: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = c.get(url).send().await.expect("get");
        assert_eq!(resp.status(), 200, "{url}");
        let _ = resp.bytes().await.expect("body");
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn row(name: &str, sorted: &[Duration]) {
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    println!(
        "{name:<44} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(sorted.last().copied())
    );
}

fn main() {
    let points = env_or("TALLY_BENCH_POINTS", 1_000_000);
    let series = env_or("TALLY_BENCH_SERIES", 1_000);
    let per_body = env_or("TALLY_BENCH_BODY", 10_000);
    let connections = env_or("TALLY_BENCH_CONNECTIONS", 4);
    let requests = env_or("TALLY_BENCH_REQUESTS", 300);
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = tally_bin();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    // 1. The burst, and request events through the same harness.
    let points_file = dir.path().join("points.ndjson");
    let ok = Command::new(&bin)
        .args(["gen", "--telemetry", "--count", &points.to_string()])
        .args(["--series", &series.to_string(), "--rate", "100000", "--out"])
        .arg(&points_file)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "tally gen --telemetry failed");
    let events_file = dir.path().join("events.ndjson");
    common::generate(&bin, points, 10_000, &events_file);
    let point_bodies = Arc::new(lines_of(&points_file, per_body));
    let event_bodies = Arc::new(lines_of(&events_file, per_body));
    let limits = "max_body_bytes = 16777216\n";
    for (name, path, bodies, sub) in [
        ("telemetry", "/v1/telemetry", point_bodies, "t"),
        ("request events (peer)", "/v1/events", event_bodies, "e"),
    ] {
        let sub = dir.path().join(sub);
        std::fs::create_dir_all(&sub).expect("dir");
        let (mut child, base) = start_tally(&sub, limits);
        let (secs, accepted) = runtime.block_on(burst(&base, path, bodies, connections));
        let hwm = vm_hwm_kib(child.id()).unwrap_or(0);
        println!(
            "{name:<24} {accepted:>9} accepted in {secs:6.2} s  {:>9.0} /s  peak RSS {:>5} MiB",
            accepted as f64 / secs,
            hwm / 1024
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    // 2. A day of one series at 1 s, queried at a 1-minute step.
    let sub = dir.path().join("q");
    std::fs::create_dir_all(&sub).expect("dir");
    let (mut child, base) = start_tally(&sub, limits);
    let day = 86_400_000i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let start = (now / day - 2) * day;
    runtime.block_on(async {
        let c = reqwest::Client::new();
        let mut bodies = Vec::new();
        let mut body = String::new();
        for s in 0..86_400i64 {
            let v = 50.0 + ((s * 7919) % 1000) as f64 / 100.0;
            body.push_str(&format!(
                "{{\"series\":\"day\",\"timestamp\":{},\"value\":{v}}}\n",
                start + s * 1000
            ));
            if s % 10_000 == 9_999 {
                bodies.push(std::mem::take(&mut body));
            }
        }
        bodies.push(body);
        let mut events = String::new();
        for m in 0..1440i64 {
            events.push_str(&format!(
                "{{\"client_id\":\"day\",\"endpoint\":\"/x\",\"status\":200,\"latency_ms\":5,\"timestamp\":{}}}\n",
                start + m * 60_000
            ));
        }
        for b in bodies {
            let r = c.post(format!("{base}/v1/telemetry")).body(b).send().await;
            assert_eq!(r.expect("post").status(), 202);
        }
        let r = c.post(format!("{base}/v1/events")).body(events).send().await;
        assert_eq!(r.expect("post").status(), 202);
        let iso = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        let range = format!("from={}&to={}", iso(start), iso(start + day));
        let query = format!("{base}/v1/telemetry/day?{range}&step=1m&agg=p95");
        let json: serde_json::Value = c
            .get(&query)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(json["points"].as_array().map(Vec::len), Some(1440));
        assert_eq!(json["summary"]["count"], 86_400);
        let history = format!("{base}/v1/clients/day/usage/history?{range}&granularity=minute");
        // Warm both once, then measure interleaved rounds.
        let _ = latencies(&c, &history, 5).await;
        let (mut q, mut h, mut live) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..10 {
            q.extend(latencies(&c, &query, requests / 10).await);
            h.extend(latencies(&c, &history, requests / 10).await);
            live.extend(latencies(&c, &format!("{base}/health/live"), requests / 10).await);
        }
        for v in [&mut q, &mut h, &mut live] {
            v.sort();
        }
        row("telemetry day, step 1m, p95 (1,440 buckets)", &q);
        row("usage history day, minute (1,440 buckets)", &h);
        row("GET /health/live (HTTP floor)", &live);
    });
    let _ = child.kill();
    let _ = child.wait();
}
