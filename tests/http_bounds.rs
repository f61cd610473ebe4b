//! Bounds over a real socket: load shedding before a body is read,
//! capped subscriptions and webhooks, cursor pagination of the lists, and
//! problem+json for every error, the HTTP layer's own included.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::*;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn event(client: &str, ts: i64, latency: &str) -> String {
    format!(
        r#"{{"client_id":"{client}","endpoint":"/v1/a","status":200,"latency_ms":{latency},"timestamp":{ts}}}"#
    )
}

async fn post(c: &reqwest::Client, server: &Server, body: String) -> (u16, Value) {
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, server: &Server, path: &str) -> (u16, Value) {
    let r = c.get(server.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_error_is_problem_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--max-body-bytes", "2048"]);
    let c = client();
    let big = "x".repeat(4096);
    let cases: Vec<(u16, reqwest::RequestBuilder)> = vec![
        (413, c.post(server.url("/v1/events")).body(big.clone())),
        (
            414,
            c.get(server.url(&format!(
                "/v1/clients/c/usage?period=day&x={}",
                "y".repeat(9000)
            ))),
        ),
        (404, c.get(server.url("/v1/nothing-here"))),
        (405, c.delete(server.url("/v1/events"))),
        (
            400,
            c.get(server.url("/v1/clients/c/usage?period=fortnight")),
        ),
        (
            415,
            c.post(server.url("/v1/events"))
                .header("content-type", "application/xml")
                .body("<e/>"),
        ),
        (
            400,
            c.put(server.url("/v1/clients/c/limits"))
                .header("content-type", "application/json")
                .body("{not json"),
        ),
    ];
    for (want, request) in cases {
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "{body}");
        assert_eq!(
            ct.as_deref(),
            Some("application/problem+json"),
            "{want}: {body}"
        );
        assert_eq!(body["status"].as_u64(), Some(u64::from(want)), "{body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
        assert!(body["instance"].as_str().is_some(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_beyond_the_in_flight_cap_is_shed_with_retry_after() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--max-ingest-requests", "1"]);
    let c = client();
    // A body that announces 1000 bytes and sends none holds the one slot.
    let addr = server.base.trim_start_matches("http://").to_string();
    // It holds the slot once the server has taken it and not answered (a
    // body that arrived while another held the slot is itself shed).
    let slow = loop {
        use std::io::Read;
        let mut slow = std::net::TcpStream::connect(&addr).unwrap();
        slow.write_all(
            b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-ndjson\r\ncontent-length: 1000\r\n\r\n",
        )
        .unwrap();
        slow.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        match slow.read(&mut buf) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break slow
            }
            _ => continue,
        }
    };
    let mut shed = None;
    let mut seen = Vec::new();
    for _ in 0..100 {
        let r = c
            .post(server.url("/v1/events"))
            .body(event("s", now_ms(), "1"))
            .send()
            .await
            .unwrap();
        seen.push(r.status().as_u16());
        if r.status() == 503 {
            shed = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = shed.unwrap_or_else(|| {
        panic!("the second body is shed while the first holds the slot: {seen:?}")
    });
    assert_eq!(r.headers()["retry-after"], "1");
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("in flight"),
        "{problem}"
    );
    drop(slow);
    // The slot comes back.
    let mut accepted = false;
    for _ in 0..100 {
        let (status, _) = post(&c, &server, event("s", now_ms(), "1")).await;
        if status == 202 {
            accepted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_page_through_every_partition_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let now = now_ms();
    // Move every partition's clock with one event per client, then send
    // late events (an hour back) for the same clients.
    let clients: Vec<String> = (0..30).map(|i| format!("dl-{i}")).collect();
    let fresh: Vec<String> = clients.iter().map(|cl| event(cl, now, "1")).collect();
    post(&c, &server, fresh.join("\n")).await;
    let late: Vec<String> = clients
        .iter()
        .flat_map(|cl| (0..2).map(move |i| event(cl, now - HOUR - i, "1")))
        .collect();
    let (_, body) = post(&c, &server, late.join("\n")).await;
    assert_eq!(body["late"].as_u64(), Some(60), "{body}");
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/v1/dead-letters?limit=7&cursor={cur}"),
            None => "/v1/dead-letters?limit=7".to_string(),
        };
        let (status, page) = get(&c, &server, &path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["dead_letters"].as_array().unwrap();
        assert!(items.len() <= 7);
        for item in items {
            seen.push((
                item["recorded_at"].as_str().unwrap().to_string(),
                item["partition"].as_u64().unwrap(),
                item["sequence"].as_u64().unwrap(),
            ));
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
        assert!(pages < 50, "pagination does not end");
    }
    assert_eq!(seen.len(), 60, "every dead letter once");
    assert_eq!(unique(&seen), 60);
    // Newest first across pages.
    assert!(seen.windows(2).all(|w| w[0].0 >= w[1].0), "{seen:?}");
    let (status, _) = get(&c, &server, "/v1/dead-letters?cursor=garbage").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_capped_and_listed_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--max-webhooks", "3", "--webhook-allow", "127.0.0.1/32"],
    );
    let c = client();
    let config = json!({
        "url": "http://127.0.0.1:9/hook",
        "secret": "a-secret-of-sixteen-bytes-or-more",
        "event_types": ["RATE_LIMITED"],
    });
    for id in ["w-c", "w-a", "w-b"] {
        let r = c
            .put(server.url(&format!("/v1/webhooks/{id}")))
            .json(&config)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    // A fourth is refused; replacing one of the three is not.
    let r = c
        .put(server.url("/v1/webhooks/w-d"))
        .json(&config)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("max_webhooks"),
        "{problem}"
    );
    let r = c
        .put(server.url("/v1/webhooks/w-a"))
        .json(&config)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, first) = get(&c, &server, "/v1/webhooks?limit=2").await;
    let ids = |page: &Value| -> Vec<String> {
        page["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&first), vec!["w-a", "w-b"], "{first}");
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = get(
        &c,
        &server,
        &format!("/v1/webhooks?limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(ids(&second), vec!["w-c"]);
    assert!(second["next_cursor"].is_null(), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_subscriptions_beyond_the_cap_are_refused_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &["--max-subscribers", "1"]);
    let c = client();
    let open = c.get(server.url("/v1/alerts/stream")).send().await.unwrap();
    assert_eq!(open.status(), 200);
    let refused = c.get(server.url("/v1/alerts/stream")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("max_subscribers"),
        "{problem}"
    );
    drop(open);
    let mut reopened = false;
    for _ in 0..100 {
        let r = c.get(server.url("/v1/alerts/stream")).send().await.unwrap();
        if r.status() == 200 {
            reopened = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(reopened, "the slot comes back when the stream closes");
}
