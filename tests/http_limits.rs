//! Gateway checks, limit configuration and quotas over a real socket:
//! exact under concurrency, the same decisions across restarts, quota
//! usage equal to the usage queries, quota events once per period.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde_json::{json, Value};
use support::*;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn put(c: &reqwest::Client, server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = c.put(server.url(path)).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn check(
    c: &reqwest::Client,
    server: &Server,
    client: &str,
    endpoint: &str,
    cost: u64,
) -> reqwest::Response {
    c.post(server.url("/v1/check"))
        .json(&json!({"client_id": client, "endpoint": endpoint, "cost": cost}))
        .send()
        .await
        .unwrap()
}

/// Fixed windows are aligned to the epoch: keep a test away from the end
/// of the current hour so that it never straddles two windows.
async fn away_from_hour_end() {
    let into_hour = now_ms().rem_euclid(HOUR);
    if HOUR - into_hour < 30_000 {
        tokio::time::sleep(Duration::from_millis((HOUR - into_hour + 1_000) as u64)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_never_admit_more_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    away_from_hour_end().await;
    let fixed = json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 100, "window_seconds": 3600}});
    assert_eq!(
        put(&c, &server, "/v1/clients/fw/limits", fixed).await.0,
        200
    );
    // 50 tokens, refilled at 50 per 100 hours: nothing refills in the test.
    let bucket = json!({"algorithm": "TOKEN_BUCKET", "global_limit": {"requests": 50, "window_seconds": 360000}});
    assert_eq!(
        put(&c, &server, "/v1/clients/tb/limits", bucket).await.0,
        200
    );

    for (client, cost, attempts, expected_allowed) in
        [("fw", 1u64, 500usize, 100usize), ("tb", 2, 300, 25)]
    {
        let answers =
            join_all((0..attempts).map(|_| check(&c, &server, client, "/v1/items", cost))).await;
        let mut allowed = 0;
        for r in answers {
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body: Value = r.json().await.unwrap();
            assert!(headers.contains_key("ratelimit-policy"), "{headers:?}");
            assert!(headers.contains_key("ratelimit"), "{headers:?}");
            match status {
                200 => {
                    allowed += 1;
                    assert_eq!(body["allowed"], true);
                }
                429 => {
                    assert_eq!(body["allowed"], false);
                    assert_eq!(body["reason"], "rate_limit");
                    assert_eq!(body["remaining"], 0);
                    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                    assert!(retry >= 1, "Retry-After {retry}");
                    assert_eq!(body["retry_after_seconds"].as_u64(), Some(retry));
                }
                other => panic!("unexpected status {other}: {body}"),
            }
        }
        assert_eq!(allowed, expected_allowed, "{client}: admitted {allowed}");
    }
    // The policy headers name the deciding limit.
    let r = check(&c, &server, "fw", "/v1/items", 1).await;
    assert_eq!(r.headers()["ratelimit-policy"], "\"global\";q=100;w=3600");
    let status: Value = c
        .get(server.url("/v1/clients/fw/limits/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (status["limit"].as_u64(), status["remaining"].as_u64()),
        (Some(100), Some(0))
    );
    assert_eq!(status["algorithm"], "FIXED_WINDOW");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_survive_restarts_and_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = client();
    let mut server = Server::start(&data, &[]);
    // Capacity 10, one token per hour: 10 of any 14 checks pass, whatever
    // restarts happen in between.
    let bucket = json!({"algorithm": "TOKEN_BUCKET", "global_limit": {"requests": 10, "window_seconds": 36000}});
    assert_eq!(
        put(&c, &server, "/v1/clients/r/limits", bucket).await.0,
        200
    );
    let mut decisions = Vec::new();
    for step in 0..14 {
        decisions.push(check(&c, &server, "r", "/x", 1).await.status().as_u16());
        if step == 5 {
            assert!(server.stop().success());
            server = Server::start(&data, &[]);
        }
        if step == 8 {
            // Killed once the shard says the decisions so far are durable.
            let after = now_ms();
            let p = tally_pipelines::partitioner::partition_for("r", 12) as usize;
            loop {
                let health: Value = c
                    .get(server.url("/health/detailed"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if health["partitions"][p]["durable_before_ms"]
                    .as_i64()
                    .is_some_and(|t| t > after)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.kill();
            server = Server::start(&data, &[]);
        }
    }
    let expected: Vec<u16> = (0..14).map(|i| if i < 10 { 200 } else { 429 }).collect();
    assert_eq!(decisions, expected);
    // The configuration survived too.
    let limits: Value = c
        .get(server.url("/v1/clients/r/limits"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limits["limits"]["algorithm"], "TOKEN_BUCKET");
    assert_eq!(limits["source"], "client");
    // Resetting the counters lets the client through again.
    let r = c
        .delete(server.url("/v1/clients/r/limits/counters"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(check(&c, &server, "r", "/x", 1).await.status(), 200);
}

fn event(client: &str, bytes: u64, i: usize) -> String {
    format!(
        r#"{{"event_id":"q-{i}","client_id":"{client}","endpoint":"/v1/a","status":200,"request_bytes":{bytes},"response_bytes":0,"latency_ms":1.5,"timestamp":{}}}"#,
        now_ms()
    )
}

async fn ingest(c: &reqwest::Client, server: &Server, lines: Vec<String>) {
    let r = c
        .post(server.url("/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

fn quota_events(metrics: &str, kind: &str) -> f64 {
    metric_value(
        metrics,
        "tally_quota_events_total",
        &format!("type=\"{kind}\""),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_count_events_deny_when_exceeded_and_alert_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let quota = json!({"monthly_request_limit": 40, "monthly_data_transfer_bytes": 1_000_000, "warning_threshold_percent": 80});
    assert_eq!(put(&c, &server, "/v1/clients/q/quota", quota).await.0, 200);
    let limits = json!({"algorithm": "SLIDING_WINDOW", "global_limit": {"requests": 1000, "window_seconds": 60}});
    assert_eq!(
        put(&c, &server, "/v1/clients/q/limits", limits).await.0,
        200
    );

    let mut n = 0;
    let mut send = |count: usize| {
        let lines: Vec<String> = (n..n + count).map(|i| event("q", 100, i)).collect();
        n += count;
        lines
    };
    // (events sent so far, warning events, exceeded events, check status)
    let steps = [
        (30usize, 0.0, 0.0, 200u16),
        (32, 1.0, 0.0, 200),
        (42, 1.0, 1.0, 429),
        (47, 1.0, 1.0, 429),
    ];
    let mut sent = 0;
    for (total, warnings, exceeded, check_status) in steps {
        ingest(&c, &server, send(total - sent)).await;
        sent = total;
        let status: Value = c
            .get(server.url("/v1/clients/q/quota/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let usage: Value = c
            .get(server.url("/v1/clients/q/usage?period=month"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // The quota counts exactly what the usage query counts.
        assert_eq!(
            status["requests_used"].as_u64(),
            Some(total as u64),
            "{status}"
        );
        assert_eq!(
            status["requests_used"], usage["total_requests"],
            "{status} {usage}"
        );
        assert_eq!(
            status["data_transfer_used"],
            usage["total_data_transfer_bytes"]
        );
        assert_eq!(
            status["requests_remaining"].as_u64(),
            Some(40u64.saturating_sub(total as u64))
        );
        assert_eq!(status["is_exceeded"], total >= 40);
        assert_eq!(status["is_warning"], total >= 32);
        let metrics = metrics_text(&c, &server).await;
        assert_eq!(
            quota_events(&metrics, "QUOTA_WARNING"),
            warnings,
            "after {total}"
        );
        assert_eq!(
            quota_events(&metrics, "QUOTA_EXCEEDED"),
            exceeded,
            "after {total}"
        );
        let r = check(&c, &server, "q", "/v1/a", 1).await;
        assert_eq!(r.status().as_u16(), check_status, "after {total}");
        if check_status == 429 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["reason"], "quota");
            assert_eq!(body["policy"], "quota");
        }
    }
    // A soft quota allows and marks the overage.
    let soft = json!({"monthly_request_limit": 40, "hard_limit": false});
    assert_eq!(put(&c, &server, "/v1/clients/q/quota", soft).await.0, 200);
    let body: Value = check(&c, &server, "q", "/v1/a", 1)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (body["allowed"].clone(), body["quota_overage"].clone()),
        (json!(true), json!(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurations_are_validated_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let bad = json!({"algorithm": "LEAKY_BUCKET", "global_limit": {"requests": 0, "window_seconds": 0},
        "endpoint_limits": {"/a": {"requests": 5, "window_seconds": 99999999}}});
    let (code, body) = put(&c, &server, "/v1/clients/v/limits", bad).await;
    assert_eq!(code, 400);
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "global_limit.requests",
            "global_limit.window_seconds",
            "endpoint_limits[\"/a\"].window_seconds"
        ]
    );
    let (code, body) = put(
        &c,
        &server,
        "/v1/clients/v/limits",
        json!({"algorithm": "GCRA", "global_limit": {"requests": 1, "window_seconds": 1}}),
    )
    .await;
    assert_eq!(code, 400);
    assert!(body["detail"].as_str().unwrap().contains("GCRA"), "{body}");
    let (code, body) = put(
        &c,
        &server,
        "/v1/clients/v/quota",
        json!({"reset_day": 40, "warning_threshold_percent": 0}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(body["errors"].as_array().unwrap().len(), 3, "{body}");
    let r = c
        .post(server.url("/v1/check"))
        .json(&json!({"client_id": "", "endpoint": "/x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Unconfigured clients are not limited (no default configured).
    let body: Value = check(&c, &server, "free", "/x", 1)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (body["allowed"].clone(), body["policy"].clone()),
        (json!(true), json!("none"))
    );
    let r = c
        .get(server.url("/v1/clients/free/limits"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Gateways report queue health; the factor halves limits above 80 %.
    let (code, body) = put(&c, &server, "/v1/queue-health", json!({"utilization": 0.9})).await;
    assert_eq!((code, body["adaptive_factor"].as_f64()), (200, Some(0.5)));
    let tight = json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 10, "window_seconds": 3600}});
    assert_eq!(
        put(&c, &server, "/v1/clients/ad/limits", tight).await.0,
        200
    );
    away_from_hour_end().await;
    let mut passed = 0;
    for _ in 0..10 {
        if check(&c, &server, "ad", "/x", 1).await.status() == 200 {
            passed += 1;
        }
    }
    assert_eq!(passed, 5, "a factor of 0.5 admits half of 10");
    let (_, body) = put(&c, &server, "/v1/queue-health", json!({"utilization": 0.2})).await;
    assert_eq!(body["adaptive_factor"].as_f64(), Some(1.0));
    let metrics = metrics_text(&c, &server).await;
    assert_eq!(
        metric_value(&metrics, "tally_rate_limit_factor", ""),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_clients_get_the_answers_they_would_have_had_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    // One limiter per shard in memory: every check below evicts another
    // client's state, which must come back exactly.
    let config = dir.path().join("tally.toml");
    std::fs::write(
        &config,
        r#"
[limits]
max_clients = 12
[limits.default]
algorithm = "TOKEN_BUCKET"
global_limit = { requests = 3, window_seconds = 36000 }
"#,
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let c = client();
    for round in 0..5 {
        for i in 0..30 {
            let r = check(&c, &server, &format!("evict-{i}"), "/x", 1).await;
            // Capacity 3, one token per 3.3 hours: rounds 0..3 pass.
            let want = if round < 3 { 200 } else { 429 };
            assert_eq!(r.status().as_u16(), want, "client {i} round {round}");
        }
    }
    let limits: Value = c
        .get(server.url("/v1/clients/evict-1/limits"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limits["source"], "default");
}
