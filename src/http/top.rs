//! `GET /v1/usage/top`: the clients that consumed the most in a period.
//!
//! Each partition answers its own top N: from its shard's in-memory
//! ranking when the period is the partition's newest, else from the stored
//! period totals (one range read). Partitions hold disjoint clients, so
//! the overall top N is the top N of their answers. In Kafka mode the
//! partitions another instance owns are asked there (`scope=local`), once
//! per instance, and merged the same way.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tally_actors::kafka::membership::Owner;
use tally_actors::top::{lock_top, stored_top, PartitionTop};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant, Period};
use tally_pipelines::top::{merge_top, trend, PeriodTotals, TopMetric, Trend};

use super::forward::FORWARDED_BY;
use super::usage::{parse_period, query};
use super::AppState;
use crate::error::{ApiError, FieldProblem};

/// The most a query may ask for.
pub const MAX_TOP_LIMIT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/usage/top", get(top))
}

#[derive(Debug, Deserialize)]
struct TopParams {
    period: Option<String>,
    at: Option<String>,
    limit: Option<String>,
    metric: Option<String>,
    /// `local`: only this instance's partitions (used between instances).
    scope: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Consumer {
    client_id: String,
    metric_value: u128,
    /// The same metric in the previous period.
    previous_value: u128,
    percent_of_total: f64,
    trend: Trend,
}

#[derive(Debug, Serialize, Deserialize)]
struct TopResponse {
    period: Period,
    period_start: String,
    period_end: String,
    metric: TopMetric,
    /// The metric summed over every client in the period.
    total: u128,
    /// The newest event time in the answering partitions: a period that
    /// ends after it is still in progress, and its trend compares it with
    /// the same share of the previous period.
    data_through: Option<String>,
    top: Vec<Consumer>,
}

struct TopQuery {
    period: Period,
    start: i64,
    end: i64,
    previous_start: i64,
    metric: TopMetric,
    limit: usize,
    local_only: bool,
}

fn parse(params: &TopParams, now_ms: i64) -> Result<TopQuery, ApiError> {
    let mut problems = Vec::new();
    let period = parse_period(
        params.period.as_deref(),
        params.at.as_deref(),
        now_ms,
        &mut problems,
    );
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => Some(10),
        Some(Ok(n)) if (1..=MAX_TOP_LIMIT).contains(&n) => Some(n),
        Some(_) => {
            problems.push(FieldProblem::field(
                "limit",
                format!("must be a whole number within 1..={MAX_TOP_LIMIT}"),
            ));
            None
        }
    };
    let metric = match params.metric.as_deref() {
        None => Some(TopMetric::RequestCount),
        Some(m) => TopMetric::parse(m).or_else(|| {
            problems.push(FieldProblem::field(
                "metric",
                format!("{m:?} is not one of request_count, data_transfer_bytes, compute_units, error_count"),
            ));
            None
        }),
    };
    let local_only = match params.scope.as_deref() {
        None | Some("all") => false,
        Some("local") => true,
        Some(s) => {
            problems.push(FieldProblem::field(
                "scope",
                format!("{s:?} is not one of all, local"),
            ));
            false
        }
    };
    match (period, limit, metric) {
        (Some((period, at)), Some(limit), Some(metric)) if problems.is_empty() => {
            let (start, end) = period.bounds(at);
            let (previous_start, _) = period.bounds(start - 1);
            Ok(TopQuery {
                period,
                start,
                end,
                previous_start,
                metric,
                limit,
                local_only,
            })
        }
        _ => Err(ApiError::bad_request("invalid query parameters", problems)),
    }
}

async fn top(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<TopParams>, QueryRejection>,
) -> Result<Json<TopResponse>, ApiError> {
    let params = query(params)?;
    let q = parse(&params, state.config.clock.now_ms())?;
    // Which partitions are answered here, and who answers the others.
    let mut local: Vec<u16> = Vec::new();
    let mut remote: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for p in 0..state.shards.partitions() {
        match state.membership.as_ref().map(|m| m.owner(p)) {
            None | Some(Owner::Local) => local.push(p),
            Some(Owner::Remote(_)) if q.local_only || headers.contains_key(&FORWARDED_BY) => {}
            Some(Owner::Remote(owner)) => remote.entry(owner).or_default().push(p),
            Some(Owner::Unknown) if q.local_only => {}
            Some(Owner::Unknown) => return Err(ApiError::PartitionMoving { partition: p }),
        }
    }

    let local_state = state.clone();
    let (period, start, previous_start, metric, limit) =
        (q.period, q.start, q.previous_start, q.metric, q.limit);
    let mine = tokio::task::spawn_blocking(move || {
        local_top(
            &local_state,
            &local,
            period,
            start,
            previous_start,
            metric,
            limit,
        )
    });
    let mut parts: Vec<(String, u128, u128)> = Vec::new();
    let mut total = 0u128;
    let mut clock: Option<i64> = None;
    for (owner, partitions) in remote {
        let answer =
            ask(&state, &owner, &q)
                .await
                .map_err(|detail| ApiError::OwnerUnreachable {
                    partition: partitions.first().copied().unwrap_or(0),
                    owner: owner.clone(),
                    detail,
                })?;
        total = total.saturating_add(answer.total);
        clock = clock.max(
            answer
                .data_through
                .as_deref()
                .and_then(|t| parse_instant(t).ok()),
        );
        parts.extend(
            answer
                .top
                .into_iter()
                .map(|c| (c.client_id, c.metric_value, c.previous_value)),
        );
    }
    let (mine_total, mine_clock, mine_parts) = mine
        .await
        .map_err(|e| ApiError::Internal(format!("top-consumer query failed: {e}")))??;
    total = total.saturating_add(mine_total);
    clock = clock.max(mine_clock);
    parts.extend(mine_parts);

    let elapsed = match clock {
        Some(c) if c < q.end => ((c + 1 - q.start) as f64 / (q.end - q.start) as f64).max(0.0),
        _ => 1.0,
    };
    let threshold = state.config.top_trend_threshold;
    let top = merge_top(parts, q.limit)
        .into_iter()
        .map(|(client_id, value, previous)| Consumer {
            percent_of_total: percent(value, total),
            trend: trend(value, previous, elapsed, threshold),
            client_id,
            metric_value: value,
            previous_value: previous,
        })
        .collect();
    Ok(Json(TopResponse {
        period: q.period,
        period_start: format_rfc3339_ms(q.start),
        period_end: format_rfc3339_ms(q.end),
        metric: q.metric,
        total,
        data_through: clock.map(format_rfc3339_ms),
        top,
    }))
}

/// Percent with two decimals.
fn percent(value: u128, total: u128) -> f64 {
    if total == 0 {
        0.0
    } else {
        (value as f64 / total as f64 * 10_000.0).round() / 100.0
    }
}

type LocalTop = (u128, Option<i64>, Vec<(String, u128, u128)>);

/// The top of this instance's partitions, each entry with its previous
/// period's value.
fn local_top(
    state: &AppState,
    partitions: &[u16],
    period: Period,
    start: i64,
    previous_start: i64,
    metric: TopMetric,
    limit: usize,
) -> Result<LocalTop, ApiError> {
    let mut total = 0u128;
    let mut clock: Option<i64> = None;
    let mut parts = Vec::new();
    for &p in partitions {
        let shard_top = state.shards.top(p)?;
        let in_memory = lock_top(shard_top).top(period, start, metric, limit);
        let PartitionTop { total: t, entries } = match in_memory {
            Some(t) => t,
            None => stored_top(&state.store, p, period, start, metric, limit)?,
        };
        total = total.saturating_add(t);
        clock = clock.max(state.store.partition_clock(p));
        for (client, value) in entries {
            let previous = lock_top(shard_top).totals(period, previous_start, &client);
            let previous: PeriodTotals = match previous {
                Some(t) => t,
                None => state
                    .store
                    .client_period_totals(p, period, previous_start, &client)?,
            };
            parts.push((client, value, previous.get(metric)));
        }
    }
    Ok((total, clock, parts))
}

/// Asks another instance for its partitions' share.
async fn ask(state: &AppState, owner: &str, q: &TopQuery) -> Result<TopResponse, String> {
    let me = state
        .membership
        .as_ref()
        .map(|m| m.address().to_string())
        .unwrap_or_default();
    let url = format!(
        "{owner}/v1/usage/top?period={}&at={}&limit={}&metric={}&scope=local",
        q.period.as_str(),
        q.start,
        q.limit,
        q.metric.as_str()
    );
    let answer = state
        .http_client
        .get(url)
        .timeout(std::time::Duration::from_secs(10))
        .header(FORWARDED_BY.as_str(), me)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("{owner} answered {}", answer.status()));
    }
    answer.json().await.map_err(|e| e.to_string())
}
