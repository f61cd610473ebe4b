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
//! Knobs: TALLY_BENCH_SECONDS (10), TALLY_BENCH_CONNECTIONS (64),
//! TALLY_BENCH_CLIENTS (100000).

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

/// `key`: run with access control on, every check carrying this key
/// (verification on the path), to compare with the run without.
async fn tally(connections: usize, seconds: u64, clients: u64, key: Option<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bootstrap = key
        .as_ref()
        .map(|k| format!("bootstrap_key = \"{k}\"\n"))
        .unwrap_or_default();
    let (mut child, base) = common::start_tally(
        dir.path(),
        &format!("{bootstrap}[limits.default]\nalgorithm = \"SLIDING_WINDOW\"\nglobal_limit = {{ requests = 1000, window_seconds = 60 }}\n"),
    );
    let name = if key.is_some() {
        "tally /v1/check with an API key"
    } else {
        "tally /v1/check (sliding window)"
    };
    let auth = key.map(|k| format!("Bearer {k}"));
    let auth_header = auth.clone();
    let url = format!("{base}/v1/check");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("client");
    let mut report = drive(connections, seconds, move |_, r| {
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
    report.print(&format!("{name}, reqwest generator"), connections);
    let script = dir.path().join("check.lua");
    let lua = WRK_LUA.replace("CLIENTS", &clients.to_string()).replace(
        "{[\"Content-Type\"]=\"application/json\"}",
        &match &auth_header {
            Some(a) => {
                format!("{{[\"Content-Type\"]=\"application/json\", [\"Authorization\"]=\"{a}\"}}")
            }
            None => "{[\"Content-Type\"]=\"application/json\"}".to_string(),
        },
    );
    if std::fs::write(&script, lua).is_ok() {
        external(
            &format!("{name}, wrk generator"),
            "wrk",
            &[
                "-t2".into(),
                format!("-c{connections}"),
                format!("-d{seconds}s"),
                "--latency".into(),
                "-s".into(),
                script.display().to_string(),
                base.clone(),
            ],
            &["50%", "99%", "Requests/sec"],
        );
    }
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tally(connections, seconds, clients, None).await;
        // The same load with access control on: the key is verified on
        // every check (same run, same machine, for the comparison).
        let key = tally_pipelines::access::KeyToken::generate(&mut rand::rng(), None);
        tally(
            connections,
            seconds,
            clients,
            Some(key.reveal().to_string()),
        )
        .await;
        redis(connections, seconds, clients).await;
    });
}
