//! Where the parts meet, over a real socket: one early clock cannot blind
//! a partition, two clients' event ids never cancel, numeric fields have
//! bounds, an `Idempotency-Key` makes a retried body count once, state
//! that cannot be read stops its shard (readiness says which and why),
//! older data directories are refused, and hard quotas hold under
//! concurrent checks.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde_json::{json, Value};
use support::*;
use tally_pipelines::partitioner::partition_for;

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

async fn day_requests(c: &reqwest::Client, server: &Server, client: &str) -> u64 {
    let (status, usage) = get(
        c,
        server,
        &format!("/v1/clients/{}/usage?period=day", encode_path(client)),
    )
    .await;
    assert_eq!(status, 200, "{usage}");
    usage["total_requests"].as_u64().unwrap()
}

/// Reproduced on an earlier main: one event for `victim` stamped now + 14
/// minutes, then 100 stamped now: all 100 answered late, and the day's
/// usage said 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_early_stamped_event_does_not_make_a_partition_late() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let now = now_ms();
    let (status, body) = post(&c, &server, event("victim", now + 14 * MINUTE, "1")).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    let lines: Vec<String> = (0..100).map(|i| event("victim", now + i, "1")).collect();
    let (status, body) = post(&c, &server, lines.join("\n")).await;
    assert_eq!(status, 202);
    assert_eq!(
        (body["accepted"].as_u64(), body["late"].as_u64()),
        (Some(100), Some(0)),
        "{body}"
    );
    // The early event is counted in its own minute (the same UTC day unless
    // the test runs in the last quarter hour of one).
    let day = day_requests(&c, &server, "victim").await;
    let same_day = (now + 14 * MINUTE) / DAY == now / DAY;
    assert_eq!(day, if same_day { 101 } else { 100 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_one_partition_sending_the_same_event_id_are_both_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let alice = "alice".to_string();
    let bob = (0..)
        .map(|i| format!("bob-{i}"))
        .find(|b| partition_for(b, 12) == partition_for(&alice, 12))
        .unwrap();
    let now = now_ms();
    let with_id = |client: &str| {
        format!(
            r#"{{"event_id":"e1","client_id":"{client}","endpoint":"/v1/a","status":200,"latency_ms":1,"timestamp":{now}}}"#
        )
    };
    let (_, body) = post(
        &c,
        &server,
        format!("{}\n{}", with_id(&alice), with_id(&bob)),
    )
    .await;
    assert_eq!(
        (body["accepted"].as_u64(), body["duplicates"].as_u64()),
        (Some(2), Some(0)),
        "{body}"
    );
    // A real duplicate is still one.
    let (_, body) = post(&c, &server, with_id(&bob)).await;
    assert_eq!(body["duplicates"].as_u64(), Some(1), "{body}");
    assert_eq!(day_requests(&c, &server, &alice).await, 1);
    assert_eq!(day_requests(&c, &server, &bob).await, 1);
}

/// Reproduced on an earlier main: three events of `1e300` ms and one of
/// 10 ms answered an average of 2.49999925 ms and a p95 of 2e142.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_numbers_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let now = now_ms();
    let body = [
        event("n", now, "1e300"),
        event("n", now, "1e300"),
        event("n", now, "1e300"),
        event("n", now, "10"),
    ]
    .join("\n");
    let (status, body) = post(&c, &server, body).await;
    assert_eq!(status, 202);
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(1), Some(3))
    );
    assert!(
        body["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("`latency_ms` 1e300 is above the limit"),
        "{body}"
    );
    let (_, usage) = get(&c, &server, "/v1/clients/n/usage?period=day").await;
    assert_eq!(usage["average_latency_ms"].as_f64(), Some(10.0), "{usage}");
    let p95 = usage["p95_latency_ms"].as_f64().unwrap();
    assert!((p95 - 10.0).abs() <= 0.1, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_retried_with_its_idempotency_key_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let now = now_ms();
    // Events without ids, over many clients (so over many partitions).
    let body: String = (0..60)
        .map(|i| event(&format!("k-{}", i % 20), now + i, "2"))
        .collect::<Vec<_>>()
        .join("\n");
    let send = |key: &'static str| {
        let (c, url, body) = (c.clone(), server.url("/v1/events"), body.clone());
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/x-ndjson")
                .header("idempotency-key", key)
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = send("order-77").await;
    assert_eq!(
        (status, first["accepted"].as_u64()),
        (202, Some(60)),
        "{first}"
    );
    let (status, retry) = send("order-77").await;
    assert_eq!(status, 202);
    assert_eq!(
        (retry["accepted"].as_u64(), retry["duplicates"].as_u64()),
        (Some(0), Some(60)),
        "{retry}"
    );
    let mut total = 0;
    for i in 0..20 {
        total += day_requests(&c, &server, &format!("k-{i}")).await;
    }
    assert_eq!(total, 60);
    // Another key is another body.
    let (_, other) = send("order-78").await;
    assert_eq!(other["accepted"].as_u64(), Some(60));
    // A key that is not a key is refused with the header named.
    let r = c
        .post(server.url("/v1/events"))
        .header("idempotency-key", "has space")
        .body(event("k-1", now, "1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["errors"][0]["field"], "Idempotency-Key",
        "{problem}"
    );
}

/// Hard quotas reserve what checks admit: N concurrent checks with R
/// requests remaining admit exactly R, and once the admitted requests'
/// events arrive the quota status agrees with the usage query again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_admit_exactly_the_requests_a_hard_quota_has_left() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), &[]);
    let c = client();
    let r = c
        .put(server.url("/v1/clients/hq/quota"))
        .json(&json!({"monthly_request_limit": 100, "hard_limit": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let now = now_ms();
    let used: Vec<String> = (0..60).map(|i| event("hq", now + i, "1")).collect();
    post(&c, &server, used.join("\n")).await;
    let checks = (0..200).map(|_| {
        let (c, url) = (c.clone(), server.url("/v1/check"));
        async move {
            c.post(url)
                .json(&json!({"client_id": "hq", "endpoint": "/v1/a"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = join_all(checks).await;
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(allowed, 40, "{statuses:?}");
    let (_, status) = get(&c, &server, "/v1/clients/hq/quota/status").await;
    assert_eq!(status["requests_used"].as_u64(), Some(60), "{status}");
    assert_eq!(status["requests_reserved"].as_u64(), Some(40), "{status}");
    assert_eq!(status["requests_remaining"].as_u64(), Some(0), "{status}");
    // The gateway reports the 40 requests it let through.
    let admitted: Vec<String> = (0..40).map(|i| event("hq", now + 100 + i, "1")).collect();
    post(&c, &server, admitted.join("\n")).await;
    let (_, status) = get(&c, &server, "/v1/clients/hq/quota/status").await;
    let (_, usage) = get(&c, &server, "/v1/clients/hq/usage?period=month").await;
    assert_eq!(
        status["requests_used"], usage["total_requests"],
        "{status} {usage}"
    );
    assert_eq!(status["requests_used"].as_u64(), Some(100));
    assert_eq!(status["requests_reserved"].as_u64(), Some(0), "{status}");
    let r = c
        .post(server.url("/v1/check"))
        .json(&json!({"client_id": "hq", "endpoint": "/v1/a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

fn open_store(data: &std::path::Path) -> tally_state::Store {
    tally_state::Store::open(data, tally_state::StoreOptions::default()).unwrap()
}

/// State that cannot be read stops the shard that owns it: readiness says
/// which partition and why, its clients are refused, every other client is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_checkpoint_turns_readiness_false_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = client();
    let broken = "broken-client".to_string();
    let p = partition_for(&broken, 12);
    let healthy = (0..)
        .map(|i| format!("healthy-{i}"))
        .find(|h| partition_for(h, 12) != p)
        .unwrap();
    {
        let server = Server::start(&data, &[]);
        post(&c, &server, event(&broken, now_ms(), "1")).await;
        server.stop();
    }
    {
        let store = open_store(&data);
        store
            .put_raw(
                tally_state::keys::CF_META,
                &tally_state::keys::checkpoint_key(p),
                b"\x01\xFF\xFF\xFF\xFF",
            )
            .unwrap();
    }
    let server = Server::start(&data, &[]);
    let r = c.get(server.url("/health/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let text = r.text().await.unwrap();
    assert!(text.contains(&format!("partition {p}")), "{text}");
    assert!(text.contains("checkpoint"), "{text}");
    let (status, body) = post(&c, &server, event(&broken, now_ms(), "1")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["not_applied_indices"], json!([0]), "{body}");
    let (status, _) = post(&c, &server, event(&healthy, now_ms(), "1")).await;
    assert_eq!(status, 202);
    assert_eq!(day_requests(&c, &server, &healthy).await, 1);
    // The stored checkpoint was not written over.
    server.stop();
    let store = open_store(&data);
    assert!(store.load_checkpoint(p).is_err());
}

#[test]
fn a_data_directory_of_an_older_format_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = open_store(&data);
        let one = tally_state::codec::encode(&1u32).unwrap();
        store
            .put_raw(
                tally_state::keys::CF_META,
                &tally_state::keys::setting_key("format"),
                &one,
            )
            .unwrap();
    }
    let out = std::process::Command::new(tally_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("storage format 1"), "{stderr}");
    assert!(stderr.contains("new --data-dir"), "{stderr}");
}
