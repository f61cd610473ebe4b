//! `GET /v1/telemetry/correlate`: two series (or a client's usage) joined
//! by time, Pearson's r in one pass, the pairs a page at a time.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_pipelines::telemetry::correlate::{join, Correlation};
use tally_pipelines::telemetry::query::Agg;
use tally_pipelines::time::{format_rfc3339_ms, Granularity};

use super::{format_step, range_of, series_steps, Range, DEFAULT_PAGE, MAX_PAGE};
use crate::error::{ApiError, FieldProblem};
use crate::http::AppState;

#[derive(Debug, Deserialize)]
pub(super) struct CorrelateParams {
    a: Option<String>,
    b: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    agg: Option<String>,
    tolerance_ms: Option<i64>,
    cursor: Option<i64>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub(super) struct PairOut {
    a_timestamp: String,
    a: f64,
    b_timestamp: String,
    b: f64,
}

#[derive(Debug, Serialize)]
pub(super) struct CorrelateResponse {
    a: String,
    b: String,
    from: String,
    to: String,
    step: String,
    tolerance_ms: i64,
    /// Pairs matched in the whole range (every page).
    matched: u64,
    /// Pearson's r over every matched pair; absent below two pairs or
    /// when a side is constant.
    pearson_r: Option<f64>,
    pairs: Vec<PairOut>,
    /// Pass as `cursor` for the next page of pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<i64>,
}

/// What a side of a correlation names.
enum Side {
    Series(String),
    /// `usage:<client_id>:requests|errors|latency_p95`, per minute.
    Usage {
        client: String,
        measure: Measure,
    },
}

#[derive(Clone, Copy)]
enum Measure {
    Requests,
    Errors,
    LatencyP95,
}

fn side_of(text: &str) -> Result<Side, String> {
    let Some(rest) = text.strip_prefix("usage:") else {
        return Ok(Side::Series(text.to_string()));
    };
    let (client, measure) = rest
        .rsplit_once(':')
        .ok_or("a usage series is usage:<client_id>:requests|errors|latency_p95")?;
    let measure = match measure {
        "requests" => Measure::Requests,
        "errors" => Measure::Errors,
        "latency_p95" => Measure::LatencyP95,
        other => {
            return Err(format!(
                "unknown usage measure {other:?}; use requests, errors or latency_p95"
            ))
        }
    };
    if client.is_empty() {
        return Err("a usage series names a client: usage:<client_id>:<measure>".into());
    }
    Ok(Side::Usage {
        client: client.to_string(),
        measure,
    })
}

/// One side's values per step, in time order.
async fn side_values(
    state: &AppState,
    side: Side,
    range: &Range,
    agg: Agg,
) -> Result<Vec<(i64, f64)>, ApiError> {
    match side {
        Side::Series(series) => {
            let (steps, _) = series_steps(state, series, range).await?;
            Ok(steps
                .iter()
                .filter_map(|(t, b)| Some((*t, agg.of(b)?)))
                .collect())
        }
        Side::Usage { client, measure } => {
            let partition = state.store.partition_of(&client);
            let first = range.from - range.from.rem_euclid(range.step);
            let (to, step) = (range.to, range.step);
            let minutes = crate::http::read_partition(state, partition, move |store| {
                store.read_buckets(partition, &client, Granularity::Minute, first, to)
            })
            .await?;
            // Minutes merged into steps, as telemetry buckets are.
            let mut out: Vec<(i64, tally_pipelines::aggregate::EndpointStats)> = Vec::new();
            for (start, bucket) in minutes {
                let window = start - (start - first).rem_euclid(step);
                let totals = bucket.totals();
                match out.last_mut() {
                    Some((w, t)) if *w == window => t.merge(&totals),
                    _ => out.push((window, totals)),
                }
            }
            Ok(out
                .into_iter()
                .filter_map(|(t, s)| {
                    let v = match measure {
                        Measure::Requests => s.requests as f64,
                        Measure::Errors => s.server_errors as f64,
                        Measure::LatencyP95 => s.latency.quantile(0.95)?,
                    };
                    Some((t, v))
                })
                .collect())
        }
    }
}

pub(super) async fn correlate(
    State(state): State<AppState>,
    Query(params): Query<CorrelateParams>,
) -> Result<Json<CorrelateResponse>, ApiError> {
    let mut problems = Vec::new();
    let mut side = |field: &str, value: Option<&String>| match value.map(|v| side_of(v)) {
        Some(Ok(side)) => Some(side),
        Some(Err(e)) => {
            problems.push(FieldProblem::field(field, e));
            None
        }
        None => {
            problems.push(FieldProblem::field(field, "required"));
            None
        }
    };
    let (a, b) = (side("a", params.a.as_ref()), side("b", params.b.as_ref()));
    let agg = match params.agg.as_deref().map(Agg::parse) {
        None => Some(Agg::Mean),
        Some(Some(agg)) => Some(agg),
        Some(None) => {
            problems.push(FieldProblem::field("agg", "unknown aggregation"));
            None
        }
    };
    let tolerance = params.tolerance_ms.unwrap_or(0);
    if !(0..=86_400_000).contains(&tolerance) {
        problems.push(FieldProblem::field("tolerance_ms", "must be 0..=86400000"));
    }
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        problems.push(FieldProblem::field(
            "limit",
            format!("must be 1..={MAX_PAGE}"),
        ));
    }
    let step = params.step.as_deref().or(Some("1m"));
    let range = range_of(
        &state,
        params.from.as_deref(),
        params.to.as_deref(),
        step,
        &mut problems,
    );
    let (Some(a), Some(b), Some(agg), Some(range), true) = (a, b, agg, range, problems.is_empty())
    else {
        return Err(ApiError::bad_request("invalid query parameters", problems));
    };
    let (a_name, b_name) = (
        params.a.clone().unwrap_or_default(),
        params.b.clone().unwrap_or_default(),
    );
    let xs = side_values(&state, a, &range, agg).await?;
    let ys = side_values(&state, b, &range, agg).await?;
    let pairs = join(&xs, &ys, tolerance);
    let mut r = Correlation::default();
    for &(_, x, _, y) in &pairs {
        r.add(x, y);
    }
    // The cursor is the last pair's time on side `a`, in ms.
    let after = params.cursor.unwrap_or(i64::MIN);
    let mut rest = pairs.iter().filter(|p| p.0 > after);
    let page: Vec<PairOut> = rest
        .by_ref()
        .take(limit)
        .map(|&(ta, va, tb, vb)| PairOut {
            a_timestamp: format_rfc3339_ms(ta),
            a: va,
            b_timestamp: format_rfc3339_ms(tb),
            b: vb,
        })
        .collect();
    let next_cursor = match rest.next() {
        Some(_) => pairs
            .iter()
            .filter(|p| p.0 > after)
            .nth(limit - 1)
            .map(|p| p.0),
        None => None,
    };
    Ok(Json(CorrelateResponse {
        a: a_name,
        b: b_name,
        from: format_rfc3339_ms(range.from - range.from.rem_euclid(range.step)),
        to: format_rfc3339_ms(range.to),
        step: format_step(range.step),
        tolerance_ms: tolerance,
        matched: r.count(),
        pearson_r: r.pearson(),
        pairs: page,
        next_cursor,
    }))
}
