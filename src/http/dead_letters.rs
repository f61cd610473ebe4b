//! `GET /v1/dead-letters`: late events set aside, newest first, with the
//! reason they were excluded.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tally_pipelines::time::format_rfc3339_ms;

use super::AppState;
use crate::error::{ApiError, FieldProblem};

const MAX_LIMIT: usize = 100_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/dead-letters", get(list))
}

#[derive(Debug, Deserialize)]
struct Params {
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Item {
    partition: u16,
    sequence: u64,
    reason: String,
    event_time: String,
    recorded_at: String,
    event: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct Response {
    dead_letters: Vec<Item>,
}

async fn list(
    State(state): State<AppState>,
    params: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Response>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid query parameters",
            vec![FieldProblem::field(
                "limit",
                format!("must be within 1..={MAX_LIMIT}"),
            )],
        ));
    }
    let mut records = Vec::new();
    for p in 0..state.store.partitions() {
        records.extend(state.store.dead_letters(p, limit)?);
    }
    records.sort_by(|a, b| {
        b.recorded_at_ms
            .cmp(&a.recorded_at_ms)
            .then(a.partition.cmp(&b.partition))
            .then(b.sequence.cmp(&a.sequence))
    });
    records.truncate(limit);
    Ok(Json(Response {
        dead_letters: records
            .into_iter()
            .map(|r| Item {
                partition: r.partition,
                sequence: r.sequence,
                reason: r.reason,
                event_time: format_rfc3339_ms(r.event_ms),
                recorded_at: format_rfc3339_ms(r.recorded_at_ms),
                event: serde_json::from_str(&r.event_json)
                    .unwrap_or(serde_json::Value::String(r.event_json)),
            })
            .collect(),
    }))
}
