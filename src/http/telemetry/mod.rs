//! Telemetry over HTTP: `POST /v1/telemetry` (the formats and the error
//! contract of `/v1/events`), `GET /v1/telemetry/{series}` (downsampled
//! points and a range summary, as exact merges of stored buckets),
//! `GET /v1/telemetry` (the series, paginated) and
//! `GET /v1/telemetry/correlate` (two series joined by time, Pearson's r).
//!
//! In Kafka mode points are produced to the telemetry topic (keyed by
//! series) and counted when consumed; a series' query is answered by the
//! instance that owns its partition (forwarded there), the series list
//! gathers every owner's page, and a correlation is answered by the
//! instance that owns both sides (refused with 501 when two instances
//! do).
//!
//! - [`series`]: one series downsampled, and the list of series.
//! - [`correlate`]: two series joined by time.

mod correlate;
mod series;

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics::histogram;
use serde::Serialize;
use tally_actors::telemetry::{EventsRejected, BATCH_DURATION};
use tally_pipelines::decode::decode_body_keeping;
use tally_pipelines::dedupe::derived_point_id;
use tally_pipelines::telemetry::query::{resolution_for, steps_of};
use tally_pipelines::telemetry::{series_key, Bucket, Point};
use tally_pipelines::time::HOUR_MS;

use super::forward::{forward, owner_of};
use super::ingest::{
    idempotency_key, ingest_shards, produce_to_kafka, read_ingest_body, reported_errors,
    IngestError,
};
use super::AppState;
use crate::error::{ApiError, FieldProblem};

/// Points one query answers at most.
const MAX_QUERY_POINTS: i64 = 100_000;
/// Stored buckets one query reads at most.
const MAX_BUCKETS_READ: i64 = 500_000;
/// Default and largest page of the series list and of matched pairs.
const DEFAULT_PAGE: usize = 1_000;
const MAX_PAGE: usize = 10_000;

pub fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/telemetry", post(ingest).get(series::list))
        .merge(
            Router::new()
                .route("/v1/telemetry/correlate", get(correlate::correlate))
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    to_correlation_owner,
                )),
        )
        .merge(
            Router::new()
                .route("/v1/telemetry/{series}", get(series::query))
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    to_series_owner,
                )),
        )
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
}

/// Kafka mode: a series' query is answered by the instance that owns its
/// partition, forwarded there once from whichever instance received it
/// (as a client's usage is, see [`super::forward`]).
async fn to_series_owner(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(membership) = &state.membership else {
        return next.run(req).await;
    };
    let series = series_of(&name, &params);
    match owner_of(&state, &series, req.headers()) {
        Ok(None) => next.run(req).await,
        Ok(Some(owner)) => match forward(&state, membership.address(), &owner, req).await {
            Ok(response) => response,
            Err(detail) => ApiError::OwnerUnreachable {
                partition: state.shards.partition_of(&series),
                owner,
                detail,
            }
            .into_response(),
        },
        Err(e) => e.into_response(),
    }
}

/// Kafka mode: a correlation is answered by the instance that owns both
/// sides' partitions (forwarded there); two sides owned by two instances
/// are refused (501), since neither holds the other's buckets.
async fn to_correlation_owner(
    State(state): State<AppState>,
    Query(params): Query<BTreeMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(membership) = &state.membership else {
        return next.run(req).await;
    };
    // A side's routing key: the series, or the client of `usage:`.
    let key = |side: &str| match side.strip_prefix("usage:") {
        Some(rest) => rest
            .rsplit_once(':')
            .map_or(rest, |(client, _)| client)
            .to_string(),
        None => side.to_string(),
    };
    let (Some(a), Some(b)) = (
        params.get("a").map(|s| key(s)),
        params.get("b").map(|s| key(s)),
    ) else {
        // The handler says what is missing.
        return next.run(req).await;
    };
    let owners = (
        owner_of(&state, &a, req.headers()),
        owner_of(&state, &b, req.headers()),
    );
    match owners {
        (Ok(None), Ok(None)) => next.run(req).await,
        (Ok(Some(x)), Ok(Some(y))) if x == y => {
            match forward(&state, membership.address(), &x, req).await {
                Ok(response) => response,
                Err(detail) => ApiError::OwnerUnreachable {
                    partition: state.shards.partition_of(&a),
                    owner: x,
                    detail,
                }
                .into_response(),
            }
        }
        (Err(e), _) | (_, Err(e)) => e.into_response(),
        _ => ApiError::Http {
            status: StatusCode::NOT_IMPLEMENTED,
            detail: format!(
                "{a:?} and {b:?} are owned by two instances of the Kafka group (partitions {} and {}); a correlation is answered where one instance owns both",
                state.shards.partition_of(&a),
                state.shards.partition_of(&b)
            ),
        }
        .into_response(),
    }
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
    } else if let Some(kafka) = &state.kafka_ingest {
        produce_to_kafka(kafka, &points, &indices, key.is_some()).await?
    } else {
        ingest_shards(&state, points, &indices, key.is_some()).await?
    };
    let errors = reported_errors(&decoded);
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
