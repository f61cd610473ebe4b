//! `GET /v1/telemetry/{series}` and `GET /v1/telemetry`.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_pipelines::telemetry::query::{Agg, Summary};
use tally_pipelines::time::format_rfc3339_ms;

use super::{
    embedded_only, format_step, range_of, series_of, series_steps, DEFAULT_PAGE, MAX_PAGE,
};
use crate::error::{ApiError, FieldProblem};
use crate::http::AppState;

#[derive(Debug, Deserialize)]
pub(super) struct QueryParams {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    agg: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
pub(super) struct StepPoint {
    timestamp: String,
    value: Option<f64>,
    count: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct QueryResponse {
    series: String,
    /// The range answered: `from` rounded down to the step.
    from: String,
    to: String,
    step: String,
    step_ms: i64,
    /// The stored resolution the steps are merged from.
    resolution: String,
    resolution_ms: i64,
    agg: &'static str,
    points: Vec<StepPoint>,
    summary: Summary,
}

pub(super) async fn query(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
) -> Result<Json<QueryResponse>, ApiError> {
    embedded_only(&state)?;
    let mut problems = Vec::new();
    let agg = match params.agg.as_deref() {
        None => Some(Agg::Mean),
        Some(a) => Agg::parse(a).or_else(|| {
            problems.push(FieldProblem::field(
                "agg",
                "must be one of mean, median, min, max, first, last, sum, count, stddev, p95, p99",
            ));
            None
        }),
    };
    let range = range_of(
        &state,
        params.from.as_deref(),
        params.to.as_deref(),
        params.step.as_deref(),
        &mut problems,
    );
    let (Some(agg), Some(range)) = (agg, range) else {
        return Err(ApiError::bad_request("invalid query parameters", problems));
    };
    if let Some(unknown) = params.rest.keys().find(|k| !k.starts_with("tags.")) {
        return Err(ApiError::bad_request(
            "invalid query parameters",
            vec![FieldProblem::field(
                unknown,
                "unknown parameter; use from, to, step, agg and tags.<key>",
            )],
        ));
    }
    let series = series_of(&name, &params.rest);
    let (steps, all) = series_steps(&state, series.clone(), &range).await?;
    Ok(Json(QueryResponse {
        series,
        from: format_rfc3339_ms(range.from - range.from.rem_euclid(range.step)),
        to: format_rfc3339_ms(range.to),
        step: format_step(range.step),
        step_ms: range.step,
        resolution: format_step(range.resolution),
        resolution_ms: range.resolution,
        agg: agg.name(),
        points: steps
            .iter()
            .map(|(start, b)| StepPoint {
                timestamp: format_rfc3339_ms(*start),
                value: agg.of(b),
                count: b.moments.count(),
            })
            .collect(),
        summary: Summary::of(&all),
    }))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListParams {
    prefix: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub(super) struct ListResponse {
    series: Vec<String>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

pub(super) async fn list(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<ListResponse>, ApiError> {
    embedded_only(&state)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(
            "invalid query parameters",
            vec![FieldProblem::field(
                "limit",
                format!("must be 1..={MAX_PAGE}"),
            )],
        ));
    }
    let prefix = params.prefix.unwrap_or_default();
    let cursor = params.cursor;
    let partitions = state.store.partitions();
    let store = state.store.clone();
    // Each partition's first `limit + 1` after the cursor, merged: the
    // page is the first `limit` of all of them.
    let mut all = crate::http::blocking(move || {
        let mut all = Vec::new();
        for p in 0..partitions {
            all.extend(store.telemetry_series_page(p, &prefix, cursor.as_deref(), limit + 1)?);
        }
        Ok(all)
    })
    .await?;
    all.sort_unstable();
    let more = all.len() > limit;
    all.truncate(limit);
    Ok(Json(ListResponse {
        next_cursor: more.then(|| all.last().cloned()).flatten(),
        series: all,
    }))
}
