//! Webhooks against a local receiver (a real HTTP server in this test)
//! that fails on command: the circuit opens after the threshold, probes,
//! closes; events wait in the persisted queue while it is open, across a
//! restart; every alert is delivered exactly once in the end by its
//! idempotency key, in order, with a valid HMAC-SHA256 signature; a
//! webhook whose backlog passes `max_pending` counts the overflow.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::*;

const SECRET: &str = "whsec-test-0123456789";
/// The receivers are on loopback, which webhooks reach only when allowed.
const ALLOW_LOCAL_RECEIVERS: &[&str] = &["--webhook-allow", "127.0.0.1/32"];

#[derive(Default)]
struct Receiver {
    failing: AtomicBool,
    /// Accepted deliveries: (idempotency key, event).
    accepted: Mutex<Vec<(String, Value)>>,
    bad_signatures: Mutex<u32>,
    refused: Mutex<u32>,
}

fn valid_signature(headers: &HeaderMap, body: &[u8]) -> bool {
    let (Some(ts), Some(sig)) = (
        headers.get("x-tally-timestamp"),
        headers.get("x-tally-signature"),
    ) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sig.to_str().unwrap() == format!("sha256={want}")
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !valid_signature(&headers, &body) {
        *r.bad_signatures.lock().unwrap() += 1;
    }
    if r.failing.load(Ordering::SeqCst) {
        *r.refused.lock().unwrap() += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let payload: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        headers["idempotency-key"].to_str().unwrap(),
        payload["idempotency_key"].as_str().unwrap()
    );
    r.accepted.lock().unwrap().push((
        payload["idempotency_key"].as_str().unwrap().to_string(),
        payload["event"].clone(),
    ));
    StatusCode::NO_CONTENT
}

async fn always_fail() -> StatusCode {
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn start_receiver() -> (Arc<Receiver>, String) {
    let receiver = Arc::new(Receiver::default());
    receiver.failing.store(true, Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/hook", post(hook))
        .route("/always-fail", post(always_fail))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (receiver, base)
}

/// Makes `client` rate limited once: one RATE_LIMITED event.
async fn rate_limit(c: &reqwest::Client, server: &Server, client: &str) {
    let limits = json!({"algorithm": "FIXED_WINDOW", "global_limit": {"requests": 1, "window_seconds": 3600}});
    let r = c
        .put(server.url(&format!("/v1/clients/{client}/limits")))
        .json(&limits)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for want in [200, 429] {
        let r = c
            .post(server.url("/v1/check"))
            .json(&json!({"client_id": client, "endpoint": "/x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }
}

async fn webhook(c: &reqwest::Client, server: &Server, id: &str) -> Value {
    let r = c
        .get(server.url(&format!("/v1/webhooks/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn wait_for_state(c: &reqwest::Client, server: &Server, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = webhook(c, server, id).await;
        if w["status"]["circuit_state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never {state}: {w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_survive_failures_and_restarts_and_deliver_everything_once() {
    let (receiver, base) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let server = Server::start(dir.path(), ALLOW_LOCAL_RECEIVERS);

    let config = json!({
        "url": format!("{base}/hook"),
        "secret": SECRET,
        "event_types": ["RATE_LIMITED", "CIRCUIT_STATE_CHANGED"],
        "delivery": {"timeout_ms": 2000, "initial_backoff_ms": 10, "max_backoff_ms": 40},
        "circuit": {"failure_threshold": 3, "success_threshold": 2, "reset_timeout_ms": 300, "probe_count": 1}
    });
    let r = c
        .put(server.url("/v1/webhooks/billing-hook"))
        .json(&config)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let shown: Value = r.json().await.unwrap();
    assert!(shown.get("secret").is_none(), "the secret is write-only");
    let overflowing = json!({
        "url": format!("{base}/always-fail"),
        "secret": SECRET,
        "event_types": ["RATE_LIMITED"],
        "delivery": {"max_pending": 5, "initial_backoff_ms": 10, "max_backoff_ms": 20},
        "circuit": {"reset_timeout_ms": 600000}
    });
    let r = c
        .put(server.url("/v1/webhooks/doomed"))
        .json(&overflowing)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Bad configurations: every problem named.
    let r = c
        .put(server.url("/v1/webhooks/bad"))
        .json(&json!({"url": "ftp://x", "secret": "short", "event_types": ["NOPE"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.unwrap();
    let fields: BTreeSet<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, BTreeSet::from(["url", "secret", "event_types"]));

    // The receiver fails: the circuit opens after 3 failures.
    let clients: Vec<String> = (0..20).map(|i| format!("client-{i:02}")).collect();
    for client in &clients[..10] {
        rate_limit(&c, &server, client).await;
    }
    wait_for_state(&c, &server, "billing-hook", "OPEN").await;
    for client in &clients[10..] {
        rate_limit(&c, &server, client).await;
    }
    let w = webhook(&c, &server, "billing-hook").await;
    assert_eq!(w["status"]["delivered"], 0);
    assert!(w["status"]["pending"].as_u64().unwrap() >= 20, "{w}");

    // Restart while the circuit is open: the queue is persisted.
    assert!(server.stop().success());
    let server = Server::start(dir.path(), ALLOW_LOCAL_RECEIVERS);
    wait_for_state(&c, &server, "billing-hook", "OPEN").await;
    receiver.failing.store(false, Ordering::SeqCst);
    wait_for_state(&c, &server, "billing-hook", "CLOSED").await;

    // Everything arrives, exactly once by idempotency key, in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    let limited = loop {
        let accepted = receiver.accepted.lock().unwrap().clone();
        let limited: Vec<(String, Value)> = accepted
            .into_iter()
            .filter(|(_, e)| e["event_type"] == "RATE_LIMITED")
            .collect();
        if limited.len() >= 20 || Instant::now() > deadline {
            break limited;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let keys: BTreeSet<&str> = limited.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 20, "{limited:?}");
    let got_clients: Vec<&str> = limited
        .iter()
        .map(|(_, e)| e["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got_clients,
        clients.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let ids: Vec<u64> = limited
        .iter()
        .map(|(_, e)| e["event_id"].as_u64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    assert_eq!(*receiver.bad_signatures.lock().unwrap(), 0);
    assert!(*receiver.refused.lock().unwrap() >= 6);

    // Its circuit's transitions are events too: opened, probed, closed.
    // Those of the closing are raised after the queued events and may
    // arrive after them: wait for them as for the others.
    let steps = [
        ("CLOSED", "OPEN"),
        ("OPEN", "HALF_OPEN"),
        ("HALF_OPEN", "CLOSED"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let transitions = loop {
        let transitions: Vec<(String, String)> = receiver
            .accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["event_type"] == "CIRCUIT_STATE_CHANGED")
            .filter(|(_, e)| e["details"]["webhook_id"] == "billing-hook")
            .map(|(_, e)| {
                (
                    e["details"]["from"].as_str().unwrap().to_string(),
                    e["details"]["to"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let all = steps
            .iter()
            .all(|s| transitions.contains(&(s.0.to_string(), s.1.to_string())));
        if all || Instant::now() > deadline {
            break transitions;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for step in steps {
        assert!(
            transitions.contains(&(step.0.to_string(), step.1.to_string())),
            "{step:?} not in {transitions:?}"
        );
    }
    let metrics = metrics_text(&c, &server).await;
    for to in ["OPEN", "HALF_OPEN", "CLOSED"] {
        let label = format!("webhook=\"billing-hook\",to=\"{to}\"");
        assert!(
            metric_value(&metrics, "tally_webhook_circuit_transitions_total", &label)
                .unwrap_or(0.0)
                >= 1.0,
            "{to}: {metrics}"
        );
    }

    // The doomed webhook kept at most 5 pending and counted the rest.
    let w = webhook(&c, &server, "doomed").await;
    assert_eq!(w["status"]["delivered"], 0);
    assert!(w["status"]["overflowed"].as_u64().unwrap() >= 14, "{w}");
    assert!(
        metric_value(
            &metrics,
            "tally_webhook_overflow_total",
            "webhook=\"doomed\""
        )
        .unwrap_or(0.0)
            >= 1.0
    );

    // Listing and deleting.
    let list: Value = c
        .get(server.url("/v1/webhooks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 2);
    let r = c
        .delete(server.url("/v1/webhooks/doomed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .get(server.url("/v1/webhooks/doomed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
