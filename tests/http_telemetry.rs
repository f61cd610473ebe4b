//! Telemetry over a real socket with RocksDB on disk, against references
//! computed here from the points the test sent (two-pass mean and
//! variance, sorted nearest-rank quantiles): every aggregation at steps
//! served by each stored resolution, the range summary, late and
//! duplicate points, the series bound, the list, and correlation with
//! another series and with a client's usage. A kill during a burst and
//! the drift and anomaly signals: `http_telemetry_signals.rs`.

mod support;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use support::telemetry::*;
use support::{client, encode_path, nearest_rank, Rng, Server, MINUTE};

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
