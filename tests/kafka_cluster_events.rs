//! One cluster, one event channel: two instances against a real broker
//! (tansu).
//!
//! - Events raised at either instance reach one instance's SSE stream
//!   exactly once, also across a kill -9 and restart of the other; a
//!   subscriber that disconnects resumes at the other instance with the id
//!   it last received and gets exactly what it missed; a webhook receiver
//!   that deduplicates by event id, as README advises, ends with the same
//!   events.
//! - `GET /v1/anomalies` at either instance answers for the whole cluster,
//!   and what a killed instance found is answered by the survivor, which
//!   restored it with the partition.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::kafka::{wait_for_split, Broker};
use support::*;

const TOPIC: &str = "tally.requests";
const MINUTE: i64 = 60_000;
const PARTITIONS: u16 = 12;

struct SseReader {
    body: reqwest::Response,
    buffer: String,
}

/// One event as the stream carried it: its SSE id and its data.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    data: Value,
}

impl SseReader {
    async fn open(c: &reqwest::Client, url: String, last_event_id: Option<&str>) -> SseReader {
        let mut req = c.get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        SseReader {
            body: resp,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when none comes within `quiet`.
    async fn next_within(&mut self, quiet: Duration) -> Option<Received> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut data) = (None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if let Some(id) = id {
                    let data = serde_json::from_str(&data).unwrap();
                    return Some(Received { id, data });
                }
                continue;
            }
            let chunk = tokio::time::timeout(quiet, self.body.chunk()).await.ok()?;
            self.buffer.push_str(&String::from_utf8_lossy(
                &chunk.unwrap().expect("stream ended"),
            ));
        }
    }

    /// Events until one per client of `clients` came, then 2 s more of
    /// quiet (so a repeat would be seen).
    async fn take_for(&mut self, clients: &[String]) -> Vec<Received> {
        let want: BTreeSet<&str> = clients.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out: Vec<Received> = Vec::new();
        loop {
            let got: BTreeSet<&str> = out
                .iter()
                .map(|r| r.data["client_id"].as_str().unwrap())
                .collect();
            let quiet = if want.is_subset(&got) {
                Duration::from_secs(2)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match self.next_within(quiet).await {
                Some(e) => out.push(e),
                None if want.is_subset(&got) => return out,
                None => panic!("the stream carried only {got:?} of {want:?}"),
            }
        }
    }
}

/// Opens `/v1/alerts/ws` at `at` from position `after` and reads `n`
/// events, in order: (client id, the `stream_id` its message carried).
/// `not` is a client that must not come again.
async fn websocket_positions(
    at: &Server,
    after: &str,
    n: usize,
    not: Option<&str>,
) -> Vec<(String, String)> {
    let url = at
        .url(&format!(
            "/v1/alerts/ws?types=RATE_LIMITED&last_event_id={after}"
        ))
        .replacen("http://", "ws://", 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut out: Vec<(String, String)> = Vec::new();
    while out.len() < n {
        let v = next_ws_json(&mut ws).await;
        let client = v["client_id"].as_str().unwrap().to_string();
        let position = v["stream_id"].as_str().unwrap().to_string();
        assert!(out.iter().all(|(c, _)| *c != client), "a repeat: {v}");
        assert_ne!(
            Some(client.as_str()),
            not,
            "an event before the position: {v}"
        );
        out.push((client, position));
    }
    out
}

/// Gives each client a limit of one request an hour and spends it twice
/// at `at`: one RATE_LIMITED event per client, raised by its owner.
/// Sends `request` until it is answered other than 503 (a partition
/// moving answers 503 with Retry-After, which a client retries).
async fn retried(request: reqwest::RequestBuilder) -> reqwest::Response {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = request.try_clone().unwrap().send().await.unwrap();
        if r.status() != 503 || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn rate_limit(c: &reqwest::Client, at: &Server, clients: &[String]) -> BTreeSet<String> {
    let one = json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 1, "window_seconds": 3600}});
    let mut owners = BTreeSet::new();
    for client in clients {
        let r = retried(
            c.put(at.url(&format!("/v1/clients/{client}/limits")))
                .json(&one),
        )
        .await;
        assert_eq!(r.status(), 200, "limits of {client}");
        for want in [200, 429] {
            let r = retried(
                c.post(at.url("/v1/check"))
                    .json(&json!({"client_id": client, "endpoint": "/x"})),
            )
            .await;
            assert_eq!(r.status(), want, "check of {client}");
        }
        let r = retried(c.get(at.url(&format!("/v1/clients/{client}/limits")))).await;
        if let Some(v) = r.headers().get("x-tally-served-by") {
            owners.insert(v.to_str().unwrap().to_string());
        }
    }
    owners
}

/// Exactly one event per client, all RATE_LIMITED, ids all different.
fn assert_once_each(events: &[Received], clients: &[String], what: &str) {
    let mut per_client: BTreeMap<&str, usize> = BTreeMap::new();
    for e in events {
        assert_eq!(e.data["event_type"], "RATE_LIMITED", "{what}: {e:?}");
        *per_client
            .entry(e.data["client_id"].as_str().unwrap())
            .or_default() += 1;
    }
    let want: BTreeMap<&str, usize> = clients.iter().map(|c| (c.as_str(), 1)).collect();
    assert_eq!(per_client, want, "{what}: every event exactly once");
}

fn cluster_args(broker: &Broker, group: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--kafka-brokers",
        &broker.bootstrap(),
        "--kafka-group",
        group,
        "--kafka-changelog-interval",
        "300ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn wave(name: &str) -> Vec<String> {
    (0..8).map(|i| format!("{name}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_streams_the_whole_clusters_events_exactly_once_and_resumes_anywhere() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, u32::from(PARTITIONS));
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let args = cluster_args(
        &broker,
        "tally-alerts",
        &["--webhook-allow", "127.0.0.1/32"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Server::start(&dir.join("a"), &args);
    let b = Server::start(&dir.join("b"), &args);
    let b_address = b.listen_address();
    let c = client();
    wait_for_split(&c, &[&a, &b], PARTITIONS).await;

    // A receiver that deduplicates deliveries by event id.
    let delivered: Arc<Mutex<BTreeMap<u64, Value>>> = Default::default();
    let sink = delivered.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let payload: Value = serde_json::from_slice(&body).unwrap();
                let event = payload["event"].clone();
                let id = event["event_id"].as_u64().unwrap();
                sink.lock().unwrap().insert(id, event);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = c
        .put(a.url("/v1/webhooks/dedupe"))
        .json(&json!({"url": hook_url, "secret": "0123456789abcdef", "event_types": ["RATE_LIMITED"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .get(b.url("/v1/webhooks/dedupe"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "the webhook never reached B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Events of both instances on A's stream, each once.
    let mut at_a = SseReader::open(&c, a.url("/v1/alerts/stream?types=RATE_LIMITED"), None).await;
    let first = wave("first");
    let owners = rate_limit(&c, &b, &first).await;
    assert_eq!(owners.len(), 2, "the clients should span both instances");
    let got_first = at_a.take_for(&first).await;
    assert_once_each(&got_first, &first, "first wave at A");

    // B dies without a word and comes back on its data directory.
    b.kill();
    let b = Server::start_on(&dir.join("b"), &b_address, &args);
    wait_for_split(&c, &[&a, &b], PARTITIONS).await;
    let second = wave("second");
    let owners = rate_limit(&c, &a, &second).await;
    assert_eq!(owners.len(), 2, "the clients should span both instances");
    let got_second = at_a.take_for(&second).await;
    assert_once_each(&got_second, &second, "second wave at A, after B's kill");

    // The subscriber goes away; what happens meanwhile waits for it, at B.
    let last = got_second.last().unwrap().id.clone();
    drop(at_a);
    let third = wave("third");
    rate_limit(&c, &a, &third).await;
    let mut at_b = SseReader::open(
        &c,
        b.url("/v1/alerts/stream?types=RATE_LIMITED"),
        Some(&last),
    )
    .await;
    let got_third = at_b.take_for(&third).await;
    assert_once_each(&got_third, &third, "resumed at B");

    // A WebSocket at A resumed from the same position gets the same
    // events. A position is where one instance's merge of the alert
    // partitions stood (two instances may interleave them differently),
    // so what is checked is that each message's `stream_id` resumes right
    // after it: from the first one, exactly the other events follow.
    let by_ws = websocket_positions(&a, &last, third.len(), None).await;
    let clients: BTreeSet<&String> = by_ws.iter().map(|(c, _)| c).collect();
    assert_eq!(clients, third.iter().collect(), "the WebSocket's events");
    let (first_client, first_position) = by_ws[0].clone();
    let rest = websocket_positions(&a, &first_position, third.len() - 1, Some(&first_client)).await;
    let rest: BTreeSet<String> = rest.into_iter().map(|(c, _)| c).collect();
    let want: BTreeSet<String> = third
        .iter()
        .filter(|c| **c != first_client)
        .cloned()
        .collect();
    assert_eq!(rest, want, "resumed from a WebSocket stream_id");

    // A position that is not one of the cluster stream's is refused.
    let r = c
        .get(b.url("/v1/alerts/stream"))
        .header("last-event-id", "17")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // The deduplicating receiver has exactly the events the stream
    // carried: nothing dropped as a false repeat, nothing missing.
    let streamed: BTreeMap<u64, String> = got_first
        .iter()
        .chain(&got_second)
        .chain(&got_third)
        .map(|e| {
            (
                e.data["event_id"].as_u64().unwrap(),
                e.data["client_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(streamed.len(), 24, "event ids repeat: {streamed:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hooked: BTreeMap<u64, String> = delivered
            .lock()
            .unwrap()
            .iter()
            .map(|(id, e)| (*id, e["client_id"].as_str().unwrap().to_string()))
            .collect();
        if hooked == streamed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the webhook has {hooked:?}, the stream carried {streamed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (client, type, detected at) of every anomaly the instance answers for
/// the cluster, following the cursor; `None` while it cannot answer.
async fn cluster_anomalies(
    c: &reqwest::Client,
    server: &Server,
) -> Option<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = server.url("/v1/anomalies?lookback_hours=24&limit=50");
        if let Some(cur) = &cursor {
            url.push_str(&format!("&cursor={cur}"));
        }
        let r = c.get(url).send().await.ok()?;
        if r.status() != 200 {
            return None;
        }
        let body: Value = r.json().await.ok()?;
        for a in body["anomalies"].as_array()? {
            out.push((
                a["client_id"].as_str()?.to_string(),
                a["anomaly_type"].as_str()?.to_string(),
                a["detected_at"].as_str()?.to_string(),
            ));
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    out.sort();
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_are_answered_for_the_whole_cluster_and_move_with_their_partition() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, u32::from(PARTITIONS));
    broker.create_topic(&format!("{TOPIC}.dlq"), 1);
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // 40 minutes of 24 steady clients (60 a minute: warm baselines after
    // 30), with 30x spikes on six of them at minute 34, an hour back.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let start = (now - 2 * 60 * MINUTE) / MINUTE * MINUTE;
    let file = dir.join("stream.ndjson");
    // Three spiked clients in each half of the partitions: the range
    // assignor gives each instance one half.
    let partitioner = tally_pipelines::partitioner::Partitioner::Murmur2;
    let steady: Vec<String> = (1..=24).map(|i| format!("steady-{i:04}")).collect();
    let half = |low: bool| {
        steady
            .iter()
            .filter(move |c| (partitioner.partition(c, PARTITIONS) < PARTITIONS / 2) == low)
            .take(3)
            .cloned()
    };
    let spiked: Vec<String> = half(true).chain(half(false)).collect();
    assert_eq!(spiked.len(), 6);
    let mut gen = std::process::Command::new(tally_bin());
    gen.arg("gen")
        .args(["--start", &start.to_string(), "--duration", "40m"])
        .args(["--rate", "1", "--clients", "50", "--endpoints", "4"])
        .args(["--steady-clients", "24", "--steady-rate", "60"])
        .arg("--out")
        .arg(&file);
    for client in &spiked {
        gen.args([
            "--inject",
            &format!("spike:client={client},at=+34m,size=30"),
        ]);
    }
    let out = gen.output().unwrap();
    assert!(
        out.status.success(),
        "gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<(String, String)> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["client_id"].as_str().unwrap().to_string(), l.to_string())
        })
        .collect();
    support::kafka::produce_all(&broker.bootstrap(), TOPIC, &records).await;

    let args = cluster_args(&broker, "tally-anomalies", &["--allowed-lateness", "1m"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Server::start(&dir.join("a"), &args);
    let b = Server::start(&dir.join("b"), &args);
    let c = client();
    let split = wait_for_split(&c, &[&a, &b], PARTITIONS).await;

    // Both instances answer the same list, with every injected spike in
    // it, whichever instance found it.
    let spike_at = tally_pipelines::time::format_rfc3339_ms(start + 35 * MINUTE);
    let has_spikes = |found: &[(String, String, String)]| {
        spiked.iter().all(|client| {
            found
                .iter()
                .any(|(c, t, at)| c == client && t == "SPIKE_IN_REQUESTS" && *at == spike_at)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        let (at_a, at_b) = (
            cluster_anomalies(&c, &a).await,
            cluster_anomalies(&c, &b).await,
        );
        if let (Some(at_a), Some(at_b)) = (at_a, at_b) {
            if has_spikes(&at_a) && at_a == at_b {
                break at_a;
            }
            assert!(
                Instant::now() < deadline,
                "A answers {at_a:?}, B answers {at_b:?}"
            );
        }
        assert!(Instant::now() < deadline, "no cluster anomaly answer");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let found_by_a = spiked
        .iter()
        .filter(|c| split[0].contains(&partitioner.partition(c, PARTITIONS)))
        .count();
    assert!(
        found_by_a > 0 && found_by_a < spiked.len(),
        "the spiked clients should span both instances ({split:?})"
    );

    // A dies; B takes its partitions and answers for what A found.
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.kill();
    let deadline = Instant::now() + Duration::from_secs(240);
    while support::kafka::owned(&c, &b).await.len() != usize::from(PARTITIONS) {
        assert!(
            Instant::now() < deadline,
            "the survivor never took every partition"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = loop {
        if let Some(found) = cluster_anomalies(&c, &b).await {
            break found;
        }
        assert!(Instant::now() < deadline, "B does not answer anomalies");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        after, before,
        "what the dead instance found moved to the survivor"
    );
}
