//! Gateway checks over loopback (run with `cargo bench --bench check`):
//! 64 connections, 100,000 distinct clients picked at random, every client
//! under a sliding-window limit (the configured default), for a fixed time.
//! Reports checks/s and latency percentiles for `POST /v1/check`, then the
//! same load against the common alternative: Redis with a sliding-window
//! limiter in Lua (sorted-set log), if `redis-server` is installed.
//! The load generator shares the machine's cores with the server.
//!
//! Knobs: TALLY_BENCH_SECONDS (10), TALLY_BENCH_CONNECTIONS (64),
//! TALLY_BENCH_CLIENTS (100000).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::env_or;

/// Sliding-window log, the usual Redis recipe: drop entries older than the
/// window, count, admit and record if under the limit.
const SLIDING_WINDOW_LUA: &str = r#"
local key, now, window, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, 0, now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, now .. '-' .. ARGV[4])
  redis.call('PEXPIRE', key, window)
  return 1
end
return 0
"#;

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

async fn drive<F, Fut>(connections: usize, seconds: u64, check: F) -> Report
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let check = Arc::new(check);
    let deadline = Instant::now() + Duration::from_secs(seconds);
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

async fn tally(connections: usize, seconds: u64, clients: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        "[limits.default]\nalgorithm = \"SLIDING_WINDOW\"\nglobal_limit = { requests = 1000, window_seconds = 60 }\n",
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tally serve");
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    let base = line.trim().trim_start_matches("listening on ").to_string();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("client");
    let url = format!("{base}/v1/check");
    let mut report = drive(connections, seconds, move |_, r| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = format!(
                r#"{{"client_id":"client-{}","endpoint":"/v1/items"}}"#,
                r % clients
            );
            match http
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
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
    report.print("tally /v1/check (sliding window)", connections);
    if let Some(rss) = common::vm_hwm_kib(child.id()) {
        println!("tally: server peak RSS {:.1} MiB", rss as f64 / 1024.0);
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
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
    let mut report = drive(connections, seconds, move |task, r| {
        let (pool, script) = (pool.clone(), script.clone());
        async move {
            let mut con = pool[task].clone();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let admitted: Result<i64, _> = script
                .key(format!("rl:client-{}", r % clients))
                .arg(now)
                .arg(60_000)
                .arg(1000)
                .arg(r)
                .invoke_async(&mut con)
                .await;
            admitted == Ok(1)
        }
    })
    .await;
    report.print("redis EVALSHA sliding-window log (Lua)", connections);
    let _ = server.kill();
    let _ = server.wait();
}

fn main() {
    let seconds = env_or("TALLY_BENCH_SECONDS", 10) as u64;
    let connections = env_or("TALLY_BENCH_CONNECTIONS", 64);
    let clients = env_or("TALLY_BENCH_CLIENTS", 100_000) as u64;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tally(connections, seconds, clients).await;
        redis(connections, seconds, clients).await;
    });
}
