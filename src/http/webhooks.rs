//! `PUT|GET|DELETE /v1/webhooks/{id}` and `GET /v1/webhooks`: webhook
//! configuration and delivery status. The secret is write-only.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::error::ApiError;
use crate::webhooks::{control_key, validate, WebhookConfig, WebhookStatus};

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

async fn put(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<WebhookConfig>, JsonRejection>,
) -> Result<(StatusCode, Json<WebhookView>), ApiError> {
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
    let max = state.config.max_webhooks;
    if state.webhooks.get(&id).is_none() && state.webhooks.ids().len() >= max {
        return Err(ApiError::LimitReached(format!(
            "{max} webhooks are configured, the maximum (max_webhooks); delete one or raise the limit"
        )));
    }
    // In Kafka mode every instance delivers its own events: the change
    // goes to all of them through the control topic.
    if let Some(control) = &state.control {
        let json = state.webhooks.encode(&config).map_err(internal)?;
        control
            .publish(&control_key(&id), Some(&json))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "publishing a webhook to the control topic failed");
                ApiError::Unavailable("cannot publish the webhook; retry shortly".into())
            })?;
    }
    let (hooks, hook_id) = (state.webhooks.clone(), id.clone());
    // Writes the store: off the async workers.
    let created = super::blocking(move || hooks.put(&hook_id, config).map_err(internal)).await?;
    let (config, status) = state.webhooks.get(&id).ok_or_else(|| missing(&id))?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(view(&id, config, status))))
}

async fn show(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<WebhookView>, ApiError> {
    let id = id_of(path)?;
    let (config, status) = state.webhooks.get(&id).ok_or_else(|| missing(&id))?;
    Ok(Json(view(&id, config, status)))
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
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = id_of(path)?;
    if state.webhooks.get(&id).is_none() {
        return Err(missing(&id));
    }
    if let Some(control) = &state.control {
        control
            .publish(&control_key(&id), None)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "publishing a webhook deletion to the control topic failed");
                ApiError::Unavailable("cannot publish the deletion; retry shortly".into())
            })?;
    }
    let (hooks, hook_id) = (state.webhooks.clone(), id.clone());
    if super::blocking(move || hooks.delete(&hook_id).map_err(internal)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(missing(&id))
    }
}
