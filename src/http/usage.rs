//! Usage queries: period totals, per-endpoint breakdown, history.
//!
//! Reads go straight to RocksDB (thread-safe, point and short range reads),
//! not through the shards: everything acknowledged is flushed, so it is
//! visible here.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tally_pipelines::aggregate::BucketStats;
use tally_pipelines::event::MAX_CLIENT_ID_BYTES;
use tally_pipelines::time::{format_rfc3339_ms, parse_instant, Granularity, Period, HOUR_MS};

use super::AppState;
use crate::error::{ApiError, FieldProblem};

/// Latencies as reported: the sketch's representative values carry noise
/// digits; three decimals (one microsecond) keep the rounding far inside
/// the 1 % quantile error for anything above half a millisecond.
fn latency(ms: f64) -> f64 {
    if ms >= 0.5 {
        (ms * 1000.0).round() / 1000.0
    } else {
        ms
    }
}

/// At most this many points per history answer.
const MAX_HISTORY_POINTS: i64 = 10_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/clients/{client_id}/usage", get(usage))
        .route("/v1/clients/{client_id}/usage/endpoints", get(endpoints))
        .route("/v1/clients/{client_id}/usage/history", get(history))
}

#[derive(Debug, Deserialize)]
struct PeriodParams {
    period: Option<String>,
    at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HistoryParams {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

pub(super) fn client_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(client) =
        path.map_err(|e| ApiError::bad_request(format!("invalid client id in path: {e}"), vec![]))?;
    if client.is_empty() || client.len() > MAX_CLIENT_ID_BYTES {
        return Err(ApiError::bad_request(
            "invalid client id",
            vec![FieldProblem::field(
                "client_id",
                format!(
                    "must be 1..={MAX_CLIENT_ID_BYTES} bytes, got {}",
                    client.len()
                ),
            )],
        ));
    }
    Ok(client)
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))
}

pub(crate) fn instant(
    field: &str,
    value: Option<&str>,
    problems: &mut Vec<FieldProblem>,
) -> Option<i64> {
    match value.map(parse_instant) {
        Some(Ok(ms)) => Some(ms),
        Some(Err(e)) => {
            problems.push(FieldProblem::field(field, e));
            None
        }
        None => None,
    }
}

/// The period and instant of a period query, every problem reported.
fn period_of(params: &PeriodParams, now_ms: i64) -> Result<(Period, i64), ApiError> {
    let mut problems = Vec::new();
    match parse_period(
        params.period.as_deref(),
        params.at.as_deref(),
        now_ms,
        &mut problems,
    ) {
        Some(p) if problems.is_empty() => Ok(p),
        _ => Err(ApiError::bad_request("invalid query parameters", problems)),
    }
}

/// `period` (default day) and `at` (default now); problems are collected.
pub(super) fn parse_period(
    period: Option<&str>,
    at: Option<&str>,
    now_ms: i64,
    problems: &mut Vec<FieldProblem>,
) -> Option<(Period, i64)> {
    let period = match period {
        None => Some(Period::Day),
        Some(p) => Period::parse(p).or_else(|| {
            problems.push(FieldProblem::field(
                "period",
                format!("{p:?} is not one of hour, day, week, month"),
            ));
            None
        }),
    };
    let at = instant("at", at, problems);
    Some((period?, at.unwrap_or(now_ms)))
}

/// Merges a client's buckets in `[start, end)` at `granularity`.
async fn merged(
    state: &AppState,
    client: &str,
    granularity: Granularity,
    start: i64,
    end: i64,
) -> Result<BucketStats, ApiError> {
    let partition = state.store.partition_of(client);
    let client = client.to_string();
    super::read_partition(state, partition, move |store| {
        let mut total = BucketStats::default();
        for (_, bucket) in store.read_buckets(partition, &client, granularity, start, end)? {
            total.merge(&bucket);
        }
        Ok(total)
    })
    .await
}

#[derive(Debug, Serialize)]
struct UsageResponse {
    client_id: String,
    period: &'static str,
    period_start: String,
    period_end: String,
    total_requests: u64,
    successful_requests: u64,
    failed_requests: u64,
    server_errors: u64,
    total_data_transfer_bytes: u128,
    compute_units: u128,
    average_latency_ms: f64,
    p95_latency_ms: f64,
    p99_latency_ms: f64,
    unique_endpoints: usize,
}

async fn usage(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<PeriodParams>, QueryRejection>,
) -> Result<Json<UsageResponse>, ApiError> {
    let client = client_id(path)?;
    let (period, at) = period_of(&query(params)?, state.config.clock.now_ms())?;
    let (start, end) = period.bounds(at);
    let bucket = merged(&state, &client, period.granularity(), start, end).await?;
    let totals = bucket.totals();
    Ok(Json(UsageResponse {
        period: period.as_str(),
        period_start: format_rfc3339_ms(start),
        period_end: format_rfc3339_ms(end),
        total_requests: totals.requests,
        successful_requests: totals.requests - totals.failed,
        failed_requests: totals.failed,
        server_errors: totals.server_errors,
        total_data_transfer_bytes: totals.bytes,
        compute_units: totals.compute_units,
        average_latency_ms: totals.average_latency_ms(),
        p95_latency_ms: latency(totals.latency.quantile(0.95).unwrap_or(0.0)),
        p99_latency_ms: latency(totals.latency.quantile(0.99).unwrap_or(0.0)),
        unique_endpoints: bucket.distinct_endpoints(),
        client_id: client,
    }))
}

#[derive(Debug, Serialize)]
struct EndpointUsage {
    endpoint: String,
    request_count: u64,
    error_count: u64,
    error_rate: f64,
    average_latency_ms: f64,
    p95_latency_ms: f64,
    total_data_transfer_bytes: u128,
}

#[derive(Debug, Serialize)]
struct EndpointsResponse {
    client_id: String,
    period: &'static str,
    period_start: String,
    period_end: String,
    endpoints: Vec<EndpointUsage>,
}

async fn endpoints(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<PeriodParams>, QueryRejection>,
) -> Result<Json<EndpointsResponse>, ApiError> {
    let client = client_id(path)?;
    let (period, at) = period_of(&query(params)?, state.config.clock.now_ms())?;
    let (start, end) = period.bounds(at);
    let bucket = merged(&state, &client, period.granularity(), start, end).await?;
    let mut endpoints: Vec<EndpointUsage> = bucket
        .into_endpoints()
        .filter(|(_, s)| s.requests > 0)
        .map(|(endpoint, s)| EndpointUsage {
            request_count: s.requests,
            error_count: s.failed,
            error_rate: s.failed as f64 / s.requests as f64,
            average_latency_ms: s.average_latency_ms(),
            p95_latency_ms: latency(s.latency.quantile(0.95).unwrap_or(0.0)),
            total_data_transfer_bytes: s.bytes,
            endpoint,
        })
        .collect();
    // By request count, then name, so equal counts have a stable order.
    endpoints.sort_by(|a, b| {
        b.request_count
            .cmp(&a.request_count)
            .then_with(|| a.endpoint.cmp(&b.endpoint))
    });
    Ok(Json(EndpointsResponse {
        client_id: client,
        period: period.as_str(),
        period_start: format_rfc3339_ms(start),
        period_end: format_rfc3339_ms(end),
        endpoints,
    }))
}

#[derive(Debug, Serialize)]
struct HistoryPoint {
    timestamp: i64,
    request_count: u64,
    error_count: u64,
    data_transfer_bytes: u128,
    average_latency_ms: f64,
}

#[derive(Debug, Serialize)]
struct HistoryResponse {
    client_id: String,
    granularity: &'static str,
    from: String,
    to: String,
    points: Vec<HistoryPoint>,
}

/// Buckets overlapping `[from, to)`; `to` defaults to now and `from` to
/// 24 hours before `to`.
async fn history(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let client = client_id(path)?;
    let params = query(params)?;
    let mut problems = Vec::new();
    let granularity = match params.granularity.as_deref() {
        None => Some(Granularity::Hour),
        Some(g) => Granularity::parse(g).or_else(|| {
            problems.push(FieldProblem::field(
                "granularity",
                format!("{g:?} is not one of minute, hour, day"),
            ));
            None
        }),
    };
    let to = instant("to", params.to.as_deref(), &mut problems);
    let from = instant("from", params.from.as_deref(), &mut problems);
    let Some(granularity) = granularity.filter(|_| problems.is_empty()) else {
        return Err(ApiError::bad_request("invalid query parameters", problems));
    };
    let to = to.unwrap_or(state.config.clock.now_ms());
    let from = from.unwrap_or(to - 24 * HOUR_MS);
    if from >= to {
        return Err(ApiError::bad_request(
            "invalid query parameters",
            vec![FieldProblem::field("from", "must be before `to`")],
        ));
    }
    let start = granularity.bucket_start(from);
    if (to - start) / granularity.width_ms() > MAX_HISTORY_POINTS {
        return Err(ApiError::bad_request(
            "invalid query parameters",
            vec![FieldProblem::field(
                "from",
                format!("the range spans more than {MAX_HISTORY_POINTS} {} buckets; narrow it or use a coarser granularity", granularity.as_str()),
            )],
        ));
    }
    let partition = state.store.partition_of(&client);
    let name = client.clone();
    let points = super::read_partition(&state, partition, move |store| {
        store.read_buckets(partition, &name, granularity, start, to)
    })
    .await?
    .into_iter()
    .map(|(ts, bucket)| {
        let t = bucket.totals();
        HistoryPoint {
            timestamp: ts,
            request_count: t.requests,
            error_count: t.server_errors,
            data_transfer_bytes: t.bytes,
            average_latency_ms: t.average_latency_ms(),
        }
    })
    .collect();
    Ok(Json(HistoryResponse {
        client_id: client,
        granularity: granularity.as_str(),
        from: format_rfc3339_ms(from),
        to: format_rfc3339_ms(to),
        points,
    }))
}
