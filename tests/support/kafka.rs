//! A real Kafka-protocol broker (tansu) for the tests, and a producer.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Server;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The tansu binary: `$TALLY_TANSU`, the CI cache, or `tansu` on PATH.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TALLY_TANSU") {
        return PathBuf::from(p);
    }
    let cached = PathBuf::from(std::env::var("HOME").unwrap_or_default())
        .join(".cache/tally/tools/bin/tansu");
    if cached.exists() {
        return cached;
    }
    PathBuf::from("tansu")
}

pub struct Broker {
    child: Child,
    pub port: u16,
    /// For a broker that keeps its data on disk (survives a restart).
    dir: Option<PathBuf>,
}

fn spawn_tansu(port: u16, dir: Option<&Path>) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let mut cmd = Command::new(tansu_bin());
    cmd.args([
        "broker",
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &url,
    ]);
    match dir {
        // tansu resolves sqlite paths against its working directory.
        Some(dir) => cmd
            .current_dir(dir)
            .args(["--storage-engine", "sqlite://tansu.db"]),
        None => cmd.args(["--storage-engine", "memory://tansu/"]),
    };
    // A persistent broker logs beside its data, for a failure to point at.
    let log = || match dir {
        Some(dir) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .map_or_else(|_| Stdio::null(), Stdio::from),
        None => Stdio::null(),
    };
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdout(log())
        .stderr(log())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start tansu ({}): {e}; .ci/run installs it",
                tansu_bin().display()
            )
        });
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    pub fn start() -> Broker {
        let port = free_port();
        Broker {
            child: spawn_tansu(port, None),
            port,
            dir: None,
        }
    }

    /// A broker storing its log in SQLite under `dir`.
    pub fn start_persistent(dir: &Path) -> Broker {
        let port = free_port();
        Broker {
            child: spawn_tansu(port, Some(dir)),
            port,
            dir: Some(dir.to_path_buf()),
        }
    }

    /// Stops the broker (SIGKILL); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.child = spawn_tansu(self.port, self.dir.as_deref());
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(tansu_bin())
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", &partitions.to_string()])
            .args(["--config", "retention.ms=86400000"])
            .arg(name)
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {name} failed");
    }
}

/// Each line as a Kafka record keyed by its client (malformed lines, which
/// may have none, by "malformed").
pub fn records(lines: &[super::Line]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(|l| {
            let key = if l.kind == super::Kind::Malformed {
                "malformed".to_string()
            } else {
                l.client.clone()
            };
            (key, l.json.clone())
        })
        .collect()
}

/// A producer that places keys as Kafka's Java clients do (murmur2). Not
/// idempotent: a record sent twice is a duplicate event (same id) that the
/// engine drops, and a non-idempotent producer cannot be left in a fatal
/// state by a broker restart.
pub fn producer_for(bootstrap: &str) -> FutureProducer {
    producer_partitioning(bootstrap, Some("murmur2_random"))
}

/// The same with librdkafka's `partitioner` setting (`None`: its default,
/// `consistent_random`, as most non-Java clients use).
pub fn producer_partitioning(bootstrap: &str, partitioner: Option<&str>) -> FutureProducer {
    let mut config = ClientConfig::new();
    if let Some(p) = partitioner {
        config.set("partitioner", p);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("enable.idempotence", "false")
        .set("acks", "all")
        // Fail fast and send again (see `produce_all`) rather than wait
        // out librdkafka's 5-minute default after a broker restart.
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap()
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces `(key, payload)` records and waits for every delivery.
/// Records whose delivery fails (a broker that just restarted may time
/// out a batch) are sent again, a few times: the events carry ids, so a
/// record delivered twice is a duplicate the engine drops.
pub async fn produce_all(bootstrap: &str, topic: &str, records: &[(String, String)]) {
    produce_all_partitioning(bootstrap, topic, records, Some("murmur2_random")).await
}

/// [`produce_all`] with a librdkafka `partitioner` setting (`None`: the
/// library's default).
pub async fn produce_all_partitioning(
    bootstrap: &str,
    topic: &str,
    records: &[(String, String)],
    partitioner: Option<&str>,
) {
    let mut todo: Vec<usize> = (0..records.len()).collect();
    for attempt in 0..5 {
        // A fresh producer each attempt: one that failed across a broker
        // restart may stay failed (seen in CI under load).
        let producer = &producer_partitioning(bootstrap, partitioner);
        let mut failed = Vec::new();
        let mut in_flight = Vec::new();
        for &i in &todo {
            let (key, payload) = &records[i];
            let mut record = FutureRecord::to(topic)
                .key(key.as_str())
                .payload(payload.as_str());
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        in_flight.push((i, delivery));
                        break;
                    }
                    Err((_, back)) => {
                        // Local queue full: let deliveries drain.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            if in_flight.len() >= 20_000 {
                for (i, d) in in_flight.drain(..) {
                    if !matches!(d.await, Ok(Ok(_))) {
                        failed.push(i);
                    }
                }
            }
        }
        let mut first_error = None;
        for (i, d) in in_flight.drain(..) {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    first_error.get_or_insert_with(|| e.to_string());
                    failed.push(i);
                }
                Err(_) => failed.push(i),
            }
        }
        if let Some(e) = first_error {
            eprintln!("attempt {attempt}: first delivery error: {e}");
        }
        if failed.is_empty() {
            return;
        }
        eprintln!(
            "attempt {attempt}: {} records not delivered; sending them again",
            failed.len()
        );
        todo = failed;
    }
    panic!("{} records could not be produced", todo.len());
}

/// The partitions an instance says it owns (none while it cannot answer).
pub async fn owned(c: &reqwest::Client, server: &Server) -> BTreeSet<u16> {
    let Ok(r) = c.get(server.url("/health/detailed")).send().await else {
        return BTreeSet::new();
    };
    let body: Value = r.json().await.unwrap_or(Value::Null);
    body["cluster"]["owned_partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64())
                .map(|p| p as u16)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the instances' owned partitions are disjoint and cover all.
pub async fn wait_for_split(
    c: &reqwest::Client,
    servers: &[&Server],
    partitions: u16,
) -> Vec<BTreeSet<u16>> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut sets = Vec::new();
        for s in servers {
            sets.push(owned(c, s).await);
        }
        let all: BTreeSet<u16> = sets.iter().flatten().copied().collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        if all.len() == usize::from(partitions)
            && total == all.len()
            && sets.iter().all(|s| !s.is_empty())
        {
            return sets;
        }
        assert!(
            Instant::now() < deadline,
            "partitions never split: {sets:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `/v1/dead-letters/kafka` in one page: how many are listed, and their
/// distinct (source partition, source offset) origins.
pub async fn kafka_dead_letter_origins(
    c: &reqwest::Client,
    server: &Server,
) -> (usize, std::collections::HashSet<(String, String)>) {
    let dead: Value = match c
        .get(server.url("/v1/dead-letters/kafka?limit=10000"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let listed = dead["dead_letters"].as_array().cloned().unwrap_or_default();
    let origins = listed
        .iter()
        .map(|d| {
            (
                d["source_partition"].as_str().unwrap_or("").to_string(),
                d["source_offset"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    (listed.len(), origins)
}
