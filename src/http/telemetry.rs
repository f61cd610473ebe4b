//! Telemetry over HTTP: `POST /v1/telemetry` (the formats and the error
//! contract of `/v1/events`), `GET /v1/telemetry/{series}` (downsampled
//! points and a range summary, as exact merges of stored buckets),
//! `GET /v1/telemetry` (the series, paginated) and
//! `GET /v1/telemetry/correlate` (two series joined by time, Pearson's r).
//!
//! Telemetry is taken in embedded mode; a Kafka-mode instance refuses it
//! (501) rather than keep series that its partitions' changelog would not
//! carry to the next owner.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::histogram;
use serde::{Deserialize, Serialize};
use tally_actors::telemetry::{EventsRejected, BATCH_DURATION};
use tally_actors::Source;
use tally_pipelines::decode::decode_body_keeping;
use tally_pipelines::dedupe::derived_point_id;
use tally_pipelines::telemetry::correlate::{join, Correlation};
use tally_pipelines::telemetry::query::{resolution_for, steps_of, Agg, Summary};
use tally_pipelines::telemetry::{series_key, Bucket, Point};
use tally_pipelines::time::{format_rfc3339_ms, Granularity, HOUR_MS};

use super::ingest::{idempotency_key, not_applied, read_ingest_body, IngestError};
use super::AppState;
use crate::config::Config;
use crate::error::{ApiError, FieldProblem};

/// Points one query answers at most.
const MAX_QUERY_POINTS: i64 = 100_000;
/// Stored buckets one query reads at most.
const MAX_BUCKETS_READ: i64 = 500_000;
/// Default and largest page of the series list and of matched pairs.
const DEFAULT_PAGE: usize = 1_000;
const MAX_PAGE: usize = 10_000;

pub fn router(config: &Config) -> Router<AppState> {
    Router::new()
        .route("/v1/telemetry", post(ingest).get(list))
        .route("/v1/telemetry/correlate", get(correlate))
        .route("/v1/telemetry/{series}", get(query))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
}

fn embedded_only(state: &AppState) -> Result<(), ApiError> {
    if state.kafka_ingest.is_some() {
        return Err(ApiError::Http {
            status: StatusCode::NOT_IMPLEMENTED,
            detail:
                "telemetry is taken by instances in embedded mode; this instance runs in Kafka mode"
                    .into(),
        });
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct TelemetryIngestResponse {
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub late: u64,
    /// Points of new series refused: their partition holds
    /// `telemetry.max_series` series already.
    pub over_series_limit: u64,
    pub errors: Vec<IngestError>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub errors_truncated: bool,
}

async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<TelemetryIngestResponse>), ApiError> {
    embedded_only(&state)?;
    let started = Instant::now();
    let key = idempotency_key(&headers)?;
    let body = read_ingest_body(&state, &headers, body).await?;
    let (bytes, format) = (body.bytes.clone(), body.format);
    let ctx = state.config.validation(state.config.clock.now_ms());
    let keep = state.config.max_errors_reported;
    let mut decoded = tokio::task::spawn_blocking(move || {
        decode_body_keeping::<Point>(format, &bytes, &ctx, keep)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decoder task failed: {e}")))?
    .map_err(|e| ApiError::bad_request(e.to_string(), vec![]))?;
    EventsRejected {
        source: "http_telemetry",
        count: decoded.rejected_total,
    }
    .emit();
    if let Some(key) = &key {
        // A body retried with the same key carries the same point ids.
        for (point, index) in decoded.events.iter_mut().zip(&decoded.indices) {
            if point.point_id.is_none() {
                point.point_id = Some(derived_point_id(key, *index, point));
            }
        }
    }
    let indices = std::mem::take(&mut decoded.indices);
    let points = std::mem::take(&mut decoded.events);
    let outcome = if points.is_empty() {
        Default::default()
    } else {
        let ingested = state
            .shards
            .ingest_durable_parts(points, Source::Http)
            .await?;
        if let Some(first) = ingested.failed.first() {
            let mut failed = vec![false; indices.len()];
            for part in &ingested.failed {
                for &i in &part.positions {
                    failed[i] = true;
                }
            }
            return Err(not_applied(
                &indices,
                |i| !failed[i],
                first.error.to_string(),
                key.is_some(),
            ));
        }
        ingested.outcome
    };
    let errors = decoded
        .rejected
        .iter()
        .map(|(index, reason)| IngestError {
            index: *index,
            reason: reason.to_string(),
        })
        .collect();
    histogram!(BATCH_DURATION, "source" => "http_telemetry")
        .record(started.elapsed().as_secs_f64());
    Ok((
        StatusCode::ACCEPTED,
        Json(TelemetryIngestResponse {
            accepted: outcome.accepted,
            rejected: decoded.rejected_total,
            duplicates: outcome.duplicates,
            late: outcome.late,
            over_series_limit: outcome.over_series_limit,
            errors,
            errors_truncated: decoded.rejected_total > decoded.rejected.len() as u64,
        }),
    ))
}

/// A series named in a query: the key as listed, or a name with
/// `tags.k=v` parameters.
fn series_of(name: &str, params: &BTreeMap<String, String>) -> String {
    let tags: BTreeMap<String, String> = params
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("tags.")?.to_string(), v.clone())))
        .collect();
    if tags.is_empty() {
        name.to_string()
    } else {
        series_key(name, &tags)
    }
}

/// A step: a duration (`10s`, `1m`, `1h`) or milliseconds.
fn parse_step(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return if ms > 0 {
            Ok(ms)
        } else {
            Err("must be positive".into())
        };
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration ({e}); use e.g. 10s, 1m, 1h"))
        .and_then(|d| {
            i64::try_from(d.as_millis())
                .ok()
                .filter(|ms| *ms > 0)
                .ok_or_else(|| "must be a positive number of milliseconds".into())
        })
}

fn format_step(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// A checked range and step, with the stored resolution that serves it.
struct Range {
    from: i64,
    to: i64,
    step: i64,
    resolution: i64,
}

fn range_of(
    state: &AppState,
    from: Option<&str>,
    to: Option<&str>,
    step: Option<&str>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Range> {
    let to = super::usage::instant("to", to, problems).or_else(|| {
        problems
            .iter()
            .all(|p| p.field.as_deref() != Some("to"))
            .then(|| state.config.clock.now_ms())
    });
    let from = super::usage::instant("from", from, problems);
    let to = to?;
    let from = from.unwrap_or(to - HOUR_MS);
    if from >= to {
        problems.push(FieldProblem::field("from", "must be before `to`"));
        return None;
    }
    let resolutions: Vec<i64> = state
        .config
        .telemetry
        .resolutions_ms
        .iter()
        .map(|r| i64::from(*r))
        .collect();
    let step = match step.map(parse_step) {
        Some(Ok(ms)) => ms,
        Some(Err(e)) => {
            problems.push(FieldProblem::field("step", e));
            return None;
        }
        // The finest resolution that answers at most 1,440 points.
        None => resolutions
            .iter()
            .copied()
            .find(|r| (to - from) / r <= 1_440)
            .or(resolutions.last().copied())?,
    };
    let Some(resolution) = resolution_for(step, &resolutions) else {
        problems.push(FieldProblem::field(
            "step",
            format!(
                "must be a multiple of a stored resolution ({})",
                resolutions
                    .iter()
                    .map(|r| format_step(*r))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
        return None;
    };
    if (to - from) / step > MAX_QUERY_POINTS || (to - from) / resolution > MAX_BUCKETS_READ {
        problems.push(FieldProblem::field(
            "step",
            format!("the range spans more than {MAX_QUERY_POINTS} steps of {}; use a coarser step or a narrower range", format_step(step)),
        ));
        return None;
    }
    Some(Range {
        from,
        to,
        step,
        resolution,
    })
}

/// The steps of one telemetry series, read from its partition.
async fn series_steps(
    state: &AppState,
    series: String,
    range: &Range,
) -> Result<(Vec<(i64, Bucket)>, Bucket), ApiError> {
    let partition = state.store.partition_of(&series);
    let (first, to, step) = (
        range.from - range.from.rem_euclid(range.step),
        range.to,
        range.step,
    );
    let resolution = u32::try_from(range.resolution).unwrap_or(u32::MAX);
    let buckets = super::read_partition(state, partition, move |store| {
        store.read_telemetry(partition, &series, resolution, first, to)
    })
    .await?;
    Ok(steps_of(buckets, first, to, step))
}

#[derive(Debug, Deserialize)]
struct QueryParams {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
    agg: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct StepPoint {
    timestamp: String,
    value: Option<f64>,
    count: u64,
}

#[derive(Debug, Serialize)]
struct QueryResponse {
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

async fn query(
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
struct ListParams {
    prefix: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct ListResponse {
    series: Vec<String>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

async fn list(
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
    let mut all = super::blocking(move || {
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

#[derive(Debug, Deserialize)]
struct CorrelateParams {
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
struct PairOut {
    a_timestamp: String,
    a: f64,
    b_timestamp: String,
    b: f64,
}

#[derive(Debug, Serialize)]
struct CorrelateResponse {
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
            let minutes = super::read_partition(state, partition, move |store| {
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

async fn correlate(
    State(state): State<AppState>,
    Query(params): Query<CorrelateParams>,
) -> Result<Json<CorrelateResponse>, ApiError> {
    embedded_only(&state)?;
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
