//! `PUT|GET|DELETE /v1/webhooks/{id}` and `GET /v1/webhooks`: webhook
//! configuration and delivery status. The secret is write-only. Changes
//! are control events (versioned, `If-Match`, audited); the running
//! deliveries are their projection.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tally_pipelines::access::{ControlEvent, Principal, Stream};

use super::{control, AppState};
use crate::access::Origin;
use crate::error::ApiError;
use crate::webhooks::{validate, WebhookConfig, WebhookStatus};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/webhooks", get(list))
        .route("/v1/webhooks/{id}", get(show).put(put).delete(delete))
}

#[derive(Serialize)]
struct WebhookView {
    id: String,
    url: String,
    event_types: Vec<String>,
    client_ids: Vec<String>,
    enabled: bool,
    delivery: crate::webhooks::DeliveryConfig,
    circuit: tally_pipelines::circuit::CircuitConfig,
    failure: tally_pipelines::circuit::StatusTimeoutLatency,
    status: WebhookStatus,
}

fn view(id: &str, config: WebhookConfig, status: WebhookStatus) -> WebhookView {
    WebhookView {
        id: id.to_string(),
        url: config.url,
        event_types: config.event_types.into_iter().collect(),
        client_ids: config.client_ids.into_iter().collect(),
        enabled: config.enabled,
        delivery: config.delivery,
        circuit: config.circuit,
        failure: config.failure,
        status,
    }
}

fn id_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(format!("invalid webhook id in path: {e}"), vec![]))
}

fn missing(id: &str) -> ApiError {
    ApiError::NoSuchResource(format!("no webhook with id {id:?}"))
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Creates or replaces a webhook: a control change (so it is versioned,
/// audited, and reaches every instance in Kafka mode), applied to the
/// deliveries by the projection's listener before this answers.
async fn put(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<WebhookConfig>, JsonRejection>,
) -> Result<Response, ApiError> {
    let id = id_of(path)?;
    let Json(config) = body.map_err(|e| {
        ApiError::bad_request(
            format!("invalid webhook configuration: {}", e.body_text()),
            vec![],
        )
    })?;
    let problems = validate(&id, &config, state.webhooks.egress());
    if !problems.is_empty() {
        return Err(ApiError::bad_request(
            "invalid webhook configuration",
            problems,
        ));
    }
    let expected = control::if_match(&headers)?;
    let existed = state.webhooks.get(&id).is_some();
    let max = state.config.max_webhooks;
    if !existed && state.webhooks.ids().len() >= max {
        return Err(ApiError::LimitReached(format!(
            "{max} webhooks are configured, the maximum (max_webhooks); delete one or raise the limit"
        )));
    }
    let sealed = state.webhooks.encode(&config).map_err(internal)?;
    let event = ControlEvent::WebhookSet {
        webhook_id: id.clone(),
        config: sealed,
    };
    let actor = control::caller(principal);
    let now = state.config.clock.now_ms();
    let applied = control::record(&state, &actor, origin, now, event, expected).await?;
    let (config, status) = state.webhooks.get(&id).ok_or_else(|| {
        ApiError::Internal(format!("webhook {id:?} was recorded but is not running"))
    })?;
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(control::with_etag(
        (code, Json(view(&id, config, status))).into_response(),
        applied.version,
    ))
}

async fn show(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = id_of(path)?;
    let (config, status) = state.webhooks.get(&id).ok_or_else(|| missing(&id))?;
    let version = state.access.version(Stream::Webhook(&id));
    Ok(control::with_etag(
        Json(view(&id, config, status)).into_response(),
        version,
    ))
}

#[derive(Serialize)]
struct WebhookList {
    webhooks: Vec<WebhookView>,
    /// The id to pass as `cursor` for the next page (ids ascending).
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<WebhookList>, ApiError> {
    let Query(params) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let limit = super::page::limit(params.limit, 100, 1000)?;
    let mut ids = state.webhooks.ids();
    ids.sort();
    let after = params.cursor.unwrap_or_default();
    let mut page: Vec<String> = ids
        .into_iter()
        .filter(|id| after.is_empty() || id.as_str() > after.as_str())
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_cursor = more.then(|| page.last().cloned()).flatten();
    let webhooks = page
        .into_iter()
        .filter_map(|id| {
            let (config, status) = state.webhooks.get(&id)?;
            Some(view(&id, config, status))
        })
        .collect();
    Ok(Json(WebhookList {
        webhooks,
        next_cursor,
    }))
}

async fn delete(
    State(state): State<AppState>,
    principal: Option<Extension<std::sync::Arc<Principal>>>,
    origin: Option<Extension<Origin>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let id = id_of(path)?;
    let expected = control::if_match(&headers)?;
    if state.webhooks.get(&id).is_none() {
        return Err(missing(&id));
    }
    let event = ControlEvent::WebhookDeleted {
        webhook_id: id.clone(),
    };
    let actor = control::caller(principal);
    let now = state.config.clock.now_ms();
    control::record(&state, &actor, origin, now, event, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}
