//! The event channel over Server-Sent Events on a real socket: events
//! arrive in order with ids; a client that reconnects with `Last-Event-ID`
//! gets what it missed from the persisted log, then continues live.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::sse::SseReader;
use support::*;

async fn check(c: &reqwest::Client, server: &Server, client: &str) -> u16 {
    c.post(server.url("/v1/check"))
        .json(&json!({"client_id": client, "endpoint": "/v1/x"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_every_event_in_order_and_resume_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let one = json!({"algorithm": "TOKEN_BUCKET", "global_limit": {"requests": 1, "window_seconds": 360000}});
    for client in ["rl", "rl2"] {
        let r = c
            .put(server.url(&format!("/v1/clients/{client}/limits")))
            .json(&one)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .put(server.url("/v1/clients/q/quota"))
        .json(&json!({"monthly_request_limit": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut live = SseReader::open(&c, server.url("/v1/alerts/stream"), None).await;
    // One allowed, then denied twice: one RATE_LIMITED (at most one per
    // client and minute).
    assert_eq!(
        [
            check(&c, &server, "rl").await,
            check(&c, &server, "rl").await,
            check(&c, &server, "rl").await
        ],
        [200, 429, 429]
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let events: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"event_id":"q{i}","client_id":"q","endpoint":"/v1/a","status":200,"latency_ms":1,"timestamp":{now}}}"#))
        .collect();
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(events.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let got = live.take(3).await;
    let kinds: Vec<(&str, &str)> = got
        .iter()
        .map(|(_, k, d)| (k.as_str(), d["client_id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("RATE_LIMITED", "rl"),
            ("QUOTA_WARNING", "q"),
            ("QUOTA_EXCEEDED", "q")
        ]
    );
    let ids: Vec<u64> = got.iter().map(|e| e.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(got[0].2["event_id"].as_u64(), Some(ids[0]));
    assert_eq!(got[0].2["details"]["reason"], "rate_limit");

    // Reconnect after the first event: the two missed ones come from the
    // log, then the stream continues live.
    let mut resumed = SseReader::open(&c, server.url("/v1/alerts/stream"), Some(ids[0])).await;
    let missed = resumed.take(2).await;
    assert_eq!(
        missed.iter().map(|e| e.0).collect::<Vec<_>>(),
        ids[1..].to_vec()
    );
    assert_eq!(check(&c, &server, "rl2").await, 200);
    assert_eq!(check(&c, &server, "rl2").await, 429);
    let next = resumed.take(1).await;
    assert_eq!(
        (next[0].1.as_str(), next[0].2["client_id"].as_str()),
        ("RATE_LIMITED", Some("rl2"))
    );
    assert!(next[0].0 > ids[2]);

    // Filters, also on a replay from the start of the log.
    let mut filtered = SseReader::open(
        &c,
        server.url("/v1/alerts/stream?types=quota_exceeded&last_event_id=0"),
        None,
    )
    .await;
    let only = filtered.take(1).await;
    assert_eq!((only[0].0, only[0].1.as_str()), (ids[2], "QUOTA_EXCEEDED"));
    let r = c
        .get(server.url("/v1/alerts/stream?types=FOO"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribers_replay_then_follow_live() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let one = json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 1, "window_seconds": 86400}});
    for i in 0..3 {
        let r = c
            .put(server.url(&format!("/v1/clients/w{i}/limits")))
            .json(&one)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Two RATE_LIMITED events before connecting (replayed), one after (live).
    for client in ["w0", "w1"] {
        check(&c, &server, client).await;
        assert_eq!(check(&c, &server, client).await, 429);
    }
    let url = server
        .url("/v1/alerts/ws?last_event_id=0&types=RATE_LIMITED")
        .replacen("http://", "ws://", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut received = Vec::new();
    let mut triggered = false;
    while received.len() < 3 {
        if received.len() == 2 && !triggered {
            check(&c, &server, "w2").await;
            assert_eq!(check(&c, &server, "w2").await, 429);
            triggered = true;
        }
        let v = next_ws_json(&mut ws).await;
        received.push((
            v["event_id"].as_u64().unwrap(),
            v["client_id"].as_str().unwrap().to_string(),
            v["stream_id"].as_str().unwrap().to_string(),
        ));
    }
    let clients: Vec<&str> = received.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(clients, ["w0", "w1", "w2"]);
    assert!(received.windows(2).all(|w| w[0].0 < w[1].0));
    ws.send(Message::Close(None)).await.unwrap();
    // Each message carries its resume position: reconnected with the
    // first one's, the socket gets exactly the two after it.
    let url = server
        .url(&format!(
            "/v1/alerts/ws?types=RATE_LIMITED&last_event_id={}",
            received[0].2
        ))
        .replacen("http://", "ws://", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut resumed = Vec::new();
    while resumed.len() < 2 {
        let v = next_ws_json(&mut ws).await;
        resumed.push(v["client_id"].as_str().unwrap().to_string());
    }
    assert_eq!(resumed, ["w1", "w2"]);
    // Nothing more: no third event replayed.
    let more = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(!matches!(more, Ok(Some(Ok(Message::Text(_))))), "{more:?}");
    ws.send(Message::Close(None)).await.unwrap();
}

fn request_lines(n: usize, now: i64) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"event_id":"r{i}","client_id":"c{}","endpoint":"/v1/e{}","status":{},"latency_ms":{}.5,"timestamp":{}}}"#,
                i % 4,
                i % 3,
                if i % 5 == 0 { 503 } else { 200 },
                i % 7,
                now + i as i64
            )
        })
        .collect()
}

async fn recorded(c: &reqwest::Client, server: &Server, n: usize) -> Vec<Value> {
    let mut reader = SseReader::open(
        c,
        server.url("/v1/alerts/stream?types=REQUEST_RECORDED"),
        Some(0),
    )
    .await;
    reader
        .take(n)
        .await
        .into_iter()
        .map(|(_, _, d)| d)
        .collect()
}

/// `REQUEST_RECORDED` is opt-in: at rate 1 every accepted event is on the
/// channel, with its fields; duplicates are not; at a lower rate the same
/// input samples the same events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_requests_are_recorded_on_the_channel() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let all = dir.path().join("all.toml");
    std::fs::write(&all, "[alerts]\nrequest_sample_rate = 1.0\n").unwrap();
    let server = Server::start(&dir.path().join("a"), &["--config", all.to_str().unwrap()]);
    let mut lines = request_lines(40, now);
    lines.push(lines[3].clone()); // a duplicate is not recorded twice
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let got = recorded(&c, &server, 40).await;
    let mut by_id: Vec<(String, String, u64)> = got
        .iter()
        .map(|d| {
            (
                d["details"]["event_id"].as_str().unwrap().to_string(),
                d["client_id"].as_str().unwrap().to_string(),
                d["details"]["status"].as_u64().unwrap(),
            )
        })
        .collect();
    by_id.sort();
    let mut want: Vec<(String, String, u64)> = (0..40)
        .map(|i| {
            (
                format!("r{i}"),
                format!("c{}", i % 4),
                if i % 5 == 0 { 503 } else { 200 },
            )
        })
        .collect();
    want.sort();
    assert_eq!(by_id, want);
    // Nothing beyond the 40 (the duplicate): a later marker event comes
    // right after them.
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(format!(
            r#"{{"event_id":"marker","client_id":"m","endpoint":"/m","status":200,"latency_ms":1,"timestamp":{now}}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let again = recorded(&c, &server, 41).await;
    assert_eq!(again[40]["details"]["event_id"], "marker");

    // A third of 600: the same events on two fresh servers.
    let third = dir.path().join("third.toml");
    std::fs::write(&third, "[alerts]\nrequest_sample_rate = 0.33\n").unwrap();
    let lines = request_lines(600, now);
    let mut samples = Vec::new();
    for name in ["b", "c"] {
        let server = Server::start(
            &dir.path().join(name),
            &["--config", third.to_str().unwrap()],
        );
        let r = c
            .post(server.url("/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(lines.join("\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        // Everything logged so far, read without waiting for a count.
        let alerts = {
            let mut reader = SseReader::open(
                &c,
                server.url("/v1/alerts/stream?types=REQUEST_RECORDED"),
                Some(0),
            )
            .await;
            // Everything was logged before the 202: read until the
            // replay has nothing more.
            let mut ids: Vec<String> = Vec::new();
            while let Some((_, _, d)) = reader.next_within(Duration::from_secs(2)).await {
                ids.push(d["details"]["event_id"].as_str().unwrap().to_string());
            }
            ids
        };
        // Binomial(600, 0.33): mean 198, sd 11.5; beyond 5 sd either side
        // would mean the rate is not applied.
        assert!((140..=256).contains(&alerts.len()), "{}", alerts.len());
        // Shards interleave differently from run to run; the set is fixed.
        let mut alerts = alerts;
        alerts.sort();
        samples.push(alerts);
    }
    assert_eq!(samples[0], samples[1]);
}
