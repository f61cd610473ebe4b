//! `tally replay --telemetry` of a file `tally gen --telemetry` wrote: the
//! counts of every series equal the file's, a second run applies nothing
//! again, and a replay killed with SIGKILL and run again ends with the
//! statistics of an uninterrupted one.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{client, encode_path, tally_bin, Server};

fn replay(file: &Path, data: &Path) -> Value {
    support::replay_json(file, data, &["--telemetry"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_replay_is_exact_resumable_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("points.ndjson");
    let status = Command::new(tally_bin())
        .args(["gen", "--telemetry", "--count", "600000", "--series", "40"])
        .args(["--rate", "100", "--seed", "7", "--out"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    // The reference: each series' count, min and max, read from the file.
    let text = std::fs::read_to_string(&file).unwrap();
    let mut want: BTreeMap<String, (u64, f64, f64)> = BTreeMap::new();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let series = format!(
            "svc.latency{{host={}}}",
            v["tags"]["host"].as_str().unwrap()
        );
        let value = v["value"].as_f64().unwrap();
        let ts = v["timestamp"].as_i64().unwrap();
        first = first.min(ts);
        last = last.max(ts);
        let e = want.entry(series).or_insert((0, f64::MAX, f64::MIN));
        e.0 += 1;
        e.1 = e.1.min(value);
        e.2 = e.2.max(value);
    }
    assert_eq!(want.len(), 40);

    let whole = dir.path().join("whole");
    let summary = replay(&file, &whole);
    assert_eq!(summary["accepted"], 600_000, "{summary}");
    // Run again: every line was applied, nothing counts twice.
    let again = replay(&file, &whole);
    assert_eq!(again["accepted"], 0, "{again}");

    // Killed after its first progress line, then run to the end.
    let killed = dir.path().join("killed");
    let mut child = Command::new(tally_bin())
        .arg("replay")
        .arg("--telemetry")
        .arg(&file)
        .arg("--data-dir")
        .arg(&killed)
        .args(["--progress-every", "10000", "--batch-lines", "2000"])
        .args(["--flush-interval", "20ms", "--checkpoint-every", "15000"])
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut progressed = 0;
    let mut said = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.contains("progress:") {
            progressed += 1;
            // Past two checkpoints (every 15,000 lines).
            if progressed == 4 {
                break;
            }
        }
        said.push_str(&line);
        line.clear();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        progressed == 4,
        "the replay ended before its fourth progress line: {said}"
    );
    let resumed = replay(&file, &killed);
    // It resumed from a stored position, short of the end.
    let redone = resumed["accepted"].as_u64().unwrap();
    assert!((1..600_000).contains(&redone), "{resumed}");
    // What the killed run made durable is recognised, not counted again.
    assert!(
        resumed["already_applied"].as_u64().unwrap() > 0,
        "{resumed}"
    );
    assert_eq!(
        redone + resumed["already_applied"].as_u64().unwrap(),
        600_000,
        "{resumed}"
    );

    let c = client();
    let range = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let (from, to) = (range(first - first % 60_000), range(last + 60_000));
    let a = Server::start(&whole, &[]);
    let b = Server::start(&killed, &[]);
    for (series, (count, min, max)) in &want {
        let path = format!(
            "/v1/telemetry/{}?from={}&to={}&step=1h&agg=count",
            encode_path(series),
            encode_path(&from),
            encode_path(&to)
        );
        let got: Value = c
            .get(a.url(&path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let s = &got["summary"];
        assert_eq!(s["count"], *count, "{series}: {got}");
        assert_eq!(
            (s["min"].as_f64(), s["max"].as_f64()),
            (Some(*min), Some(*max))
        );
        let other: Value = c
            .get(b.url(&path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(other["points"], got["points"], "{series}");
        assert_eq!(other["summary"]["p99"], s["p99"]);
        let (x, y) = (
            other["summary"]["variance"].as_f64().unwrap(),
            s["variance"].as_f64().unwrap(),
        );
        assert!((x - y).abs() <= 1e-12 * y.abs(), "{series}: {x} vs {y}");
    }
}
