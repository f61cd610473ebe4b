//! Billing report latency (run with `cargo bench --bench billing`): one
//! client with a month (30 days) of minute data over 50 endpoints (one
//! event per endpoint and minute, 2.16M events, ingested over HTTP in
//! time order), a priced plan with compute weights, then the month's
//! report requested N times (default 200) while the period is open (so it
//! is built every time, as it would be before closing). Prints p50/p99/max
//! beside the usage query of the same month in the same run (the floor of
//! reading the month's buckets).
//!
//! Second phase, the all-clients export: 100,000 clients with usage over
//! a month (10 events each, 1M events in time order over HTTP, 1,000 of
//! them on a priced plan), then `GET /v1/reports/billing` for that month
//! twice: the first closes every client's period (builds and stores each
//! report), the second reads the stored reports. Prints time, records,
//! bytes and the server's RSS sampled during each, beside the floor of
//! asking one client at a time (a sample of per-client usage queries,
//! scaled to all clients).
//!
//! Knobs: TALLY_BENCH_DAYS (30), TALLY_BENCH_ENDPOINTS (50),
//! TALLY_BENCH_REQUESTS (200), TALLY_BENCH_EXPORT_CLIENTS (100000),
//! TALLY_BENCH_EXPORT_EVENTS (10 per client), TALLY_BENCH_EXPORT_PLANNED
//! (1000).

mod common;

use std::time::{Duration, Instant};

use common::{env_or, percentile, start_tally, vm_hwm_kib, vm_rss_kib};

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
    export_phase(&runtime);
}

fn export_phase(runtime: &tokio::runtime::Runtime) {
    let clients = env_or("TALLY_BENCH_EXPORT_CLIENTS", 100_000) as u64;
    let per_client = env_or("TALLY_BENCH_EXPORT_EVENTS", 10) as u64;
    let planned = env_or("TALLY_BENCH_EXPORT_PLANNED", 1000) as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    // The default close delay: November (2026) is closed by now, so the
    // first export closes every client's period.
    let (mut child, base) = start_tally(dir.path(), "[retention]\nminute = \"40d\"\n");
    let mut pid = child.id();
    let start: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    let month: i64 = 30 * 86_400_000;
    runtime.block_on(async {
        let c = reqwest::Client::new();
        let plan = serde_json::json!({
            "free_requests": 5,
            "prices": {"requests": [{"up_to": null, "unit_price": "0.001"}]},
            "currency": "USD"
        });
        let ok = |r: reqwest::Response| assert!(r.status().is_success(), "{}", r.status());
        ok(c.put(format!("{base}/v1/plans/small")).json(&plan).send().await.expect("plan"));
        let client = |i: u64| format!("tenant-{:06}", i.wrapping_mul(2_654_435_761) % clients);
        for i in 0..planned.min(clients) {
            ok(c
                .put(format!("{base}/v1/clients/{}/plan", client(i)))
                .json(&serde_json::json!({"plan_id": "small", "effective_from": 0}))
                .send()
                .await
                .expect("assign"));
        }
        let t = Instant::now();
        let events = clients * per_client;
        let mut body = String::new();
        for i in 0..events {
            // In time order across the month; every client `per_client`
            // times (i % clients runs over all clients each round).
            let ts = start + (i as i128 * month as i128 / events as i128) as i64;
            body.push_str(&format!(
                "{{\"client_id\":\"{}\",\"endpoint\":\"/v1/items/{{id}}\",\"status\":{},\"request_bytes\":{},\"response_bytes\":500,\"latency_ms\":{},\"timestamp\":{ts}}}\n",
                client(i % clients),
                if i % 53 == 0 { 500 } else { 200 },
                100 + i % 900,
                3 + i % 40,
            ));
            if i % 20_000 == 19_999 || i + 1 == events {
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
            "export phase: ingested {events} events over {clients} clients ({planned} on a plan) in {:.1?}; server RSS {:.1} MiB",
            t.elapsed(),
            vm_rss_kib(pid).unwrap_or(0) as f64 / 1024.0
        );
        let closing = export_run(&c, &base, pid, "period=2026-11-15", clients).await;
        println!(
            "export run 1 (the instance that ingested; closing every period): {closing}"
        );
        // A fresh instance over the same data: what the export itself
        // holds, without the ingest's in-memory state.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let _ = child.wait();
        let (restarted, fresh) = start_tally(dir.path(), "[retention]\nminute = \"40d\"\n");
        child = restarted;
        let base = fresh;
        pid = child.id();
        println!(
            "export phase: restarted on the same data; server RSS {:.1} MiB",
            vm_rss_kib(pid).unwrap_or(0) as f64 / 1024.0
        );
        let stored = export_run(&c, &base, pid, "period=2026-11-15", clients).await;
        println!("export run 2 (fresh instance; stored reports): {stored}");
        let built = export_run(
            &c,
            &base,
            pid,
            "from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z",
            clients,
        )
        .await;
        println!("export run 3 (fresh instance; a from/to range, built for every client): {built}");
        // The floor: one request per client instead (a sample, scaled).
        let sample = 1000.min(clients);
        let t = Instant::now();
        for i in 0..sample {
            let r = c
                .get(format!(
                    "{base}/v1/clients/{}/usage?period=month&at=2026-11-15T00:00:00Z",
                    client(i)
                ))
                .send()
                .await
                .expect("usage");
            assert_eq!(r.status(), 200);
            let _ = r.bytes().await;
        }
        let each = t.elapsed().as_secs_f64() / sample as f64;
        println!(
            "floor, one usage query per client: {:.2} ms each, {:.1} s for all {clients} clients (from {sample})",
            each * 1e3,
            each * clients as f64
        );
    });
    println!(
        "export phase: the fresh instance's peak RSS over its whole life (VmHWM) {:.1} MiB",
        vm_hwm_kib(pid).unwrap_or(0) as f64 / 1024.0
    );
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// One export, summarised: records, size, rate, the server's RSS peak.
async fn export_run(
    c: &reqwest::Client,
    base: &str,
    pid: u32,
    query: &str,
    clients: u64,
) -> String {
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(vm_rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let t = Instant::now();
    let mut r = c
        .get(format!("{base}/v1/reports/billing?{query}"))
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200);
    let (mut bytes, mut records) = (0usize, 0usize);
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        bytes += chunk.len();
        records += chunk.iter().filter(|b| **b == b'\n').count();
    }
    let took = t.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = peak.join().unwrap_or(0);
    assert_eq!(records as u64, clients, "every client once");
    format!(
        "{records} clients, {:.1} MB NDJSON in {:.1} s = {:.0} clients/s; server RSS peak during it {:.1} MiB",
        bytes as f64 / 1e6,
        took.as_secs_f64(),
        records as f64 / took.as_secs_f64(),
        peak as f64 / 1024.0
    )
}
