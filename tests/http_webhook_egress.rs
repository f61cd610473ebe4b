//! Webhook egress, against a real `tally serve` and real local receivers:
//! URLs whose host is a non-public IP literal (or whose scheme is not
//! HTTP) are refused when configured; a redirect is not followed; a name
//! that resolves to loopback, and a stored literal the allow-list no
//! longer covers, are refused when delivering, with a reason the admin
//! sees; `webhook_allow` lets them through; a bad allow-list stops
//! `tally serve` from starting.
//!
//! No test here sends anything off this machine: the one public address
//! configured is on a disabled webhook.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use serde_json::{json, Value};
use support::*;

const SECRET: &str = "whsec-test-0123456789";
const ALLOW_LOOPBACK_V4: &[&str] = &["--webhook-allow", "127.0.0.1/32"];
/// What the status says of a delivery to a refused address (the value is
/// the API's, written out here rather than imported).
const REFUSED: &str = "refused: destination address is not public";

/// A local receiver counting the requests it gets at any path; answers
/// 204, or with a redirect to `redirect_to` when that is set.
async fn receiver(redirect_to: Option<String>) -> (Arc<AtomicUsize>, std::net::SocketAddr) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(any(move || {
        let counter = counter.clone();
        let redirect_to = redirect_to.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            match redirect_to {
                Some(to) => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (hits, addr)
}

async fn put_webhook(
    c: &reqwest::Client,
    server: &Server,
    id: &str,
    config: &Value,
) -> (u16, Value) {
    let r = c
        .put(server.url(&format!("/v1/webhooks/{id}")))
        .json(config)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = r.json().await.unwrap();
    if status == 400 {
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    }
    (status, body)
}

/// Retries fast, so a test sees several attempts in a second.
fn hook_config(url: &str) -> Value {
    json!({
        "url": url,
        "secret": SECRET,
        "event_types": ["RATE_LIMITED"],
        "delivery": {"timeout_ms": 2000, "initial_backoff_ms": 10, "max_backoff_ms": 50},
    })
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

/// Polls the webhook's view until `done` holds (30 s at most).
async fn wait_for(
    c: &reqwest::Client,
    server: &Server,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .get(server.url(&format!("/v1/webhooks/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let w: Value = r.json().await.unwrap();
        if done(&w) {
            return w;
        }
        assert!(Instant::now() < deadline, "{id} never {what}: {w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn refused_by_egress(w: &Value) -> bool {
    w["status"]["last_error"] == REFUSED && w["status"]["failed_attempts"].as_u64() >= Some(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_public_literals_and_other_schemes_are_refused_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let server = Server::start(&dir.path().join("data"), &[]);
    let refused = [
        ("http://127.0.0.1:8080/hook", "not a public address"),
        ("http://10.0.0.1/hook", "not a public address"),
        (
            "http://169.254.169.254/latest/meta-data",
            "not a public address",
        ),
        ("http://[::1]:8080/hook", "not a public address"),
        ("http://[fc00::1]/hook", "not a public address"),
        ("http://[::ffff:127.0.0.1]/hook", "not a public address"),
        ("ftp://example.com/hook", "http:// or https://"),
    ];
    for (i, (url, why)) in refused.iter().enumerate() {
        let id = format!("refused-{i}");
        let (status, problem) = put_webhook(&c, &server, &id, &hook_config(url)).await;
        assert_eq!(status, 400, "{url}: {problem}");
        let errors = problem["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 1, "{url}: {problem}");
        assert_eq!(errors[0]["field"], "url", "{url}: {problem}");
        let reason = errors[0]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{url}: {reason}");
        if *why == "not a public address" {
            assert!(reason.contains("webhook_allow"), "{url}: {reason}");
        }
        let r = c
            .get(server.url(&format!("/v1/webhooks/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{url} was stored");
    }

    // A public literal is accepted (disabled: nothing is ever sent to it).
    let mut public = hook_config("https://93.184.215.14/hook");
    public["enabled"] = json!(false);
    let (status, shown) = put_webhook(&c, &server, "public", &public).await;
    assert_eq!(status, 201, "{shown}");
    assert_eq!(shown["url"], "https://93.184.215.14/hook");
    assert!(server.stop().success());

    // Allowed by the operator: the IPv4 loopback literal is accepted, the
    // IPv6 one (not in the list) still is not.
    let server = Server::start(&dir.path().join("data"), ALLOW_LOOPBACK_V4);
    let mut local = hook_config("http://127.0.0.1:8080/hook");
    local["enabled"] = json!(false);
    let (status, shown) = put_webhook(&c, &server, "local", &local).await;
    assert_eq!(status, 201, "{shown}");
    let (status, problem) = put_webhook(
        &c,
        &server,
        "local-v6",
        &hook_config("http://[::1]:8080/hook"),
    )
    .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "url");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failed_delivery_and_is_not_followed() {
    let (target_hits, target) = receiver(None).await;
    let (redirect_hits, redirector) = receiver(Some(format!("http://{target}/hook"))).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let server = Server::start(&dir.path().join("data"), ALLOW_LOOPBACK_V4);
    let (status, shown) = put_webhook(
        &c,
        &server,
        "redirected",
        &hook_config(&format!("http://{redirector}/hook")),
    )
    .await;
    assert_eq!(status, 201, "{shown}");
    rate_limit(&c, &server, "client-redirect").await;

    let w = wait_for(&c, &server, "redirected", "failed on the redirect", |w| {
        w["status"]["failed_attempts"].as_u64() >= Some(2)
    })
    .await;
    let last_error = w["status"]["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("302"), "{w}");
    assert_eq!(w["status"]["delivered"], 0, "{w}");
    assert!(redirect_hits.load(Ordering::SeqCst) >= 2);
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_stored_literals_reaching_loopback_are_refused_when_delivering_unless_allowed() {
    let (hits, addr) = receiver(None).await;
    let port = addr.port();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = client();

    // Not allowed: `localhost` is accepted as a name, but what it resolves
    // to is loopback, so nothing is sent.
    let server = Server::start(&data, &[]);
    let (status, shown) = put_webhook(
        &c,
        &server,
        "by-name",
        &hook_config(&format!("http://localhost:{port}/hook")),
    )
    .await;
    assert_eq!(status, 201, "{shown}");
    rate_limit(&c, &server, "client-1").await;
    let w = wait_for(&c, &server, "by-name", "refused", refused_by_egress).await;
    assert_eq!(w["status"]["delivered"], 0, "{w}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert!(server.stop().success());

    // Allowed by CIDR: the waiting event is delivered; a literal loopback
    // URL can be configured.
    let server = Server::start(&data, ALLOW_LOOPBACK_V4);
    wait_for(&c, &server, "by-name", "delivered", |w| {
        w["status"]["delivered"] == 1
    })
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let (status, shown) = put_webhook(
        &c,
        &server,
        "by-literal",
        &hook_config(&format!("http://127.0.0.1:{port}/hook")),
    )
    .await;
    assert_eq!(status, 201, "{shown}");
    assert!(server.stop().success());

    // The allow-list withdrawn: the stored literal is refused too.
    let server = Server::start(&data, &[]);
    rate_limit(&c, &server, "client-2").await;
    for id in ["by-literal", "by-name"] {
        let w = wait_for(&c, &server, id, "refused", refused_by_egress).await;
        assert!(w["status"]["pending"].as_u64() >= Some(1), "{w}");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a refused delivery was sent"
    );
}

/// Runs `tally serve` expecting it to refuse to start; its stderr.
fn refused_start(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(tally_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tally serve started with {args:?} {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    stderr
}

#[test]
fn a_bad_allow_list_from_the_flag_environment_or_file_stops_serve_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_start(
        dir.path(),
        &["--webhook-allow", "127.0.0.1/32,10.0.0.0/33,not a host"],
        &[],
    );
    assert!(stderr.contains("webhook_allow"), "{stderr}");
    assert!(stderr.contains("\"10.0.0.0/33\""), "{stderr}");
    assert!(stderr.contains("\"not a host\""), "{stderr}");
    assert!(!stderr.contains("\"127.0.0.1/32\""), "{stderr}");

    let stderr = refused_start(dir.path(), &[], &[("TALLY_WEBHOOK_ALLOW", "fd00::/129")]);
    assert!(stderr.contains("webhook_allow: \"fd00::/129\""), "{stderr}");

    let file = dir.path().join("tally.toml");
    std::fs::write(&file, "webhook_allow = \"::1/128, hooks internal\"\n").unwrap();
    let stderr = refused_start(dir.path(), &["--config", file.to_str().unwrap()], &[]);
    assert!(
        stderr.contains("webhook_allow: \"hooks internal\""),
        "{stderr}"
    );
}
