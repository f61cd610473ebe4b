//! Kafka end-to-end throughput (run with `cargo bench --bench kafka`): a
//! local tansu broker, N generated events (default 1,000,000 over 10,000
//! clients) produced to 12 partitions keyed by client, then `tally serve
//! --kafka-brokers` consuming them. Reports events/s from start of
//! consumption until every event is accounted for, and the CPU used by
//! Tally and by the broker over that time (both share the same 2 cores).
//! Needs tansu: `TALLY_TANSU` or `$HOME/.cache/tally/tools/bin/tansu`.

mod common;

use common::{env_or, generate, vm_hwm_kib};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    consume(
        bin,
        &bootstrap,
        &dir.path().join("data"),
        events,
        broker.id(),
    );
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

fn consume(bin: &str, bootstrap: &str, data: &Path, events: usize, broker_pid: u32) {
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
    let metrics_url = format!(
        "{}/metrics",
        line.trim().trim_start_matches("listening on ")
    );
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
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!(
        "kafka consume: {events} events in {wall:.2} s = {:.0} events/s end to end; CPU over that time: tally {tally_cpu:.2} s ({:.0} %), broker {broker_cpu:.2} s ({:.0} %); tally alone would do {:.0} events/s on 2 cores; tally peak RSS {:.1} MiB",
        events as f64 / wall,
        100.0 * tally_cpu / wall,
        100.0 * broker_cpu / wall,
        events as f64 / tally_cpu.max(1e-9) * 2.0,
        rss as f64 / 1024.0
    );
}
