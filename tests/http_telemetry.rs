//! Telemetry over a real socket with RocksDB on disk, against references
//! computed here from the points the test sent (two-pass mean and
//! variance, sorted nearest-rank quantiles): every aggregation at steps
//! served by each stored resolution, the range summary, late and
//! duplicate points, the series bound, the list, correlation with another
//! series and with a client's usage, a kill -9 in the middle of a burst,
//! and drift and anomaly signals on the event channel.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::sse::SseReader;
use support::{client, encode_path, nearest_rank, Rng, Server, MINUTE};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Midnight UTC at least two days back: a whole day of points is in the
/// past, so none is ahead of the ingest clock.
fn day_start() -> i64 {
    let day = 86_400_000;
    (now_ms() / day - 2) * day
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Clone, Debug)]
struct P {
    series: &'static str,
    tags: Option<BTreeMap<&'static str, &'static str>>,
    ts: i64,
    value: f64,
    id: Option<String>,
}

fn line(p: &P) -> String {
    let mut v = json!({"series": p.series, "timestamp": p.ts, "value": p.value});
    if let Some(tags) = &p.tags {
        v["tags"] = json!(tags);
    }
    if let Some(id) = &p.id {
        v["point_id"] = json!(id);
    }
    v.to_string()
}

async fn post(c: &reqwest::Client, server: &Server, points: &[P]) -> Value {
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

async fn get(c: &reqwest::Client, url: String) -> (u16, Value) {
    let resp = c.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The reference of one step: the values of the points inside it.
fn reference(values: &[(i64, f64)], agg: &str) -> Option<f64> {
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

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-12)
}

/// Checks every step of a query against the reference over `points`.
fn check_steps(json: &Value, points: &[(i64, f64)], step: i64, agg: &str, ctx: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_aggregation_and_step_equals_a_reference_over_the_points() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let start = day_start();
    let mut rng = Rng::new(17);
    let host_a = BTreeMap::from([("host", "a"), ("region", "eu")]);
    // A day of points every 7 s: values near 1e9 with 1e-3 noise (the
    // case that cancels catastrophically in a naive sum of squares), and
    // a series of both signs around zero.
    let mut points = Vec::new();
    for i in 0..(86_400_000 / 7_000) {
        let ts = start + i * 7_000 + rng.below(7_000) as i64;
        points.push(P {
            series: "cpu",
            tags: Some(host_a.clone()),
            ts,
            value: 1e9 + (rng.unit() - 0.5) * 1e-3,
            id: None,
        });
        points.push(P {
            series: "temp",
            tags: None,
            ts,
            value: (rng.unit() - 0.5) * 40.0,
            id: None,
        });
    }
    for chunk in points.chunks(5_000) {
        let r = post(&c, &server, chunk).await;
        assert_eq!(r["accepted"], chunk.len() as u64, "{r}");
    }
    let cpu: Vec<(i64, f64)> = points
        .iter()
        .filter(|p| p.series == "cpu")
        .map(|p| (p.ts, p.value))
        .collect();
    let temp: Vec<(i64, f64)> = points
        .iter()
        .filter(|p| p.series == "temp")
        .map(|p| (p.ts, p.value))
        .collect();
    let (from, to) = (rfc3339(start), rfc3339(start + 86_400_000));
    // Served by 10 s, 1 min and 1 h buckets; every aggregation.
    for (step, step_ms, resolution_ms) in [
        ("30s", 30_000, 10_000),
        ("1m", 60_000, 60_000),
        ("5m", 300_000, 60_000),
        ("2h", 7_200_000, 3_600_000),
    ] {
        for agg in [
            "mean", "median", "min", "max", "first", "last", "sum", "count", "stddev", "p95", "p99",
        ] {
            let (status, json) = get(
                &c,
                server.url(&format!(
                    "/v1/telemetry/temp?from={}&to={}&step={step}&agg={agg}",
                    encode_path(&from),
                    encode_path(&to)
                )),
            )
            .await;
            assert_eq!(status, 200, "{json}");
            assert_eq!(json["resolution_ms"], resolution_ms);
            check_steps(&json, &temp, step_ms, agg, &format!("temp {step} {agg}"));
        }
    }
    // The near-1e9 series by its name and tags, and by its listed key.
    let by_tags = server.url(&format!(
        "/v1/telemetry/cpu?from={}&to={}&step=1m&agg=stddev&tags.region=eu&tags.host=a",
        encode_path(&from),
        encode_path(&to)
    ));
    let (status, json) = get(&c, by_tags).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["series"], "cpu{host=a,region=eu}");
    check_steps(&json, &cpu, 60_000, "stddev", "cpu stddev");
    let by_key = server.url(&format!(
        "/v1/telemetry/{}?from={}&to={}&step=1m&agg=stddev",
        encode_path("cpu{host=a,region=eu}"),
        encode_path(&from),
        encode_path(&to)
    ));
    assert_eq!(get(&c, by_key).await.1, json);
    // The summary of the whole range, against a two-pass reference.
    let s = &json["summary"];
    let n = cpu.len() as f64;
    let shift = cpu[0].1;
    let mean_dev = cpu.iter().map(|p| p.1 - shift).sum::<f64>() / n;
    let mean = shift + mean_dev;
    let variance = cpu
        .iter()
        .map(|p| (p.1 - shift - mean_dev).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    assert_eq!(s["count"], cpu.len() as u64);
    assert!(close(s["mean"].as_f64().unwrap(), mean, 1e-12), "{s}");
    assert!(
        close(s["variance"].as_f64().unwrap(), variance, 1e-9),
        "{s} vs {variance}"
    );
    let mut sorted: Vec<f64> = cpu.iter().map(|p| p.1).collect();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(s["min"].as_f64().unwrap(), sorted[0]);
    assert_eq!(s["max"].as_f64().unwrap(), sorted[sorted.len() - 1]);
    for (q, name) in [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")] {
        assert!(close(
            s[name].as_f64().unwrap(),
            nearest_rank(&sorted, q),
            0.01
        ));
    }
    // A step that no resolution divides is refused with the ones that do.
    let (status, json) = get(
        &c,
        server.url(&format!(
            "/v1/telemetry/temp?from={}&to={}&step=7s",
            encode_path(&from),
            encode_path(&to)
        )),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        json.to_string().contains("multiple of a stored resolution"),
        "{json}"
    );
    let (status, _) = get(&c, server.url("/v1/telemetry/temp?agg=average")).await;
    assert_eq!(status, 400);

    // Late and duplicate points: the clock is at the last point; the
    // default lateness is 5 minutes.
    let last = points.iter().map(|p| p.ts).max().unwrap();
    let mk = |ts: i64, value: f64, id: Option<&str>| P {
        series: "temp",
        tags: None,
        ts,
        value,
        id: id.map(str::to_string),
    };
    let r = post(
        &c,
        &server,
        &[
            mk(last - 6 * MINUTE, 1_000.0, None),
            mk(last - 4 * MINUTE, 500.0, Some("once")),
            mk(last - 4 * MINUTE, 500.0, Some("once")),
        ],
    )
    .await;
    assert_eq!(
        (r["accepted"].as_u64(), r["late"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    assert_eq!(r["duplicates"], 1);
    // The late point is a dead letter; the one inside the lateness is in
    // exactly its buckets.
    let (_, dl) = get(&c, server.url("/v1/dead-letters")).await;
    assert!(dl.to_string().contains("late: point time"), "{dl}");
    let minute = last - 4 * MINUTE - (last - 4 * MINUTE).rem_euclid(MINUTE);
    let (_, json) = get(
        &c,
        server.url(&format!(
            "/v1/telemetry/temp?from={}&to={}&step=1m&agg=max",
            encode_path(&rfc3339(minute)),
            encode_path(&rfc3339(minute + MINUTE))
        )),
    )
    .await;
    assert_eq!(json["points"][0]["value"], 500.0, "{json}");

    // The list: every series, by prefix, a page at a time.
    let (_, all) = get(&c, server.url("/v1/telemetry")).await;
    assert_eq!(all["series"], json!(["cpu{host=a,region=eu}", "temp"]));
    let (_, page) = get(&c, server.url("/v1/telemetry?limit=1")).await;
    assert_eq!(page["series"], json!(["cpu{host=a,region=eu}"]));
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = get(
        &c,
        server.url(&format!(
            "/v1/telemetry?limit=1&cursor={}",
            encode_path(&cursor)
        )),
    )
    .await;
    assert_eq!(rest["series"], json!(["temp"]));
    assert!(rest.get("next_cursor").is_none());
    let (_, pre) = get(&c, server.url("/v1/telemetry?prefix=te")).await;
    assert_eq!(pre["series"], json!(["temp"]));

    // The same statistics after a restart.
    let url = server.url(&format!(
        "/v1/telemetry/temp?from={}&to={}&step=5m&agg=p99",
        encode_path(&from),
        encode_path(&to)
    ));
    let before = get(&c, url).await.1;
    server.stop();
    let server = Server::start(&dir.path().join("data"), &[]);
    let after = get(
        &c,
        server.url(&format!(
            "/v1/telemetry/temp?from={}&to={}&step=5m&agg=p99",
            encode_path(&from),
            encode_path(&to)
        )),
    )
    .await
    .1;
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_points_are_refused_one_by_one_and_new_series_beyond_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(&config, "partitions = 1\n[telemetry]\nmax_series = 2\n").unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let c = client();
    let t = day_start();
    let body = format!(
        "{}\n{{\"series\":\"a\",\"timestamp\":{t},\"value\":\"NaN\"}}\n[1]\n{}\n{}\n{}\n",
        json!({"series":"a","timestamp":t,"value":1}),
        json!({"series":"b","timestamp":t,"value":2}),
        json!({"series":"c","timestamp":t,"value":3}),
        json!({"series":"a","timestamp":t + 1,"value":4}),
    );
    let resp = c
        .post(server.url("/v1/telemetry"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["accepted"], 3, "{r}");
    assert_eq!(r["rejected"], 2);
    assert_eq!(r["over_series_limit"], 1);
    let indices: Vec<u64> = r["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [1, 2]);
    // CloudEvents of type tally.telemetry.v1: id and time fill in.
    let ce = json!([{"specversion":"1.0","type":"tally.telemetry.v1","source":"svc","id":"p1",
        "time": rfc3339(t + 5), "data":{"series":"b","value":7}},
        {"specversion":"1.0","type":"tally.telemetry.v1","source":"svc","id":"p1",
        "time": rfc3339(t + 5), "data":{"series":"b","value":7}}]);
    let r: Value = c
        .post(server.url("/v1/telemetry"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(ce.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["accepted"].as_u64(), r["duplicates"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let (_, json) = get(
        &c,
        server.url(&format!(
            "/v1/telemetry/b?from={}&to={}&step=1m&agg=sum",
            encode_path(&rfc3339(t)),
            encode_path(&rfc3339(t + MINUTE))
        )),
    )
    .await;
    assert_eq!(json["points"][0]["value"], 9.0, "{json}");
    let (_, list) = get(&c, server.url("/v1/telemetry")).await;
    assert_eq!(list["series"], json!(["a", "b"]));
    // A body without point ids, retried with its Idempotency-Key, counts
    // once; the same points under another key are other points.
    let body = format!(
        "{}\n{}\n",
        json!({"series":"a","timestamp":t + 10,"value":100}),
        json!({"series":"a","timestamp":t + 11,"value":100})
    );
    let mut accepted = Vec::new();
    for key in ["k-1", "k-1", "k-2"] {
        let r: Value = c
            .post(server.url("/v1/telemetry"))
            .header("idempotency-key", key)
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        accepted.push((r["accepted"].as_u64(), r["duplicates"].as_u64()));
    }
    assert_eq!(
        accepted,
        [(Some(2), Some(0)), (Some(0), Some(2)), (Some(2), Some(0))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_with_a_series_and_with_a_clients_usage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let start = day_start();
    let mut rng = Rng::new(3);
    // Two hours by the minute: `load` follows `traffic` (2x + 3 + noise),
    // and client `shop` sends `traffic` requests each minute.
    let mut points = Vec::new();
    let mut events = String::new();
    let mut pairs = Vec::new();
    for m in 0..120 {
        let ts = start + m * MINUTE + 30_000;
        let traffic = 5 + rng.below(20) as i64;
        let load = 2.0 * traffic as f64 + 3.0 + (rng.unit() - 0.5);
        pairs.push((traffic as f64, load));
        points.push(P {
            series: "load",
            tags: None,
            ts,
            value: load,
            id: None,
        });
        for i in 0..traffic {
            events.push_str(
                &json!({"client_id":"shop","endpoint":"/buy","status":200,"latency_ms":5,
                    "timestamp": ts + i})
                .to_string(),
            );
            events.push('\n');
        }
    }
    post(&c, &server, &points).await;
    let resp = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(events)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // Pearson's r, two-pass.
    let n = pairs.len() as f64;
    let (mx, my) = (
        pairs.iter().map(|p| p.0).sum::<f64>() / n,
        pairs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = pairs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let vx: f64 = pairs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let vy: f64 = pairs.iter().map(|p| (p.1 - my).powi(2)).sum();
    let want = cov / (vx * vy).sqrt();
    let range = format!(
        "from={}&to={}",
        encode_path(&rfc3339(start)),
        encode_path(&rfc3339(start + 120 * MINUTE))
    );
    let (status, json) = get(
        &c,
        server.url(&format!(
            "/v1/telemetry/correlate?a=usage:shop:requests&b=load&{range}&limit=50"
        )),
    )
    .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["matched"], 120);
    assert!(
        close(json["pearson_r"].as_f64().unwrap(), want, 1e-9),
        "{json} vs {want}"
    );
    assert_eq!(json["pairs"].as_array().unwrap().len(), 50);
    assert_eq!(json["pairs"][0]["a"], pairs[0].0);
    // The pages together are every pair once.
    let mut seen = 50;
    let mut cursor = json["next_cursor"].as_i64().unwrap();
    loop {
        let (_, page) = get(
            &c,
            server.url(&format!(
                "/v1/telemetry/correlate?a=usage:shop:requests&b=load&{range}&limit=50&cursor={cursor}"
            )),
        )
        .await;
        seen += page["pairs"].as_array().unwrap().len();
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(seen, 120);
    // A series with itself, shifted within the tolerance: r = 1.
    let (_, json) = get(
        &c,
        server.url(&format!(
            "/v1/telemetry/correlate?a=load&b=load&{range}&tolerance_ms=0"
        )),
    )
    .await;
    assert!(
        close(json["pearson_r"].as_f64().unwrap(), 1.0, 1e-12),
        "{json}"
    );
    let (status, json) = get(
        &c,
        server.url("/v1/telemetry/correlate?a=usage:shop:bytes&b=load"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(json.to_string().contains("unknown usage measure"), "{json}");
}

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
