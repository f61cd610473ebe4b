//! Shared by the end-to-end harnesses in `benches/`.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `tally` binary to measure: this build's, or `TALLY_BENCH_BIN` (to
/// measure another build, e.g. the commit before a change, with the same
/// harness in the same run).
pub fn tally_bin() -> String {
    std::env::var("TALLY_BENCH_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_tally").to_string())
}

/// Peak RSS (KiB) of a running process.
pub fn vm_hwm_kib(pid: u32) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Writes `events` synthetic events over `clients` clients with `tally gen`.
pub fn generate(bin: &str, events: usize, clients: usize, file: &Path) {
    let ok = Command::new(bin)
        .args([
            "gen",
            "--count",
            &events.to_string(),
            "--clients",
            &clients.to_string(),
            "--out",
        ])
        .arg(file)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "tally gen failed");
}

/// Starts `tally serve` on a free loopback port with `config` (TOML) and
/// returns it with its base URL.
pub fn start_tally(dir: &Path, config: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let file = dir.join("tally.toml");
    std::fs::write(&file, config).expect("write config");
    let mut child = Command::new(tally_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tally serve");
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    let base = line.trim().trim_start_matches("listening on ").to_string();
    (child, base)
}

/// Current RSS (KiB) of a running process.
pub fn vm_rss_kib(pid: u32) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Nearest-rank percentile of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// CPU time (user + system, seconds) a running process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}
