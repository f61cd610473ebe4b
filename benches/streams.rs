//! Top consumers and alert fan-out, end to end over loopback (run with
//! `cargo bench --bench streams`):
//!
//! 1. `GET /v1/usage/top` with TALLY_BENCH_TOP_CLIENTS (100,000) active
//!    clients today and yesterday: latency of the current period (the
//!    shards' in-memory rankings) and of the previous one (stored totals).
//! 2. Fan-out: TALLY_BENCH_SUBSCRIBERS (100) SSE subscribers while
//!    TALLY_BENCH_RATE (10,000) events/s are ingested for
//!    TALLY_BENCH_SECONDS (20) with `REQUEST_RECORDED` at rate 1, so every
//!    event goes to every subscriber. Reports what each subscriber
//!    received, how far behind the slowest was at the end, and the
//!    server's memory over the run.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{env_or, percentile, start_tally, vm_hwm_kib, vm_rss_kib};

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn post(http: &reqwest::Client, base: &str, body: String) {
    let r = http
        .post(format!("{base}/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("post events");
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
}

async fn top_consumers(http: &reqwest::Client) {
    let clients = env_or("TALLY_BENCH_TOP_CLIENTS", 100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, base) = start_tally(dir.path(), "");
    let now = now_ms();
    let today = now / DAY_MS * DAY_MS;
    // Every client twice yesterday and once today, with skewed volume.
    let started = Instant::now();
    for (day_start, span) in [(today - DAY_MS, DAY_MS - 1), (today, now - today)] {
        let mut lines = Vec::with_capacity(20_000);
        for k in 0..clients {
            let ts = day_start + (k as i64 * 7_919) % span.max(1);
            let n = 1 + 100_000 / (k + 1) % 5;
            lines.push(format!(
                r#"{{"client_id":"client-{k}","endpoint":"/v1/x","status":200,"request_bytes":{},"latency_ms":1,"timestamp":{ts}}}"#,
                100 * n
            ));
            if lines.len() == 20_000 {
                post(http, &base, lines.join("\n")).await;
                lines.clear();
            }
        }
        if !lines.is_empty() {
            post(http, &base, lines.join("\n")).await;
        }
    }
    println!(
        "top: ingested {} events over {clients} clients in {:.1} s",
        2 * clients,
        started.elapsed().as_secs_f64()
    );
    for (name, at) in [("current day", now), ("previous day", today - DAY_MS)] {
        let url = format!("{base}/v1/usage/top?period=day&at={at}&limit=10");
        let mut took = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let r = http.get(&url).send().await.expect("top");
            assert_eq!(r.status(), 200);
            let _ = r.bytes().await;
            took.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        println!(
            "top ({name}, {clients} clients): p50 {:.2} ms, p99 {:.2} ms",
            percentile(&took, 0.5).unwrap_or(0.0),
            percentile(&took, 0.99).unwrap_or(0.0)
        );
    }
    if let Some(rss) = vm_hwm_kib(child.id()) {
        println!("top: server peak RSS {:.1} MiB", rss as f64 / 1024.0);
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

async fn fan_out(http: &reqwest::Client) {
    let subscribers = env_or("TALLY_BENCH_SUBSCRIBERS", 100);
    let rate = env_or("TALLY_BENCH_RATE", 10_000);
    let seconds = env_or("TALLY_BENCH_SECONDS", 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, base) = start_tally(dir.path(), "[alerts]\nrequest_sample_rate = 1.0\n");
    let baseline_rss = vm_rss_kib(child.id()).unwrap_or(0);
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::new();
    for i in 0..subscribers {
        let url = format!("{base}/v1/alerts/stream?types=REQUEST_RECORDED");
        let received = received.clone();
        let client = reqwest::Client::new();
        let mut resp = client.get(url).send().await.expect("subscribe");
        assert_eq!(resp.status(), 200);
        readers.push(tokio::spawn(async move {
            // Count complete events (blocks that carry an `id:` line).
            let mut buffer = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                let mut n = 0;
                let mut consumed = 0;
                while let Some(end) = buffer[consumed..].find("\n\n") {
                    let block = &buffer[consumed..consumed + end];
                    if block.starts_with("id:") || block.contains("\nid:") {
                        n += 1;
                    }
                    consumed += end + 2;
                }
                buffer.drain(..consumed);
                received[i].fetch_add(n, Ordering::Relaxed);
            }
        }));
    }
    let batch = (rate / 10).max(1);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut peak_rss = 0i64;
    let ts0 = now_ms();
    for tick in 0..seconds * 10 {
        let due = started + Duration::from_millis(tick as u64 * 100);
        tokio::time::sleep_until(due.into()).await;
        let lines: Vec<String> = (0..batch)
            .map(|j| {
                let n = sent + j as u64;
                format!(
                    r#"{{"event_id":"f{n}","client_id":"client-{}","endpoint":"/v1/x","status":200,"latency_ms":1,"timestamp":{}}}"#,
                    n % 1000,
                    ts0 + (n as i64) / 10
                )
            })
            .collect();
        post(http, &base, lines.join("\n")).await;
        sent += batch as u64;
        peak_rss = peak_rss.max(vm_rss_kib(child.id()).unwrap_or(0));
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    // How long until the slowest subscriber has everything.
    let drain = Instant::now();
    loop {
        let slowest = received
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if slowest >= sent || drain.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak_rss = peak_rss.max(vm_rss_kib(child.id()).unwrap_or(0));
    }
    let counts: Vec<u64> = received.iter().map(|r| r.load(Ordering::Relaxed)).collect();
    let complete = counts.iter().filter(|&&c| c == sent).count();
    println!(
        "fan-out: {sent} events in {ingest_seconds:.1} s ({:.0}/s) to {subscribers} SSE subscribers \
         = {:.0} deliveries/s; {complete}/{subscribers} received all, min {} max {}; \
         slowest caught up {:.2} s after the last batch",
        sent as f64 / ingest_seconds,
        (counts.iter().sum::<u64>()) as f64 / (ingest_seconds + drain.elapsed().as_secs_f64()),
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
        drain.elapsed().as_secs_f64()
    );
    println!(
        "fan-out: server RSS {:.1} MiB before, peak {:.1} MiB during",
        baseline_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    for r in readers {
        r.abort();
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[tokio::main]
async fn main() {
    let http = reqwest::Client::new();
    top_consumers(&http).await;
    fan_out(&http).await;
}
