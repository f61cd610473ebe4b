//! Two instances in one consumer group against a real broker (tansu):
//! they split the partitions, answer any client's query (forwarding to the
//! owner), and when one dies the survivor restores its partitions from the
//! changelog topics and ends with exact numbers.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::kafka::{owned, produce_all, records, wait_for_split, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const PARTITIONS: u16 = 12;

async fn total_requests(c: &reqwest::Client, server: &Server, lines: &[Line]) -> u64 {
    let mut got = 0;
    for client in clients_of(lines) {
        let url = server.url(&format!(
            "/v1/clients/{}/usage?period=month&at={START_MS}",
            encode_path(&client)
        ));
        if let Ok(r) = c.get(url).send().await {
            if r.status() == 200 {
                got += r
                    .json::<Value>()
                    .await
                    .map(|v| v["total_requests"].as_u64().unwrap_or(0))
                    .unwrap_or(0);
            }
        }
    }
    got
}

fn instance_args(broker: &Broker) -> Vec<String> {
    [
        "--kafka-brokers",
        &broker.bootstrap(),
        "--kafka-group",
        "tally-pair",
        "--kafka-changelog-interval",
        "300ms",
        // The test's webhook receiver is on loopback.
        "--webhook-allow",
        "127.0.0.1/32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_partitions_forward_queries_and_survive_a_kill() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, u32::from(PARTITIONS));
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let lines = dataset(300_000, 300, 41);
    let (first, second) = lines.split_at(100_000);
    produce_all(&broker.bootstrap(), TOPIC, &records(first)).await;

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let args = instance_args(&broker);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Server::start(&dir.join("a"), &args);
    let b = Server::start(&dir.join("b"), &args);
    let c = client();
    let split = wait_for_split(&c, &[&a, &b], PARTITIONS).await;

    // Any client, asked at either instance, is answered by its owner.
    let want_first = count_kind(first, Kind::Good);
    let deadline = Instant::now() + Duration::from_secs(120);
    while total_requests(&c, &a, first).await != want_first {
        assert!(Instant::now() < deadline, "first part never fully counted");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut forwarded = 0;
    for client in clients_of(first) {
        let path = format!(
            "/v1/clients/{}/usage?period=day&at={START_MS}",
            encode_path(&client)
        );
        let mut answers = Vec::new();
        for (i, server) in [&a, &b].into_iter().enumerate() {
            let r = c.get(server.url(&path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{client} at instance {i}");
            let served_by = r
                .headers()
                .get("x-tally-served-by")
                .map(|v| v.to_str().unwrap().to_string());
            if served_by.as_deref() != Some(server.url("").as_str()) {
                forwarded += 1;
            }
            let body: Value = r.json().await.unwrap();
            check_usage(
                &body,
                &expected(first, &client, START_MS, START_MS + DAY),
                &client,
            );
            answers.push(body);
        }
        assert_eq!(
            answers[0], answers[1],
            "{client}: the two instances disagree"
        );
    }
    let clients = clients_of(first).len();
    assert_eq!(
        forwarded, clients,
        "each client is local to exactly one of the two instances ({split:?})"
    );

    // Top consumers span both instances: each asks the other for its
    // partitions' share; both answer the same, equal to the reference.
    let mut per_client: std::collections::HashMap<&str, u64> = Default::default();
    for l in first.iter().filter(|l| l.kind == Kind::Good) {
        *per_client.entry(l.client.as_str()).or_default() += 1;
    }
    let mut want: Vec<(&str, u64)> = per_client.into_iter().collect();
    want.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(y.0)));
    want.truncate(15);
    let mut tops = Vec::new();
    for server in [&a, &b] {
        let r = c
            .get(server.url(&format!(
                "/v1/usage/top?period=month&at={START_MS}&limit=15"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["total"].as_u64(), Some(want_first));
        let got: Vec<(String, u64)> = body["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["client_id"].as_str().unwrap().to_string(),
                    e["metric_value"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64)> = want.iter().map(|(c, n)| (c.to_string(), *n)).collect();
        assert_eq!(got, want);
        tops.push(body["top"].clone());
    }
    assert_eq!(tops[0], tops[1]);

    // A webhook configured at A reaches B through the control topic, and
    // receives the events both instances raise.
    let received: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let payload: Value = serde_json::from_slice(&body).unwrap();
                sink.lock().unwrap().push(payload["event"].clone());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = c
        .put(a.url("/v1/webhooks/shared"))
        .json(&serde_json::json!({"url": hook_url, "secret": "0123456789abcdef", "event_types": ["RATE_LIMITED"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .get(b.url("/v1/webhooks/shared"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "the webhook never reached B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let one = serde_json::json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 1, "window_seconds": 3600}});
    let mut owners = BTreeSet::new();
    let hooked: Vec<String> = (0..8).map(|i| format!("hooked-{i}")).collect();
    for client in &hooked {
        let r = c
            .put(a.url(&format!("/v1/clients/{client}/limits")))
            .json(&one)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        for want in [200, 429] {
            let r = c
                .post(b.url("/v1/check"))
                .json(&serde_json::json!({"client_id": client, "endpoint": "/x"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), want);
        }
        let r = c
            .get(b.url(&format!("/v1/clients/{client}/limits")))
            .send()
            .await
            .unwrap();
        if let Some(v) = r.headers().get("x-tally-served-by") {
            owners.insert(v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(owners.len(), 2, "the 8 clients should span both instances");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: BTreeSet<String> = received
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["client_id"].as_str().unwrap().to_string())
            .collect();
        if got == hooked.iter().cloned().collect::<BTreeSet<_>>() {
            break;
        }
        assert!(Instant::now() < deadline, "webhook got {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both instances raised events: their ids never collide (a receiver
    // deduplicating by event id, as webhooks' Idempotency-Key invites,
    // must not drop a real event).
    {
        let events = received.lock().unwrap();
        let ids: BTreeSet<u64> = events
            .iter()
            .map(|e| e["event_id"].as_u64().unwrap())
            .collect();
        let distinct: BTreeSet<String> = events
            .iter()
            .map(|e| format!("{}@{}", e["client_id"], e["timestamp"]))
            .collect();
        assert_eq!(
            ids.len(),
            distinct.len(),
            "event ids repeat across instances: {events:?}"
        );
    }

    // Checks are exact across instances: whichever instance is asked, the
    // owner's limiter decides (20 tokens, no refill within the test).
    let bucket = serde_json::json!({"algorithm": "TOKEN_BUCKET", "global_limit": {"requests": 20, "window_seconds": 360000}});
    let r = c
        .put(a.url("/v1/clients/gw/limits"))
        .json(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut allowed = 0;
    for i in 0..40 {
        let server = if i % 2 == 0 { &a } else { &b };
        let r = c
            .post(server.url("/v1/check"))
            .json(&serde_json::json!({"client_id": "gw", "endpoint": "/x"}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => allowed += 1,
            429 => {}
            other => panic!("check answered {other}"),
        }
    }
    assert_eq!(
        allowed, 20,
        "checks at two instances admitted {allowed} of a limit of 20"
    );

    // Kill A mid-stream: B takes A's partitions, restores them from the
    // changelog, and ends exact.
    let bootstrap = broker.bootstrap();
    let rest = records(second);
    let produce = tokio::spawn(async move { produce_all(&bootstrap, TOPIC, &rest).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while total_requests(&c, &b, &lines).await <= want_first {
        assert!(Instant::now() < deadline, "second part never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restores = |m: &str| metric_value(m, "tally_changelog_restores_total", "").unwrap_or(0.0);
    let restores_before = restores(&metrics_text(&c, &b).await);
    a.kill();
    produce.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(240);
    while owned(&c, &b).await.len() != usize::from(PARTITIONS) {
        assert!(
            Instant::now() < deadline,
            "the survivor never took every partition"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let want = count_kind(&lines, Kind::Good);
    loop {
        let got = total_requests(&c, &b, &lines).await;
        assert!(got <= want, "counted {got} of {want}: double counting");
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "only {got} of {want} counted");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for client in clients_of(&lines) {
        let url = b.url(&format!(
            "/v1/clients/{}/usage?period=day&at={START_MS}",
            encode_path(&client)
        ));
        let got: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        check_usage(
            &got,
            &expected(&lines, &client, START_MS, START_MS + DAY),
            &client,
        );
    }
    let restored = restores(&metrics_text(&c, &b).await) - restores_before;
    assert!(
        restored >= split[0].len() as f64,
        "the survivor restored {restored} partitions from the changelog; the dead instance had {:?}",
        split[0]
    );
}
