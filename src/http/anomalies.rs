//! Anomaly queries: what the detectors found, newest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tally_pipelines::detect::{Anomaly, Severity};
use tally_pipelines::time::{format_rfc3339_ms, HOUR_MS};

use super::page;
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
    limit: Option<usize>,
    cursor: Option<String>,
}

struct Filter {
    from_ms: i64,
    min_severity: Severity,
    limit: usize,
    /// The last anomaly of the previous page: (detected at, id).
    after: Option<(i64, String)>,
}

fn parse_cursor(cursor: &str) -> Result<(i64, String), ApiError> {
    let (at, id) = cursor.split_once('.').ok_or_else(page::bad_cursor)?;
    let at = at.parse::<i64>().map_err(|_| page::bad_cursor())?;
    if id.is_empty() || !id.starts_with("an-") {
        return Err(page::bad_cursor());
    }
    Ok((at, id.to_string()))
}

fn filter(state: &AppState, params: &Params) -> Result<Filter, ApiError> {
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
        from_ms: state.config.clock.now_ms() - i64::from(hours) * HOUR_MS,
        min_severity,
        limit: page::limit(params.limit, 100, MAX_ANSWER)?,
        after: params.cursor.as_deref().map(parse_cursor).transpose()?,
    })
}

/// Newest first (detection time, then id, both descending), one page, and
/// the cursor of the next page when there is more.
fn render(mut found: Vec<Anomaly>, limit: usize) -> Json<Value> {
    found.sort_by(|a, b| {
        b.detected_at_ms
            .cmp(&a.detected_at_ms)
            .then(b.anomaly_id.cmp(&a.anomaly_id))
    });
    let more = found.len() > limit;
    found.truncate(limit);
    let next_cursor = more
        .then(|| found.last())
        .flatten()
        .map(|a| format!("{}.{}", a.detected_at_ms, a.anomaly_id));
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
    Json(json!({ "anomalies": items, "next_cursor": next_cursor }))
}

async fn read(
    state: &AppState,
    partitions: impl Iterator<Item = u16>,
    client: Option<&str>,
    f: &Filter,
) -> Result<Vec<Anomaly>, ApiError> {
    let mut out = Vec::new();
    for p in partitions {
        let (client, after) = (client.map(str::to_string), f.after.clone());
        let (from_ms, limit, min_severity) = (f.from_ms, f.limit, f.min_severity);
        // One more than a page: whether there is a next page.
        out.extend(
            super::read_partition(state, p, move |store| {
                store.anomalies_newest_first(
                    p,
                    from_ms,
                    after.as_ref().map(|(at, id)| (*at, id.as_str())),
                    limit + 1,
                    |a| {
                        a.severity >= min_severity
                            && client.as_deref().is_none_or(|c| a.client_id == c)
                    },
                )
            })
            .await?,
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
    let f = filter(&state, &params)?;
    let found = match &params.client_id {
        Some(c) => {
            read(
                &state,
                std::iter::once(state.shards.partition_of(c)),
                Some(c),
                &f,
            )
            .await?
        }
        None => read(&state, 0..state.shards.partitions(), None, &f).await?,
    };
    Ok(render(found, f.limit))
}

async fn of_client(
    State(state): State<AppState>,
    Path(client): Path<String>,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let f = filter(&state, &params)?;
    let p = state.shards.partition_of(&client);
    Ok(render(
        read(&state, std::iter::once(p), Some(&client), &f).await?,
        f.limit,
    ))
}
