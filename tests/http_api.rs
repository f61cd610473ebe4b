//! The HTTP contract: body formats, per-event errors with positions,
//! problem+json, limits, request ids, client ids in any UTF-8.

mod support;

use serde_json::{json, Value};
use support::*;

fn event(client: &str, id: &str, status: u16, ts: i64) -> Value {
    json!({"event_id": id, "client_id": client, "endpoint": "/v1/things/{id}", "status": status,
           "request_bytes": 100, "response_bytes": 1000, "latency_ms": 12.5, "timestamp": ts})
}

async fn post(
    c: &reqwest::Client,
    server: &Server,
    ct: &str,
    body: String,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = c
        .post(server.url("/v1/events"))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

async fn total(c: &reqwest::Client, server: &Server, client: &str) -> u64 {
    let url = server.url(&format!(
        "/v1/clients/{}/usage?period=day&at={}",
        encode_path(client),
        START_MS
    ));
    let v: Value = c.get(url).send().await.unwrap().json().await.unwrap();
    v["total_requests"].as_u64().unwrap()
}

#[tokio::test]
async fn every_body_format_is_accepted_with_positions_for_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    let t = START_MS + 1000;

    // One object.
    let (s, _, r) = post(
        &c,
        &server,
        "application/json",
        event("fmt", "o1", 200, t).to_string(),
    )
    .await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(1)));

    // An array with a bad element in the middle: the good ones count.
    let body = json!([event("fmt", "a1", 200, t), {"client_id": "fmt", "status": 200}, event("fmt", "a2", 500, t)]);
    let (s, _, r) = post(&c, &server, "application/json", body.to_string()).await;
    assert_eq!(s, 202);
    assert_eq!(r["accepted"], 2);
    assert_eq!(r["rejected"], 1);
    assert_eq!(r["errors"][0]["index"], 1);
    assert_eq!(
        r["errors"][0]["reason"],
        "missing required field `endpoint`"
    );

    // NDJSON: indices are line numbers.
    let body = format!(
        "{}\n{{not json\n{}\n",
        event("fmt", "n1", 200, t),
        json!({"client_id": "", "endpoint": "/x", "status": 200, "latency_ms": 1, "timestamp": t})
    );
    let (s, _, r) = post(&c, &server, "application/x-ndjson", body).await;
    assert_eq!(s, 202);
    assert_eq!(r["accepted"], 1);
    let errors = r["errors"].as_array().unwrap();
    assert_eq!(errors[0]["index"], 1);
    assert!(errors[0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("malformed JSON"));
    assert_eq!(errors[1]["index"], 2);
    assert_eq!(errors[1]["reason"], "`client_id` must not be empty");

    // CloudEvents, structured and batch; `id` is the event id.
    let ce = |id: &str| {
        json!({"specversion": "1.0", "type": "tally.request.v1", "source": "gw", "id": id,
        "time": "2026-03-02T00:00:01Z", "data": {"client_id": "fmt", "endpoint": "/ce", "status": 201, "latency_ms": 4}})
    };
    let (s, _, r) = post(
        &c,
        &server,
        "application/cloudevents+json",
        ce("ce-1").to_string(),
    )
    .await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(1)));
    let (s, _, r) = post(
        &c,
        &server,
        "application/cloudevents-batch+json",
        json!([ce("ce-2"), ce("ce-1")]).to_string(),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(
        (r["accepted"].as_u64(), r["duplicates"].as_u64()),
        (Some(1), Some(1))
    );

    // Validation reasons.
    for (body, reason) in [
        (json!({"client_id": "x".repeat(257), "endpoint": "/x", "status": 200, "latency_ms": 1, "timestamp": t}), "`client_id` is 257 bytes, the limit is 256"),
        (json!({"client_id": "v", "endpoint": "/x", "status": 600, "latency_ms": 1, "timestamp": t}), "`status` 600 is outside 100..=599"),
        (json!({"client_id": "v", "endpoint": "/x", "status": 200, "latency_ms": -0.5, "timestamp": t}), "`latency_ms` must be finite and >= 0, got -0.5"),
        (json!({"client_id": "v", "endpoint": "/x", "status": 200, "latency_ms": 1, "timestamp": true}), "wrong type for `timestamp`: expected epoch milliseconds or RFC 3339 string, got boolean"),
        (json!({"client_id": 7, "endpoint": "/x", "status": 200, "latency_ms": 1, "timestamp": t}), "wrong type for `client_id`: expected string, got number"),
    ] {
        let (s, _, r) = post(&c, &server, "application/json", json!([body]).to_string()).await;
        assert_eq!(s, 202);
        assert_eq!(r["errors"][0]["reason"], reason);
    }
    assert_eq!(total(&c, &server, "fmt").await, 6);
    assert_eq!(total(&c, &server, "v").await, 0);
}

#[tokio::test]
async fn problems_limits_and_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("d"), &["--max-body-bytes", "4096"]);
    let c = client();

    // Body over the limit: 413 problem+json.
    let big = "x".repeat(10_000);
    let (s, h, r) = post(&c, &server, "application/json", big).await;
    assert_eq!(s, 413);
    assert_eq!(h["content-type"], "application/problem+json");
    assert_eq!(r["status"], 413);
    assert_eq!(r["instance"], "/v1/events");

    // Malformed JSON body and unsupported media type.
    let (s, _, r) = post(&c, &server, "application/json", "[{\"a\":".into()).await;
    assert_eq!(s, 400);
    assert!(r["detail"]
        .as_str()
        .unwrap()
        .starts_with("malformed JSON body"));
    let (s, _, _) = post(&c, &server, "application/xml", "<e/>".into()).await;
    assert_eq!(s, 415);

    // Bad query parameters are all reported.
    let resp = c
        .get(server.url("/v1/clients/a/usage?period=year&at=soon"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["errors"].as_array().unwrap().len(), 2);

    // Unknown route: problem+json 404. Request ids are echoed or made.
    let resp = c
        .get(server.url("/v1/nope"))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    let resp = c.get(server.url("/health/live")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers()["x-request-id"].is_empty());
    assert_eq!(
        c.get(server.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn any_utf8_client_id_round_trips_through_paths() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    let ids = ["клиент-1", "a/b c", "x%y?#&=", "emoji-🚀"];
    let body: Vec<Value> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| (0..=i).map(move |k| event(id, &format!("{i}-{k}"), 200, START_MS + 5)))
        .collect();
    let (s, _, r) = post(
        &c,
        &server,
        "application/json",
        Value::Array(body).to_string(),
    )
    .await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(10)));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(total(&c, &server, id).await, i as u64 + 1, "{id}");
        let url = server.url(&format!(
            "/v1/clients/{}/usage?period=day&at={START_MS}",
            encode_path(id)
        ));
        let v: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["client_id"], *id);
    }
    // A client never seen has zero usage, not 404.
    let v: Value = c
        .get(server.url("/v1/clients/never-seen/usage?period=month"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total_requests"], 0);
    assert_eq!(v["p99_latency_ms"], 0.0);
    assert_eq!(v["unique_endpoints"], 0);
}

#[tokio::test]
async fn periods_follow_the_utc_calendar() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("d"), &[]);
    let c = client();
    // Sunday 2026-03-01 23:59:30 and Monday 2026-03-02 00:00:30: different
    // weeks, different days, same month. 2026-02-28 is another month.
    let sun = START_MS - 30_000;
    let mon = START_MS + 30_000;
    let feb = START_MS - DAY - 1000;
    let body = json!([
        event("cal", "1", 200, feb),
        event("cal", "2", 200, sun),
        event("cal", "3", 200, mon)
    ]);
    let (s, _, r) = post(&c, &server, "application/json", body.to_string()).await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(3)));
    let q = |period: &str, at: &str| {
        let c = c.clone();
        let url = server.url(&format!(
            "/v1/clients/cal/usage?period={period}&at={}",
            encode_path(at)
        ));
        async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let week = q("week", "2026-03-02T12:00:00Z").await;
    assert_eq!(week["total_requests"], 1);
    assert_eq!(week["period_start"], "2026-03-02T00:00:00.000Z");
    assert_eq!(week["period_end"], "2026-03-09T00:00:00.000Z");
    assert_eq!(q("week", "2026-03-01T12:00:00Z").await["total_requests"], 2);
    assert_eq!(
        q("month", "2026-03-15T00:00:00Z").await["total_requests"],
        2
    );
    assert_eq!(
        q("month", "2026-02-10T00:00:00Z").await["total_requests"],
        1
    );
    assert_eq!(q("day", &START_MS.to_string()).await["total_requests"], 1);
    let hour = q("hour", "2026-03-01T23:00:00+00:00").await;
    assert_eq!(hour["total_requests"], 1);
    assert_eq!(hour["period_end"], "2026-03-02T00:00:00.000Z");
}
