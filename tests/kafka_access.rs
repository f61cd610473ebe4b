//! Keys across a cluster: two instances against a real broker (tansu).
//! A key made at one instance opens the other; a revocation or a
//! rotation at one is refused at the other within a second (measured
//! and printed; the assertion allows more, for loaded machines); a
//! restarted instance keeps what it was told; `If-Match` is judged alike
//! everywhere.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::kafka::Broker;
use support::*;

const TOPIC: &str = "tally.requests";

fn cluster_args(broker: &Broker, key: &str) -> Vec<String> {
    [
        "--kafka-brokers",
        &broker.bootstrap(),
        "--kafka-group",
        "tally-access",
        "--partitions",
        "4",
        "--bootstrap-key",
        key,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A route answered locally (never forwarded to a partition owner, which
/// would judge the key itself): what this instance's key ring says.
async fn status_at(c: &reqwest::Client, server: &Server, key: &str) -> u16 {
    c.get(server.url("/v1/queue-health"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until `server` answers `want` for `key`; how long it took.
async fn until_status(c: &reqwest::Client, server: &Server, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        if status_at(c, server, key).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} never answered {want} for the key",
            server.base
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn mint(c: &reqwest::Client, at: &Server, admin: &str, body: Value) -> (String, String) {
    let resp = c
        .post(at.url("/v1/keys"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    (
        v["key_id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_at_one_instance_is_judged_alike_at_the_other() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let admin = offline_key(&dir.join("keygen"), &[]);
    let args = cluster_args(&broker, &admin);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Server::start(&dir.join("a"), &args);
    let mut b = Server::start(&dir.join("b"), &args);
    let c = client();
    // Both published the bootstrap key; it exists once and opens both.
    assert_eq!(status_at(&c, &a, &admin).await, 200);
    assert_eq!(status_at(&c, &b, &admin).await, 200);
    assert_eq!(status_at(&c, &b, "").await, 401);

    // Made at A: the answer comes once A applied it; B follows.
    let (id, reader) = mint(&c, &a, &admin, json!({"name": "r", "scopes": ["read"]})).await;
    assert_eq!(status_at(&c, &a, &reader).await, 200);
    let created = until_status(&c, &b, &reader, 200).await;

    // Revoked at A: refused at B.
    let resp = c
        .delete(a.url(&format!("/v1/keys/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let revoked = until_status(&c, &b, &reader, 403).await;
    for _ in 0..20 {
        assert_eq!(
            status_at(&c, &b, &reader).await,
            403,
            "revoked stays revoked"
        );
    }
    println!(
        "control propagation A -> B: create {} ms, revoke {} ms",
        created.as_millis(),
        revoked.as_millis()
    );
    assert!(
        revoked < Duration::from_secs(5),
        "revocation took {revoked:?}"
    );

    // Rotated at B with no grace: the old secret is refused at A.
    let (id2, old) = mint(&c, &b, &admin, json!({"name": "w", "scopes": ["read"]})).await;
    until_status(&c, &a, &old, 200).await;
    let rotated: Value = c
        .post(b.url(&format!("/v1/keys/{id2}/rotate")))
        .bearer_auth(&admin)
        .json(&json!({"grace_seconds": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new = rotated["key"].as_str().unwrap().to_string();
    until_status(&c, &a, &old, 403).await;
    until_status(&c, &a, &new, 200).await;

    // If-Match with a version both have passed: 412 at either.
    for at in [&a, &b] {
        let resp = c
            .delete(at.url(&format!("/v1/keys/{id2}")))
            .bearer_auth(&admin)
            .header("if-match", "\"1\"")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 412);
    }
    assert_eq!(status_at(&c, &a, &new).await, 200);

    // B restarted keeps every change (its local log and the topic after it).
    b.stop();
    b = Server::start(&dir.join("b"), &args);
    assert_eq!(status_at(&c, &b, &reader).await, 403);
    assert_eq!(status_at(&c, &b, &old).await, 403);
    assert_eq!(status_at(&c, &b, &new).await, 200);
    let listed: Value = c
        .get(b.url("/v1/keys"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 3, "{listed}");

    // The propagation histogram is exported (by A, which applied every
    // change in this process; the restarted B had nothing new to apply).
    let metrics = c
        .get(a.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tally_control_propagation_seconds_count"),
        "{metrics}"
    );
    b.stop();
    a.stop();
}

/// The webhook view at `server` with its ETag, once it has `want`
/// event types (applied from the control topic).
async fn webhook_at(c: &reqwest::Client, server: &Server, admin: &str, want: &Value) -> String {
    let started = Instant::now();
    loop {
        let resp = c
            .get(server.url("/v1/webhooks/hook"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap();
        let etag = resp
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        if resp.status() == 200 {
            let v: Value = resp.json().await.unwrap();
            if &v["event_types"] == want {
                return etag.unwrap();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} never showed the webhook with {want}",
            server.base
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_offline_and_webhook_changes_reach_every_instance_once() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let admin = offline_key(&dir.join("keygen"), &[]);
    // Made offline in A's own data directory, before A ever ran (with
    // the layout A is configured with, as an operator would).
    let offline = offline_key(&dir.join("a"), &["--scopes", "read", "--partitions", "4"]);
    let offline_id = offline[4..16].to_string();
    let args = cluster_args(&broker, &admin);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Server::start(&dir.join("a"), &args);
    let b = Server::start(&dir.join("b"), &args);
    let c = client();
    // A published it when it started: B, which never saw A's directory,
    // takes it.
    assert_eq!(status_at(&c, &a, &offline).await, 200);
    until_status(&c, &b, &offline, 200).await;
    // A restarted does not publish it again: a key minted at A after the
    // restart is in B's audit trail, the offline key still once (the
    // topic is applied, and audited, in order).
    a.stop();
    a = Server::start(&dir.join("a"), &args);
    let (later_id, later) =
        mint(&c, &a, &admin, json!({"name": "later", "scopes": ["read"]})).await;
    until_status(&c, &b, &later, 200).await;
    let started = Instant::now();
    let created = loop {
        let created: Value = c
            .get(b.url("/v1/audit?action=key.create&limit=1000"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let targets: Vec<String> = created["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["target"].as_str().unwrap().to_string())
            .collect();
        if targets.contains(&later_id) {
            break targets;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{created}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let of_offline = created.iter().filter(|t| **t == offline_id).count();
    assert_eq!(of_offline, 1, "{created:?}");

    // A webhook made at A runs at B, at the same version; a writer at B
    // holding the version before A's change is refused.
    let hook = |types: Value| json!({"url": "https://hooks.example.com/in", "secret": "a-secret-of-16-bytes-or-more", "event_types": types});
    let resp = c
        .put(a.url("/v1/webhooks/hook"))
        .bearer_auth(&admin)
        .header("if-match", "\"0\"")
        .json(&hook(json!(["RATE_LIMITED"])))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(
        webhook_at(&c, &b, &admin, &json!(["RATE_LIMITED"])).await,
        "\"1\""
    );
    let resp = c
        .put(b.url("/v1/webhooks/hook"))
        .bearer_auth(&admin)
        .header("if-match", "\"1\"")
        .json(&hook(json!(["QUOTA_EXCEEDED"])))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        webhook_at(&c, &a, &admin, &json!(["QUOTA_EXCEEDED"])).await,
        "\"2\""
    );
    let resp = c
        .delete(a.url("/v1/webhooks/hook"))
        .bearer_auth(&admin)
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 412);
    // Deleted at B: gone at A too.
    let resp = c
        .delete(b.url("/v1/webhooks/hook"))
        .bearer_auth(&admin)
        .header("if-match", "\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let started = Instant::now();
    loop {
        let status = c
            .get(a.url("/v1/webhooks/hook"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .status();
        if status == 404 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A key allowlisted to one address: a query A forwards to the owner B
    // is judged at B against the caller's address, not A's.
    let (_, listed) = mint(
        &c,
        &a,
        &admin,
        json!({"name": "listed", "scopes": ["read"], "ip_allowlist": ["127.0.0.3/32"]}),
    )
    .await;
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, last]))
            .build()
            .unwrap()
    };
    let (allowed, other) = (from(3), from(4));
    let started = Instant::now();
    while status_at(&allowed, &b, &listed).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never took the key"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // (After A's restart the group may still be settling: partitions
    // moving answer 503; keep asking until one is forwarded to B.)
    let mut forwarded = None;
    let mut seen = vec![];
    let started = Instant::now();
    for i in 0.. {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let client = format!("fw-{}", i % 50);
        let resp = allowed
            .get(a.url(&format!("/v1/clients/{client}/usage")))
            .bearer_auth(&listed)
            .send()
            .await
            .unwrap();
        let served_by = resp
            .headers()
            .get("x-tally-served-by")
            .map(|v| v.to_str().unwrap().to_string());
        if served_by.as_deref() == Some(b.base.as_str()) {
            assert_eq!(resp.status(), 200, "{client} forwarded to B");
            forwarded = Some(client);
            break;
        }
        seen.push((resp.status().as_u16(), served_by));
    }
    let forwarded = forwarded.unwrap_or_else(|| {
        panic!(
            "no client was forwarded to B ({}); last answers: {:?}",
            b.base,
            &seen[seen.len().saturating_sub(5)..]
        )
    });
    // The telemetry series list gathers B's page, judged there against
    // the caller's address too (not A's, which the key does not list).
    let started = Instant::now();
    loop {
        let resp = allowed
            .get(a.url("/v1/telemetry"))
            .bearer_auth(&listed)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        if status == 200 {
            break;
        }
        let body = resp.text().await.unwrap_or_default();
        assert!(
            status == 503 && started.elapsed() < Duration::from_secs(10),
            "the series list at A: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From another address: refused at A; and a caller that claims the
    // allowed address itself, straight to B, is not a member: refused.
    let resp = other
        .get(a.url(&format!("/v1/clients/{forwarded}/usage")))
        .bearer_auth(&listed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = other
        .get(b.url(&format!("/v1/clients/{forwarded}/usage")))
        .bearer_auth(&listed)
        .header("x-tally-peer-ip", "127.0.0.3")
        .header("x-tally-forwarded-by", a.base.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // A request refused at each instance: the audit at either answers
    // both, each once, paged one record at a time.
    for (at, request_id) in [(&a, "refused-at-a"), (&b, "refused-at-b")] {
        let resp = c
            .get(at.url("/v1/queue-health"))
            .bearer_auth("tly_not_a_key")
            .header("x-request-id", request_id)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    }
    for at in [&a, &b] {
        let started = Instant::now();
        loop {
            let mut seen = vec![];
            let mut cursor = String::new();
            loop {
                let page: Value = c
                    .get(at.url(&format!("/v1/audit?action=request.refused&limit=1{cursor}")))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                // (B refused the offline key until it learned it.)
                let ours = page["records"].as_array().unwrap().iter().filter(|r| {
                    r["request_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("refused-at-"))
                });
                for r in ours {
                    seen.push((
                        r["request_id"].as_str().unwrap_or("").to_string(),
                        r["instance"].as_str().unwrap_or("").to_string(),
                    ));
                }
                match page["next_cursor"].as_str() {
                    Some(next) => cursor = format!("&cursor={next}"),
                    None => break,
                }
            }
            seen.sort();
            let want = vec![
                ("refused-at-a".to_string(), a.base.clone()),
                ("refused-at-b".to_string(), b.base.clone()),
            ];
            if seen == want {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "audit at {}: {seen:?}",
                at.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    a.stop();
    b.stop();
}
