//! The control plane's history over a real socket: `as_of` answers for
//! limits, quotas and keys (what applied at time T), the audit trail of
//! changes and refused requests with its filters and cursor, and the key
//! ring rebuilt from the log equal to the live one, before and after a
//! restart.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{client, offline_key, Server};
use tally_pipelines::time::format_rfc3339_ms;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = c.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A moment strictly between two changes (their times are the server's
/// clock, read here around each change).
async fn moment() -> i64 {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    t
}

fn limit(requests: u64) -> Value {
    json!({"algorithm": "SLIDING_WINDOW", "global_limit": {"requests": requests, "window_seconds": 60}})
}

#[tokio::test]
async fn as_of_answers_what_applied_then_and_the_audit_trail_tells_who_did_what() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let admin_id = admin[4..16].to_string();
    let server = Server::start(&data, &[]);
    let c = client();
    let put = reqwest::Method::PUT;
    let get = reqwest::Method::GET;

    let before_any = moment().await;
    let (s, v) = call(
        &c,
        put.clone(),
        server.url("/v1/clients/disputed/limits"),
        &admin,
        Some(limit(100)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = call(
        &c,
        put.clone(),
        server.url("/v1/clients/disputed/quota"),
        &admin,
        Some(json!({"monthly_request_limit": 1000})),
    )
    .await;
    assert_eq!(s, 200);
    let between = moment().await;
    call(
        &c,
        put.clone(),
        server.url("/v1/clients/disputed/limits"),
        &admin,
        Some(limit(50)),
    )
    .await;
    let after = moment().await;

    let at = |t: i64| format!("as_of={}", format_rfc3339_ms(t));
    let (s, v) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/clients/disputed/limits?{}", at(between))),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["limits"]["global_limit"]["requests"], 100);
    assert_eq!(v["set_by"], admin_id.as_str());
    let (_, v) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/clients/disputed/limits?{}", at(after))),
        &admin,
        None,
    )
    .await;
    assert_eq!(v["limits"]["global_limit"]["requests"], 50);
    // Epoch ms works as well as RFC 3339.
    let (_, v) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/clients/disputed/limits?as_of={between}")),
        &admin,
        None,
    )
    .await;
    assert_eq!(v["limits"]["global_limit"]["requests"], 100);
    let (s, _) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/clients/disputed/limits?{}", at(before_any))),
        &admin,
        None,
    )
    .await;
    assert_eq!(
        s, 404,
        "nothing applied before the first change (no default configured)"
    );
    let (_, v) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/clients/disputed/quota?{}", at(between))),
        &admin,
        None,
    )
    .await;
    assert_eq!(v["quota"]["monthly_request_limit"], 1000);
    let (s, v) = call(
        &c,
        get.clone(),
        server.url("/v1/clients/disputed/limits?as_of=yesterday"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["errors"][0]["field"], "as_of");

    // A key's life: made, then revoked.
    let (s, made) = call(
        &c,
        reqwest::Method::POST,
        server.url("/v1/keys"),
        &admin,
        Some(json!({"name": "billing-bot", "scopes": ["billing"]})),
    )
    .await;
    assert_eq!(s, 201);
    let key_id = made["key_id"].as_str().unwrap().to_string();
    let alive = moment().await;
    call(
        &c,
        reqwest::Method::DELETE,
        server.url(&format!("/v1/keys/{key_id}")),
        &admin,
        None,
    )
    .await;
    let dead = moment().await;
    let key_at = |t: i64| server.url(&format!("/v1/keys/{key_id}?{}", at(t)));
    assert_eq!(
        call(&c, get.clone(), key_at(alive), &admin, None).await.1["state"],
        "active"
    );
    assert_eq!(
        call(&c, get.clone(), key_at(dead), &admin, None).await.1["state"],
        "revoked"
    );
    assert_eq!(
        call(&c, get.clone(), key_at(before_any), &admin, None)
            .await
            .0,
        404
    );

    // A refused request, with our own request id.
    let refused = c
        .get(server.url("/v1/clients/disputed/usage"))
        .bearer_auth("tly_notakeynotakeynotakeynotakeynotakeynotakeynotakey")
        .header("x-request-id", "dispute-42")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    // The audit trail: every change and the refusal (written behind the
    // request path, so polled).
    let mut records = vec![];
    for _ in 0..100 {
        let (_, v) = call(&c, get.clone(), server.url("/v1/audit"), &admin, None).await;
        records = v["records"].as_array().cloned().unwrap_or_default();
        if records.len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let actions: Vec<&str> = records
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "request.refused",
            "key.revoke",
            "key.create",
            "limits.set",
            "quota.set",
            "limits.set"
        ],
        "newest first: {records:?}"
    );
    let refusal = &records[0];
    assert_eq!(refusal["request_id"], "dispute-42");
    assert_eq!(refusal["ip"], "127.0.0.1");
    assert_eq!(refusal["result"], "malformed");
    assert_eq!(refusal["target"], "/v1/clients/{client_id}/usage");
    assert!(records[1..]
        .iter()
        .all(|r| r["actor"] == admin_id.as_str() && r["result"] == "applied"));

    // Filters and the cursor.
    let (_, v) = call(
        &c,
        get.clone(),
        server.url("/v1/audit?client_id=disputed"),
        &admin,
        None,
    )
    .await;
    let for_client: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(for_client, vec!["limits.set", "quota.set", "limits.set"]);
    let (_, v) = call(
        &c,
        get.clone(),
        server.url("/v1/audit?action=key.create"),
        &admin,
        None,
    )
    .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    assert_eq!(v["records"][0]["target"], key_id.as_str());
    let (_, v) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/audit?actor={admin_id}&limit=2")),
        &admin,
        None,
    )
    .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 2);
    let cursor = v["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/audit?actor={admin_id}&cursor={cursor}")),
        &admin,
        None,
    )
    .await;
    let rest: Vec<&str> = rest["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(rest, vec!["limits.set", "quota.set", "limits.set"]);
    let (_, v) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/audit?from={}&to={}", between, after)),
        &admin,
        None,
    )
    .await;
    let window: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(window, vec!["limits.set"]);

    // The ring rebuilt from the log equals the live one, and so does the
    // ring of a restarted instance.
    let (_, live) = call(&c, get.clone(), server.url("/v1/keys"), &admin, None).await;
    let now = now_ms();
    let (_, rebuilt) = call(
        &c,
        get.clone(),
        server.url(&format!("/v1/keys?as_of={now}")),
        &admin,
        None,
    )
    .await;
    assert_eq!(live["keys"], rebuilt["keys"]);
    server.stop();
    let server = Server::start(&data, &[]);
    let (_, restarted) = call(&c, get.clone(), server.url("/v1/keys"), &admin, None).await;
    assert_eq!(live["keys"], restarted["keys"]);
    server.stop();
}
