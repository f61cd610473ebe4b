//! `/v1/keys`: API keys. `POST` answers the secret, once; nothing else
//! ever shows it (only its hash is kept). A key restricted to some
//! clients, or minted under another, sees and manages only its own
//! subtree; revoking a key revokes everything below it.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tally_pipelines::access::token::is_key_id;
use tally_pipelines::access::{
    ControlEvent, KeyRateLimit, KeyRecord, KeyRing, KeySpec, KeyToken, Principal, Scope,
};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant, parse_rfc3339_ms};
use tally_state::retention::wall_clock_ms;

use super::control::{caller, if_match, record, with_etag};
use super::{page, AppState};
use crate::access::Origin;
use crate::error::{ApiError, FieldProblem};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", post(create).get(list))
        .route("/v1/keys/{key_id}", get(show).delete(revoke))
        .route("/v1/keys/{key_id}/rotate", post(rotate))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    /// Scope names, or `["all"]`.
    scopes: Vec<String>,
    #[serde(default)]
    client_ids: Option<BTreeSet<String>>,
    #[serde(default)]
    parent_key_id: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    ip_allowlist: Vec<String>,
    #[serde(default)]
    rate_limit: Option<KeyRateLimit>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct KeyView {
    key_id: String,
    name: String,
    scopes: BTreeSet<Scope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ids: Option<BTreeSet<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    ip_allowlist: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<KeyRateLimit>,
    metadata: BTreeMap<String, String>,
    created_at: String,
    created_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<String>,
    /// `active`, `expired` or `revoked` (its own state; a key under a
    /// revoked parent is refused too).
    state: &'static str,
    /// Secrets that open it now (2 during a rotation's grace).
    secrets: usize,
    version: u64,
}

fn view(k: &KeyRecord, now_ms: i64) -> KeyView {
    let state = if k.revoked_at_ms.is_some() {
        "revoked"
    } else if k.spec.expires_at_ms.is_some_and(|t| t <= now_ms) {
        "expired"
    } else {
        "active"
    };
    KeyView {
        key_id: k.key_id.clone(),
        name: k.spec.name.clone(),
        scopes: k.spec.scopes.clone(),
        client_ids: k.spec.client_ids.clone(),
        parent_key_id: k.spec.parent_key_id.clone(),
        expires_at: k.spec.expires_at_ms.map(format_rfc3339_ms),
        ip_allowlist: k.spec.ip_allowlist.iter().map(|n| n.to_string()).collect(),
        rate_limit: k.spec.rate_limit,
        metadata: k.spec.metadata.clone(),
        created_at: format_rfc3339_ms(k.created_at_ms),
        created_by: k.created_by.clone(),
        revoked_at: k.revoked_at_ms.map(format_rfc3339_ms),
        state,
        secrets: k
            .credentials
            .iter()
            .filter(|c| c.valid_until_ms.is_none_or(|v| v > now_ms))
            .count(),
        version: k.version,
    }
}

fn invalid(problems: Vec<(String, String)>) -> ApiError {
    ApiError::bad_request(
        "invalid key",
        problems
            .into_iter()
            .map(|(f, r)| FieldProblem::field(&f, r))
            .collect(),
    )
}

fn spec_of(body: CreateKey) -> Result<KeySpec, ApiError> {
    let mut problems = Vec::new();
    let mut scopes = BTreeSet::new();
    for s in &body.scopes {
        match (s.as_str(), Scope::parse(s)) {
            ("all", _) => scopes.extend(Scope::ALL),
            (_, Some(scope)) => {
                scopes.insert(scope);
            }
            (_, None) => problems.push((
                "scopes".to_string(),
                format!("unknown scope {s:?}; known: ingest, check, read, billing, admin, all"),
            )),
        }
    }
    let expires_at_ms = match &body.expires_at {
        Some(t) => match parse_rfc3339_ms(t) {
            Ok(ms) => Some(ms),
            Err(e) => {
                problems.push(("expires_at".into(), e));
                None
            }
        },
        None => None,
    };
    let mut ip_allowlist = Vec::new();
    for net in &body.ip_allowlist {
        // A bare address is a one-address network.
        let parsed = net
            .parse::<IpNet>()
            .or_else(|_| net.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => ip_allowlist.push(n.trunc()),
            Err(_) => problems.push((
                "ip_allowlist".into(),
                format!("{net:?} is not a CIDR network (e.g. 10.0.0.0/8, 2001:db8::/32)"),
            )),
        }
    }
    if let Some(parent) = &body.parent_key_id {
        if !is_key_id(parent) {
            problems.push(("parent_key_id".into(), "not a key id".into()));
        }
    }
    if body.metadata.len() > 64
        || body
            .metadata
            .iter()
            .any(|(k, v)| k.len() > 256 || v.len() > 1024)
    {
        problems.push((
            "metadata".into(),
            "at most 64 entries, keys <= 256 bytes, values <= 1024 bytes".into(),
        ));
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(KeySpec {
        name: body.name,
        scopes,
        client_ids: body.client_ids,
        parent_key_id: body.parent_key_id,
        expires_at_ms,
        ip_allowlist,
        rate_limit: body.rate_limit,
        metadata: body.metadata,
    })
}

#[derive(Serialize)]
struct Created {
    /// The secret: shown this once.
    key: String,
    #[serde(flatten)]
    view: KeyView,
}

async fn create(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: CreateKey = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"), vec![]))?;
    let creator = caller(principal);
    let now = wall_clock_ms();
    let spec = spec_of(body)?;
    let spec = state
        .access
        .with_ring(|ring| ring.admit(&creator, spec, now))
        .map_err(invalid)?;
    let token = KeyToken::generate(&mut rand::rng(), None);
    let event = ControlEvent::KeyCreated {
        key_id: token.id().to_string(),
        spec,
        hash: token.hash(),
    };
    record(&state, &creator, origin, now, event, None).await?;
    let shown = state
        .access
        .with_ring(|ring| ring.get(token.id()).map(|k| view(k, now)))
        .ok_or_else(|| ApiError::Internal("a created key is not in the ring".into()))?;
    let location = format!("/v1/keys/{}", token.id());
    let mut response = (
        StatusCode::CREATED,
        Json(Created {
            key: token.reveal().to_string(),
            view: shown,
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    // The secret must not sit in a cache.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    cursor: Option<String>,
    limit: Option<usize>,
    /// The keys as they were then (RFC 3339 or epoch ms).
    as_of: Option<String>,
}

#[derive(Serialize)]
struct KeyPage {
    keys: Vec<KeyView>,
    next_cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<KeyPage>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), vec![]))?;
    let limit = page::limit(q.limit, 100, 1000)?;
    if q.cursor.as_deref().is_some_and(|c| !is_key_id(c)) {
        return Err(page::bad_cursor());
    }
    let viewer = caller(principal);
    let now = wall_clock_ms();
    let page = |ring: &KeyRing, at: i64| {
        let found = ring.list(&viewer, q.cursor.as_deref(), limit + 1);
        let more = found.len() > limit;
        let shown: Vec<KeyView> = found.iter().take(limit).map(|k| view(k, at)).collect();
        (shown, more)
    };
    let (keys, more) = match as_of_ms(q.as_of.as_deref())? {
        Some(at) => page(&ring_at(&state, at).await?, at),
        None => state.access.with_ring(|ring| page(ring, now)),
    };
    let next_cursor = if more {
        keys.last().map(|k| k.key_id.clone())
    } else {
        None
    };
    Ok(Json(KeyPage { keys, next_cursor }))
}

/// The key a path names, if the caller may manage it (else 404: a tenant
/// does not learn which ids exist).
fn managed(state: &AppState, caller: &Principal, key_id: &str) -> Result<(), ApiError> {
    let ok = is_key_id(key_id)
        && state
            .access
            .with_ring(|ring| ring.may_manage(caller, key_id));
    if ok {
        Ok(())
    } else {
        Err(ApiError::NoSuchResource(format!("no key {key_id:?}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    as_of: Option<String>,
}

fn as_of_ms(text: Option<&str>) -> Result<Option<i64>, ApiError> {
    text.map(|t| {
        parse_instant(t).map_err(|e| {
            ApiError::bad_request(
                "invalid query parameters",
                vec![FieldProblem::field("as_of", e)],
            )
        })
    })
    .transpose()
}

/// The key ring as the control log says it was at `at`.
async fn ring_at(state: &AppState, at: i64) -> Result<KeyRing, ApiError> {
    let access = state.access.clone();
    super::blocking(move || Ok(access.ring_at(at)?)).await
}

async fn show(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    Path(key_id): Path<String>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), vec![]))?;
    let viewer = caller(principal);
    managed(&state, &viewer, &key_id)?;
    if let Some(at) = as_of_ms(q.as_of.as_deref())? {
        let ring = ring_at(&state, at).await?;
        let shown = ring.get(&key_id).map(|k| view(k, at)).ok_or_else(|| {
            ApiError::NoSuchResource(format!(
                "key {key_id:?} did not exist at {}",
                format_rfc3339_ms(at)
            ))
        })?;
        return Ok(Json(shown).into_response());
    }
    let now = wall_clock_ms();
    let (shown, version) = state
        .access
        .with_ring(|ring| ring.get(&key_id).map(|k| (view(k, now), k.version)))
        .ok_or_else(|| ApiError::NoSuchResource(format!("no key {key_id:?}")))?;
    Ok(with_etag(Json(shown).into_response(), version))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old secret stays valid (0: refused at once).
    #[serde(default)]
    grace_seconds: u64,
}

/// The longest grace a rotation may give the old secret (30 days).
const MAX_GRACE_SECONDS: u64 = 30 * 86_400;

async fn rotate(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: RotateBody = if body.is_empty() {
        RotateBody { grace_seconds: 0 }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"), vec![]))?
    };
    if body.grace_seconds > MAX_GRACE_SECONDS {
        return Err(invalid(vec![(
            "grace_seconds".into(),
            format!("at most {MAX_GRACE_SECONDS} (30 days)"),
        )]));
    }
    let actor = caller(principal);
    managed(&state, &actor, &key_id)?;
    let expected = if_match(&headers)?;
    let revoked = state
        .access
        .with_ring(|ring| ring.get(&key_id).is_some_and(|k| k.revoked_at_ms.is_some()));
    if revoked {
        return Err(ApiError::bad_request(
            format!("key {key_id} is revoked; create a new one"),
            vec![],
        ));
    }
    let now = wall_clock_ms();
    let token = KeyToken::generate(&mut rand::rng(), Some(&key_id));
    let old_valid_until_ms =
        now.saturating_add(i64::try_from(body.grace_seconds * 1000).unwrap_or(i64::MAX));
    let event = ControlEvent::KeyRotated {
        key_id: key_id.clone(),
        hash: token.hash(),
        old_valid_until_ms,
    };
    record(&state, &actor, origin, now, event, expected).await?;
    let shown = state
        .access
        .with_ring(|ring| ring.get(&key_id).map(|k| view(k, now)))
        .ok_or_else(|| ApiError::Internal("a rotated key is not in the ring".into()))?;
    let mut response = Json(serde_json::json!({
        "key": token.reveal(),
        "old_valid_until": format_rfc3339_ms(old_valid_until_ms),
        "key_id": shown.key_id,
        "version": shown.version,
        "secrets": shown.secrets,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn revoke(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    Path(key_id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let actor = caller(principal);
    managed(&state, &actor, &key_id)?;
    let expected = if_match(&headers)?;
    let already = state
        .access
        .with_ring(|ring| ring.get(&key_id).is_some_and(|k| k.revoked_at_ms.is_some()));
    if already {
        return Ok(StatusCode::NO_CONTENT);
    }
    let now = wall_clock_ms();
    record(
        &state,
        &actor,
        origin,
        now,
        ControlEvent::KeyRevoked { key_id },
        expected,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
