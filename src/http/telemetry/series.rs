//! `GET /v1/telemetry/{series}` and `GET /v1/telemetry`.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_actors::kafka::membership::Owner;
use tally_pipelines::telemetry::query::{Agg, Summary};
use tally_pipelines::time::format_rfc3339_ms;

use super::{format_step, range_of, series_of, series_steps, DEFAULT_PAGE, MAX_PAGE};
use crate::error::{ApiError, FieldProblem};
use crate::http::forward::{send, with_caller_address, FORWARDED_BY};
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

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ListResponse {
    series: Vec<String>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Kafka mode: the partitions this instance answers for, and the other
/// owners to ask for theirs. A request forwarded by a member is answered
/// from this instance's own partitions only.
fn list_plan(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Vec<u16>, BTreeSet<String>), ApiError> {
    let all = 0..state.store.partitions();
    let Some(membership) = &state.membership else {
        return Ok((all.collect(), BTreeSet::new()));
    };
    if headers.contains_key(&FORWARDED_BY) {
        return Ok((membership.owned().into_iter().collect(), BTreeSet::new()));
    }
    let (mut local, mut remote) = (Vec::new(), BTreeSet::new());
    for p in all {
        match membership.owner(p) {
            Owner::Local => local.push(p),
            Owner::Remote(owner) => {
                remote.insert(owner);
            }
            Owner::Unknown => return Err(ApiError::PartitionMoving { partition: p }),
        }
    }
    Ok((local, remote))
}

pub(super) async fn list(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
    origin: Option<axum::Extension<crate::access::Origin>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Json<ListResponse>, ApiError> {
    let (partitions, others) = list_plan(&state, &headers)?;
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
    let store = state.store.clone();
    // Each partition's first `limit + 1` after the cursor, merged: the
    // page is the first `limit` of all of them (and each other owner's
    // page, which is the same merge of its partitions).
    let mut all = crate::http::blocking(move || {
        let mut all = Vec::new();
        for p in partitions {
            all.extend(store.telemetry_series_page(p, &prefix, cursor.as_deref(), limit + 1)?);
        }
        Ok(all)
    })
    .await?;
    let mut remote_more = false;
    // The caller's address, for the owners' key allowlists.
    let pass_on = with_caller_address(&headers, origin.as_deref());
    if let Some(membership) = &state.membership {
        let path = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
        let pages = futures::future::join_all(others.iter().map(|owner| {
            send(
                &state,
                membership.address(),
                owner,
                &axum::http::Method::GET,
                &path,
                &pass_on,
                axum::body::Bytes::new(),
            )
        }))
        .await;
        for (owner, page) in others.iter().zip(pages) {
            let page = match page {
                Ok(response) if response.status().is_success() => {
                    axum::body::to_bytes(response.into_body(), 64 << 20)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            serde_json::from_slice::<ListResponse>(&b).map_err(|e| e.to_string())
                        })
                }
                Ok(response) => Err(format!("answered {}", response.status())),
                Err(e) => Err(e),
            };
            match page {
                Ok(page) => {
                    // Its unseen series come after its last one, which is
                    // at or after the end of the merged page.
                    remote_more |= page.next_cursor.is_some();
                    all.extend(page.series);
                }
                Err(detail) => {
                    tracing::warn!(owner, detail, "a member did not list its series");
                    return Err(ApiError::Unavailable(
                        "an instance owning some partitions did not list its series; retry shortly"
                            .into(),
                    ));
                }
            }
        }
    }
    all.sort_unstable();
    all.dedup();
    let more = all.len() > limit || remote_more;
    all.truncate(limit);
    Ok(Json(ListResponse {
        next_cursor: more.then(|| all.last().cloned()).flatten(),
        series: all,
    }))
}
