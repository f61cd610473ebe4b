//! Gateway checks, rate-limit configuration and quotas.
//!
//! Checks go to the shard that owns the client (its limiter lives there),
//! so concurrent checks for one client are exact. Answers carry the IETF
//! `RateLimit-Policy` / `RateLimit` fields; denials are 429 with
//! `Retry-After`.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_actors::limits::CheckAnswer;
use tally_actors::messages::{LimitReply, LimitRequest};
use tally_pipelines::access::{ControlEvent, Principal, Stream};
use tally_pipelines::event::MAX_CLIENT_ID_BYTES;
use tally_pipelines::limit::policy::LimitConfig;
use tally_pipelines::quota::QuotaConfig;
use tally_pipelines::time::format_rfc3339_ms;

use super::{control, history, AppState};
use crate::access::Origin;
use crate::error::{ApiError, FieldProblem};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/check", post(check)).route(
        "/v1/queue-health",
        put(queue_health).get(queue_health_status),
    )
}

/// Routes keyed by a client in the path (forwarded to the owner in Kafka
/// mode, like usage queries).
pub fn client_router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/clients/{client_id}/limits",
            put(put_limits).get(get_limits),
        )
        .route("/v1/clients/{client_id}/limits/status", get(limit_status))
        .route(
            "/v1/clients/{client_id}/limits/counters",
            delete(reset_counters),
        )
        .route(
            "/v1/clients/{client_id}/quota",
            put(put_quota).get(get_quota),
        )
        .route("/v1/clients/{client_id}/quota/status", get(quota_status))
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

fn json_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"), vec![]))
}

fn valid_client(client: &str) -> Result<(), ApiError> {
    if client.is_empty() || client.len() > MAX_CLIENT_ID_BYTES {
        return Err(ApiError::bad_request(
            "invalid client id",
            vec![FieldProblem::field(
                "client_id",
                format!("must be 1..={MAX_CLIENT_ID_BYTES} bytes"),
            )],
        ));
    }
    Ok(())
}

fn problems(list: Vec<(String, String)>) -> Result<(), ApiError> {
    if list.is_empty() {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "invalid configuration",
        list.into_iter()
            .map(|(f, r)| FieldProblem::field(&f, r))
            .collect(),
    ))
}

async fn ask(
    state: &AppState,
    client: &str,
    request: LimitRequest,
) -> Result<LimitReply, ApiError> {
    Ok(state.shards.limits(&state.store, client, request).await?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    client_id: String,
    endpoint: String,
    #[serde(default)]
    #[allow(dead_code)]
    method: Option<String>,
    #[serde(default = "one")]
    cost: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Serialize)]
struct CheckBody {
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    client_id: String,
    algorithm: Option<tally_pipelines::limit::Algorithm>,
    limit: u64,
    remaining: u64,
    reset_ms: i64,
    reset_at: String,
    retry_after_seconds: u64,
    policy: String,
    window_seconds: u64,
    adaptive_factor: f64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    shadow_limited: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    quota_overage: bool,
}

fn seconds_ceil(ms: i64) -> u64 {
    u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000)
}

fn answer(client_id: String, a: CheckAnswer, now_ms: i64) -> Response {
    let retry_after = if a.allowed {
        0
    } else {
        seconds_ceil(a.retry_after_ms)
    };
    let body = CheckBody {
        allowed: a.allowed,
        reason: a.reason.map(|r| r.as_str()),
        client_id,
        algorithm: a.algorithm,
        limit: a.limit,
        remaining: a.remaining,
        reset_ms: a.reset_ms,
        reset_at: format_rfc3339_ms(a.reset_ms),
        retry_after_seconds: retry_after,
        policy: a.policy.clone(),
        window_seconds: a.window_seconds,
        adaptive_factor: a.factor,
        shadow_limited: a.shadow_limited,
        quota_overage: a.quota_overage,
    };
    let status = if a.allowed {
        StatusCode::OK
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    if a.algorithm.is_some() || a.policy == "quota" {
        // Structured-field strings: the policy name is quoted; quotes and
        // backslashes in endpoint names are escaped.
        let name = a.policy.replace('\\', "\\\\").replace('"', "\\\"");
        let reset = seconds_ceil(a.reset_ms.saturating_sub(now_ms));
        if let Ok(v) =
            HeaderValue::from_str(&format!("\"{name}\";q={};w={}", a.limit, a.window_seconds))
        {
            headers.insert(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("\"{name}\";r={};t={reset}", a.remaining)) {
            headers.insert(RATELIMIT, v);
        }
    }
    if !a.allowed {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    response
}

async fn check(
    State(state): State<AppState>,
    principal: Option<axum::Extension<std::sync::Arc<Principal>>>,
    origin: Option<axum::Extension<Origin>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CheckRequest = json_body(&body)?;
    valid_client(&req.client_id)?;
    super::auth::permit_client(
        &state,
        principal.as_deref().map(|p| &**p),
        origin.as_ref().map(|o| &o.0),
        "/v1/check",
        &req.client_id,
    )?;
    // In Kafka mode the client's limiter lives on its partition's owner.
    if let Some(owner) = super::forward::owner_of(&state, &req.client_id, &headers)? {
        let me = state
            .membership
            .as_ref()
            .map(|m| m.address().to_string())
            .unwrap_or_default();
        let method = axum::http::Method::POST;
        return super::forward::send(&state, &me, &owner, &method, "/v1/check", &headers, body)
            .await
            .map_err(|detail| ApiError::OwnerUnreachable {
                partition: state.shards.partition_of(&req.client_id),
                owner,
                detail,
            });
    }
    if req.endpoint.is_empty() {
        return Err(ApiError::bad_request(
            "invalid check",
            vec![FieldProblem::field("endpoint", "must not be empty")],
        ));
    }
    checked(&state, req.client_id, req.endpoint, req.cost, true).await
}

/// A check (or, without `consume`, a status read) and its HTTP answer.
async fn checked(
    state: &AppState,
    client_id: String,
    endpoint: String,
    cost: u64,
    consume: bool,
) -> Result<Response, ApiError> {
    let now_ms = state.config.clock.now_ms();
    let request = LimitRequest::Check {
        client_id: client_id.clone(),
        endpoint,
        cost,
        consume,
        now_ms,
    };
    match ask(state, &client_id, request).await? {
        LimitReply::Check(a) => Ok(answer(client_id, a, now_ms)),
        LimitReply::Done | LimitReply::Quota(_) => {
            Err(ApiError::Internal("unexpected shard reply".into()))
        }
    }
}

#[derive(Debug, Deserialize)]
struct EndpointParam {
    endpoint: Option<String>,
}

fn endpoint_param(
    q: Result<Query<EndpointParam>, QueryRejection>,
) -> Result<Option<String>, ApiError> {
    q.map(|Query(p)| p.endpoint)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))
}

async fn limit_status(
    State(state): State<AppState>,
    Path(client): Path<String>,
    q: Result<Query<EndpointParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    valid_client(&client)?;
    let endpoint = endpoint_param(q)?.unwrap_or_else(|| "*".into());
    checked(&state, client, endpoint, 0, false).await
}

/// Sets a client's limits: recorded in the control log first (at the
/// version `If-Match` names), then applied by the client's partition. A
/// partition that cannot take it answers an error, and the writer's retry
/// records the same configuration again.
async fn put_limits(
    State(state): State<AppState>,
    principal: Option<axum::Extension<std::sync::Arc<Principal>>>,
    origin: Option<axum::Extension<Origin>>,
    Path(client): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    valid_client(&client)?;
    let config: LimitConfig = json_body(&body)?;
    problems(config.problems())?;
    let expected = control::if_match(&headers)?;
    let event = ControlEvent::LimitsSet {
        client_id: client.clone(),
        config: serde_json::to_value(&config).unwrap_or_default(),
    };
    let actor = control::caller(principal);
    let now = state.config.clock.now_ms();
    let applied = control::record(&state, &actor, origin, now, event, expected).await?;
    ask(
        &state,
        &client,
        LimitRequest::SetConfig {
            client_id: client.clone(),
            config: Some(config.clone()),
        },
    )
    .await?;
    let body = json!({"client_id": client, "limits": config, "version": applied.version});
    Ok(control::with_etag(
        Json(body).into_response(),
        applied.version,
    ))
}

async fn get_limits(
    State(state): State<AppState>,
    Path(client): Path<String>,
    q: Result<Query<history::AsOfParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    valid_client(&client)?;
    if let Some(at) = history::as_of(q)? {
        let shown = match history::configured_at(&state, at, history::limits_of, &client).await? {
            Some((config, set_at, set_by)) => {
                json!({"client_id": client, "as_of": format_rfc3339_ms(at),
                "source": "client", "limits": config, "set_at": format_rfc3339_ms(set_at), "set_by": set_by})
            }
            None => match &state.config.limit_default {
                // Nothing of the client's own then: the default applied
                // (as configured now; the file's history is not logged).
                Some(d) => {
                    json!({"client_id": client, "as_of": format_rfc3339_ms(at), "source": "default", "limits": d})
                }
                None => {
                    return Err(ApiError::NoSuchResource(format!(
                        "no rate limit was configured for client {client:?} at {}",
                        format_rfc3339_ms(at)
                    )))
                }
            },
        };
        return Ok(Json(shown).into_response());
    }
    let p = state.shards.partition_of(&client);
    let (store, name) = (state.store.clone(), client.clone());
    let own = super::blocking(move || Ok(store.limit_config(p, &name)?)).await?;
    let (config, source) = match own {
        Some(c) => (Some(c), "client"),
        None => (state.config.limit_default.clone(), "default"),
    };
    let version = state.access.version(Stream::Limits(&client));
    match config {
        Some(c) => Ok(control::with_etag(
            Json(json!({"client_id": client, "source": source, "limits": c, "version": version}))
                .into_response(),
            version,
        )),
        None => Err(ApiError::NotFound(format!(
            "no rate limit configured for client {client:?} and no default"
        ))),
    }
}

async fn reset_counters(
    State(state): State<AppState>,
    Path(client): Path<String>,
    q: Result<Query<EndpointParam>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    valid_client(&client)?;
    let endpoint = endpoint_param(q)?;
    ask(
        &state,
        &client,
        LimitRequest::ResetCounters {
            client_id: client.clone(),
            endpoint,
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets a client's quota, as [`put_limits`] sets limits.
async fn put_quota(
    State(state): State<AppState>,
    principal: Option<axum::Extension<std::sync::Arc<Principal>>>,
    origin: Option<axum::Extension<Origin>>,
    Path(client): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    valid_client(&client)?;
    let config: QuotaConfig = json_body(&body)?;
    problems(config.problems())?;
    let expected = control::if_match(&headers)?;
    let event = ControlEvent::QuotaSet {
        client_id: client.clone(),
        config: serde_json::to_value(&config).unwrap_or_default(),
    };
    let actor = control::caller(principal);
    let now = state.config.clock.now_ms();
    let applied = control::record(&state, &actor, origin, now, event, expected).await?;
    ask(
        &state,
        &client,
        LimitRequest::SetQuota {
            client_id: client.clone(),
            config: Some(config.clone()),
        },
    )
    .await?;
    let body = json!({"client_id": client, "quota": config, "version": applied.version});
    Ok(control::with_etag(
        Json(body).into_response(),
        applied.version,
    ))
}

async fn stored_quota(state: &AppState, client: &str) -> Result<QuotaConfig, ApiError> {
    let p = state.shards.partition_of(client);
    let (store, name) = (state.store.clone(), client.to_string());
    super::blocking(move || Ok(store.quota_config(p, &name)?))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no quota configured for client {client:?}")))
}

async fn get_quota(
    State(state): State<AppState>,
    Path(client): Path<String>,
    q: Result<Query<history::AsOfParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    valid_client(&client)?;
    if let Some(at) = history::as_of(q)? {
        return match history::configured_at(&state, at, history::quota_of, &client).await? {
            Some((config, set_at, set_by)) => Ok(Json(
                json!({"client_id": client, "as_of": format_rfc3339_ms(at),
                "quota": config, "set_at": format_rfc3339_ms(set_at), "set_by": set_by}),
            )
            .into_response()),
            None => Err(ApiError::NoSuchResource(format!(
                "no quota was configured for client {client:?} at {}",
                format_rfc3339_ms(at)
            ))),
        };
    }
    let config = stored_quota(&state, &client).await?;
    let version = state.access.version(Stream::Quota(&client));
    Ok(control::with_etag(
        Json(json!({"client_id": client, "quota": config, "version": version})).into_response(),
        version,
    ))
}

async fn quota_status(
    State(state): State<AppState>,
    Path(client): Path<String>,
) -> Result<Response, ApiError> {
    valid_client(&client)?;
    let request = LimitRequest::QuotaStatus {
        client_id: client.clone(),
        now_ms: state.config.clock.now_ms(),
    };
    let Some((config, s)) = (match ask(&state, &client, request).await? {
        LimitReply::Quota(q) => q,
        _ => return Err(ApiError::Internal("unexpected shard reply".into())),
    }) else {
        return Err(ApiError::NotFound(format!(
            "no quota configured for client {client:?}"
        )));
    };
    Ok(Json(json!({
        "client_id": client,
        "period_start": format_rfc3339_ms(s.period_start_ms),
        "period_end": format_rfc3339_ms(s.period_end_ms),
        "requests_used": s.requests_used,
        "requests_reserved": s.requests_reserved,
        "requests_limit": s.requests_limit,
        "requests_remaining": s.requests_remaining,
        "data_transfer_used": s.data_transfer_used,
        "data_transfer_limit": s.data_transfer_limit,
        "data_transfer_remaining": s.data_transfer_remaining,
        "daily_requests_used": s.daily_requests_used,
        "daily_requests_reserved": s.daily_requests_reserved,
        "daily_request_limit": s.daily_request_limit,
        "percent_used": s.percent_used,
        "is_warning": s.is_warning,
        "is_exceeded": s.is_exceeded,
        "hard_limit": config.hard_limit,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueHealth {
    utilization: f64,
}

async fn queue_health(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let report: QueueHealth = json_body(&body)?;
    if !(0.0..=1.0).contains(&report.utilization) {
        return Err(ApiError::bad_request(
            "invalid queue health",
            vec![FieldProblem::field("utilization", "must be within 0..=1")],
        ));
    }
    let factor = state
        .config
        .adaptive
        .report(report.utilization, state.config.clock.now_ms());
    Ok(Json(json!({"utilization": report.utilization, "adaptive_factor": factor})).into_response())
}

async fn queue_health_status(State(state): State<AppState>) -> Response {
    Json(json!({"adaptive_factor": state.config.adaptive.factor()})).into_response()
}
