//! Access control over a real socket: keys made offline and through the
//! API, scopes, client restriction, hierarchy and shared budgets,
//! rotation grace, expiry, allowlists over IPv4 and IPv6, refused
//! requests consuming nothing, persistence across a restart, and the
//! open-API guard at start-up.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::{client, offline_key, tally_bin, Server};

struct Api {
    c: reqwest::Client,
    base: String,
}

impl Api {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self.c.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value, headers)
    }

    async fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let (s, v, _) = self.send(reqwest::Method::GET, path, key, None).await;
        (s, v)
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let (s, v, _) = self
            .send(reqwest::Method::POST, path, key, Some(body))
            .await;
        (s, v)
    }

    /// Creates a key with `admin`; answers (id, secret).
    async fn mint(&self, admin: &str, body: Value) -> (String, String) {
        let (s, v) = self.post("/v1/keys", Some(admin), body.clone()).await;
        assert_eq!(s, 201, "creating {body}: {v}");
        (
            v["key_id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }
}

fn api(server: &Server) -> Api {
    Api {
        c: client(),
        base: server.base.clone(),
    }
}

fn event(client_id: &str, ts: i64) -> Value {
    json!({"client_id": client_id, "endpoint": "/v1/x", "method": "GET", "status": 200,
           "request_bytes": 1, "response_bytes": 1, "latency_ms": 1.0, "timestamp": ts})
}

#[tokio::test]
async fn scopes_and_client_restrictions_decide_every_route_and_refusals_look_alike() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let server = Server::start(&data, &[]);
    let a = api(&server);

    // Liveness is open; everything else wants a key once one exists.
    assert_eq!(a.get("/health/live", None).await.0, 200);
    let (s, v, h) = a
        .send(reqwest::Method::GET, "/v1/clients/acme/usage", None, None)
        .await;
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["status"], 401);
    assert!(h.get("www-authenticate").is_some());
    assert_eq!(a.get("/v1/clients/acme/usage", Some(&admin)).await.0, 200);

    let (_, ingest_only) = a
        .mint(&admin, json!({"name": "gw", "scopes": ["ingest"]}))
        .await;
    let (_, tenant) = a
        .mint(
            &admin,
            json!({"name": "acme", "scopes": ["read"], "client_ids": ["acme"]}),
        )
        .await;
    let now = tally_now();
    let (s, v) = a
        .post(
            "/v1/events",
            Some(&ingest_only),
            json!([event("acme", now), event("globex", now)]),
        )
        .await;
    assert_eq!(s, 202, "{v}");

    // Out of scope, outside its clients, cross-client lists, a mistyped
    // key, an unknown key: all the same 403, saying nothing of the cause.
    let mut typo = tenant.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let unknown = offline_key(&dir.path().join("elsewhere"), &[]);
    let refusals = [
        a.get("/v1/clients/acme/usage", Some(&ingest_only)).await,
        a.get("/v1/clients/globex/usage", Some(&tenant)).await,
        a.get("/v1/usage/top", Some(&tenant)).await,
        a.get("/v1/webhooks", Some(&tenant)).await,
        a.get("/v1/clients/acme/usage", Some(&typo)).await,
        a.get("/v1/clients/acme/usage", Some(&unknown)).await,
        a.get("/v1/clients/acme/usage", Some("not-a-key")).await,
        a.post("/v1/events", Some(&tenant), json!([event("acme", now)]))
            .await,
    ];
    for (s, v) in &refusals {
        assert_eq!(*s, 403, "{v}");
        assert_eq!(v["detail"], refusals[0].1["detail"]);
        assert_eq!(v["title"], "Forbidden");
    }
    // The tenant reads its own usage, X-Api-Key works as well as Bearer.
    let resp =
        a.c.get(format!("{}/v1/clients/acme/usage", a.base))
            .header("x-api-key", &tenant)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);

    // A key limited to `acme` posting for `globex` is refused whole:
    // nothing of the body is applied.
    let (_, acme_ingest) = a
        .mint(
            &admin,
            json!({"name": "acme-gw", "scopes": ["ingest", "read"], "client_ids": ["acme"]}),
        )
        .await;
    let (s, _) = a
        .post(
            "/v1/events",
            Some(&acme_ingest),
            json!([event("acme", now), event("globex", now)]),
        )
        .await;
    assert_eq!(s, 403);

    // Keys are listed without secrets; the log never shows one.
    let (s, listed) = a.get("/v1/keys?limit=2", Some(&admin)).await;
    assert_eq!(s, 200);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2);
    let cursor = listed["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = a
        .get(&format!("/v1/keys?cursor={cursor}"), Some(&admin))
        .await;
    assert_eq!(
        rest["keys"].as_array().unwrap().len(),
        2,
        "4 keys in all: {rest}"
    );
    let shown = format!("{listed}{rest}");
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    for secret in [&admin, &ingest_only, &tenant, &acme_ingest] {
        assert!(!shown.contains(secret.as_str()));
        assert!(!log.contains(&secret[16..]), "a secret is in the log");
    }
    server.stop();
}

fn tally_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_refused_check_takes_nothing_from_the_clients_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let server = Server::start(&data, &[]);
    let a = api(&server);
    let (s, v, _) = a
        .send(
            reqwest::Method::PUT,
            "/v1/clients/metered/limits",
            Some(&admin),
            // 3 tokens refilled over 100 hours: none come back in the test.
            Some(json!({"algorithm": "TOKEN_BUCKET", "global_limit": {"requests": 3, "window_seconds": 360000}})),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {v}");
    let (_, reader) = a
        .mint(&admin, json!({"name": "r", "scopes": ["read"]}))
        .await;
    let (_, gateway) = a
        .mint(&admin, json!({"name": "gw", "scopes": ["check"]}))
        .await;
    let check = json!({"client_id": "metered", "endpoint": "/v1/x"});
    for _ in 0..10 {
        assert_eq!(
            a.post("/v1/check", Some(&reader), check.clone()).await.0,
            403
        );
        assert_eq!(a.post("/v1/check", None, check.clone()).await.0, 401);
    }
    // The limit of 3 is whole: the 20 refusals took none of it.
    let answers: Vec<u16> = {
        let mut out = vec![];
        for _ in 0..4 {
            out.push(a.post("/v1/check", Some(&gateway), check.clone()).await.0);
        }
        out
    };
    assert_eq!(answers, vec![200, 200, 200, 429]);
    server.stop();
}

#[tokio::test]
async fn a_rotated_key_keeps_its_old_secret_for_the_grace_then_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let server = Server::start(&data, &[]);
    let a = api(&server);
    let (id, old) = a
        .mint(&admin, json!({"name": "k", "scopes": ["read"]}))
        .await;
    let (s, v) = a
        .post(
            &format!("/v1/keys/{id}/rotate"),
            Some(&admin),
            json!({"grace_seconds": 2}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let new = v["key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(&new[4..16], id, "the id stays");
    let usage = "/v1/clients/c/usage";
    assert_eq!(a.get(usage, Some(&old)).await.0, 200);
    assert_eq!(a.get(usage, Some(&new)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_eq!(a.get(usage, Some(&old)).await.0, 403);
    assert_eq!(a.get(usage, Some(&new)).await.0, 200);
    // Grace 0: the secret before is refused at once.
    let (_, v) = a
        .post(
            &format!("/v1/keys/{id}/rotate"),
            Some(&admin),
            json!({"grace_seconds": 0}),
        )
        .await;
    let newest = v["key"].as_str().unwrap().to_string();
    assert_eq!(a.get(usage, Some(&new)).await.0, 403);
    assert_eq!(a.get(usage, Some(&newest)).await.0, 200);

    // Optimistic concurrency: created (1), rotated twice (3).
    let (_, shown, headers) = a
        .send(
            reqwest::Method::GET,
            &format!("/v1/keys/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(shown["version"], 3);
    assert_eq!(headers["etag"], "\"3\"");
    let revoke = |version: &'static str| {
        a.c.delete(format!("{}/v1/keys/{id}", a.base))
            .bearer_auth(&admin)
            .header("if-match", version)
            .send()
    };
    let stale = revoke("\"2\"").await.unwrap();
    assert_eq!(stale.status(), 412);
    assert_eq!(
        a.get(usage, Some(&newest)).await.0,
        200,
        "a stale revoke changes nothing"
    );
    assert_eq!(revoke("\"3\"").await.unwrap().status(), 204);
    assert_eq!(a.get(usage, Some(&newest)).await.0, 403);
    server.stop();
}

#[tokio::test]
async fn an_expiring_key_works_until_its_expiry_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let server = Server::start(&data, &[]);
    let a = api(&server);
    let expires = chrono_rfc3339(tally_now() + 2_000);
    let (_, k) = a
        .mint(
            &admin,
            json!({"name": "temp", "scopes": ["read"], "expires_at": expires}),
        )
        .await;
    assert_eq!(a.get("/v1/clients/c/usage", Some(&k)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_eq!(a.get("/v1/clients/c/usage", Some(&k)).await.0, 403);
    let (s, v) = a
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"name": "past", "scopes": ["read"], "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["errors"][0]["field"], "expires_at");
    server.stop();
}

fn chrono_rfc3339(ms: i64) -> String {
    tally_pipelines::time::format_rfc3339_ms(ms)
}

#[tokio::test]
async fn an_organisation_key_mints_narrower_children_shares_its_budget_and_revokes_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let server = Server::start(&data, &[]);
    let a = api(&server);
    let (org_id, org) = a
        .mint(
            &admin,
            json!({"name": "org", "scopes": ["admin", "read"], "client_ids": ["o1", "o2"],
                   "rate_limit": {"requests": 6, "window_seconds": 360000}}),
        )
        .await;
    // 1 request of the org's 6: minting.
    let (child_id, child) = a
        .mint(&org, json!({"name": "reader", "scopes": ["read"]}))
        .await;
    let (s, v) = a.get(&format!("/v1/keys/{child_id}"), Some(&admin)).await;
    assert_eq!(s, 200);
    assert_eq!(v["parent_key_id"], org_id.as_str());
    assert_eq!(v["client_ids"], json!(["o1", "o2"]), "inherited");
    // Wider than the parent: refused (2 and 3 of 6).
    let (s, v) = a
        .post(
            "/v1/keys",
            Some(&org),
            json!({"name": "x", "scopes": ["ingest"]}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = a
        .post(
            "/v1/keys",
            Some(&org),
            json!({"name": "y", "scopes": ["read"], "client_ids": ["o1", "other"]}),
        )
        .await;
    assert_eq!(s, 400);
    // The child reads its clients only.
    assert_eq!(a.get("/v1/clients/other/usage", Some(&child)).await.0, 403);
    // The budget of 6 is the org's and its child's together: 3 used, 3 left.
    let mut statuses = vec![];
    for i in 0..4 {
        let key = if i % 2 == 0 { &child } else { &org };
        statuses.push(a.get("/v1/clients/o1/usage", Some(key)).await.0);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429], "the 7th request of 6");
    // The child does not see its parent; the parent sees both.
    let (_, seen) = a.get("/v1/keys", Some(&admin)).await;
    assert_eq!(seen["keys"].as_array().unwrap().len(), 3);
    // Revoking the org revokes the child.
    let (s, _, _) = a
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/keys/{org_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(a.get("/v1/clients/o1/usage", Some(&child)).await.0, 403);
    assert_eq!(a.get("/v1/clients/o1/usage", Some(&org)).await.0, 403);
    server.stop();

    // Restarted, the log replays to the same answers.
    let server = Server::start(&data, &[]);
    let a = api(&server);
    assert_eq!(a.get("/v1/clients/o1/usage", Some(&child)).await.0, 403);
    assert_eq!(a.get("/v1/clients/o1/usage", Some(&admin)).await.0, 200);
    let (_, v) = a.get(&format!("/v1/keys/{child_id}"), Some(&admin)).await;
    assert_eq!(v["name"], "reader");
    server.stop();
}

#[tokio::test]
async fn an_allowlist_admits_its_networks_over_ipv4_and_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = offline_key(&data, &[]);
    let server = Server::start_on(&data, "[::]:0", &[]);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let v4 = Api {
        c: client(),
        base: format!("http://127.0.0.1:{port}"),
    };
    let v6 = Api {
        c: client(),
        base: format!("http://[::1]:{port}"),
    };
    let (_, six_only) = v4
        .mint(
            &admin,
            json!({"name": "v6", "scopes": ["read"], "ip_allowlist": ["10.0.0.0/8", "::1/128"]}),
        )
        .await;
    let (_, four_only) = v4
        .mint(&admin, json!({"name": "v4", "scopes": ["read"], "ip_allowlist": ["2001:db8::/32", "127.0.0.0/8"]}))
        .await;
    let usage = "/v1/clients/c/usage";
    assert_eq!(v6.get(usage, Some(&six_only)).await.0, 200);
    assert_eq!(v4.get(usage, Some(&six_only)).await.0, 403);
    assert_eq!(v4.get(usage, Some(&four_only)).await.0, 200);
    assert_eq!(v6.get(usage, Some(&four_only)).await.0, 403);
    let (s, v) = v4
        .post(
            "/v1/keys",
            Some(&admin),
            json!({"name": "bad", "scopes": ["read"], "ip_allowlist": ["10.0.0.0/33"]}),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["errors"][0]["field"], "ip_allowlist");
    server.stop();
}

#[tokio::test]
async fn an_open_api_refuses_a_public_listen_address_unless_told_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(tally_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure") && err.contains("TALLY_BOOTSTRAP_KEY"),
        "{err}"
    );

    let server = Server::start_on(&data, "0.0.0.0:0", &["--insecure"]);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let a = Api {
        c: client(),
        base: format!("http://127.0.0.1:{port}"),
    };
    assert_eq!(a.get("/v1/clients/c/usage", None).await.0, 200);
    server.stop();

    // A bootstrap key from the environment turns access control on, and
    // a public address is then fine.
    // (`--bootstrap-key` is the flag of TALLY_BOOTSTRAP_KEY; the test's
    // own environment is shared by the tests running beside it.)
    let key = offline_key(&dir.path().join("keygen"), &[]);
    let server = Server::start_on(&data, "0.0.0.0:0", &["--bootstrap-key", &key]);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let a = Api {
        c: client(),
        base: format!("http://127.0.0.1:{port}"),
    };
    assert_eq!(a.get("/v1/clients/c/usage", None).await.0, 401);
    assert_eq!(a.get("/v1/clients/c/usage", Some(&key)).await.0, 200);
    server.stop();
}
