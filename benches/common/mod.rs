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
