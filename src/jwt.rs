//! JWTs from an identity provider, judged like API keys: HS256 with a
//! shared secret, RS256 with a public key (PEM) or a JWKS file (the key
//! picked by the token's `kid`). Claims: `sub` (who), `exp` (required),
//! `nbf`, `iss` and `aud` when configured, `scope` (space-separated, as
//! OAuth 2 has it) or `scopes` (a list), and `client_ids` (a list: the
//! clients it may act for; all when absent).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tally_pipelines::access::{Principal, Scope};

/// How JWTs are checked (from configuration).
#[derive(Debug, Clone, Default)]
pub struct JwtSettings {
    pub hs256_secret: Option<crate::config::SecretString>,
    pub rs256_public_key: Option<std::path::PathBuf>,
    pub jwks: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

struct VerifyingKey {
    /// The JWKS key id, if it has one.
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

pub struct JwtVerifier {
    keys: Vec<VerifyingKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// Why a JWT was refused (logged and audited, never told the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRefusal {
    /// No configured key fits its algorithm and `kid`.
    NoKey,
    /// Bad signature, expired, not yet valid, wrong issuer or audience,
    /// or claims that do not parse.
    Invalid,
    Expired,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    client_ids: Option<BTreeSet<String>>,
}

impl JwtVerifier {
    /// `None` when no JWT key is configured.
    pub fn from_settings(s: &JwtSettings) -> anyhow::Result<Option<JwtVerifier>> {
        let mut keys = Vec::new();
        if let Some(secret) = &s.hs256_secret {
            let secret = secret.expose();
            if secret.len() < 32 {
                anyhow::bail!("jwt_hs256_secret: at least 32 bytes (HS256 wants a 256-bit key)");
            }
            keys.push(VerifyingKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(path) = &s.rs256_public_key {
            let pem = read(path, "jwt_rs256_public_key")?;
            keys.push(VerifyingKey {
                kid: None,
                algorithm: Algorithm::RS256,
                key: DecodingKey::from_rsa_pem(&pem).with_context(|| {
                    format!(
                        "jwt_rs256_public_key: {} is not an RSA public key in PEM",
                        path.display()
                    )
                })?,
            });
        }
        if let Some(path) = &s.jwks {
            let text = read(path, "jwt_jwks")?;
            let set: JwkSet = serde_json::from_slice(&text)
                .with_context(|| format!("jwt_jwks: {} is not a JWKS document", path.display()))?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk).with_context(|| {
                    format!("jwt_jwks: key {:?} cannot be used", jwk.common.key_id)
                })?;
                // Only RS256 keys are taken from a JWKS.
                if matches!(
                    jwk.algorithm,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
                ) {
                    keys.push(VerifyingKey {
                        kid: jwk.common.key_id.clone(),
                        algorithm: Algorithm::RS256,
                        key,
                    });
                }
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(JwtVerifier {
            keys,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
        }))
    }

    /// Whether `presented` has a JWT's shape (three base64url parts).
    pub fn looks_like_jwt(presented: &str) -> bool {
        presented.split('.').count() == 3 && !presented.starts_with("tly_")
    }

    pub fn verify(&self, presented: &str) -> Result<Principal, JwtRefusal> {
        let header = jsonwebtoken::decode_header(presented).map_err(|_| JwtRefusal::Invalid)?;
        // The algorithm comes from the key, never from the token alone:
        // a token naming HS256 is not checked against an RSA public key.
        let candidates = self.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let mut refusal = JwtRefusal::NoKey;
        for k in candidates {
            let mut validation = Validation::new(k.algorithm);
            validation.leeway = 5;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp", "sub"]);
            if let Some(iss) = &self.issuer {
                validation.set_issuer(&[iss]);
            }
            match &self.audience {
                Some(aud) => validation.set_audience(&[aud]),
                None => validation.validate_aud = false,
            }
            match jsonwebtoken::decode::<Claims>(presented, &k.key, &validation) {
                Ok(data) => return Ok(principal(data.claims)),
                Err(e) => {
                    refusal = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtRefusal::Expired,
                        _ => JwtRefusal::Invalid,
                    }
                }
            }
        }
        Err(refusal)
    }
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{setting}: cannot read {}", path.display()))
}

/// The principal of a verified token. Its id is `jwt:` + the subject,
/// kept to characters that are safe in a log line.
fn principal(claims: Claims) -> Principal {
    let sub: String = claims
        .sub
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._@:-".contains(*c))
        .take(128)
        .collect();
    let names: Vec<String> = match (claims.scopes, claims.scope) {
        (Some(list), _) => list,
        (None, Some(text)) => text.split_whitespace().map(str::to_string).collect(),
        (None, None) => vec![],
    };
    let mut scopes = BTreeSet::new();
    for n in &names {
        if n == "all" {
            scopes.extend(Scope::ALL);
        } else if let Some(s) = Scope::parse(n) {
            scopes.insert(s);
        }
    }
    let key_id = format!("jwt:{sub}");
    Principal {
        chain: vec![key_id.clone()],
        key_id,
        scopes,
        client_ids: claims.client_ids,
    }
}
