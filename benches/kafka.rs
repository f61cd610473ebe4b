//! Kafka end-to-end throughput (run with `cargo bench --bench kafka`): a
//! local tansu broker, N generated events (default 1,000,000 over 10,000
//! clients) produced to 12 partitions keyed by client, then `tally serve
//! --kafka-brokers` consuming them. Reports events/s from start of
//! consumption until every event is accounted for, and the CPU used by
//! Tally and by the broker over that time (both share the same 2 cores).
//! Needs tansu: `TALLY_TANSU` or `$HOME/.cache/tally/tools/bin/tansu`.
//!
//! Then (unless `TALLY_BENCH_MOVE=0`) the partition move: one client
//! checks at the first instance back to back while a second instance joins
//! the group, takes half the partitions and restores them from the
//! changelog. Reports the p50/p99 of checks the first instance answers
//! itself, before, during (from the second start until the split settles)
//! and after the move.

mod common;

use common::{env_or, generate, percentile, vm_hwm_kib};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn tansu_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var("TALLY_TANSU").ok().map(PathBuf::from),
        std::env::var("HOME")
            .ok()
            .map(|h| PathBuf::from(h).join(".cache/tally/tools/bin/tansu")),
    ];
    candidates.into_iter().flatten().find(|p| p.exists())
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may contain spaces; utime and
    // stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Sum over label sets of a `source="kafka"` counter.
fn kafka_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains("source=\"kafka\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn main() {
    let Some(tansu) = tansu_bin() else {
        println!("kafka: skipped (no tansu; set TALLY_TANSU or run .ci/run)");
        return;
    };
    let bin = common::tally_bin();
    let bin = bin.as_str();
    let events = env_or("TALLY_BENCH_EVENTS", 1_000_000);
    let clients = env_or("TALLY_BENCH_CLIENTS", 10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.ndjson");
    generate(bin, events, clients, &file);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut broker = Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (topic, partitions) in [("tally.requests", "12"), ("tally.requests.dlq", "1")] {
        let ok = Command::new(&tansu)
            .args([
                "topic",
                "create",
                "--broker",
                &url,
                "--partitions",
                partitions,
            ])
            .args(["--config", "retention.ms=86400000", topic])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "cannot create {topic}");
    }
    let bootstrap = format!("127.0.0.1:{port}");
    produce(&bootstrap, &file, events);
    let mut first = consume(
        bin,
        &bootstrap,
        &dir.path().join("data"),
        events,
        broker.id(),
    );
    if env_or("TALLY_BENCH_MOVE", 1) == 1 {
        partition_move(bin, &bootstrap, &mut first, &dir.path().join("data-b"));
    }
    unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) };
    let _ = first.child.wait();
    let _ = broker.kill();
    let _ = broker.wait();
}

fn produce(bootstrap: &str, file: &Path, events: usize) {
    let text = std::fs::read_to_string(file).expect("read events");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t = Instant::now();
    runtime.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .expect("producer");
        let mut pending = Vec::new();
        for line in text.lines() {
            let key = line
                .split("\"client_id\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("none");
            let mut record = FutureRecord::to("tally.requests").key(key).payload(line);
            loop {
                match producer.send_result(record) {
                    Ok(d) => {
                        pending.push(d);
                        break;
                    }
                    Err((_, back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            if pending.len() >= 100_000 {
                for d in pending.drain(..) {
                    let _ = d.await;
                }
            }
        }
        for d in pending.drain(..) {
            let _ = d.await;
        }
    });
    println!(
        "kafka: produced {events} events to tansu in {:.2?}",
        t.elapsed()
    );
}

/// A running `tally serve` and its base URL.
struct Instance {
    child: std::process::Child,
    base: String,
}

fn serve(bin: &str, bootstrap: &str, data: &Path) -> Instance {
    let mut child = Command::new(bin)
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--kafka-brokers",
            bootstrap,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tally serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let base = line.trim().trim_start_matches("listening on ").to_string();
    Instance { child, base }
}

fn consume(bin: &str, bootstrap: &str, data: &Path, events: usize, broker_pid: u32) -> Instance {
    let instance = serve(bin, bootstrap, data);
    let child = &instance.child;
    let metrics_url = format!("{}/metrics", instance.base);
    let (broker0, tally0) = (cpu_seconds(broker_pid), cpu_seconds(child.id()));
    let t = Instant::now();
    let deadline = t + Duration::from_secs(600);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let http = reqwest::Client::new();
    loop {
        let text = runtime.block_on(async {
            match http.get(&metrics_url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        });
        let done: u64 = [
            "tally_events_accepted_total",
            "tally_events_rejected_total",
            "tally_events_duplicate_total",
            "tally_events_late_total",
        ]
        .iter()
        .map(|n| kafka_counter(&text, n))
        .sum();
        if done >= events as u64 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = t.elapsed().as_secs_f64();
    let (broker_cpu, tally_cpu) = (
        cpu_seconds(broker_pid) - broker0,
        cpu_seconds(child.id()) - tally0,
    );
    let rss = vm_hwm_kib(child.id()).unwrap_or(0);
    println!(
        "kafka consume: {events} events in {wall:.2} s = {:.0} events/s end to end; CPU over that time: tally {tally_cpu:.2} s ({:.0} %), broker {broker_cpu:.2} s ({:.0} %); tally alone would do {:.0} events/s on 2 cores; tally peak RSS {:.1} MiB",
        events as f64 / wall,
        100.0 * tally_cpu / wall,
        100.0 * broker_cpu / wall,
        events as f64 / tally_cpu.max(1e-9) * 2.0,
        rss as f64 / 1024.0
    );
    instance
}

/// Partitions an instance says it owns.
async fn owned(http: &reqwest::Client, base: &str) -> usize {
    let Ok(r) = http.get(format!("{base}/health/detailed")).send().await else {
        return 0;
    };
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    body["cluster"]["owned_partitions"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Checks back to back at `base` until `stop` is set or `secs` pass; the
/// latencies (us) of those `base` answered itself.
async fn local_checks(
    http: reqwest::Client,
    base: String,
    stop: Arc<AtomicBool>,
    secs: u64,
) -> Vec<u64> {
    let url = format!("{base}/v1/check");
    let until = Instant::now() + Duration::from_secs(secs);
    let mut local = Vec::new();
    let mut i = 0u64;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        i += 1;
        let body = format!(r#"{{"client_id":"move-{}","endpoint":"/x"}}"#, i % 64);
        let t = Instant::now();
        let r = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let took = t.elapsed();
        if let Ok(r) = r {
            let served_here = r
                .headers()
                .get("x-tally-served-by")
                .is_none_or(|v| v.to_str().is_ok_and(|v| v == base));
            if served_here && r.status().is_success() {
                local.push(took.as_micros() as u64);
            }
        }
    }
    local
}

fn report_checks(phase: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    println!(
        "kafka partition move: {phase}: {} local checks, p50 {} us, p99 {} us, max {} us",
        v.len(),
        percentile(&v, 0.5).unwrap_or(0),
        percentile(&v, 0.99).unwrap_or(0),
        v.last().copied().unwrap_or(0)
    );
}

fn partition_move(bin: &str, bootstrap: &str, first: &mut Instance, data: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let never = Arc::new(AtomicBool::new(false));
        report_checks(
            "before",
            local_checks(http.clone(), first.base.clone(), never.clone(), 5).await,
        );
        let t = Instant::now();
        let mut second = serve(bin, bootstrap, data);
        let settled = Arc::new(AtomicBool::new(false));
        let during = tokio::spawn(local_checks(
            http.clone(),
            first.base.clone(),
            settled.clone(),
            90,
        ));
        // The move is over once both own partitions and they add up.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (a, b) = (owned(&http, &first.base).await, owned(&http, &second.base).await);
            if a > 0 && b > 0 && a + b == 12 {
                break;
            }
            if Instant::now() > deadline {
                println!("kafka partition move: the split did not settle within 90 s ({a} + {b})");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let moved_in = t.elapsed();
        settled.store(true, Ordering::Relaxed);
        println!("kafka partition move: the split settled {moved_in:.2?} after the second instance started");
        report_checks("during", during.await.unwrap_or_default());
        report_checks(
            "after",
            local_checks(http.clone(), first.base.clone(), never, 5).await,
        );
        unsafe { libc::kill(second.child.id() as i32, libc::SIGTERM) };
        let _ = second.child.wait();
    });
}
