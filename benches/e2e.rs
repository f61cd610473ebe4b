//! End-to-end throughput harness (run with `cargo bench --bench e2e`):
//! generates N events (default 1,000,000 over 10,000 clients) with
//! `tally gen`, then measures
//!   1. `tally replay` events/s and peak RSS, RocksDB on;
//!   2. `POST /v1/events` NDJSON events/s over loopback and the server's
//!      peak RSS, with several concurrent connections: open (no key
//!      exists), then keyed (an `ingest` key made with `tally keys
//!      create`, sent on every request), so the access layer's cost on
//!      the ingest path is seen beside the same run without it.
//!
//! Knobs: TALLY_BENCH_EVENTS, TALLY_BENCH_CLIENTS, TALLY_BENCH_BATCH,
//! TALLY_BENCH_CONNECTIONS.

mod common;

use common::{env_or, generate, vm_hwm_kib};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

/// Waits for a child with wait4 to read its own peak RSS (KiB).
fn wait_with_rss(child: std::process::Child) -> (i32, i64) {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    std::mem::forget(child);
    (status, usage.ru_maxrss)
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let bin = common::tally_bin();
    let bin = bin.as_str();
    let events = env_or("TALLY_BENCH_EVENTS", 1_000_000);
    let clients = env_or("TALLY_BENCH_CLIENTS", 10_000);
    let batch = env_or("TALLY_BENCH_BATCH", 20_000);
    let connections = env_or("TALLY_BENCH_CONNECTIONS", 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.ndjson");

    let t = Instant::now();
    generate(bin, events, clients, &file);
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "generated {events} events over {clients} clients ({:.1} MB) in {:.2?}",
        size as f64 / 1e6,
        t.elapsed()
    );

    replay(bin, &file, &dir.path().join("replay"), events);
    for keyed in [false, true] {
        let data = dir.path().join(if keyed { "http-keyed" } else { "http" });
        let key = keyed.then(|| ingest_key(bin, &data));
        http(bin, &file, &data, events, batch, connections, key);
    }
}

/// An `ingest` key, made offline in `data` (`tally keys create`).
fn ingest_key(bin: &str, data: &Path) -> String {
    let out = Command::new(bin)
        .args([
            "keys",
            "create",
            "--name",
            "bench",
            "--scopes",
            "ingest",
            "--data-dir",
        ])
        .arg(data)
        .output()
        .expect("run tally keys create");
    assert!(out.status.success(), "tally keys create failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn replay(bin: &str, file: &Path, data: &Path, events: usize) {
    let t = Instant::now();
    let child = Command::new(bin)
        .arg("replay")
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .args(["--json", "--log-format", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tally replay");
    let mut child = child;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    let (status, rss_kib) = wait_with_rss(child);
    let wall = t.elapsed();
    assert_eq!(status, 0, "tally replay failed");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    println!(
        "replay: {events} events in {:.2?} process wall (incl. startup and final sync) = {:.0} events/s; engine-reported {:.0} events/s; peak RSS {:.1} MiB",
        wall,
        events as f64 / wall.as_secs_f64(),
        summary["lines_per_second"].as_f64().unwrap_or(0.0),
        rss_kib as f64 / 1024.0
    );
}

fn http(
    bin: &str,
    file: &Path,
    data: &Path,
    events: usize,
    batch: usize,
    connections: usize,
    key: Option<String>,
) {
    let keyed = key.is_some();
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tally serve");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("listening line");
    let base = line.trim().trim_start_matches("listening on ").to_string();

    let text = std::fs::read_to_string(file).expect("read events");
    let lines: Vec<&str> = text.lines().collect();
    let bodies: Vec<String> = lines.chunks(batch).map(|c| c.join("\n")).collect();
    drop(lines);
    let bodies = Arc::new(bodies);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let t = Instant::now();
    let accepted: u64 = runtime.block_on(async {
        let client = reqwest::Client::new();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (client, next, bodies, url, key) = (
                client.clone(),
                next.clone(),
                bodies.clone(),
                format!("{base}/v1/events"),
                key.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut accepted = 0u64;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    loop {
                        let mut req = client
                            .post(&url)
                            .header("content-type", "application/x-ndjson");
                        if let Some(key) = &key {
                            req = req.bearer_auth(key);
                        }
                        let resp = req.body(body.clone()).send().await.expect("post");
                        if resp.status() == 503 {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            continue;
                        }
                        assert_eq!(resp.status(), 202);
                        let v: serde_json::Value = resp.json().await.expect("json");
                        accepted += v["accepted"].as_u64().unwrap_or(0);
                        break;
                    }
                }
                accepted
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        total
    });
    let wall = t.elapsed();
    let rss = vm_hwm_kib(child.id()).unwrap_or(0);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!(
        "http ingest ({}): {events} events ({accepted} accepted) in {:.2?} over {connections} connections, {batch} events/request = {:.0} events/s; server peak RSS {:.1} MiB",
        if keyed { "keyed" } else { "open" },
        wall,
        events as f64 / wall.as_secs_f64(),
        rss as f64 / 1024.0
    );
}
