//! Bounded memory, proved on one run: 2,000,000 distinct clients and
//! 100,000 distinct endpoints (a few events each, plus a handful of heavy
//! clients), with anomaly detection and top consumers on, keep the
//! server's peak RSS within the budget its configuration states, while
//! usage and top-consumer answers stay exact against a reference computed
//! here by a plain loop.
//!
//! The budget (768 MiB) is what this configuration bounds: RocksDB
//! memtables (128 MiB in all) and block cache (32 MiB), 100,000 limiters,
//! 50,000 detectors, rankings of 24,000 clients each, 1,000,000 dedupe
//! ids, bounded mailboxes and ingest bodies in flight, and the minutes
//! waiting to be judged (one entry per client and minute within the
//! allowed lateness).

mod support;

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde_json::Value;
use support::*;

const CLIENTS: u64 = 2_000_000;
const ENDPOINTS: u64 = 100_000;
const HEAVY: u64 = 12;
const BUDGET_MIB: u64 = 768;
const BATCH: usize = 20_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

/// One event: (client, endpoint, bytes).
fn events() -> Vec<(String, u64, u64)> {
    let mut rng = Rng::new(2026);
    let mut out = Vec::with_capacity(4_100_000);
    for i in 0..CLIENTS {
        for _ in 0..1 + i % 3 {
            out.push((format!("m-{i}"), rng.below(ENDPOINTS), rng.below(5_000)));
        }
    }
    // Heavy clients with distinct totals, so the top ten is well defined.
    for h in 0..HEAVY {
        for _ in 0..(800 + h * 37) {
            out.push((format!("heavy-{h}"), rng.below(ENDPOINTS), rng.below(5_000)));
        }
    }
    // Interleave (deterministically) so heavy clients' events are spread.
    let n = out.len();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        out.swap(i, j);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_million_clients_stay_within_the_memory_budget_with_exact_answers() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        "dedupe_max_ids = 1000000\n[limits]\nmax_clients = 100000\n[memory]\ndetectors = 50000\nranked_clients = 24000\nmemtable_bytes = 134217728\nblock_cache_bytes = 33554432\n",
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let c = client();
    let began = std::time::Instant::now();
    let all = events();
    // Event times over the last 20 minutes, ascending, within today.
    let now = now_ms();
    let start = (now - 20 * MINUTE).max(now - now.rem_euclid(DAY));
    let span = (now - start).max(1);
    let n = all.len() as i64;
    let mut reference: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut bodies = Vec::new();
    for (chunk_no, chunk) in all.chunks(BATCH).enumerate() {
        let mut body = String::with_capacity(chunk.len() * 160);
        for (k, (client, endpoint, bytes)) in chunk.iter().enumerate() {
            let i = (chunk_no * BATCH + k) as i64;
            let ts = start + i * span / n;
            body.push_str(&format!(
                "{{\"event_id\":\"{chunk_no}-{k}\",\"client_id\":\"{client}\",\"endpoint\":\"/v1/e/{endpoint}\",\"status\":200,\"request_bytes\":{bytes},\"latency_ms\":3,\"timestamp\":{ts}}}\n"
            ));
            let r = reference.entry(client.as_str()).or_default();
            r.0 += 1;
            r.1 += bytes;
        }
        bodies.push(body);
    }
    // Two connections, in order within each.
    let halves: Vec<Vec<String>> = {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (i, body) in bodies.into_iter().enumerate() {
            if i % 2 == 0 {
                a.push(body)
            } else {
                b.push(body)
            }
        }
        vec![a, b]
    };
    let url = server.url("/v1/events");
    let accepted: Vec<u64> = join_all(halves.into_iter().map(|bodies| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let mut accepted = 0;
            for body in bodies {
                let r = c
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                let v: Value = r.json().await.unwrap();
                accepted += v["accepted"].as_u64().unwrap();
            }
            accepted
        }
    }))
    .await;
    let accepted: u64 = accepted.iter().sum();
    eprintln!("ingested in {:?} (since the start)", began.elapsed());
    assert_eq!(accepted, all.len() as u64, "every event accepted once");

    let peak = peak_rss_mib(server.child.id());
    eprintln!(
        "{} events, {} clients, {ENDPOINTS} endpoints: server peak RSS {peak} MiB (budget {BUDGET_MIB} MiB)",
        all.len(),
        reference.len()
    );
    assert!(
        peak <= BUDGET_MIB,
        "peak RSS {peak} MiB over the {BUDGET_MIB} MiB budget"
    );

    // Usage: every heavy client and a sample of 3,000 others, exact.
    let mut rng = Rng::new(7);
    let mut sample: Vec<String> = (0..HEAVY).map(|h| format!("heavy-{h}")).collect();
    sample.extend((0..3_000).map(|_| format!("m-{}", rng.below(CLIENTS))));
    for client in &sample {
        let v: Value = c
            .get(server.url(&format!("/v1/clients/{client}/usage?period=day")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (requests, bytes) = reference[client.as_str()];
        assert_eq!(
            v["total_requests"].as_u64(),
            Some(requests),
            "{client}: {v}"
        );
        assert_eq!(
            v["total_data_transfer_bytes"].as_u64(),
            Some(bytes),
            "{client}: {v}"
        );
    }

    eprintln!("usage checked at {:?}", began.elapsed());
    // Top consumers of the day, exact.
    let mut want: Vec<(&str, u64)> = reference.iter().map(|(c, r)| (*c, r.0)).collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    want.truncate(10);
    let v: Value = c
        .get(server.url("/v1/usage/top?period=day&limit=10"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<(String, u64)> = v["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["client_id"].as_str().unwrap().to_string(),
                e["metric_value"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = want.into_iter().map(|(c, n)| (c.to_string(), n)).collect();
    assert_eq!(got, want);
    assert_eq!(v["total"].as_u64(), Some(all.len() as u64), "{v}");
    eprintln!("top checked at {:?}", began.elapsed());
    let peak_after = peak_rss_mib(server.child.id());
    assert!(
        peak_after <= BUDGET_MIB,
        "peak RSS {peak_after} MiB after the queries"
    );
    server.stop();
}
