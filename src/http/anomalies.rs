//! Anomaly queries: what the detectors found, newest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tally_pipelines::detect::{Anomaly, Severity};
use tally_pipelines::time::{format_rfc3339_ms, HOUR_MS};
use tally_state::retention::wall_clock_ms;

use super::AppState;
use crate::error::{ApiError, FieldProblem};

/// At most this many anomalies per answer.
const MAX_ANSWER: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/anomalies", get(all))
}

/// Keyed by a client in the path (forwarded to the owner in Kafka mode).
pub fn client_router() -> Router<AppState> {
    Router::new().route("/v1/clients/{client_id}/anomalies", get(of_client))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    client_id: Option<String>,
    lookback_hours: Option<u32>,
    severity_at_least: Option<String>,
}

struct Filter {
    from_ms: i64,
    min_severity: Severity,
}

fn filter(params: &Params) -> Result<Filter, ApiError> {
    let mut problems = Vec::new();
    let hours = params.lookback_hours.unwrap_or(24);
    if hours == 0 || hours > 24 * 400 {
        problems.push(FieldProblem::field(
            "lookback_hours",
            "must be within 1..=9600",
        ));
    }
    let min_severity = match params.severity_at_least.as_deref() {
        None => Severity::Low,
        Some(s) => {
            match serde_json::from_value::<Severity>(Value::String(s.to_ascii_uppercase())) {
                Ok(v) => v,
                Err(_) => {
                    problems.push(FieldProblem::field(
                        "severity_at_least",
                        "must be LOW, MEDIUM, HIGH or CRITICAL",
                    ));
                    Severity::Low
                }
            }
        }
    };
    if !problems.is_empty() {
        return Err(ApiError::bad_request("invalid anomaly query", problems));
    }
    Ok(Filter {
        from_ms: wall_clock_ms() - i64::from(hours) * HOUR_MS,
        min_severity,
    })
}

fn render(mut found: Vec<Anomaly>) -> Json<Value> {
    found.sort_by(|a, b| {
        b.detected_at_ms
            .cmp(&a.detected_at_ms)
            .then(a.anomaly_id.cmp(&b.anomaly_id))
    });
    found.truncate(MAX_ANSWER);
    let items: Vec<Value> = found
        .into_iter()
        .map(|a| {
            json!({
                "anomaly_id": a.anomaly_id,
                "client_id": a.client_id,
                "endpoint": a.endpoint,
                "anomaly_type": a.anomaly_type,
                "severity": a.severity,
                "detected_at": format_rfc3339_ms(a.detected_at_ms),
                "description": a.description,
                "baseline": a.baseline,
                "observed": a.observed,
                "deviation_percent": a.deviation_percent,
            })
        })
        .collect();
    Json(json!({ "anomalies": items }))
}

fn read(
    state: &AppState,
    partitions: impl Iterator<Item = u16>,
    client: Option<&str>,
    f: &Filter,
) -> Result<Vec<Anomaly>, ApiError> {
    let mut out = Vec::new();
    for p in partitions {
        let found = state
            .store
            .anomalies(p, f.from_ms, usize::MAX)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        out.extend(
            found
                .into_iter()
                .filter(|a| a.severity >= f.min_severity)
                .filter(|a| client.is_none_or(|c| a.client_id == c)),
        );
    }
    Ok(out)
}

async fn all(
    State(state): State<AppState>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let f = filter(&params)?;
    let found = match &params.client_id {
        Some(c) => read(
            &state,
            std::iter::once(state.shards.partition_of(c)),
            Some(c),
            &f,
        )?,
        None => read(&state, 0..state.shards.partitions(), None, &f)?,
    };
    Ok(render(found))
}

async fn of_client(
    State(state): State<AppState>,
    Path(client): Path<String>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let f = filter(&params)?;
    let p = state.shards.partition_of(&client);
    Ok(render(read(&state, std::iter::once(p), Some(&client), &f)?))
}
