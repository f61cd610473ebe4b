//! `tally replay` through the engine: exact against the reference, and a
//! replay killed with SIGKILL at several points and resumed ends with
//! exactly the state of an uninterrupted run.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;

fn replay(file: &Path, data: &Path) -> Value {
    support::replay_json(file, data, &[])
}

/// Starts a replay and SIGKILLs it after it reported `progress_lines`
/// progress lines (0: right after start). Returns whether it was killed
/// before finishing.
fn replay_killed(file: &Path, data: &Path, progress_lines: usize) -> bool {
    let mut child = Command::new(tally_bin())
        .arg("replay")
        .arg(file)
        .arg("--data-dir")
        .arg(data)
        .args([
            "--progress-every",
            "10000",
            "--batch-lines",
            "2000",
            "--flush-interval",
            "20ms",
            "--checkpoint-every",
            "15000",
        ])
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = 0;
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    while seen < progress_lines {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("progress:") {
            seen += 1;
        }
    }
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let status = child.wait().unwrap();
    killed && !status.success()
}

async fn snapshot(server: &Server, clients: &[String]) -> Vec<Value> {
    let c = client();
    let mut out = Vec::new();
    for client in clients {
        let enc = encode_path(client);
        for path in [
            format!("/v1/clients/{enc}/usage?period=month&at={START_MS}"),
            format!("/v1/clients/{enc}/usage/endpoints?period=day&at={START_MS}"),
            format!(
                "/v1/clients/{enc}/usage/history?granularity=minute&from={}&to={}",
                START_MS - 2 * HOUR,
                START_MS + DAY
            ),
        ] {
            out.push(
                c.get(server.url(&path))
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap(),
            );
        }
    }
    out.push(Value::from(all_dead_letters(&c, server).await.len()));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_killed_at_several_points_resumes_to_the_uninterrupted_state() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dataset(200_000, 300, 11);
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, ndjson(&lines)).unwrap();

    // Uninterrupted run: counts match the dataset's labels.
    let whole = dir.path().join("whole");
    let summary = replay(&file, &whole);
    assert_eq!(
        summary["accepted"].as_u64(),
        Some(count_kind(&lines, Kind::Good))
    );
    assert_eq!(
        summary["duplicates"].as_u64(),
        Some(count_kind(&lines, Kind::Duplicate))
    );
    assert_eq!(
        summary["late"].as_u64(),
        Some(count_kind(&lines, Kind::Late))
    );
    assert_eq!(
        summary["rejected"].as_u64(),
        Some(count_kind(&lines, Kind::Malformed))
    );

    // Interrupted runs: SIGKILL at several points, then run to the end.
    let resumed = dir.path().join("resumed");
    let mut kills = 0;
    for progress in [0, 2, 1, 4, 3] {
        if replay_killed(&file, &resumed, progress) {
            kills += 1;
        }
    }
    assert!(
        kills >= 3,
        "only {kills} replays were killed before finishing"
    );
    let last = replay(&file, &resumed);
    assert!(
        last["resumed_from_line"].as_u64().unwrap() > 0,
        "resume did not skip work: {last}"
    );
    // A replay of a fully applied file changes nothing.
    let again = replay(&file, &resumed);
    assert_eq!(again["accepted"], 0, "{again}");

    let clients: Vec<String> = clients_of(&lines).into_iter().collect();
    let a = Server::start(&whole, &[]);
    let b = Server::start(&resumed, &[]);
    let snap_a = snapshot(&a, &clients).await;
    let snap_b = snapshot(&b, &clients).await;
    assert_eq!(snap_a.len(), snap_b.len());
    for (x, y) in snap_a.iter().zip(&snap_b) {
        assert_eq!(
            x, y,
            "interrupted replay differs from the uninterrupted one"
        );
    }
    // And both agree with the reference.
    let c = client();
    for client in &clients {
        let url = a.url(&format!(
            "/v1/clients/{}/usage?period=day&at={START_MS}",
            encode_path(client)
        ));
        let got: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        check_usage(
            &got,
            &expected(&lines, client, START_MS, START_MS + DAY),
            client,
        );
    }
}
