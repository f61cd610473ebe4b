//! Shared by the end-to-end tests: a real `tally` process on a real socket
//! with RocksDB on disk, a generated dataset, and the reference numbers the
//! engine must reproduce, computed by a plain loop that shares no code with
//! the engine.

#![allow(dead_code)]

pub mod billing;
pub mod kafka;
pub mod sse;
pub mod telemetry;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const MINUTE: i64 = 60_000;
pub const HOUR: i64 = 3_600_000;
pub const DAY: i64 = 86_400_000;
/// Monday 2026-03-02T00:00:00Z.
pub const START_MS: i64 = 1_772_409_600_000;

pub fn tally_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tally")
}

/// A running `tally serve`.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// On a given address: a restart on the same one is the same cluster
    /// member for query routing.
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .unwrap();
        let mut child = Command::new(tally_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--log-format", "json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tally serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; see {}",
                    data_dir.with_extension("log").display()
                )
            })
            .to_string();
        Server {
            child,
            base,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// `host:port` it listens on.
    pub fn listen_address(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGTERM and wait: the graceful path.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        if !status.success() {
            let log =
                std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default();
            eprintln!("tally serve exited with {status}; its log:\n{log}");
        }
        std::mem::forget(self);
        status
    }

    /// Whether the process still runs and the last lines of its log, for
    /// a failure message that says what the server was doing.
    pub fn report(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(None) => "still running".to_string(),
            Ok(Some(status)) => format!("exited with {status}"),
            Err(e) => format!("state unknown: {e}"),
        };
        let log = std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default();
        // Request logs say little about why the server is stuck.
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("tower_http")).collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("tally serve {state}; last log lines:\n{tail}")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn encode_path(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// One generated line and what it is meant to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Good,
    Duplicate,
    Late,
    Malformed,
}

#[derive(Debug, Clone)]
pub struct Line {
    pub json: String,
    pub kind: Kind,
    pub client: String,
    pub endpoint: String,
    pub status: u16,
    pub bytes: u64,
    pub latency: f64,
    pub ts: i64,
}

/// A small deterministic generator (xorshift), independent of `tally gen`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub const ENDPOINTS: [&str; 8] = [
    "/v1/orders",
    "/v1/orders/{id}",
    "/v1/users/{id}",
    "/v1/search",
    "/v1/payments",
    "/v1/cart",
    "/v1/products/{id}",
    "/v1/reports/{id}",
];

/// `n` lines over `clients` clients, 4 events per second of event time from
/// `START_MS`, with injected duplicates, late events and malformed lines.
/// Late events are dated an hour behind, far past the 5-minute lateness in
/// every partition (each partition sees events every few seconds); normal
/// events jitter by at most 2 s, so they are never late.
pub fn dataset(n: usize, clients: u64, seed: u64) -> Vec<Line> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<Line> = Vec::with_capacity(n);
    let mut goods: Vec<usize> = Vec::new();
    for i in 0..n {
        let base = START_MS + (i as i64) * 250;
        let roll = rng.below(1000);
        if roll < 10 {
            let json = match rng.below(5) {
                0 => r#"{"client_id":"c-1","endpoint":"/v1/x","status":200,"latency_ms":1,"timestamp":"#.to_string(),
                1 => format!(r#"{{"client_id":"c-1","endpoint":"/v1/x","status":700,"latency_ms":1,"timestamp":{base}}}"#),
                2 => format!(r#"{{"endpoint":"/v1/x","status":200,"latency_ms":1,"timestamp":{base}}}"#),
                3 => format!(r#"{{"client_id":"c-1","endpoint":"/v1/x","status":200,"latency_ms":-1,"timestamp":{base}}}"#),
                _ => format!(r#"{{"client_id":"c-1","endpoint":"/v1/x","status":"200","latency_ms":1,"timestamp":{base}}}"#),
            };
            out.push(Line {
                json,
                kind: Kind::Malformed,
                client: String::new(),
                endpoint: String::new(),
                status: 0,
                bytes: 0,
                latency: 0.0,
                ts: 0,
            });
            continue;
        }
        if roll < 30 && goods.len() > 50 {
            // Repeat one of the last 50 good events (same id, same content).
            let j = goods[goods.len() - 1 - rng.below(50) as usize];
            let mut dup = out[j].clone();
            dup.kind = Kind::Duplicate;
            out.push(dup);
            continue;
        }
        let late = roll < 40 && i > 4 * 60 * 20; // after 20 minutes of event time
        let client = format!("c-{}", 1 + rng.below(clients));
        let endpoint = ENDPOINTS[rng.below(ENDPOINTS.len() as u64) as usize].to_string();
        let status = match rng.below(100) {
            0..=79 => 200,
            80..=86 => 404,
            87..=90 => 401,
            91..=95 => 500,
            _ => 503,
        };
        // Heavy-tailed latency with microsecond resolution.
        let latency = ((1.0 + 400.0 * rng.unit().powi(3)) * 1000.0).round() / 1000.0;
        let req = rng.below(4000);
        let resp = rng.below(40_000);
        let ts = if late {
            base - HOUR
        } else {
            base - rng.below(2000) as i64
        };
        let json = format!(
            r#"{{"event_id":"e-{seed}-{i}","client_id":"{client}","endpoint":"{endpoint}","method":"GET","status":{status},"request_bytes":{req},"response_bytes":{resp},"latency_ms":{latency},"timestamp":{ts}}}"#
        );
        let kind = if late { Kind::Late } else { Kind::Good };
        if kind == Kind::Good {
            goods.push(out.len());
        }
        out.push(Line {
            json,
            kind,
            client,
            endpoint,
            status,
            bytes: req + resp,
            latency,
            ts,
        });
    }
    out
}

pub fn ndjson(lines: &[Line]) -> String {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l.json);
        s.push('\n');
    }
    s
}

/// Reference numbers of one client over a time range.
#[derive(Debug, Default, Clone)]
pub struct Expected {
    pub total: u64,
    pub successful: u64,
    pub failed: u64,
    pub server_errors: u64,
    pub bytes: u64,
    pub latencies: Vec<f64>,
    pub endpoints: BTreeMap<String, ExpectedEndpoint>,
}

#[derive(Debug, Default, Clone)]
pub struct ExpectedEndpoint {
    pub count: u64,
    pub errors: u64,
    pub bytes: u64,
    pub latencies: Vec<f64>,
}

/// Nearest-rank quantile: the value at 0-based rank ceil(q*n)-1.
pub fn nearest_rank(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[rank]
}

/// The good events (not duplicate, late or malformed) of `client` with
/// event time in `[from, to)`.
pub fn expected(lines: &[Line], client: &str, from: i64, to: i64) -> Expected {
    let mut e = Expected::default();
    for l in lines
        .iter()
        .filter(|l| l.kind == Kind::Good && l.client == client && l.ts >= from && l.ts < to)
    {
        e.total += 1;
        if l.status < 400 {
            e.successful += 1;
        } else {
            e.failed += 1;
        }
        if l.status >= 500 {
            e.server_errors += 1;
        }
        e.bytes += l.bytes;
        e.latencies.push(l.latency);
        let ep = e.endpoints.entry(l.endpoint.clone()).or_default();
        ep.count += 1;
        if l.status >= 400 {
            ep.errors += 1;
        }
        ep.bytes += l.bytes;
        ep.latencies.push(l.latency);
    }
    e
}

pub fn clients_of(lines: &[Line]) -> BTreeSet<String> {
    lines
        .iter()
        .filter(|l| l.kind == Kind::Good)
        .map(|l| l.client.clone())
        .collect()
}

pub fn count_kind(lines: &[Line], kind: Kind) -> u64 {
    lines.iter().filter(|l| l.kind == kind).count() as u64
}

pub fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let tol = want.abs() * rel + 1e-9;
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (±{rel})"
    );
}

/// Checks one client's `usage` answer against the reference.
pub fn check_usage(json: &serde_json::Value, want: &Expected, ctx: &str) {
    assert_eq!(
        json["total_requests"].as_u64(),
        Some(want.total),
        "{ctx} total"
    );
    assert_eq!(
        json["successful_requests"].as_u64(),
        Some(want.successful),
        "{ctx} successful"
    );
    assert_eq!(
        json["failed_requests"].as_u64(),
        Some(want.failed),
        "{ctx} failed"
    );
    assert_eq!(
        json["total_data_transfer_bytes"].as_u64(),
        Some(want.bytes),
        "{ctx} bytes"
    );
    assert_eq!(
        json["unique_endpoints"].as_u64(),
        Some(want.endpoints.len() as u64),
        "{ctx} endpoints"
    );
    let avg = if want.total == 0 {
        0.0
    } else {
        want.latencies.iter().sum::<f64>() / want.total as f64
    };
    assert_close(
        &format!("{ctx} average"),
        json["average_latency_ms"].as_f64().unwrap(),
        avg,
        1e-9,
    );
    assert_close(
        &format!("{ctx} p95"),
        json["p95_latency_ms"].as_f64().unwrap(),
        nearest_rank(&want.latencies, 0.95),
        0.01,
    );
    assert_close(
        &format!("{ctx} p99"),
        json["p99_latency_ms"].as_f64().unwrap(),
        nearest_rank(&want.latencies, 0.99),
        0.01,
    );
}

/// Per-bucket reference counts of a client: bucket start -> (requests,
/// errors >= 500, bytes).
pub fn expected_history(
    lines: &[Line],
    client: &str,
    width: i64,
) -> BTreeMap<i64, (u64, u64, u64)> {
    let mut out: BTreeMap<i64, (u64, u64, u64)> = BTreeMap::new();
    for l in lines
        .iter()
        .filter(|l| l.kind == Kind::Good && l.client == client)
    {
        let b = l.ts - l.ts.rem_euclid(width);
        let e = out.entry(b).or_default();
        e.0 += 1;
        if l.status >= 500 {
            e.1 += 1;
        }
        e.2 += l.bytes;
    }
    out
}

pub fn unique<T: std::hash::Hash + Eq + Clone>(items: &[T]) -> usize {
    items.iter().cloned().collect::<HashSet<_>>().len()
}

pub fn tally_counts(resp: &serde_json::Value) -> HashMap<&'static str, u64> {
    ["accepted", "rejected", "duplicates", "late"]
        .into_iter()
        .map(|k| (k, resp[k].as_u64().unwrap_or(u64::MAX)))
        .collect()
}

/// The `/metrics` text of a server ("" if it does not answer).
pub async fn metrics_text(c: &reqwest::Client, server: &Server) -> String {
    match c.get(server.url("/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Sum of a metric over the label sets whose line contains `label`
/// (`None` when no line matches).
pub fn metric_value(text: &str, name: &str, label: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Every dead letter, read page by page through `next_cursor`.
pub async fn all_dead_letters(c: &reqwest::Client, server: &Server) -> Vec<serde_json::Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(cur) => server.url(&format!("/v1/dead-letters?limit=1000&cursor={cur}")),
            None => server.url("/v1/dead-letters?limit=1000"),
        };
        let page: serde_json::Value = c.get(url).send().await.unwrap().json().await.unwrap();
        items.extend(page["dead_letters"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return items,
        }
    }
}

/// A client's `total_requests` for the month of `START_MS` (0 when not
/// answered).
pub async fn month_total(c: &reqwest::Client, server: &Server, client: &str) -> u64 {
    let url = server.url(&format!(
        "/v1/clients/{}/usage?period=month&at={START_MS}",
        encode_path(client)
    ));
    match c.get(url).send().await {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .map(|v| v["total_requests"].as_u64().unwrap_or(0))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// The next text message of a WebSocket, as JSON, within 30 s.
pub async fn next_ws_json<S>(ws: &mut S) -> serde_json::Value
where
    S: futures::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("no WebSocket message within 30 s")
            .expect("socket closed")
            .expect("WebSocket error");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
            return serde_json::from_str(&text).expect("a JSON message");
        }
    }
}

/// `tally keys create` on a data dir, as an operator would run it: the
/// key it prints (an admin key with every scope unless `extra` says).
pub fn offline_key(data_dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(tally_bin())
        .args(["keys", "create", "--name", "admin", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tally keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("tly_") && key.len() == 54, "{key}");
    key
}

/// `tally replay FILE --data-dir DATA --json` with `extra` arguments; its
/// summary, the run asserted successful.
pub fn replay_json(file: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(tally_bin())
        .arg("replay")
        .args(extra)
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .args(["--json", "--log-format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
