//! Webhook secrets at rest: with `secrets_key` the secret is nowhere in
//! the data directory's files (it is sealed); without one it is there as
//! given (which shows the scan would find it). A restart with the same key
//! reads the webhook back; with another key the webhook is unreadable, not
//! delivered unsigned.

mod support;

use std::path::Path;

use serde_json::json;
use support::{client, Server};

const CANARY: &str = "canary-secret-7f3a9c2e";

/// Whether any file under `dir` holds `needle`.
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if files_contain(&path, needle) {
                return true;
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
    }
    false
}

async fn put_webhook(server: &Server) -> u16 {
    client()
        .put(server.url("/v1/webhooks/billing"))
        .json(&json!({"url": "http://127.0.0.1:9/hook", "secret": CANARY, "enabled": false}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn webhook_status(server: &Server) -> u16 {
    client()
        .get(server.url("/v1/webhooks/billing"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_webhook_secret_is_sealed_at_rest_and_opens_only_with_its_key() {
    let key = "5e".repeat(32);
    let other = "a1".repeat(32);
    let allow = ["--webhook-allow", "127.0.0.1/32"];

    // Without a key: the secret is in the files as given.
    let plain = tempfile::tempdir().unwrap();
    let server = Server::start(&plain.path().join("data"), &allow);
    assert_eq!(put_webhook(&server).await, 201);
    assert!(server.stop().success());
    assert!(
        files_contain(plain.path(), CANARY.as_bytes()),
        "the scan finds a plain secret"
    );

    // With a key: nowhere, and the webhook reads back after a restart.
    let sealed = tempfile::tempdir().unwrap();
    let data = sealed.path().join("data");
    let args = [&allow[..], &["--secrets-key", &key]].concat();
    let server = Server::start(&data, &args);
    assert_eq!(put_webhook(&server).await, 201);
    let shown = client()
        .get(server.url("/v1/webhooks/billing"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!shown.contains(CANARY), "write-only: {shown}");
    assert!(server.stop().success());
    assert!(
        !files_contain(sealed.path(), CANARY.as_bytes()),
        "a sealed secret is in the files"
    );
    let server = Server::start(&data, &args);
    assert_eq!(webhook_status(&server).await, 200);
    assert!(server.stop().success());

    // Another key does not open it: the webhook is not run at all.
    let wrong = [&allow[..], &["--secrets-key", &other]].concat();
    let server = Server::start(&data, &wrong);
    assert_eq!(webhook_status(&server).await, 404);
    assert!(server.stop().success());

    // A malformed key stops serve with a message naming the setting.
    let out = std::process::Command::new(support::tally_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--secrets-key",
            "short",
            "--data-dir",
        ])
        .arg(sealed.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("secrets_key"));
}
