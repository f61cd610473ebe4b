//! Anomaly detection end to end: a generated stream with a request spike
//! at a known minute is judged as its minutes close; the anomaly is stored,
//! queryable, the same after a restart, and the same (ids included) when
//! the same input is processed again from scratch.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::*;

const SPIKE_MINUTE: i64 = 40;

fn stream(base: i64) -> String {
    stream_with_spike_at(base, SPIKE_MINUTE)
}

fn stream_with_spike_at(base: i64, spike_minute: i64) -> String {
    let mut lines = Vec::new();
    for minute in 0..46i64 {
        for (client, per_minute) in [
            ("spiky", if minute == spike_minute { 600 } else { 50 }),
            ("calm", 50),
        ] {
            for i in 0..per_minute {
                let ts = base + minute * MINUTE + i * 59_000 / per_minute;
                lines.push(format!(
                    r#"{{"event_id":"{client}-{minute}-{i}","client_id":"{client}","endpoint":"/v1/e{}","status":200,"latency_ms":20,"timestamp":{ts}}}"#,
                    i % 5
                ));
            }
        }
    }
    lines.join("\n")
}

async fn anomalies(c: &reqwest::Client, server: &Server, path: &str) -> Vec<Value> {
    let body: Value = c
        .get(server.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["anomalies"].as_array().cloned().unwrap_or_default()
}

async fn feed(c: &reqwest::Client, server: &Server, body: String) {
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_spike_is_detected_stored_and_replayed_identically() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = (now - 3 * HOUR) / MINUTE * MINUTE;
    let dir = tempfile::tempdir().unwrap();
    // Lateness 1 minute: the last event (minute 45) closes minutes up to 43.
    let args = ["--allowed-lateness", "1m"];
    let c = client();
    let server = Server::start(&dir.path().join("a"), &args);
    feed(&c, &server, stream(base)).await;

    let found = anomalies(&c, &server, "/v1/clients/spiky/anomalies?lookback_hours=24").await;
    assert_eq!(found.len(), 1, "{found:#?}");
    let a = &found[0];
    assert_eq!(a["anomaly_type"], "SPIKE_IN_REQUESTS");
    assert_eq!(a["client_id"], "spiky");
    assert_eq!(a["observed"].as_f64(), Some(600.0));
    assert_eq!(
        a["detected_at"].as_str(),
        Some(tally_pipelines::time::format_rfc3339_ms(base + (SPIKE_MINUTE + 1) * MINUTE).as_str())
    );
    assert!(
        ["HIGH", "CRITICAL"].contains(&a["severity"].as_str().unwrap()),
        "{a}"
    );
    assert!(anomalies(&c, &server, "/v1/clients/calm/anomalies")
        .await
        .is_empty());
    let all = anomalies(&c, &server, "/v1/anomalies?severity_at_least=medium").await;
    assert_eq!(all.len(), 1);
    assert!(anomalies(&c, &server, "/v1/anomalies?client_id=calm")
        .await
        .is_empty());
    let r = c
        .get(server.url("/v1/anomalies?severity_at_least=HUGE"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Stored: the same after a restart.
    assert!(server.stop().success());
    let server = Server::start(&dir.path().join("a"), &args);
    let again = anomalies(&c, &server, "/v1/clients/spiky/anomalies").await;
    assert_eq!(again, found);

    // Deterministic: the same input from scratch gives the same ids.
    let fresh = Server::start(&dir.path().join("b"), &args);
    feed(&c, &fresh, stream(base)).await;
    assert_eq!(
        anomalies(&c, &fresh, "/v1/clients/spiky/anomalies").await,
        found
    );
}

/// Abuse rules fed by what the engine counts: 401/403 answers in the
/// events, and checks the gateway was told to deny. Neither needs a
/// warm-up, and a denied client's minute is judged even though none of
/// its requests reached the event stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failure_bursts_and_sustained_denials_are_potential_abuse() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        "anomaly_idle_close = \"1s\"\n[detect]\nauth_failure_burst = 10\ndenial_burst = 5\ndenial_minutes = 1\n",
    )
    .unwrap();
    let c = client();
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--flush-interval",
            "100ms",
        ],
    );

    // 25 x 401/403 (a burst of 2.5x the trigger) and a calm client with
    // 9 of them (below the trigger), in one minute.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let minute = now / MINUTE * MINUTE - 5 * MINUTE;
    let mut lines = Vec::new();
    for (client, failures) in [("prober", 25), ("fumbler", 9)] {
        for i in 0..failures {
            let status = if i % 2 == 0 { 401 } else { 403 };
            lines.push(format!(
                r#"{{"client_id":"{client}","endpoint":"/login","status":{status},"latency_ms":3,"timestamp":{}}}"#,
                minute + i * 1000
            ));
        }
    }
    feed(&c, &server, lines.join("\n")).await;

    // A fixed window of 2: 12 checks, 10 denied.
    let limits = serde_json::json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 2, "window_seconds": 3600}});
    let r = c
        .put(server.url("/v1/clients/hammer/limits"))
        .json(&limits)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut denied = 0;
    for _ in 0..12 {
        let r = c
            .post(server.url("/v1/check"))
            .json(&serde_json::json!({"client_id": "hammer", "endpoint": "/x"}))
            .send()
            .await
            .unwrap();
        denied += u32::from(r.status() == 429);
    }
    assert_eq!(denied, 10);

    let mut prober = Vec::new();
    let mut hammer = Vec::new();
    for _ in 0..100 {
        prober = anomalies(&c, &server, "/v1/clients/prober/anomalies").await;
        hammer = anomalies(&c, &server, "/v1/clients/hammer/anomalies").await;
        if !prober.is_empty() && !hammer.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(prober.len(), 1, "{prober:#?}");
    assert_eq!(prober[0]["anomaly_type"], "POTENTIAL_ABUSE");
    assert_eq!(prober[0]["observed"].as_f64(), Some(25.0));
    // Score 2.5 on the rule scale (medium from 2, high from 4).
    assert_eq!(prober[0]["severity"], "MEDIUM");
    assert_eq!(hammer.len(), 1, "{hammer:#?}");
    assert_eq!(hammer[0]["anomaly_type"], "POTENTIAL_ABUSE");
    assert_eq!(hammer[0]["observed"].as_f64(), Some(10.0));
    assert_eq!(hammer[0]["severity"], "MEDIUM");
    assert!(anomalies(&c, &server, "/v1/clients/fumbler/anomalies")
        .await
        .is_empty());
}

/// A minute flushed but not judged when the instance stops is judged after
/// the restart (the open minutes are part of the flushed state; in Kafka
/// mode they move with the partition's changelog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_open_at_shutdown_is_judged_after_the_restart() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = (now - 3 * HOUR) / MINUTE * MINUTE;
    let dir = tempfile::tempdir().unwrap();
    let config = |idle: &str| {
        let path = dir.path().join(format!("idle-{idle}.toml"));
        std::fs::write(&path, format!("anomaly_idle_close = \"{idle}\"\n")).unwrap();
        path
    };
    let (slow, fast) = (config("1h"), config("1s"));
    let c = client();
    // Lateness 1 minute: the last event (minute 45) closes minutes up to
    // 43; the spike at 44 is still open when the instance stops.
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--allowed-lateness",
            "1m",
            "--config",
            slow.to_str().unwrap(),
        ],
    );
    feed(&c, &server, stream_with_spike_at(base, 44)).await;
    assert!(anomalies(&c, &server, "/v1/clients/spiky/anomalies")
        .await
        .is_empty());
    assert!(server.stop().success());

    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--allowed-lateness",
            "1m",
            "--config",
            fast.to_str().unwrap(),
        ],
    );
    let mut found = Vec::new();
    for _ in 0..100 {
        found = anomalies(&c, &server, "/v1/clients/spiky/anomalies").await;
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["anomaly_type"], "SPIKE_IN_REQUESTS");
    assert_eq!(
        found[0]["detected_at"].as_str(),
        Some(tally_pipelines::time::format_rfc3339_ms(base + 45 * MINUTE).as_str())
    );
}
