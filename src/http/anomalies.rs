//! Anomaly queries: what the detectors found, newest first. In Kafka mode
//! `GET /v1/anomalies` answers for the whole cluster: each owner reads its
//! partitions and the pages merge.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tally_actors::kafka::membership::Owner;
use tally_pipelines::detect::{Anomaly, AnomalyType, Severity};
use tally_pipelines::time::{format_rfc3339_ms, parse_instant, HOUR_MS};

use super::forward::FORWARDED_BY;
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
fn render(mut found: Vec<Anomaly>, limit: usize, more_elsewhere: bool) -> Json<Value> {
    found.sort_by(|a, b| {
        b.detected_at_ms
            .cmp(&a.detected_at_ms)
            .then(b.anomaly_id.cmp(&a.anomaly_id))
    });
    let more = found.len() > limit || more_elsewhere;
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
    headers: HeaderMap,
    raw: RawQuery,
    q: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        q.map_err(|e| ApiError::bad_request(format!("invalid query string: {e}"), vec![]))?;
    let f = filter(&state, &params)?;
    let partitions: Vec<u16> = match &params.client_id {
        Some(c) => vec![state.shards.partition_of(c)],
        None => (0..state.shards.partitions()).collect(),
    };
    // In a cluster each owner answers for its partitions (a forwarded
    // request only for what is local here); the pages merge, since the
    // order (detection time, then id) and the cursor are the same
    // everywhere.
    let mut local = Vec::new();
    let mut remote: BTreeMap<String, u16> = BTreeMap::new();
    for p in partitions {
        match state.membership.as_ref().map(|m| m.owner(p)) {
            None | Some(Owner::Local) => local.push(p),
            Some(Owner::Remote(_)) if headers.contains_key(&FORWARDED_BY) => {}
            Some(Owner::Remote(owner)) => {
                remote.entry(owner).or_insert(p);
            }
            Some(Owner::Unknown) => return Err(ApiError::PartitionMoving { partition: p }),
        }
    }
    let mut found = read(&state, local.into_iter(), params.client_id.as_deref(), &f).await?;
    let mut more = false;
    for (owner, partition) in remote {
        let (theirs, their_more) = ask(&state, &owner, raw.0.as_deref().unwrap_or(""))
            .await
            .map_err(|detail| ApiError::OwnerUnreachable {
                partition,
                owner: owner.clone(),
                detail,
            })?;
        found.extend(theirs);
        more |= their_more;
    }
    Ok(render(found, f.limit, more))
}

/// Asks another instance for its partitions' page of the same query.
async fn ask(state: &AppState, owner: &str, query: &str) -> Result<(Vec<Anomaly>, bool), String> {
    let me = state
        .membership
        .as_ref()
        .map(|m| m.address().to_string())
        .unwrap_or_default();
    let answer = state
        .http_client
        .get(format!("{owner}/v1/anomalies?{query}"))
        .timeout(std::time::Duration::from_secs(10))
        .header(FORWARDED_BY.as_str(), me)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !answer.status().is_success() {
        return Err(format!("{owner} answered {}", answer.status()));
    }
    let page: Page = answer.json().await.map_err(|e| e.to_string())?;
    let found = page
        .anomalies
        .into_iter()
        .map(|a| {
            Ok(Anomaly {
                detected_at_ms: parse_instant(&a.detected_at).map_err(|e| {
                    format!("{owner} answered detected_at {:?}: {e}", a.detected_at)
                })?,
                anomaly_id: a.anomaly_id,
                client_id: a.client_id,
                endpoint: a.endpoint,
                anomaly_type: a.anomaly_type,
                severity: a.severity,
                description: a.description,
                baseline: a.baseline,
                observed: a.observed,
                deviation_percent: a.deviation_percent,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((found, page.next_cursor.is_some()))
}

/// An answer of [`render`], read back from another instance.
#[derive(Deserialize)]
struct Page {
    anomalies: Vec<Rendered>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
struct Rendered {
    anomaly_id: String,
    client_id: String,
    endpoint: Option<String>,
    anomaly_type: AnomalyType,
    severity: Severity,
    detected_at: String,
    description: String,
    baseline: f64,
    observed: f64,
    deviation_percent: f64,
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
        false,
    ))
}
