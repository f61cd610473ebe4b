//! JWTs over a real socket: HS256 with a shared secret and RS256 keys
//! from a JWKS file pass the same checks as API keys (scopes and clients
//! from claims), and every kind of bad token gets the same 403.
//! The RSA keys in `tests/fixtures` are test-only keys made for this.

mod support;

use std::path::PathBuf;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{client, Server};

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";
const ISSUER: &str = "https://idp.example.test";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "svc-billing", "iss": ISSUER, "exp": now_s() + 300, "scope": "read"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn rs(claims: &Value, private: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    let pem = std::fs::read(fixture(private)).unwrap();
    encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

async fn status(c: &reqwest::Client, server: &Server, path: &str, token: Option<&str>) -> u16 {
    let mut req = c.get(server.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn jwts_pass_the_same_checks_as_keys_and_bad_ones_are_refused_alike() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = fixture("jwt_jwks.json");
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--jwt-hs256-secret",
            SECRET,
            "--jwt-jwks",
            jwks.to_str().unwrap(),
            "--jwt-issuer",
            ISSUER,
        ],
    );
    let c = client();
    let usage = "/v1/clients/acme/usage";
    // Configured JWTs turn access control on by themselves.
    assert_eq!(status(&c, &server, usage, None).await, 401);

    let tenant = hs(&claims(json!({"client_ids": ["acme"]})), SECRET);
    assert_eq!(status(&c, &server, usage, Some(&tenant)).await, 200);
    assert_eq!(
        status(&c, &server, "/v1/clients/globex/usage", Some(&tenant)).await,
        403
    );
    assert_eq!(
        status(&c, &server, "/v1/usage/top", Some(&tenant)).await,
        403
    );
    let resp = c
        .post(server.url("/v1/events"))
        .bearer_auth(&tenant)
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "no ingest scope");
    // `scopes` as a list works like `scope`.
    let lister = hs(
        &claims(json!({"scope": null, "scopes": ["read", "admin"]})),
        SECRET,
    );
    assert_eq!(
        status(&c, &server, "/v1/usage/top", Some(&lister)).await,
        200
    );

    // RS256 from the JWKS, chosen by kid.
    let rsa = rs(
        &claims(json!({})),
        "jwt_rs256_private.pem",
        Some("tally-test-1"),
    );
    assert_eq!(status(&c, &server, usage, Some(&rsa)).await, 200);

    // Every bad token: the same 403.
    let bad = [
        hs(&claims(json!({"exp": now_s() - 120})), SECRET),
        hs(&claims(json!({"iss": "https://evil.example.test"})), SECRET),
        hs(
            &claims(json!({})),
            "another-secret-that-is-also-32-bytes-long!",
        ),
        rs(
            &claims(json!({})),
            "jwt_other_private.pem",
            Some("tally-test-1"),
        ),
        rs(
            &claims(json!({})),
            "jwt_rs256_private.pem",
            Some("unknown-kid"),
        ),
        // Algorithm confusion: HS256 "signed" with the RSA public key.
        hs(
            &claims(json!({})),
            &std::fs::read_to_string(fixture("jwt_rs256_public.pem")).unwrap(),
        ),
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.".to_string(),
    ];
    let mut details = vec![];
    for token in &bad {
        let resp = c
            .get(server.url(usage))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{token}");
        let v: Value = resp.json().await.unwrap();
        details.push(v["detail"].clone());
    }
    assert!(details.windows(2).all(|w| w[0] == w[1]), "{details:?}");
    server.stop();
}
