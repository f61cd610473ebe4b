//! Optimistic concurrency on every control change over a real socket:
//! limits, quotas and webhooks each carry a version (ETag); a change with
//! `If-Match` naming another version gets 412 and changes nothing; each
//! thing counts its own versions; changes and refusals are audited; the
//! projection a restarted instance rebuilds from its log answers the same
//! versions and the same configuration.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, offline_key, Server};

struct Answer {
    status: u16,
    etag: Option<String>,
    body: Value,
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    if_match: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut req = c.request(method, url).bearer_auth(key);
    if let Some(v) = if_match {
        req = req.header("if-match", v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    Answer {
        status,
        etag,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

fn limit(requests: u64) -> Value {
    json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": requests, "window_seconds": 60}})
}

fn hook(event_type: &str) -> Value {
    json!({"url": "http://127.0.0.1:9/hook", "secret": "s3cret-value-0123456789", "event_types": [event_type]})
}

#[tokio::test]
async fn every_control_change_takes_if_match_and_a_stale_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let admin_id = admin[4..16].to_string();
    let args = ["--webhook-allow", "127.0.0.1/32"];
    let server = Server::start(&data, &args);
    let c = client();
    let (get, put, delete) = (
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    );
    let limits_url = server.url("/v1/clients/acme%2Fus/limits");
    let quota_url = server.url("/v1/clients/acme%2Fus/quota");
    let hook_url = server.url("/v1/webhooks/billing-hook");

    // Limits: created at version 0 -> 1; a second writer who also read 0
    // is refused and the first writer's limits stand.
    let a = call(
        &c,
        put.clone(),
        limits_url.clone(),
        &admin,
        Some("\"0\""),
        Some(limit(100)),
    )
    .await;
    assert_eq!(
        (a.status, a.etag.as_deref()),
        (200, Some("\"1\"")),
        "{}",
        a.body
    );
    let b = call(
        &c,
        put.clone(),
        limits_url.clone(),
        &admin,
        Some("\"0\""),
        Some(limit(5)),
    )
    .await;
    assert_eq!(b.status, 412, "{}", b.body);
    assert_eq!(b.body["status"], 412);
    let now = call(&c, get.clone(), limits_url.clone(), &admin, None, None).await;
    assert_eq!(now.etag.as_deref(), Some("\"1\""));
    assert_eq!(now.body["limits"]["global_limit"]["requests"], 100);
    // The limiter follows the winner: 100 per minute, not 5.
    for _ in 0..6 {
        let r = c
            .post(server.url("/v1/check"))
            .bearer_auth(&admin)
            .json(&json!({"client_id": "acme/us", "endpoint": "/x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // With the version read: taken. Without If-Match: unconditional.
    let a = call(
        &c,
        put.clone(),
        limits_url.clone(),
        &admin,
        Some("W/\"1\""),
        Some(limit(200)),
    )
    .await;
    assert_eq!(
        (a.status, a.etag.as_deref()),
        (200, Some("\"2\"")),
        "{}",
        a.body
    );
    let a = call(
        &c,
        put.clone(),
        limits_url.clone(),
        &admin,
        None,
        Some(limit(300)),
    )
    .await;
    assert_eq!((a.status, a.etag.as_deref()), (200, Some("\"3\"")));
    let a = call(
        &c,
        put.clone(),
        limits_url.clone(),
        &admin,
        Some("three"),
        Some(limit(1)),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);

    // The quota is its own thing: version 0 although the limits are at 3.
    let q = json!({"monthly_request_limit": 1000, "reset_day": 1});
    let a = call(
        &c,
        put.clone(),
        quota_url.clone(),
        &admin,
        Some("\"3\""),
        Some(q.clone()),
    )
    .await;
    assert_eq!(a.status, 412, "{}", a.body);
    let a = call(
        &c,
        put.clone(),
        quota_url.clone(),
        &admin,
        Some("\"0\""),
        Some(q.clone()),
    )
    .await;
    assert_eq!(
        (a.status, a.etag.as_deref()),
        (200, Some("\"1\"")),
        "{}",
        a.body
    );

    // Webhooks: created, a stale replacement and a stale deletion refused
    // (the webhook stays as it was), deleted at its version, and a writer
    // who read the deleted webhook cannot bring it back unawares.
    let a = call(
        &c,
        put.clone(),
        hook_url.clone(),
        &admin,
        Some("\"0\""),
        Some(hook("RATE_LIMITED")),
    )
    .await;
    assert_eq!(
        (a.status, a.etag.as_deref()),
        (201, Some("\"1\"")),
        "{}",
        a.body
    );
    assert!(a.body.get("secret").is_none());
    let a = call(
        &c,
        put.clone(),
        hook_url.clone(),
        &admin,
        Some("\"0\""),
        Some(hook("QUOTA_EXCEEDED")),
    )
    .await;
    assert_eq!(a.status, 412, "{}", a.body);
    let a = call(
        &c,
        delete.clone(),
        hook_url.clone(),
        &admin,
        Some("\"0\""),
        None,
    )
    .await;
    assert_eq!(a.status, 412, "{}", a.body);
    let shown = call(&c, get.clone(), hook_url.clone(), &admin, None, None).await;
    assert_eq!(shown.etag.as_deref(), Some("\"1\""));
    assert_eq!(shown.body["event_types"], json!(["RATE_LIMITED"]));
    let a = call(
        &c,
        delete.clone(),
        hook_url.clone(),
        &admin,
        Some("\"1\""),
        None,
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(
        call(&c, get.clone(), hook_url.clone(), &admin, None, None)
            .await
            .status,
        404
    );
    let a = call(
        &c,
        put.clone(),
        hook_url.clone(),
        &admin,
        Some("\"1\""),
        Some(hook("RATE_LIMITED")),
    )
    .await;
    assert_eq!(a.status, 412, "{}", a.body);
    // A second webhook, kept.
    let kept_url = server.url("/v1/webhooks/kept");
    let a = call(
        &c,
        put.clone(),
        kept_url.clone(),
        &admin,
        None,
        Some(hook("QUOTA_EXCEEDED")),
    )
    .await;
    assert_eq!((a.status, a.etag.as_deref()), (201, Some("\"1\"")));

    // The audit trail has each change once, by the admin, and each
    // refused one as stale (written behind the request path: polled).
    let mut records = vec![];
    for _ in 0..100 {
        let v = call(
            &c,
            get.clone(),
            server.url("/v1/audit?action=webhook.set"),
            &admin,
            None,
            None,
        )
        .await;
        records = v.body["records"].as_array().cloned().unwrap_or_default();
        if records.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let results: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["target"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        vec![
            ("kept", "applied"),
            ("billing-hook", "stale_version"),
            ("billing-hook", "stale_version"),
            ("billing-hook", "applied"),
        ],
        "newest first: {records:?}"
    );
    assert!(records.iter().all(|r| r["actor"] == admin_id.as_str()));
    let v = call(
        &c,
        get.clone(),
        server.url("/v1/audit?action=webhook.delete"),
        &admin,
        None,
        None,
    )
    .await;
    let deletions: Vec<&str> = v.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(deletions, vec!["applied", "stale_version"]);
    // Nothing in the log or the audit holds the secret.
    let audit_text = call(
        &c,
        get.clone(),
        server.url("/v1/audit?limit=1000"),
        &admin,
        None,
        None,
    )
    .await
    .body
    .to_string();
    assert!(!audit_text.contains("s3cret-value-0123456789"));

    // Restarted, the instance rebuilds the same projection from its log.
    server.stop();
    let server = Server::start(&data, &args);
    let l = call(
        &c,
        get.clone(),
        server.url("/v1/clients/acme%2Fus/limits"),
        &admin,
        None,
        None,
    )
    .await;
    assert_eq!(l.etag.as_deref(), Some("\"3\""));
    assert_eq!(l.body["limits"]["global_limit"]["requests"], 300);
    let q = call(
        &c,
        get.clone(),
        server.url("/v1/clients/acme%2Fus/quota"),
        &admin,
        None,
        None,
    )
    .await;
    assert_eq!(q.etag.as_deref(), Some("\"1\""));
    assert_eq!(
        call(
            &c,
            get.clone(),
            server.url("/v1/webhooks/billing-hook"),
            &admin,
            None,
            None
        )
        .await
        .status,
        404
    );
    let kept = call(
        &c,
        get.clone(),
        server.url("/v1/webhooks/kept"),
        &admin,
        None,
        None,
    )
    .await;
    assert_eq!((kept.status, kept.etag.as_deref()), (200, Some("\"1\"")));
    // The deleted webhook's stream still counts: version 2, so the
    // writer who read version 1 is still refused after the restart.
    let a = call(
        &c,
        put.clone(),
        server.url("/v1/webhooks/billing-hook"),
        &admin,
        Some("\"1\""),
        Some(hook("RATE_LIMITED")),
    )
    .await;
    assert_eq!(a.status, 412, "{}", a.body);
    let a = call(
        &c,
        put.clone(),
        server.url("/v1/webhooks/billing-hook"),
        &admin,
        Some("\"2\""),
        Some(hook("RATE_LIMITED")),
    )
    .await;
    assert_eq!(
        (a.status, a.etag.as_deref()),
        (201, Some("\"3\"")),
        "{}",
        a.body
    );
    server.stop();
}
