//! Gateway checks over loopback (run with `cargo bench --bench check`):
//! 64 connections, 100,000 distinct clients picked at random, every client
//! under a sliding-window limit (the configured default), for a fixed time.
//! Reports checks/s and latency percentiles for `POST /v1/check`, then the
//! same load against the common alternative: Redis with a sliding-window
//! limiter in Lua (sorted-set log), if `redis-server` is installed.
//! The load generator shares the machine's cores with the server, so each
//! system is driven twice: by this harness's own client (reqwest, the same
//! code for both) and by a lean C generator, `wrk` for Tally and
//! `redis-benchmark` for Redis, when installed.
//!
//! Tally runs twice at once, without and with API-key verification, driven
//! in alternating rounds; it prints both, the difference of the median
//! rounds, and each server's CPU time per check.
//!
//! Knobs: TALLY_BENCH_SECONDS (10, per system), TALLY_BENCH_ROUNDS (5),
//! TALLY_BENCH_CONNECTIONS (64), TALLY_BENCH_CLIENTS (100000).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::env_or;

/// Sliding-window log, the usual Redis recipe: drop entries older than the
/// window, count, admit and record if under the limit.
const SLIDING_WINDOW_LUA: &str = r#"
local key, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', key, 0, now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, t[1] .. '.' .. t[2] .. '.' .. math.random(1000000000))
  redis.call('PEXPIRE', key, window)
  return 1
end
return 0
"#;

const WRK_LUA: &str = r#"
request = function()
  local id = math.random(0, CLIENTS - 1)
  local body = '{"client_id":"client-' .. id .. '","endpoint":"/v1/items"}'
  return wrk.format("POST", "/v1/check", {["Content-Type"]="application/json"}, body)
end
"#;

/// Runs a C load generator and prints the lines that carry its results.
fn external(name: &str, program: &str, args: &[String], keep: &[&str]) {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            // redis-benchmark redraws its progress line with '\r'.
            let lines: Vec<&str> = text
                .split(['\n', '\r'])
                .filter(|l| keep.iter().any(|k| l.contains(k)))
                .map(str::trim)
                .collect();
            println!("{name}: {}", lines.join(" | "));
        }
        Err(_) => println!("{name}: skipped ({program} not installed)"),
    }
}

struct Report {
    checks: u64,
    allowed: u64,
    seconds: f64,
    latencies_us: Vec<u32>,
}

impl Report {
    fn print(&mut self, name: &str, connections: usize) {
        self.latencies_us.sort_unstable();
        let q = |p: f64| {
            let n = self.latencies_us.len();
            if n == 0 {
                return 0.0;
            }
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            f64::from(self.latencies_us[i]) / 1000.0
        };
        println!(
            "{name}: {} checks ({} allowed) in {:.1} s over {connections} connections = {:.0} checks/s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
            self.checks,
            self.allowed,
            self.seconds,
            self.checks as f64 / self.seconds,
            q(0.50),
            q(0.99),
            q(0.999),
        );
    }
}

/// xorshift: the generator must cost next to nothing.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn drive<F, Fut>(connections: usize, time: Duration, check: F) -> Report
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let check = Arc::new(check);
    let deadline = Instant::now() + time;
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|task| {
            let check = check.clone();
            tokio::spawn(async move {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (task as u64 + 1);
                let (mut checks, mut allowed, mut latencies) = (0u64, 0u64, Vec::new());
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if check(task, next(&mut rng)).await {
                        allowed += 1;
                    }
                    latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    checks += 1;
                }
                (checks, allowed, latencies)
            })
        })
        .collect();
    let mut report = Report {
        checks: 0,
        allowed: 0,
        seconds: 0.0,
        latencies_us: Vec::new(),
    };
    for t in tasks {
        if let Ok((c, a, l)) = t.await {
            report.checks += c;
            report.allowed += a;
            report.latencies_us.extend(l);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(16379)
}

/// One Tally server under test: with `key`, access control is on and
/// every check carries the key (verification on the path).
struct Server {
    name: &'static str,
    child: std::process::Child,
    url: String,
    auth: Option<String>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(connections: usize, key: Option<String>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = key
            .as_ref()
            .map(|k| format!("bootstrap_key = \"{k}\"\n"))
            .unwrap_or_default();
        let (child, base) = common::start_tally(
            dir.path(),
            &format!("{bootstrap}[limits.default]\nalgorithm = \"SLIDING_WINDOW\"\nglobal_limit = {{ requests = 1000, window_seconds = 60 }}\n"),
        );
        Server {
            name: if key.is_some() {
                "tally /v1/check with an API key"
            } else {
                "tally /v1/check (sliding window)"
            },
            child,
            url: format!("{base}/v1/check"),
            auth: key.map(|k| format!("Bearer {k}")),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(connections)
                .build()
                .expect("client"),
            dir,
        }
    }

    /// Drives checks for `time`; answers the report and the server's CPU
    /// seconds in that time.
    async fn round(&self, connections: usize, time: Duration, clients: u64) -> (Report, f64) {
        let (http, url, auth) = (self.http.clone(), self.url.clone(), self.auth.clone());
        let cpu_before = common::cpu_seconds(self.child.id()).unwrap_or(0.0);
        let report = drive(connections, time, move |_, r| {
            let (http, url, auth) = (http.clone(), url.clone(), auth.clone());
            async move {
                let body = format!(
                    r#"{{"client_id":"client-{}","endpoint":"/v1/items"}}"#,
                    r % clients
                );
                let mut request = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(auth) = &auth {
                    request = request.header("authorization", auth);
                }
                match request.send().await {
                    Ok(resp) => {
                        let ok = resp.status() == 200;
                        let _ = resp.bytes().await;
                        ok
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        let cpu = common::cpu_seconds(self.child.id()).unwrap_or(0.0) - cpu_before;
        (report, cpu)
    }

    fn wrk(&self, connections: usize, seconds: u64, clients: u64) {
        let script = self.dir.path().join("check.lua");
        let headers = match &self.auth {
            Some(a) => {
                format!("{{[\"Content-Type\"]=\"application/json\", [\"Authorization\"]=\"{a}\"}}")
            }
            None => "{[\"Content-Type\"]=\"application/json\"}".to_string(),
        };
        let lua = WRK_LUA
            .replace("CLIENTS", &clients.to_string())
            .replace("{[\"Content-Type\"]=\"application/json\"}", &headers);
        let base = self.url.trim_end_matches("/v1/check").to_string();
        if std::fs::write(&script, lua).is_ok() {
            external(
                &format!("{}, wrk generator", self.name),
                "wrk",
                &[
                    "-t2".into(),
                    format!("-c{connections}"),
                    format!("-d{seconds}s"),
                    "--latency".into(),
                    "-s".into(),
                    script.display().to_string(),
                    base,
                ],
                &["50%", "99%", "Requests/sec"],
            );
        }
    }

    fn stop(mut self) {
        if let Some(rss) = common::vm_hwm_kib(self.child.id()) {
            println!(
                "{}: server peak RSS {:.1} MiB",
                self.name,
                rss as f64 / 1024.0
            );
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Tally without and with key verification, both servers up at once and
/// driven in alternating rounds (open, keyed, open, keyed, ...), so that
/// drift of a shared machine (another process, CPU frequency) falls on
/// both alike; each is also judged by the server's own CPU time per check,
/// which the load generator's share of the cores does not move.
async fn tally(connections: usize, seconds: u64, clients: u64, rounds: usize) {
    let key = tally_pipelines::access::KeyToken::generate(&mut rand::rng(), None);
    let servers = [
        Server::start(connections, None),
        Server::start(connections, Some(key.reveal().to_string())),
    ];
    let slice = Duration::from_millis(seconds * 1000 / rounds.max(1) as u64);
    // Warm-up: every server sees the clients once before it is measured.
    for s in &servers {
        s.round(connections, Duration::from_secs(1), clients).await;
    }
    let mut totals: Vec<(Report, f64, Vec<f64>)> = servers
        .iter()
        .map(|_| {
            (
                Report {
                    checks: 0,
                    allowed: 0,
                    seconds: 0.0,
                    latencies_us: Vec::new(),
                },
                0.0,
                Vec::new(),
            )
        })
        .collect();
    for _ in 0..rounds.max(1) {
        for (s, total) in servers.iter().zip(totals.iter_mut()) {
            let (r, cpu) = s.round(connections, slice, clients).await;
            total.2.push(r.checks as f64 / r.seconds);
            total.0.checks += r.checks;
            total.0.allowed += r.allowed;
            total.0.seconds += r.seconds;
            total.0.latencies_us.extend(r.latencies_us);
            total.1 += cpu;
        }
    }
    let mut summary = Vec::new();
    for (s, (report, cpu, per_round)) in servers.iter().zip(totals.iter_mut()) {
        report.print(&format!("{}, reqwest generator", s.name), connections);
        let mut sorted = per_round.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let cpu_us = *cpu * 1e6 / report.checks.max(1) as f64;
        println!(
            "{}: rounds {} checks/s (median {median:.0}); server CPU {cpu_us:.1} us per check",
            s.name,
            per_round
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        summary.push((median, cpu_us));
    }
    if let [(open, open_cpu), (keyed, keyed_cpu)] = summary[..] {
        println!(
            "keyed vs open: throughput {:+.1} % (median of rounds), server CPU per check {:+.1} %",
            (keyed / open - 1.0) * 100.0,
            (keyed_cpu / open_cpu - 1.0) * 100.0,
        );
    }
    for s in &servers {
        s.wrk(connections, seconds, clients);
    }
    for s in servers {
        s.stop();
    }
}

async fn redis(connections: usize, seconds: u64, clients: u64) {
    let port = free_port();
    let Ok(mut server) = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        println!("redis: skipped (no redis-server; apt-get install redis-server)");
        return;
    };
    let client = match redis::Client::open(format!("redis://127.0.0.1:{port}/")) {
        Ok(c) => c,
        Err(e) => {
            println!("redis: skipped ({e})");
            let _ = server.kill();
            return;
        }
    };
    let mut pool = Vec::new();
    for _ in 0..connections {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => {
                    pool.push(c);
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => {
                    println!("redis: skipped ({e})");
                    let _ = server.kill();
                    return;
                }
            }
        }
    }
    let pool = Arc::new(pool);
    let script = Arc::new(redis::Script::new(SLIDING_WINDOW_LUA));
    let mut report = drive(connections, Duration::from_secs(seconds), move |task, r| {
        let (pool, script) = (pool.clone(), script.clone());
        async move {
            let mut con = pool[task].clone();
            let admitted: Result<i64, _> = script
                .key(format!("rl:client-{}", r % clients))
                .arg(60_000)
                .arg(1000)
                .invoke_async(&mut con)
                .await;
            admitted == Ok(1)
        }
    })
    .await;
    report.print(
        "redis EVALSHA sliding-window log (Lua), reqwest-like generator (redis crate)",
        connections,
    );
    let sha: Option<String> = match client.get_multiplexed_async_connection().await {
        Ok(mut c) => redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SLIDING_WINDOW_LUA)
            .query_async(&mut c)
            .await
            .ok(),
        Err(_) => None,
    };
    if let Some(sha) = sha {
        external(
            "redis EVALSHA sliding-window log, redis-benchmark generator",
            "redis-benchmark",
            &[
                "-p".into(),
                port.to_string(),
                "-c".into(),
                connections.to_string(),
                "-n".into(),
                (seconds * 80_000).to_string(),
                "-r".into(),
                clients.to_string(),
                "--threads".into(),
                "2".into(),
                "--csv".into(),
                "--precision".into(),
                "3".into(),
                "EVALSHA".into(),
                sha,
                "1".into(),
                "rl:client-__rand_int__".into(),
                "60000".into(),
                "1000".into(),
            ],
            &["rps", "EVALSHA"],
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}

fn main() {
    let seconds = env_or("TALLY_BENCH_SECONDS", 10) as u64;
    let connections = env_or("TALLY_BENCH_CONNECTIONS", 64);
    let clients = env_or("TALLY_BENCH_CLIENTS", 100_000) as u64;
    let rounds = env_or("TALLY_BENCH_ROUNDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tally(connections, seconds, clients, rounds).await;
        redis(connections, seconds, clients).await;
    });
}
