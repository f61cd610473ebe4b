//! Billing report latency (run with `cargo bench --bench billing`): one
//! client with a month (30 days) of minute data over 50 endpoints (one
//! event per endpoint and minute, 2.16M events, ingested over HTTP in
//! time order), a priced plan with compute weights, then the month's
//! report requested N times (default 200) while the period is open (so it
//! is built every time, as it would be before closing). Prints p50/p99/max
//! beside the usage query of the same month in the same run (the floor of
//! reading the month's buckets).
//!
//! Knobs: TALLY_BENCH_DAYS (30), TALLY_BENCH_ENDPOINTS (50),
//! TALLY_BENCH_REQUESTS (200).

mod common;

use std::time::{Duration, Instant};

use common::{env_or, percentile, start_tally, vm_hwm_kib};

fn main() {
    let days = env_or("TALLY_BENCH_DAYS", 30) as i64;
    let endpoints = env_or("TALLY_BENCH_ENDPOINTS", 50);
    let requests = env_or("TALLY_BENCH_REQUESTS", 200);
    let dir = tempfile::tempdir().expect("tempdir");
    // Closing delay long: the month stays open (built on every request)
    // until the second phase.
    let (mut child, base) = start_tally(
        dir.path(),
        "billing_close_delay = \"36500d\"\n[retention]\nminute = \"40d\"\n",
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // The month: November 2026, UTC.
    let start: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    runtime.block_on(async {
        let c = reqwest::Client::new();
        let weights: serde_json::Map<String, serde_json::Value> = (0..endpoints)
            .filter(|e| e % 5 == 0)
            .map(|e| (format!("/v1/e{e}/{{id}}"), serde_json::json!(3)))
            .collect();
        let plan = serde_json::json!({
            "free_requests": 100_000,
            "included_data_transfer_bytes": 1_000_000_000u64,
            "compute_unit_weights": weights,
            "prices": {
                "requests": [{"up_to": 1_000_000, "unit_price": "0.0001"}, {"up_to": null, "unit_price": "0.00005"}],
                "data_transfer_gb": [{"up_to": null, "unit_price": "0.09"}],
                "compute_units": [{"up_to": null, "unit_price": "0.00001"}]
            },
            "currency": "USD"
        });
        let ok = |r: reqwest::Response| assert!(r.status().is_success(), "{}", r.status());
        ok(c.put(format!("{base}/v1/plans/pro")).json(&plan).send().await.expect("plan"));
        ok(c
            .put(format!("{base}/v1/clients/bench/plan"))
            .json(&serde_json::json!({"plan_id": "pro", "effective_from": 0}))
            .send()
            .await
            .expect("assign"));
        let t = Instant::now();
        let minutes = days * 1440;
        let mut sent = 0u64;
        let mut body = String::new();
        for m in 0..minutes {
            for e in 0..endpoints {
                let ts = start + m * 60_000 + (e as i64 * 997) % 60_000;
                body.push_str(&format!(
                    "{{\"client_id\":\"bench\",\"endpoint\":\"/v1/e{e}/{{id}}\",\"status\":{},\"request_bytes\":{},\"response_bytes\":900,\"latency_ms\":{},\"timestamp\":{ts}}}\n",
                    if (m + e as i64) % 97 == 0 { 503 } else { 200 },
                    100 + e,
                    5 + (m % 40) as usize + e
                ));
                sent += 1;
            }
            if m % 400 == 399 || m + 1 == minutes {
                let r = c
                    .post(format!("{base}/v1/events"))
                    .header("content-type", "application/x-ndjson")
                    .body(std::mem::take(&mut body))
                    .send()
                    .await
                    .expect("ingest");
                assert_eq!(r.status(), 202);
            }
        }
        println!(
            "ingested {sent} events ({days} days x 1440 minutes x {endpoints} endpoints) in {:.1?}",
            t.elapsed()
        );
        let time = |url: String| {
            let c = c.clone();
            async move {
                let mut ms = Vec::with_capacity(requests);
                for _ in 0..requests {
                    let t = Instant::now();
                    let r = c.get(&url).send().await.expect("get");
                    assert_eq!(r.status(), 200);
                    let _ = r.bytes().await.expect("body");
                    ms.push(t.elapsed());
                }
                ms.sort();
                ms
            }
        };
        let show = |what: &str, ms: &[Duration]| {
            println!(
                "{what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests)",
                percentile(ms, 0.5).unwrap_or_default().as_secs_f64() * 1e3,
                percentile(ms, 0.99).unwrap_or_default().as_secs_f64() * 1e3,
                ms.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                ms.len()
            )
        };
        let report = format!("{base}/v1/clients/bench/reports/billing?period=2026-11-15");
        let usage = format!("{base}/v1/clients/bench/usage?period=month&at=2026-11-15T00:00:00Z");
        show("usage query, same month (floor)", &time(usage).await);
        show("billing report, open month (built each time)", &time(report.clone()).await);
        let sample: serde_json::Value = c
            .get(&report)
            .send()
            .await
            .expect("report")
            .json()
            .await
            .expect("json");
        println!(
            "report: {} requests, {} lines, total {}",
            sample["summary"]["total_requests"],
            sample["lines"].as_array().map_or(0, |l| l.len()),
            sample["total_amount"]
        );
    });
    let rss = vm_hwm_kib(child.id()).unwrap_or(0);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!("server peak RSS {:.1} MiB", rss as f64 / 1024.0);
}
